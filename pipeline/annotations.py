"""Annotation files -> the clips to extract, validated before anything is written.

Two formats:
- CSV (``.csv``): a header with ``path`` and ``label``, optionally ``split`` and ``id``; any
  other column is metadata kept in the manifest (e.g. ``scene``). Labels are class names
  (case-insensitive) or 0-based indices.
- The original release's list file (any other suffix): lines ``path n_frames label``,
  space separated, labels 1-based; the split comes from ``--split``. Blank lines and lines
  starting with ``#`` are skipped. The path may contain spaces (the last two fields are
  numbers).

Paths are relative to ``root`` (default: the annotation file's folder). A clip's id is its
``id`` column, else its path as written, relative to the root, with ``/`` separators:
stable across machines and unique within a root. Every problem is a ``CaerError`` whose
one line is ``FILE:LINE: problem``.

Files must be UTF-8 (a UTF-8 byte-order mark is fine). Another encoding is refused at the
line of its first undecodable byte, rather than guessed: a latin-1 file decoded as anything
else would silently change the paths.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path, PurePosixPath

from cache.layout import ClipRow
from cache.core.errors import CaerError
from cache.core.labels import LabelSet, LabelSetError

RESERVED = ("path", "label", "split", "id")
# No file system takes a longer path (Linux PATH_MAX); a longer field is a broken file.
MAX_PATH_CHARS = 4096
# Python's csv refuses fields longer than this (csv.field_size_limit()'s default).
MAX_FIELD_CHARS = 131072


class AnnotationError(CaerError):
    """An unusable annotation file: ``FILE:LINE: problem`` (exit 2)."""


def read_annotations(files: list[str | os.PathLike], labels: LabelSet,
                     splits: list[str] | None = None,
                     root: str | os.PathLike | None = None,
                     roots: dict[str, str] | None = None) -> tuple[list[ClipRow], list[str]]:
    """Parse and validate every file; returns (clips in file order, metadata column names).

    ``splits`` is empty, one name for every file, or one name per file; a CSV's own
    ``split`` column wins over it. ``ClipRow.path`` is the absolute path of the clip.
    ``roots``, when given, is filled with each clip id's root (``root``, or its file's folder).
    """
    files = [Path(f) for f in files]
    splits = list(splits or [])
    if not files:
        raise AnnotationError("no --annotations given")
    if len(splits) not in (0, 1, len(files)):
        raise AnnotationError(f"--split given {len(splits)} times for {len(files)} "
                              f"--annotations: give it once (for every file) or once per file")
    rows: list[ClipRow] = []
    where: dict[str, str] = {}  # id -> FILE:LINE of its first appearance
    columns: list[str] = []
    for n, file in enumerate(files):
        split = splits[n] if len(splits) == len(files) else (splits[0] if splits else "")
        base = Path(root) if root is not None else file.parent
        if not file.is_file():
            raise AnnotationError(f"{file}: no such annotation file")
        if file.suffix.lower() == ".csv":
            parsed, meta = _read_csv(file, labels, split, base)
        else:
            parsed, meta = _read_list(file, labels, split, base)
        for line, row in parsed:
            if row.id in where:
                raise AnnotationError(f"{file}:{line}: duplicate id '{_clip(row.id)}' (first at "
                                      f"{where[row.id]}); give the clips an id column")
            where[row.id] = f"{file}:{line}"
            rows.append(row)
            if roots is not None:
                roots[row.id] = os.path.abspath(base)
        columns += [c for c in meta if c not in columns]
    return rows, columns


def _clip_path(base: Path, text: str) -> tuple[str, str]:
    """(absolute path, id derived from the path as written)."""
    written = text.strip().replace("\\", "/")
    absolute = Path(os.path.abspath(base / written))
    return str(absolute), str(PurePosixPath(os.path.normpath(written).replace("\\", "/")))


def read_text(file: Path) -> str:
    """The file as text, refused unless it is UTF-8 (with or without a byte-order mark)."""
    raw = file.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise AnnotationError(f"{file}:1: UTF-16 text (it starts with a UTF-16 byte-order "
                              f"mark); save it as UTF-8, e.g. iconv -f UTF-16 -t UTF-8 "
                              f"{file} > fixed{file.suffix}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise AnnotationError(f"{file}:{line}: not UTF-8 (byte 0x{raw[err.start]:02x} at column "
                              f"{column}); convert it, e.g. from latin-1: iconv -f latin1 -t "
                              f"UTF-8 {file} > fixed{file.suffix}") from None
    nul = text.find("\0")
    if nul >= 0:
        raise AnnotationError(f"{file}:{text.count(chr(10), 0, nul) + 1}: contains a NUL "
                              f"character: a binary file, or UTF-16 without a byte-order mark")
    return text


def _check_path_field(file: Path, line: int, path: str) -> None:
    if len(path) > MAX_PATH_CHARS:
        raise AnnotationError(f"{file}:{line}: a path of {len(path)} characters (no file system "
                              f"takes more than {MAX_PATH_CHARS}); the line is broken")


def _read_csv(file: Path, labels: LabelSet, split: str, base: Path):
    reader = csv.reader(io.StringIO(read_text(file), newline=""))
    ended = [0]  # the last line of the last whole record: a broken record starts after it

    def records():
        while True:
            ended[0] = reader.line_num
            try:
                yield next(reader)
            except StopIteration:
                return
    try:
        return _parse_csv(file, records(), reader, labels, split, base)
    except csv.Error as err:
        problem = str(err)
        if "field larger than field limit" in problem:
            problem = (f"a field longer than {MAX_FIELD_CHARS} characters (an unclosed quote "
                       f"runs on, or this is not a CSV file)")
        raise AnnotationError(f"{file}:{ended[0] + 1}: {problem}") from None


def _parse_csv(file: Path, records, reader, labels: LabelSet, split: str, base: Path):
    header = next(records, None)
    while header is not None and not any(h.strip() for h in header):
        header = next(records, None)
    if header is None:
        raise AnnotationError(f"{file}:1: empty file")
    header = [h.strip() for h in header]
    header_line = reader.line_num
    for name in ("path", "label"):
        if name not in header:
            raise AnnotationError(f"{file}:{header_line}: missing column '{name}' "
                                  f"(columns: {', '.join(header)})")
    if len(set(header)) != len(header):
        raise AnnotationError(f"{file}:{header_line}: repeated column names")
    meta = [h for h in header if h not in RESERVED]
    out = []
    for values in records:
        line = reader.line_num
        if not any(v.strip() for v in values):
            continue
        if len(values) != len(header):
            raise AnnotationError(f"{file}:{line}: malformed line: {len(values)} fields, "
                                  f"the header has {len(header)}")
        record = dict(zip(header, (v.strip() for v in values)))
        if not record["path"]:
            raise AnnotationError(f"{file}:{line}: empty path")
        _check_path_field(file, line, record["path"])
        try:
            label = labels.index(record["label"])
        except LabelSetError as err:
            raise AnnotationError(f"{file}:{line}: {err}") from None
        path, derived = _clip_path(base, record["path"])
        out.append((line, ClipRow(id=record.get("id") or derived, path=path, label=label,
                                  split=record.get("split") or split,
                                  metadata={m: record[m] for m in meta if record[m] != ""})))
    if not out:
        raise AnnotationError(f"{file}:{header_line}: empty file (a header and no clips)")
    return out, meta


def _read_list(file: Path, labels: LabelSet, split: str, base: Path):
    out = []
    text = read_text(file)
    # Only newlines end a line (str.splitlines also splits at form feeds and the like).
    for line, raw in enumerate(text.replace("\r\n", "\n").split("\n"), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = stripped.rsplit(maxsplit=2)
        if (len(fields) != 3 or not _is_count(fields[1])
                or not _is_count(fields[2].removeprefix("-"))):
            raise AnnotationError(f"{file}:{line}: malformed line '{_clip(stripped)}': expected "
                                  f"'path n_frames label' (label 1..{len(labels)})")
        _check_path_field(file, line, fields[0])
        label = int(fields[2])
        if not 1 <= label <= len(labels):
            raise AnnotationError(f"{file}:{line}: label {label} out of range 1..{len(labels)} "
                                  f"(list files are 1-based; label set '{labels.name}')")
        path, derived = _clip_path(base, fields[0])
        out.append((line, ClipRow(id=derived, path=path, label=label - 1, split=split,
                                  listed_frames=int(fields[1]))))
    if not out:
        raise AnnotationError(f"{file}:1: empty file")
    return out, []


def _is_count(text: str) -> bool:
    # ASCII digits only ("²".isdigit() is true but int() refuses it), and few enough for int().
    return text.isascii() and text.isdigit() and len(text) <= 18


def _clip(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."
