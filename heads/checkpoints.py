"""Checkpoints and --resume: RUN/checkpoints/{last,best}.json with their safetensors, the
options a run records, and whether a resumed run may continue with the options it is given.

A checkpoint holds no generator state: every random draw is seeded by (seed, epoch, clip)
(heads/data.py), so the weights, the SGD momentum and the scheduler are all a resumed run
needs to replay the epochs it missed exactly.
"""

from __future__ import annotations

import json
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from cache.atomic import atomic_write, atomic_write_text, output_dir, refuse_symlink
from cache.core.errors import CaerError

CHECKPOINTS = "checkpoints"
# Options that may change when a run is resumed: they do not change what an epoch computes.
RESUMABLE_CHANGES = ("epochs", "max_steps", "device", "workers", "quiet", "resume", "out",
                     "precision")  # as asked; what it resolved to (resolved_precision) must match


@dataclass
class State:
    """What a checkpoint records besides tensors; JSON-serialisable."""

    epoch: int = 0  # finished epochs
    step: int = 0  # optimizer steps taken
    best_epoch: int | None = None
    best_val_uar: float | None = None
    finished: bool = False


def check_out(config) -> None:
    """--out is a new (or empty) directory, or one that --resume continues."""
    out = Path(config.out)
    refuse_symlink(out, "--out")
    if out.exists() and not out.is_dir():
        raise CaerError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not config.resume:
        raise CaerError(f"--out {out}: already holds files; pass --resume to continue that run "
                        f"or choose another directory")


def recorded_options(config, seed: int) -> dict:
    """Every option of ``config`` as the run records it (config.json's train, last.json)."""
    hints = typing.get_type_hints(type(config))
    # float fields as floats, so that --val-fraction 0 and 0.0 compare equal on --resume
    options = {f.name: float(getattr(config, f.name)) if hints[f.name] is float
               else getattr(config, f.name) for f in fields(config)}
    options.update(milestones=list(config.milestones), seeds=list(config.seeds), seed=seed)
    return options


def check_resumable(checkpoint: dict, config, seed: int, options: dict, fingerprint: dict,
                    precision: str, run_dir: Path) -> None:
    """Refuse --resume on another cache or with options that change what an epoch computes."""
    from cache import describe_mismatch, fingerprint_mismatch

    old = checkpoint["cache_fingerprint"]
    keys = fingerprint_mismatch(old, fingerprint)
    if keys:
        raise CaerError(f"--resume: the cache differs from the one {run_dir} was trained on: "
                        f"{describe_mismatch(old, fingerprint, keys)}")
    # An option added after the run was made counts as its default there; train-head
    # ran in fp32 before it had --precision.
    recorded = {**recorded_options(type(config)(), seed),
                "resolved_precision": "fp32" if not config.reencodes_crops else precision,
                **checkpoint["options"]}
    changed = [k for k in options if k not in RESUMABLE_CHANGES
               and json.dumps(options[k]) != json.dumps(recorded.get(k))]
    if changed:
        raise CaerError("--resume: options differ from the run's: " + "; ".join(
            f"--{k.replace('_', '-').replace('resolved-', '')} (run {recorded.get(k)}, "
            f"now {options[k]})"
            for k in changed))


def remove_partial_writes(directory: Path) -> None:
    if directory.is_dir():
        output_dir(directory, "checkpoint directory")
        for partial_write in directory.glob(".*.tmp"):  # cache.atomic's, left by a kill
            if partial_write.is_file() and not partial_write.is_symlink():
                partial_write.unlink()


def save_weights(directory: Path, name: str, trainable: dict, info: dict,
                 extra_tensors: dict | None = None) -> None:
    """``name.safetensors`` + ``name.json``; the JSON names the weights file and is written
    last, so a kill leaves either the old or the new checkpoint, never a mix."""
    from safetensors.torch import save_file

    output_dir(directory, "checkpoint directory")
    tag = f"{name}-{info['epoch']:04d}{'p' if info.get('partial') else ''}"
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in trainable.items()}
    tensors.update(extra_tensors or {})
    atomic_write(directory / f"{tag}.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    old = read_json(directory / f"{name}.json")
    write_json(directory / f"{name}.json", {**info, "weights": f"{tag}.safetensors"})
    if old and old.get("weights") != f"{tag}.safetensors":
        (directory / old["weights"]).unlink(missing_ok=True)


def save_checkpoint(directory: Path, trainable: dict, optimizer, scheduler, scaler,
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
    save_weights(directory, "last", trainable, {
        **asdict(state), "scheduler": sched, "grad_scaler": scaler.state_dict(),
        "options": options, "cache_fingerprint": fingerprint,
        "rng": "none saved: every draw is seeded by (seed, epoch, clip)"}, momentum)


def read_checkpoint(directory: Path) -> dict | None:
    """last.json and its tensors for --resume, every file checked (heads/run_checks.py): a
    torn or edited file is refused with what to do, before anything is trained or written."""
    from heads.run_checks import (check_checkpoint_info, check_finite, load_safetensors,
                                  read_json as read_checked_json)

    advice = (f"resume cannot continue from it: delete {directory} and run the same command "
              f"(with --resume) to train this run again from epoch 1, or restore the file")
    tensors = None
    for name in ("last", "best"):  # best's weights are loaded after the last epoch
        path = directory / f"{name}.json"
        if not path.is_file():
            continue
        info = read_checked_json(path, "the checkpoint record", advice)
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


def restore(checkpoint: dict, model, trainable: dict, optimizer, scheduler, scaler) -> State:
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


def load_weights(path: Path, trainable: dict) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(tensors[f"model.{name}"])


def read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")
