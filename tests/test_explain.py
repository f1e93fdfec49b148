"""explain: maps that find where a learned class shows, Grad-CAM and attention as defined,
the npz/csv/html/png files, and crops from stored pixels, re-decoded clips, or a clear error."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cache import build_store_from_arrays
from heads.config import ExplainConfig, TrainConfig
from heads.explain import INDEX_COLUMNS, NPZ_KEYS, cls_attention, explain, explain_clip
from heads.model import CaerModel, HeadConfig
from heads.train import train_head
from pipeline.clip import CLIP_MEAN, CLIP_STD, build_random_clip
from cache.core.errors import CaerError
from cache.core.labels import RAER5

pytestmark = pytest.mark.usefixtures("one_torch_thread")
S = 4
EVIDENCE = (slice(0, 96), slice(0, 96))  # the top-left 3 x 3 patches of the 7 x 7 grid
COLOURS = np.array([[230, 20, 20], [20, 230, 20], [20, 20, 230], [230, 230, 20],
                    [20, 230, 230]], np.uint8)


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    """Clips whose class shows only as the colour of the context frame's top-left corner (a
    uniform grey elsewhere, its brightness drawn per frame; the face crops carry nothing),
    and a context-only run trained on them."""
    root = tmp_path_factory.mktemp("explain_known")
    n = 60
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 5
    context = np.empty((n, S, 1, 224, 224, 3), np.uint8)
    face = np.empty_like(context)
    for i in range(n):
        for s in range(S):
            context[i, s, 0] = 128 + rng.integers(-15, 16)
            context[i, s, 0][EVIDENCE] = COLOURS[labels[i]]
            face[i, s, 0] = 128 + rng.integers(-15, 16)
    clip = build_random_clip("tiny")
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)

    def encode(x):
        t = torch.from_numpy(x.reshape(-1, 224, 224, 3)).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            return clip.encode_images((t - mean) / std).view(n, S, 1, -1).numpy()

    channels_first = lambda x: x.transpose(0, 1, 2, 5, 3, 4)  # noqa: E731
    build_store_from_arrays(
        root / "c.zarr", face=encode(face), context=encode(context), labels=labels,
        splits=["train"] * 36 + ["val"] * 12 + ["test"] * 12,
        fingerprint={"clip_spec": "random:tiny", "clip_revision": clip.revision},
        pixels_face=channels_first(face), pixels_context=channels_first(context))
    train_head(TrainConfig(cache=str(root / "c.zarr"), out=str(root / "run"), streams="context",
                           epochs=10, quiet=True, device="cpu"))
    return root


def test_maps_concentrate_where_the_class_shows(known):
    out = known / "cams"
    result = explain(ExplainConfig(run=str(known / "run"), cache=str(known / "c.zarr"),
                                   split="test", out=str(out)), progress=False)
    assert len(result["clips"]) == 12
    region, opposite = np.zeros((224, 224), bool), np.zeros((224, 224), bool)
    region[EVIDENCE] = True
    opposite[-96:, -96:] = True
    inside, across, correct = [], [], 0
    for row in result["clips"]:
        cam = np.load(out / row["file"])["context_cam"]
        inside.append(cam[:, region].sum() / cam.sum())
        across.append(cam[:, opposite].sum() / cam.sum())
        correct += row["label"] == row["prediction"]
    assert correct >= 9, result["clips"]  # the run learned the corner (chance: 2.4 of 12)
    # The corner is 18% of the frame; the maps put well over twice that there, and several
    # times what they put on the same area in the opposite corner.
    assert np.mean(inside) > 2 * region.mean(), inside
    assert np.mean(inside) > 3 * np.mean(across), (inside, across)


def test_files_keys_shapes_and_the_unused_stream(known):
    out = known / "files"
    result = explain(ExplainConfig(run=str(known / "run"), cache=str(known / "c.zarr"),
                                   ids=("clip000050", "clip000048"), target="Enjoyment",
                                   out=str(out)), progress=False)
    with open(out / "index.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == INDEX_COLUMNS and [r["id"] for r in rows] == ["clip000050",
                                                                             "clip000048"]
    page = (out / "index.html").read_text()
    for row in rows:
        z = np.load(out / row["file"])
        assert tuple(sorted(z.files)) == tuple(sorted(NPZ_KEYS))
        assert z["context_cam"].shape == (S, 224, 224) and z["context_cam"].dtype == np.float32
        assert np.isfinite(z["context_cam"]).all() and (z["context_cam"] >= 0).all()
        assert z["context_attention"].shape == (S,)
        assert z["context_attention"].sum() == pytest.approx(1, abs=1e-5)
        assert np.isnan(z["face_cam"]).all() and np.isnan(z["face_attention"]).all()  # unused
        assert z["probs"].shape == (5,) and z["probs"].sum() == pytest.approx(1, abs=1e-5)
        assert int(z["target"]) == RAER5.names.index("Enjoyment")
        assert row["prediction"] == RAER5.names[int(z["probs"].argmax())]
        assert float(row["probability"]) == pytest.approx(float(z["probs"].max()), abs=1e-6)
        png = (out / row["file"]).with_suffix(".png")
        assert png.read_bytes()[:4] == b"\x89PNG" and png.name in page
    assert rows[0]["label"] == RAER5.names[50 % 5]


def _tiny_model(streams="both"):
    torch.manual_seed(0)
    model = CaerModel(HeadConfig(segments=S, streams=streams, temporal_layers=2),
                      build_random_clip("tiny"), RAER5)
    return model.eval()


def test_grad_cam_is_the_usual_vit_grad_cam_through_the_whole_network():
    """The leaf at the LayerNorm gives the gradient of full backpropagation from the pixels;
    the map is ReLU(sum_c mean_p(grad) * activation) resized bilinearly."""
    import torch.nn.functional as F

    model = _tiny_model()
    rng = np.random.default_rng(1)
    crops = {s: rng.integers(0, 256, (S, 224, 224, 3), dtype=np.uint8) for s in ("face", "context")}
    result = explain_clip(model, crops["face"], crops["context"], target=3)

    outputs = []
    layer_norm = model.clip.vision_model.encoder.layers[-1].layer_norm1

    def keep(module, inputs, output):
        output.retain_grad()
        outputs.append(output)

    hook = layer_norm.register_forward_hook(keep)
    model.requires_grad_(True)  # full backpropagation, nothing cut
    frames = {s: torch.from_numpy(c).permute(0, 3, 1, 2)[None].float().div(255).requires_grad_()
              for s, c in crops.items()}
    logits = model.forward_pixels(frames["face"], frames["context"])
    logits[0, 3].backward()
    hook.remove()
    for stream, output in zip(("face", "context"), outputs):
        a, g = output[:, 1:].detach(), output.grad[:, 1:]
        cam = torch.relu((a * g.mean(1, keepdim=True)).sum(-1)).view(S, 1, 7, 7)
        expected = F.interpolate(cam, size=(224, 224), mode="bilinear", align_corners=False)[:, 0]
        np.testing.assert_allclose(getattr(result, f"{stream}_cam"), expected.numpy(),
                                   rtol=1e-4, atol=1e-6 * float(expected.max()))
    probs = torch.softmax(logits[0].detach(), -1).numpy()
    np.testing.assert_allclose(result.probs, probs, atol=1e-6)


def test_attention_is_what_the_last_temporal_block_applies():
    model = _tiny_model()
    block = model.context_temporal.layers[-1]
    seen = {}
    hooks = [block.qkv.register_forward_hook(lambda m, i, o: seen.__setitem__("qkv", o)),
             block.attn_out.register_forward_hook(lambda m, i, o: seen.__setitem__("a", i[0]))]
    with torch.no_grad():
        model.forward_features(torch.randn(2, S, 512), torch.randn(2, S, 512))
    for h in hooks:
        h.remove()
    qkv = seen["qkv"]
    b, n, _ = qkv.shape
    q, k, v = qkv.view(b, n, 3, block.heads, block.dim_head).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) * block.dim_head ** -0.5, -1)
    applied = (weights @ v).transpose(1, 2).reshape(b, n, -1)
    torch.testing.assert_close(applied, seen["a"], atol=1e-5, rtol=1e-5)  # the same weights
    frames = cls_attention(block, qkv)
    expected = weights[:, :, 0, 1:].mean(1)
    torch.testing.assert_close(frames, expected / expected.sum(-1, keepdim=True))


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, carphone):
    """The same two real clips extracted with and without --pixels (3 candidates per
    segment), and an untrained tiny run."""
    import pandas as pd

    from conftest import moving_square_frames, write_frame_folder
    from heads.run import save_run
    from pipeline.extract import ExtractConfig, run_extract

    root = tmp_path_factory.mktemp("explain_real")
    video = root / "carphone.mp4"
    shutil.copy(carphone, video)
    folder = write_frame_folder(root / "square_frames", moving_square_frames(n=15, size=(96, 128)))
    table = root / "clips.csv"
    pd.DataFrame({"path": [str(video), str(folder)], "label": ["Neutrality", "Fatigue"],
                  "split": "test", "id": ["car", "square"]}).to_csv(table, index=False)
    for name, pixels in (("pixels", True), ("features", False)):
        summary = run_extract(ExtractConfig(
            annotations=(str(table),), clip="random:tiny", segments=S, candidates=3,
            pixels=pixels, workers=0, device="cpu", precision="fp32", quiet=True,
            cache=str(root / f"{name}.zarr")))
        assert summary.n_ok == 2
    model = _tiny_model()
    run = save_run(root / "run", model, kind="train-head", train_options={},
                   cache_fingerprint=None, save_clip=True,
                   preprocessing={"face_resize": "squash", "face_margin": 20, "segments": S,
                                  "downscale": "fast"})
    return {"root": root, "run": run, "video": video, "folder": folder}


@pytest.mark.slow
def test_crops_are_re_decoded_when_the_cache_has_none_and_missing_clips_are_refused(extracted):
    root, run = extracted["root"], str(extracted["run"])
    results = {}
    for name in ("pixels", "features"):
        explain(ExplainConfig(run=run, cache=str(root / f"{name}.zarr"), split="test",
                              out=str(root / f"cams-{name}")), progress=False)
        results[name] = {f: dict(np.load(root / f"cams-{name}" / f"{f}.npz"))
                         for f in ("0000-car", "0001-square")}
    for clip in results["pixels"]:  # re-decoded crops are the stored ones: the same maps
        for key in NPZ_KEYS:
            np.testing.assert_allclose(results["features"][clip][key],
                                       results["pixels"][clip][key], rtol=1e-5, atol=1e-6)
    # A clip given as a path is decoded with the run's preprocessing (as predict does).
    explain(ExplainConfig(run=run, paths=(str(extracted["video"]),), out=str(root / "cams-path")),
            progress=False)
    assert (root / "cams-path" / "0000-carphone.mp4.png").is_file()

    shutil.rmtree(extracted["folder"])
    with pytest.raises(CaerError, match="holds no stored crops.*square_frames") as err:
        explain(ExplainConfig(run=run, cache=str(root / "features.zarr"), ids=("square",),
                              out=str(root / "cams-gone")), progress=False)
    assert "\n" not in str(err.value) and not (root / "cams-gone").exists()
    # With stored crops the clip's file is not needed.
    explain(ExplainConfig(run=run, cache=str(root / "pixels.zarr"), ids=("square",),
                          out=str(root / "cams-stored")), progress=False)


@pytest.mark.parametrize("args, message", [
    (["--out", "o"], "nothing to explain"),
    (["--cache", "c.zarr", "--out", "o"], "either --ids or --split"),
    (["--cache", "c.zarr", "--split", "test", "--ids", "a", "--out", "o"], "either --ids"),
    (["x.mp4", "--split", "test", "--out", "o"], "select clips of --cache"),
    (["--cache", "c.zarr", "--split", "test", "--limit", "0", "--out", "o"], "--limit must"),
])
def test_bad_arguments_are_refused_with_one_line(tmp_path, args, message, monkeypatch):
    from cli import main

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["explain", "--run", "r", *args])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and message in result.output
    assert not (tmp_path / "o").exists()


def test_an_unknown_target_is_refused(known, tmp_path):
    with pytest.raises(CaerError, match="--target Joy: not a class"):
        explain(ExplainConfig(run=str(known / "run"), cache=str(known / "c.zarr"),
                              split="test", target="Joy", out=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()


def test_a_path_is_cut_with_the_runs_preprocessing_as_predict_cuts_it(extracted):
    """explain's clips given as paths go through predict's clip_task: the run's --downscale
    (fast here) on a 1080p folder, where fast and exact crops differ."""
    from dataclasses import replace

    from PIL import Image

    from conftest import write_frame_folder
    from heads.explain_inputs import path_inputs
    from heads.predict import clip_task, run_preprocessing
    from heads.run import load_run, read_run_config
    from pipeline.prepare import prepare_clip
    from skimage import data

    frame = np.asarray(Image.fromarray(data.astronaut()).resize((1920, 1080), Image.BICUBIC))
    hd = write_frame_folder(extracted["root"] / "hd_frames", [frame] * 4)
    run = extracted["run"]
    config = read_run_config(run)
    prep = run_preprocessing(config, 224)
    assert prep["downscale"] == "fast"
    [clip] = path_inputs(ExplainConfig(run=str(run), paths=(str(hd),), out="unused"), config,
                         load_run(run))
    want = prepare_clip(clip_task(0, hd, prep))
    assert np.array_equal(clip.face, want.face[:, 0])
    assert np.array_equal(clip.context, want.context[:, 0])
    exact = prepare_clip(replace(clip_task(0, hd, prep), downscale="exact"))
    assert not np.array_equal(clip.context, exact.context[:, 0])


@pytest.mark.slow
def test_crops_re_decoded_from_a_1080p_clip_use_the_stores_downscale(tmp_path, astronaut):
    """A cache without stored crops is re-decoded with its own --downscale: the maps equal
    those of the same clip's stored crops, for a fast store and an exact one (a 1080p frame
    folder, where the two differ)."""
    import pandas as pd
    from PIL import Image

    from conftest import write_frame_folder
    from heads.run import save_run
    from pipeline.extract import ExtractConfig, run_extract

    frame = np.asarray(Image.fromarray(astronaut).resize((1920, 1080), Image.BICUBIC))
    hd = write_frame_folder(tmp_path / "hd_frames", [frame] * 4)
    table = tmp_path / "clips.csv"
    pd.DataFrame({"path": [str(hd)], "label": ["Neutrality"], "split": "test",
                  "id": ["hd"]}).to_csv(table, index=False)
    maps = {}
    for downscale in ("fast", "exact"):
        run = save_run(tmp_path / f"run-{downscale}", _tiny_model(), kind="train-head",
                       train_options={}, cache_fingerprint=None, save_clip=True,
                       preprocessing={"face_resize": "squash", "face_margin": 20,
                                      "segments": S, "downscale": downscale})
        for name, pixels in (("pixels", True), ("features", False)):
            cache = tmp_path / f"{downscale}-{name}.zarr"
            summary = run_extract(ExtractConfig(
                annotations=(str(table),), clip="random:tiny", segments=S, pixels=pixels,
                downscale=downscale, workers=0, device="cpu", precision="fp32", quiet=True,
                cache=str(cache)))
            assert summary.n_ok == 1
            out = tmp_path / f"cams-{downscale}-{name}"
            explain(ExplainConfig(run=str(run), cache=str(cache), split="test", out=str(out)),
                    progress=False)
            maps[downscale, name] = dict(np.load(out / "0000-hd.npz"))
        for key in NPZ_KEYS:
            np.testing.assert_allclose(maps[downscale, "features"][key],
                                       maps[downscale, "pixels"][key], rtol=1e-5, atol=1e-6)
    assert any(not np.allclose(maps["fast", "pixels"][k], maps["exact", "pixels"][k])
               for k in NPZ_KEYS)
