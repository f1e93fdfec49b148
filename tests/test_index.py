"""`index LAYOUT ROOT`: each layout on a tiny tree written in that layout (real encoded clips
and JPEG frames, four 32x32 frames each), the `labels` command, and each layout end to end
through extract and train-head."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main
from conftest import moving_square_frames, write_frame_folder, write_video
from pipeline.annotations import read_annotations
from cache.core.labels import BUILTIN, CAER7, DAISEE, DFEW7, LabelSet, load_label_set


def _video(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    colors = [(255, 0, 0), (0, 200, 0), (0, 0, 255), (220, 220, 0)]
    return write_video(path, moving_square_frames(4, (32, 32), color=colors[seed % 4]), fps=10)


def _frames(folder: Path, stem: str, seed: int = 0) -> Path:
    colors = [(255, 0, 0), (0, 200, 0), (0, 0, 255), (220, 220, 0)]
    return write_frame_folder(folder, moving_square_frames(4, (32, 32), color=colors[seed % 4]),
                              pattern=stem + "_{i}.jpg")


def _index(*args):
    return CliRunner().invoke(main, ["index", *map(str, args)])


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# ----------------------------------------------------------------------------------- trees

@pytest.fixture(scope="module")
def caer_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("caer") / "CAER"
    n = 0
    for split, per_class in (("train", 3), ("validation", 1), ("test", 2)):
        for emotion in ("Anger", "Happy"):
            for i in range(1, per_class + 1):
                _video(root / split / emotion / f"{i:04d}.avi", n := n + 1)
    (root / "train" / "Happy" / "notes.txt").write_text("not a clip")
    return root


@pytest.fixture(scope="module")
def daisee_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("daisee") / "DAiSEE"
    rows = {"Train": [], "Validation": [], "Test": []}
    plan = {"Train": [("110001", "1100011001", 0), ("110001", "1100011002", 1),
                      ("110002", "1100021001", 2), ("110002", "1100021002", 3)],
            "Validation": [("210001", "2100011001", 1), ("210001", "2100011002", 2)],
            "Test": [("310001", "3100011001", 2), ("310001", "3100011002", 3)]}
    for split, clips in plan.items():
        for n, (subject, clip, engagement) in enumerate(clips):
            # The quirk: the label file says .avi, this one is an .mp4 on disk.
            ext = ".mp4" if clip == "1100021002" else ".avi"
            _video(root / "DataSet" / split / subject / clip / f"{clip}{ext}", n)
            rows[split].append(f"{clip}.avi,{n % 4},{engagement},{(n + 1) % 4},{(n + 2) % 4}")
    rows["Train"].append("1100099999.avi,0,3,0,0")  # labelled, missing from DataSet
    _video(root / "DataSet" / "Test" / "310001" / "3100019999" / "3100019999.avi")  # no row
    (root / "Labels").mkdir()
    for split, lines in rows.items():
        # The real files' header: "Frustration " with a trailing space.
        (root / "Labels" / f"{split}Labels.csv").write_text(
            "ClipID,Boredom,Engagement,Confusion,Frustration \n" + "\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def dfew_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dfew") / "DFEW"
    labels = {1: 1, 2: 1, 3: 4, 4: 4, 5: 7, 6: 7, 7: 1, 8: 4}  # clip -> DFEW label 1-7
    for clip in labels:
        _frames(root / "Clip" / "clip_224x224" / f"{clip:05d}", f"{clip:05d}", clip)
    _video(root / "Clip" / "original" / "data_part_1" / "00001.mp4")
    folds = {1: ([1, 3, 5, 7, 8, 99], [2, 4, 6]), 2: ([2, 4, 6, 7, 8], [1, 3, 5])}
    for fold, (train, test) in folds.items():
        for split, clips in (("train", train), ("test", test)):
            folder = root / "EmoLabel_DataSplit" / f"{split}(single-labeled)"
            folder.mkdir(parents=True, exist_ok=True)
            # Clip 99 is listed but not on disk (DFEW dropped clips without faces).
            body = "".join(f"{c},{labels.get(c, 3)}\n" for c in clips)
            (folder / f"set_{fold}.csv").write_text("video_name,label\n" + body)
    return root


@pytest.fixture(scope="module")
def folders_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folders") / "mine"
    n = 0
    for split, per_class in (("train", 3), ("Validation", 1), ("test", 2)):
        for name in ("engaged", "bored"):
            for i in range(per_class):
                n += 1
                if i % 2:
                    _frames(root / split / name / f"clip{i}", "frame", n)
                else:
                    _video(root / split / name / f"clip{i}.mp4", n)
    (root / "train" / "README.txt").write_text("class folders below")
    return root


# --------------------------------------------------------------------------- each layout

def test_caer_counts_splits_and_a_stray_file(caer_root, tmp_path):
    out = tmp_path / "caer.csv"
    result = _index("caer", caer_root, "--out", out)
    assert result.exit_code == 0, result.output
    rows = _rows(out)
    assert list(rows[0]) == ["path", "label", "split", "id"]
    counts = {(r["label"], r["split"]) for r in rows}
    assert counts == {(e, s) for e in ("Anger", "Happy") for s in ("train", "val", "test")}
    assert sum(r["split"] == "train" for r in rows) == 6 and len(rows) == 12
    assert rows[0]["path"] == "test/Anger/0001.avi" and rows[0]["id"] == rows[0]["path"]
    assert "skipped train/Happy/notes.txt: not a video file" in result.stderr
    table = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[1:10]}
    assert table["class"] == ["train", "val", "test", "total"]
    assert table["Anger"] == ["3", "1", "2", "6"] and table["Surprise"] == ["0"] * 4
    assert table["total"] == ["6", "2", "4", "12"]
    assert "--labels caer7" in result.stdout and "next: python cli.py extract" in result.stdout
    # What extract reads: every row valid against caer7, paths resolved below ROOT.
    clips, _ = read_annotations([out], CAER7, root=caer_root)
    assert all(Path(c.path).is_file() for c in clips) and len(clips) == 12


def test_caer_unknown_emotion_folder_is_exit_2_naming_it(caer_root, tmp_path):
    root = tmp_path / "CAER"
    shutil.copytree(caer_root, root)
    shutil.copytree(root / "test" / "Anger", root / "test" / "Contempt")
    line = _one_error_line(_index("caer", root, "--out", tmp_path / "x.csv"))
    assert str(root / "test" / "Contempt") in line and "not one of CAER's emotion" in line
    assert not (tmp_path / "x.csv").exists()


def test_daisee_levels_subjects_quirks_and_targets(daisee_root, tmp_path):
    out = tmp_path / "daisee.csv"
    result = _index("daisee", daisee_root, "--out", out)
    assert result.exit_code == 0, result.output
    rows = {r["id"]: r for r in _rows(out)}
    assert list(next(iter(rows.values()))) == ["path", "label", "split", "id", "subject",
                                               "boredom", "engagement", "confusion",
                                               "frustration"]
    assert len(rows) == 8
    assert {r["split"] for r in rows.values()} == {"train", "val", "test"}
    names = DAISEE["engagement"].names
    assert [rows[c]["label"] for c in ("1100011001", "1100011002", "1100021001")] == names[:3]
    mp4 = rows["1100021002"]  # listed as .avi, found as .mp4
    assert mp4["path"] == "DataSet/Train/110002/1100021002/1100021002.mp4"
    assert mp4["label"] == "Very high" and mp4["subject"] == "110002"
    assert mp4["frustration"] == "1"  # (3 + 2) % 4, the column whose header had the trailing space
    err = result.stderr
    assert "skipped Labels/TrainLabels.csv:6: clip 1100099999 is not in DataSet/Train" in err
    assert ("skipped DataSet/Test/310001/3100019999/3100019999.avi: no row in "
            "Labels/TestLabels.csv") in err
    assert "--labels daisee-engagement4" in result.stdout

    boredom = _index("daisee", daisee_root, "--out", tmp_path / "b.csv", "--target", "boredom")
    assert boredom.exit_code == 0
    labels = {r["id"]: r["label"] for r in _rows(tmp_path / "b.csv")}
    assert labels["1100011002"] == DAISEE["boredom"].names[1]  # boredom level n % 4 = 1
    clips, meta = read_annotations([out], load_label_set("daisee-engagement4"),
                                   root=daisee_root)
    assert meta[0] == "subject" and clips[0].metadata["subject"] == "110001"


def test_labels_override_maps_by_class_name_not_position(daisee_root, caer_root, tmp_path):
    """A --labels set in another order still gives each clip its own class."""
    reordered = dict(DAISEE["engagement"].as_dict(), name="mine")
    reordered["classes"] = reordered["classes"][::-1]
    spec = tmp_path / "mine.json"
    spec.write_text(json.dumps(reordered))
    result = _index("daisee", daisee_root, "--out", tmp_path / "d.csv", "--labels", spec)
    assert result.exit_code == 0, result.output
    rows = {r["id"]: r["label"] for r in _rows(tmp_path / "d.csv")}
    assert rows["1100011001"] == "Very low" and rows["1100021002"] == "Very high"
    assert f"--labels {spec}" in result.stdout
    # A CAER tree is a fine class-per-folder tree too; index says which command fits better.
    folders = _index("folders", caer_root, "--out", tmp_path / "f.csv")
    assert folders.exit_code == 0 and "looks like CAER" in folders.stdout


def test_daisee_bad_level_is_exit_2_with_file_and_line(daisee_root, tmp_path):
    root = tmp_path / "DAiSEE"
    shutil.copytree(daisee_root, root)
    labels = root / "Labels" / "ValidationLabels.csv"
    labels.write_text(labels.read_text().replace("2100011002.avi,1,2,", "2100011002.avi,1,5,"))
    line = _one_error_line(_index("daisee", root, "--out", tmp_path / "x.csv"))
    assert f"{labels}:3: Engagement is '5'; DAiSEE's levels are 0-3" in line


def test_dfew_fold_mapping_label_order_and_missing_clip(dfew_root, tmp_path):
    out = tmp_path / "dfew.csv"
    result = _index("dfew", dfew_root, "--out", out, "--fold", "1")
    assert result.exit_code == 0, result.output
    rows = {r["id"]: r for r in _rows(out)}
    assert sorted(rows) == [f"{c:05d}" for c in range(1, 9)]
    assert {c for c, r in rows.items() if r["split"] == "test"} == {"00002", "00004", "00006"}
    # DFEW's 1 Happy, 4 Angry, 7 Fear.
    assert (rows["00001"]["label"], rows["00003"]["label"], rows["00005"]["label"]) == \
        ("Happy", "Angry", "Fear")
    assert rows["00001"]["path"] == "Clip/clip_224x224/00001" and rows["00001"]["fold"] == "1"
    assert ("skipped EmoLabel_DataSplit/train(single-labeled)/set_1.csv:7: clip 00099 is not "
            "in Clip/clip_224x224") in result.stderr
    fold2 = _index("dfew", dfew_root, "--out", tmp_path / "f2.csv", "--fold", "2")
    assert fold2.exit_code == 0
    test2 = {r["id"] for r in _rows(tmp_path / "f2.csv") if r["split"] == "test"}
    assert test2 == {"00001", "00003", "00005"}
    videos = _index("dfew", dfew_root, "--out", tmp_path / "v.csv", "--clips", "original")
    assert videos.exit_code == 0
    assert [r["path"] for r in _rows(tmp_path / "v.csv")] == \
        ["Clip/original/data_part_1/00001.mp4"]
    assert "clip 00003 is not in Clip/original" in videos.stderr
    assert [DFEW7.names[i] for i in (0, 3, 6)] == ["Happy", "Angry", "Fear"]


def test_dfew_bad_label_and_zipped_split_are_exit_2(dfew_root, tmp_path):
    root = tmp_path / "DFEW"
    shutil.copytree(dfew_root, root)
    split = root / "EmoLabel_DataSplit" / "test(single-labeled)" / "set_1.csv"
    split.write_text("video_name,label\n2,1\n4,8\n")
    line = _one_error_line(_index("dfew", root, "--out", tmp_path / "x.csv"))
    assert f"{split}:3: label '8' is not 1-7" in line
    shutil.rmtree(split.parent)
    empty_zip = b"PK\x05\x06" + bytes(18)
    (root / "EmoLabel_DataSplit" / "test(single_labeled).zip").write_bytes(empty_zip)
    line = _one_error_line(_index("dfew", root, "--out", tmp_path / "x.csv"))
    assert "test(single_labeled).zip: still an archive; unzip it" in line


def test_folders_splits_mixed_clips_and_a_written_label_set(folders_root, tmp_path):
    out = tmp_path / "mine.csv"
    result = _index("folders", folders_root, "--out", out)
    assert result.exit_code == 0, result.output
    rows = _rows(out)
    assert {r["split"] for r in rows} == {"train", "val", "test"}  # "Validation" -> val
    assert sum(r["label"] == "bored" for r in rows) == 6 and len(rows) == 12
    assert "train/engaged/clip1" in {r["path"] for r in rows}  # a frame folder
    assert "skipped train/README.txt: a file where class folders belong" in result.stderr
    written = tmp_path / "mine.labels.yaml"
    labels = load_label_set(str(written))
    assert labels.names == ["bored", "engaged"] and labels.classes[0].descriptor == "bored"
    assert f"--labels {written}" in result.stdout
    clips, _ = read_annotations([out], labels, root=folders_root)
    assert len(clips) == 12
    # With --labels the folder names must be classes of that set.
    refused = _index("folders", folders_root, "--out", tmp_path / "r.csv", "--labels", "caer7")
    assert "has no class 'bored', 'engaged'" in _one_error_line(refused)


def test_folders_depth_mismatch_names_the_other_split_from(folders_root, tmp_path):
    flat = _index("folders", folders_root / "train", "--out", tmp_path / "a.csv")
    line = _one_error_line(flat)
    assert "a clip where class folders belong" in line and "--split-from none" in line
    deep = _index("folders", folders_root, "--out", tmp_path / "b.csv", "--split-from", "none")
    assert "use --split-from folder" in _one_error_line(deep)
    ok = _index("folders", folders_root / "train", "--out", tmp_path / "c.csv",
                "--split-from", "none")
    assert ok.exit_code == 0 and {r["split"] for r in _rows(tmp_path / "c.csv")} == {""}
    assert "--split train" in ok.stdout and "note: no split" in ok.stdout


@pytest.mark.parametrize("layout", ["caer", "daisee", "dfew", "folders"])
def test_empty_root_is_exit_2(layout, tmp_path):
    (tmp_path / "root").mkdir()
    line = _one_error_line(_index(layout, tmp_path / "root", "--out", tmp_path / "x.csv"))
    assert "root: empty; the " + layout + " layout is" in line


@pytest.mark.parametrize("layout,other", [("caer", "daisee"), ("daisee", "dfew"),
                                          ("dfew", "caer"), ("folders", "daisee"),
                                          ("caer", "folders"), ("folders", "dfew")])
def test_a_root_of_another_layout_names_it(layout, other, request, tmp_path):
    root = request.getfixturevalue(f"{other}_root")
    line = _one_error_line(_index(layout, root, "--out", tmp_path / "x.csv"))
    assert f"not the {layout} layout" in line and f"looks like the {other} layout" in line
    assert f"python cli.py index {other} {root}" in line and not (tmp_path / "x.csv").exists()


def test_a_root_one_level_above_the_dataset_names_the_folder_below(daisee_root, tmp_path):
    above = daisee_root.parent
    line = _one_error_line(_index("daisee", above, "--out", tmp_path / "x.csv"))
    assert f"{daisee_root} looks like it: python cli.py index daisee {daisee_root}" in line


def test_out_is_never_overwritten_without_force_and_options_check_themselves(caer_root,
                                                                             tmp_path):
    out = tmp_path / "caer.csv"
    out.write_text("mine")
    assert "exists; pass --force" in _one_error_line(_index("caer", caer_root, "--out", out))
    assert out.read_text() == "mine"
    assert _index("caer", caer_root, "--out", out, "--force").exit_code == 0
    assert len(_rows(out)) == 12
    assert "--fold applies to the dfew layout only" in _one_error_line(
        _index("caer", caer_root, "--out", out, "--fold", "2"))
    assert "--fold must be 1..5" in _one_error_line(
        _index("dfew", caer_root, "--out", out, "--fold", "6"))
    assert "must end in .csv" in _one_error_line(_index("caer", caer_root, "--out", "a.txt"))
    assert "no such directory" in _one_error_line(_index("caer", tmp_path / "nope", "--out", out))
    # A Python caller gets the same checks: the library function validates its config.
    from pipeline.config import IndexConfig
    from pipeline.datasets import index_dataset
    from cache.core.errors import CaerError

    with pytest.raises(CaerError, match="--split-from applies to the folders layout only"):
        index_dataset(IndexConfig(layout="dfew", root=str(caer_root), out=str(out),
                                  split_from="none"))
    with pytest.raises(CaerError, match="LAYOUT must be one of caer, daisee, dfew, folders"):
        index_dataset(IndexConfig(layout="kinetics", root=str(caer_root), out=str(out)))


def test_index_help_documents_every_layout_with_an_example():
    text = CliRunner().invoke(main, ["index", "--help"]).output
    for layout in ("caer", "daisee", "dfew", "folders"):
        assert f"\n         {layout} " in text or f"  {layout}  " in text
    assert "Examples:" in text
    for layout in ("caer", "daisee", "dfew", "folders"):
        assert f"python cli.py index {layout} " in text
    for flag in ("--target", "--fold", "--clips", "--split-from", "--labels", "--force"):
        assert flag in text


# -------------------------------------------------------------------------------- labels

def test_labels_lists_every_builtin_set_in_order_with_descriptors():
    result = CliRunner().invoke(main, ["labels"])
    assert result.exit_code == 0
    for name, labels in BUILTIN.items():
        assert f"{name}: {len(labels)} classes" in result.output
    for name in ("dfew7", "ferv39k7", "mafw11", "daisee-engagement4", "daisee-boredom4",
                 "daisee-confusion4", "daisee-frustration4"):
        assert name in BUILTIN
    block = result.output.split("dfew7:")[1].split("\n\n")[0]
    assert [line.split()[1] for line in block.splitlines()[1:] if line[2:3].isdigit()] == \
        ["Happy", "Sad", "Neutral", "Angry", "Surprise", "Disgust", "Fear"]
    assert BUILTIN["mafw11"].names[7:] == ["Contempt", "Anxiety", "Helplessness",
                                           "Disappointment"]
    face = "Drooping eyelids, a flat expression, and a pressed or yawning mouth."
    assert BUILTIN["daisee-boredom4"].classes[2].face_descriptor == face
    assert BUILTIN["daisee-boredom4"].classes[2].descriptor.startswith(face + " ")
    one = CliRunner().invoke(main, ["labels", "mafw11", "--json"])
    assert LabelSet.from_dict(json.loads(one.output)) == BUILTIN["mafw11"]
    assert "no built-in label set 'nope'" in _one_error_line(CliRunner().invoke(
        main, ["labels", "nope"]))


def test_every_builtin_prompt_fits_the_text_context():
    """[SOS] + 8 context vectors + descriptor + [EOT] within CLIP's 77 tokens with CLIP's own
    vocabulary, so no descriptor is cut."""
    from pipeline.tokenizer import clean_text, clip_tokenizer

    tokenizer = clip_tokenizer()
    for labels in BUILTIN.values():
        for c in labels.classes:
            for text in (c.descriptor, c.face_descriptor):
                n = len(tokenizer(clean_text(text))["input_ids"])  # with SOS and EOT
                assert n + 8 <= 77, (labels.name, n, text)


# ---------------------------------------------------------------------------- end to end

@pytest.mark.slow
@pytest.mark.parametrize("layout", ["caer", "daisee", "dfew", "folders"])
def test_index_extract_train_head(layout, request, tmp_path, one_torch_thread):
    """The printed extract command, run as printed (random:tiny, 4 segments), then train-head;
    DAiSEE's subject column reaches `evaluate --group-by`."""
    import shlex

    from cache import open_store

    root = request.getfixturevalue(f"{layout}_root")
    out = tmp_path / f"{layout}.csv"
    result = _index(layout, root, "--out", out)
    assert result.exit_code == 0, result.output
    next_line = [line for line in result.stdout.splitlines() if line.startswith("next: ")][0]
    extract = shlex.split(next_line[len("next: "):])
    assert extract[:3] == ["python", "cli.py", "extract"]
    cache = Path(extract[extract.index("--cache") + 1])
    assert cache == tmp_path / f"{layout}.zarr"
    ran = CliRunner().invoke(main, [*extract[2:], "--clip", "random:tiny", "--segments", "4",
                                    "--workers", "0", "--quiet"])
    assert ran.exit_code == 0, ran.output
    store = open_store(str(cache))
    assert len(store.manifest) == len(_rows(out)) and set(store.manifest.status) == {"ok"}
    run = tmp_path / "run"
    trained = CliRunner().invoke(main, ["train-head", "--cache", str(cache), "--out", str(run),
                                        "--epochs", "1", "--quiet", "--device", "cpu",
                                        "--val-fraction", "0.25"])
    assert trained.exit_code == 0, trained.output
    assert (run / "head.safetensors").is_file()
    if layout == "daisee":
        scored = CliRunner().invoke(main, ["evaluate", "--run", str(run), "--cache", str(cache),
                                           "--split", "test", "--group-by", "subject", "--json"])
        assert scored.exit_code == 0, scored.output
        report = json.loads(scored.stdout)
        assert report["group_by"] == "subject" and list(report["groups"]) == ["310001"]
        assert report["groups"]["310001"]["n"] == 2
