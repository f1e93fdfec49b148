"""Stage one: annotation files -> a feature store (``python cli.py extract``).

Worker processes decode, detect and crop one clip each (pipeline/workers.py, prepare.py);
the main process encodes the crops of many clips in batches with one CLIP image encoder
(pipeline/encode.py, which says why its features are deterministic) and writes each clip when
all its features are in. Under torchrun every rank does this for its share of the clips, in
the same store. The store's life cycle (lock, creation, compatibility, HDF5 staging) is
cache/lifecycle.py's ``WriteSession``; this module only orchestrates.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cache.core.errors import CaerError, first_line
from cache.core.runtime import Distributed as Dist
from cache.core.runtime import resolve_device, resolve_precision
from cache.fingerprint import make_fingerprint
from cache.layout import ClipRow
from cache.lifecycle import WriteSession
from cache.store import open_store
from cache.writer import StoreWriter
from pipeline.boxes import BoxFile, load_body_boxes, load_face_boxes
from pipeline.config import CHOICES, ExtractConfig
from pipeline.encode import BatchEncoder, stack_views, to_clip_result
from pipeline.prepare import ClipTask, PreparedClip, prepare_clip
from pipeline.workers import run_pool, start_pool

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
    # One writer per store, for the whole run. Under torchrun rank 0 takes the lock once the
    # process group exists, so that a refusal reaches every rank.
    with WriteSession(cfg.cache, wait=cfg.wait, lock=d.world == 1) as session:
        return _extract_locked(cfg, d, session, t_start)


def _extract_locked(cfg: ExtractConfig, d: Dist, session: WriteSession,
                    t_start: float) -> ExtractSummary:
    from pipeline.annotations import read_annotations
    from cache.core.labels import load_label_set

    session.check_writers(d.world)
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
                          context_resize=cfg.context_resize, downscale=cfg.downscale,
                          body_boxes=_body_source(cfg, body_file))

    d.init()
    t_process = t_startup = 0.0
    encoder = BatchEncoder(clip, cfg.batch_size, cfg.normalize, device, precision)
    try:
        outcome = None  # (message, exit status) of a refusal, else whether there is work
        if d.rank == 0:
            try:
                if d.world > 1:
                    session.lock()
                outcome = session.prepare(fp, rows, meta_columns,
                                          retry_failed=cfg.retry_failed,
                                          redo_damaged=cfg.redo_damaged,
                                          progress=not cfg.quiet)
            except Exception as err:  # noqa: BLE001 - the other ranks must hear of it
                if d.world == 1 and not isinstance(err, CaerError):
                    raise
                outcome = (first_line(err), getattr(err, "exit_code", 1))
        outcome = d.share(outcome)
        if isinstance(outcome, tuple):
            raise CaerError(*outcome)
        done_all = 0
        if outcome:
            d.barrier()
            done_all, t_process, t_startup = _run_share(cfg, d, session.writer(), clip,
                                                        encoder, fp, (face_file, body_file),
                                                        device, precision, roots)
            d.barrier()
            if d.rank == 0:
                session.commit()
            d.barrier()
    finally:
        d.close()

    store = open_store(session.path)
    manifest = store.clip_table(["id", "status", "reason"])  # the summary's columns only
    store.close()
    failed = manifest[manifest.status == "failed"]
    boxes = box_lines(session.path, face_file, body_file, matched) if d.rank == 0 else []
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


def _run_share(cfg: ExtractConfig, d: Dist, writer: StoreWriter, clip, encoder: BatchEncoder,
               fp: dict, box_files: tuple, device: str, precision: str,
               roots: dict[str, str]) -> tuple[int, float, float]:
    """This rank's share of the pending clips: returns (clips done by all ranks, seconds
    processing, seconds starting the workers). ``roots`` maps this run's clip ids to their
    root; a pending clip of an earlier run falls back on --root."""
    fallback_root = os.path.abspath(cfg.root) if cfg.root is not None else None
    pending = np.flatnonzero(writer.status == 0)
    mine = pending[d.rank::d.world]
    manifest = writer.clip_table(["id", "path", "label", "split", "listed_frames"])
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
            context_resize=cfg.context_resize, downscale=cfg.downscale,
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
        writer.write_clip(result.index, to_clip_result(result, features, fp))
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
        images = stack_views(result, fp["flip"])
        encoder.add({"result": result, "images": images,
                     "features": np.empty((len(images), fp["feature_dim"]), np.float16)})
        for entry in encoder.run():
            write(entry["result"], entry["features"])

    if pool is None:
        for task in tasks:
            take(prepare_clip(task))
    else:
        run_pool(pool, tasks, take, cfg, fp)
    for entry in encoder.run(final=True):
        write(entry["result"], entry["features"])
    bar.close()
    return written


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
