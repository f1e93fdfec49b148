"""A training run's history: RUN/metrics.jsonl (one line per epoch), the epoch's log line,
RUN/curves.png, and RUN/summary.json over several --seeds."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from cache.atomic import atomic_write, atomic_write_text

log = logging.getLogger("caer")

METRICS = "metrics.jsonl"
CURVES = "curves.png"
SEEDS_SUMMARY = "summary.json"


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def trim_metrics(path: Path, finished_epochs: int) -> None:
    """Drop lines of epochs after the checkpoint (a kill between log and checkpoint)."""
    kept = [r for r in read_metrics(path) if r["epoch"] <= finished_epochs and not r.get("partial")]
    if path.is_file() or kept:
        write_metrics(path, kept)


def write_metrics(path: Path, records: list[dict]) -> None:
    # Rewritten whole (a few lines per epoch), so that a link planted there is replaced.
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def log_epoch(record: dict, epochs: int) -> None:
    pct = lambda v: "  -  " if v is None else f"{100 * v:5.1f}"  # noqa: E731
    log.info("epoch %2d/%d  loss %.4f  train UAR %s WAR %s  val UAR %s WAR %s  %.1f s%s",
             record["epoch"], epochs, record["train_loss"], pct(record["train_uar"]),
             pct(record["train_war"]), pct(record["val_uar"]), pct(record["val_war"]),
             record["seconds"], "  (stopped by --max-steps)" if record.get("partial") else "")


def plot_curves(history: list[dict], path: Path) -> None:
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


def seeds_summary(seeds, out: Path, results: list[dict]) -> dict:
    """The mean and sample std over seeds of each run's val UAR, val WAR and train loss."""
    summary = {"seeds": list(seeds), "runs": [str(out / f"seed-{s}") for s in seeds]}
    for key in ("val_uar", "val_war", "train_loss"):
        values = [r[key] for r in results if r.get(key) is not None]
        if values:
            summary[key] = {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1))
                            if len(values) > 1 else 0.0, "values": values}
    summary["per_seed"] = results
    return summary


def write_seeds_summary(out: Path, summary: dict) -> None:
    atomic_write_text(out / SEEDS_SUMMARY, json.dumps(summary, indent=2) + "\n")
    for key in ("val_uar", "val_war"):
        if key in summary:
            log.info("%s over seeds %s: %.2f +- %.2f %%", key, ",".join(map(str, summary["seeds"])),
                     100 * summary[key]["mean"], 100 * summary[key]["std"])
