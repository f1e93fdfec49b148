"""CAER (Lee et al., ICCV 2019): ``ROOT/{train,validation,test}/<Emotion>/<clip>.avi``.

The seven emotion folders are Anger, Disgust, Fear, Happy, Neutral, Sad and Surprise, the
class names of caer7. ``validation`` becomes the ``val`` split. Clip file names repeat across
folders (``0001.avi`` in every one), so a clip's id is its path below ROOT.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.datasets.common import (Indexed, IndexedClip, LayoutError, Skipped, canonical,
                                      entries, is_video, label_set, relative)

EXPECTED = "ROOT/{train,validation,test}/<Emotion>/<clip>.avi"
SPLITS = {"train": "train", "validation": "val", "test": "test"}


def _split_dirs(root: Path) -> dict[str, Path]:
    return {p.name.lower(): p for p in entries(root)
            if p.is_dir() and p.name.lower() in SPLITS}


def looks_like(root: Path) -> bool:
    """A split folder holding at least one of CAER's emotion folders."""
    from cache.core.labels import CAER7

    emotions = {n.lower() for n in CAER7.names}
    return any(p.is_dir() and p.name.lower() in emotions
               for split in _split_dirs(root).values() for p in entries(split))


def index(root: Path, config) -> Indexed:
    from cache.core.labels import CAER7

    splits = _split_dirs(root)
    skipped = [Skipped(relative(root, p), "not a CAER split folder (train, validation, test)")
               for p in entries(root) if p.is_dir() and p.name.lower() not in SPLITS]
    emotions = {n.lower(): n for n in CAER7.names}
    found: list[tuple[str, Path]] = []
    for name, folder in splits.items():
        for entry in entries(folder):
            if not entry.is_dir():
                skipped.append(Skipped(relative(root, entry), "a file where CAER has emotion "
                                                              "folders"))
            elif entry.name.lower() not in emotions:
                # A class the label set lacks: guessing would mislabel every clip in it.
                raise LayoutError(f"{entry}: not one of CAER's emotion folders "
                                  f"({', '.join(sorted(emotions.values()))})")
            else:
                found.append((name, entry))
    labels, _ = label_set("caer7", config.labels, sorted({e.name for _, e in found}))
    clips = []
    for name, emotion in found:
        for clip in entries(emotion):
            if is_video(clip):
                path = relative(root, clip)
                clips.append(IndexedClip(path, canonical(labels, emotion.name), SPLITS[name],
                                         path))
            else:
                skipped.append(Skipped(relative(root, clip), "not a video file"))
    notes = [f"no {n}/ folder" for n in SPLITS if n not in splits]
    return Indexed(clips, skipped, notes=notes)
