"""Stage two's training: ``train-head`` (cached features) and ``finetune`` (stored crops, image
encoder unfrozen). One loop for both, litgpt style: setup -> fit -> validate; the recipe is
the config's type (heads/config.py), its inputs heads/inputs.py, a step heads/step.py,
checkpoints and --resume heads/checkpoints.py, metrics and curves heads/history.py.

Reproducibility is by construction, not by saved generator state: every random draw for a
clip in an epoch (its frames, flip view, rotation and dropout masks) comes from a generator
seeded by (seed, epoch, clip), and the batch order from (seed, epoch). So a run gives the
same weights whatever the number of DataLoader workers, a resumed run replays the epochs it
missed exactly, and a torchrun job with the same global batch equals a single process (up to
the order of float sums in the gradient all-reduce).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cache.atomic import output_dir
from cache.core.errors import CaerError
from cache.core.runtime import Distributed, resolve_device, resolve_precision
from heads import checkpoints, history
from heads.checkpoints import CHECKPOINTS, State
from heads.config import FinetuneConfig, TrainConfig
from heads.data import Splits, clip_seed, split_clips
from heads.inputs import TrainingInputs, epoch_sampler, training_inputs
from heads.recipe import build_model
from heads.step import (StepModel, enable_grad_checkpointing, precision_reason, train_epoch,
                        uar_war, use_sample_dropout)

log = logging.getLogger("caer")


def train_head(config: TrainConfig) -> dict:
    """Train on cached features. Returns the summary (also RUN/summary.json with several seeds)."""
    return train(config)


def finetune(config: FinetuneConfig) -> dict:
    """Train end to end on the cache's stored crops."""
    return train(config)


def train(config: TrainConfig) -> dict:
    """Every seed of ``config``'s recipe, under torchrun on every rank."""
    config.validate()
    d = Distributed.from_env()
    owns_group = d.world > 1 and not dist.is_initialized()
    # Rank 0 validates and saves while the others wait at a barrier: allow it an hour.
    d.init(cuda=resolve_device(config.device).type == "cuda", timeout=timedelta(hours=1))
    try:
        checkpoints.check_out(config)
        d.barrier()  # every process has checked --out before rank 0 writes to it
        return _fit_seeds(config, d)
    finally:
        if owns_group:
            d.close()


def _fit_seeds(config: TrainConfig, d: Distributed) -> dict:
    out = Path(config.out)
    if len(config.seeds) == 1:
        return fit(config, config.seeds[0], out)
    results = [fit(config, seed, out / f"seed-{seed}") for seed in config.seeds]
    summary = history.seeds_summary(config.seeds, out, results)
    if d.rank == 0:
        history.write_seeds_summary(out, summary)
    return summary


# ============================================================================ one run

@dataclass
class Training:
    """Everything one seed's run holds between setup and the saved run."""

    config: TrainConfig
    seed: int
    run_dir: Path
    rank: int
    world: int
    device: torch.device
    precision: str
    store: object
    splits: Splits
    model: nn.Module
    options: dict  # what config.json and last.json record
    trainable: dict
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    state: State
    step_model: nn.Module
    inputs: TrainingInputs
    sampler: object
    micro_batch: int
    history: list

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / CHECKPOINTS


def fit(config: TrainConfig, seed: int, run_dir: Path) -> dict:
    """setup -> (train one epoch -> validate -> checkpoint) x epochs -> save the run."""
    run = setup(config, seed, run_dir)
    stopped = False
    for epoch in range(run.state.epoch, config.epochs):
        if config.max_steps is not None and run.state.step >= config.max_steps:
            stopped = True
            break
        partial = _epoch(run, epoch)
        if partial:
            stopped = True
            break
    result = _save(run, stopped)
    run.store.close()
    return result


def setup(config: TrainConfig, seed: int, run_dir: Path) -> Training:
    """Open the cache, build the model, optimizer and inputs, and restore --resume's state."""
    from cache import open_store

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = resolve_device(config.device)
    store = open_store(config.cache)
    fingerprint = store.fingerprint
    if config.reencodes_crops and not fingerprint.get("pixels"):
        raise CaerError(f"--cache {config.cache} holds no stored crops: finetune re-encodes "
                        f"them; build the cache with `python cli.py extract ... --pixels`")
    from cache.verify import refuse_pending

    # What training needs; the other per-clip columns cost a chunk file a clip to read.
    manifest = store.clip_table(["label", "split", "status"])
    refuse_pending(store, np.flatnonzero(manifest["split"].astype(str).str.lower()
                                         .isin(["train", "val"]).to_numpy()),
                   "train and val", config.allow_pending)
    splits = split_clips(manifest, config.val_fraction, config.val_seed)
    if config.select == "val-uar" and len(splits.val) == 0:
        raise CaerError("--select val-uar needs validation clips: set --val-fraction > 0, add a "
                        "val split to the cache, or use --select last")

    torch.manual_seed(seed)  # the head's initialisation
    model = build_model(config, store)
    precision = resolve_precision(config.precision, device.type)
    options = checkpoints.recorded_options(config, seed)
    options.update(n_ctx=model.config.n_ctx, temporal_layers=model.config.temporal_layers,
                   streams=model.config.streams,  # finetune may take them from --init
                   resolved_precision=precision)  # what --resume must match, not "auto"
    checkpoint = checkpoints.read_checkpoint(run_dir / CHECKPOINTS) if config.resume else None
    if checkpoint is not None:
        checkpoints.check_resumable(checkpoint, config, seed, options, fingerprint, precision,
                                    run_dir)
    if rank == 0:
        log.info("%s seed %d -> %s: %s", config.kind, seed, run_dir, splits.describe())
        log.info("precision %s: %s", precision, precision_reason(config.precision, precision, device))

    groups = model.param_groups(config.lr_temporal, config.lr_prompt, config.lr_fusion,
                                config.image_encoder_lr)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    use_sample_dropout(model)
    if config.reencodes_crops and config.grad_checkpointing:
        enable_grad_checkpointing(model)
    model.to(device)
    optimizer = torch.optim.SGD(groups, lr=config.lr_temporal, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(config.milestones),
                                                     config.gamma)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    state = State()
    if checkpoint is not None:
        state = checkpoints.restore(checkpoint, model, trainable, optimizer, scheduler, scaler)
        if rank == 0:
            log.info("resuming %s after epoch %d (step %d)", run_dir, state.epoch, state.step)
    elif rank == 0 and run_dir.exists() and config.resume:
        log.info("--resume: %s has no finished epoch yet; starting from epoch 1", run_dir)

    step_model = StepModel(model, config.reencodes_crops)
    if world > 1:
        step_model = nn.parallel.DistributedDataParallel(
            step_model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=False)
    inputs = training_inputs(config, store, splits, seed)
    sampler = epoch_sampler(inputs, config, len(splits.train), world, rank, seed)
    micro_batch = config.batch_size // (world * config.micro_batches)

    if rank == 0:
        output_dir(run_dir, "run directory")
        history.trim_metrics(run_dir / history.METRICS, state.epoch)
        checkpoints.remove_partial_writes(run_dir / CHECKPOINTS)
    return Training(config, seed, run_dir, rank, world, device, precision, store, splits, model,
                    options, trainable, optimizer, scheduler, scaler, state, step_model, inputs,
                    sampler, micro_batch, history.read_metrics(run_dir / history.METRICS))


def _epoch(run: Training, epoch: int) -> bool:
    """Train one epoch, validate, log and checkpoint; True when --max-steps stopped it."""
    config, state = run.config, run.state
    started = time.perf_counter()
    # Nothing below should draw from the global generator; reseeding it per epoch makes
    # a resumed run exact even if something (a library) does.
    torch.manual_seed(clip_seed(run.seed, epoch, -1, "global"))
    run.sampler.set_epoch(epoch)
    loader = run.inputs.batches(run.sampler, run.micro_batch, epoch,
                                config.workers if config.reencodes_crops else 0, run.device)
    lrs = {g["name"]: g["lr"] for g in run.optimizer.param_groups}
    train = train_epoch(run.step_model, run.model, loader, run.optimizer, run.scaler, config,
                        run.seed, epoch, state, run.device, run.precision, run.rank, run.world,
                        n_steps=math.ceil(len(run.sampler) / run.micro_batch / config.micro_batches))
    run.scheduler.step()
    partial = train["partial"]

    val = {}
    if run.rank == 0 and len(run.splits.val):
        val = validate(run)
    seconds = time.perf_counter() - started
    record = {"epoch": epoch + 1, "step": state.step, "train_loss": train["loss"],
              "train_uar": train["uar"], "train_war": train["war"],
              "val_uar": val.get("uar"), "val_war": val.get("war"), "val_loss": val.get("loss"),
              "lr": lrs, "seconds": round(seconds, 3)}
    if partial:
        record["partial"] = True  # stopped by --max-steps inside this epoch
    run.history.append(record)
    if not partial:
        state.epoch = epoch + 1
        state.finished = state.epoch == config.epochs
    if run.rank == 0:
        history.log_epoch(record, config.epochs)
        history.write_metrics(run.run_dir / history.METRICS, run.history)  # ends with record
        improved = val.get("uar") is not None and (state.best_val_uar is None
                                                   or val["uar"] > state.best_val_uar)
        if improved:
            state.best_epoch, state.best_val_uar = epoch + 1, val["uar"]
            checkpoints.save_weights(run.checkpoint_dir, "best", run.trainable,
                                     {"epoch": epoch + 1, "partial": partial, "val_uar": val["uar"]})
        if not partial:
            checkpoints.save_checkpoint(run.checkpoint_dir, run.trainable, run.optimizer,
                                        run.scheduler, run.scaler, state, run.options,
                                        run.store.fingerprint)
    if run.world > 1:
        dist.barrier()
    return partial


@torch.no_grad()
def validate(run: Training) -> dict:
    """Val split only (the test split is never read): middle frame, no flip, dropout off."""
    run.model.eval()
    log_probs, y = run.inputs.val_log_probs(run.model, run.device, run.precision, run.config)
    if not torch.isfinite(log_probs).all():
        raise CaerError("non-finite validation outputs; the model diverged (lower the lrs)")
    uar, war = uar_war(y.numpy(), log_probs.argmax(-1).numpy(), run.model.labels.names)
    return {"uar": uar, "war": war, "loss": float(F.nll_loss(log_probs, y))}


def _save(run: Training, stopped: bool) -> dict:
    """The selected epoch's weights as the run directory (rank 0); the summary for all."""
    config, state, splits = run.config, run.state, run.splits
    result = {"run": str(run.run_dir), "seed": run.seed, "epochs_done": state.epoch,
              "steps": state.step, "stopped_by_max_steps": stopped, "select": config.select,
              "best_epoch": state.best_epoch, "n_failed_skipped": splits.n_failed,
              "n_pending_skipped": splits.n_pending,
              "splits": {"train": len(splits.train), "val": len(splits.val),
                         "test": len(splits.test), "val_source": splits.val_source}}
    last = run.history[-1] if run.history else {}
    result.update(train_loss=last.get("train_loss"), last_val_uar=last.get("val_uar"))
    if run.rank == 0:
        if config.select == "val-uar" and state.best_epoch is not None:
            best = checkpoints.read_json(run.checkpoint_dir / "best.json")
            checkpoints.load_weights(run.checkpoint_dir / best["weights"], run.trainable)
            chosen = next(h for h in run.history if h["epoch"] == state.best_epoch and
                          h.get("val_uar") == state.best_val_uar)
        else:
            chosen = last
        result.update(val_uar=chosen.get("val_uar"), val_war=chosen.get("val_war"),
                      selected_epoch=chosen.get("epoch"))
        from heads.run import save_run

        # once: a figure per epoch costs more than an epoch
        history.plot_curves(run.history, run.run_dir / history.CURVES)
        run.model.to("cpu")
        save_run(run.run_dir, run.model, kind=config.kind, train_options=run.options,
                 cache_fingerprint=run.store.fingerprint, extra=result,
                 save_clip=True if config.reencodes_crops else None)
        log.info("saved %s (epoch %s weights%s)", run.run_dir, result["selected_epoch"],
                 f", val UAR {100 * result['val_uar']:.2f} %" if result["val_uar"] is not None else "")
    if run.world > 1:
        dist.barrier()
    return result
