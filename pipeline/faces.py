"""The face detector: MediaPipe's BlazeFace, vendored in pipeline/models/ (see its README.md).

The model files ship with the package and are checked against SHA256SUMS when loaded, so the
boxes in a cache never depend on what a download served that day. The detector is created
lazily, inside the process that uses it (extract's workers), and pickles without its native
handle.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cache.core.errors import CaerError

MODEL_DIR = Path(__file__).resolve().parent / "models"
# "full" is BlazeFace full-range (192x192 input, faces up to ~5 m away, sparse weights);
# "short" is short-range (128x128 input, faces within ~2 m, e.g. a selfie). The Tasks
# FaceDetector runs both: it reads the input size from the model and resizes the frame to
# it, so small frames need no upscaling here (carphone's 176x144: a face in 120 of 120 frames
# with either model, tests/test_faces.py). LiteRT warns that sparse tensors "may not yet be fully
# supported"; on carphone its box centres lie within 7 px (mean 3) of the short-range
# model's and its boxes are ~10% wider.
MODEL_FILES = {
    "full": "face_detection_full_range_sparse.tflite",
    "short": "face_detection_short_range.tflite",
}

# MediaPipe, TFLite/LiteRT and absl log through glog/absl to stderr; these must be set before
# mediapipe is imported. What they do not silence is caught by quiet_stderr below.
os.environ.setdefault("GLOG_minloglevel", "2")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


class FaceModelError(CaerError):
    """A vendored face model that is missing or altered."""


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float] | None   # (x0, y0, x1, y1) pixels; None: no face
    score: float                                    # 0.0 when no face


@contextlib.contextmanager
def quiet_stderr():
    """Send the process's stderr (fd 2, where the native libraries write) to /dev/null."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield  # no real fd 2 (e.g. an embedded interpreter): nothing to silence
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def verified_model_bytes(directory: Path, name: str, what: str,
                         error: type[CaerError]) -> bytes:
    """The bytes of vendored model file `name` in `directory`, after checking them against
    that folder's SHA256SUMS; every fault raises `error` naming the file (`what` says which
    model it is: "face model", "person model")."""
    path = directory / name
    fix = ("restore pipeline/models/ from the repository or reinstall caer-kit "
           "(pip install -e .); see pipeline/models/README.md for its origin")
    if not path.is_file():
        raise error(f"{what} file {path} is missing: {fix}")
    data = path.read_bytes()
    sums = directory / "SHA256SUMS"
    if not sums.is_file():
        raise error(f"{sums} is missing; reinstall caer-kit (pip install -e .) "
                    f"or restore pipeline/models/ from the repository")
    table = {}
    for line in sums.read_text().splitlines():
        if line.strip():
            digest, listed = line.split()
            table[listed.lstrip("*")] = digest
    expected = table.get(name)
    if expected is None:
        raise error(f"{name} has no line in {sums}: {fix}")
    if hashlib.sha256(data).hexdigest() != expected:
        raise error(f"{what} file {path} does not match its SHA256SUMS (corrupt or replaced): {fix}")
    return data


def load_model_bytes(model: str) -> bytes:
    """The vendored face model's bytes, after checking them against SHA256SUMS."""
    if model not in MODEL_FILES:
        raise CaerError(f"unknown face model {model!r}; choose one of {sorted(MODEL_FILES)}")
    return verified_model_bytes(MODEL_DIR, MODEL_FILES[model], "face model", FaceModelError)


_LIVE = weakref.WeakSet()


@atexit.register
def _close_live_detectors():
    # MediaPipe's own __del__ fails noisily when it runs during interpreter teardown.
    for detector in list(_LIVE):
        detector.close()


class FaceDetector:
    """The most confident face in an RGB frame.

    >>> with FaceDetector("full") as detector:
    ...     detection = detector.detect(rgb)   # Detection(box=(x0, y0, x1, y1) or None, score)
    """

    def __init__(self, model: str = "full", min_score: float = 0.5):
        if model not in MODEL_FILES:
            raise CaerError(f"unknown face model {model!r}; choose one of {sorted(MODEL_FILES)}")
        if not 0.0 <= min_score <= 1.0:
            raise CaerError(f"min face score must lie in [0, 1], got {min_score}")
        self.model = model
        self.min_score = float(min_score)
        self._detector = None

    def _create(self):
        data = load_model_bytes(self.model)
        with quiet_stderr():
            from mediapipe.tasks.python import BaseOptions, vision

            options = vision.FaceDetectorOptions(
                base_options=BaseOptions(model_asset_buffer=data),
                running_mode=vision.RunningMode.IMAGE,
                min_detection_confidence=self.min_score)
            self._detector = vision.FaceDetector.create_from_options(options)
        _LIVE.add(self)

    def detect(self, rgb: np.ndarray) -> Detection:
        import mediapipe as mp

        if self._detector is None:
            self._create()
        rgb = np.asarray(rgb)
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected uint8 RGB [H, W, 3], got {rgb.dtype} {rgb.shape}")
        image = mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(rgb))
        # Every call, not only the first: LiteRT logs a memory-alignment notice (once) on the
        # first call whose input buffer happens to be misaligned, which may be any call. The
        # dup2 pair costs microseconds against the detector's milliseconds.
        with quiet_stderr():
            result = self._detector.detect(image)
        best = max(result.detections, key=lambda d: d.categories[0].score, default=None)
        if best is None:
            return Detection(None, 0.0)
        h, w = rgb.shape[:2]
        b = best.bounding_box  # may reach past the image edge: clamp it
        x0, y0 = min(max(b.origin_x, 0), w), min(max(b.origin_y, 0), h)
        x1, y1 = min(max(b.origin_x + b.width, 0), w), min(max(b.origin_y + b.height, 0), h)
        if x1 <= x0 or y1 <= y0:
            return Detection(None, 0.0)
        return Detection((float(x0), float(y0), float(x1), float(y1)),
                         float(best.categories[0].score))

    def close(self):
        if self._detector is not None:
            with quiet_stderr():
                self._detector.close()
            self._detector = None
        _LIVE.discard(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):  # the native handle stays behind; the copy creates its own
        return {"model": self.model, "min_score": self.min_score}

    def __setstate__(self, state):
        self.__init__(state["model"], state["min_score"])
