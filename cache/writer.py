"""Writing a Zarr store: creating it with its clips pending (``create_zarr``) and
``StoreWriter``, which adds clips, writes each clip's results with its status last, and makes
clips pending again. The crash-safety rules it keeps are cache/layout.py's; the life cycle
around it (the lock, compatibility, HDF5 staging) is cache/lifecycle.py's.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from cache.layout import (INTEGRITY, STATIC_CHUNK, STATUS_NAMES, ArraySpec, ClipResult, ClipRow,
                          array_specs, caer_attrs, is_hdf5)
from cache.store import FeatureStore, StoreError


def write_every_chunk():
    """Zarr writes every chunk, fill-valued or not (the missing-chunk check relies on it)."""
    import zarr

    return zarr.config.set({"array.write_empty_chunks": True})


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
        with write_every_chunk():
            group = zarr.open_group(str(tmp), mode="a")
            for name, spec in array_specs(fingerprint).items():
                _zarr_create_array(group, name, spec, len(rows))
            _write_rows(group, 0, _static_columns(rows))
            attrs = {"caer_kit": caer_attrs(len(rows), fingerprint, metadata_columns,
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
        with write_every_chunk():
            super().__init__(path, zarr.open_group(str(path), mode="r+"), "zarr")
        self._handles = {}  # name -> zarr array: opening one reads its metadata from disk

    def _array(self, name: str):
        if name not in self._handles:
            self._handles[name] = self._root[name]
        return self._handles[name]

    def extend(self, rows: list[ClipRow], metadata_columns: list[str]) -> None:
        """Add pending clips. Safe to repeat after a kill: the commit is ``n_clips``."""
        n_old, n_new = self.n_clips, self.n_clips + len(rows)
        columns = list(dict.fromkeys(self.metadata_columns + list(metadata_columns)))
        with write_every_chunk():
            for name in self._specs:
                self._root[name].resize((n_new,) + tuple(self._root[name].shape[1:]))
            _write_rows(self._root, n_old, _static_columns(rows))
            self._root.attrs["caer_kit"] = caer_attrs(n_new, self.fingerprint, columns,
                                                       self.integrity)
        self._handles = {}  # their shapes changed
        self.n_clips, self.metadata_columns, self._manifest = n_new, columns, None
        self._ok = None

    def update_rows(self, updates: dict[int, ClipRow]) -> None:
        """Rewrite the annotation columns of failed clips whose list entry was fixed
        (``--retry-failed``); their ids stay."""
        with write_every_chunk():
            for i, row in sorted(updates.items()):
                for name, values in _static_columns([row]).items():
                    self._root[name][i] = values[0]
        self._manifest = None

    def mark_pending(self, rows) -> None:
        """Make clips pending again (``--redo-damaged``): their per-clip columns are cleared,
        so a damaged one of those reads again; the next run redoes them."""
        with write_every_chunk():
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
            with write_every_chunk():
                self._write_clip(i, result)
        except OSError as err:
            from cache.atomic import write_failed

            raise write_failed(err, self.path, f"write {self.clip_name(i)} (the clips "
                                               f"finished so far are kept)") from None
        self._manifest, self._ok = None, None

    def _write_clip(self, i: int, result: ClipResult) -> None:
        a = self._array
        for name, value in (("clips/reason", result.reason), ("clips/note", result.note),
                            ("clips/n_frames", result.n_frames), ("clips/fps", result.fps),
                            ("clips/width", result.width), ("clips/height", result.height)):
            a(name)[i] = value
        if result.status == "ok":
            a("frames/index")[i] = result.frame_index
            a("faces/box")[i] = result.box
            a("faces/score")[i] = result.score
            a("faces/found")[i] = result.found
            if "body/box" in self._specs:
                a("body/box")[i] = (np.full(4, np.nan, np.float32) if result.body_box is None
                                    else result.body_box)
            for view, value in result.features.items():
                a(f"features/{view}")[i] = np.asarray(value, dtype=np.float16)
            for stream, value in result.pixels.items():
                a(f"pixels/{stream}")[i] = value
        a("clips/status")[i] = STATUS_NAMES.index(result.status)

    def reset_failed(self) -> int:
        """Mark failed clips pending again (``--retry-failed``); returns how many."""
        status = self._root["clips/status"][: self.n_clips]
        failed = np.flatnonzero(status == 2)
        with write_every_chunk():
            for i in failed:
                self._root["clips/reason"][int(i)] = ""
                self._root["clips/status"][int(i)] = 0
        self._manifest, self._ok = None, None
        return len(failed)
