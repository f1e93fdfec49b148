"""extract end to end: real videos and frame folders, every failure kind, kill -9 and resume,
a 2-process torchrun, Zarr against HDF5, refused option changes, append, info."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cache import open_store
from conftest import ROOT, moving_square_frames, write_frame_folder, write_video
from cache.core.errors import CaerError
from pipeline.extract import ExtractConfig, run_extract

SMALL = dict(segments=16, batch_size=24, workers=0, quiet=True)


def _audio_only(path: Path) -> Path:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = np.zeros((1, 1024), np.float32)
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _levels_folder(directory: Path, n: int) -> Path:
    """Frame i (1-based, unpadded name) is a flat grey of level 10 * i."""
    frames = np.stack([np.full((24, 32, 3), 10 * i, np.uint8) for i in range(1, n + 1)])
    return write_frame_folder(directory, frames, quality=100)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, carphone):
    d = tmp_path_factory.mktemp("clips")
    write_video(d / "square.mp4", moving_square_frames(40, (48, 64)))
    write_video(d / "short.mp4", moving_square_frames(5, (48, 64)))  # < 16 frames
    write_video(d / "tiny.mp4", moving_square_frames(20, (8, 8)))
    gray = moving_square_frames(20, (48, 64), color=(200, 200, 200))
    write_video(d / "gray.mkv", gray, codec="ffv1", pix_fmt="gray")
    _levels_folder(d / "levels", 20)
    big = np.zeros((1, 2160, 3840, 3), np.uint8)
    big[0, 500:900, 1500:1900] = 255
    write_frame_folder(d / "huge", big, quality=70)
    shutil.copy(carphone, d / "carphone.mp4")
    # Failures.
    (d / "empty.mp4").write_bytes(b"")
    (d / "text.mp4").write_text("this is not a video\n" * 20)
    full = (d / "square.mp4").read_bytes()
    (d / "cut.mp4").write_bytes(full[: len(full) // 2])  # truncated: keeps what decodes
    write_video(d / "long.mkv", moving_square_frames(60, (48, 64)), codec="ffv1")
    mkv = (d / "long.mkv").read_bytes()
    (d / "headonly.mkv").write_bytes(mkv[:600])  # a header and no complete frame
    (d / "cut.mkv").write_bytes(mkv[:5000])  # truncated mid-stream: the frames before the cut
    _audio_only(d / "audio.m4a")
    (d / "badfolder").mkdir()
    (d / "badfolder" / "1.jpg").write_bytes(b"\xff\xd8 broken jpeg")
    (d / "long.mkv").unlink()
    rows = ["path,label,split,scene",
            "square.mp4,Neutrality,train,lab", "short.mp4,1,train,lab", "tiny.mp4,2,train,",
            "gray.mkv,3,train,dorm", "levels,4,test,", "huge,0,test,", "carphone.mp4,1,test,car",
            "empty.mp4,0,test,", "text.mp4,0,test,", "cut.mp4,0,test,", "cut.mkv,0,test,",
            "headonly.mkv,0,test,",
            "audio.m4a,0,test,", "badfolder,0,test,", "missing.mp4,0,test,"]
    (d / "all.csv").write_text("\n".join(rows) + "\n")
    (d / "few.csv").write_text("path,label\nsquare.mp4,0\nshort.mp4,1\ntiny.mp4,2\n"
                               "gray.mkv,3\nlevels,4\nmissing.mp4,0\n")
    (d / "more.txt").write_text("carphone.mp4 100 3\n")
    return d


@pytest.fixture(scope="module")
def full_store(dataset, tiny_clip_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("full") / "all.zarr"
    summary = run_extract(ExtractConfig(annotations=(str(dataset / "all.csv"),),
                                        clip=str(tiny_clip_dir), cache=str(cache), pixels=True,
                                        **SMALL))
    return cache, summary


def test_every_clip_kind_and_failure(full_store):
    cache, summary = full_store
    assert summary.exit_code == 3 and summary.n_ok == 8 and summary.n_failed == 7
    store = open_store(cache)
    m = store.manifest.set_index("id")
    ok = ["square.mp4", "short.mp4", "tiny.mp4", "gray.mkv", "levels", "huge", "carphone.mp4",
          "cut.mkv"]
    # An .mp4 cut in half has lost its index (moov): nothing in it can be found.
    reasons = {"empty.mp4": "empty file", "text.mp4": "not a video", "cut.mp4": "not a video",
               "headonly.mkv": "no decodable frame", "audio.m4a": "no video stream",
               "badfolder": "no readable image in folder", "missing.mp4": "file not found"}
    for clip_id, reason in reasons.items():
        assert m.loc[clip_id, "status"] == "failed", clip_id
        assert reason in m.loc[clip_id, "reason"], (clip_id, m.loc[clip_id, "reason"])
        assert "\n" not in m.loc[clip_id, "reason"]
    for clip_id in ok:
        assert m.loc[clip_id, "status"] == "ok", (clip_id, m.loc[clip_id, "reason"])
    assert m.loc["cut.mkv", "n_frames"] < 60  # the frames before the cut
    assert m.loc["square.mp4", "scene"] == "lab" and m.loc["carphone.mp4", "scene"] == "car"
    assert (m.loc["huge", "width"], m.loc["huge", "height"]) == (3840, 2160)
    assert m.loc["gray.mkv", "n_frames"] == 20 and m.loc["short.mp4", "n_frames"] == 5
    i = list(store.manifest.id).index("short.mp4")
    # Short clip: frames 0..4, then the last frame repeated.
    assert list(store.frame_indices[i][:, 0]) == list(range(5)) + [4] * 11
    feats = store.features("face")[:]
    okmask = (store.manifest.status == "ok").to_numpy()
    assert np.isfinite(feats[okmask].astype(np.float32)).all()
    assert np.abs(feats[okmask].astype(np.float32)).sum(axis=(1, 2, 3)).min() > 0
    assert not feats[~okmask].any()  # failed clips have no features
    g = list(store.manifest.id).index("gray.mkv")
    ctx = store.pixels("context")[g]
    assert np.array_equal(ctx[:, :, 0], ctx[:, :, 1])  # grey stays grey in RGB


def test_frame_folder_natural_order(full_store):
    cache, _ = full_store
    store = open_store(cache)
    i = list(store.manifest.id).index("levels")
    kept = store.frame_indices[i][:, 0]
    ctx = store.pixels("context")[i][:, 0]  # [S, 3, 224, 224]; the frame fills the middle
    centre = ctx[:, 0, 112, 112].astype(int)
    # Frame number n is the file "{n+1}.jpg", of level 10 * (n + 1): natural order.
    assert np.all(np.abs(centre - 10 * (kept + 1)) <= 2), (kept, centre)


def test_carphone_face_in_95_percent_with_boxes_on_it(full_store):
    cache, _ = full_store
    store = open_store(cache)
    i = list(store.manifest.id).index("carphone.mp4")
    found = store.face_found[i]
    assert found.mean() >= 0.95
    boxes = store.face_boxes[i][found]
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    # The driver's face in this 176x144 clip sits left of centre, about 40-60 px across.
    assert np.all((cx > 45) & (cx < 100) & (cy > 35) & (cy < 90)), boxes
    assert np.all((w > 25) & (w < 90) & (h > 25) & (h < 90)), boxes
    assert store.face_scores[i][found].min() >= 0.5


def test_info_json_and_text(full_store):
    from cli import main

    cache, _ = full_store
    result = CliRunner().invoke(main, ["info", str(cache), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["n_clips"] == 15 and data["n_ok"] + data["n_failed"] == 15
    assert {f["id"] for f in data["failures"]} >= {"empty.mp4", "missing.mp4", "audio.m4a"}
    car = next(c for c in data["clips"] if c["id"] == "carphone.mp4")
    assert car["face_rate"] >= 0.95 and car["split"] == "test" and car["label"] == 1
    assert data["fingerprint"]["segments"] == 16 and 0 <= data["face_rate"] <= 1
    text = CliRunner().invoke(main, ["info", str(cache)]).output
    assert "failures:" in text and "file not found" in text and "features/face" in text


def _cfg(dataset, clip_dir, cache, csv="few.csv", **kw):
    options = dict(SMALL, annotations=(str(dataset / csv),), clip=str(clip_dir), cache=str(cache))
    options.update(kw)
    return ExtractConfig(**options)


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def reference(dataset, tiny_clip_dir, tmp_path_factory):
    """An uninterrupted single-process run over few.csv."""
    cache = tmp_path_factory.mktemp("ref") / "few.zarr"
    summary = run_extract(_cfg(dataset, tiny_clip_dir, cache))
    assert summary.n_ok == 5 and summary.n_failed == 1
    return cache


def _cli(args, env=None, **kw):
    env = dict(os.environ, **(env or {}), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "extract", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _args(dataset, clip_dir, cache, csv="few.csv"):
    return ["--annotations", str(dataset / csv), "--clip", str(clip_dir), "--cache", str(cache),
            "--segments", "16", "--batch-size", "24", "--workers", "0", "--quiet"]


def _processes_with(token: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and token.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_kill_then_resume_gives_identical_store(dataset, tiny_clip_dir, reference, tmp_path):
    cache = tmp_path / "few.zarr"
    args = _args(dataset, tiny_clip_dir, cache)
    args[args.index("--workers") + 1] = "1"  # a worker process too: it must not outlive us
    token = f"caer-test-{os.getpid()}-{time.time()}"
    # Deterministic: SIGKILL right after the second clip is written.
    proc = _cli(args, env={"CAER_TEST_KILL_AFTER_CLIPS": "2", "CAER_TEST_TOKEN": token})
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    status = open_store(cache).manifest.status
    assert (status != "pending").sum() == 2
    if Path("/proc").is_dir():
        deadline = time.time() + 5
        while _processes_with(token) and time.time() < deadline:
            time.sleep(0.2)
        assert not _processes_with(token), "a worker outlived the killed extract"
    summary = run_extract(_cfg(dataset, tiny_clip_dir, cache))  # the same command again
    assert summary.n_done_now == 4 and summary.exit_code == 3
    assert _tree(cache) == _tree(reference)


def test_random_time_kill_then_resume_gives_identical_store(dataset, tiny_clip_dir, reference,
                                                            tmp_path):
    cache = tmp_path / "few.zarr"
    args = _args(dataset, tiny_clip_dir, cache)
    proc = _cli(args)
    # Wait until clips are being written, then kill at a random moment within that.
    deadline = time.time() + 90
    while not (cache / "clips" / "status" / "c").exists() and time.time() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 0.3))
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    run_extract(_cfg(dataset, tiny_clip_dir, cache))
    assert _tree(cache) == _tree(reference)


def test_a_worker_that_dies_in_native_code_costs_only_its_clip(dataset, tiny_clip_dir,
                                                               reference, tmp_path, monkeypatch):
    # The worker raises SIGSEGV on tiny.mp4, as a crash inside FFmpeg or MediaPipe would.
    monkeypatch.setenv("CAER_TEST_CRASH_ON_CLIP", "tiny.mp4")
    cache = tmp_path / "few.zarr"
    summary = run_extract(_cfg(dataset, tiny_clip_dir, cache, workers=2))
    assert summary.exit_code == 3 and summary.n_ok == 4 and summary.n_failed == 2
    got, ref = open_store(cache), open_store(reference)
    m = got.manifest.set_index("id")
    assert m.loc["tiny.mp4", "status"] == "failed"
    assert "worker process died on this clip" in m.loc["tiny.mp4", "reason"]
    assert m.loc["missing.mp4", "reason"] == ref.manifest.set_index("id").loc["missing.mp4",
                                                                              "reason"]
    ok = (ref.manifest.id != "tiny.mp4").to_numpy() & (ref.manifest.status == "ok").to_numpy()
    assert (got.manifest.status[ok] == "ok").all()
    # The other clips' features are those of the uninterrupted run, bit for bit.
    for stream in ("face", "context"):
        np.testing.assert_array_equal(got.features(stream)[:][ok], ref.features(stream)[:][ok])


def test_workers_that_die_at_start_stop_the_run_and_blame_no_clip(dataset, tiny_clip_dir,
                                                                  tmp_path, monkeypatch):
    monkeypatch.setenv("CAER_TEST_CRASH_ON_CLIP", "worker start")
    cache = tmp_path / "few.zarr"
    with pytest.raises(CaerError, match="worker processes die while starting"):
        run_extract(_cfg(dataset, tiny_clip_dir, cache, workers=1))
    assert set(open_store(cache).manifest.status) == {"pending"}  # resumable, nothing blamed


def test_a_worker_loads_no_torch(dataset, tmp_path):
    # Workers decode, detect and crop; torch would cost each of them ~200 MB for nothing. A
    # spawned worker re-imports the main script, so start the pool from a script that imports
    # cli.py, as `python cli.py extract` and the `caer` entry point do.
    task = {"index": 0, "path": str(dataset / "square.mp4"), "listed_frames": -1,
            "segments": 16, "candidates": 1, "face_model": "short", "min_face_score": 0.5,
            "face_margin": 20, "face_resize": "squash", "image_size": 224, "boxes": None}  # ClipTask fields
    script = tmp_path / "main.py"
    script.write_text(f"""import json, os, sys
sys.path.insert(0, {str(ROOT)!r})
import cli  # noqa: F401

if __name__ == "__main__":
    from pipeline.config import ExtractConfig
    from pipeline.workers import start_pool
    from pipeline.prepare import ClipTask

    task = ClipTask(**json.loads({json.dumps(json.dumps(task))}))
    pool = start_pool(ExtractConfig(workers=1), task)
    result = pool.submit(task).result()
    pid = pool.executor.submit(os.getpid).result()
    with open(f"/proc/{{pid}}/maps") as maps:
        torch_mapped = "libtorch" in maps.read()
    pool.shutdown()
    print(json.dumps([result.status, result.face.shape[0], torch_mapped]))
""")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == ["ok", 16, False]


def test_torchrun_two_ranks_equal_single_process(dataset, tiny_clip_dir, reference, tmp_path):
    cache = tmp_path / "few.zarr"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(29500 + os.getpid() % 1000), str(ROOT / "cli.py"), "extract",
           *_args(dataset, tiny_clip_dir, cache)]
    result = subprocess.run(cmd, env=env, capture_output=True, timeout=240)
    assert result.returncode != 0  # some clips failed: torchrun reports the ranks' exit 3
    assert b"exitcode  : 3" in result.stderr or b"exit code 3" in result.stderr.lower() \
        or result.returncode == 3, result.stderr.decode()[-2000:]
    assert _tree(cache) == _tree(reference)


def test_hdf5_holds_the_same_as_zarr(dataset, tiny_clip_dir, reference, tmp_path):
    cache = tmp_path / "few.h5"
    run_extract(_cfg(dataset, tiny_clip_dir, cache))
    assert not Path(str(cache) + ".staging.zarr").exists()
    z, h = open_store(reference), open_store(cache)
    assert h.backend == "hdf5" and z.fingerprint == h.fingerprint
    for name in z.arrays():
        a, b = z.array(name)[:], h.array(name)[:]
        if a.dtype.kind == "f":
            np.testing.assert_array_equal(a, b, err_msg=name)
        else:
            assert (a == b).all(), name
    assert z.manifest.equals(h.manifest)
    os.environ["WORLD_SIZE"] = "2"
    try:
        with pytest.raises(CaerError, match="HDF5 allows one writer"):
            run_extract(_cfg(dataset, tiny_clip_dir, tmp_path / "other.h5"))
    finally:
        del os.environ["WORLD_SIZE"]


def test_other_options_are_refused_naming_each(dataset, tiny_clip_dir, reference, tmp_path):
    cache = tmp_path / "few.zarr"
    shutil.copytree(reference, cache)
    before = _tree(cache)
    with pytest.raises(CaerError) as err:
        run_extract(_cfg(dataset, tiny_clip_dir, cache, segments=8, flip=True,
                         labels="caer7"))
    message = str(err.value)
    for option in ("--segments (store 16, now 8)", "--flip", "--labels (store raer5, now caer7)"):
        assert option in message
    assert _tree(cache) == before


def test_bad_annotation_exits_2_with_one_line_and_writes_nothing(dataset, tiny_clip_dir,
                                                                 tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\nsquare.mp4,0\nshort.mp4,Sleepy\n")
    cache = tmp_path / "bad.zarr"
    from cli import main

    result = CliRunner().invoke(main, [
        "extract", "--annotations", str(dataset / "few.csv"), "--annotations", str(bad),
        "--root", str(dataset), "--clip", str(tiny_clip_dir), "--cache", str(cache)])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith(f"error: {bad}:3: unknown label 'Sleepy'")
    assert result.stdout == "" and result.exception is None or isinstance(result.exception,
                                                                          SystemExit)
    assert not cache.exists() and not list(tmp_path.glob("bad.zarr*"))


@pytest.mark.parametrize("option, value, message", [
    ("--root", "few.csv", "--root {dataset}/few.csv: no such directory"),
    ("--face-boxes", "nowhere.json", "--face-boxes nowhere.json: no such file"),
    ("--min-face-score", "1.5", "--min-face-score must lie in [0, 1]"),
    ("--segments", "0", "--segments must be at least 1"),
    ("--precision", "fp8", "Invalid value for '--precision'"),
])
def test_bad_option_values_exit_2_and_write_nothing(dataset, tiny_clip_dir, tmp_path, option,
                                                   value, message):
    from cli import main

    cache = tmp_path / "few.zarr"
    value = str(dataset / value) if option == "--root" else value
    result = CliRunner().invoke(main, ["extract", "--annotations", str(dataset / "few.csv"),
                                       "--clip", str(tiny_clip_dir), "--cache", str(cache),
                                       option, value])
    assert result.exit_code == 2, result.output
    assert message.format(dataset=dataset) in result.stderr
    assert not cache.exists()


def test_every_extract_config_field_is_an_option():
    from dataclasses import fields

    from cli import main

    params = {p.name: p for p in main.commands["extract"].params}
    assert {f.name for f in fields(ExtractConfig)} <= set(params)
    for f in fields(ExtractConfig):
        if f.name != "annotations":
            assert params[f.name].default == f.default or (params[f.name].multiple
                                                           and f.default == ()), f.name
        assert params[f.name].help == f.metadata["help"]


def test_append_with_a_second_annotation_file(dataset, tiny_clip_dir, reference, tmp_path):
    cache = tmp_path / "few.zarr"
    shutil.copytree(reference, cache)
    before = open_store(cache)
    old_face = before.features("face")[:]
    summary = run_extract(_cfg(dataset, tiny_clip_dir, cache, annotations=(
        str(dataset / "few.csv"), str(dataset / "more.txt")), split=("", "extra")))
    store = open_store(cache)
    assert summary.n_clips == 7 and summary.n_done_now == 1  # few.csv's clips are there
    m = store.manifest
    assert list(m.id[:6]) == list(before.manifest.id) and m.id[6] == "carphone.mp4"
    assert m.split[6] == "extra" and m.label[6] == 2 and m.listed_frames[6] == 100
    np.testing.assert_array_equal(store.features("face")[np.arange(6)], old_face)
    assert m.status[6] == "ok" and m.n_frames[6] == 120
    assert "list file says 100 frames, 120 on disk" in m.note[6]


def test_precomputed_face_boxes_in_the_original_layout(dataset, tiny_clip_dir, tmp_path):
    import hashlib

    # The original release's face.json: {frame folder as in the list file: {file: box}}.
    boxes = {"levels": {f"{i}.jpg": [2, 3, 20, 18] for i in range(1, 21) if i % 2}}
    path = tmp_path / "face.json"
    path.write_text(json.dumps(boxes))
    (tmp_path / "one.txt").write_text("levels 20 1\n")
    cache = tmp_path / "boxes.zarr"
    summary = run_extract(_cfg(dataset, tiny_clip_dir, cache, annotations=(
        str(tmp_path / "one.txt"),), root=str(dataset), face_boxes=str(path), split=("test",)))
    assert summary.exit_code == 0
    store = open_store(cache)
    kept = store.frame_indices[0][:, 0]
    found = store.face_found[0][:, 0]
    # Frame number n is the file "{n+1}.jpg"; odd file numbers have a box.
    np.testing.assert_array_equal(found, (kept + 1) % 2 == 1)
    np.testing.assert_array_equal(store.face_boxes[0][found, 0], [[2, 3, 20, 18]] * found.sum())
    assert np.isnan(store.face_boxes[0][~found, 0]).all()
    assert store.fingerprint["face_boxes"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_hdf5_resumes_from_its_staging_store_and_appends(dataset, tiny_clip_dir, reference,
                                                         tmp_path):
    from cache.writer import StoreWriter

    cache = tmp_path / "few.h5"
    staging = Path(str(cache) + ".staging.zarr")
    # What a killed .h5 run leaves: a staging store with a clip not yet done.
    shutil.copytree(reference, staging)
    writer = StoreWriter(staging)
    writer._root["clips/status"][1] = 0
    summary = run_extract(_cfg(dataset, tiny_clip_dir, cache))
    assert summary.n_done_now == 1 and not staging.exists()
    z, h = open_store(reference), open_store(cache)
    np.testing.assert_array_equal(z.features("face")[:], h.features("face")[:])
    assert z.manifest.equals(h.manifest)
    # Appending to a finished .h5 goes through a staging store again.
    summary = run_extract(_cfg(dataset, tiny_clip_dir, cache, annotations=(
        str(dataset / "few.csv"), str(dataset / "more.txt")), split=("", "extra")))
    h = open_store(cache)
    assert summary.n_done_now == 1 and h.n_clips == 7 and not staging.exists()
    np.testing.assert_array_equal(h.features("context")[np.arange(6)], z.features("context")[:])
    assert h.manifest.id[6] == "carphone.mp4" and h.manifest.status[6] == "ok"
    # The same command once more has nothing to do and leaves the file alone.
    before = cache.read_bytes()
    summary = run_extract(_cfg(dataset, tiny_clip_dir, cache, annotations=(
        str(dataset / "few.csv"), str(dataset / "more.txt")), split=("", "extra")))
    assert summary.n_done_now == 0 and cache.read_bytes() == before


def test_downscale_is_recorded_and_a_store_made_before_it_extends_only_with_exact(
        dataset, tiny_clip_dir, reference, tmp_path):
    import zarr

    assert open_store(reference).fingerprint["downscale"] == "fast"  # the default
    assert ExtractConfig(preset="original").resolved().downscale == "exact"
    cache = tmp_path / "old.zarr"
    shutil.copytree(reference, cache)
    group = zarr.open_group(str(cache), mode="r+")  # as a store made before the option
    caer = dict(group.attrs["caer_kit"])
    caer["fingerprint"] = {k: v for k, v in caer["fingerprint"].items() if k != "downscale"}
    group.attrs["caer_kit"] = caer
    assert open_store(cache).fingerprint.get("downscale") is None
    before = _tree(cache)
    with pytest.raises(CaerError) as err:
        run_extract(_cfg(dataset, tiny_clip_dir, cache))
    assert '--downscale (store "exact", now "fast")' in str(err.value)
    assert _tree(cache) == before
    summary = run_extract(_cfg(dataset, tiny_clip_dir, cache, downscale="exact"))
    assert (summary.n_ok, summary.n_failed) == (5, 1)
