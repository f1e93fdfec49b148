"""Stage one: annotation files -> a feature store (``python cli.py extract``).

Worker processes decode, detect and crop one clip each (pipeline/video, faces, crops);
the main process encodes the crops of many clips in batches with one CLIP image encoder
and writes each clip when all its features are in. Under torchrun every rank does this for
its share of the clips, in the same store.

Determinism, which resume and torchrun rely on: every encoder batch holds exactly
``batch_size`` images (the last one is padded). A CPU matrix multiply can round a row
differently when the number of rows changes, but not when only its neighbours change, so
with a fixed batch size a crop's features do not depend on which other clips shared its
batch, and a clip redone after a kill, or by another rank, is bit-identical.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cache.lifecycle import prepare_store, resolve_cache
from cache.lock import StoreLock
from cache.hdf5 import export_hdf5, remove_store
from cache.store import (ClipResult, ClipRow, StoreWriter, is_hdf5, make_fingerprint,
                         open_store, staging_path)
from pipeline.boxes import BoxFile, load_body_boxes, load_face_boxes
from cache.core.runtime import resolve_device, resolve_precision
from cache.core.runtime import Distributed as Dist
from pipeline.config import CHOICES, ExtractConfig
from cache.core.errors import CaerError
from pipeline.prepare import ClipTask, PreparedClip, prepare_clip, warm_worker, worker_init

log = logging.getLogger("caer")

# Test hook: SIGKILL this process after it has written this many clips (kill -9 tests).
KILL_AFTER_ENV = "CAER_TEST_KILL_AFTER_CLIPS"


@dataclass
class ExtractSummary:
    cache: str
    n_clips: int
    n_ok: int
    n_failed: int
    n_done_now: int  # clips this run (all ranks) finished
    seconds: float
    failures: list = field(default_factory=list)  # (id, reason), at most a few
    # This process's share (rank 0's under torchrun), for benchmarks/bench_extract.py:
    process_seconds: float = 0.0  # decoding, detection, encoding and writing of the clips
    encode_seconds: float = 0.0  # inside the image encoder
    n_batches: int = 0  # encoder batches of exactly batch_size images
    startup_seconds: float = 0.0  # starting, warming and stopping the workers, once per run
    box_lines: list = field(default_factory=list)  # clips/frames a box file left without a box

    @property
    def exit_code(self) -> int:
        return 3 if self.n_failed else 0


def _body_source(cfg: ExtractConfig, body_file: BoxFile | None) -> str | None:
    """What the fingerprint records of the body boxes: the box file's sha256, or the person
    detector's model (``detector:<its sha256>``); None for the whole frame."""
    if cfg.context != "body":
        return None
    if body_file is not None:
        return body_file.sha256
    from pipeline.persons import load_model_bytes

    return "detector:" + hashlib.sha256(load_model_bytes()).hexdigest()


def match_boxes(rows: list[ClipRow], face: BoxFile | None, body: BoxFile | None) -> list[dict]:
    """Each clip's entries of the box files (before anything is written, so that an
    ambiguous key refuses the run): ``[{"face": {frame: box} | None, "body": box | None,
    "body_key": bool}]``."""
    out = []
    for row in rows:
        entry = {"face": None, "body": None, "body_key": False}
        if face is not None:
            key = face.match(row.path)
            entry["face"] = face.entries[key] if key is not None else None
        if body is not None:
            key = body.match(row.path)
            entry["body"] = body.entries[key] if key is not None else None
            entry["body_key"] = key is not None
        out.append(entry)
    return out


# --------------------------------------------------------------------------- encoder side

class BatchEncoder:
    """Encodes queued crops in batches of exactly ``batch_size`` images, across clips."""

    def __init__(self, clip, batch_size: int, normalize: str, device: str, precision: str):
        import torch

        self.clip, self.batch_size, self.normalize = clip, batch_size, normalize
        self.device, self.precision = device, precision
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.queue: deque = deque()  # [clip entry, next row to encode]
        self.queued = 0
        self.encode_seconds = 0.0
        self.n_batches = 0

    def add(self, entry: dict) -> None:
        self.queue.append([entry, 0])
        self.queued += len(entry["images"])

    def run(self, final: bool = False) -> list[dict]:
        """Encode full batches (and the padded rest when ``final``); return finished clips."""
        done = []
        while self.queued >= self.batch_size or (final and self.queued):
            done += self._one_batch()
        return done

    def _one_batch(self) -> list[dict]:
        import torch
        from pipeline.crops import to_clip_pixels

        parts, owners, n = [], [], 0
        for item in self.queue:
            entry, start = item
            take = min(len(entry["images"]) - start, self.batch_size - n)
            parts.append(entry["images"][start:start + take])
            owners.append((item, start, take))
            n += take
            if n == self.batch_size:
                break
        images = np.concatenate(parts)
        if n < self.batch_size:  # the fixed batch size keeps features independent of it
            pad = np.zeros((self.batch_size - n,) + images.shape[1:], np.uint8)
            images = np.concatenate([images, pad])
        t0 = time.perf_counter()
        pixels = to_clip_pixels(images, self.normalize).to(self.device)
        with torch.inference_mode(), torch.autocast(self.device.split(":")[0],
                                                    dtype=self.dtype or torch.float32,
                                                    enabled=self.dtype is not None):
            out = self.clip.encode_images(pixels).float().cpu().numpy().astype(np.float16)
        self.encode_seconds += time.perf_counter() - t0
        self.n_batches += 1
        finished, offset = [], 0
        for item, start, take in owners:
            entry = item[0]
            entry["features"][start:start + take] = out[offset:offset + take]
            offset += take
            item[1] = start + take
            self.queued -= take
        while self.queue and self.queue[0][1] == len(self.queue[0][0]["images"]):
            finished.append(self.queue.popleft()[0])
        return finished


def _distinct_frames(result: PreparedClip) -> tuple[np.ndarray, np.ndarray]:
    """(first slot of each distinct kept frame, slot -> its distinct frame): a frame kept in
    several slots (a short clip, the original's test frame in every candidate) is encoded
    once. Its crops are the same in every slot, since they depend on the frame alone."""
    _, first, inverse = np.unique(result.frame_index.reshape(-1), return_index=True,
                                  return_inverse=True)
    return first, inverse.reshape(-1)


def _stack_views(result: PreparedClip, flip: bool) -> np.ndarray:
    """uint8 ``[V * F, H, W, 3]``, the F distinct kept frames of each view in the order face,
    context(, face_flip, context_flip)."""
    first, _ = _distinct_frames(result)
    size = result.face.shape[-2]
    face = result.face.reshape(-1, size, size, 3)[first]
    context = result.context.reshape(-1, size, size, 3)[first]
    views = [face, context]
    if flip:  # flipping the crop equals cropping the flipped frame with the mirrored box
        views += [face[..., ::-1, :], context[..., ::-1, :]]
    return np.ascontiguousarray(np.stack(views).reshape(-1, size, size, 3))


def _to_clip_result(result: PreparedClip, features: np.ndarray | None, fp: dict) -> ClipResult:
    if result.status != "ok":
        return ClipResult("failed", reason=result.reason or "failed")
    s, k = fp["segments"], fp["candidates"]
    views = ["face", "context"] + (["face_flip", "context_flip"] if fp["flip"] else [])
    _, slot_frame = _distinct_frames(result)
    feats = features.reshape(len(views), -1, features.shape[-1])[:, slot_frame]
    feats = feats.reshape(len(views), s, k, -1)
    pixels = {}
    if fp["pixels"]:
        pixels = {name: np.ascontiguousarray(crops.transpose(0, 1, 4, 2, 3))
                  for name, crops in (("face", result.face), ("context", result.context))}
    return ClipResult("ok", note=result.note, n_frames=result.n_frames, fps=result.fps,
                      width=result.width, height=result.height,
                      frame_index=result.frame_index, box=result.box,
                      score=result.score, found=result.found,
                      body_box=result.body_box,
                      features={v: feats[i] for i, v in enumerate(views)}, pixels=pixels)


# --------------------------------------------------------------------------- distributed

# --------------------------------------------------------------------------- the run

def run_extract(cfg: ExtractConfig) -> ExtractSummary:
    """Extract every clip the annotation files name into ``cfg.cache``."""
    t_start = time.perf_counter()
    if cfg.preset not in CHOICES["preset"]:
        raise CaerError(f"--preset must be one of {', '.join(CHOICES['preset'])}, "
                        f"not {cfg.preset!r}")
    cfg = cfg.resolved()
    cfg.validate()
    d = Dist.from_env()
    # Before anything is read or written: a path that is not positively a store is refused.
    cache = resolve_cache(cfg.cache)
    # One writer per store, for the whole run. Under torchrun rank 0 takes it once the
    # process group exists, so that a refusal reaches every rank.
    lock = StoreLock(cache, wait=cfg.wait)
    if d.world == 1:
        lock.acquire()
    try:
        return _extract_locked(cfg, d, cache, lock, t_start)
    finally:
        lock.release()


def _extract_locked(cfg: ExtractConfig, d: Dist, cache: Path, lock: StoreLock,
                    t_start: float) -> ExtractSummary:
    from pipeline.annotations import read_annotations
    from cache.core.labels import load_label_set

    if d.world > 1 and is_hdf5(cache):
        raise CaerError(f"--cache {cfg.cache}: HDF5 allows one writer, and this is a "
                        f"{d.world}-process torchrun; use a .zarr cache (convert later if "
                        f"needed) or run a single process")
    labels = load_label_set(cfg.labels)
    roots: dict[str, str] = {}  # clip id -> its root: where its path is looked for
    rows, meta_columns = read_annotations(list(cfg.annotations), labels, list(cfg.split),
                                          cfg.root, roots=roots)
    face_file = load_face_boxes(cfg.face_boxes) if cfg.face_boxes is not None else None
    body_file = load_body_boxes(cfg.body_boxes) if cfg.body_boxes is not None else None
    matched = match_boxes(rows, face_file, body_file)  # refuses an ambiguous key up front

    from pipeline.clip import load_clip

    device = str(resolve_device(cfg.device))  # this rank's GPU under torchrun
    precision = resolve_precision(cfg.precision, device.split(":")[0])
    clip = load_clip(cfg.clip, device=device)
    fp = make_fingerprint(clip_spec=cfg.clip, clip_revision=clip.revision,
                          feature_dim=clip.feature_dim, image_size=clip.image_size,
                          segments=cfg.segments, candidates=cfg.candidates, flip=cfg.flip,
                          pixels=cfg.pixels, normalize=cfg.normalize, face_model=cfg.face_model,
                          face_margin=cfg.face_margin, min_face_score=cfg.min_face_score,
                          face_resize=cfg.face_resize,
                          face_boxes=face_file.sha256 if face_file else None, labels=labels,
                          frame_order=cfg.frame_order, frame_count=cfg.frame_count,
                          frame_sampling=cfg.frame_sampling, frame_decode=cfg.frame_decode,
                          face_crop=cfg.face_crop, context=cfg.context,
                          context_resize=cfg.context_resize,
                          body_boxes=_body_source(cfg, body_file))
    target = staging_path(cache) if is_hdf5(cache) else cache

    d.init()
    t_process = t_startup = 0.0
    encoder = BatchEncoder(clip, cfg.batch_size, cfg.normalize, device, precision)
    try:
        outcome = None  # (message, exit status) of a refusal, else whether there is work
        if d.rank == 0:
            try:
                if d.world > 1:
                    lock.acquire()
                outcome = prepare_store(cache, fp, rows, meta_columns,
                                        retry_failed=cfg.retry_failed,
                                        redo_damaged=cfg.redo_damaged,
                                        progress=not cfg.quiet)
            except Exception as err:  # noqa: BLE001 - the other ranks must hear of it
                if d.world == 1 and not isinstance(err, CaerError):
                    raise
                text = str(err).strip().splitlines()
                outcome = (text[0] if text else type(err).__name__,
                           getattr(err, "exit_code", 1))
        outcome = d.share(outcome)
        if isinstance(outcome, tuple):
            raise CaerError(*outcome)
        done_all = 0
        if outcome:
            d.barrier()
            done_all, t_process, t_startup = _run_share(cfg, d, target, clip, encoder, fp,
                                                        (face_file, body_file), device,
                                                        precision, roots)
            d.barrier()
            if d.rank == 0 and is_hdf5(cache):
                export_hdf5(target, cache)
                remove_store(target)
            d.barrier()
    finally:
        d.close()

    store = open_store(cache)
    manifest = store.manifest
    store.close()
    failed = manifest[manifest.status == "failed"]
    boxes = box_lines(cache, face_file, body_file, matched) if d.rank == 0 else []
    return ExtractSummary(str(cfg.cache), len(manifest), int((manifest.status == "ok").sum()),
                          len(failed), done_all, time.perf_counter() - t_start,
                          list(zip(failed["id"], failed["reason"]))[:5], t_process,
                          encoder.encode_seconds, encoder.n_batches, t_startup, boxes)


def box_lines(cache: Path, face: BoxFile | None, body: BoxFile | None,
              matched: list[dict]) -> list[str]:
    """What the boxes left out: clips of this run that match no key of a box file, and,
    over the whole store, what ``info`` reports."""
    from cache.info import box_counts, box_count_lines

    lines = []
    if face is not None:
        missing = sum(m["face"] is None for m in matched)
        lines.append(f"--face-boxes {face.path}: {missing} of {len(matched)} clips match no key")
    if body is not None:
        missing = sum(not m["body_key"] for m in matched)
        lines.append(f"--body-boxes {body.path}: {missing} of {len(matched)} clips match no "
                     f"key")
    with open_store(cache) as store:
        lines += box_count_lines(box_counts(store))
    return lines


def _run_share(cfg: ExtractConfig, d: Dist, target: Path, clip, encoder: BatchEncoder, fp: dict,
               box_files: tuple, device: str, precision: str,
               roots: dict[str, str]) -> tuple[int, float, float]:
    """This rank's share of the pending clips: returns (clips done by all ranks, seconds
    processing, seconds starting the workers). ``roots`` maps this run's clip ids to their
    root; a pending clip of an earlier run falls back on --root."""
    fallback_root = os.path.abspath(cfg.root) if cfg.root is not None else None
    writer = StoreWriter(target)
    pending = np.flatnonzero(writer.status == 0)
    mine = pending[d.rank::d.world]
    manifest = writer.manifest
    log.info("extract: %d clips in %s, %d to do%s (device %s, precision %s)",
             writer.n_clips, cfg.cache, len(pending),
             f", {len(mine)} on rank {d.rank}" if d.world > 1 else "", device, precision)
    tasks = []
    face_file, body_file = box_files
    for i in mine:
        row = manifest.iloc[int(i)]
        listed = row["listed_frames"]
        clip_row = ClipRow(row["id"], row["path"], int(row["label"]), row["split"],
                           listed_frames=-1 if pd.isna(listed) else int(listed))
        entry = match_boxes([clip_row], face_file, body_file)[0]
        tasks.append(ClipTask(
            index=int(i), path=clip_row.path, split=clip_row.split,
            listed_frames=clip_row.listed_frames,
            segments=cfg.segments, candidates=cfg.candidates,
            face_model=cfg.face_model, min_face_score=cfg.min_face_score,
            face_margin=cfg.face_margin, face_resize=cfg.face_resize,
            image_size=clip.image_size,
            boxes=None if face_file is None else (entry["face"] or {}),
            root=roots.get(clip_row.id, fallback_root),
            confine_to_root=cfg.confine_to_root,
            frame_order=cfg.frame_order, frame_count=cfg.frame_count,
            frame_sampling=cfg.frame_sampling, frame_decode=cfg.frame_decode,
            face_crop=cfg.face_crop, context=cfg.context,
            context_resize=cfg.context_resize,
            body_source="file" if body_file is not None else "detector",
            body_box=entry["body"]))
    t0 = time.perf_counter()
    pool = start_pool(cfg, tasks[0] if tasks else None)
    t_startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        done = _process(pool, tasks, encoder, writer, fp, cfg, show=(d.rank == 0))
        t_process = time.perf_counter() - t0
    finally:
        t0 = time.perf_counter()
        if pool is not None:
            pool.shutdown()
        t_startup += time.perf_counter() - t0
    writer.close()
    return d.sum(done), t_process, t_startup


def _process(pool, tasks: list[ClipTask], encoder: BatchEncoder, writer: StoreWriter, fp: dict,
             cfg: ExtractConfig, show: bool) -> int:
    """Feed tasks to workers with a bounded number in flight; encode; write."""
    from tqdm import tqdm

    kill_after = int(os.environ.get(KILL_AFTER_ENV, "0") or 0)
    written = 0
    bar = tqdm(total=len(tasks), unit="clip", file=sys.stderr, dynamic_ncols=True,
               disable=cfg.quiet or not show or not tasks, desc="extract", smoothing=0.1)
    log_every = max(1, len(tasks) // 10)
    t0 = time.perf_counter()

    def write(result: PreparedClip, features) -> None:
        nonlocal written
        writer.write_clip(result.index, _to_clip_result(result, features, fp))
        written += 1
        bar.update(1)
        if cfg.quiet and show and (written % log_every == 0 or written == len(tasks)):
            rate = written / max(1e-9, time.perf_counter() - t0)
            log.info("extract: %d/%d clips (%.2f clips/s)", written, len(tasks), rate)
        if kill_after and written >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    def take(result: PreparedClip) -> None:
        if result.status != "ok":
            write(result, None)
            return
        images = _stack_views(result, fp["flip"])
        encoder.add({"result": result, "images": images,
                     "features": np.empty((len(images), fp["feature_dim"]), np.float16)})
        for entry in encoder.run():
            write(entry["result"], entry["features"])

    if pool is None:
        for task in tasks:
            take(prepare_clip(task))
    else:
        _run_pool(pool, tasks, take, cfg, fp)
    for entry in encoder.run(final=True):
        write(entry["result"], entry["features"])
    bar.close()
    return written


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


def _run_pool(pool: WorkerPool, tasks, take, cfg: ExtractConfig, fp: dict) -> None:
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


def summary_lines(s: ExtractSummary) -> list[str]:
    lines = [f"extract: {s.cache}: {s.n_clips} clips, {s.n_ok} ok, {s.n_failed} failed "
             f"({s.n_done_now} done in this run, {s.seconds:.1f} s)"]
    if s.n_failed:
        for clip_id, reason in s.failures:
            lines.append(f"  failed {clip_id}: {reason}")
        if s.n_failed > len(s.failures):
            lines.append(f"  ... and {s.n_failed - len(s.failures)} more")
        lines.append(f"the failure list: python cli.py info {s.cache}")
    return lines + list(s.box_lines)
