"""The original code's preprocessing, step by step, for ``extract --preset original``.

Each function reproduces one choice of the original data loader (zgsfer/CLIP-CAER,
dataloader/video_dataloader.py and video_transform.py) exactly, so that the crops a cache
stores are the arrays the original divided by 255 before its image encoder. They stay plain
and separate from caer-kit's own (faster, or better behaved) steps on purpose: speeding up
those must never change these. tests/test_original.py compares them pixel for pixel with an
independent re-implementation of the original loader.
"""

from __future__ import annotations

import os

import numpy as np

TRAIN_SPLIT = "train"  # clips of this split get the original's training frames as candidates


def eval_positions(n_frames: int, segments: int) -> np.ndarray:
    """The original's test frame of each segment: ``int(tick / 2 + tick * s)`` with
    ``tick = n / segments``, computed as it computes it (the float rounding decides ties);
    a clip of at most ``segments`` frames takes frame s for segment s, its last one past the
    end."""
    if n_frames > segments:
        tick = n_frames / float(segments)
        return np.array([int(tick / 2.0 + tick * s) for s in range(segments)], np.int64)
    return np.minimum(np.arange(segments), n_frames - 1).astype(np.int64)


def train_candidates(n_frames: int, segments: int, candidates: int) -> np.ndarray:
    """``[segments, candidates]`` frames the original's training could draw in each segment.

    With ``t = n // segments`` it draws ``s * t + randint(t)`` in segment s, so its frames
    are ``s * t + r`` for ``r < t``. Candidate j takes ``r = (2j + 1) * t // (2K)``: every one
    of the t frames, repeated as evenly as K allows, when ``t <= K``; K evenly spaced ones
    when ``t > K`` (``--candidates t`` keeps them all). A clip shorter than ``segments``
    takes frame s for segment s and its last frame past the end, as the original does.
    """
    t = n_frames // segments
    if t > 0:
        r = (2 * np.arange(candidates) + 1) * t // (2 * candidates)
        return (np.arange(segments)[:, None] * t + r[None, :]).astype(np.int64)
    per_segment = np.minimum(np.arange(segments), n_frames - 1)
    return np.repeat(per_segment[:, None], candidates, axis=1).astype(np.int64)


def positions(n_frames: int, segments: int, candidates: int, split: str) -> np.ndarray:
    """``[segments, candidates]`` frame positions: training candidates for the train split,
    the test frame in every slot for any other split."""
    if n_frames < 1:
        raise ValueError(f"a clip needs at least one frame, got {n_frames}")
    if split == TRAIN_SPLIT:
        return train_candidates(n_frames, segments, candidates)
    return np.repeat(eval_positions(n_frames, segments)[:, None], candidates, axis=1)


def decode(path: str | os.PathLike) -> np.ndarray:
    """A frame as the original opened it: PIL, no EXIF rotation. (The original handed the
    image on in its own mode; every RAER frame is RGB, and other modes are converted so that
    the crop stays three-channel.)"""
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))


def face_crop(rgb: np.ndarray, box, margin: int = 20, size: int = 224) -> np.ndarray:
    """The original's face: box coordinates truncated by ``int()``, grown by ``margin``,
    clamped to the image, cropped by PIL, resized by PIL's bilinear filter to size x size.
    Without a box the whole frame is resized the same way. ``box`` must hold the values of the
    box file (Python floats): a float32 copy can round across an integer before ``int()``."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(rgb))
    if box is not None:
        left, upper, right, lower = (int(v) for v in box)
        img = img.crop((max(0, left - margin), max(0, upper - margin),
                        min(img.width, right + margin), min(img.height, lower + margin)))
    return np.asarray(img.resize((size, size), Image.BILINEAR))


def context_crop(rgb: np.ndarray, body_box=None, size: int = 224) -> np.ndarray:
    """The original's context: the frame cropped by PIL to the body box as given (none: the
    whole frame), resized by OpenCV's default (bilinear) ``resize`` so that it fits
    size x size with sides ``int(side * r)``, then black padding split as the original splits
    it: half each side, the odd pixel at the bottom and the right."""
    import cv2
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(rgb))
    if body_box is not None:
        img = img.crop(tuple(body_box))
    im = np.array(img)
    h, w = im.shape[:2]
    r = min(size / w, size / h)
    new_w, new_h = int(w * r), int(h * r)
    im = cv2.resize(im, (new_w, new_h))  # per-channel: RGB here equals the original's BGR
    pw, ph = (size - new_w) // 2, (size - new_h) // 2
    top, bottom, left, right = ph, ph, pw, pw
    if top + bottom + new_h < size:
        bottom += 1
    if left + right + new_w < size:
        right += 1
    return cv2.copyMakeBorder(im, top, bottom, left, right, borderType=cv2.BORDER_CONSTANT,
                              value=[0, 0, 0])
