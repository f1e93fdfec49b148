"""Who may write a store: a --cache that is not positively a store is refused before anything
is touched, one writer at a time (a real second process), kill -9 leaves no stale lock."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from cache import open_store
from cache.lock import lock_path, writer_running
from conftest import ROOT, moving_square_frames, write_video

PARTIAL = "zarr.0123456789abcdef0123456789abcdef.partial"


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("writer_clips")
    for i in range(6):
        write_video(d / f"v{i}.mp4", moving_square_frames(20 + i, (32, 48), speed=2 + i))
    (d / "a.csv").write_text("path,label\n" + "".join(f"v{i}.mp4,{i % 5}\n" for i in range(3)))
    (d / "b.csv").write_text("path,label\n" + "".join(f"v{i}.mp4,{i % 5}\n" for i in range(3, 6)))
    (d / "all.csv").write_text("path,label\n" + "".join(f"v{i}.mp4,{i % 5}\n" for i in range(6)))
    return d


def _args(clips, clip_dir, cache, csv="a.csv", *more):
    return ["extract", "--annotations", str(clips / csv), "--clip", str(clip_dir), "--cache",
            str(cache), "--segments", "4", "--batch-size", "8", "--workers", "0", "--quiet",
            *more]


def _run(args):
    from cli import main

    return CliRunner().invoke(main, args)


def _popen(args, env=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _snapshot(root: Path) -> dict:
    out = {}
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            p = Path(folder) / name
            st = os.lstat(p)
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns,
                                             p.read_bytes() if p.is_file() and not p.is_symlink()
                                             else None)
    return out


def _one_error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert "Traceback" not in result.output, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


# ------------------------------------------------------------------ not a store: hands off

def _user_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "mine"
    (folder / "deep" / "deeper").mkdir(parents=True)
    (folder / "notes.partial").write_text("my notes")
    (folder / "deep" / PARTIAL).write_text("looks like zarr's temp file, but is mine")
    (folder / "deep" / "deeper" / "x.creating").write_text("mine too")
    (folder / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    return folder


@pytest.mark.parametrize("how", ["folder", "symlink to folder", "dangling symlink", "file"])
def test_extract_refuses_a_path_that_is_not_a_store_and_touches_nothing(clips, tiny_clip_dir,
                                                                       tmp_path, how):
    folder = _user_folder(tmp_path)
    cache = {"folder": folder, "symlink to folder": tmp_path / "link.zarr",
             "dangling symlink": tmp_path / "gone.zarr", "file": folder / "notes.partial"}[how]
    if how == "symlink to folder":
        cache.symlink_to(folder)
    if how == "dangling symlink":
        cache.symlink_to(tmp_path / "nowhere.zarr")
    before = _snapshot(tmp_path)
    result = _run(_args(clips, tiny_clip_dir, cache))
    assert result.exit_code == 2
    line = _one_error_line(result)
    assert str(cache) in line
    assert ("does not exist" if how == "dangling symlink" else "not a caer-kit store") in line
    assert _snapshot(tmp_path) == before  # nothing deleted, created or modified
    assert not (tmp_path / "nowhere.zarr").exists()


def test_a_symlink_to_a_real_store_is_used_and_the_store_is_locked_by_its_real_path(
        clips, tiny_clip_dir, tmp_path):
    real = tmp_path / "disk" / "real.zarr"
    real.parent.mkdir()
    assert _run(_args(clips, tiny_clip_dir, real)).exit_code == 0
    link = tmp_path / "link.zarr"
    link.symlink_to(real)
    result = _run(_args(clips, tiny_clip_dir, link, "b.csv"))
    assert result.exit_code == 0, result.output
    assert len(open_store(real).manifest) == 6 and link.is_symlink()
    assert not lock_path(link).exists() and not lock_path(real).exists()


# ------------------------------------------------------------------ one writer at a time

def _wait_for_lock(cache: Path, proc, timeout: float = 60) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        holder = writer_running(cache)
        if holder and f"pid {proc.pid} " in holder:
            return holder
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the first writer never took the lock")


@pytest.mark.slow
def test_two_appends_at_once_refuse_or_wait_and_lose_no_clip(clips, tiny_clip_dir, tmp_path):
    cache = tmp_path / "s.zarr"
    assert _run(_args(clips, tiny_clip_dir, cache)).exit_code == 0
    # The first appender holds the store while it works; we plant a temporary it could be
    # writing, which a second writer's start-up cleanup must not delete.
    first = _popen(_args(clips, tiny_clip_dir, cache, "b.csv"))
    holder = _wait_for_lock(cache, first)
    planted = cache / "features" / "face" / PARTIAL
    planted.write_text("the first writer's temporary")
    refused = _run(_args(clips, tiny_clip_dir, cache, "all.csv"))
    assert refused.exit_code == 2
    line = _one_error_line(refused)
    assert f"pid {first.pid} on " in line and "--wait" in line and "cli.py extract" in line
    assert holder.split(":")[0] in line
    assert planted.read_text() == "the first writer's temporary"
    # Readers never wait for the writer.
    start = time.time()
    info = _run(["info", str(cache), "--json"])
    assert info.exit_code == 0 and time.time() - start < 10
    assert writer_running(cache) == holder  # still held: the reader did not wait it out
    # With --wait the second appender runs after the first: every clip of both is there.
    second = _popen(_args(clips, tiny_clip_dir, cache, "all.csv", "--wait"))
    out1, err1 = first.communicate(timeout=300)
    out2, err2 = second.communicate(timeout=300)
    assert first.returncode == 0 and second.returncode == 0, (err1, err2)
    assert "waiting for the writer" in err2 and "Traceback" not in err1 + err2
    manifest = open_store(cache).manifest
    assert sorted(manifest.id) == [f"v{i}.mp4" for i in range(6)]
    assert (manifest.status == "ok").all()
    assert not lock_path(cache).exists()


@pytest.mark.slow
def test_two_creates_of_one_new_store_give_one_store_and_no_leftovers(clips, tiny_clip_dir,
                                                                     tmp_path):
    cache = tmp_path / "new.zarr"
    procs = [_popen(_args(clips, tiny_clip_dir, cache, "all.csv")) for _ in range(2)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    codes = sorted(r[2] for r in results)
    assert codes == [0, 2], results
    loser = next(r for r in results if r[2] == 2)
    assert "Traceback" not in loser[1] and "another extract is writing" in loser[1]
    assert len([line for line in loser[1].splitlines() if line.startswith("error:")]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.zarr"]  # no .creating, no .lock
    assert (open_store(cache).manifest.status == "ok").all()


@pytest.mark.slow
def test_kill_9_of_a_writer_leaves_no_stale_lock(clips, tiny_clip_dir, tmp_path):
    cache = tmp_path / "k.zarr"
    proc = _popen(_args(clips, tiny_clip_dir, cache, "all.csv"),
                  env={"CAER_TEST_KILL_AFTER_CLIPS": "2"})
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert lock_path(cache).exists()  # the file stays; nobody holds it
    assert writer_running(cache) is None
    start = time.time()
    result = _run(_args(clips, tiny_clip_dir, cache, "all.csv"))
    assert result.exit_code == 0, result.output
    assert time.time() - start < 120
    assert (open_store(cache).manifest.status == "ok").all()
    assert not lock_path(cache).exists()


def test_a_lock_file_planted_as_a_symlink_is_refused(clips, tiny_clip_dir, tmp_path):
    cache = tmp_path / "s.zarr"
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    lock_path(cache).symlink_to(outside)
    result = _run(_args(clips, tiny_clip_dir, cache))
    assert result.exit_code == 2
    assert "symbolic link" in _one_error_line(result)
    assert outside.read_text() == "keep me" and not cache.exists()


def test_a_foreign_creating_folder_is_left_alone(clips, tiny_clip_dir, tmp_path):
    cache = tmp_path / "s.zarr"
    foreign = Path(str(cache) + ".creating")
    foreign.mkdir()
    (foreign / "data.txt").write_text("not ours")
    result = _run(_args(clips, tiny_clip_dir, cache))
    assert result.exit_code == 2
    assert "not a temporary caer-kit made" in _one_error_line(result)
    assert (foreign / "data.txt").read_text() == "not ours"
    shutil.rmtree(foreign)
    assert _run(_args(clips, tiny_clip_dir, cache)).exit_code == 0
