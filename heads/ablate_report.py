"""ablate's outputs from its rows: results.csv, summary.csv, summary.md and summary.png.

Scores are percentages, as ``evaluate`` prints them. The spread over seeds is the sample
standard deviation (ddof 1), left empty for a single seed: one run says nothing about it.
Every file is written to a temporary name and renamed, so a kill leaves the previous version.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cache.atomic import atomic_write

RESULT_COLUMNS = ("method", "n_ctx", "temporal_layers", "streams", "seed", "val_uar",
                  "test_uar", "test_war", "run")
KEYS = ("method", "n_ctx", "temporal_layers", "streams")
METRICS = ("val_uar", "test_uar", "test_war")
SUMMARY_COLUMNS = (*KEYS, "n_seeds", *(f"{m}_{s}" for m in METRICS for s in ("mean", "std")))
INTEGER_COLUMNS = ("n_ctx", "temporal_layers", "seed")


def results_frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame([{c: r.get(c) for c in RESULT_COLUMNS} for r in rows],
                         columns=list(RESULT_COLUMNS))
    for column in INTEGER_COLUMNS:
        frame[column] = pd.array(frame[column].tolist(), dtype="Int64")
    for column in METRICS:
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
    return frame


def summary_frame(results: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration (and baseline), in the order they first appear."""
    out = []
    for key, group in results.groupby(list(KEYS), dropna=False, sort=False):
        row = dict(zip(KEYS, key))
        row["n_seeds"] = len(group)
        for metric in METRICS:
            values = group[metric].dropna().to_numpy(float)
            row[f"{metric}_mean"] = float(values.mean()) if len(values) else np.nan
            row[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else np.nan
        out.append(row)
    frame = pd.DataFrame(out, columns=list(SUMMARY_COLUMNS))
    for column in ("n_ctx", "temporal_layers"):
        frame[column] = pd.array([None if pd.isna(v) else int(v) for v in frame[column]],
                                 dtype="Int64")
    return frame


def _replace(path: Path, write) -> None:
    atomic_write(path, write)  # a fresh temporary + rename: a planted link is replaced


def _cell(mean: float, std: float) -> str:
    if np.isnan(mean):
        return "-"
    return f"{mean:.2f}" if np.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def summary_markdown(summary: pd.DataFrame) -> str:
    """The table as a paper prints it (mean ± std over seeds), the best mean of each score
    column in bold."""
    def blank(v):
        return "" if pd.isna(v) else str(v)

    lines = ["| method | prompt tokens | temporal layers | streams | seeds | val UAR | test UAR "
             "| test WAR |", "|---|---|---|---|---|---|---|---|"]
    best = {m: summary[f"{m}_mean"].max(skipna=True) for m in METRICS}
    for row in summary.itertuples(index=False):
        r = row._asdict()
        cells = []
        for m in METRICS:
            text = _cell(r[f"{m}_mean"], r[f"{m}_std"])
            if not np.isnan(r[f"{m}_mean"]) and r[f"{m}_mean"] == best[m]:
                text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {r['method']} | {blank(r['n_ctx'])} | {blank(r['temporal_layers'])} | "
                     f"{r['streams']} | {r['n_seeds']} | " + " | ".join(cells) + " |")
    note = ("UAR and WAR in %, mean ± sample standard deviation (ddof 1) over seeds; no ± for "
            "a single seed. **Bold**: the best mean of each column. Weights were selected on "
            "the validation split; the test split was only scored.")
    return "\n".join(["# ablate summary", "", note, "", *lines, ""])


def plot_summary(summary: pd.DataFrame, path: Path) -> None:
    """Test UAR (validation UAR when the cache has no test split) with error bars for each
    configuration; the baselines as horizontal reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "test_uar" if summary["test_uar_mean"].notna().any() else "val_uar"
    label = "test UAR (%)" if metric == "test_uar" else "val UAR (%), the cache has no test split"
    runs = summary[summary["method"] == "clip-caer"]
    names = [f"{r.n_ctx} tok, {r.temporal_layers} L\n{r.streams}" for r in runs.itertuples()]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.8 * len(runs) + 2), 4.2))
    x = np.arange(len(runs))
    if len(runs):
        ax.errorbar(x, runs[f"{metric}_mean"], yerr=runs[f"{metric}_std"].fillna(0.0), fmt="o",
                    capsize=4, color="tab:blue", label="clip-caer (mean ± std over seeds)")
    styles = iter(["--", ":", "-.", (0, (5, 1)), (0, (1, 3))])
    for row in summary[summary["method"] != "clip-caer"].itertuples():
        value = getattr(row, f"{metric}_mean")
        if not np.isnan(value):
            ax.axhline(value, linestyle=next(styles, "--"), color="grey",
                       label=f"{row.method} ({row.streams}): {value:.1f}")
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylabel(label)
    ax.set_title("ablate: selected on val, scored on test" if metric == "test_uar"
                 else "ablate: selected and scored on val")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    _replace(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def write_outputs(out: Path, rows: list[dict], plot: bool = True) -> dict[str, Path]:
    out = Path(out)
    results = results_frame(rows)
    summary = summary_frame(results)
    files = {"results": out / "results.csv", "summary": out / "summary.csv",
             "markdown": out / "summary.md"}
    _replace(files["results"], lambda p: results.to_csv(p, index=False, float_format="%.4f"))
    _replace(files["summary"], lambda p: summary.to_csv(p, index=False, float_format="%.4f"))
    _replace(files["markdown"], lambda p: p.write_text(summary_markdown(summary), encoding="utf-8"))
    if plot:
        files["plot"] = out / "summary.png"
        plot_summary(summary, files["plot"])
    return files
