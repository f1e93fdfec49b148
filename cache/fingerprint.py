"""A store's fingerprint: everything that changes a stored value, so that a store is only
ever extended, trained on or evaluated with the options it was built with."""

from __future__ import annotations

import json

from cache.core.labels import LabelSet
from cache.layout import FORMAT_VERSION

# Fingerprint key -> the extract option a user changes to change it (for refusal messages).
FINGERPRINT_OPTIONS = {
    "format_version": "caer-kit store format",
    "clip_revision": "--clip",
    "feature_dim": "--clip",
    "image_size": "--clip",
    "segments": "--segments",
    "candidates": "--candidates",
    "flip": "--flip",
    "pixels": "--pixels",
    "normalize": "--normalize",
    "face_model": "--face-model",
    "face_margin": "--face-margin",
    "min_face_score": "--min-face-score",
    "face_resize": "--face-resize",
    "face_boxes": "--face-boxes",
    "labels": "--labels",
    "frame_order": "--frame-order",
    "frame_count": "--frame-count",
    "frame_sampling": "--frame-sampling",
    "frame_decode": "--frame-decode",
    "face_crop": "--face-crop",
    "context": "--context",
    "body_boxes": "--body-boxes",
    "context_resize": "--context-resize",
    "downscale": "--downscale",
}

# The preprocessing choices added after format 1 was fixed, with the value a store that does
# not record them was built with (caer-kit's own preprocessing then).
FINGERPRINT_DEFAULTS = {"frame_order": "natural", "frame_count": "disk",
                        "frame_sampling": "caer", "frame_decode": "caer", "face_crop": "caer",
                        "context": "full", "body_boxes": None, "context_resize": "caer",
                        "downscale": "exact"}


def make_fingerprint(*, clip_spec: str, clip_revision: str, feature_dim: int, image_size: int,
                     segments: int, candidates: int, flip: bool, pixels: bool, normalize: str,
                     face_model: str, face_margin: int, min_face_score: float,
                     face_resize: str, face_boxes: str | None, labels: dict | LabelSet,
                     **choices) -> dict:
    """Everything that changes a stored value. ``face_boxes`` is the boxes file's sha256;
    ``choices`` are the preprocessing choices of FINGERPRINT_DEFAULTS (``body_boxes``: the
    body box file's sha256, or ``"detector"``), defaulting to caer-kit's own."""
    if isinstance(labels, LabelSet):
        labels = labels.as_dict()
    unknown = set(choices) - set(FINGERPRINT_DEFAULTS)
    if unknown:
        raise TypeError(f"make_fingerprint: unknown keys {sorted(unknown)}")
    return {
        "format_version": FORMAT_VERSION,
        "clip_spec": str(clip_spec),
        "clip_revision": str(clip_revision),
        "feature_dim": int(feature_dim),
        "image_size": int(image_size),
        "segments": int(segments),
        "candidates": int(candidates),
        "flip": bool(flip),
        "pixels": bool(pixels),
        "normalize": str(normalize),
        "face_model": str(face_model),
        "face_margin": int(face_margin),
        "min_face_score": float(min_face_score),
        "face_resize": str(face_resize),
        "face_boxes": face_boxes,
        "labels": labels,
        **{k: choices.get(k, v) for k, v in FINGERPRINT_DEFAULTS.items()},
    }


def fingerprint_mismatch(stored: dict, wanted: dict) -> list[str]:
    """Keys whose values differ. ``clip_spec`` alone is not compared: the same weights
    under another path or name (``clip_revision``) give the same features."""
    keys = sorted((set(stored) | set(wanted)) - {"clip_spec"})
    return [k for k in keys if _canonical(stored.get(k, FINGERPRINT_DEFAULTS.get(k)))
            != _canonical(wanted.get(k, FINGERPRINT_DEFAULTS.get(k)))]


def describe_mismatch(stored: dict, wanted: dict, keys: list[str]) -> str:
    """``--segments (store 16, now 8); --labels (store raer5, now caer7)``."""
    parts = []
    for k in keys:
        option = FINGERPRINT_OPTIONS.get(k, k)
        a, b = _short(k, stored), _short(k, wanted)
        parts.append(f"{option} (store {a}, now {b})")
    return "; ".join(dict.fromkeys(parts))


def _short(key: str, fp: dict) -> str:
    value = fp.get(key, FINGERPRINT_DEFAULTS.get(key))
    if key == "labels" and isinstance(value, dict):
        return str(value.get("name"))
    if key in ("clip_revision", "feature_dim", "image_size"):
        return f"{fp.get('clip_spec')} [{key} {value}]"
    return json.dumps(value)


def _canonical(value):
    return json.dumps(value, sort_keys=True)

