"""Damaged stores on disk: a deleted, a truncated and a byte-flipped chunk, in Zarr and HDF5.
Every read names the clip and the array, `info --verify` lists each damaged clip, train-head
and evaluate refuse with exit 2 and say how to repair; pending clips are never "failed"."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cache import open_store
from cache.store import StoreDamaged
from cache.writer import StoreWriter
from cache.verify import verify_store
from test_train import make_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cli(*args):
    from cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def _chunk(store: Path, name: str, row: int) -> Path:
    with open_store(store) as s:
        array = s._root[name]
        key = array.metadata.encode_chunk_key((row,) + (0,) * (array.ndim - 1))
    return store / name / key


def _damage_zarr(path: Path, how: str, row: int = 3, name: str = "features/face") -> None:
    chunk = _chunk(path, name, row)
    data = chunk.read_bytes()
    if how == "delete":
        chunk.unlink()
    elif how == "truncate":
        chunk.write_bytes(data[: len(data) // 2])
    else:  # flip one byte of the compressed payload
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0x01
        chunk.write_bytes(bytes(flipped))


def _damage_hdf5(path: Path, how: str, row: int = 3, name: str = "features/face") -> None:
    import h5py

    with h5py.File(path, "r") as f:
        ds = f[name]
        info = ds.id.get_chunk_info_by_coord((row,) + (0,) * (ds.ndim - 1))
    with open(path, "r+b") as f:
        if how == "truncate":  # the chunk's second half torn off (zeros, as a torn write)
            f.seek(info.byte_offset + info.size // 2)
            f.write(b"\0" * (info.size - info.size // 2))
        else:
            f.seek(info.byte_offset + info.size // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0x01]))


CASES = [(".zarr", "delete"), (".zarr", "truncate"), (".zarr", "flip"),
         (".h5", "truncate"), (".h5", "flip")]


@pytest.mark.parametrize("suffix,how", CASES)
def test_a_damaged_chunk_is_named_by_every_reader(tmp_path, suffix, how):
    path = tmp_path / f"s{suffix}"
    make_store(path, n_train=10, n_test=4)
    (_damage_zarr if suffix == ".zarr" else _damage_hdf5)(path, how)
    store = open_store(path)
    with pytest.raises(StoreDamaged) as err:
        store.features("face")[:]
    text = str(err.value)
    assert "clip 'clip000003' (row 3)" in text and "features/face" in text
    assert "--redo-damaged" in text and "\n" not in text
    store.features("context")[:]  # the other arrays still read
    damage = verify_store(store)
    assert [(d.row, d.array) for d in damage] == [(3, "features/face")]

    result = _cli("info", path, "--verify")
    assert result.exit_code == 2
    assert "clip 'clip000003' (row 3): array features/face" in result.output
    assert "--redo-damaged" in result.output

    result = _cli("train-head", "--cache", path, "--out", tmp_path / "run", "--epochs", 1,
                  "--quiet")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "clip000003" in lines[0] and "features/face" in lines[0]
    assert "Traceback" not in result.output and not (tmp_path / "run" / "config.json").exists()


def test_an_intact_store_verifies_and_new_stores_carry_checksums(tmp_path):
    path = tmp_path / "s.zarr"
    make_store(path, n_train=6, n_test=2)
    meta = json.loads((path / "zarr.json").read_text())
    assert meta["attributes"]["caer_kit"]["integrity"] == {"checksum": "zstd",
                                                           "every_chunk_written": True}
    codecs = json.loads((path / "features" / "face" / "zarr.json").read_text())["codecs"]
    assert {"name": "zstd", "configuration": {"level": 0, "checksum": True}} in codecs
    assert verify_store(open_store(path)) == []
    result = _cli("info", path, "--verify")
    assert result.exit_code == 0 and "reads back intact" in result.output
    h5 = tmp_path / "s.h5"
    make_store(h5, n_train=6, n_test=2)
    import h5py

    with h5py.File(h5, "r") as f:
        assert f["features/face"].fletcher32 and f["clips/status"].fletcher32


def _old_store(path: Path, new: Path) -> None:
    """The same store as this version's before INTEGRITY: zarr's default codecs (no
    checksum), no integrity attribute, fill-valued chunks not written."""
    import zarr

    src = zarr.open_group(str(new), mode="r")
    dst = zarr.open_group(str(path), mode="w")
    for name in open_store(new)._specs:
        a = src[name]
        b = dst.create_array(name, shape=a.shape, chunks=a.chunks, dtype=a.dtype,
                             fill_value=a.fill_value)
        b[...] = a[...]
    attrs = dict(src.attrs)
    attrs["caer_kit"] = {k: v for k, v in attrs["caer_kit"].items() if k != "integrity"}
    dst.attrs.update(attrs)


def test_old_stores_stay_readable_and_a_lost_feature_chunk_is_still_caught(tmp_path):
    new = tmp_path / "new.zarr"
    make_store(new, n_train=6, n_test=2)
    old = tmp_path / "old.zarr"
    _old_store(old, new)
    store = open_store(old)
    assert store.integrity == {}
    np.testing.assert_array_equal(store.features("face")[:], open_store(new).features("face")[:])
    assert (store.manifest.status == "ok").all() and verify_store(store) == []
    _damage_zarr(old, "delete", row=1)
    with pytest.raises(StoreDamaged, match="clip000001.*features/face.*lost its chunk"):
        open_store(old).features("face")[:]


def test_pending_clips_are_refused_named_pending_and_allowed_on_request(tmp_path):
    path = tmp_path / "s.zarr"
    make_store(path, n_train=20, n_test=5)
    writer = StoreWriter(path)
    writer.mark_pending([2, 7])  # as a killed extract leaves them: not yet done
    writer.close()
    result = _cli("train-head", "--cache", path, "--out", tmp_path / "run", "--epochs", 1,
                  "--quiet")
    assert result.exit_code == 2
    line = result.output.strip()
    assert "2 of the 20 train and val clips are pending" in line and "failed" not in line
    assert "stopped before it finished" in line and "--allow-pending" in line
    assert not (tmp_path / "run").exists()
    info = json.loads(_cli("info", path, "--json").output)
    assert (info["n_pending"], info["n_failed"], info["failures"]) == (2, 0, [])
    result = _cli("train-head", "--cache", path, "--out", tmp_path / "run", "--epochs", 1,
                  "--quiet", "--allow-pending", "--val-fraction", "0", "--select", "last")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["extra"]["n_pending_skipped"] == 2 and config["extra"]["n_failed_skipped"] == 0
    assert config["extra"]["splits"]["train"] == 18

    # evaluate: the same rule for the split it scores
    writer = StoreWriter(path)
    writer.mark_pending([21])
    writer.close()
    result = _cli("evaluate", "--run", tmp_path / "run", "--cache", path, "--out",
                  tmp_path / "report")
    assert result.exit_code == 2 and "1 of the 5 'test' clips are pending" in result.output
    result = _cli("evaluate", "--run", tmp_path / "run", "--cache", path, "--out",
                  tmp_path / "report", "--allow-pending", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["n"] == 4


@pytest.mark.slow
def test_finetune_names_a_damaged_crop_read_in_a_dataloader_worker(tmp_path):
    from test_finetune import make_pixel_store

    path = tmp_path / "p.zarr"
    make_pixel_store(path, n_train=6, n_test=2)
    _damage_zarr(path, "flip", row=2, name="pixels/face")
    result = _cli("finetune", "--cache", path, "--out", tmp_path / "run", "--epochs", 1,
                  "--batch-size", 2, "--workers", 1, "--val-fraction", 0, "--select", "last",
                  "--precision", "fp32", "--quiet")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert "clip 'clip000002' (row 2): array pixels/face is damaged" in lines[0]
    assert not (tmp_path / "run" / "config.json").exists()
