"""One writer per store: an exclusive ``flock`` on ``PATH.lock``, held for the whole write.

The kernel releases a ``flock`` when its process dies, so a kill -9 leaves no stale lock: the
file may stay behind, but nobody holds it and the next writer takes it. The holder writes
one line about itself into the file (pid, host, start time, command), which a refused writer
quotes. Readers never take the lock; ``writer_running`` only peeks at it.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import sys
import time
from pathlib import Path

from cache.atomic import write_failed
from cache.core.errors import CaerError

log = logging.getLogger("caer")

# A reader's peek holds a shared lock for microseconds; a writer retries this long before it
# concludes that another writer holds the store.
_PEEK_GRACE_SECONDS = 0.5


class StoreBusy(CaerError):
    """Another process is writing the store."""


def lock_path(store: str | os.PathLike) -> Path:
    return Path(str(store) + ".lock")


def _holder_line() -> str:
    command = " ".join(sys.argv)
    if len(command) > 300:
        command = command[:297] + "..."
    return (f"pid {os.getpid()} on {socket.gethostname()} since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {command}")


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 1000, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "a process that has not yet said who it is"


def _open(path: Path, create: bool) -> int:
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    try:
        return os.open(path, flags, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise CaerError(f"{path} is a symbolic link; a store's lock file must be a plain "
                            f"file: remove the link") from None
        raise


class StoreLock:
    """``with StoreLock(store, wait=False):`` holds the store's write lock.

    Busy: ``StoreBusy`` at once, naming the holder, or with ``wait`` a log line and a wait.
    """

    def __init__(self, store: str | os.PathLike, wait: bool = False):
        self.store, self.path, self.wait, self._fd = Path(store), lock_path(store), wait, None
        self._made: list[Path] = []  # folders created for the lock, removed again if empty

    def _make_folders(self) -> None:
        missing = []
        folder = self.path.parent
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        for folder in reversed(missing):
            folder.mkdir(exist_ok=True)
            self._made.append(folder)

    def acquire(self) -> "StoreLock":
        deadline = time.monotonic() + _PEEK_GRACE_SECONDS
        said = False
        while True:
            try:
                self._make_folders()
                fd = _open(self.path, create=True)
            except OSError as err:
                raise write_failed(err, self.path, "create the store's lock file") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                if time.monotonic() < deadline:
                    os.close(fd)
                    time.sleep(0.05)
                    continue
                if not self.wait:
                    os.close(fd)
                    raise StoreBusy(f"{self.store}: another extract is writing "
                                    f"this store ({holder}); wait for it to finish, or run "
                                    f"again with --wait") from None
                if not said:
                    log.info("waiting for the writer of %s to finish (%s)",
                             self.store, holder)
                    said = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            # The previous holder may have unlinked the file as we opened it: then we lock a
            # file nobody else can find; take the one that is there now instead.
            try:
                now = os.stat(self.path, follow_symlinks=False)
            except FileNotFoundError:
                os.close(fd)
                continue
            mine = os.fstat(fd)
            if (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino):
                os.close(fd)
                continue
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, (_holder_line() + "\n").encode("utf-8"), 0)
            except OSError as err:
                os.close(fd)
                raise write_failed(err, self.path, "write the store's lock file") from None
            self._fd = fd
            return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            # Unlinked while still held, so a waiter that opened it retries on a fresh file.
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
        for folder in reversed(self._made):  # a refused run leaves no empty folders behind
            try:
                folder.rmdir()
            except OSError:
                break
        self._made = []

    def __enter__(self) -> "StoreLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def writer_running(store: str | os.PathLike) -> str | None:
    """The holder line of a writer that holds ``store`` now, else None. Never blocks."""
    path = lock_path(store)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
