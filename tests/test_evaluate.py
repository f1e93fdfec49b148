"""`evaluate`: a tiny run (random:tiny CLIP, untrained head) on small synthetic caches.

The expected numbers are recomputed independently: the model's own forward on the middle
candidate of each segment, then scikit-learn's metrics on those predictions.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from sklearn.metrics import accuracy_score, confusion_matrix, recall_score

import cli
from cache.fingerprint import make_fingerprint
from cache.layout import ClipResult, ClipRow
from cache.writer import StoreWriter, create_zarr
from heads.evaluate import EvaluateConfig, evaluate
from heads.metrics import REPORT_KEYS
from heads.model import CaerModel, HeadConfig
from heads.run import save_run
from pipeline.clip import build_random_clip
from cache.core.errors import CaerError
from cache.core.labels import RAER5

SEGMENTS, K, D = 4, 3, 512


@pytest.fixture(scope="module")
def tiny():
    return build_random_clip("tiny")


def fingerprint(clip, **overrides):
    fp = dict(clip_spec=clip.spec, clip_revision=clip.revision, feature_dim=D, image_size=224,
              segments=SEGMENTS, candidates=K, flip=False, pixels=False, normalize="clip",
              face_model="full", face_margin=20, min_face_score=0.5, face_resize="squash",
              face_boxes=None, labels=RAER5)
    fp.update(overrides)
    return make_fingerprint(**fp)


def make_run(path, clip, kind="train-head", cache_fp=None, preprocessing=None):
    torch.manual_seed(0)
    model = CaerModel(HeadConfig(segments=SEGMENTS), clip, RAER5)
    save_run(path, model, kind=kind, train_options={}, cache_fingerprint=cache_fp,
             save_clip=True, preprocessing=preprocessing)
    return path


def make_store(path, fp, labels, splits, scenes, failed=(), seed=0):
    """A Zarr store written through the store's own writer, with a `scene` metadata column;
    rows in ``failed`` are recorded as failed with a reason."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    rows = [ClipRow(f"c{i:02d}", f"/videos/c{i:02d}.mp4", int(labels[i]), splits[i],
                    {"scene": scenes[i]}) for i in range(n)]
    create_zarr(path, fp, rows, ["scene"])
    writer = StoreWriter(path)
    arrays = {"face": rng.standard_normal((n, SEGMENTS, K, D)).astype(np.float16),
              "context": rng.standard_normal((n, SEGMENTS, K, D)).astype(np.float16)}
    if fp["pixels"]:  # 8x8 random blocks blown up to 224: distinct crops that compress fast
        for stream in ("face", "context"):
            blocks = rng.integers(0, 256, (n, SEGMENTS, K, 3, 8, 8), np.uint8)
            arrays[f"pixels_{stream}"] = blocks.repeat(28, axis=-1).repeat(28, axis=-2)
    for i in range(n):
        if i in failed:
            writer.write_clip(i, ClipResult("failed", reason="not a video: invalid data"))
            continue
        pixels = ({"face": arrays["pixels_face"][i], "context": arrays["pixels_context"][i]}
                  if fp["pixels"] else {})
        writer.write_clip(i, ClipResult(
            "ok", n_frames=40, fps=25.0, width=320, height=240,
            frame_index=np.arange(SEGMENTS * K).reshape(SEGMENTS, K),
            box=np.zeros((SEGMENTS, K, 4), np.float32), score=np.ones((SEGMENTS, K), np.float32),
            found=np.ones((SEGMENTS, K), bool),
            features={"face": arrays["face"][i], "context": arrays["context"][i]}, pixels=pixels))
    writer.close()
    return arrays


# 14 clips: 10 test (one failed, Confusion absent from test), 4 train.
LABELS = [0, 0, 0, 1, 1, 3, 3, 4, 4, 4, 0, 1, 2, 3]
SPLITS = ["test"] * 10 + ["train"] * 4
SCENES = ["library", "classroom"] * 7
FAILED = (4,)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny):
    root = tmp_path_factory.mktemp("evaluate")
    fp = fingerprint(tiny)
    run = make_run(root / "run", tiny, cache_fp=fp)
    arrays = make_store(root / "cache.zarr", fp, LABELS, SPLITS, SCENES, failed=FAILED)
    return root, run, arrays


def expected_probs(run, arrays, rows, pixels=False):
    from heads.run import load_run

    model = load_run(run)  # rebuilt from the run directory, as evaluate does
    mid = K // 2
    with torch.no_grad():
        if pixels:
            f = torch.from_numpy(arrays["pixels_face"][rows][:, :, mid]).float() / 255
            c = torch.from_numpy(arrays["pixels_context"][rows][:, :, mid]).float() / 255
            logits = model.forward_pixels(f, c)
        else:
            f = torch.from_numpy(arrays["face"][rows][:, :, mid]).float()
            c = torch.from_numpy(arrays["context"][rows][:, :, mid]).float()
            logits = model.forward_features(f, c)
    return torch.softmax(logits, -1).numpy()


def test_evaluate_writes_report_predictions_and_confusion(setup, tmp_path, caplog):
    root, run, arrays = setup
    out = tmp_path / "report"
    with caplog.at_level(logging.WARNING, logger="caer"):
        result = evaluate(EvaluateConfig(run=str(run), cache=str(root / "cache.zarr"),
                                         split="test", out=str(out), batch_size=4),
                          progress=False)
    rows = [i for i in range(10) if i not in FAILED]
    probs = expected_probs(run, arrays, rows)
    y_true = np.array(LABELS)[rows]
    y_pred = probs.argmax(1)
    classes = RAER5.names

    # predictions.csv: the evaluated clips, their labels and one probability column per class
    table = pd.read_csv(out / "predictions.csv")
    assert list(table.columns) == (["id", "true_label", "predicted_label", "correct"]
                                   + [f"prob_{c}" for c in classes])
    assert table["id"].tolist() == [f"c{i:02d}" for i in rows]
    assert table["true_label"].tolist() == [classes[i] for i in y_true]
    assert table["predicted_label"].tolist() == [classes[i] for i in y_pred]
    np.testing.assert_allclose(table[[f"prob_{c}" for c in classes]].to_numpy(), probs,
                               atol=1e-5)
    np.testing.assert_allclose(table[[f"prob_{c}" for c in classes]].sum(1), 1.0, atol=1e-5)

    # report.json: the same numbers scikit-learn gives on those predictions
    report = json.loads((out / "report.json").read_text())
    assert set(report) == set(REPORT_KEYS)
    assert report["n"] == 9
    assert report["war"] == pytest.approx(accuracy_score(y_true, y_pred))
    present = sorted(set(y_true.tolist()))
    assert report["uar"] == pytest.approx(recall_score(y_true, y_pred, labels=present,
                                                       average="macro"))
    assert report["confusion"] == confusion_matrix(y_true, y_pred, labels=range(5)).tolist()
    assert report["absent_classes"] == ["Confusion"]
    assert report["classes"] == classes
    src = report["source"]
    assert src["split"] == "test" and src["clips_in_split"] == 10 and src["evaluated"] == 9
    assert src["skipped"] == [{"id": "c04", "status": "failed",
                               "reason": "not a video: invalid data"}]
    assert src["run_kind"] == "train-head"
    assert result.report.to_dict() == report

    warnings = " ".join(r.getMessage() for r in caplog.records)
    assert "Confusion" in warnings and "left out of UAR" in warnings
    assert "1 of 10 clips" in warnings

    from PIL import Image

    with Image.open(out / "confusion_matrix.png") as image:
        image.verify()


def test_cli_json_with_group_by_prints_only_json(setup, tmp_path):
    root, run, arrays = setup
    out = tmp_path / "grouped"
    result = CliRunner().invoke(cli.main, ["evaluate", "--run", str(run), "--cache",
                                           str(root / "cache.zarr"), "--out", str(out),
                                           "--group-by", "scene", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # the whole of stdout is the JSON report
    assert report == json.loads((out / "report.json").read_text())
    assert report["group_by"] == "scene"
    assert set(report["groups"]) == {"classroom", "library"}
    rows = [i for i in range(10) if i not in FAILED]
    y_pred = expected_probs(run, arrays, rows).argmax(1)
    for scene, group in report["groups"].items():
        mask = np.array([SCENES[i] == scene for i in rows])
        y_true = np.array(LABELS)[rows][mask]
        assert group["n"] == mask.sum()
        assert group["war"] == pytest.approx(accuracy_score(y_true, y_pred[mask]))
        assert set(group) == set(REPORT_KEYS)
    assert sum(g["n"] for g in report["groups"].values()) == report["n"]
    table = pd.read_csv(out / "predictions.csv")
    assert table["scene"].tolist() == [SCENES[i] for i in rows]


def test_cli_table_and_default_out_dir(setup):
    root, run, _ = setup
    result = CliRunner().invoke(cli.main, ["evaluate", "--run", str(run), "--cache",
                                           str(root / "cache.zarr"), "--split", "train"])
    assert result.exit_code == 0, result.output
    for name in RAER5.names:
        assert name in result.stdout
    assert "UAR" in result.stdout and "WAR" in result.stdout
    out = run / "eval" / "cache-train"
    assert {p.name for p in out.iterdir()} == {"report.json", "predictions.csv",
                                               "confusion_matrix.png"}
    assert json.loads((out / "report.json").read_text())["n"] == 4


@pytest.mark.parametrize("args,message", [
    (["--split", "val"], "no clip of"),
    (["--group-by", "room"], "not a metadata column"),
])
def test_bad_split_or_column_is_refused_and_nothing_is_written(setup, tmp_path, args, message):
    root, run, _ = setup
    out = tmp_path / "never"
    result = CliRunner().invoke(cli.main, ["evaluate", "--run", str(run), "--cache",
                                           str(root / "cache.zarr"), "--out", str(out), *args])
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.parametrize("change,option", [
    ({"normalize": "none"}, "--normalize"),
    ({"face_resize": "letterbox"}, "--face-resize"),
    ({"downscale": "fast"}, "--downscale"),
    ({"clip_revision": "other-weights"}, "--clip"),
])
def test_mismatched_cache_is_refused_with_the_extract_command(setup, tmp_path, tiny, change,
                                                              option):
    _, run, _ = setup
    cache = tmp_path / "other.zarr"
    make_store(cache, fingerprint(tiny, **change), LABELS[:3], ["test"] * 3, SCENES[:3])
    out = tmp_path / "never"
    result = CliRunner().invoke(cli.main, ["evaluate", "--run", str(run), "--cache", str(cache),
                                           "--out", str(out)])
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and "does not match" in line and option in line
    assert not out.exists()
    command = line.split("Build a matching cache with: ", 1)[1]
    # The suggested command reproduces the run's values and parses with the real extract.
    args = command.split()
    assert args[:3] == ["python", "cli.py", "extract"]
    assert "--clip random:tiny" in command and "--normalize clip" in command
    assert "--face-resize squash" in command and "--segments 4" in command
    cli.main.commands["extract"].make_context("extract", args[3:])


def test_other_classes_are_refused(setup, tmp_path, tiny):
    from cache.core.labels import CAER7

    _, run, _ = setup
    cache = tmp_path / "caer.zarr"
    make_store(cache, fingerprint(tiny, labels=CAER7), [0, 5, 6], ["test"] * 3, SCENES[:3])
    with pytest.raises(CaerError, match="--labels .*Surprise"):
        evaluate(EvaluateConfig(run=str(run), cache=str(cache), out=str(tmp_path / "x")))


def test_finetune_run_reencodes_stored_crops(tmp_path, tiny):
    fp = fingerprint(tiny, pixels=True, clip_revision="base-clip-features")
    run = make_run(tmp_path / "ft", tiny, kind="finetune", cache_fp=fp)
    labels, splits = [0, 1, 3, 4], ["test"] * 4
    arrays = make_store(tmp_path / "px.zarr", fp, labels, splits, SCENES[:4])
    result = evaluate(EvaluateConfig(run=str(run), cache=str(tmp_path / "px.zarr"),
                                     out=str(tmp_path / "out")), progress=False)
    probs = result.predictions[[f"prob_{c}" for c in RAER5.names]].to_numpy()
    np.testing.assert_allclose(probs, expected_probs(run, arrays, [0, 1, 2, 3], pixels=True),
                               atol=1e-5)
    assert result.report.source["inputs"].startswith("stored crops")

    # The same run on a cache without crops: refused, and told to extract with --pixels.
    make_store(tmp_path / "nopx.zarr", fingerprint(tiny), labels, splits, SCENES[:4])
    with pytest.raises(CaerError, match="--pixels") as err:
        evaluate(EvaluateConfig(run=str(run), cache=str(tmp_path / "nopx.zarr")))
    assert str(err.value).rstrip().endswith("--pixels")


def test_import_official_run_needs_a_cache_from_its_own_clip(tmp_path, tiny):
    from pipeline.clip import LoadedClip, load_clip, weights_digest

    base = tiny
    # As heads/official.py does: the converted CLIP is identified by its weights' digest.
    clip = LoadedClip(base.model, base.tokenizer, "import-official:model_best.pth",
                      weights_digest(base.model))
    torch.manual_seed(0)
    model = CaerModel(HeadConfig(segments=SEGMENTS), clip, RAER5, normalize="none")
    run = tmp_path / "official"
    save_run(run, model, kind="import-official", train_options={}, cache_fingerprint=None,
             save_clip=True, preprocessing={"normalize": "none", "face_resize": "squash",
                                            "face_margin": 20})
    stale = tmp_path / "stale.zarr"
    make_store(stale, fingerprint(base, normalize="none"), [0, 1], ["test"] * 2, SCENES[:2])
    with pytest.raises(CaerError) as err:
        evaluate(EvaluateConfig(run=str(run), cache=str(stale)))
    command = str(err.value).split("Build a matching cache with: ", 1)[1]
    assert f"--clip {run / 'clip'}" in command and "--normalize none" in command
    # A cache extracted with --clip RUN/clip has exactly the run's revision: accepted.
    own = load_clip(str(run / "clip"))
    good = tmp_path / "good.zarr"
    arrays = make_store(good, fingerprint(own, normalize="none"), [0, 1], ["test"] * 2,
                        SCENES[:2])
    result = evaluate(EvaluateConfig(run=str(run), cache=str(good), out=str(tmp_path / "o")),
                      progress=False)
    probs = result.predictions[[f"prob_{c}" for c in RAER5.names]].to_numpy()
    np.testing.assert_allclose(probs, expected_probs(run, arrays, [0, 1]), atol=1e-5)


def test_hdf5_cache_gives_the_same_predictions_and_damaged_features_are_refused(setup, tmp_path,
                                                                                tiny):
    from cache import build_store_from_arrays

    root, run, arrays = setup
    rows = [i for i in range(10) if i not in FAILED]
    fp = {k: v for k, v in fingerprint(tiny).items() if k not in ("flip", "pixels")}
    build_store_from_arrays(tmp_path / "c.h5", face=arrays["face"][rows],
                            context=arrays["context"][rows], labels=np.array(LABELS)[rows],
                            splits="test", ids=[f"c{i:02d}" for i in rows], fingerprint=fp)
    h5 = evaluate(EvaluateConfig(run=str(run), cache=str(tmp_path / "c.h5")), write=False,
                  progress=False)
    probs = h5.predictions[[f"prob_{c}" for c in RAER5.names]].to_numpy()
    np.testing.assert_allclose(probs, expected_probs(run, arrays, rows), atol=1e-5)

    face = arrays["face"][rows].copy()
    face[2, 1] = np.nan  # a damaged clip
    build_store_from_arrays(tmp_path / "nan.zarr", face=face, context=arrays["context"][rows],
                            labels=np.array(LABELS)[rows], splits="test",
                            ids=[f"c{i:02d}" for i in rows], fingerprint=fp)
    with pytest.raises(CaerError, match=r"non-finite predictions for 1 clips \(c02\)"):
        evaluate(EvaluateConfig(run=str(run), cache=str(tmp_path / "nan.zarr"),
                                out=str(tmp_path / "never")), progress=False)
    assert not (tmp_path / "never").exists()


def test_a_run_made_before_downscale_asks_for_exact_crops(tmp_path):
    """A run whose preprocessing predates --downscale was trained on "exact" crops (what every
    store was then): evaluate asks for those, and its extract command says so."""
    from heads.evaluate import extract_command, required_fingerprint

    preprocessing = {"normalize": "clip", "face_resize": "squash", "face_margin": 20,
                     "segments": 16, "image_size": 224, "frame_order": "natural",
                     "face_crop": "caer", "context": "full", "context_resize": "caer"}
    old = {"kind": "train-head", "clip": {"spec": "random:tiny", "revision": "r"},
           "model": {"feature_dim": 512}, "preprocessing": preprocessing}
    assert required_fingerprint(old)["downscale"] == "exact"
    command = extract_command(old, tmp_path / "run")
    assert "--downscale exact" in command, command
    cli.main.commands["extract"].make_context("extract", command.split()[3:])
    new = {**old, "preprocessing": {**preprocessing, "downscale": "fast"}}
    assert required_fingerprint(new)["downscale"] == "fast"
    assert "--downscale" not in extract_command(new, tmp_path / "run")
