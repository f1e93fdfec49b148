"""``info --verify`` and ``extract --redo-damaged``: read every chunk of a store, list the
clips whose chunks are missing or unreadable.

Reading a chunk checks it: zstd's content checksum (Zarr stores since INTEGRITY; HDF5's
fletcher32) turns a flipped byte into an error, and a truncated chunk fails to decompress. A
missing chunk file reads as the fill value in Zarr, so it is looked for by name: every chunk
of a finished clip exists in stores with ``every_chunk_written`` (older stores: features only).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cache.layout import RESULT_PREFIXES
from cache.store import FeatureStore

_BLOCK = 32  # clips read at once; a block that fails is read again clip by clip


@dataclass(frozen=True)
class Damage:
    row: int  # first row of the chunk for an annotation column (1024 rows per chunk)
    clip: str  # "clip 'ID' (row N)" or "rows A..B"
    array: str
    cause: str  # "missing chunk" or the reading error's first line
    redoable: bool  # a clip's own chunk (re-extracting repairs it), not the clip list

    def describe(self) -> str:
        return f"{self.clip}: array {self.array}: {self.cause}"


def _cause(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _read_rows(raw, rows: np.ndarray) -> list[tuple[int, str]]:
    """(row, cause) of every row of ``rows`` (consecutive) whose chunk does not read."""
    if not len(rows):
        return []
    try:
        raw[int(rows[0]):int(rows[-1]) + 1]
        return []
    except Exception:  # noqa: BLE001 - zstd, numcodecs, h5py and OS errors differ
        pass
    bad = []
    for r in rows:
        try:
            raw[int(r)]
        except Exception as err:  # noqa: BLE001
            bad.append((int(r), _cause(err)))
    return bad


def verify_store(store: FeatureStore, progress: bool = False) -> list[Damage]:
    """Every damaged chunk of the store, one entry per (clip, array)."""
    from tqdm import tqdm

    n = store.n_clips
    found: list[Damage] = []
    status_raw = store._root["clips/status"]
    status = np.zeros(n, np.int8)  # a clip whose status does not read counts as pending
    try:
        status[:] = np.asarray(status_raw[:n])
    except Exception:  # noqa: BLE001 - read again clip by clip
        for r in range(n):
            try:
                status[r] = int(status_raw[r])
            except Exception as err:  # noqa: BLE001
                found.append(Damage(r, store.clip_name(r), "clips/status", _cause(err), True))
    ok = status == 1
    names = [name for name in store._specs if name != "clips/status"]
    bar = tqdm(total=len(names) * n, unit="chunk", disable=not progress, desc="verify",
               leave=False)
    for name in names:
        spec, raw = store._specs[name], store._root[name]
        if not spec.per_clip:
            for start in range(0, n, 1024):
                stop = min(n, start + 1024)
                try:
                    raw[start:stop]
                except Exception as err:  # noqa: BLE001
                    found.append(Damage(start, f"rows {start}..{stop - 1}", name, _cause(err),
                                        False))
                bar.update(stop - start)
            continue
        # Result arrays matter for ok clips only (a failed clip never wrote them).
        wanted = ok if name.startswith(RESULT_PREFIXES) else np.ones(n, bool)
        for start in range(0, n, _BLOCK):
            rows = np.arange(start, min(n, start + _BLOCK))
            rows = rows[wanted[rows]]
            bad = dict(_read_rows(raw, rows))
            if store._checked(name):
                for r in store.missing_chunks(name, raw, rows[ok[rows]]):
                    bad.setdefault(r, "missing chunk (it would read as zeros)")
            for r, cause in sorted(bad.items()):
                found.append(Damage(r, store.clip_name(r), name, cause, True))
            bar.update(min(n, start + _BLOCK) - start)
    bar.close()
    return sorted(found, key=lambda d: (d.row, d.array))


def refuse_pending(store: FeatureStore, rows, what: str, allow_pending: bool) -> int:
    """Refuse (exit 2) to use a store whose clips ``rows`` (store rows of any status) include
    pending ones, unless ``allow_pending``; returns how many are pending. Pending is never
    failed: those clips were not tried yet, or an extract is trying them now."""
    import logging
    import os

    from cache.lock import writer_running
    from cache.core.errors import CaerError

    status = store.clip_table(["status"])["status"].to_numpy()[np.asarray(rows, dtype=np.int64)]
    n_pending = int((status == "pending").sum())
    if not n_pending:
        return 0
    holder = writer_running(os.path.realpath(store.path))
    why = (f"an extract is writing this store now: {holder}" if holder else
           "the extract that added them stopped before it finished them")
    n_ok = int((status == "ok").sum())
    if not allow_pending:
        raise CaerError(f"{store.path}: {n_pending} of the {len(status)} {what} clips are "
                        f"pending, not extracted yet ({why}); "
                        + ("wait for it to finish" if holder else
                           "run the same extract command again to finish them")
                        + f", or pass --allow-pending to use the {n_ok} finished ones")
    logging.getLogger("caer").warning(
        "--allow-pending: %d of the %d %s clips are pending (%s); using the %d finished ones",
        n_pending, len(status), what, why, n_ok)
    return n_pending
