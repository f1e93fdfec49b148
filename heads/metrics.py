"""UAR, WAR, per-class recall/precision/F1, confusion matrices, a text table and a picture.

Conventions (the paper leaves them open; these are ours, and every report states them):

- UAR is the mean recall over the classes of the label set that occur in the split. A class
  with no clip in the split has no recall; it is named in a warning, listed in
  ``absent_classes`` and left out of the mean (the same as scikit-learn's
  ``balanced_accuracy_score``). WAR is plain accuracy over every clip.
- A value that is undefined (0/0) is ``None`` in the report and ``null`` in JSON, never 0 and
  never NaN: recall of an absent class, precision of a class that is never predicted, F1 of a
  class that is both absent and never predicted.
- The row-normalised confusion matrix divides each row by its class's support; the row of an
  absent class is all zeros (not NaN), so the matrix is always valid JSON and plottable.
- Fractions are stored in [0, 1]; the text table prints percentages like the paper.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cache.core.text import natural_key

log = logging.getLogger("caer")

# The exact key set of Report.to_dict(); tests assert it so downstream scripts can rely on it.
REPORT_KEYS = ("uar", "war", "n", "classes", "absent_classes", "per_class", "confusion",
               "confusion_normalized", "group_by", "groups", "source")
PER_CLASS_KEYS = ("recall", "precision", "f1", "support", "predicted")


@dataclass
class ClassMetrics:
    recall: float | None  # None: the class is absent from the split
    precision: float | None  # None: the class is never predicted
    f1: float | None  # None: absent and never predicted
    support: int  # clips of this class in the split
    predicted: int  # clips predicted as this class


@dataclass
class Report:
    classes: list[str]  # the label set's class names, in label-index order
    n: int
    uar: float | None  # None only when the split is empty
    war: float | None
    per_class: dict[str, ClassMetrics]
    confusion: list[list[int]]  # [true class][predicted class] counts
    confusion_normalized: list[list[float]]  # rows sum to 1; absent classes' rows are zeros
    absent_classes: list[str]
    group_by: str | None = None
    groups: dict[str, "Report"] | None = None  # same metrics per value of group_by
    source: dict = field(default_factory=dict)  # provenance: run, cache, split, skipped clips

    def to_dict(self) -> dict:
        return {
            "uar": self.uar, "war": self.war, "n": self.n, "classes": list(self.classes),
            "absent_classes": list(self.absent_classes),
            "per_class": {name: asdict(m) for name, m in self.per_class.items()},
            "confusion": self.confusion, "confusion_normalized": self.confusion_normalized,
            "group_by": self.group_by,
            "groups": (None if self.groups is None
                       else {k: g.to_dict() for k, g in self.groups.items()}),
            "source": self.source,
        }


def compute_report(y_true, y_pred, classes: list[str], *, warn: bool = True,
                   context: str = "") -> Report:
    """Metrics of integer predictions over a label set's ``classes`` (labels 0..C-1).

    ``warn`` logs a warning on the "caer" logger naming every absent class; ``context`` says
    where (e.g. "group scene=library") in that warning.
    """
    y_true = np.asarray(y_true, dtype=np.int64).reshape(-1)
    y_pred = np.asarray(y_pred, dtype=np.int64).reshape(-1)
    c = len(classes)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.size} labels, y_pred {y_pred.size}")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if y.size and (y.min() < 0 or y.max() >= c):
            raise ValueError(f"{name} holds labels outside 0..{c - 1}")

    confusion = np.zeros((c, c), dtype=np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    tp = np.diag(confusion)

    per_class, recalls = {}, []
    for i, name in enumerate(classes):
        recall = _ratio(tp[i], support[i])
        precision = _ratio(tp[i], predicted[i])
        f1 = _ratio(2 * tp[i], 2 * tp[i] + (predicted[i] - tp[i]) + (support[i] - tp[i]))
        per_class[name] = ClassMetrics(recall, precision, f1, int(support[i]), int(predicted[i]))
        if recall is not None:
            recalls.append(recall)

    absent = [name for name, s in zip(classes, support) if s == 0]
    if absent and warn and y_true.size:
        where = f" ({context})" if context else ""
        log.warning("class%s %s absent from the split%s: left out of UAR, which is the mean over "
                    "the other %d class%s", "es" if len(absent) > 1 else "", ", ".join(absent),
                    where, c - len(absent), "es" if c - len(absent) != 1 else "")
    rows = np.where(support[:, None] > 0, confusion / np.maximum(support[:, None], 1), 0.0)
    return Report(
        classes=list(classes), n=int(y_true.size),
        uar=float(np.mean(recalls)) if recalls else None,
        war=float((y_true == y_pred).mean()) if y_true.size else None,
        per_class=per_class, confusion=confusion.tolist(),
        confusion_normalized=rows.tolist(), absent_classes=absent)


def compute_grouped(y_true, y_pred, classes: list[str], groups, group_by: str) -> Report:
    """The overall report with the same metrics for each value of ``groups`` (one per clip)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    groups = np.asarray([_group_key(g) for g in groups], dtype=object)
    report = compute_report(y_true, y_pred, classes)
    report.group_by = group_by
    report.groups = {}
    # Per-group absences are expected (a context may never show some emotion): one debug line
    # each instead of a warning per group; the report lists them.
    for key in sorted(set(groups.tolist()), key=natural_key):
        mask = groups == key
        report.groups[key] = compute_report(y_true[mask], y_pred[mask], classes, warn=False)
        if report.groups[key].absent_classes:
            log.debug("%s=%s: absent classes %s", group_by, key,
                      ", ".join(report.groups[key].absent_classes))
    return report


def format_table(report: Report) -> str:
    """The report as a fixed-width table: one row per class, then UAR and WAR (percent)."""
    width = max([len("class")] + [len(name) for name in report.classes])
    lines = [f"{'class':<{width}}  {'recall':>7}  {'precision':>9}  {'F1':>7}  {'support':>7}"
             f"  {'predicted':>9}"]
    for name, m in report.per_class.items():
        note = "  (absent: not in UAR)" if m.recall is None else ""
        lines.append(f"{name:<{width}}  {pct(m.recall):>7}  {pct(m.precision):>9}  "
                     f"{pct(m.f1):>7}  {m.support:>7}  {m.predicted:>9}{note}")
    present = len(report.classes) - len(report.absent_classes)
    lines.append("")
    lines.append(f"UAR {pct(report.uar)} %  (mean recall over {present} of "
                 f"{len(report.classes)} classes"
                 + (f"; absent: {', '.join(report.absent_classes)})" if report.absent_classes
                    else ")"))
    lines.append(f"WAR {pct(report.war)} %  (accuracy over {report.n} clips)")
    if report.groups:
        gw = max([len(report.group_by or "group")] + [len(k) for k in report.groups])
        lines.append("")
        lines.append(f"{report.group_by or 'group':<{gw}}  {'n':>6}  {'UAR %':>7}  {'WAR %':>7}"
                     f"  absent classes")
        for key, g in report.groups.items():
            lines.append(f"{key:<{gw}}  {g.n:>6}  {pct(g.uar):>7}  {pct(g.war):>7}  "
                         f"{', '.join(g.absent_classes) or '-'}")
    return "\n".join(lines)


def plot_confusion(report: Report, path: str | Path, title: str | None = None) -> Path:
    """Row-normalised confusion matrix as a PNG: colour = share of the true class, the count
    and the percentage in every cell, class names on both axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    c = len(report.classes)
    counts = np.asarray(report.confusion)
    rows = np.asarray(report.confusion_normalized)
    side = max(4.5, 1.0 + 0.9 * c)
    fig = Figure(figsize=(side + 1.2, side), dpi=100)
    FigureCanvasAgg(fig)  # no pyplot: no global state, no display backend needed
    ax = fig.add_subplot()
    image = ax.imshow(rows, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ticks = np.arange(c)
    ax.set_xticks(ticks, labels=report.classes, rotation=35, ha="right",
                  rotation_mode="anchor")
    true_labels = [f"{n} (absent)" if n in report.absent_classes else n
                   for n in report.classes]
    ax.set_yticks(ticks, labels=true_labels)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    font = 10 if c <= 7 else 7
    for i in range(c):
        for j in range(c):
            colour = "white" if rows[i, j] > 0.5 else "black"
            share = "" if report.classes[i] in report.absent_classes else \
                f"\n{100 * rows[i, j]:.0f}%"
            ax.text(j, i, f"{counts[i, j]}{share}", ha="center", va="center", color=colour,
                    fontsize=font)
    if title is None:
        title = f"UAR {pct(report.uar)} %   WAR {pct(report.war)} %   n = {report.n}"
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path


def _ratio(num, den) -> float | None:
    return float(num) / float(den) if den else None


def pct(value: float | None) -> str:
    """A share as a percentage with two decimals; "-" when there is none (no clips, NaN)."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{100 * value:.2f}"


def _group_key(value) -> str:
    import pandas as pd

    missing = pd.api.types.is_scalar(value) and (pd.isna(value) or str(value).strip() == "")
    return "(missing)" if missing else str(value)

