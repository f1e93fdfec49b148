"""Stage two's training: ``train-head`` (cached features) and ``finetune`` (stored crops, image
encoder unfrozen). One loop for both, litgpt style: setup -> fit -> validate.

Reproducibility is by construction, not by saved generator state: every random draw for a
clip in an epoch (its frames, flip view, rotation and dropout masks) comes from a generator
seeded by (seed, epoch, clip), and the batch order from (seed, epoch). So a run gives the
same weights whatever the number of DataLoader workers, a resumed run replays the epochs it
missed exactly, and a torchrun job with the same global batch equals a single process (up to
the order of float sums in the gradient all-reduce).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cache.atomic import atomic_write, atomic_write_text, output_dir, refuse_symlink
from cache.verify import refuse_pending
from heads.config import FinetuneConfig, TrainConfig
from heads.data import (AUGMENTATIONS, FeatureBank, PixelClips, Splits, clip_generator, clip_seed,
                        split_clips)
from heads.metrics import compute_report
from pipeline.clip import local_cuda_device, resolve_precision
from pipeline.errors import CaerError

log = logging.getLogger("caer")

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
CURVES = "curves.png"
# Options that may change when a run is resumed: they do not change what an epoch computes.
RESUMABLE_CHANGES = ("epochs", "max_steps", "device", "workers", "quiet", "resume", "out",
                     "precision")  # as asked; what it resolved to (resolved_precision) must match


def train_head(config: TrainConfig) -> dict:
    """Train on cached features. Returns the summary (also RUN/summary.json with several seeds)."""
    return _train_seeds(config, "train-head")


def finetune(config: FinetuneConfig) -> dict:
    """Train end to end on the cache's stored crops."""
    return _train_seeds(config, "finetune")


# ============================================================================ seeds

def _train_seeds(config: TrainConfig, kind: str) -> dict:
    _check_options(config, kind)
    owns_group = _world_size() > 1 and not dist.is_initialized()
    _init_distributed(config)
    try:
        _check_out(config)
        if dist.is_initialized():
            dist.barrier()  # every process has checked --out before rank 0 writes to it
        return _fit_seeds(config, kind)
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _fit_seeds(config: TrainConfig, kind: str) -> dict:
    out = Path(config.out)
    if len(config.seeds) == 1:
        return fit(config, kind, config.seeds[0], out)
    results = [fit(config, kind, seed, out / f"seed-{seed}") for seed in config.seeds]
    summary = {"seeds": list(config.seeds), "runs": [str(out / f"seed-{s}") for s in config.seeds]}
    for key in ("val_uar", "val_war", "train_loss"):
        values = [r[key] for r in results if r.get(key) is not None]
        if values:
            summary[key] = {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1))
                            if len(values) > 1 else 0.0, "values": values}
    summary["per_seed"] = results
    if _rank() == 0:
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        for key in ("val_uar", "val_war"):
            if key in summary:
                log.info("%s over seeds %s: %.2f +- %.2f %%", key, ",".join(map(str, config.seeds)),
                         100 * summary[key]["mean"], 100 * summary[key]["std"])
    return summary


def _check_options(config: TrainConfig, kind: str) -> None:
    """Every bad flag is refused here, before anything is read or written."""
    if not config.cache:
        raise CaerError("--cache is required")
    if not config.out:
        raise CaerError("--out is required")
    if config.streams is not None and config.streams not in ("both", "face", "context"):
        raise CaerError(f"--streams {config.streams}: choose both, face or context")
    if config.select not in ("val-uar", "last"):
        raise CaerError(f"--select {config.select}: choose val-uar or last")
    if config.device not in ("auto", "cpu", "cuda"):
        raise CaerError(f"--device {config.device}: choose auto, cpu or cuda")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise CaerError("--device cuda: no CUDA device is available (use --device cpu)")
    for name in ("epochs", "batch_size", "n_ctx", "temporal_layers"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise CaerError(f"--{name.replace('_', '-')} must be at least 1")
    if config.max_steps is not None and config.max_steps < 1:
        raise CaerError("--max-steps must be at least 1")
    if not 0 <= config.val_fraction < 1:
        raise CaerError(f"--val-fraction must be in [0, 1), not {config.val_fraction}")
    if getattr(config, "workers", 0) < 0:
        raise CaerError("--workers must be >= 0")
    if not config.seeds or len(set(config.seeds)) != len(config.seeds):
        raise CaerError("--seeds must list distinct integers, e.g. 42,43,44")
    if list(config.milestones) != sorted(set(config.milestones)) or any(m < 1 for m in config.milestones):
        raise CaerError(f"--milestones must be increasing positive epochs, not {config.milestones}")
    for name in ("lr_temporal", "lr_prompt", "lr_fusion", "momentum", "weight_decay", "gamma"):
        if getattr(config, name) < 0 or not math.isfinite(getattr(config, name)):
            raise CaerError(f"--{name.replace('_', '-')} must be a finite number >= 0")
    if config.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise CaerError(f"--precision {config.precision}: choose auto, fp32, bf16 or fp16")
    if config.precision == "fp16" and not _want_cuda(config):
        raise CaerError("--precision fp16 needs CUDA; on CPU use bf16 or fp32")
    if kind == "finetune":
        if config.accumulate < 1:
            raise CaerError("--accumulate must be at least 1")
        if config.lr_image_encoder < 0:
            raise CaerError("--lr-image-encoder must be >= 0")
        if config.augment not in AUGMENTATIONS:
            raise CaerError(f"--augment {config.augment}: choose one of {', '.join(AUGMENTATIONS)}")
    world = _world_size()
    accumulate = getattr(config, "accumulate", 1)
    if config.batch_size % (world * accumulate):
        raise CaerError(f"--batch-size {config.batch_size} must be divisible by the number of "
                        f"processes ({world}) x --accumulate ({accumulate})")


def _check_out(config: TrainConfig) -> None:
    out = Path(config.out)
    refuse_symlink(out, "--out")
    if out.exists() and not out.is_dir():
        raise CaerError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not config.resume:
        raise CaerError(f"--out {out}: already holds files; pass --resume to continue that run "
                        f"or choose another directory")


# ============================================================================ one run

class _FirstOfEpoch(torch.utils.data.Sampler):
    """The first ``n`` indices of a (Distributed)Sampler's epoch."""

    def __init__(self, sampler, n: int):
        self.sampler, self.n = sampler, n

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.n)

    def __len__(self) -> int:
        return self.n


def _full_batches_only(sampler, n_train: int, batch_size: int, world: int) -> _FirstOfEpoch:
    """--drop-last: keep the epoch's full global batches. Rank r's i-th index is position
    r + i * world of the epoch's one permutation, so each rank keeping its first
    steps * batch_size / world indices keeps exactly the first steps global batches."""
    steps = n_train // batch_size
    if steps == 0:
        raise CaerError(f"--drop-last: {n_train} training clips are fewer than --batch-size "
                        f"{batch_size}, so every batch would be dropped")
    return _FirstOfEpoch(sampler, steps * batch_size // world)


@dataclass
class State:
    """What a checkpoint records besides tensors; JSON-serialisable."""

    epoch: int = 0  # finished epochs
    step: int = 0  # optimizer steps taken
    best_epoch: int | None = None
    best_val_uar: float | None = None
    finished: bool = False


def fit(config: TrainConfig, kind: str, seed: int, run_dir: Path) -> dict:
    """setup -> (train one epoch -> validate -> checkpoint) x epochs -> save the run."""
    # ---- setup ------------------------------------------------------------------------------
    from cache import describe_mismatch, fingerprint_mismatch, open_store

    rank, world = _init_distributed(config)
    device = _device(config)
    store = open_store(config.cache)
    fingerprint = store.fingerprint
    ckpt_dir = run_dir / CHECKPOINTS
    pixels = kind == "finetune"
    if pixels and not fingerprint.get("pixels"):
        raise CaerError(f"--cache {config.cache} holds no stored crops: finetune re-encodes "
                        f"them; build the cache with `python cli.py extract ... --pixels`")
    manifest = store.manifest
    refuse_pending(store, np.flatnonzero(manifest["split"].astype(str).str.lower()
                                         .isin(["train", "val"]).to_numpy()),
                   "train and val", config.allow_pending)
    splits = split_clips(manifest, config.val_fraction, config.val_seed)
    if config.select == "val-uar" and len(splits.val) == 0:
        raise CaerError("--select val-uar needs validation clips: set --val-fraction > 0, add a "
                        "val split to the cache, or use --select last")

    torch.manual_seed(seed)  # the head's initialisation
    model = _build_model(config, kind, store)
    precision = resolve_precision(config.precision, device.type)
    options = _options(config, seed)
    options.update(n_ctx=model.config.n_ctx, temporal_layers=model.config.temporal_layers,
                   streams=model.config.streams,  # finetune may take them from --init
                   resolved_precision=precision)  # what --resume must match, not "auto"
    checkpoint = _read_checkpoint(ckpt_dir) if config.resume else None
    if checkpoint is not None:
        old = checkpoint["cache_fingerprint"]
        keys = fingerprint_mismatch(old, fingerprint)
        if keys:
            raise CaerError(f"--resume: the cache differs from the one {run_dir} was trained on: "
                            f"{describe_mismatch(old, fingerprint, keys)}")
        # An option added after the run was made counts as its default there; train-head
        # ran in fp32 before it had --precision.
        recorded = {**_options(type(config)(), seed),
                    "resolved_precision": "fp32" if kind == "train-head" else precision,
                    **checkpoint["options"]}
        changed = [k for k in options if k not in RESUMABLE_CHANGES
                   and json.dumps(options[k]) != json.dumps(recorded.get(k))]
        if changed:
            raise CaerError("--resume: options differ from the run's: " + "; ".join(
                f"--{k.replace('_', '-').replace('resolved-', '')} (run {recorded.get(k)}, "
                f"now {options[k]})"
                for k in changed))
    if rank == 0:
        log.info("%s seed %d -> %s: %s", kind, seed, run_dir, splits.describe())
        log.info("precision %s: %s", precision, precision_reason(config.precision, precision, device))

    groups = model.param_groups(config.lr_temporal, config.lr_prompt, config.lr_fusion,
                                config.lr_image_encoder if pixels else None)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    use_sample_dropout(model)
    if pixels and config.grad_checkpointing:
        enable_grad_checkpointing(model)
    model.to(device)
    optimizer = torch.optim.SGD(groups, lr=config.lr_temporal, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(config.milestones),
                                                     config.gamma)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    state = State()
    if checkpoint is not None:
        state = _restore(checkpoint, model, trainable, optimizer, scheduler, scaler)
        if rank == 0:
            log.info("resuming %s after epoch %d (step %d)", run_dir, state.epoch, state.step)
    elif rank == 0 and run_dir.exists() and config.resume:
        log.info("--resume: %s has no finished epoch yet; starting from epoch 1", run_dir)

    step_model = StepModel(model, pixels)
    if world > 1:
        step_model = nn.parallel.DistributedDataParallel(
            step_model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=False)

    if pixels:
        train_data = PixelClips(config.cache, splits.train,
                                store.manifest["label"].to_numpy()[splits.train], train=True,
                                seed=seed, candidates=int(fingerprint["candidates"]),
                                augment=config.augment)
        bank = None
    else:
        bank = FeatureBank(store, np.concatenate([splits.train, splits.val]), with_flip=True)
        train_data = range(len(splits.train))  # positions in the bank
    sampler = torch.utils.data.DistributedSampler(train_data, num_replicas=world, rank=rank,
                                                  shuffle=True, seed=seed, drop_last=False)
    if config.drop_last:
        sampler = _full_batches_only(sampler, len(splits.train), config.batch_size, world)
    micro_batch = config.batch_size // (world * getattr(config, "accumulate", 1))

    if rank == 0:
        output_dir(run_dir, "run directory")
        _trim_metrics(run_dir / METRICS, state.epoch)
        if ckpt_dir.is_dir():
            output_dir(ckpt_dir, "checkpoint directory")
            for partial_write in ckpt_dir.glob(".*.tmp"):  # cache.atomic's, left by a kill
                if partial_write.is_file() and not partial_write.is_symlink():
                    partial_write.unlink()
    history = _read_metrics(run_dir / METRICS)

    # ---- fit --------------------------------------------------------------------------------
    stopped = False
    for epoch in range(state.epoch, config.epochs):
        if config.max_steps is not None and state.step >= config.max_steps:
            stopped = True
            break
        started = time.perf_counter()
        # Nothing below should draw from the global generator; reseeding it per epoch makes
        # a resumed run exact even if something (a library) does.
        torch.manual_seed(clip_seed(seed, epoch, -1, "global"))
        sampler.set_epoch(epoch)
        if pixels:
            train_data.set_epoch(epoch)
            loader = torch.utils.data.DataLoader(
                train_data, batch_size=micro_batch, sampler=sampler,
                num_workers=config.workers,
                persistent_workers=False, pin_memory=device.type == "cuda")
        else:
            order = list(sampler)
            loader = (_feature_batch(bank, order[i:i + micro_batch], seed, epoch)
                      for i in range(0, len(order), micro_batch))
        lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
        train = _train_epoch(step_model, model, loader, optimizer, scaler, config, seed, epoch,
                             state, device, precision, rank, world,
                             n_steps=math.ceil(len(sampler) / micro_batch
                                               / getattr(config, "accumulate", 1)))
        scheduler.step()
        partial = train["partial"]

        val = {}
        if rank == 0 and len(splits.val):
            val = _validate(model, store, bank, splits, pixels, device, precision, config)
        seconds = time.perf_counter() - started
        record = {"epoch": epoch + 1, "step": state.step, "train_loss": train["loss"],
                  "train_uar": train["uar"], "train_war": train["war"],
                  "val_uar": val.get("uar"), "val_war": val.get("war"), "val_loss": val.get("loss"),
                  "lr": lrs, "seconds": round(seconds, 3)}
        if partial:
            record["partial"] = True  # stopped by --max-steps inside this epoch
        history.append(record)
        if not partial:
            state.epoch = epoch + 1
            state.finished = state.epoch == config.epochs
        if rank == 0:
            _log_epoch(record, config.epochs)
            _write_metrics(run_dir / METRICS, history)  # history ends with this record
            improved = val.get("uar") is not None and (state.best_val_uar is None
                                                       or val["uar"] > state.best_val_uar)
            if improved:
                state.best_epoch, state.best_val_uar = epoch + 1, val["uar"]
                _save_weights(ckpt_dir, "best", trainable, {"epoch": epoch + 1, "partial": partial,
                                                            "val_uar": val["uar"]})
            if not partial:
                _save_checkpoint(ckpt_dir, trainable, optimizer, scheduler, scaler, state,
                                 options, fingerprint)
        if world > 1:
            dist.barrier()
        if partial:
            stopped = True
            break

    # ---- save the run -----------------------------------------------------------------------
    result = {"run": str(run_dir), "seed": seed, "epochs_done": state.epoch, "steps": state.step,
              "stopped_by_max_steps": stopped, "select": config.select,
              "best_epoch": state.best_epoch, "n_failed_skipped": splits.n_failed,
              "n_pending_skipped": splits.n_pending,
              "splits": {"train": len(splits.train), "val": len(splits.val),
                         "test": len(splits.test), "val_source": splits.val_source}}
    last = history[-1] if history else {}
    result.update(train_loss=last.get("train_loss"), last_val_uar=last.get("val_uar"))
    if rank == 0:
        if config.select == "val-uar" and state.best_epoch is not None:
            best = _read_json(ckpt_dir / "best.json")
            _load_weights(ckpt_dir / best["weights"], trainable)
            chosen = next(h for h in history if h["epoch"] == state.best_epoch and
                          h.get("val_uar") == state.best_val_uar)
        else:
            chosen = last
        result.update(val_uar=chosen.get("val_uar"), val_war=chosen.get("val_war"),
                      selected_epoch=chosen.get("epoch"))
        from heads.run import save_run

        _plot_curves(history, run_dir / CURVES)  # once: a figure per epoch costs more than an epoch
        model.to("cpu")
        save_run(run_dir, model, kind=kind, train_options=options, cache_fingerprint=fingerprint,
                 extra=result, save_clip=True if pixels else None)
        log.info("saved %s (epoch %s weights%s)", run_dir, result["selected_epoch"],
                 f", val UAR {100 * result['val_uar']:.2f} %" if result["val_uar"] is not None else "")
    if world > 1:
        dist.barrier()
    store.close()
    return result


def _one_line_worker_errors(batches):
    """A CaerError raised in a DataLoader worker (a damaged chunk of a stored crop) comes
    back wrapped in the worker's traceback text; re-raise it as its own one line."""
    try:
        yield from batches
    except CaerError as err:
        text = str(err).strip()
        if "Original Traceback" not in text:
            raise
        last = text.splitlines()[-1]
        raise type(err)(last.split(": ", 1)[1] if ": " in last else last) from None


def _train_epoch(step_model, model, loader, optimizer, scaler, config, seed, epoch, state,
                 device, precision, rank, world, n_steps) -> dict:
    """One pass over the train split. A step takes ``accumulate`` micro-batches per process;
    each micro-batch's summed loss is divided by the clips this process sees in the step, and
    DDP averages over processes: the gradient is the mean over the global batch."""
    from tqdm import tqdm

    step_model.train()
    accumulate = getattr(config, "accumulate", 1)
    loss_sum, labels, predictions, partial = 0.0, [], [], False
    bar = tqdm(total=n_steps, desc=f"epoch {epoch + 1}/{config.epochs}", unit="step",
               disable=config.quiet or rank != 0, leave=False)
    batches = _one_line_worker_errors(iter(loader))
    while True:
        if config.max_steps is not None and state.step >= config.max_steps:
            partial = next(batches, None) is not None
            break
        micro = [b for _, b in zip(range(accumulate), batches)]
        if not micro:
            break
        clips_here = sum(len(b[2]) for b in micro)
        for i, (face, context, y, rows) in enumerate(micro):
            face, context, y = (t.to(device, non_blocking=True) for t in (face, context, y))
            sync = i == len(micro) - 1 or not isinstance(step_model, nn.parallel.DistributedDataParallel)
            with nullcontext() if sync else step_model.no_sync():
                with autocast_for(device, precision), sample_dropout(model, seed, epoch, rows):
                    logits = step_model(face, context)
                    loss = F.cross_entropy(logits.float(), y, reduction="sum")
                scaler.scale(loss / clips_here).backward()
            loss_sum += float(loss.detach())
            labels.append(y.cpu())
            predictions.append(logits.detach().argmax(-1).cpu())
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        bar.update(1)
        if world == 1 and not math.isfinite(loss_sum):  # with more, all ranks check together
            _non_finite(loss_sum, epoch)
    bar.close()
    y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    p = torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long)
    total = torch.tensor([loss_sum, float(len(y))], dtype=torch.float64)
    if world > 1:  # metrics over the whole epoch, from every process
        gathered = [None] * world
        dist.all_gather_object(gathered, (y, p))
        y, p = torch.cat([g[0] for g in gathered]), torch.cat([g[1] for g in gathered])
        total = total.to(device)  # NCCL reduces CUDA tensors only
        dist.all_reduce(total)
        total = total.cpu()
        if not math.isfinite(float(total[0])):
            _non_finite(float(total[0]), epoch)
    uar, war = uar_war(y.numpy(), p.numpy(), model.labels.names)
    return {"loss": float(total[0] / max(total[1], 1)), "uar": uar, "war": war, "partial": partial}


def _non_finite(loss: float, epoch: int):
    raise CaerError(f"the training loss became {loss} in epoch {epoch + 1}; lower the learning "
                    f"rates or use --precision fp32")


@torch.no_grad()
def _validate(model, store, bank, splits: Splits, pixels, device, precision, config) -> dict:
    """Val split only (the test split is never read): middle frame, no flip, dropout off."""
    model.eval()
    if pixels:
        from heads.evaluate import predict_rows

        with autocast_for(device, precision):
            probs = torch.from_numpy(predict_rows(model, store, splits.val, pixels=True,
                                                  batch_size=config.batch_size, device=device,
                                                  progress=not config.quiet))
        y = torch.as_tensor(store.manifest["label"].to_numpy()[splits.val])
        log_probs = probs.clamp_min(1e-12).log()
    else:
        positions = torch.arange(len(splits.train), len(splits.train) + len(splits.val))
        chunks, labels = [], []
        for i in range(0, len(positions), 256):
            face, context, y = bank.batch(positions[i:i + 256], train=False)
            chunks.append(model(face.to(device), context.to(device)).float().log_softmax(-1).cpu())
            labels.append(y)
        log_probs, y = torch.cat(chunks), torch.cat(labels)
    if not torch.isfinite(log_probs).all():
        raise CaerError("non-finite validation outputs; the model diverged (lower the lrs)")
    uar, war = uar_war(y.numpy(), log_probs.argmax(-1).numpy(), model.labels.names)
    return {"uar": uar, "war": war, "loss": float(F.nll_loss(log_probs, y))}


def uar_war(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> tuple[float | None, float | None]:
    """UAR and WAR as ``evaluate`` reports them, without its absent-class warning per epoch."""
    report = compute_report(y_true, y_pred, classes, warn=False)
    return report.uar, report.war


def _feature_batch(bank: FeatureBank, positions, seed: int, epoch: int):
    face, context, y = bank.batch(positions, train=True, seed=seed, epoch=epoch)
    return face, context, y, [int(bank.rows[p]) for p in positions]


class StepModel(nn.Module):
    """What DDP wraps: one forward from a batch to logits, from features or from pixels."""

    def __init__(self, model, pixels: bool):
        super().__init__()
        self.model, self.pixels = model, pixels

    def forward(self, face, context):
        if self.pixels:
            return self.model.forward_pixels(face, context)
        return self.model.forward_features(face, context)


# ============================================================================ per-clip dropout

class SampleDropout(nn.Dropout):
    """Dropout whose mask for each clip comes from that clip's generator.

    With nn.Dropout the mask of clip i depends on where i sits in the batch and on which
    process holds it; here it depends only on (seed, epoch, clip), so a 2-process run and a
    single process draw the same masks. Outside ``sample_dropout`` it is plain dropout.
    """

    generators: list[torch.Generator] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or self.generators is None:
            return super().forward(x)
        if len(self.generators) != x.shape[0]:
            raise RuntimeError(f"{len(self.generators)} generators for a batch of {x.shape[0]}")
        keep = torch.stack([torch.rand(x.shape[1:], generator=g) >= self.p
                            for g in self.generators]).to(x.device)
        return x * keep / (1 - self.p)


def use_sample_dropout(model: nn.Module) -> None:
    """Replace every active nn.Dropout in ``model`` with a SampleDropout."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout and child.p > 0:
                setattr(parent, name, SampleDropout(child.p))


@contextmanager
def sample_dropout(model: nn.Module, seed: int, epoch: int, rows):
    modules = [m for m in model.modules() if isinstance(m, SampleDropout)]
    generators = [clip_generator(seed, epoch, int(r), "dropout") for r in rows]
    for m in modules:
        m.generators = generators  # consumed in forward order, the same for every clip
    try:
        yield
    finally:
        for m in modules:
            m.generators = None


# ============================================================================ model, device

def _build_model(config: TrainConfig, kind: str, store):
    from heads.model import CaerModel, HeadConfig
    from pipeline.clip import load_clip

    fp = store.fingerprint
    init = getattr(config, "init", "none")
    if kind == "finetune" and init not in ("none", "", None):
        from heads.run import load_run, read_run_config

        run_config = read_run_config(init)
        model = load_run(init)
        if list(model.labels.names) != list(store.labels.names):
            raise CaerError(f"--init {init} predicts {', '.join(model.labels.names)} but the "
                            f"cache is labelled {', '.join(store.labels.names)}")
        for name, value in (("n_ctx", model.config.n_ctx),
                            ("temporal_layers", model.config.temporal_layers),
                            ("streams", model.config.streams)):
            if getattr(config, name) is not None and getattr(config, name) != value:
                raise CaerError(f"--{name.replace('_', '-')} {getattr(config, name)} differs from "
                                f"the --init run's {value}; drop the option or pass {value}")
        if model.config.segments != fp["segments"]:
            raise CaerError(f"--init {init} was trained with {model.config.segments} segments, "
                            f"the cache has {fp['segments']}")
        if run_config.get("kind") == "train-head" and model.clip_revision != fp["clip_revision"]:
            log.warning("--init %s was trained on features of another CLIP (%s) than the "
                        "cache's (%s); fine-tuning the run's CLIP", init, model.clip_spec,
                        fp["clip_spec"])
        return model
    clip = load_clip(fp["clip_spec"])
    if clip.revision != fp["clip_revision"]:
        raise CaerError(f"the cache was built with CLIP {fp['clip_spec']} revision "
                        f"{fp['clip_revision']}, but it now loads as revision {clip.revision}: "
                        f"its text tower would not match the features; extract the cache again")
    default = HeadConfig()
    head = HeadConfig(feature_dim=int(fp["feature_dim"]), segments=int(fp["segments"]),
                      n_ctx=config.n_ctx or default.n_ctx,
                      temporal_layers=config.temporal_layers or default.temporal_layers,
                      streams=config.streams or default.streams)
    return CaerModel(head, clip, store.labels, normalize=fp.get("normalize", "clip"))


def enable_grad_checkpointing(model) -> None:
    """Checkpoint each layer of the CLIP image encoder (transformers' own mechanism)."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    for layer in model.clip.vision_model.encoder.layers:
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)


def precision_reason(requested: str, precision: str, device: torch.device) -> str:
    """Why ``resolve_precision`` chose ``precision``, for the log."""
    if requested != "auto":
        return f"--precision {requested}"
    if device.type == "cuda":
        return ("--precision auto on a GPU with bf16" if precision == "bf16" else
                "--precision auto on a GPU without native bf16")
    return ("--precision auto on a CPU with native bf16 (AVX512-BF16 or AMX)" if precision == "bf16"
            else "--precision auto on a CPU without native bf16 (emulated bf16 is slower than fp32)")


def _want_cuda(config) -> bool:
    return config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())


def _device(config) -> torch.device:
    if not _want_cuda(config):
        return torch.device("cpu")
    return local_cuda_device()


def autocast_for(device: torch.device, precision: str):
    """The autocast of a training or validation step at a resolved precision."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _init_distributed(config) -> tuple[int, int]:
    """(rank, world size); under torchrun joins the process group (nccl on CUDA, else gloo)."""
    world = _world_size()
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        cuda = _want_cuda(config)
        if cuda:
            torch.cuda.set_device(local_cuda_device())
        # Rank 0 validates and saves while the others wait at a barrier: allow it an hour.
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=1))
    return dist.get_rank(), dist.get_world_size()


# ============================================================================ checkpoints

def _options(config: TrainConfig, seed: int) -> dict:
    import typing

    hints = typing.get_type_hints(type(config))
    # float fields as floats, so that --val-fraction 0 and 0.0 compare equal on --resume
    options = {f.name: float(getattr(config, f.name)) if hints[f.name] is float
               else getattr(config, f.name) for f in fields(config)}
    options.update(milestones=list(config.milestones), seeds=list(config.seeds), seed=seed)
    return options


def _save_weights(directory: Path, name: str, trainable: dict, info: dict,
                  extra_tensors: dict | None = None) -> None:
    """``name.safetensors`` + ``name.json``; the JSON names the weights file and is written
    last, so a kill leaves either the old or the new checkpoint, never a mix."""
    from safetensors.torch import save_file

    output_dir(directory, "checkpoint directory")
    tag = f"{name}-{info['epoch']:04d}{'p' if info.get('partial') else ''}"
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in trainable.items()}
    tensors.update(extra_tensors or {})
    atomic_write(directory / f"{tag}.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    old = _read_json(directory / f"{name}.json")
    _write_json(directory / f"{name}.json", {**info, "weights": f"{tag}.safetensors"})
    if old and old.get("weights") != f"{tag}.safetensors":
        (directory / old["weights"]).unlink(missing_ok=True)


def _save_checkpoint(directory: Path, trainable: dict, optimizer, scheduler, scaler,
                     state: State, options: dict, fingerprint: dict) -> None:
    momentum = {}
    names = {id(p): n for n, p in trainable.items()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                momentum[f"momentum.{names[id(p)]}"] = buf.detach().cpu().contiguous()
    sched = scheduler.state_dict()
    sched["milestones"] = {str(k): v for k, v in sched["milestones"].items()}
    _save_weights(directory, "last", trainable, {
        **asdict(state), "scheduler": sched, "grad_scaler": scaler.state_dict(),
        "options": options, "cache_fingerprint": fingerprint,
        "rng": "none saved: every draw is seeded by (seed, epoch, clip)"}, momentum)


def _read_checkpoint(directory: Path) -> dict | None:
    """last.json and its tensors for --resume, every file checked (heads/run_checks.py): a
    torn or edited file is refused with what to do, before anything is trained or written."""
    from heads.run_checks import (check_checkpoint_info, check_finite, load_safetensors,
                                  read_json)

    advice = (f"resume cannot continue from it: delete {directory} and run the same command "
              f"(with --resume) to train this run again from epoch 1, or restore the file")
    tensors = None
    for name in ("last", "best"):  # best's weights are loaded after the last epoch
        path = directory / f"{name}.json"
        if not path.is_file():
            continue
        info = read_json(path, "the checkpoint record", advice)
        check_checkpoint_info(info, path, name, advice)
        weights = load_safetensors(directory / info["weights"],
                                   "the checkpoint's weights file", advice)
        check_finite(weights, directory / info["weights"], advice)
        if name == "last":
            tensors, last = weights, info
    if tensors is None:
        return None
    last["tensors"] = tensors
    return last


def _restore(checkpoint: dict, model, trainable: dict, optimizer, scheduler, scaler) -> State:
    tensors = checkpoint["tensors"]
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    if set(weights) != set(trainable):
        raise CaerError("--resume: the checkpoint's weights do not match this model "
                        f"({len(set(weights) ^ set(trainable))} names differ)")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(weights[name])
    by_name = {id(p): n for n, p in trainable.items()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            buf = tensors.get(f"momentum.{by_name[id(p)]}")
            if buf is not None:
                optimizer.state[p]["momentum_buffer"] = buf.to(p.device, p.dtype, copy=True)
    from collections import Counter

    sched = dict(checkpoint["scheduler"])
    sched["milestones"] = Counter({int(k): v for k, v in sched["milestones"].items()})
    scheduler.load_state_dict(sched)
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
    if checkpoint.get("grad_scaler"):
        scaler.load_state_dict(checkpoint["grad_scaler"])
    return State(**{f.name: checkpoint[f.name] for f in fields(State)})


def _load_weights(path: Path, trainable: dict) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(tensors[f"model.{name}"])


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def _write_metrics(path: Path, records: list[dict]) -> None:
    # Rewritten whole (a few lines per epoch), so that a link planted there is replaced.
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


# ============================================================================ metrics, curves

def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _trim_metrics(path: Path, finished_epochs: int) -> None:
    """Drop lines of epochs after the checkpoint (a kill between log and checkpoint)."""
    kept = [r for r in _read_metrics(path) if r["epoch"] <= finished_epochs and not r.get("partial")]
    if path.is_file() or kept:
        _write_metrics(path, kept)


def _log_epoch(record: dict, epochs: int) -> None:
    pct = lambda v: "  -  " if v is None else f"{100 * v:5.1f}"  # noqa: E731
    log.info("epoch %2d/%d  loss %.4f  train UAR %s WAR %s  val UAR %s WAR %s  %.1f s%s",
             record["epoch"], epochs, record["train_loss"], pct(record["train_uar"]),
             pct(record["train_war"]), pct(record["val_uar"]), pct(record["val_war"]),
             record["seconds"], "  (stopped by --max-steps)" if record.get("partial") else "")


def _plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    if any(h.get("val_loss") is not None for h in history):
        ax_loss.plot(epochs, [h.get("val_loss") for h in history], "o-", label="val")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_loss.legend()
    for key, style in (("train_uar", "o--"), ("val_uar", "o-"), ("val_war", "s-")):
        values = [h.get(key) for h in history]
        if any(v is not None for v in values):
            ax_metric.plot(epochs, [np.nan if v is None else 100 * v for v in values], style,
                           label=key.replace("_", " ").upper().replace("TRAIN", "train")
                           .replace("VAL", "val"))
    ax_metric.set(xlabel="epoch", ylabel="%", title="recall", ylim=(0, 100))
    ax_metric.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


# ============================================================================ for evaluate

def predict_cache(model, store, split: str, *, pixels: bool | None = None, batch_size: int = 64,
                  device: str | torch.device = "cpu", progress: bool = False):
    """``(ids, y_true, probs)`` of a split's usable clips (middle frame, no flip).

    ``pixels`` (default: whether the model's image encoder was fine-tuned; pass True for a
    finetune run) re-encodes the stored crops, refused without them; otherwise cached
    features are read, which must come from the model's CLIP."""
    from heads.evaluate import predict_rows

    manifest = store.manifest
    rows = np.flatnonzero((manifest["split"] == split).to_numpy()
                          & (manifest["status"] == "ok").to_numpy())
    pixels = bool(model.image_encoder_trained) if pixels is None else pixels
    if pixels and not store.fingerprint.get("pixels"):
        raise CaerError(f"{store.path}: this run fine-tuned the image encoder, so it needs the "
                        f"stored crops; extract the cache with --pixels")
    if not pixels and store.fingerprint.get("clip_revision") != model.clip_revision:
        raise CaerError(f"{store.path}: features from CLIP {store.fingerprint.get('clip_spec')} "
                        f"({store.fingerprint.get('clip_revision')}) but the run uses "
                        f"{model.clip_spec} ({model.clip_revision})")
    model.eval()
    probs = predict_rows(model, store, rows, pixels=pixels, batch_size=batch_size,
                         device=device, progress=progress)
    return (manifest["id"].to_numpy()[rows], manifest["label"].to_numpy()[rows], probs)
