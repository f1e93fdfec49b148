"""The feature store: per-clip CLIP features, face boxes and a manifest, in Zarr or HDF5.

Every array has the clip as its first axis. The layout, every array and every attribute
are documented in docs/cache-format.md; this module is the only code that knows it.

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

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cache.core import __version__
from cache.core.errors import CaerError
from cache.core.labels import LabelSet, load_label_set

FORMAT_VERSION = 1
STATUS_NAMES = ("pending", "ok", "failed")  # stored as int8 codes 0, 1, 2
STATIC_CHUNK = 1024  # rows per chunk of the columns written once, when clips are added
RESULT_PREFIXES = ("frames/", "faces/", "body/", "features/", "pixels/")  # written for ok clips only
H5_SUFFIXES = (".h5", ".hdf5")


class StoreError(CaerError):
    """A store that cannot be opened, created or extended as asked."""


class StoreDamaged(StoreError):
    """A chunk of a finished clip is missing or unreadable (checksum, truncation)."""


# caer_kit.integrity of stores this version creates: every chunk carries a zstd content
# checksum (HDF5: fletcher32), and every chunk of a finished clip is written even when it
# equals the fill value, so a missing chunk file is damage, not zeros. Older stores lack it.
INTEGRITY = {"checksum": "zstd", "every_chunk_written": True}


def repair_hint(path) -> str:
    return (f"repair: run the same extract command with --redo-damaged (re-extracts only the "
            f"damaged clips); `python cli.py info --verify {path}` lists them all")


def _writing():
    """Zarr writes every chunk, fill-valued or not (the missing-chunk check relies on it)."""
    import zarr

    return zarr.config.set({"array.write_empty_chunks": True})


def is_hdf5(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in H5_SUFFIXES


def staging_path(path: str | os.PathLike) -> Path:
    """Where a ``.h5`` store is built (as Zarr) before it is written out in one piece."""
    return Path(str(path) + ".staging.zarr")


# --------------------------------------------------------------------------- fingerprint

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
}

# The preprocessing choices added after format 1 was fixed, with the value a store that does
# not record them was built with (caer-kit's own preprocessing then).
FINGERPRINT_DEFAULTS = {"frame_order": "natural", "frame_count": "disk",
                        "frame_sampling": "caer", "frame_decode": "caer", "face_crop": "caer",
                        "context": "full", "body_boxes": None, "context_resize": "caer"}


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


# --------------------------------------------------------------------------- layout

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


# --------------------------------------------------------------------------- reading

class StoredArray:
    """Rows ``[0, n)`` of a Zarr array or HDF5 dataset, read with numpy indexing.

    ``a[idx]`` takes an int, a slice or a sorted int index array and returns numpy.
    """

    def __init__(self, array, n: int, is_str: bool, name: str = "", owner=None):
        self._array, self._n, self._is_str = array, n, is_str
        self.name, self._owner = name, owner
        self.shape = (n,) + tuple(array.shape[1:])
        self.dtype = np.dtype(object) if is_str else np.dtype(array.dtype)
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, key):
        first = key[0] if isinstance(key, tuple) else key
        rest = key[1:] if isinstance(key, tuple) else ()
        if isinstance(first, slice):
            first = slice(*first.indices(self._n))
        elif isinstance(first, (int, np.integer)):
            first = int(first) + self._n if first < 0 else int(first)
            if not 0 <= first < self._n:
                raise IndexError(f"clip {first} out of range 0..{self._n - 1}")
        else:
            first = np.asarray(first)
            if first.dtype == bool:
                first = np.flatnonzero(first)
            first = first.astype(np.int64)
            if first.size and (first.min() < 0 or first.max() >= self._n):
                raise IndexError(f"clip index out of range 0..{self._n - 1}")
            if first.size and np.any(np.diff(first) <= 0):
                raise IndexError("index clips with a sorted array of unique indices")
            if first.size == 0:
                return np.zeros((0,) + self.shape[1:], self.dtype)
        array = self._array
        if self._is_str and hasattr(array, "asstr"):  # h5py returns bytes otherwise
            array = array.asstr()
        try:
            out = np.asarray(array[(first,) + tuple(rest)])
        except Exception as err:  # noqa: BLE001 - zstd, numcodecs, h5py and OS errors differ
            if self._owner is None:
                raise
            raise self._owner.damage_error(self.name, first, err) from None
        if self._owner is not None:
            self._owner.check_chunks(self.name, self._array, first)
        return out.astype(object) if self._is_str else out

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out.astype(dtype) if dtype is not None else out

    def __repr__(self) -> str:
        return f"StoredArray(shape={self.shape}, dtype={self.dtype})"


class FeatureStore:
    """A read-only view of a store (``open_store``). See docs/cache-format.md."""

    def __init__(self, path: Path, root, backend: str):
        self.path, self._root, self.backend = path, root, backend
        meta = _read_caer_attrs(root, path)
        self.n_clips: int = int(meta["n_clips"])
        self.fingerprint: dict = meta["fingerprint"]
        self.metadata_columns: list[str] = list(meta.get("metadata_columns", []))
        self.integrity: dict = dict(meta.get("integrity") or {})
        self.metadata: dict = dict(_attrs(root).get("metadata", {}))
        self.labels: LabelSet = load_label_set(self.fingerprint["labels"])
        self._specs = array_specs(self.fingerprint)
        self._manifest = None
        self._ok = None  # status == ok per clip, for the missing-chunk check

    # arrays -------------------------------------------------------------
    def array(self, name: str) -> StoredArray:
        if name not in self._specs:
            raise StoreError(f"{self.path}: no array '{name}' in this store "
                             f"(it has: {', '.join(self._specs)})")
        return StoredArray(self._root[name], self.n_clips, self._specs[name].dtype == "str",
                           name, self)

    # damage -------------------------------------------------------------
    def _rows(self, first) -> np.ndarray:
        if isinstance(first, slice):
            return np.arange(*first.indices(self.n_clips))
        return np.atleast_1d(np.asarray(first, dtype=np.int64))

    def clip_name(self, row: int) -> str:
        try:
            clip_id = self._root["clips/id"][int(row)]
        except Exception:  # noqa: BLE001 - the id column itself may be the damaged one
            return f"row {int(row)}"
        if isinstance(clip_id, bytes):  # h5py gives bytes
            clip_id = clip_id.decode("utf-8", "replace")
        return f"clip '{clip_id}' (row {int(row)})"

    def damage_error(self, name: str, first, err: Exception) -> StoreDamaged:
        """The first clip among the rows read whose chunk of ``name`` cannot be read."""
        array = self._root[name]
        bad = None
        for row in self._rows(first):
            try:
                array[int(row)]
            except Exception:  # noqa: BLE001
                bad = int(row)
                break
        where = self.clip_name(bad) if bad is not None else "some clips"
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return StoreDamaged(f"{self.path}: {where}: array {name} is damaged ({cause}); "
                            f"{repair_hint(self.path)}")

    def missing_chunks(self, name: str, array, rows: np.ndarray) -> list[int]:
        """Rows among ``rows`` whose chunk file of ``name`` is absent (Zarr only)."""
        if self.backend != "zarr" or not self._specs[name].per_clip:
            return []
        tail = (0,) * (len(array.shape) - 1)
        base = self.path / name
        return [int(r) for r in rows
                if not (base / array.metadata.encode_chunk_key((int(r),) + tail)).is_file()]

    def _checked(self, name: str) -> bool:
        # Stores older than INTEGRITY skip chunks that equal the fill value; only features
        # (never exactly zero for a real crop) tell damage from fill there.
        if name == "clips/status" or not self._specs[name].per_clip:
            return False
        if self.integrity.get("every_chunk_written"):
            return name.startswith(RESULT_PREFIXES) or name.startswith("clips/")
        return name.startswith("features/")

    def check_chunks(self, name: str, array, first) -> None:
        """Refuse a read that touched an ``ok`` clip whose chunk is missing (zarr would give
        the fill value)."""
        if self.backend != "zarr" or not self._checked(name):
            return
        rows = self._rows(first)
        if not len(rows):
            return
        status = self._root["clips/status"]
        if self._ok is None:
            self._ok = np.asarray(status[: self.n_clips]) == 1
        ok = rows[self._ok[rows]]
        missing = self.missing_chunks(name, array, ok)
        if missing:
            raise StoreDamaged(f"{self.path}: {self.clip_name(missing[0])}: array {name} has "
                               f"lost its chunk file (it would read as zeros)"
                               f"{f' (and {len(missing) - 1} more clips)' if len(missing) > 1 else ''}"
                               f"; {repair_hint(self.path)}")

    def features(self, stream: str, flip: bool = False) -> StoredArray:
        """float16 ``[N, S, K, D]`` CLIP features of the face or context crops."""
        if stream not in ("face", "context"):
            raise StoreError(f"stream must be 'face' or 'context', not '{stream}'")
        if flip and not self.fingerprint["flip"]:
            raise StoreError(f"{self.path} holds no flipped views: extract it with --flip")
        return self.array(f"features/{stream}_flip" if flip else f"features/{stream}")

    def pixels(self, stream: str) -> StoredArray | None:
        """uint8 ``[N, S, K, 3, 224, 224]`` crops, or None for a store built without --pixels."""
        if not self.fingerprint["pixels"]:
            return None
        return self.array(f"pixels/{stream}")

    @property
    def frame_indices(self) -> StoredArray:
        return self.array("frames/index")

    @property
    def face_boxes(self) -> StoredArray:
        return self.array("faces/box")

    @property
    def face_scores(self) -> StoredArray:
        return self.array("faces/score")

    @property
    def face_found(self) -> StoredArray:
        return self.array("faces/found")

    @property
    def body_boxes(self) -> StoredArray | None:
        """float32 ``[N, 4]`` each clip's body box (NaN: none, the whole frame), or None for a
        store whose context is the whole frame."""
        return self.array("body/box") if "body/box" in self._specs else None

    def arrays(self) -> dict[str, tuple[tuple, str]]:
        """name -> (shape, dtype) of every array, for ``info``."""
        return {name: (self.array(name).shape, spec.dtype) for name, spec in self._specs.items()}

    @property
    def status(self) -> np.ndarray:
        return self.array("clips/status")[:]

    # manifest -----------------------------------------------------------
    @property
    def manifest(self) -> pd.DataFrame:
        """One row per clip in store order (see docs/cache-format.md for the columns)."""
        if self._manifest is None:
            self._manifest = _manifest(self)
        return self._manifest.copy()

    def close(self) -> None:
        if self.backend == "hdf5":
            self._root.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, n_clips={self.n_clips}, backend={self.backend})"


def _manifest(store: FeatureStore) -> pd.DataFrame:
    col = {name.split("/", 1)[1]: store.array(name)[:] for name in store._specs
           if name.startswith("clips/")}
    names = store.labels.names
    labels = col["label"].astype(np.int64)
    frame = pd.DataFrame({
        "id": col["id"].astype(str), "path": col["path"].astype(str), "label": labels,
        "label_name": [names[i] if 0 <= i < len(names) else "" for i in labels],
        "split": col["split"].astype(str)})
    metadata = [json.loads(m) if m else {} for m in col["metadata"]]
    for name in store.metadata_columns:
        frame[name] = [m.get(name, "") for m in metadata]
    listed = pd.Series(col["listed_frames"].astype(np.int64), dtype="Int64")
    frame["listed_frames"] = listed.mask(listed < 0).array  # <NA>: not from a list file
    for name in ("n_frames", "fps", "width", "height"):
        frame[name] = col[name]
    frame["status"] = [STATUS_NAMES[int(s)] for s in col["status"]]
    frame["reason"] = col["reason"].astype(str)
    frame["note"] = col["note"].astype(str)
    return frame


def _attrs(root) -> dict:
    # HDF5 keeps our dict attributes as JSON strings; Zarr keeps JSON natively.
    out = {}
    for key, value in dict(root.attrs).items():
        if isinstance(value, (bytes, str)) and key in ("caer_kit", "metadata"):
            value = json.loads(value)
        out[key] = value
    return out


def _read_caer_attrs(root, path) -> dict:
    meta = _attrs(root).get("caer_kit")
    if isinstance(meta, str):  # HDF5 keeps it as a JSON string
        meta = json.loads(meta)
    if not isinstance(meta, dict) or "fingerprint" not in meta:
        raise StoreError(f"{path}: not a caer-kit store (no 'caer_kit' attribute)")
    if meta["fingerprint"].get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{path}: store format {meta['fingerprint'].get('format_version')}, "
                         f"this caer-kit reads format {FORMAT_VERSION}; extract it again")
    return meta


def open_store(path: str | os.PathLike, mode: str = "r") -> FeatureStore:
    """Open a store read-only (``mode="r"``); ``mode="a"`` returns a ``StoreWriter``."""
    path = Path(path)
    if mode == "a":
        return StoreWriter(path)
    if mode != "r":
        raise StoreError(f"open_store mode must be 'r' or 'a', not '{mode}'")
    if not path.exists():
        hint = (f" (an unfinished run left {staging_path(path)}: run the same extract "
                f"command again to finish it)" if staging_path(path).exists() else "")
        raise StoreError(f"{path}: no such store{hint}")
    if is_hdf5(path):
        import h5py

        try:
            root = h5py.File(path, "r")
        except OSError as err:
            raise StoreError(f"{path}: not a readable HDF5 file ({err})") from None
        return FeatureStore(path, root, "hdf5")
    import zarr

    try:
        root = zarr.open_group(str(path), mode="r")
    except Exception as err:  # noqa: BLE001 - zarr raises several kinds
        raise StoreError(f"{path}: not a readable Zarr store ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from None
    return FeatureStore(path, root, "zarr")


# --------------------------------------------------------------------------- writing (Zarr)

def _zarr_create_array(group, name: str, spec: ArraySpec, n: int):
    from zarr.codecs import ZstdCodec

    shape = (n,) + tuple(spec.tail)
    chunks = (1 if spec.per_clip else STATIC_CHUNK,) + tuple(spec.tail)
    dtype = str if spec.dtype == "str" else spec.dtype
    # zarr's default compressor, plus zstd's content checksum: a flipped byte is an error.
    return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype,
                              fill_value=spec.fill, overwrite=True,
                              compressors=ZstdCodec(level=0, checksum=True))


def _static_columns(rows: list[ClipRow]) -> dict[str, np.ndarray]:
    return {
        "clips/id": np.array([r.id for r in rows], dtype=object),
        "clips/path": np.array([r.path for r in rows], dtype=object),
        "clips/label": np.array([r.label for r in rows], dtype=np.int16),
        "clips/split": np.array([r.split for r in rows], dtype=object),
        "clips/metadata": np.array([json.dumps(r.metadata, sort_keys=True) if r.metadata else ""
                                    for r in rows], dtype=object),
        "clips/listed_frames": np.array([r.listed_frames for r in rows], dtype=np.int32),
    }


def _write_rows(group, start: int, columns: dict[str, np.ndarray]) -> None:
    for name, values in columns.items():
        if len(values):
            group[name][start:start + len(values)] = values


def _caer_attrs(n: int, fingerprint: dict, metadata_columns: list[str],
                integrity: dict | None) -> dict:
    attrs = {"n_clips": int(n), "fingerprint": fingerprint,
             "metadata_columns": list(metadata_columns),
             "writer": f"caer-kit {__version__}"}
    if integrity:
        attrs["integrity"] = dict(integrity)
    return attrs


def create_zarr(path: Path, fingerprint: dict, rows: list[ClipRow],
                metadata_columns: list[str], metadata: dict | None = None) -> None:
    """Create a store with ``rows`` pending, atomically: built beside it (``PATH.creating``,
    marked as ours so that only ours is ever cleaned up), then renamed. Call it under the
    store's lock (cache.lifecycle)."""
    import zarr

    from cache.lifecycle import CREATING_MARKER, remove_temporary

    tmp = Path(str(path) + ".creating")
    remove_temporary(tmp)
    try:
        os.mkdir(tmp)
        (tmp / CREATING_MARKER).write_text("a caer-kit store being created\n", encoding="utf-8")
        with _writing():
            group = zarr.open_group(str(tmp), mode="a")
            for name, spec in array_specs(fingerprint).items():
                _zarr_create_array(group, name, spec, len(rows))
            _write_rows(group, 0, _static_columns(rows))
            attrs = {"caer_kit": _caer_attrs(len(rows), fingerprint, metadata_columns,
                                             INTEGRITY)}
            if metadata:
                attrs["metadata"] = metadata
            group.attrs.update(attrs)
        (tmp / CREATING_MARKER).unlink()
        os.replace(tmp, path)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)  # ours: made just now by os.mkdir
        from cache.atomic import write_failed

        raise write_failed(err, path, "create the store") from None


class StoreWriter(FeatureStore):
    """A Zarr store open for writing results (extract). Read methods work as well."""

    def __init__(self, path: Path):
        import zarr

        path = Path(path)
        if is_hdf5(path):
            raise StoreError(f"{path}: HDF5 stores are written through their staging Zarr store")
        if not path.is_dir():
            raise StoreError(f"{path}: no such store")
        with _writing():
            super().__init__(path, zarr.open_group(str(path), mode="r+"), "zarr")

    def extend(self, rows: list[ClipRow], metadata_columns: list[str]) -> None:
        """Add pending clips. Safe to repeat after a kill: the commit is ``n_clips``."""
        n_old, n_new = self.n_clips, self.n_clips + len(rows)
        columns = list(dict.fromkeys(self.metadata_columns + list(metadata_columns)))
        with _writing():
            for name in self._specs:
                self._root[name].resize((n_new,) + tuple(self._root[name].shape[1:]))
            _write_rows(self._root, n_old, _static_columns(rows))
            self._root.attrs["caer_kit"] = _caer_attrs(n_new, self.fingerprint, columns,
                                                       self.integrity)
        self.n_clips, self.metadata_columns, self._manifest = n_new, columns, None
        self._ok = None

    def update_rows(self, updates: dict[int, ClipRow]) -> None:
        """Rewrite the annotation columns of failed clips whose list entry was fixed
        (``--retry-failed``); their ids stay."""
        with _writing():
            for i, row in sorted(updates.items()):
                for name, values in _static_columns([row]).items():
                    self._root[name][i] = values[0]
        self._manifest = None

    def mark_pending(self, rows) -> None:
        """Make clips pending again (``--redo-damaged``): their per-clip columns are cleared,
        so a damaged one of those reads again; the next run redoes them."""
        with _writing():
            for i in rows:
                for name, spec in self._specs.items():
                    if spec.per_clip and name.startswith("clips/"):
                        self._root[name][int(i)] = spec.fill
        self._manifest, self._ok = None, None

    def write_clip(self, i: int, result: ClipResult) -> None:
        """Write one clip's results; its status goes last (the clip's commit point)."""
        if result.status not in ("ok", "failed"):
            raise ValueError(f"a finished clip is ok or failed, not {result.status}")
        try:
            with _writing():
                self._write_clip(i, result)
        except OSError as err:
            from cache.atomic import write_failed

            raise write_failed(err, self.path, f"write {self.clip_name(i)} (the clips "
                                               f"finished so far are kept)") from None
        self._manifest, self._ok = None, None

    def _write_clip(self, i: int, result: ClipResult) -> None:
        r = self._root
        for name, value in (("clips/reason", result.reason), ("clips/note", result.note),
                            ("clips/n_frames", result.n_frames), ("clips/fps", result.fps),
                            ("clips/width", result.width), ("clips/height", result.height)):
            r[name][i] = value
        if result.status == "ok":
            r["frames/index"][i] = result.frame_index
            r["faces/box"][i] = result.box
            r["faces/score"][i] = result.score
            r["faces/found"][i] = result.found
            if "body/box" in self._specs:
                r["body/box"][i] = (np.full(4, np.nan, np.float32) if result.body_box is None
                                    else result.body_box)
            for view, value in result.features.items():
                r[f"features/{view}"][i] = np.asarray(value, dtype=np.float16)
            for stream, value in result.pixels.items():
                r[f"pixels/{stream}"][i] = value
        r["clips/status"][i] = STATUS_NAMES.index(result.status)

    def reset_failed(self) -> int:
        """Mark failed clips pending again (``--retry-failed``); returns how many."""
        status = self._root["clips/status"][: self.n_clips]
        failed = np.flatnonzero(status == 2)
        with _writing():
            for i in failed:
                self._root["clips/reason"][int(i)] = ""
                self._root["clips/status"][int(i)] = 0
        self._manifest, self._ok = None, None
        return len(failed)
