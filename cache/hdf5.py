"""HDF5 stores and whole-store copies: a finished staging Zarr store written out as one
``.h5`` file, an ``.h5`` store turned back into a staging store to append to, and a store's
deletion in one step. See cache/layout.py for the crash-safety rules."""

from __future__ import annotations

import json
import os
import pickle
import signal
from pathlib import Path

from cache.core.errors import CaerError, first_line
from cache.layout import INTEGRITY, caer_attrs
from cache.store import StoreDamaged, StoredArray, StoreError, open_store
from cache.writer import create_zarr, write_every_chunk


def export_hdf5(staging: Path, path: Path) -> None:
    """Write a finished staging Zarr store to ``path`` (.h5) atomically, same contents.

    A forked child process writes the file. When HDF5 cannot flush a file (a full disk),
    releasing h5py's objects of that file crashes the process that holds them (a segfault,
    h5py 3.16), so the child reports the error and leaves without releasing them, and this
    process removes the half-written file and raises the one-line error. The child shares the
    store's lock, so even a writer killed meanwhile leaves nobody else writing beside it.
    """
    from cache.lifecycle import remove_temporary

    tmp = Path(str(path) + ".writing")
    remove_temporary(tmp)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: write, report, leave without running this process's exit code
        os.close(read_end)
        # h5py prints the errors of objects it fails to release; the report says what failed.
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        try:
            _write_hdf5(staging, tmp)
        except BaseException as err:  # noqa: BLE001 - every failure goes to the parent
            with os.fdopen(write_end, "wb") as report:
                report.write(pickle.dumps(_picklable(err)))
            os._exit(1)  # here, while ``err`` still holds the file's objects
        os._exit(0)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as report:
            answer = report.read()
        _, status = os.waitpid(pid, 0)
    except BaseException:  # interrupted: the half-written file is not left behind
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        tmp.unlink(missing_ok=True)
        raise
    if status == 0 and not answer:
        try:
            os.replace(tmp, path)
            return
        except OSError as err:
            failure: BaseException = err
    else:
        # Our own child's report, through a pipe only it and we hold.
        failure = pickle.loads(answer) if answer else StoreError(
            f"{path}: the process writing the HDF5 store died "
            f"({_how_it_ended(status)}); the finished staging store {staging} is kept: run "
            f"the same command again")
    tmp.unlink(missing_ok=True)  # ours: the child created it exclusively
    if isinstance(failure, OSError):
        from cache.atomic import write_failed

        raise write_failed(failure, path, "write the HDF5 store (the finished staging store "
                                          f"{staging} is kept)") from None
    raise failure


def _write_hdf5(staging: Path, tmp: Path) -> None:
    import h5py

    src = open_store(staging)
    integrity = {"checksum": "fletcher32",
                 "every_chunk_written": bool(src.integrity.get("every_chunk_written"))}
    try:
        with h5py.File(tmp, "w-") as f:  # w-: never through a link planted at the name
            f.attrs["caer_kit"] = json.dumps(caer_attrs(src.n_clips, src.fingerprint,
                                                        src.metadata_columns, integrity),
                                             sort_keys=True)
            if src.metadata:
                f.attrs["metadata"] = json.dumps(src.metadata, sort_keys=True)
            for name, spec in src._specs.items():
                shape = (src.n_clips,) + tuple(spec.tail)
                dtype = h5py.string_dtype() if spec.dtype == "str" else spec.dtype
                chunks = (1,) + tuple(spec.tail) if spec.per_clip else None
                ds = f.create_dataset(name, shape=shape, dtype=dtype,
                                      maxshape=(None,) + spec.tail,
                                      chunks=chunks if src.n_clips else True,
                                      fillvalue=None if spec.dtype == "str" else spec.fill,
                                      compression="lzf" if spec.tail else None,
                                      fletcher32=spec.dtype != "str")
                _copy_rows(src.array(name), ds)
    finally:
        src.close()


def _picklable(err: BaseException) -> BaseException:
    """The child's failure as the parent will raise it: OSErrors and caer-kit's errors as
    they are; anything else (its type may not pickle) as a StoreError naming it."""
    if isinstance(err, (OSError, CaerError)):
        try:
            pickle.dumps(err)
            return err
        except Exception:  # noqa: BLE001
            pass
    return StoreError(f"writing the HDF5 store failed: {type(err).__name__}: "
                      f"{first_line(err)}")


def _how_it_ended(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def import_hdf5(path: Path, staging: Path, skip_damaged: bool = False) -> None:
    """Turn an existing ``.h5`` store back into a staging Zarr store (to append to it).
    Built beside the staging path and renamed, so a kill leaves no half-imported store.
    ``skip_damaged``: clips whose chunks do not read are imported as pending (redone)."""
    import zarr

    from cache.lifecycle import remove_temporary

    src = open_store(path)
    tmp = Path(str(staging) + ".importing")
    remove_temporary(tmp)
    create_zarr(tmp, src.fingerprint, [], src.metadata_columns, src.metadata)
    try:
        with write_every_chunk():
            group = zarr.open_group(str(tmp), mode="r+")
            damaged: set[int] = set()
            for name in src._specs:
                group[name].resize((src.n_clips,) + tuple(group[name].shape[1:]))
                damaged |= _copy_rows(src.array(name), group[name], skip_damaged)
            for i in sorted(damaged):
                for name, spec in src._specs.items():
                    if spec.per_clip and name.startswith("clips/"):
                        group[name][i] = spec.fill
            group.attrs["caer_kit"] = caer_attrs(src.n_clips, src.fingerprint,
                                                  src.metadata_columns, INTEGRITY)
        os.replace(tmp, staging)
    except OSError as err:
        remove_store(tmp)
        from cache.atomic import write_failed

        raise write_failed(err, staging, "create the staging store") from None
    finally:
        src.close()


def remove_store(path: Path) -> None:
    """Delete a Zarr store so that a kill midway leaves either all of it or none of it."""
    from cache.lifecycle import remove_temporary

    doomed = Path(str(path) + ".deleting")
    if path.exists():
        os.replace(path, doomed)
    remove_temporary(doomed)


def _copy_rows(src: StoredArray, dst, skip_damaged: bool = False,
               rows_per_step: int = 64) -> set[int]:
    """Copy every row; with ``skip_damaged`` the rows that do not read are left out and
    returned (per-clip arrays only)."""
    skipped: set[int] = set()
    for start in range(0, len(src), rows_per_step):
        stop = min(len(src), start + rows_per_step)
        try:
            dst[start:stop] = src[start:stop]
        except StoreDamaged:
            if not skip_damaged or not src._owner._specs[src.name].per_clip:
                raise
            for i in range(start, stop):
                try:
                    dst[i] = src[i]
                except StoreDamaged:
                    skipped.add(i)
    return skipped


