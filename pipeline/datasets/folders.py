"""A class per folder: ``ROOT/<split>/<class>/<clip>`` (``--split-from folder``) or
``ROOT/<class>/<clip>`` (``--split-from none``), a clip being a video file or a folder of
frames.

Split folders named train/training, val/valid/validation/dev and test/testing become the
splits train, val and test; any other name is kept (lower-cased). The classes are the class
folders' names, matched case-insensitively; with ``--labels`` every one must be a class of
that set, else the class order is the folders' natural order and a label set is written next
to the CSV (``FILE.labels.yaml``) whose descriptors are the folder names, to be improved.
A tree one level shallower or deeper than ``--split-from`` says is an error that names the
other setting; a stray file is skipped and listed.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.datasets.common import (SPLIT_NAMES, Indexed, IndexedClip, LayoutError, Skipped,
                                      canonical, entries, is_clip, label_set,
                                      relative)
from cache.core.labels import LabelClass, LabelSet
from cache.core.text import natural_key

EXPECTED = "ROOT/<split>/<class>/<clip> or ROOT/<class>/<clip> (a video file or frame folder)"


def looks_like(root: Path) -> bool:
    return any(p.is_dir() for p in entries(root))


def _subfolders(root: Path, parent: Path, what: str, hint: str,
                skipped: list[Skipped]) -> list[Path]:
    """The folders of ``parent``; a clip there means the tree has another depth (exit 2)."""
    out = []
    for entry in entries(parent):
        if is_clip(entry):
            raise LayoutError(f"{entry}: a clip where {what} folders belong{hint}")
        if entry.is_dir():
            out.append(entry)
        else:
            skipped.append(Skipped(relative(root, entry), f"a file where {what} folders belong"))
    return out


def _clips(root: Path, class_dir: Path, split_from: str, skipped: list[Skipped]) -> list[Path]:
    out = []
    for entry in entries(class_dir):
        if is_clip(entry):
            out.append(entry)
        elif entry.is_dir() and split_from == "none" and any(
                is_clip(p) for p in entries(entry)):
            raise LayoutError(f"{entry}: a folder of clips where --split-from none expects a "
                              f"clip (ROOT/<class>/<clip>); for ROOT/<split>/<class>/<clip> "
                              f"use --split-from folder")
        else:
            skipped.append(Skipped(relative(root, entry), "not a video file or a folder of "
                                                          "frames"))
    return out


def index(root: Path, config) -> Indexed:
    skipped: list[Skipped] = []
    if config.split_from == "folder":
        hint = ("; for ROOT/<class>/<clip> use --split-from none")
        splits = [(d, SPLIT_NAMES.get(d.name.lower(), d.name.lower()))
                  for d in _subfolders(root, root, "split", hint, skipped)]
    else:
        hint, splits = "", [(root, "")]
    found = [(split, class_dir, clip)
             for split_dir, split in splits
             for class_dir in _subfolders(root, split_dir, "class", hint, skipped)
             for clip in _clips(root, class_dir, config.split_from, skipped)]
    names = _class_names([c for _, c, _ in found])
    if config.labels:
        labels, _ = label_set(config.labels, config.labels, names)
        written = None
    elif len(names) < 2:
        raise LayoutError(f"{root}: {len(names)} class folder{'s' * (len(names) != 1)} with "
                          f"clips ({', '.join(names) or 'none'}); a label set needs at least "
                          f"two classes")
    else:
        labels = written = LabelSet("folders", tuple(
            LabelClass(n, _sentence(n), _sentence(n)) for n in names))
    clips = [IndexedClip(relative(root, clip), canonical(labels, class_dir.name), split,
                         relative(root, clip))
             for split, class_dir, clip in found]
    notes = [f"split folder {d.name!r} kept as split {s!r}" for d, s in splits
             if config.split_from == "folder" and s not in ("train", "val", "test")]
    return Indexed(clips, skipped, notes=notes, label_set=written)


def _class_names(dirs: list[Path]) -> list[str]:
    """Distinct class names (first spelling wins across splits), natural order."""
    seen: dict[str, str] = {}
    for d in dirs:
        seen.setdefault(d.name.lower(), d.name)
    return sorted(seen.values(), key=natural_key)


def _sentence(name: str) -> str:
    return name.replace("_", " ").replace("-", " ")
