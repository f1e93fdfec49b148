"""``index``: a dataset folder as published -> the annotation CSV ``extract`` reads.

One module per layout (caer, daisee, dfew, folders), each with ``EXPECTED`` (the layout in
one line), ``looks_like(root)`` and ``index(root, config) -> Indexed``. This module checks
ROOT and --out, finds which layout a wrong ROOT looks like, writes the CSV (and a label set
for folders) and describes the result.
"""

from __future__ import annotations

import shlex
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import IndexConfig
from pipeline.datasets import caer, daisee, dfew, folders
from pipeline.datasets.common import Indexed, LayoutError, entries, write_csv, write_text
from cache.core.labels import DAISEE, LabelSet, load_label_set

LAYOUTS = {"caer": caer, "daisee": daisee, "dfew": dfew, "folders": folders}
DEFAULT_LABELS = {"caer": "caer7", "dfew": "dfew7"}
MAX_LISTED = 20  # skipped entries printed one per line; the rest are counted


@dataclass
class IndexResult:
    config: IndexConfig
    indexed: Indexed
    labels: LabelSet
    labels_spec: str  # what extract's --labels takes: a built-in name or the written file
    out: Path

    @property
    def splits(self) -> list[str]:
        order = {"train": 0, "val": 1, "test": 2}
        return sorted({c.split for c in self.indexed.clips}, key=lambda s: (order.get(s, 3), s))


def labels_file(out: Path) -> Path:
    return out.with_name(out.stem + ".labels.yaml")


def index_dataset(config: IndexConfig) -> IndexResult:
    config.validate()
    root, out = Path(config.root), Path(config.out)
    if not root.is_dir():
        raise LayoutError(f"{root}: no such directory")
    for target in (out, labels_file(out)):
        if target.exists() and not config.force:
            raise LayoutError(f"{target}: exists; pass --force to replace it")
    module = LAYOUTS[config.layout]
    if not entries(root):
        raise LayoutError(f"{root}: empty; the {config.layout} layout is {module.EXPECTED}")
    _check_layout(root, config.layout, out)
    indexed = module.index(root, config)
    if config.layout == "folders" and not config.labels and caer.looks_like(root):
        indexed.notes.append(f"this tree looks like CAER: `python cli.py index caer {root}` "
                             f"gives its clips the caer7 label set")
    if not indexed.clips:
        first = (f"; first skipped: {indexed.skipped[0].path}: {indexed.skipped[0].reason}"
                 if indexed.skipped else "")
        raise LayoutError(f"{root}: no clips in the {config.layout} layout "
                          f"({module.EXPECTED}){first}")
    if indexed.label_set is not None:
        spec = str(labels_file(out))
        labels = indexed.label_set
        write_text(labels_file(out), _label_yaml(labels))
    else:
        spec = config.labels or DEFAULT_LABELS.get(config.layout) or DAISEE[config.target].name
        labels = load_label_set(spec)
    write_csv(out, indexed.clips, indexed.metadata_columns)
    return IndexResult(config, indexed, labels, spec, out)


def _check_layout(root: Path, layout: str, out: Path) -> None:
    """Exit 2 with one line naming the layout a wrong ROOT looks like."""
    expected = LAYOUTS[layout].EXPECTED
    if layout != "folders" and LAYOUTS[layout].looks_like(root):
        return
    # A CAER tree is also a fine folders tree; DAiSEE's and DFEW's are not.
    others = [n for n in ("caer", "daisee", "dfew") if n != layout and
              not (layout == "folders" and n == "caer")]
    for name in others:
        if LAYOUTS[name].looks_like(root):
            raise LayoutError(f"{root}: not the {layout} layout ({expected}); it looks like the "
                              f"{name} layout: {_command(name, root, out)}")
    if layout == "folders":
        if folders.looks_like(root):
            return
    else:
        # Often ROOT is the folder the archive was unpacked into, one level above the dataset.
        for below in (d for d in entries(root) if d.is_dir()):
            if LAYOUTS[layout].looks_like(below):
                raise LayoutError(f"{root}: not the {layout} layout ({expected}); {below} looks "
                                  f"like it: {_command(layout, below, out)}")
        if folders.looks_like(root):
            raise LayoutError(f"{root}: not the {layout} layout ({expected}); it looks like the "
                              f"folders layout: {_command('folders', root, out)}")
    raise LayoutError(f"{root}: not the {layout} layout ({expected}) nor any other that index "
                      f"knows")


def _command(layout: str, root: Path, out: Path) -> str:
    return (f"python cli.py index {layout} {shlex.quote(str(root))} "
            f"--out {shlex.quote(str(out))}")


def _label_yaml(labels: LabelSet) -> str:
    import yaml

    head = ("# Written by `python cli.py index folders`: the classes in the folders' order.\n"
            "# Each descriptor is the folder name; a sentence per class in the paper's manner\n"
            "# (a facial part, then a context part) makes better prompts. Keep the order.\n")
    return head + yaml.safe_dump(labels.as_dict(), sort_keys=False, allow_unicode=True)


def report_lines(result: IndexResult) -> list[str]:
    """The clip count per class and split, the notes, and the extract command to run next."""
    clips, splits = result.indexed.clips, result.splits
    counts = Counter((c.label, c.split) for c in clips)
    shown = [s or "(none)" for s in splits]
    width = max([len(n) for n in result.labels.names] + [5])
    lines = [f"{result.config.layout}: {len(clips)} clips -> {result.out} "
             f"(label set {result.labels_spec})",
             f"  {'class':<{width}}  " + "  ".join(f"{s:>7}" for s in shown + ["total"])]
    for name in result.labels.names:
        row = [counts[(name, s)] for s in splits]
        lines.append(f"  {name:<{width}}  " + "  ".join(f"{n:>7}" for n in row + [sum(row)]))
    totals = [sum(counts[(n, s)] for n in result.labels.names) for s in splits]
    lines.append(f"  {'total':<{width}}  " + "  ".join(f"{n:>7}" for n in totals + [len(clips)]))
    lines += [f"note: {n}" for n in result.indexed.notes]
    command = ["python", "cli.py", "extract", "--annotations", str(result.out),
               "--root", str(result.config.root), "--labels", result.labels_spec]
    if splits == [""]:
        lines.append("note: no split; `--split train` below gives every clip one, and "
                     "train-head holds out --val-fraction of it for model selection")
        command += ["--split", "train"]
    command += ["--cache", str(result.out.with_suffix(".zarr"))]
    lines.append("next: " + " ".join(shlex.quote(c) for c in command))
    return lines


def skipped_lines(result: IndexResult) -> list[str]:
    skipped = result.indexed.skipped
    lines = [f"skipped {s.path}: {s.reason}" for s in skipped[:MAX_LISTED]]
    if len(skipped) > MAX_LISTED:
        lines.append(f"... and {len(skipped) - MAX_LISTED} more skipped")
    if skipped:
        lines.append(f"{len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} under "
                     f"{result.config.root} did not fit the {result.config.layout} layout and "
                     f"{'was' if len(skipped) == 1 else 'were'} left out")
    return lines
