"""Worker side of extract: one clip -> its kept frames -> face and context crops.

Runs in spawned worker processes (and in ``predict``), so it imports the media libraries
only: no torch, no transformers, which keeps each worker small.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field

import numpy as np

from cache.core.errors import first_line

# Tests: a worker segfaults on the clip whose path ends so, or at its start for "worker start".
CRASH_ON_ENV = "CAER_TEST_CRASH_ON_CLIP"

_DETECTOR = None


@dataclass(frozen=True)
class ClipTask:
    """One clip to prepare, as extract's main process (or predict) hands it to a worker:
    everything the worker needs, so that it reads nothing else."""

    index: int  # the clip's row in the store (predict: its position among the paths)
    path: str
    segments: int
    candidates: int
    image_size: int
    face_model: str
    min_face_score: float
    face_margin: float
    face_resize: str
    listed_frames: int = -1  # the list file's frame count; -1: none
    split: str = ""
    boxes: dict | None = None  # the --face-boxes entries of this clip; None: the detector
    root: str | None = None  # where its annotation file says clips are
    confine_to_root: bool = False
    frame_order: str | None = "natural"
    frame_count: str | None = "disk"
    frame_sampling: str | None = "caer"
    frame_decode: str | None = "caer"
    face_crop: str | None = "caer"
    context: str | None = "full"
    context_resize: str | None = "caer"
    # How caer-kit's crops shrink a large image (pipeline/crops.py). Like every choice above,
    # the default is the value of a store that does not record it, not extract's default.
    downscale: str = "exact"
    body_source: str = "detector"  # "file": body_box below, from --body-boxes
    body_box: list | None = None


@dataclass
class PreparedClip:
    """A worker's answer for one clip: its crops and face boxes, or why it failed.
    Arrays are per kept frame, ``[S, K, ...]``; crops uint8 ``[S, K, H, W, 3]``."""

    index: int
    status: str  # "ok" | "failed"
    reason: str = ""
    note: str = ""
    n_frames: int = 0
    fps: float = 0.0
    width: int = 0
    height: int = 0
    frame_index: np.ndarray | None = field(default=None, repr=False)
    box: np.ndarray | None = field(default=None, repr=False)
    score: np.ndarray | None = field(default=None, repr=False)
    found: np.ndarray | None = field(default=None, repr=False)
    face: np.ndarray | None = field(default=None, repr=False)
    context: np.ndarray | None = field(default=None, repr=False)
    body_box: np.ndarray | None = None

    @classmethod
    def failed(cls, index: int, reason: str) -> "PreparedClip":
        return cls(index, "failed", reason=reason)


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


def prepare_clip(task: ClipTask) -> PreparedClip:
    """Decode, detect and crop one clip (runs in a worker). Never raises for a bad clip."""
    from pipeline.video import ClipError

    crash_on = os.environ.get(CRASH_ON_ENV)
    if crash_on and task.path.endswith(crash_on):
        os.kill(os.getpid(), signal.SIGSEGV)
    try:
        return _prepare(task)
    except ClipError as err:
        return PreparedClip.failed(task.index, str(err))
    except Exception as err:  # noqa: BLE001 - an unforeseen bad clip must not stop the run
        detail = first_line(err) if str(err).strip() else ""
        return PreparedClip.failed(task.index, f"{type(err).__name__}: {detail}".strip())


def _prepare(task: ClipTask) -> PreparedClip:
    s, k = task.segments, task.candidates
    info = _probe_under_root(task)
    notes = [info.note] if info.note else []
    indices, more = _positions(task, info)
    notes += more
    frames = _decode(task, info, indices)
    if getattr(frames, "substituted", None):
        bad = sorted(frames.substituted)
        notes.append(f"{len(bad)} kept frame(s) did not decode (first {bad[0]}); the last "
                     f"decoded frame stands in")

    from pipeline.crops import Frame

    frames = {number: Frame(image) for number, image in frames.items()}  # one PIL image each
    detections = _faces(task, info, frames, indices)
    body = _body_box(task, frames, detections)
    face_crop, context_crop = _croppers(task, body)
    size = task.image_size
    face = np.empty((s, k, size, size, 3), np.uint8)
    context = np.empty((s, k, size, size, 3), np.uint8)
    box = np.full((s, k, 4), np.nan, np.float32)
    score = np.zeros((s, k), np.float32)
    found = np.zeros((s, k), bool)
    crops = {}
    for si in range(s):
        for ki in range(k):
            number = int(indices[si, ki])
            b, sc = detections[number]
            if number not in crops:
                crops[number] = (face_crop(frames[number], b), context_crop(frames[number]))
            face[si, ki], context[si, ki] = crops[number]
            score[si, ki] = sc
            if b is not None:
                box[si, ki], found[si, ki] = b, True
    return PreparedClip(task.index, "ok", note="; ".join(notes), n_frames=info.n_frames,
                        fps=info.fps or 0.0, width=info.width, height=info.height,
                        frame_index=indices.astype(np.int32), box=box, score=score,
                        found=found, face=face, context=context,
                        body_box=None if body is None else np.asarray(body, np.float32))


def _positions(task: ClipTask, info) -> tuple[np.ndarray, list[str]]:
    """The kept frames ``[S, K]`` (positions in the folder's order) and notes about them."""
    from pipeline import original
    from pipeline.video import ClipError, sample_indices

    s, k = task.segments, task.candidates
    listed, notes = task.listed_frames, []
    use_list = task.frame_count == "list" and listed >= 0
    if listed >= 0 and listed != info.n_frames:
        notes.append(f"list file says {listed} frames, {info.n_frames} on disk "
                     f"({'list' if use_list else 'disk'} used)")
    n = listed if use_list else info.n_frames
    if n < 1:
        raise ClipError("the list file says 0 frames (--frame-count list)")
    if task.frame_sampling == "original":
        indices = original.positions(n, s, k, task.split)
    else:
        indices = sample_indices(n, s, k)
    if int(indices.max()) >= info.n_frames:
        raise ClipError(f"frame {int(indices.max())} of the {n} the list file counts is past "
                        f"the {info.n_frames} on disk (--frame-count list; the original code "
                        f"fails on this clip too)")
    return indices, notes


def _decode(task: ClipTask, info, indices: np.ndarray):
    from pathlib import Path

    from pipeline import original
    from pipeline.video import ClipError, read_frames

    if task.frame_decode == "original" and info.kind == "frames":
        frames = {}  # arrays: the original's own decoding, with no PIL image kept
        for number in np.unique(indices):
            name = info.files[int(number)]
            try:
                frames[int(number)] = original.decode(Path(task.path) / name)
            except Exception as err:  # noqa: BLE001 - any unreadable image fails the clip
                raise ClipError(f"unreadable image {name}: {first_line(err)}") from None
        return frames
    return read_frames(task.path, indices, info, images=True)


def _faces(task: ClipTask, info, frames, indices: np.ndarray) -> dict:
    """``{frame number: (box or None, score)}``: from the box file, else the detector."""
    global _DETECTOR
    boxes = task.boxes
    detections = {}
    for number in np.unique(indices):
        number = int(number)
        if boxes is not None:
            name = info.files[number] if info.kind == "frames" else str(number)
            box = boxes.get(name)
            # The file's own values: original.face_crop truncates them with int().
            detections[number] = (tuple(float(v) for v in box), 1.0) if box else (None, 0.0)
            continue
        wanted = (task.face_model, task.min_face_score)
        if _DETECTOR is None or (_DETECTOR.model, _DETECTOR.min_score) != wanted:
            from pipeline.faces import FaceDetector

            if _DETECTOR is not None:
                _DETECTOR.close()
            _DETECTOR = FaceDetector(*wanted)  # once per worker process
        det = _DETECTOR.detect(frames[number].array)
        detections[number] = (det.box, float(det.score))
    return detections


def _body_box(task: ClipTask, frames, detections: dict):
    """The clip's body box (context "body"): from the box file, else the person detector;
    None: the whole frame."""
    if task.context != "body":
        return None
    if task.body_source == "file":
        box = task.body_box
        return None if box is None else tuple(float(v) for v in box)
    from pipeline.persons import pick_body_box  # only with --context body and no box file

    numbers = sorted(frames)
    box = pick_body_box([frames[n].array for n in numbers],
                        [detections[n][0] for n in numbers])
    return None if box is None else tuple(float(v) for v in box[:4])


def _croppers(task: ClipTask, body):
    """(face crop of (frame, box), context crop of frame) as the task's options choose;
    a frame is a pipeline.crops.Frame."""
    from pipeline import original
    from pipeline.crops import crop_box, face_crop, letterbox

    size, margin, downscale = task.image_size, task.face_margin, task.downscale
    if task.face_crop == "original":
        def face(frame, box):
            return original.face_crop(frame.array, box, margin, size)
    else:
        def face(frame, box):
            return face_crop(frame, box, margin, size, task.face_resize, downscale)
    if task.context_resize == "original":
        def context(frame):
            return original.context_crop(frame.array, body, size)
    else:
        def context(frame):
            if body is None:
                return letterbox(frame, size, downscale)
            x0, y0, x1, y1 = crop_box(body, frame.width, frame.height, margin=0)
            return letterbox(frame.array[y0:y1, x0:x1], size, downscale)
    return face, context


def _probe_under_root(task: ClipTask):
    """probe_clip, with --confine-to-root's check and, for a missing clip, where it may be."""
    from pipeline.video import ClipError, probe_clip

    path, root = task.path, task.root
    if task.confine_to_root:
        if root is None:
            raise ClipError("--confine-to-root: this clip's annotation file is not among this "
                            "run's --annotations, so its root is unknown; pass --root")
        outside(path, root)
    try:
        info = probe_clip(path, order=task.frame_order)
    except ClipError as err:
        if str(err) == "file not found" and root is not None:
            hint = moved_prefix(path, root)
            if hint:
                raise ClipError(f"file not found; {hint}") from None
        raise
    if task.confine_to_root and info.files:
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


def warm_worker(task: ClipTask, hold: float = 0.2) -> int:
    """Import the media libraries and create the detector before the first clip arrives."""
    global _DETECTOR
    if os.environ.get(CRASH_ON_ENV) == "worker start":
        os.kill(os.getpid(), signal.SIGSEGV)
    import pipeline.crops  # noqa: F401
    import pipeline.video  # noqa: F401

    if task.boxes is None:
        from pipeline.faces import FaceDetector

        if _DETECTOR is None or (_DETECTOR.model, _DETECTOR.min_score) != (
                task.face_model, task.min_face_score):
            _DETECTOR = FaceDetector(task.face_model, task.min_face_score)
        _DETECTOR.detect(np.zeros((64, 64, 3), np.uint8))
    time.sleep(hold)  # hold this worker so that the next warm-up goes to another one
    return os.getpid()
