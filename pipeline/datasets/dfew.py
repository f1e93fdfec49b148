"""DFEW (Jiang et al., ACM MM 2020): ``ROOT/EmoLabel_DataSplit/{train,test}(single-labeled)/
set_N.csv`` and the clips in ``ROOT/Clip/``.

A split file has the header ``video_name,label``: the clip's number (``1`` or ``00001``; its
folder and file are named with five digits) and its label 1-7 in DFEW's order (1 Happy,
2 Sad, 3 Neutral, 4 Angry, 5 Surprise, 6 Disgust, 7 Fear). The README spells the folders
``train(single_labeled)``, the archives unpack as ``train(single-labeled)``: both are read.
The clips come as ``Clip/clip_224x224/<id>/<id>_<n>.jpg`` (aligned faces),
``Clip/clip_224x224_16f/<id>/`` (16 interpolated frames) or ``Clip/original/<id>.mp4``;
``--clips`` picks one. A listed clip missing on disk is skipped and listed (DFEW's own
face-detection step dropped some); a label outside 1-7 is an error naming FILE:LINE.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

from pipeline.datasets.common import (Indexed, IndexedClip, LayoutError, Skipped, canonical,
                                      entries, is_frame_folder, label_set, relative)

EXPECTED = ("ROOT/EmoLabel_DataSplit/{train,test}(single-labeled)/set_N.csv and "
            "ROOT/Clip/clip_224x224/<id>/ (or Clip/original/<id>.mp4)")
SPLIT_DIR = re.compile(r"^(train|test)\(single[-_ ]?label(l)?ed\)$", re.IGNORECASE)
CLIP_KINDS = ("clip_224x224", "clip_224x224_16f", "original")


def looks_like(root: Path) -> bool:
    return (root / "EmoLabel_DataSplit").is_dir() or any(
        (root / "Clip" / kind).is_dir() for kind in CLIP_KINDS)


def _split_files(root: Path, fold: int) -> dict[str, Path]:
    base = root / "EmoLabel_DataSplit"
    if not base.is_dir():
        raise LayoutError(f"{base}: missing (DFEW's split files)")
    found: dict[str, Path] = {}
    for entry in entries(base):
        match = SPLIT_DIR.match(entry.name.removesuffix(".zip"))
        if match and entry.suffix.lower() == ".zip" and not (base / entry.stem).is_dir():
            raise LayoutError(f"{entry}: still an archive; unzip it in {base} first")
        if match and entry.is_dir():
            found[match.group(1).lower()] = entry / f"set_{fold}.csv"
    for split in ("train", "test"):
        if split not in found:
            raise LayoutError(f"{base}: no {split}(single-labeled)/ folder")
        if not found[split].is_file():
            raise LayoutError(f"{found[split]}: missing (--fold {fold})")
    return found


def _read_split(file: Path) -> list[tuple[int, str, int]]:
    """[(line, five-digit clip id, label 1-7)]."""
    out = []
    with open(file, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = [h.strip().lower() for h in next(reader, [])]
        if "video_name" not in header or "label" not in header:
            raise LayoutError(f"{file}:1: expected the header video_name,label (got "
                              f"{','.join(header) or 'nothing'})")
        name_at, label_at = header.index("video_name"), header.index("label")
        for values in reader:
            line = reader.line_num
            if not any(v.strip() for v in values):
                continue
            name = values[name_at].strip() if len(values) > name_at else ""
            label = values[label_at].strip() if len(values) > label_at else ""
            if not name.isdigit():
                raise LayoutError(f"{file}:{line}: video_name {name!r} is not a clip number")
            if label not in {str(i) for i in range(1, 8)}:
                raise LayoutError(f"{file}:{line}: label {label!r} is not 1-7 (DFEW: 1 Happy "
                                  f"... 7 Fear)")
            out.append((line, name.zfill(5), int(label)))
    return out


def _clip_kind(root: Path, wanted: str) -> str:
    if wanted != "auto":
        if not (root / "Clip" / wanted).is_dir():
            raise LayoutError(f"{root / 'Clip' / wanted}: missing (--clips {wanted})")
        return wanted
    for kind in CLIP_KINDS:
        if (root / "Clip" / kind).is_dir():
            return kind
    raise LayoutError(f"{root / 'Clip'}: none of {', '.join(CLIP_KINDS)}")


def _original_videos(folder: Path) -> dict[str, Path]:
    """{clip id: video}, wherever below Clip/original the archives put them."""
    found = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            stem, ext = os.path.splitext(name)
            if ext.lower() == ".mp4" and stem.isdigit():
                found.setdefault(stem.zfill(5), Path(parent) / name)
    return found


def index(root: Path, config) -> Indexed:
    from cache.core.labels import DFEW7

    labels, _ = label_set("dfew7", config.labels, DFEW7.names)
    files = _split_files(root, config.fold)
    kind = _clip_kind(root, config.clips)
    folder = root / "Clip" / kind
    videos = _original_videos(folder) if kind == "original" else None
    clips, skipped = [], []
    for split, file in files.items():
        for line, clip, label in _read_split(file):
            path = videos.get(clip) if videos is not None else folder / clip
            if path is None or (videos is None and not is_frame_folder(path)):
                skipped.append(Skipped(f"{relative(root, file)}:{line}",
                                       f"clip {clip} is not in {relative(root, folder)}"))
                continue
            name = canonical(labels, DFEW7.names[label - 1])
            clips.append(IndexedClip(relative(root, path), name, split, clip,
                                     {"fold": str(config.fold)}))
    return Indexed(clips, skipped, ["fold"], [f"clips from {relative(root, folder)}"])
