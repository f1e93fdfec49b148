"""What every layout shares: the indexed clip, the entries skipped on the way, what counts as
a clip on disk, and the CSV that ``extract --annotations`` reads."""

from __future__ import annotations

import csv
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cache.core.errors import CaerError
from cache.core.labels import LabelSet, load_label_set
from pipeline.video import IMAGE_SUFFIXES
from cache.core.text import natural_key

# Containers FFmpeg reads that datasets ship clips in; anything else in a clip's place is
# reported, not guessed at.
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv",
                  ".flv", ".3gp")
# Folder names users give their splits -> the split names train-head and evaluate use.
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val",
               "validation": "val", "dev": "val", "test": "test", "testing": "test"}


class LayoutError(CaerError):
    """ROOT is not the layout asked for, or a file breaks it so that no guess is safe (exit 2)."""


@dataclass
class IndexedClip:
    path: str  # relative to ROOT, "/" separators
    label: str  # a class name of the label set
    split: str
    id: str
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class Skipped:
    path: str
    reason: str


@dataclass
class Indexed:
    """What a layout module returns; index_dataset adds the rest."""

    clips: list[IndexedClip]
    skipped: list[Skipped]
    metadata_columns: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    label_set: LabelSet | None = None  # a set the layout made up, to be written for extract


def entries(folder: Path) -> list[Path]:
    """A folder's entries in natural order, without hidden files (.DS_Store, ._x): those are
    never clips, and every OS sprinkles them."""
    try:
        names = [n for n in os.listdir(folder) if not n.startswith(".")]
    except OSError as err:
        raise LayoutError(f"{folder}: cannot list: {err.strerror or err}") from None
    return [folder / n for n in sorted(names, key=natural_key)]


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES and path.is_file()


def is_frame_folder(path: Path) -> bool:
    """A folder holding image files directly: one clip as frames."""
    if not path.is_dir():
        return False
    try:  # stops at the first image: DFEW has 16k folders of ~100 frames to check
        with os.scandir(path) as scan:
            return any(not e.name.startswith(".") and
                       os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES for e in scan)
    except OSError as err:
        raise LayoutError(f"{path}: cannot list: {err.strerror or err}") from None


def is_clip(path: Path) -> bool:
    return is_video(path) or is_frame_folder(path)


def relative(root: Path, path: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def label_set(default: str, override: str | None, names: list[str]) -> tuple[LabelSet, str]:
    """The layout's built-in set, or --labels if every class name the layout found is in it."""
    spec = override or default
    labels = load_label_set(spec)
    known = {n.lower() for n in labels.names}
    missing = [n for n in names if n.lower() not in known]
    if missing:
        raise LayoutError(f"--labels {spec}: has no class {', '.join(repr(m) for m in missing)} "
                          f"(its classes: {', '.join(labels.names)})")
    return labels, spec


def canonical(labels: LabelSet, name: str) -> str:
    """The label set's own spelling of a class name matched case-insensitively."""
    return labels.names[labels.index(name)]


def write_csv(path: Path, clips: list[IndexedClip], metadata_columns: list[str]) -> None:
    """Temp file + rename in the target folder: a reader never sees half a CSV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile("w", newline="", encoding="utf-8", dir=path.parent,
                                         prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label", "split", "id", *metadata_columns])
            for c in clips:
                writer.writerow([c.path, c.label, c.split, c.id,
                                 *(c.metadata.get(m, "") for m in metadata_columns)])
        os.replace(handle.name, path)
    except BaseException:
        os.unlink(handle.name)
        raise


def write_text(path: Path, text: str) -> None:
    handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent,
                                         prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            handle.write(text)
        os.replace(handle.name, path)
    except BaseException:
        os.unlink(handle.name)
        raise
