"""Real faults under a real extract: --redo-damaged repairs exactly the damaged clips,
--retry-failed takes a corrected list entry, a full disk (a 2 MB tmpfs) and a read-only bind
mount give one line and exit 4 with nothing half-written, outputs replace planted symlinks."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cache import open_store
from conftest import moving_square_frames, write_video
from test_store_damage import _damage_hdf5, _damage_zarr
from test_store_writers import _args, _one_error_line, _snapshot


def _run(args):
    from cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("fault_clips")
    for i in range(4):
        write_video(d / f"v{i}.mp4", moving_square_frames(20 + i, (32, 48), speed=2 + i))
    noise = np.random.default_rng(0)
    for i in range(4):  # noise compresses badly: its stored crops fill a small disk
        write_video(d / f"n{i}.mp4", noise.integers(0, 256, (8, 64, 64, 3), dtype=np.uint8),
                    options={"crf": "0"})
    (d / "noise.csv").write_text("path,label\n" + "".join(f"n{i}.mp4,{i}\n" for i in range(4)))
    (d / "a.csv").write_text("path,label,split\n" + "".join(f"v{i}.mp4,{i},train\n" for i in range(4)))
    return d


def _arrays(path: Path) -> dict:
    store = open_store(path)
    return {name: store.array(name)[:] for name in store._specs}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f") for k in a)


def test_redo_damaged_re_extracts_only_the_damaged_clips(clips, tiny_clip_dir, tmp_path):
    cache = tmp_path / "s.zarr"
    assert _run(_args(clips, tiny_clip_dir, cache)).exit_code == 0
    intact = _arrays(cache)
    _damage_zarr(cache, "flip", row=1)
    _damage_zarr(cache, "delete", row=2, name="faces/score")
    result = _run(_args(clips, tiny_clip_dir, cache, "a.csv"))  # a plain resume sees no work
    assert result.exit_code == 0
    result = _run(["train-head", "--cache", cache, "--out", tmp_path / "run", "--quiet"])
    assert result.exit_code == 2 and "clip 'v1.mp4' (row 1)" in result.output
    untouched = {name: os.stat(p).st_mtime_ns for name, p in
                 ((n, cache / "features" / "face" / "c" / str(r) / "0" / "0" / "0")
                  for n, r in (("row0", 0), ("row3", 3)))}
    result = _run(_args(clips, tiny_clip_dir, cache, "a.csv", "--redo-damaged"))
    assert result.exit_code == 0, result.output
    assert "2 done in this run" in result.output
    assert _equal(_arrays(cache), intact)
    assert {name: os.stat(cache / "features" / "face" / "c" / r / "0" / "0" / "0").st_mtime_ns
            for name, r in (("row0", "0"), ("row3", "3"))} == untouched


def test_redo_damaged_repairs_an_hdf5_store(clips, tiny_clip_dir, tmp_path):
    cache = tmp_path / "s.h5"
    assert _run(_args(clips, tiny_clip_dir, cache)).exit_code == 0
    intact = _arrays(cache)
    _damage_hdf5(cache, "flip", row=2)
    assert _run(["info", cache, "--verify"]).exit_code == 2
    result = _run(_args(clips, tiny_clip_dir, cache, "a.csv", "--redo-damaged"))
    assert result.exit_code == 0, result.output
    assert "1 done in this run" in result.output
    assert _equal(_arrays(cache), intact)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]


def test_retry_failed_takes_a_corrected_list_entry(clips, tiny_clip_dir, tmp_path):
    listing = tmp_path / "list.csv"
    listing.write_text("id,path,label\nx,/elsewhere/v0.mp4,0\ny,v1.mp4,1\n")
    cache = tmp_path / "s.zarr"
    args = ["extract", "--annotations", listing, "--root", clips, "--clip", tiny_clip_dir,
            "--cache", cache, "--segments", "4", "--batch-size", "8", "--workers", "0",
            "--quiet"]
    assert _run(args).exit_code == 3
    listing.write_text("id,path,label\nx,v0.mp4,0\ny,v1.mp4,1\n")  # the list fixed
    result = _run(args)
    assert result.exit_code == 2 and "--retry-failed" in result.output
    result = _run(args + ["--retry-failed"])
    assert result.exit_code == 0, result.output
    manifest = open_store(cache).manifest
    assert list(manifest.status) == ["ok", "ok"]
    assert manifest.path[0] == str(clips / "v0.mp4")


# ------------------------------------------------------------------ real mounts

def _mount(*args) -> None:
    done = subprocess.run(["mount", *map(str, args)], capture_output=True, text=True)
    if done.returncode:
        pytest.fail(f"this test needs root to mount ({' '.join(map(str, args))}): "
                    f"{done.stderr.strip()}")


def _umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    _mount("-t", "tmpfs", "-o", "size=2m", "tmpfs", disk)
    yield disk
    _umount(disk)


@pytest.fixture
def read_only(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "ro"
    src.mkdir()
    dst.mkdir()
    _mount("--bind", src, dst)
    try:
        _mount("-o", "remount,bind,ro", dst)
        yield src, dst
    finally:
        _umount(dst)


def test_a_full_disk_gives_one_line_exit_4_and_a_valid_store(clips, tiny_clip_dir, small_disk):
    cache = small_disk / "s.zarr"
    # --pixels: about 1.2 MB per clip, so the 2 MB disk fills on the second clip.
    result = _run(_args(clips, tiny_clip_dir, cache, "noise.csv", "--pixels"))
    assert result.exit_code == 4, result.output
    line = _one_error_line(result)
    assert str(cache) in line and "No space left on device" in line and "disk is full" in line
    manifest = open_store(cache).manifest  # what was finished is kept and valid
    assert set(manifest.status) <= {"ok", "pending"} and (manifest.status == "pending").any()
    leftovers = [p for p in small_disk.rglob("*") if p.name.endswith((".partial", ".creating",
                                                                      ".lock", ".tmp"))]
    assert leftovers == []


def fill_disk(disk: Path, leave: int = 8192) -> Path:
    """Fill ``disk`` with a file ``disk/filler`` but for ``leave`` bytes; returns the file."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    os.truncate(filler, os.path.getsize(filler) - leave)
    return filler


def test_a_full_disk_while_creating_leaves_nothing(clips, tiny_clip_dir, small_disk):
    fill_disk(small_disk)  # too little for the store's metadata
    cache = small_disk / "s.zarr"
    result = _run(_args(clips, tiny_clip_dir, cache))
    assert result.exit_code == 4, result.output
    assert "No space left on device" in _one_error_line(result)
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def test_a_read_only_file_system_gives_one_line_exit_4(clips, tiny_clip_dir, read_only, tmp_path):
    src, ro = read_only
    assert _run(_args(clips, tiny_clip_dir, src / "s.zarr")).exit_code == 0
    before = _snapshot(src)
    result = _run(_args(clips, tiny_clip_dir, ro / "s.zarr", "a.csv"))  # append
    assert result.exit_code == 4, result.output
    assert "Read-only file system" in _one_error_line(result)
    result = _run(_args(clips, tiny_clip_dir, ro / "new.zarr"))  # create under it
    assert result.exit_code == 4, result.output
    assert "Read-only file system" in _one_error_line(result)
    assert _snapshot(src) == before


# ------------------------------------------------------------------ outputs never follow links

def test_outputs_replace_planted_symlinks_and_never_write_outside(tmp_path, caplog):
    from test_train import make_store

    cache = tmp_path / "s.zarr"
    make_store(cache, n_train=10, n_test=5)
    outside = tmp_path / "outside"
    outside.mkdir()
    victims = {name: outside / name for name in ("config.json", "head.safetensors", "curves.png",
                                                "report.json", "predictions.csv",
                                                "confusion_matrix.png")}
    for victim in victims.values():
        victim.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "head.safetensors", "curves.png"):
        (run / name).symlink_to(victims[name])
    result = _run(["train-head", "--cache", cache, "--out", run, "--epochs", 1, "--quiet",
                   "--resume", "--val-fraction", "0", "--select", "last"])
    assert result.exit_code == 0, result.output
    report = run / "eval" / "s-test"
    report.mkdir(parents=True)
    for name in ("report.json", "predictions.csv", "confusion_matrix.png"):
        (report / name).symlink_to(victims[name])
    result = _run(["evaluate", "--run", run, "--cache", cache])
    assert result.exit_code == 0, result.output
    assert all(v.read_text() == "precious" for v in victims.values())
    for path in [run / n for n in ("config.json", "head.safetensors", "curves.png")] + \
            [report / n for n in ("report.json", "predictions.csv", "confusion_matrix.png")]:
        assert path.is_file() and not path.is_symlink(), path
    json.loads((report / "report.json").read_text())
    # A second evaluate says it replaces the earlier report.
    caplog.clear()
    with caplog.at_level("INFO", logger="caer"):
        result = _run(["evaluate", "--run", run, "--cache", cache])
    assert result.exit_code == 0
    assert f"evaluate: replacing the earlier report in {report}" in caplog.text
    # A planted eval/ folder link is refused before anything is computed.
    other = tmp_path / "run2"
    other.mkdir()
    (other / "eval").symlink_to(outside)
    for name in ("config.json", "head.safetensors"):
        (other / name).write_bytes((run / name).read_bytes())
    result = _run(["evaluate", "--run", other, "--cache", cache])
    assert result.exit_code == 2 and "symbolic link" in _one_error_line(result)
    assert sorted(p.name for p in outside.iterdir()) == sorted(victims)


def test_import_official_force_refuses_a_symlinked_out(tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    link = tmp_path / "out"
    link.symlink_to(target)
    ckpt = tmp_path / "model_best.pth"
    ckpt.write_bytes(b"not read: refused before")
    result = _run(["import-official", ckpt, "--out", link, "--force"])
    assert result.exit_code == 2
    assert "symbolic link" in _one_error_line(result)
    assert (target / "keep.txt").read_text() == "keep" and link.is_symlink()
