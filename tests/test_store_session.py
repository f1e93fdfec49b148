"""The writer's API to a store's life cycle (cache.lifecycle.WriteSession), on its own: a .h5
store is staged, written out in one piece and its staging store dropped; a full disk (a real
tmpfs) during the export leaves no half-written file, one line, and the next session ends it;
a foreign file in the way is left alone; a held store refuses a second session."""

from __future__ import annotations

import os

import numpy as np
import pytest

from cache import WriteSession, open_store
from cache.core.errors import WriteFailed
from cache.fingerprint import make_fingerprint
from cache.layout import ClipResult, ClipRow
from cache.lifecycle import NotAStore
from cache.lock import StoreBusy
from cache.store import StoreError
from cache.core.labels import RAER5
from test_store_faults import fill_disk, small_disk  # noqa: F401 - small_disk: a 2 MB tmpfs

S, K, D, N = 4, 2, 64, 10


def _fingerprint() -> dict:
    return make_fingerprint(clip_spec="random:tiny", clip_revision="r1", feature_dim=D,
                            image_size=224, segments=S, candidates=K, flip=False, pixels=False,
                            normalize="clip", face_model="full", face_margin=20,
                            min_face_score=0.5, face_resize="squash", face_boxes=None,
                            labels=RAER5)


def _rows() -> list[ClipRow]:
    return [ClipRow(f"c{i}", f"/clips/c{i}.mp4", i % 5, "train") for i in range(N)]


def _write_all(session: WriteSession) -> np.ndarray:
    """Prepare the session's store for N clips and write them all; returns the face features."""
    assert session.prepare(_fingerprint(), _rows(), [])
    face = np.random.default_rng(0).standard_normal((N, S, K, D)).astype(np.float16)
    writer = session.writer()
    for i in range(N):
        writer.write_clip(i, ClipResult(
            "ok", n_frames=S * K, frame_index=np.arange(S * K).reshape(S, K),
            box=np.zeros((S, K, 4), np.float32), score=np.ones((S, K), np.float32),
            found=np.ones((S, K), bool), features={"face": face[i], "context": face[i]}))
    writer.close()
    return face


def test_an_hdf5_store_is_staged_exported_whole_and_its_staging_store_dropped(tmp_path):
    cache = tmp_path / "s.h5"
    with WriteSession(cache) as session:
        assert session.staging == tmp_path / "s.h5.staging.zarr"
        face = _write_all(session)
        assert not cache.exists()  # nothing at the .h5 until the commit
        session.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]  # no staging store, no lock
    with open_store(cache) as store:
        np.testing.assert_array_equal(store.features("face")[:], face)
        assert (store.manifest.status == "ok").all()
    with WriteSession(cache) as session:  # everything asked for is there: nothing to do
        assert not session.prepare(_fingerprint(), _rows(), [])


def test_a_full_disk_during_the_export_leaves_no_half_file_and_the_next_session_ends_it(
        small_disk):  # noqa: F811 - the fixture imported above
    cache = small_disk / "s.h5"
    with WriteSession(cache) as session:
        face = _write_all(session)
        filler = fill_disk(small_disk)  # 8 KB left: far less than the .h5 needs
        # HDF5 fails to flush the file; the process that holds it would crash on releasing it
        # (h5py 3.16), so a child writes it and this process gets the one-line error.
        with pytest.raises(WriteFailed, match="No space left on device") as failure:
            session.commit()
        assert str(session.staging) in str(failure.value)  # the finished staging store is kept
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "s.h5.staging.zarr"]
    filler.unlink()
    with WriteSession(cache) as session:  # the next run finds its clips done and exports
        assert session.prepare(_fingerprint(), _rows(), [])
        assert (session.writer().status == 1).all()
        session.commit()
    assert sorted(p.name for p in small_disk.iterdir()) == ["s.h5"]
    with open_store(cache) as store:
        np.testing.assert_array_equal(store.features("face")[:], face)


def test_a_foreign_file_in_the_way_is_left_alone(tmp_path):
    cache = tmp_path / "s.h5"
    notes = tmp_path / "s.h5.writing"  # where the export writes, but not an HDF5 file of ours
    notes.write_text("my notes\n")
    with WriteSession(cache) as session:
        _write_all(session)
        with pytest.raises(StoreError, match="is in the way and is not a temporary"):
            session.commit()
    assert notes.read_text() == "my notes\n" and not cache.exists()
    assert open_store(tmp_path / "s.h5.staging.zarr").n_clips == N  # the finished clips kept
    # A foreign file at the store's path itself: refused before anything, the lock included.
    other = tmp_path / "other.h5"
    other.write_bytes(b"not a store")
    with pytest.raises(NotAStore):
        WriteSession(other)
    assert other.read_bytes() == b"not a store" and not (tmp_path / "other.h5.lock").exists()


def test_a_held_store_refuses_a_second_session_until_it_is_released(tmp_path):
    cache = tmp_path / "s.zarr"
    first = WriteSession(cache)
    try:
        with pytest.raises(StoreBusy, match=f"pid {os.getpid()}"):
            WriteSession(cache)
    finally:
        first.close()
    with WriteSession(cache) as second:
        _write_all(second)
        second.commit()  # a Zarr store: committed clip by clip already, nothing to export
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]
    assert (open_store(cache).manifest.status == "ok").all()
