"""One training epoch of optimizer steps, and what a step needs: the module DDP wraps, dropout
masks drawn per clip, gradient checkpointing of the image encoder."""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cache.core.errors import CaerError
from cache.core.runtime import autocast
from heads.data import clip_generator
from heads.metrics import compute_report


class StepModel(nn.Module):
    """What DDP wraps: one forward from a batch to logits, from features or from pixels."""

    def __init__(self, model, pixels: bool):
        super().__init__()
        self.model, self.pixels = model, pixels

    def forward(self, face, context):
        if self.pixels:
            return self.model.forward_pixels(face, context)
        return self.model.forward_features(face, context)


def train_epoch(step_model, model, loader, optimizer, scaler, config, seed, epoch, state,
                device, precision, rank, world, n_steps) -> dict:
    """One pass over the train split. A step takes ``config.micro_batches`` micro-batches per
    process; each micro-batch's summed loss is divided by the clips this process sees in the
    step, and DDP averages over processes: the gradient is the mean over the global batch."""
    from tqdm import tqdm

    step_model.train()
    accumulate = config.micro_batches
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
                with autocast(device, precision), sample_dropout(model, seed, epoch, rows):
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
            non_finite(loss_sum, epoch)
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
            non_finite(float(total[0]), epoch)
    uar, war = uar_war(y.numpy(), p.numpy(), model.labels.names)
    return {"loss": float(total[0] / max(total[1], 1)), "uar": uar, "war": war, "partial": partial}


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


def non_finite(loss: float, epoch: int):
    raise CaerError(f"the training loss became {loss} in epoch {epoch + 1}; lower the learning "
                    f"rates or use --precision fp32")


def uar_war(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> tuple[float | None, float | None]:
    """UAR and WAR as ``evaluate`` reports them, without its absent-class warning per epoch."""
    report = compute_report(y_true, y_pred, classes, warn=False)
    return report.uar, report.war


def precision_reason(requested: str, precision: str, device: torch.device) -> str:
    """Why ``resolve_precision`` chose ``precision``, for the log."""
    if requested != "auto":
        return f"--precision {requested}"
    if device.type == "cuda":
        return ("--precision auto on a GPU with bf16" if precision == "bf16" else
                "--precision auto on a GPU without native bf16")
    return ("--precision auto on a CPU with native bf16 (AVX512-BF16 or AMX)" if precision == "bf16"
            else "--precision auto on a CPU without native bf16 (emulated bf16 is slower than fp32)")


def enable_grad_checkpointing(model) -> None:
    """Checkpoint each layer of the CLIP image encoder (transformers' own mechanism)."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    for layer in model.clip.vision_model.encoder.layers:
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)


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
