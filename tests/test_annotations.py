"""Annotation files: both formats, and one FILE:LINE line for each kind of bad file."""

from __future__ import annotations

import pytest

from pipeline.annotations import AnnotationError, read_annotations
from cache.core.labels import RAER5


def _write(path, text):
    path.write_text(text)
    return path


def test_csv_with_names_indices_metadata_and_root(tmp_path):
    f = _write(tmp_path / "a.csv", "path,label,split,scene\nclips/x.mp4,Confusion,train,lab\n"
                                   "clips/y,0,,dorm\n\n")
    rows, meta = read_annotations([f], RAER5, ["test"], root=tmp_path / "data")
    assert meta == ["scene"]
    assert [r.label for r in rows] == [2, 0]
    assert [r.split for r in rows] == ["train", "test"]  # the column wins, --split fills in
    assert rows[0].path == str(tmp_path / "data" / "clips" / "x.mp4")
    assert [r.id for r in rows] == ["clips/x.mp4", "clips/y"]
    assert rows[0].metadata == {"scene": "lab"} and rows[0].listed_frames == -1


def test_list_file_is_one_based_with_frame_counts(tmp_path):
    f = _write(tmp_path / "train.txt", "# comment\nRAER/a b/0001 36 1\nRAER/0002 30 5\n")
    rows, meta = read_annotations([f], RAER5, ["train"])
    assert [r.label for r in rows] == [0, 4] and [r.listed_frames for r in rows] == [36, 30]
    assert rows[0].id == "RAER/a b/0001" and rows[0].path == str(tmp_path / "RAER/a b/0001")
    assert {r.split for r in rows} == {"train"} and meta == []


def test_ids_from_column_and_splits_per_file(tmp_path):
    a = _write(tmp_path / "a.csv", "id,path,label\nfirst,x.mp4,1\n")
    b = _write(tmp_path / "b.txt", "x.mp4 10 2\n")
    rows, _ = read_annotations([a, b], RAER5, ["s1", "s2"])
    assert [(r.id, r.split) for r in rows] == [("first", "s1"), ("x.mp4", "s2")]


@pytest.mark.parametrize("name,text,problem", [
    ("a.csv", "path,label\nx.mp4,Boredom\n", ":2: unknown label 'Boredom'"),
    ("a.csv", "path,split\nx.mp4,train\n", ":1: missing column 'label'"),
    ("a.csv", "", ":1: empty file"),
    ("a.csv", "path,label\n", ":1: empty file"),
    ("a.csv", "path,label\nx.mp4,1\ny.mp4,2\nx.mp4,3\n", ":4: duplicate id 'x.mp4'"),
    ("a.csv", "path,label\nx.mp4,5\n", ":2: label 5 is out of range 0..4"),
    ("a.csv", "path,label\nx.mp4,1,extra\n", ":2: malformed line"),
    ("a.txt", "x 10 1\ny 10 6\n", ":2: label 6 out of range 1..5"),
    ("a.txt", "x 10 0\n", ":1: label 0 out of range 1..5"),
    ("a.txt", "x ten 1\n", ":1: malformed line"),
    ("a.txt", "\n\n", ":1: empty file"),
])
def test_bad_files_give_one_line_naming_file_and_line(tmp_path, name, text, problem):
    f = _write(tmp_path / name, text)
    with pytest.raises(AnnotationError) as err:
        read_annotations([f], RAER5, ["train"])
    message = str(err.value)
    assert message.startswith(str(f) + problem.split(" ", 1)[0]) or f"{f}{problem}" in message
    assert problem in message and "\n" not in message and err.value.exit_code == 2


def test_duplicate_id_across_files_and_split_count(tmp_path):
    a = _write(tmp_path / "a.txt", "x 10 1\n")
    b = _write(tmp_path / "b.txt", "x 10 2\n")
    with pytest.raises(AnnotationError,
                       match=r"b\.txt:1: duplicate id 'x' \(first at .*a\.txt:1\)"):
        read_annotations([a, b], RAER5, ["train"])
    with pytest.raises(AnnotationError, match="--split given 3 times for 2"):
        read_annotations([a, b], RAER5, ["p", "q", "r"])
    with pytest.raises(AnnotationError, match="no such annotation file"):
        read_annotations([tmp_path / "nope.csv"], RAER5)


# ---- files in another encoding, or broken: one FILE:LINE line, exit 2, nothing written ------

_LATIN1_CSV = "path,label,scene\nclips/a.mp4,Neutrality,caf\u00e9\nclips/b.mp4,1,lab\n"


@pytest.mark.parametrize("name,data,problem", [
    ("latin1.csv", _LATIN1_CSV.encode("latin-1"), ":2: not UTF-8 (byte 0xe9 at column 27)"),
    ("latin1.txt", "Images/\u00e9t\u00e9 36 1\n".encode("latin-1"), ":1: not UTF-8 (byte 0xe9"),
    ("utf16.csv", _LATIN1_CSV.encode("utf-16"), ":1: UTF-16 text"),
    ("utf16.txt", "Images/0001 36 1\n".encode("utf-16"), ":1: UTF-16 text"),
    ("nobom16.txt", "Images/0001 36 1\n".encode("utf-16-le"), ":1: contains a NUL character"),
    ("huge.csv", b"path,label\nx.mp4,1\n\"" + b"y" * 200_000 + b"\",2\n",
     ":3: a field longer than 131072 characters"),
    ("unclosed.csv", b"path,label\nx.mp4,1\n\"y.mp4,2\n" + b"z" * 140_000 + b"\n",
     ":3: a field longer than 131072 characters (an unclosed quote"),
    ("longpath.csv", b"path,label\n" + b"d/" * 3000 + b"x.mp4,1\n", ":2: a path of 6005 characters"),
    ("longpath.txt", b"a 1 1\n" + b"d/" * 3000 + b"x 36 1\n", ":2: a path of 6001 characters"),
    ("digits.txt", "x \u00b2 1\n".encode(), ":1: malformed line"),
    ("bigcount.txt", b"x " + b"9" * 5000 + b" 1\n", ":1: malformed line"),
    ("biglabel.csv", b"path,label\nx.mp4," + b"9" * 5000 + b"\n", ":2: unknown label '999"),
])
def test_undecodable_and_broken_files_give_one_line(tmp_path, name, data, problem):
    f = tmp_path / name
    f.write_bytes(data)
    with pytest.raises(AnnotationError) as err:
        read_annotations([f], RAER5, ["train"])
    message = str(err.value)
    assert message.startswith(f"{f}{problem}"), message
    assert "\n" not in message and len(message) < 400 and err.value.exit_code == 2


def test_utf8_with_and_without_bom_read_the_same(tmp_path):
    text = "path,label,scene\nclips/\u00e9t\u00e9.mp4,Neutrality,caf\u00e9\n"
    plain, bom = tmp_path / "plain.csv", tmp_path / "bom.csv"
    plain.write_bytes(text.encode("utf-8"))
    bom.write_bytes(text.encode("utf-8-sig"))
    assert read_annotations([plain], RAER5) == read_annotations([bom], RAER5)
    rows, meta = read_annotations([bom], RAER5)
    assert meta == ["scene"] and rows[0].metadata == {"scene": "caf\u00e9"}
    assert rows[0].id == "clips/\u00e9t\u00e9.mp4"
    listed = tmp_path / "list.txt"
    listed.write_bytes("Images/\u00e9t\u00e9 36 1\n".encode("utf-8-sig"))
    assert read_annotations([listed], RAER5, ["train"])[0][0].id == "Images/\u00e9t\u00e9"


def test_extract_refuses_a_latin1_csv_with_exit_2_and_writes_nothing(tmp_path):
    from click.testing import CliRunner

    from cli import main

    f = tmp_path / "latin1.csv"
    f.write_bytes(_LATIN1_CSV.encode("latin-1"))
    cache = tmp_path / "out.zarr"
    result = CliRunner().invoke(main, ["extract", "--annotations", str(f), "--cache", str(cache),
                                       "--clip", "random:tiny", "--workers", "0"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith(f"error: {f}:2: not UTF-8") and "iconv" in lines[-1]
    assert not cache.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["latin1.csv"]
