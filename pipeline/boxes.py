"""Box files as the original release ships them, matched to clips by their trailing path.

The release's ``face_detection_result.json`` maps a clip's frame folder to
``{frame file name: [x0, y0, x1, y1]}``; its ``body_detection_result.json`` maps a frame folder
to one ``[x0, y0, x1, y1]``. Their keys are the folders exactly as the authors' list files
named them: absolute paths on the authors' machine (``/media/.../RAER/Images/0001``). A user's
clips live elsewhere, so a clip takes the key whose trailing path components agree with the
clip's path on the most components ("RAER/Images/0001" agrees with the key above on three).
Two keys that agree equally far is ambiguous and refused: guessing would give a clip another
clip's boxes without a word.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from cache.core.errors import CaerError


class BoxFileError(CaerError):
    """An unusable box file, or a clip it cannot assign unambiguously (exit 2)."""


@dataclass
class BoxFile:
    """A loaded box file: ``entries`` maps each normalised key to its value."""

    path: str
    option: str  # the flag that named it, for messages
    entries: dict
    sha256: str
    _by_name: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        for key in self.entries:
            parts = path_parts(key)
            if parts:
                self._by_name.setdefault(parts[-1], []).append((key, parts))

    def match(self, clip_path: str) -> str | None:
        """The key whose trailing components agree longest with ``clip_path``; None when no key
        agrees even on the last one. Raises BoxFileError when two keys agree equally far."""
        parts = path_parts(clip_path)
        if not parts:
            return None
        best, best_n, tied = None, 0, None
        for key, key_parts in self._by_name.get(parts[-1], ()):
            n = trailing_agreement(parts, key_parts)
            if n > best_n:
                best, best_n, tied = key, n, None
            elif n == best_n:
                tied = key
        if tied is not None:
            raise BoxFileError(
                f"{self.option} {self.path}: clip {clip_path} matches two keys equally "
                f"({best_n} trailing path component{'s' if best_n != 1 else ''}): {best!r} and "
                f"{tied!r}; give the clips paths that tell them apart (e.g. keep the dataset's "
                f"folder name under --root) or drop one key")
        return best


def path_parts(path: str) -> tuple[str, ...]:
    """A path's components with ``\\`` read as ``/``, without empty and ``.`` parts."""
    text = os.path.normpath(str(path).replace("\\", "/")).replace("\\", "/")
    return tuple(p for p in text.split("/") if p not in ("", "."))


def trailing_agreement(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    """How many trailing components ``a`` and ``b`` share."""
    n = 0
    while n < len(a) and n < len(b) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def _read_json(path: str, option: str) -> tuple[dict, str]:
    file = Path(path)
    if not file.is_file():
        raise BoxFileError(f"{option} {path}: no such file")
    raw = file.read_bytes()
    try:
        data = json.loads(raw)
    except ValueError as err:
        raise BoxFileError(f"{option} {path}: not JSON ({err})") from None
    if not isinstance(data, dict):
        raise BoxFileError(f"{option} {path}: expected an object keyed by frame folder")
    return data, hashlib.sha256(raw).hexdigest()


def _is_box(value) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))


def _norm_key(key: str) -> str:
    """One spelling per folder ("/a/b/", "/a//b" and "/a/b" are one key)."""
    absolute = str(key).replace("\\", "/").startswith("/")
    return ("/" if absolute else "") + "/".join(path_parts(key))


def load_face_boxes(path: str) -> BoxFile:
    """``{frame folder: {frame file name: [x0, y0, x1, y1]}}`` (the release's layout; a frame
    with ``null`` has no box). A flat ``{frame path: box}`` map is read too. For a video file
    the frame name is its 0-based frame number."""
    option = "--face-boxes"
    data, digest = _read_json(path, option)
    entries: dict[str, dict] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            folder, frames = _norm_key(key), value
        elif _is_box(value) or value is None:
            folder, _, name = _norm_key(key).rpartition("/")
            frames = {name: value}
        else:
            raise BoxFileError(f"{option} {path}: entry {key!r} is neither a box nor a "
                               f"{{frame: box}} object")
        for name, box in frames.items():
            if box is not None and not _is_box(box):
                raise BoxFileError(f"{option} {path}: box of {key}/{name} is not "
                                   f"[x0, y0, x1, y1]")
        entries.setdefault(folder, {}).update(frames)
    return BoxFile(str(path), option, entries, digest)


def load_body_boxes(path: str) -> BoxFile:
    """``{frame folder: [x0, y0, x1, y1]}``: one box per clip (the release's layout)."""
    option = "--body-boxes"
    data, digest = _read_json(path, option)
    entries = {}
    for key, value in data.items():
        if value is not None and not _is_box(value):
            raise BoxFileError(f"{option} {path}: the box of {key!r} is not [x0, y0, x1, y1]")
        entries[_norm_key(key)] = value
    return BoxFile(str(path), option, entries, digest)
