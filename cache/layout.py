"""The store's layout: every array (``array_specs``), the rows and results written into it,
its root attribute, and where an HDF5 store is staged. The layout, every array and every
attribute are documented in docs/cache-format.md; this module is the only code that knows it.

Crash safety comes from three rules, for Zarr (the format extract writes):
- every chunk that holds per-clip results covers exactly one clip, so a clip is written
  by exactly one process (torchrun ranks never share a chunk);
- a clip's status is written after all its other chunks: a clip that is not ``ok`` or
  ``failed`` is redone from scratch, and since results are deterministic the redone
  chunks are identical;
- zarr's LocalStore writes every key to a temporary file and renames it, so a chunk or a
  metadata document is either the old or the new one, never torn. The commit point of
  creating and extending a store is one such write (the root attribute ``n_clips``);
  arrays may be longer than ``n_clips`` after a killed extension and are read up to it.

HDF5 is written from a Zarr staging store at the end of a run (``PATH.staging.zarr``), so
a killed ``.h5`` run resumes exactly like a Zarr run and the ``.h5`` appears atomically.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cache.core import __version__

FORMAT_VERSION = 1
STATUS_NAMES = ("pending", "ok", "failed")  # stored as int8 codes 0, 1, 2
STATIC_CHUNK = 1024  # rows per chunk of the columns written once, when clips are added
RESULT_PREFIXES = ("frames/", "faces/", "body/", "features/", "pixels/")  # written for ok clips only
H5_SUFFIXES = (".h5", ".hdf5")

# caer_kit.integrity of stores this version creates: every chunk carries a zstd content
# checksum (HDF5: fletcher32), and every chunk of a finished clip is written even when it
# equals the fill value, so a missing chunk file is damage, not zeros. Older stores lack it.
INTEGRITY = {"checksum": "zstd", "every_chunk_written": True}


def is_hdf5(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in H5_SUFFIXES


def staging_path(path: str | os.PathLike) -> Path:
    """Where a ``.h5`` store is built (as Zarr) before it is written out in one piece."""
    return Path(str(path) + ".staging.zarr")


@dataclass(frozen=True)
class ArraySpec:
    tail: tuple  # shape after the clip axis
    dtype: str  # numpy dtype name, or "str"
    fill: object
    per_clip: bool  # one clip per chunk (results) or STATIC_CHUNK rows (written when added)


def array_specs(fp: dict) -> dict[str, ArraySpec]:
    """Every array of a store built with fingerprint ``fp``, in a fixed order."""
    s, k, d, size = fp["segments"], fp["candidates"], fp["feature_dim"], fp["image_size"]
    specs = {
        "clips/id": ArraySpec((), "str", "", False),
        "clips/path": ArraySpec((), "str", "", False),
        "clips/label": ArraySpec((), "int16", -1, False),
        "clips/split": ArraySpec((), "str", "", False),
        "clips/metadata": ArraySpec((), "str", "", False),
        "clips/listed_frames": ArraySpec((), "int32", -1, False),
        "clips/status": ArraySpec((), "int8", 0, True),
        "clips/reason": ArraySpec((), "str", "", True),
        "clips/note": ArraySpec((), "str", "", True),
        "clips/n_frames": ArraySpec((), "int32", 0, True),
        "clips/fps": ArraySpec((), "float32", 0.0, True),
        "clips/width": ArraySpec((), "int32", 0, True),
        "clips/height": ArraySpec((), "int32", 0, True),
        "frames/index": ArraySpec((s, k), "int32", -1, True),
        "faces/box": ArraySpec((s, k, 4), "float32", math.nan, True),
        "faces/score": ArraySpec((s, k), "float32", 0.0, True),
        "faces/found": ArraySpec((s, k), "bool", False, True),
    }
    if fp.get("context") == "body":
        specs["body/box"] = ArraySpec((4,), "float32", math.nan, True)
    views = ["face", "context"] + (["face_flip", "context_flip"] if fp["flip"] else [])
    for view in views:
        specs[f"features/{view}"] = ArraySpec((s, k, d), "float16", 0.0, True)
    if fp["pixels"]:
        for stream in ("face", "context"):
            specs[f"pixels/{stream}"] = ArraySpec((s, k, 3, size, size), "uint8", 0, True)
    return specs


@dataclass
class ClipRow:
    """What an annotation file says about one clip (the columns written when it is added)."""

    id: str
    path: str
    label: int
    split: str = ""
    metadata: dict = field(default_factory=dict)
    listed_frames: int = -1


@dataclass
class ClipResult:
    """Everything extract computed for one clip; ``status`` is "ok" or "failed"."""

    status: str
    reason: str = ""
    note: str = ""
    n_frames: int = 0
    fps: float = 0.0
    width: int = 0
    height: int = 0
    frame_index: np.ndarray | None = None  # int [S, K]
    box: np.ndarray | None = None  # float [S, K, 4], NaN where no face
    score: np.ndarray | None = None  # float [S, K]
    found: np.ndarray | None = None  # bool [S, K]
    body_box: np.ndarray | None = None  # float [4], NaN: no body box (context "body" only)
    features: dict = field(default_factory=dict)  # "face", "context", ("face_flip", ...)
    pixels: dict = field(default_factory=dict)  # "face", "context": uint8 [S, K, 3, H, W]


def caer_attrs(n: int, fingerprint: dict, metadata_columns: list[str],
               integrity: dict | None) -> dict:
    """The root attribute ``caer_kit``; its ``n_clips`` is the commit point of a creation or
    an extension."""
    attrs = {"n_clips": int(n), "fingerprint": fingerprint,
             "metadata_columns": list(metadata_columns),
             "writer": f"caer-kit {__version__}"}
    if integrity:
        attrs["integrity"] = dict(integrity)
    return attrs
