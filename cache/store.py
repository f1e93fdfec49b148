"""Reading a store: ``open_store`` gives a read-only ``FeatureStore`` whose arrays
(``StoredArray``) read rows ``[0, n_clips)`` with numpy indexing and refuse a damaged chunk of
a finished clip instead of returning zeros. The layout is cache/layout.py's; writing is
cache/writer.py's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from cache.core.errors import CaerError
from cache.core.labels import LabelSet, load_label_set
from cache.layout import (FORMAT_VERSION, RESULT_PREFIXES, STATUS_NAMES, array_specs, is_hdf5,
                          staging_path)


class StoreError(CaerError):
    """A store that cannot be opened, created or extended as asked."""


class StoreDamaged(StoreError):
    """A chunk of a finished clip is missing or unreadable (checksum, truncation)."""


def repair_hint(path) -> str:
    return (f"repair: run the same extract command with --redo-damaged (re-extracts only the "
            f"damaged clips); `python cli.py info --verify {path}` lists them all")


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
        self._manifest = None  # the clips/ arrays read so far, {name: values}; None: none
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
        return self.clip_table()

    def clip_table(self, columns=None) -> pd.DataFrame:
        """The manifest's ``columns`` only (all of them when None), reading only the arrays
        they come from: each per-clip column (status, n_frames, reason ...) is one chunk file
        a clip, so train-head, which needs id, label, split and status, skips most of them."""
        if self._manifest is None:
            self._manifest = {}
        cache = self._manifest

        def read(name: str) -> np.ndarray:
            if name not in cache:
                cache[name] = self.array(f"clips/{name}")[:]
            return cache[name]

        return _clip_table(self, read, columns)

    def close(self) -> None:
        if self.backend == "hdf5":
            self._root.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, n_clips={self.n_clips}, backend={self.backend})"


def _clip_table(store: FeatureStore, read, columns) -> pd.DataFrame:
    """The manifest's columns (docs/cache-format.md), in their order; ``read(name)`` gives the
    values of array ``clips/<name>``."""
    names = store.labels.names
    builders = {
        "id": lambda: read("id").astype(str),
        "path": lambda: read("path").astype(str),
        "label": lambda: read("label").astype(np.int64),
        "label_name": lambda: [names[i] if 0 <= i < len(names) else ""
                               for i in read("label").astype(np.int64)],
        "split": lambda: read("split").astype(str),
    }
    metadata = {}

    def meta(name):
        if "rows" not in metadata:
            metadata["rows"] = [json.loads(m) if m else {} for m in read("metadata")]
        return [m.get(name, "") for m in metadata["rows"]]

    # A name given twice keeps its first place and takes the later values, as assigning
    # DataFrame columns one by one did (an annotation column may be called "status").
    for name in store.metadata_columns:
        builders[name] = lambda name=name: meta(name)

    def listed():
        values = pd.Series(read("listed_frames").astype(np.int64), dtype="Int64")
        return values.mask(values < 0).array  # <NA>: not from a list file

    builders["listed_frames"] = listed
    for name in ("n_frames", "fps", "width", "height"):
        builders[name] = lambda name=name: read(name)
    builders["status"] = lambda: [STATUS_NAMES[int(s)] for s in read("status")]
    builders["reason"] = lambda: read("reason").astype(str)
    builders["note"] = lambda: read("note").astype(str)
    wanted = list(builders) if columns is None else list(columns)
    unknown = [c for c in wanted if c not in builders]
    if unknown:
        raise StoreError(f"{store.path}: no manifest column {', '.join(map(repr, unknown))} "
                         f"(it has: {', '.join(builders)})")
    return pd.DataFrame({name: builders[name]() for name in wanted},
                        index=pd.RangeIndex(store.n_clips))


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
        from cache.writer import StoreWriter

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

