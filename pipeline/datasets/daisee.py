"""DAiSEE (Gupta et al., 2016): clips in ``ROOT/DataSet/{Train,Validation,Test}/<subject>/
<clip>/<clip>.avi`` and labels in ``ROOT/Labels/{Train,Validation,Test}Labels.csv``.

A label file's columns are ``ClipID, Boredom, Engagement, Confusion, Frustration``, each
level 0-3 (very low .. very high). The real files' quirks, handled here:
- the header's last name is ``"Frustration "`` with a trailing space: names are stripped;
- a ClipID carries an extension (``1100011002.avi``) that is not always the one on disk
  (``.mp4``): clips are matched on the name without its extension;
- some labelled clips are missing from DataSet and some clips have no label row: both are
  skipped and listed, the run goes on.
A label that is not 0-3, or a ClipID given twice, is an error (exit 2) naming FILE:LINE.
Every label column is kept as metadata, and the subject (the folder above the clip's), so that
``evaluate --group-by subject`` (or ``boredom``, ...) works.
"""

from __future__ import annotations

import csv
from pathlib import Path, PurePath

from pipeline.datasets.common import (Indexed, IndexedClip, LayoutError, Skipped, canonical,
                                      entries, is_video, label_set, relative)

EXPECTED = ("ROOT/DataSet/{Train,Validation,Test}/<subject>/<clip>/<clip>.avi and "
            "ROOT/Labels/{Train,Validation,Test}Labels.csv")
SPLITS = {"Train": "train", "Validation": "val", "Test": "test"}
COLUMNS = ("Boredom", "Engagement", "Confusion", "Frustration")


def looks_like(root: Path) -> bool:
    labels = root / "Labels"
    return (root / "DataSet").is_dir() or (labels.is_dir() and any(
        p.name.lower().endswith("labels.csv") for p in entries(labels)))


def _read_labels(file: Path) -> dict[str, tuple[int, dict[str, int]]]:
    """{clip name without extension: (line, {column: level})}."""
    rows: dict[str, tuple[int, dict[str, int]]] = {}
    with open(file, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = [h.strip().lower() for h in next(reader, [])]
        wanted = ["clipid", *(c.lower() for c in COLUMNS)]
        missing = [w for w in wanted if w not in header]
        if missing:
            raise LayoutError(f"{file}:1: missing column {missing[0]!r} (columns: "
                              f"{', '.join(header) or 'none'})")
        where = {w: header.index(w) for w in wanted}
        for values in reader:
            line = reader.line_num
            if not any(v.strip() for v in values):
                continue
            if len(values) < len(header):
                raise LayoutError(f"{file}:{line}: {len(values)} fields, the header has "
                                  f"{len(header)}")
            clip = PurePath(values[where["clipid"]].strip()).stem
            levels = {}
            for column in COLUMNS:
                text = values[where[column.lower()]].strip()
                if text not in ("0", "1", "2", "3"):
                    raise LayoutError(f"{file}:{line}: {column} is {text!r}; DAiSEE's levels "
                                      f"are 0-3")
                levels[column] = int(text)
            if clip in rows:
                raise LayoutError(f"{file}:{line}: clip {clip} listed again (first at line "
                                  f"{rows[clip][0]})")
            rows[clip] = (line, levels)
    return rows


def _clips_on_disk(root: Path, folder: Path, skipped: list[Skipped]) -> dict[str, Path]:
    """{clip name: video} for DataSet/<Split>/<subject>/<clip>/<clip>.<ext>."""
    found: dict[str, Path] = {}
    for subject in entries(folder):
        if not subject.is_dir():
            skipped.append(Skipped(relative(root, subject), "a file where DAiSEE has subject "
                                                            "folders"))
            continue
        for clip_dir in entries(subject):
            if not clip_dir.is_dir():
                skipped.append(Skipped(relative(root, clip_dir), "a file where DAiSEE has "
                                                                 "clip folders"))
                continue
            videos = [p for p in entries(clip_dir) if is_video(p)]
            if not videos:
                skipped.append(Skipped(relative(root, clip_dir), "no video file in the clip "
                                                                 "folder"))
                continue
            chosen = next((p for p in videos if p.stem == clip_dir.name), videos[0])
            found[chosen.stem] = chosen
            skipped += [Skipped(relative(root, v), "a second video in the clip folder")
                        for v in videos if v != chosen]
    return found


def index(root: Path, config) -> Indexed:
    from cache.core.labels import DAISEE

    levels_named = DAISEE[config.target].names  # level 0..3 -> its class name
    labels, _ = label_set(DAISEE[config.target].name, config.labels, levels_named)
    label_dir, data_dir = root / "Labels", root / "DataSet"
    files = {s: label_dir / f"{s}Labels.csv" for s in SPLITS}
    if not any(f.is_file() for f in files.values()):
        raise LayoutError(f"{label_dir}: none of {', '.join(f.name for f in files.values())} "
                          f"(DAiSEE's label files)")
    clips, skipped, notes = [], [], []
    target = config.target.capitalize()
    for split, name in SPLITS.items():
        file, folder = files[split], data_dir / split
        rows = _read_labels(file) if file.is_file() else {}
        on_disk = _clips_on_disk(root, folder, skipped) if folder.is_dir() else {}
        if not file.is_file() and on_disk:
            notes.append(f"no {relative(root, file)}: the {len(on_disk)} clips in "
                         f"{relative(root, folder)} have no labels")
        elif file.is_file() and not folder.is_dir():
            notes.append(f"no {relative(root, folder)}/ for {relative(root, file)}")
        for clip, (line, levels) in rows.items():
            video = on_disk.get(clip)
            if video is None:
                skipped.append(Skipped(f"{relative(root, file)}:{line}",
                                       f"clip {clip} is not in {relative(root, folder)}"))
                continue
            path = relative(root, video)
            clips.append(IndexedClip(
                path, canonical(labels, levels_named[levels[target]]), name, clip,
                {"subject": video.parent.parent.name,
                 **{c.lower(): str(v) for c, v in levels.items()}}))
        for clip, video in on_disk.items():
            if clip not in rows and file.is_file():
                skipped.append(Skipped(relative(root, video), f"no row in "
                                                              f"{relative(root, file)}"))
    return Indexed(clips, skipped, ["subject", *(c.lower() for c in COLUMNS)], notes)
