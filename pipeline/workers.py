"""Extract's worker processes: a spawned pool that decodes, detects and crops one clip per
task (pipeline/prepare.py), kept fed with a bounded number of clips in flight, and a worker
that dies in native code isolated to the one clip that killed it."""

from __future__ import annotations

import logging
import math

from cache.core.errors import CaerError
from pipeline.config import ExtractConfig
from pipeline.prepare import ClipTask, PreparedClip, prepare_clip, warm_worker, worker_init

log = logging.getLogger("caer")


class WorkerPool:
    """The spawned decoding workers, warmed up; ``restart`` replaces a pool a crash broke."""

    def __init__(self, cfg: ExtractConfig, sample_task: ClipTask):
        self.cfg, self.sample_task, self.executor = cfg, sample_task, None
        self.restart()

    def restart(self) -> None:
        """A fresh pool whose workers all started (one retry), else CaerError."""
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, wait

        for _ in range(2):
            if self.executor is not None:
                self.executor.shutdown(wait=True, cancel_futures=True)
            self.executor = ProcessPoolExecutor(
                self.cfg.workers, mp_context=mp.get_context("spawn"), initializer=worker_init)
            warm = [self._submit(warm_worker, self.sample_task) for _ in range(self.cfg.workers)]
            wait(warm)
            if not any(_died(f) for f in warm):
                return
        raise CaerError("extract: the worker processes die while starting (importing PyAV or "
                        "loading the face detector); run with --workers 0 to see the error")

    def submit(self, task: ClipTask):
        return self._submit(prepare_clip, task)

    def _submit(self, fn, *args):
        from concurrent.futures import Future
        from concurrent.futures.process import BrokenProcessPool

        try:
            return self.executor.submit(fn, *args)
        except (BrokenProcessPool, RuntimeError) as err:
            # The pool broke since the last wait (on Python < 3.12 a submit racing the break
            # can also say "cannot schedule new futures after shutdown").
            if not isinstance(err, BrokenProcessPool) and not self.executor._broken:
                raise
            future = Future()
            future.set_exception(BrokenProcessPool(str(err)))
            future.never_ran = True
            return future

    def shutdown(self) -> None:
        self.executor.shutdown(cancel_futures=True)


def start_pool(cfg: ExtractConfig, sample_task: ClipTask | None) -> WorkerPool | None:
    """The worker pool, warmed up (None with --workers 0: the main process decodes)."""
    if sample_task is None:
        return None
    if cfg.workers == 0:
        warm_worker(sample_task, hold=0.0)
        return None
    return WorkerPool(cfg, sample_task)


def run_pool(pool: WorkerPool, tasks, take, cfg: ExtractConfig, fp: dict) -> None:
    from concurrent.futures import FIRST_COMPLETED, wait

    images_per_clip = (4 if fp["flip"] else 2) * fp["segments"] * fp["candidates"]
    # Enough clips in flight to keep every worker busy and fill a batch; no more, so memory
    # stays flat however many clips there are.
    limit = 2 * cfg.workers + math.ceil(cfg.batch_size / images_per_clip)
    todo = iter(tasks)
    running = {}  # future -> task
    for task in todo:
        running[pool.submit(task)] = task
        if len(running) >= limit:
            break
    while running:
        finished, _ = wait(running, return_when=FIRST_COMPLETED)
        suspects = []
        if any(_died(f) for f in finished):
            # A worker died and the pool broke: every clip in flight fails with it. (A future
            # that a racing break left unresolved counts as failed too.)
            finished, lost = wait(running, timeout=60)
            suspects = [running[f] for f in finished if _died(f)] + [running[f] for f in lost]
            finished |= lost
        for future in sorted((f for f in finished if f.done() and not _died(f)),
                             key=lambda f: f.result().index):
            take(future.result())
        running = {f: t for f, t in running.items() if f not in finished}
        if suspects:
            _isolate_crash(pool, suspects, take)
        for task in todo:
            running[pool.submit(task)] = task
            if len(running) >= limit:
                break


def _died(future) -> bool:
    from concurrent.futures.process import BrokenProcessPool

    return future.done() and isinstance(future.exception(), BrokenProcessPool)


def _isolate_crash(pool: WorkerPool, suspects: list[ClipTask], take) -> None:
    """A worker died in native code (FFmpeg, MediaPipe) with these clips in flight: retry each
    alone in a pool whose workers are alive, so that only a clip that kills a worker by itself
    is recorded as failed."""
    log.warning("extract: a worker process died with %d clip(s) in flight; retrying each alone",
                len(suspects))
    pool.restart()
    for task in sorted(suspects, key=lambda t: t.index):
        future = pool.submit(task)
        if getattr(future, "never_ran", False):  # the pool broke between clips: not this one's
            pool.restart()
            future = pool.submit(task)
        future.exception()  # wait for it
        if not _died(future):
            take(future.result())
            continue
        if getattr(future, "never_ran", False):
            raise CaerError("extract: the worker processes keep dying between clips; run with "
                            "--workers 0 to see the error")
        take(PreparedClip.failed(task.index, "the worker process died on this clip (a crash in "
                                 "native code: FFmpeg or MediaPipe); retried alone, it died "
                                 "again"))
        pool.restart()
