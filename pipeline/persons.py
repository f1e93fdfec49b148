"""The person detector for ``--context body``: MediaPipe's pose detector, vendored in
pipeline/models/ (see its README.md), run with LiteRT.

Why not MediaPipe's own API: the Tasks ``PoseLandmarker`` of mediapipe 1.x refuses the
0.10.21 ``pose_detection.tflite`` (it has no Tasks metadata), so this module does what
MediaPipe's ``PoseDetectionCpu`` graph (mediapipe/modules/pose_detection) does around the
model, step by step:

1. letterbox the frame into the 224x224 input (longer side fitted, centred, black border,
   bilinear), pixels mapped to [-1, 1];
2. decode the 2254 SSD anchors (fixed-size anchors on 28x28, 14x14 and 7x7 grids, offsets
   scaled by 224), scores through a sigmoid;
3. keep scores >= ``min_score`` (0.5, MediaPipe's own threshold), weighted non-max
   suppression at IoU 0.3 (MediaPipe's WEIGHTED: a cluster's box and keypoints are the
   score-weighted mean of its members);
4. map back out of the letterbox to image pixels.

Each detection's own box marks the person's face, coarsely (a fixed size, its centre off the
face's by about half a face); its keypoints 0 (mid-hip centre) and 1 (a
point whose distance from the hip centre is the radius of a circle holding the whole body,
MediaPipe's "alignment" points for the full-body region) give the body. The body box here is
the axis-aligned square around that circle, grown to hold the detected face, clipped to the
image. It is square, so a standing person's box holds background left and right of them.
Where the hips are out of the frame (a man in a car, a student at a desk) the model still
places them, below the frame, and the clipped box runs from above the head to the frame's
bottom.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cache.core.errors import CaerError
# The face detector's module holds the stderr silencer and the checksum check the vendored
# models share.
from pipeline.faces import quiet_stderr, verified_model_bytes

MODEL_DIR = Path(__file__).resolve().parent / "models"  # beside the face models

MODEL_FILE = "pose_detection.tflite"
INPUT_SIZE = 224
MIN_SCORE = 0.5        # MediaPipe's min_score_thresh for this model
NMS_IOU = 0.3          # MediaPipe's min_suppression_threshold
_STRIDES = (8, 16, 32, 32, 32)
_ANCHORS_PER_LAYER = 2  # one aspect ratio (1.0) plus the interpolated-scale anchor
_NUM_KEYPOINTS = 4      # mid-hip, full-body scale point, mid-shoulder, upper-body scale point

Box = tuple[float, float, float, float]


class PersonModelError(CaerError):
    """The vendored pose-detection model is missing or altered."""


@dataclass(frozen=True)
class Person:
    body: Box           # (x0, y0, x1, y1) pixels, clipped to the image
    face: Box           # the detector's coarse face box, pixels, not clipped
    score: float
    keypoints: np.ndarray  # [4, 2] pixels: mid-hip, body scale point, mid-shoulder, upper-body


def load_model_bytes() -> bytes:
    """The vendored model's bytes, after checking them against SHA256SUMS."""
    return verified_model_bytes(MODEL_DIR, MODEL_FILE, "person model", PersonModelError)


def _anchor_centres() -> np.ndarray:
    """[2254, 2] anchor centres (x, y) in [0, 1], in the model's output order: per group of
    layers sharing a stride, row by row, cell by cell, the group's anchors of that cell."""
    centres = []
    layer = 0
    while layer < len(_STRIDES):
        stride = _STRIDES[layer]
        per_cell = 0
        while layer < len(_STRIDES) and _STRIDES[layer] == stride:
            per_cell += _ANCHORS_PER_LAYER
            layer += 1
        cells = math.ceil(INPUT_SIZE / stride)
        grid = (np.arange(cells, dtype=np.float32) + 0.5) / cells
        ys, xs = np.meshgrid(grid, grid, indexing="ij")
        cell_centres = np.stack([xs.ravel(), ys.ravel()], axis=1)
        centres.append(np.repeat(cell_centres, per_cell, axis=0))
    return np.concatenate(centres)


_ANCHORS = _anchor_centres()


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2])
    y1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def _weighted_nms(boxes: np.ndarray, keypoints: np.ndarray, scores: np.ndarray,
                  iou: float) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """MediaPipe's WEIGHTED non-max suppression: the best remaining detection and all that
    overlap it by more than ``iou`` form one detection, located at their score-weighted mean."""
    order = np.argsort(-scores, kind="stable")
    out = []
    while order.size:
        overlap = _iou(boxes[order[0]], boxes[order])
        members = order[overlap > iou]   # includes the best one itself (IoU 1)
        weights = scores[members][:, None]
        box = (boxes[members] * weights).sum(0) / weights.sum()
        kps = (keypoints[members] * weights[:, :, None]).sum(0) / weights.sum()
        out.append((box, kps, float(scores[order[0]])))
        order = order[overlap <= iou]
    return out


class PersonDetector:
    """People in an RGB frame, most confident first. Like the LiteRT interpreter it holds, a
    detector serves one thread at a time (extract's workers are processes, one each).

    >>> detector = PersonDetector()
    >>> people = detector.detect(rgb)   # [Person(body=(x0, y0, x1, y1), face=..., score, ...)]
    """

    def __init__(self, min_score: float = MIN_SCORE, num_threads: int = 1):
        if not 0.0 <= min_score <= 1.0:
            raise CaerError(f"min person score must lie in [0, 1], got {min_score}")
        if num_threads < 1:
            raise CaerError(f"the person detector needs at least 1 thread, got {num_threads}")
        self.min_score = float(min_score)
        self.num_threads = int(num_threads)
        self._interpreter = None

    def _create(self):
        data = load_model_bytes()
        with quiet_stderr():  # LiteRT announces its XNNPACK delegate on stderr
            from ai_edge_litert.interpreter import Interpreter

            interpreter = Interpreter(model_content=data, num_threads=self.num_threads)
            interpreter.allocate_tensors()
        inputs = interpreter.get_input_details()
        outputs = {tuple(d["shape"]): d["index"] for d in interpreter.get_output_details()}
        self._input = inputs[0]["index"]
        self._raw_boxes = outputs.get((1, len(_ANCHORS), 4 + 2 * _NUM_KEYPOINTS))
        self._raw_scores = outputs.get((1, len(_ANCHORS), 1))
        if (tuple(inputs[0]["shape"]) != (1, INPUT_SIZE, INPUT_SIZE, 3)
                or self._raw_boxes is None or self._raw_scores is None):
            raise PersonModelError(f"{MODEL_DIR / MODEL_FILE} is not MediaPipe's pose detector "
                                   f"(unexpected input or output shapes)")
        self._interpreter = interpreter

    def _input_tensor(self, rgb: np.ndarray) -> tuple[np.ndarray, float, float, float]:
        """The letterboxed [1, 224, 224, 3] input in [-1, 1], and the square the model sees:
        its side and its top-left corner in image pixels (outside the image: black)."""
        import cv2

        h, w = rgb.shape[:2]
        side = float(max(h, w))
        left, top = (w - side) / 2, (h - side) / 2
        scale = INPUT_SIZE / side
        warp = np.array([[scale, 0, -left * scale], [0, scale, -top * scale]], np.float64)
        square = cv2.warpAffine(np.ascontiguousarray(rgb), warp, (INPUT_SIZE, INPUT_SIZE),
                                flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                                borderValue=(0, 0, 0))
        tensor = square.astype(np.float32)[None] * np.float32(2 / 255) - np.float32(1)
        return tensor, side, left, top

    def detect(self, rgb: np.ndarray) -> list[Person]:
        rgb = np.asarray(rgb)
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
            raise ValueError(f"expected uint8 RGB [H, W, 3], got {rgb.dtype} {rgb.shape}")
        if self._interpreter is None:
            self._create()
        tensor, side, left, top = self._input_tensor(rgb)
        self._interpreter.set_tensor(self._input, tensor)
        with quiet_stderr():  # every call, as the face detector: LiteRT's notices may come with any
            self._interpreter.invoke()
        raw = self._interpreter.get_tensor(self._raw_boxes)[0].astype(np.float64)
        logits = self._interpreter.get_tensor(self._raw_scores)[0, :, 0].astype(np.float64)
        scores = 1 / (1 + np.exp(-np.clip(logits, -100, 100)))
        keep = scores >= self.min_score
        if not keep.any():
            return []
        raw, scores, anchors = raw[keep], scores[keep], _ANCHORS[keep].astype(np.float64)
        # Offsets are in input pixels, relative to the anchor's centre; sizes in input pixels.
        centre = raw[:, 0:2] / INPUT_SIZE + anchors
        half = raw[:, 2:4] / INPUT_SIZE / 2
        boxes = np.concatenate([centre - half, centre + half], axis=1)
        keypoints = raw[:, 4:].reshape(-1, _NUM_KEYPOINTS, 2) / INPUT_SIZE + anchors[:, None]
        h, w = rgb.shape[:2]
        people = []
        for box, kps, score in _weighted_nms(boxes, keypoints, scores, NMS_IOU):
            to_pixels = np.array([left, top])
            face = box.reshape(2, 2) * side + to_pixels
            kps = kps * side + to_pixels
            body = _body_box(kps, face, w, h)
            if body is not None:
                people.append(Person(body, tuple(float(v) for v in face.ravel()), score, kps))
        return people

    def close(self):
        self._interpreter = None

    def __getstate__(self):  # the native interpreter stays behind; the copy creates its own
        return {"min_score": self.min_score, "num_threads": self.num_threads}

    def __setstate__(self, state):
        self.__init__(state["min_score"], state["num_threads"])


def _body_box(keypoints: np.ndarray, face: np.ndarray, width: int, height: int) -> Box | None:
    """The square around the full-body circle (centre: mid-hip; radius: its distance to the
    scale point), grown to hold the face, clipped to the image; None when nothing is left."""
    hip, scale_point = keypoints[0], keypoints[1]
    radius = float(np.hypot(*(scale_point - hip)))
    x0 = min(hip[0] - radius, face[0, 0])
    y0 = min(hip[1] - radius, face[0, 1])
    x1 = max(hip[0] + radius, face[1, 0])
    y1 = max(hip[1] + radius, face[1, 1])
    x0, x1 = float(np.clip(x0, 0, width)), float(np.clip(x1, 0, width))
    y0, y1 = float(np.clip(y0, 0, height)), float(np.clip(y1, 0, height))
    if x1 <= x0 or y1 <= y0:
        return None
    return (x0, y0, x1, y1)


_DEFAULT: dict[int, PersonDetector] = {}  # one per process: extract's workers are spawned


def _default_detector() -> PersonDetector:
    pid = os.getpid()
    if pid not in _DEFAULT:
        _DEFAULT.clear()
        _DEFAULT[pid] = PersonDetector()
    return _DEFAULT[pid]


def detect_persons(rgb: np.ndarray) -> list[tuple[float, float, float, float, float]]:
    """People in a uint8 RGB frame, most confident first: (x0, y0, x1, y1, score), the body
    box in pixels (see the module's docstring for how it is drawn) and the detector's score."""
    return [(*p.body, p.score) for p in _default_detector().detect(rgb)]


# How far the detector's face-box centre may lie from the clip's face centre, in face sizes.
# The pose detector's "face box" is coarse (its size is the same ~0.2 of the input for every
# detection); on carphone's 120 frames its centre lies 0.55 face sizes (median, max 0.86)
# from BlazeFace's. A person beside the face's owner lies several face sizes away.
MAX_FACE_OFFSET = 1.5


def match_face(people: list[Person], face: Box) -> Person | None:
    """The person whose body box holds the centre of ``face`` and whose detected face lies
    nearest it, within MAX_FACE_OFFSET face sizes; None when there is no such person.

    Body boxes alone cannot tell two people side by side apart (each one's square around the
    full-body circle is about as wide as the person is tall, so it holds the neighbour's face
    too); the detector's own face location can."""
    cx, cy = (face[0] + face[2]) / 2, (face[1] + face[3]) / 2
    best, best_distance = None, math.inf
    for person in people:
        x0, y0, x1, y1 = person.body
        if not (x0 <= cx <= x1 and y0 <= cy <= y1):
            continue
        fx0, fy0, fx1, fy1 = person.face
        size = max(face[2] - face[0], face[3] - face[1], fx1 - fx0, fy1 - fy0)
        distance = math.hypot((fx0 + fx1) / 2 - cx, (fy0 + fy1) / 2 - cy)
        if distance <= MAX_FACE_OFFSET * size and distance < best_distance:
            best, best_distance = person, distance
    return best


def pick_body_box(frames_rgb: list[np.ndarray], face_boxes: list[Box | None],
                  detector: PersonDetector | None = None) -> Box | None:
    """One body box for a clip: the person who holds the clip's face, from its kept frames.

    In each frame that has a face box, the person is chosen by :func:`match_face`. The clip's
    box is the coordinate-wise median of the chosen person's per-frame boxes (robust to one
    frame's stray detection, where a union would grow with it), grown to hold the median face
    box, so the box always holds the face. Frames without a face box, or where no person holds
    the face, are left out; None when no frame is left (the caller then uses the whole frame,
    as the original code does for a clip without a body box).
    """
    if len(frames_rgb) != len(face_boxes):
        raise ValueError(f"{len(frames_rgb)} frames but {len(face_boxes)} face boxes")
    detector = detector or _default_detector()
    bodies, faces = [], []
    for rgb, face in zip(frames_rgb, face_boxes):
        if face is None:
            continue
        face = tuple(float(v) for v in face)
        person = match_face(detector.detect(rgb), face)
        if person is not None:
            bodies.append(person.body)
            faces.append(face)
    if not bodies:
        return None
    body = np.median(np.asarray(bodies), axis=0)
    face = np.median(np.asarray(faces), axis=0)
    return (float(min(body[0], face[0])), float(min(body[1], face[1])),
            float(max(body[2], face[2])), float(max(body[3], face[3])))
