"""A store's life as a writer sees it: what a --cache path is, the lock, the temporaries a
killed writer leaves, creating or extending a store before its clips are written, and a
``.h5`` store's staging store. ``WriteSession`` is the writer's API to all of it.

Two rules keep a user's files safe:
- nothing is written, swept or deleted under a path until it is positively a caer-kit store
  (its root ``zarr.json`` or HDF5 attributes carry ``caer_kit``) or a path that does not
  exist yet; anything else is refused with one line before the first write;
- a temporary is deleted only when it is positively one that a store writer made
  (``remove_temporary``), and only under the store's lock (cache.lock), so one writer's
  cleanup never touches another's files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from cache.core.errors import CaerError
from cache.hdf5 import export_hdf5, import_hdf5, remove_store
from cache.fingerprint import describe_mismatch, fingerprint_mismatch
from cache.layout import ClipRow, is_hdf5, staging_path
from cache.store import StoreError, open_store
from cache.lock import StoreLock
from cache.writer import StoreWriter, create_zarr

CREATING_MARKER = ".caer-kit-creating"
# zarr's LocalStore writes each key to NAME.<uuid4 hex>.partial and renames it.
_ZARR_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


class NotAStore(StoreError):
    """A --cache path that exists but is not a caer-kit store: nothing in it is touched."""


def _zarr_root_is_ours(path: Path) -> bool:
    meta = path / "zarr.json"
    if meta.is_symlink() or not meta.is_file():
        return False
    try:
        doc = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    caer = (doc.get("attributes") or {}).get("caer_kit") if isinstance(doc, dict) else None
    return isinstance(caer, dict) and "fingerprint" in caer


def _hdf5_is_ours(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            if f.read(8) != _HDF5_SIGNATURE:
                return False
        import h5py

        with h5py.File(path, "r") as f:
            return "caer_kit" in f.attrs
    except OSError:
        return False


class WriteSession:
    """One writer's hold on a store for a whole run: the path proven a store or new, the write
    lock, the store created or checked and extended, the Zarr store that the clips are written
    into (a ``.h5`` store's staging store) and, at the end, the ``.h5`` written in one piece::

        with WriteSession(cache, wait=False) as session:  # resolves the path, takes the lock
            if session.prepare(fingerprint, rows, columns):  # False: nothing left to do
                writer = session.writer()
                writer.write_clip(i, result)  # ... every clip
                writer.close()
                session.commit()  # .h5: export, then drop the staging store
        open_store(session.path)

    A run that fails or is killed keeps what it finished (a ``.h5`` run: its staging store),
    and the next run resumes it; each temporary is removed by the step that made it, or, when
    positively ours, by the next writer under the lock. Under torchrun every rank opens the
    session with ``lock=False``; rank 0 calls ``lock`` and ``prepare`` once the process group
    exists (so that a refusal reaches every rank), every rank writes its share through
    ``writer``, and rank 0 commits once all have finished.
    """

    def __init__(self, cache: str | os.PathLike, *, wait: bool = False, lock: bool = True):
        self.given = cache
        self.path = resolve_cache(cache)  # before anything is read or written
        self.staging = staging_path(self.path) if is_hdf5(self.path) else self.path
        self._lock = StoreLock(self.path, wait=wait)
        if lock:
            self.lock()

    def lock(self) -> None:
        self._lock.acquire()

    def check_writers(self, writers: int) -> None:
        if writers > 1 and is_hdf5(self.path):
            raise CaerError(f"--cache {self.given}: HDF5 allows one writer, and this is a "
                            f"{writers}-process torchrun; use a .zarr cache (convert later if "
                            f"needed) or run a single process")

    def prepare(self, fingerprint: dict, rows: list[ClipRow], metadata_columns: list[str],
                **options) -> bool:
        """``prepare_store`` (its options) under the lock this session holds."""
        return prepare_store(self.path, fingerprint, rows, metadata_columns, **options)

    def writer(self) -> StoreWriter:
        return StoreWriter(self.staging)

    def commit(self) -> None:
        """A ``.h5`` store: write the finished staging store out as the ``.h5``, atomically,
        then delete it (a Zarr store is already committed clip by clip)."""
        if self.staging != self.path:
            export_hdf5(self.staging, self.path)
            remove_store(self.staging)

    def close(self) -> None:
        self._lock.release()

    def __enter__(self) -> "WriteSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def resolve_cache(cache: str | os.PathLike) -> Path:
    """The store path a writer may use: a path that does not exist yet (its folder must), or
    positively a caer-kit store (through a symlink: the store it points to). Refuses anything
    else with one line, before anything is written."""
    cache = Path(cache)
    if cache.is_symlink():
        target = Path(os.path.realpath(cache))
        if not target.exists():
            raise NotAStore(f"--cache {cache} is a symbolic link to {os.readlink(cache)}, which "
                            f"does not exist; remove the link or point it at a store")
        kind = "store" if (_hdf5_is_ours(target) if target.is_file()
                           else _zarr_root_is_ours(target)) else None
        if kind is None:
            raise NotAStore(f"--cache {cache} is a symbolic link to {target}, which is not a "
                            f"caer-kit store; caer-kit changes nothing there: pass a new path "
                            f"or an existing store")
        return target
    if not cache.exists():
        if cache.parent.exists() and not cache.parent.is_dir():
            raise StoreError(f"--cache {cache}: {cache.parent} is not a folder")
        return cache
    if cache.is_dir():
        if is_hdf5(cache) or not _zarr_root_is_ours(cache):
            raise NotAStore(f"--cache {cache} is an existing folder that is not a caer-kit store "
                            f"(no zarr.json with caer_kit attributes); caer-kit changes nothing "
                            f"in it: pass a new path (e.g. {cache / 'features.zarr'}) or an "
                            f"existing store")
        return cache
    if not is_hdf5(cache) or not _hdf5_is_ours(cache):
        raise NotAStore(f"--cache {cache} is an existing file that is not a caer-kit store; "
                        f"caer-kit leaves it alone: pass a new path or an existing store")
    return cache


def remove_temporary(path: Path) -> None:
    """Delete a temporary a store writer left (``PATH.creating``, ``.importing``,
    ``.deleting``, ``.staging.zarr``, ``.writing``) if it is positively one; refuse
    anything else at that name."""
    if not os.path.lexists(path):
        return
    ours = False
    if path.is_symlink():
        ours = False
    elif path.is_dir():
        marker = path / CREATING_MARKER
        ours = (marker.is_file() and not marker.is_symlink()) or _zarr_root_is_ours(path)
    elif path.is_file():
        try:
            with open(path, "rb") as f:
                ours = path.name.endswith(".writing") and f.read(8) in (_HDF5_SIGNATURE, b"")
        except OSError:
            ours = False
    if not ours:
        raise StoreError(f"{path} is in the way and is not a temporary caer-kit made; caer-kit "
                         f"leaves it alone: move or remove it yourself, then run again")
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def sweep_partials(store: Path) -> int:
    """Delete the temporary files a killed zarr write left inside a store; returns how many.
    Only under the lock, in a store proven ours, and only zarr's own temp-file names."""
    n = 0
    for folder, dirs, files in os.walk(store, followlinks=False):
        for name in files:
            p = Path(folder) / name
            if _ZARR_PARTIAL.search(name) and not p.is_symlink() and p.is_file():
                p.unlink(missing_ok=True)
                n += 1
    return n


def prepare_store(cache: Path, fp: dict, rows: list[ClipRow], meta_columns: list[str], *,
                  retry_failed: bool = False, redo_damaged: bool = False,
                  progress: bool = False) -> bool:
    """Create the store, or check it and add the new clips. Call under the store's lock
    (rank 0 only). Checks come before any write, so a refused run changes nothing. Returns
    False when a finished ``.h5`` store already holds everything asked for."""
    target = staging_path(cache) if is_hdf5(cache) else cache
    remove_temporary(Path(str(target) + ".deleting"))  # a deletion a kill cut short
    if not target.exists() and is_hdf5(cache) and cache.exists():
        stored = open_store(cache)
        damaged = _damaged_rows(stored, progress) if redo_damaged else []
        if not damaged:
            updates, new_rows = check_compatible(stored, fp, rows, str(cache), retry_failed)
            status = stored.status
            todo = (status == 0).any() or (retry_failed and (status == 2).any())
            stored.close()
            if not new_rows and not todo and not updates:
                return False
        else:
            stored.close()
        import_hdf5(cache, target, skip_damaged=bool(damaged))
    if not target.exists():
        create_zarr(target, fp, rows, meta_columns)
        return True
    sweep_partials(target)
    writer = StoreWriter(target)
    if redo_damaged:
        damaged = _damaged_rows(writer, progress)
        if damaged:
            writer.mark_pending(damaged)
    updates, new_rows = check_compatible(writer, fp, rows, str(cache), retry_failed)
    if updates:
        writer.update_rows(updates)
    if new_rows:
        writer.extend(new_rows, meta_columns)
    elif set(meta_columns) - set(writer.metadata_columns):
        writer.extend([], meta_columns)
    if retry_failed:
        writer.reset_failed()
    writer.close()
    return True


def _damaged_rows(store, progress: bool) -> list[int]:
    from cache.verify import verify_store
    import logging

    damage = verify_store(store, progress=progress)
    static = [d for d in damage if not d.redoable]
    if static:
        raise StoreError(f"{store.path}: {static[0].describe()}: the clip list itself is "
                         f"damaged, which re-extracting cannot repair; extract into a new store")
    rows = sorted({d.row for d in damage})
    if rows:
        logging.getLogger("caer").info("--redo-damaged: %d damaged clips of %s will be "
                                       "extracted again", len(rows), store.path)
    return rows


def check_compatible(store, fp: dict, rows: list[ClipRow], cache: str,
                     retry_failed: bool = False) -> tuple[dict[int, ClipRow], list[ClipRow]]:
    """Refuse different options or clashing ids; return (failed rows whose annotation was
    fixed, to rewrite under ``retry_failed``; the rows the store lacks)."""
    differ = fingerprint_mismatch(store.fingerprint, fp)
    if differ:
        raise StoreError(f"{cache} was built with other options: "
                         f"{describe_mismatch(store.fingerprint, fp, differ)}; use the store's "
                         f"options or another --cache")
    manifest = store.clip_table(["id", "path", "label", "split", "status"])
    known = {r.id: (i, (r.path, int(r.label), r.split), r.status)
             for i, r in enumerate(manifest.itertuples())}
    new, updates = [], {}
    for row in rows:
        if row.id not in known:
            new.append(row)
            continue
        i, stored, status = known[row.id]
        if stored == (row.path, row.label, row.split):
            continue
        if retry_failed and status == "failed":
            updates[i] = row
            continue
        path, label, split = stored
        hint = (" (it failed: --retry-failed takes the corrected entry)"
                if status == "failed" else "")
        raise StoreError(f"{cache} already holds clip id '{row.id}' as path {path}, "
                         f"label {label}, split '{split}'; the annotations now say "
                         f"{row.path}, label {row.label}, split '{row.split}'{hint}")
    return updates, new
