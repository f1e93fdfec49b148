"""The store on its own: arrays in, the same arrays out, in Zarr and HDF5."""

from __future__ import annotations

import numpy as np
import pytest

from cache import (StoreError, build_store_from_arrays, fingerprint_mismatch, make_fingerprint,
                   open_store)
from cache.fingerprint import describe_mismatch
from cache.layout import ClipResult, ClipRow
from cache.writer import StoreWriter, create_zarr
from cache.core.labels import CAER7, RAER5


def _arrays(n=6, s=4, k=2, d=8, seed=0):
    rng = np.random.default_rng(seed)
    face = rng.normal(size=(n, s, k, d)).astype(np.float16)
    context = rng.normal(size=(n, s, k, d)).astype(np.float16)
    return face, context


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_round_trip_and_indexing(tmp_path, suffix):
    face, context = _arrays()
    flip = face[:, :, :, ::-1].copy()
    pixels = np.random.default_rng(1).integers(0, 255, (6, 4, 2, 3, 224, 224), dtype=np.uint8)
    store = build_store_from_arrays(
        tmp_path / f"s{suffix}", face=face, context=context, labels=[0, 1, 2, 3, 4, 0],
        splits=["train"] * 4 + ["test"] * 2, ids=list("abcdef"),
        fingerprint={"labels": "raer5", "clip_spec": "random:tiny"}, face_flip=flip,
        context_flip=context, pixels_face=pixels, pixels_context=pixels,
        metadata={"source": "synthetic"})
    with store:
        assert store.n_clips == 6 and store.labels == RAER5
        idx = np.array([1, 3, 4])
        np.testing.assert_array_equal(store.features("face")[idx], face[idx])
        np.testing.assert_array_equal(store.features("context")[:], context)
        np.testing.assert_array_equal(store.features("face", flip=True)[idx], flip[idx])
        assert store.features("face").dtype == np.float16
        assert store.features("face").shape == (6, 4, 2, 8)
        np.testing.assert_array_equal(store.pixels("face")[2], pixels[2])
        assert store.face_found[:].all() and store.frame_indices.shape == (6, 4, 2)
        m = store.manifest
        assert list(m.id) == list("abcdef") and list(m.split[-2:]) == ["test", "test"]
        assert list(m.label_name[:2]) == ["Neutrality", "Enjoyment"]
        assert (m.status == "ok").all() and store.metadata == {"source": "synthetic"}
        with pytest.raises(IndexError):
            store.features("face")[np.array([3, 1])]  # unsorted
        with pytest.raises(IndexError):
            store.features("face")[6]


def test_store_without_flip_or_pixels(tmp_path):
    face, context = _arrays(n=3, s=5, k=1, d=4)
    store = build_store_from_arrays(tmp_path / "s.zarr", face=face[:, :, 0],
                                    context=context[:, :, 0],
                                    labels=[0, 1, 2], splits="train",
                                    fingerprint={"labels": CAER7.as_dict()})
    assert store.pixels("face") is None and store.labels.name == "caer7"
    assert store.features("face").shape == (3, 5, 1, 4)
    with pytest.raises(StoreError, match="--flip"):
        store.features("face", flip=True)


def test_bad_inputs_are_refused(tmp_path):
    face, context = _arrays(n=2)
    with pytest.raises(StoreError, match="labels must be in 0..4"):
        build_store_from_arrays(tmp_path / "a.zarr", face=face, context=context, labels=[0, 7],
                                splits="train", fingerprint={})
    with pytest.raises(StoreError, match="segments"):
        build_store_from_arrays(tmp_path / "b.zarr", face=face, context=context, labels=[0, 1],
                                splits="train", fingerprint={"segments": 16})
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()
    (tmp_path / "junk.zarr").mkdir()
    with pytest.raises(StoreError, match="not a"):
        open_store(tmp_path / "junk.zarr")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(StoreError, match="not a readable HDF5"):
        open_store(tmp_path / "junk.h5")
    with pytest.raises(StoreError, match="no such store"):
        open_store(tmp_path / "missing.zarr")


def _fp(**change):
    base = dict(clip_spec="random:tiny", clip_revision="r1", feature_dim=8, image_size=224,
                segments=4, candidates=1, flip=False, pixels=False, normalize="clip",
                face_model="full", face_margin=20, min_face_score=0.5, face_resize="squash",
                face_boxes=None, labels=RAER5)
    base.update(change)
    return make_fingerprint(**base)


def test_fingerprint_mismatch_names_each_option():
    assert fingerprint_mismatch(_fp(), _fp()) == []
    # Same weights under another name: not a mismatch.
    assert fingerprint_mismatch(_fp(), _fp(clip_spec="/elsewhere/tiny")) == []
    keys = fingerprint_mismatch(_fp(), _fp(segments=8, flip=True, labels=CAER7))
    assert keys == ["flip", "labels", "segments"]
    text = describe_mismatch(_fp(), _fp(segments=8, flip=True, labels=CAER7), keys)
    assert "--segments (store 4, now 8)" in text and "--flip" in text
    assert "--labels (store raer5, now caer7)" in text


def test_killed_extension_reads_up_to_committed_count(tmp_path):
    """Arrays resized by an extension that died before its commit stay invisible."""
    fp = _fp()
    path = tmp_path / "s.zarr"
    create_zarr(path, fp, [ClipRow("a", "/a", 0), ClipRow("b", "/b", 1)], [])
    writer = StoreWriter(path)
    s = np.zeros((4, 1), np.int32)
    writer.write_clip(0, ClipResult("ok", n_frames=4, frame_index=s, box=np.zeros((4, 1, 4)),
                                    score=np.ones((4, 1)), found=np.ones((4, 1), bool),
                                    features={"face": np.ones((4, 1, 8)),
                                              "context": np.ones((4, 1, 8))}))
    writer.write_clip(1, ClipResult("failed", reason="file not found"))
    for name in writer._specs:  # what a kill between resize and commit leaves
        writer._root[name].resize((5,) + writer._root[name].shape[1:])
    store = open_store(path)
    assert store.n_clips == 2 and store.features("face").shape[0] == 2
    assert list(store.manifest.status) == ["ok", "failed"]
    assert store.manifest.reason[1] == "file not found"
    # The repeated extension then commits three clips.
    StoreWriter(path).extend([ClipRow("c", "/c", 2)], ["scene"])
    store = open_store(path)
    assert list(store.manifest.id) == ["a", "b", "c"]
    assert list(store.manifest.status) == ["ok", "failed", "pending"]
    assert store.features("face").shape[0] == 3


def test_building_over_a_store_another_process_is_writing_is_refused_and_touches_nothing(
        tmp_path):
    """build_store_from_arrays takes the store's write lock as extract does: while another
    process writes a .h5 store (its staging store open), building the same path is refused,
    and the writer's staging store, which is positively caer-kit's, is left alone."""
    import subprocess
    import sys

    from cache.layout import staging_path
    from cache.lock import StoreBusy
    from conftest import ROOT

    cache = tmp_path / "s.h5"
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
from cache import WriteSession, make_fingerprint
from cache.layout import ClipRow
from cache.core.labels import RAER5
fp = make_fingerprint(clip_spec="random:tiny", clip_revision="r", feature_dim=8, image_size=224,
                      segments=4, candidates=2, flip=False, pixels=False, normalize="clip",
                      face_model="full", face_margin=20, min_face_score=0.5,
                      face_resize="squash", face_boxes=None, labels=RAER5)
session = WriteSession({str(cache)!r})
session.prepare(fp, [ClipRow("c0", "/c0.mp4", 0, "train")], [])
print("ready", flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        staging = staging_path(cache)
        before = sorted((p.relative_to(staging), p.read_bytes()) for p in staging.rglob("*")
                        if p.is_file())
        assert before
        face, context = _arrays()
        with pytest.raises(StoreBusy, match=f"pid {holder.pid}"):
            build_store_from_arrays(cache, face=face, context=context, labels=[0] * 6,
                                    splits="train", fingerprint={"labels": RAER5.as_dict()})
        assert sorted((p.relative_to(staging), p.read_bytes()) for p in staging.rglob("*")
                      if p.is_file()) == before
        assert not cache.exists()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_clip_table_is_the_manifests_columns_reading_only_their_arrays(tmp_path, suffix):
    """clip_table(columns) equals those columns of the manifest (annotation columns too, one
    of them named like a manifest column), and reads no other array: a damaged chunk of
    clips/note stops the manifest but not a table without the note."""
    from cache.hdf5 import export_hdf5
    from cache.store import StoreDamaged

    fp = make_fingerprint(clip_spec="random:tiny", clip_revision="r", feature_dim=8,
                          image_size=224, segments=4, candidates=1, flip=False, pixels=False,
                          normalize="clip", face_model="full", face_margin=20,
                          min_face_score=0.5, face_resize="squash", face_boxes=None,
                          labels=RAER5)
    rows = [ClipRow(f"c{i}", f"/v/c{i}.mp4", i % 5, "train" if i < 4 else "test",
                    {"scene": f"s{i % 2}", "status": "annotated"}) for i in range(6)]
    path = tmp_path / "s.zarr"
    create_zarr(path, fp, rows, ["scene", "status"])
    writer = StoreWriter(path)
    face = np.zeros((4, 1, 8), np.float16)
    for i in range(6):
        writer.write_clip(i, ClipResult("failed", reason="unreadable") if i == 2 else ClipResult(
            "ok", n_frames=30 + i, fps=25.0, width=640, height=480, note=f"note {i}",
            frame_index=np.zeros((4, 1), np.int32), box=np.zeros((4, 1, 4), np.float32),
            score=np.ones((4, 1), np.float32), found=np.ones((4, 1), bool),
            features={"face": face, "context": face}))
    writer.close()
    if suffix == ".h5":
        export_hdf5(path, tmp_path / "s.h5")
        path = tmp_path / "s.h5"
    store = open_store(path)
    manifest = store.manifest
    assert list(manifest["status"]) == ["ok", "ok", "failed", "ok", "ok", "ok"]  # the clip's
    for columns in (["id", "label", "split", "status"], ["label"], ["scene", "n_frames"],
                    ["note", "listed_frames", "label_name", "path", "fps"]):
        table = open_store(path).clip_table(columns)
        assert list(table.columns) == columns
        assert table.equals(manifest[columns]), columns
    assert open_store(path).clip_table().equals(manifest)
    with pytest.raises(StoreError, match="no manifest column 'colour'"):
        store.clip_table(["label", "colour"])
    if suffix == ".zarr":
        (path / "clips" / "note" / "c" / "3").unlink()  # a lost chunk of an ok clip
        with pytest.raises(StoreDamaged, match="clips/note"):
            open_store(path).manifest
        table = open_store(path).clip_table(["id", "label", "split", "status"])
        assert table.equals(manifest[["id", "label", "split", "status"]])
