"""`predict`: the whole chain (decode, faces, CLIP, head) on real clips with a tiny run, and its
agreement with `extract` + `evaluate` on the same clips."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import cli
from conftest import moving_square_frames, write_frame_folder, write_video
from heads.model import CaerModel, HeadConfig
from heads.predict import PredictConfig, predict
from heads.run import save_run
from pipeline.clip import build_random_clip
from cache.core.labels import RAER5

SEGMENTS = 4


@pytest.fixture(scope="module")
def clips(tmp_path_factory, carphone):
    """carphone (a face in every frame), a frame folder with no face, and an unreadable file."""
    root = tmp_path_factory.mktemp("predict_clips")
    frames = moving_square_frames(n=12, size=(96, 128))
    folder = write_frame_folder(root / "square_frames", frames)
    video = write_video(root / "square.mp4", frames)
    broken = root / "broken.mp4"
    broken.write_bytes(b"this is not a video")
    return {"carphone": carphone, "folder": folder, "video": video, "broken": broken,
            "missing": root / "missing.mp4"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """An untrained head on random:tiny, saved as train-head does (its CLIP copied)."""
    torch.manual_seed(0)
    model = CaerModel(HeadConfig(segments=SEGMENTS), build_random_clip("tiny"), RAER5)
    path = tmp_path_factory.mktemp("predict") / "run"
    return save_run(path, model, kind="train-head", train_options={}, cache_fingerprint=None,
                    save_clip=True, preprocessing={"face_resize": "squash", "face_margin": 20,
                                                    "downscale": "fast"})


def test_predict_labels_real_clips_and_reports_unreadable_ones(run, clips):
    paths = [clips["carphone"], clips["folder"], clips["broken"], clips["missing"]]
    result = predict(PredictConfig(run=str(run), paths=tuple(map(str, paths))), progress=False)
    assert [c.status for c in result.clips] == ["ok", "ok", "failed", "failed"]
    for clip in result.clips[:2]:
        assert clip.label in RAER5.names
        assert list(clip.probabilities) == RAER5.names
        assert sum(clip.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert clip.label == max(clip.probabilities, key=clip.probabilities.get)
        assert clip.segments == SEGMENTS
    assert result.clips[0].faces_found == SEGMENTS  # carphone shows a face in every frame
    assert result.clips[1].faces_found == 0  # a red square: whole frames stand in
    assert result.clips[2].reason.startswith("not a video")
    assert result.clips[3].reason == "file not found"
    assert result.exit_code == 3
    # Different clips, different probabilities: the crops really reach the model.
    p0, p1 = (np.array(list(c.probabilities.values())) for c in result.clips[:2])
    assert np.abs(p0 - p1).max() > 1e-4


def test_cli_predict_json_and_exit_status(run, clips):
    runner = CliRunner()
    ok = runner.invoke(cli.main, ["predict", "--run", str(run), str(clips["carphone"]),
                                  "--json"])
    assert ok.exit_code == 0, ok.output
    report = json.loads(ok.stdout)  # nothing but the JSON on stdout
    assert report["n_failed"] == 0 and report["classes"] == RAER5.names
    assert report["clips"][0]["label"] in RAER5.names

    mixed = runner.invoke(cli.main, ["predict", "--run", str(run), str(clips["carphone"]),
                                     str(clips["broken"])])
    assert mixed.exit_code == 3
    lines = mixed.stdout.splitlines()
    assert lines[1].startswith("carphone_pristine.mp4") and f"{SEGMENTS}/{SEGMENTS}" in lines[1]
    assert lines[2].startswith("broken.mp4") and "FAILED: not a video" in lines[2]
    assert "Traceback" not in mixed.output

    bad_run = runner.invoke(cli.main, ["predict", "--run", str(run.parent / "nope"),
                                       str(clips["carphone"])])
    assert bad_run.exit_code == 2 and "no such directory" in bad_run.stderr
    no_paths = runner.invoke(cli.main, ["predict", "--run", str(run)])
    assert no_paths.exit_code == 2


def test_predict_agrees_with_extract_then_evaluate(run, clips, tmp_path):
    """The same clips through extract (a cache) and evaluate give the same probabilities:
    predict preprocesses exactly as extract does. The cache holds float16 features, hence
    the tolerance."""
    import pandas as pd

    from heads.evaluate import EvaluateConfig, evaluate
    from pipeline.extract import ExtractConfig, run_extract

    names = ["carphone", "video", "folder"]
    csv = tmp_path / "clips.csv"
    pd.DataFrame({"path": [str(clips[n]) for n in names], "label": ["Neutrality"] * 3,
                  "split": "test", "id": names}).to_csv(csv, index=False)
    summary = run_extract(ExtractConfig(annotations=(str(csv),), clip="random:tiny",
                                        segments=SEGMENTS, candidates=1, workers=0,
                                        device="cpu", precision="fp32", quiet=True,
                                        cache=str(tmp_path / "c.zarr")))
    assert summary.n_ok == 3
    evaluation = evaluate(EvaluateConfig(run=str(run), cache=str(tmp_path / "c.zarr")),
                          write=False, progress=False)
    cached = evaluation.predictions.set_index("id")[[f"prob_{c}" for c in RAER5.names]]
    direct = predict(PredictConfig(run=str(run), paths=tuple(str(clips[n]) for n in names)),
                     progress=False)
    for name, clip in zip(names, direct.clips):
        np.testing.assert_allclose(list(clip.probabilities.values()),
                                   cached.loc[name].to_numpy(), atol=1e-4)


def test_predict_crops_a_clip_with_the_runs_downscale(tmp_path, astronaut):
    """predict (and explain, through the same clip_task) cut a clip as the run's training
    cache was cut; a run that predates --downscale gets the "exact" crops stores then held."""
    from PIL import Image

    from heads.predict import clip_task, run_preprocessing
    from pipeline.config import PRESETS
    from pipeline.crops import Frame, face_crop, letterbox
    from pipeline.prepare import prepare_clip

    frame = np.asarray(Image.fromarray(astronaut).resize((1920, 1080), Image.BICUBIC))
    folder = write_frame_folder(tmp_path / "hd", [frame] * 4)
    decoded = np.asarray(Image.open(folder / "1.jpg").convert("RGB"))
    old = {"model": {"segments": SEGMENTS},
           "cache_fingerprint": {"face_resize": "squash", "face_margin": 20}}
    new = {"model": {"segments": SEGMENTS},
           "cache_fingerprint": {"face_resize": "squash", "face_margin": 20,
                                 "downscale": "fast"}}
    crops = {}
    for name, run_config in (("old", old), ("new", new)):
        prep = run_preprocessing(run_config, 224)
        task = clip_task(0, folder, prep)
        for key in PRESETS["caer"]:
            if key not in ("normalize", "frame_count"):
                assert getattr(task, key) == prep[key], key
        crops[name] = prepare_clip(task)
        assert crops[name].status == "ok", crops[name].reason
    assert (run_preprocessing(old, 224)["downscale"], run_preprocessing(new, 224)["downscale"]) \
        == ("exact", "fast")
    for name, downscale in (("old", "exact"), ("new", "fast")):
        assert np.array_equal(crops[name].context[0, 0], letterbox(decoded, 224, downscale))
        box = crops[name].box[0, 0] if crops[name].found[0, 0] else None
        assert np.array_equal(crops[name].face[0, 0],
                              face_crop(Frame(decoded), box, 20, 224, "squash", downscale))
    assert not np.array_equal(crops["old"].context, crops["new"].context)
