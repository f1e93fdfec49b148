"""Writing output files so that a planted symlink is replaced, never followed.

Every command that writes a file goes through ``atomic_write``: the content goes to a fresh
temporary file that this process creates exclusively (``mkstemp``) in the target's folder,
and ``os.replace`` renames it over the target. A rename replaces a symbolic link itself, not
what it points to, so a link planted where an output goes leaves the file outside untouched;
a kill or a full disk leaves the earlier file (or none), never half of one.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable

from cache.core.errors import CaerError, WriteFailed

log = logging.getLogger("caer")


def _umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def write_failed(err: OSError, path: str | os.PathLike, doing: str = "write") -> WriteFailed:
    """One line for an OS refusal to write (disk full, read-only file system, permission)."""
    hints = {errno.ENOSPC: "the disk is full: free space and run the same command again",
             errno.EDQUOT: "the disk quota is exhausted: free space and run the same command again",
             errno.EROFS: "the file system is read-only: write somewhere else",
             errno.EACCES: "permission denied: write somewhere you may write",
             errno.EPERM: "permission denied: write somewhere you may write"}
    cause = os.strerror(err.errno) if err.errno else str(err)
    hint = hints.get(err.errno, "")
    return WriteFailed(f"{path}: cannot {doing} ({cause})" + (f"; {hint}" if hint else ""))


def refuse_symlink(path: str | os.PathLike, what: str) -> None:
    """Refuse an output folder or file that is a symbolic link: nothing is written through one."""
    path = Path(path)
    if path.is_symlink():
        raise CaerError(f"{what} {path} is a symbolic link (to {os.readlink(path)}); caer-kit "
                        f"never writes through links: pass the real path, or remove the link")


def output_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """Create an output folder (and its parents) and return it; refuse a symlink or a file."""
    path = Path(path)
    refuse_symlink(path, what)
    if path.exists() and not path.is_dir():
        raise CaerError(f"{what} {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_failed(err, path, "create the directory") from None
    refuse_symlink(path, what)  # created by someone else between the check and mkdir
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *,
                 announce: str | None = None) -> Path:
    """Produce ``path`` by ``write(tmp)`` on a fresh temporary file beside it, then rename.

    ``announce`` names the output in a log line when an earlier one is replaced.
    """
    path = Path(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise write_failed(err, path) from None
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 is for secrets, not outputs
        write(tmp)
        if announce and os.path.lexists(path):
            log.info("replacing the earlier %s %s", announce, path)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise write_failed(err, path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, announce: str | None = None) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), announce=announce)


def atomic_write_text(path: str | os.PathLike, text: str, *, announce: str | None = None) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"),
                        announce=announce)
