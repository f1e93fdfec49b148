"""Worker side of extract: one clip -> its kept frames -> face and context crops.

Runs in spawned worker processes (and in ``predict``), so it imports the media libraries
only: no torch, no transformers, which keeps each worker small.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np

# Tests: a worker segfaults on the clip whose path ends so, or at its start for "worker start".
CRASH_ON_ENV = "CAER_TEST_CRASH_ON_CLIP"

_DETECTOR = None


def worker_init() -> None:
    # Ctrl-C goes to the main process, which shuts the pool down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A main process killed with SIGKILL cannot stop its workers: they stop themselves.
    import threading

    parent = os.getppid()

    def watch_parent():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch_parent, daemon=True, name="watch-parent").start()
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def prepare_clip(task: dict) -> dict:
    """Decode, detect and crop one clip (runs in a worker). Never raises for a bad clip."""
    from pipeline.video import ClipError

    crash_on = os.environ.get(CRASH_ON_ENV)
    if crash_on and task["path"].endswith(crash_on):
        os.kill(os.getpid(), signal.SIGSEGV)
    try:
        return _prepare(task)
    except ClipError as err:
        return {"index": task["index"], "status": "failed", "reason": str(err)}
    except Exception as err:  # noqa: BLE001 - an unforeseen bad clip must not stop the run
        text = str(err).strip().splitlines()
        return {"index": task["index"], "status": "failed",
                "reason": f"{type(err).__name__}: {text[0] if text else ''}".strip()}


def _prepare(task: dict) -> dict:
    global _DETECTOR
    from pipeline.crops import face_crop, letterbox
    from pipeline.video import read_frames, sample_indices

    s, k = task["segments"], task["candidates"]
    info = _probe_under_root(task)
    indices = sample_indices(info.n_frames, s, k)
    frames = read_frames(task["path"], indices, info)
    notes = [info.note] if info.note else []
    listed = task["listed_frames"]
    if listed >= 0 and listed != info.n_frames:
        notes.append(f"list file says {listed} frames, {info.n_frames} on disk (disk used)")
    if getattr(frames, "substituted", None):
        bad = sorted(frames.substituted)
        notes.append(f"{len(bad)} kept frame(s) did not decode (first {bad[0]}); the last "
                     f"decoded frame stands in")

    boxes = task["boxes"]
    detections = {}
    for number in np.unique(indices):
        number = int(number)
        rgb = frames[number]
        if boxes is not None:
            name = info.files[number] if info.kind == "frames" else str(number)
            box = boxes.get(name)
            detections[number] = (tuple(float(v) for v in box), 1.0) if box else (None, 0.0)
        else:
            wanted = (task["face_model"], task["min_face_score"])
            if _DETECTOR is None or (_DETECTOR.model, _DETECTOR.min_score) != wanted:
                from pipeline.faces import FaceDetector

                if _DETECTOR is not None:
                    _DETECTOR.close()
                _DETECTOR = FaceDetector(*wanted)  # once per worker process
            det = _DETECTOR.detect(_rgb3(rgb))
            detections[number] = (det.box, float(det.score))

    size = task["image_size"]
    face = np.empty((s, k, size, size, 3), np.uint8)
    context = np.empty((s, k, size, size, 3), np.uint8)
    box = np.full((s, k, 4), np.nan, np.float32)
    score = np.zeros((s, k), np.float32)
    found = np.zeros((s, k), bool)
    crops = {}
    for si in range(s):
        for ki in range(k):
            number = int(indices[si, ki])
            if number not in crops:
                b, sc = detections[number]
                rgb = frames[number]
                crops[number] = (face_crop(rgb, b, task["face_margin"], size, task["face_resize"]),
                                 letterbox(rgb, size))
            face[si, ki], context[si, ki] = crops[number]
            b, sc = detections[number]
            score[si, ki] = sc
            if b is not None:
                box[si, ki], found[si, ki] = b, True
    return {"index": task["index"], "status": "ok", "note": "; ".join(notes),
            "n_frames": info.n_frames, "fps": info.fps or 0.0, "width": info.width,
            "height": info.height, "frame_index": indices.astype(np.int32), "box": box,
            "score": score, "found": found, "face": face, "context": context}


def _probe_under_root(task: dict):
    """probe_clip, with --confine-to-root's check and, for a missing clip, where it may be."""
    from pipeline.video import ClipError, probe_clip

    path, root = task["path"], task.get("root")
    if task.get("confine_to_root"):
        if root is None:
            raise ClipError("--confine-to-root: this clip's annotation file is not among this "
                            "run's --annotations, so its root is unknown; pass --root")
        outside(path, root)
    try:
        info = probe_clip(path)
    except ClipError as err:
        if str(err) == "file not found" and root is not None:
            hint = moved_prefix(path, root)
            if hint:
                raise ClipError(f"file not found; {hint}") from None
        raise
    if task.get("confine_to_root") and info.files:
        for name in info.files:  # a frame may be a symlink to anywhere
            outside(os.path.join(path, name), root)
    return info


def outside(path: str, root: str) -> None:
    """ClipError unless ``path``, symlinks resolved, lies inside ``root`` (resolved too)."""
    from pipeline.video import ClipError

    real, real_root = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, real_root]) != real_root:
        shown = path if real == os.path.abspath(path) else f"{path}, which resolves to {real}"
        raise ClipError(f"outside --root {root} ({shown}); --confine-to-root refuses it")


def moved_prefix(path: str, root: str) -> str:
    """For a missing clip: the prefix to strip when the same trailing path exists under
    ``root`` (a list file written on another machine, or a root given twice), else ""."""
    relative = os.path.relpath(path, root)
    # As written: relative to the root, or (written absolute, elsewhere) the absolute path.
    written = path if relative.split(os.sep)[0] == os.pardir else relative
    parts = [p for p in written.split(os.sep) if p]
    for k in range(1, len(parts)):  # the longest trailing path first
        candidate = os.path.join(root, *parts[k:])
        if os.path.exists(candidate):
            prefix = (os.sep if os.path.isabs(written) else "") + os.path.join(*parts[:k])
            return (f"{candidate} exists: the annotation paths carry a prefix from another "
                    f"machine or layout; strip '{prefix}{os.sep}' from them")
    return ""


def _rgb3(rgb: np.ndarray) -> np.ndarray:
    if rgb.ndim == 2:
        return np.repeat(rgb[:, :, None], 3, axis=2)
    return np.ascontiguousarray(rgb[:, :, :3])


def warm_worker(task: dict, hold: float = 0.2) -> int:
    """Import the media libraries and create the detector before the first clip arrives."""
    global _DETECTOR
    if os.environ.get(CRASH_ON_ENV) == "worker start":
        os.kill(os.getpid(), signal.SIGSEGV)
    import pipeline.crops  # noqa: F401
    import pipeline.video  # noqa: F401

    if task["boxes"] is None:
        from pipeline.faces import FaceDetector

        if _DETECTOR is None or (_DETECTOR.model, _DETECTOR.min_score) != (
                task["face_model"], task["min_face_score"]):
            _DETECTOR = FaceDetector(task["face_model"], task["min_face_score"])
        _DETECTOR.detect(np.zeros((64, 64, 3), np.uint8))
    time.sleep(hold)  # hold this worker so that the next warm-up goes to another one
    return os.getpid()
