"""finetune with a tiny CLIP: the loss falls, the image encoder changes and the text tower does
not, resume is exact, a 2-process torchrun (gloo) run equals a single process, gradient
checkpointing and accumulation change nothing, --init warm-starts the head."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cache import build_store_from_arrays, open_store
from heads.data import (PixelClips, augment_clip, pil_rotation_matrix, raw_face_sizes,
                        rotate_like_original)
from heads.evaluate import predict_cache
from heads.train import FinetuneConfig, TrainConfig, finetune, train_head
from pipeline.clip import build_random_clip
from cache.core.runtime import local_cuda_device, resolve_precision
from cache.core.errors import CaerError

ROOT = Path(__file__).resolve().parents[1]
TINY = build_random_clip("tiny")
C, S, K = 5, 4, 2
COLOURS = np.array([[220, 30, 30], [30, 200, 40], [40, 40, 230], [230, 220, 30], [200, 40, 210]])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_pixel_store(path, *, n_train=10, n_test=5, pixels=True, seed=0):
    """Crops whose colour says the class (with noise and a moving bright square)."""
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    labels = np.arange(n) % C
    views = {}
    if pixels:
        base = COLOURS[labels][:, None, None, :, None, None].astype(np.float32)
        for stream in ("face", "context"):
            x = base + rng.integers(-40, 40, size=(n, S, K, 3, 224, 224), dtype=np.int16)
            for s in range(S):
                x[:, s, :, :, 60:100, 40 * s: 40 * s + 40] = 255
            views[f"pixels_{stream}"] = np.clip(x, 0, 255).astype(np.uint8)
    feats = rng.normal(size=(n, S, K, 512)).astype(np.float16)
    return build_store_from_arrays(
        path, face=feats, context=feats, labels=labels,
        splits=["train"] * n_train + ["test"] * n_test,
        fingerprint={"clip_spec": "random:tiny", "clip_revision": TINY.revision}, **views)


def ft_config(cache, out, **kw) -> FinetuneConfig:
    base = dict(cache=str(cache), out=str(out), quiet=True, device="cpu", workers=0,
                batch_size=4, val_fraction=0, select="last", precision="fp32")
    base.update(kw)
    return FinetuneConfig(**base)


def trained_state(run: Path) -> dict[str, torch.Tensor]:
    """Head weights plus the saved CLIP's weights, as one dict."""
    state = dict(load_file(str(run / "head.safetensors")))
    state.update({f"clip.{k}": v for k, v in load_file(str(run / "clip" / "model.safetensors")).items()})
    return state


@pytest.fixture(scope="module")
def pixel_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("ft") / "pixels.zarr"
    make_pixel_store(path)
    return path


def test_finetune_learns_changes_the_image_encoder_and_not_the_text_tower(pixel_cache, tmp_path):
    run = tmp_path / "ft"
    finetune(ft_config(pixel_cache, run, epochs=4, workers=1, lr_image_encoder=1e-3))
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"], history
    assert history[0]["lr"]["image_encoder"] == 1e-3

    before = TINY.model.state_dict()
    after = load_file(str(run / "clip" / "model.safetensors"))
    vision = [k for k in before if k.startswith(("vision_model.", "visual_projection."))]
    text = [k for k in before if k.startswith(("text_model.", "text_projection."))]
    assert vision and text
    assert sum(not torch.equal(before[k], after[k]) for k in vision) >= len(vision) - 2
    assert all(torch.equal(before[k], after[k]) for k in text)

    config = json.loads((run / "config.json").read_text())
    assert config["kind"] == "finetune" and config["clip"]["dir"] == "clip"
    from heads import load_run

    model = load_run(run)
    ids, y_true, probs = predict_cache(model, open_store(pixel_cache), "test", pixels=True)
    assert len(ids) == 5 and probs.shape == (5, C) and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_finetune_resume_gives_identical_weights(pixel_cache, tmp_path):
    opts = dict(epochs=2, milestones=(1,), lr_image_encoder=1e-3)
    finetune(ft_config(pixel_cache, tmp_path / "full", **opts))
    finetune(ft_config(pixel_cache, tmp_path / "cut", max_steps=3, **opts))  # 10 clips / 4: 3 steps
    finetune(ft_config(pixel_cache, tmp_path / "cut", resume=True, **opts))
    full, cut = trained_state(tmp_path / "full"), trained_state(tmp_path / "cut")
    assert full.keys() == cut.keys()
    assert all(torch.equal(full[k], cut[k]) for k in full)


def test_two_torchrun_processes_equal_one_process(pixel_cache, tmp_path):
    """Same global batch (4 = 2 ranks x 2 clips): same weights up to the order of the
    all-reduce's float sums (the per-clip dropout and augmentation do not depend on ranks)."""
    opts = ["--epochs", "1", "--batch-size", "4", "--val-fraction", "0", "--select", "last",
            "--lr-image-encoder", "1e-3", "--precision", "fp32", "--device", "cpu",
            "--workers", "0", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-port", str(29500 + os.getpid() % 1000), str(ROOT / "cli.py"), "finetune",
         "--cache", str(pixel_cache), "--out", str(tmp_path / "ddp"), *opts],
        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    finetune(ft_config(pixel_cache, tmp_path / "single", epochs=1, lr_image_encoder=1e-3))
    single, ddp = trained_state(tmp_path / "single"), trained_state(tmp_path / "ddp")
    moved = 0
    initial = TINY.model.state_dict()
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], rtol=0, atol=1e-5, msg=k)
        if k.startswith("clip.vision_model") and not torch.equal(single[k], initial[k[5:]]):
            moved += 1
    assert moved > 0  # the comparison covers weights that training changed
    # Rank 0 alone wrote the run; the metrics cover the whole epoch (both ranks' clips).
    history = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 1 and history[0]["step"] == 3


def test_grad_checkpointing_and_accumulation_change_nothing(pixel_cache, tmp_path):
    opts = dict(epochs=1, max_steps=1, lr_image_encoder=1e-3)
    finetune(ft_config(pixel_cache, tmp_path / "plain", **opts))
    finetune(ft_config(pixel_cache, tmp_path / "ckpt", grad_checkpointing=True, **opts))
    finetune(ft_config(pixel_cache, tmp_path / "acc", accumulate=2, **opts))
    plain = trained_state(tmp_path / "plain")
    for other in ("ckpt", "acc"):
        state = trained_state(tmp_path / other)
        for k in plain:
            torch.testing.assert_close(state[k], plain[k], rtol=0, atol=1e-6, msg=f"{other} {k}")


def test_bf16_autocast_runs_on_cpu(pixel_cache, tmp_path):
    result = finetune(ft_config(pixel_cache, tmp_path / "bf16", epochs=1, max_steps=1,
                                precision="bf16"))
    assert result["steps"] == 1 and np.isfinite(result["train_loss"])


def test_precision_auto_follows_the_cpu_and_emulated_bf16_is_warned(monkeypatch, caplog):
    import cache.core.runtime as clip_module

    monkeypatch.setattr(clip_module, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", "cpu") == "fp32"
    with caplog.at_level("WARNING", logger="caer"):
        assert resolve_precision("bf16", "cpu") == "bf16"
    assert "no native bf16" in caplog.text and "--precision auto picks fp32" in caplog.text
    caplog.clear()
    monkeypatch.setattr(clip_module, "cpu_has_native_bf16", lambda: True)
    with caplog.at_level("WARNING", logger="caer"):
        assert resolve_precision("auto", "cpu") == "bf16"
        assert resolve_precision("bf16", "cpu") == "bf16"
        assert resolve_precision("fp32", "cpu") == "fp32"
    assert caplog.text == ""


def test_auto_precision_on_a_gpu_with_emulated_bf16_is_fp16(monkeypatch):
    # Before Ampere (V100, T4) torch's is_bf16_supported() says yes by counting emulation.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation)
    assert resolve_precision("auto", "cuda") == "fp16"
    with pytest.raises(CaerError, match="this GPU has no bf16"):
        resolve_precision("bf16", "cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_precision("auto", "cuda") == "bf16"


@pytest.mark.parametrize("visible, local_rank, per_node, expected", [
    (1, 0, None, 0),  # one process, one GPU
    (1, 3, None, 0),  # a launcher that gives each process its own GPU (no LOCAL_WORLD_SIZE)
    (4, 2, 4, 2),     # torchrun --nproc-per-node 4 on a 4-GPU node
    (1, 1, 2, None),  # torchrun --nproc-per-node 2 on a 1-GPU node
    (2, 3, 4, None),
])
def test_each_rank_picks_its_gpu(monkeypatch, visible, local_rank, per_node, expected):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    if per_node is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(per_node))
    if expected is None:
        with pytest.raises(CaerError, match=f"on this node, but {visible} visible GPU"):
            local_cuda_device()
    else:
        assert local_cuda_device() == torch.device("cuda", expected)


def test_init_from_a_train_head_run_starts_from_its_head(pixel_cache, tmp_path):
    head = tmp_path / "head"
    train_head(TrainConfig(cache=str(pixel_cache), out=str(head), epochs=1, val_fraction=0,
                           select="last", quiet=True, device="cpu"))
    # All learning rates 0: one step leaves the warm-started weights as they were.
    finetune(ft_config(pixel_cache, tmp_path / "ft", init=str(head), epochs=1, max_steps=1,
                       lr_temporal=0, lr_prompt=0, lr_fusion=0, lr_image_encoder=0))
    start, after = load_file(str(head / "head.safetensors")), trained_state(tmp_path / "ft")
    assert all(torch.equal(start[k], after[k]) for k in start)
    with pytest.raises(CaerError, match="--n-ctx 4 differs from the --init run's 8"):
        finetune(ft_config(pixel_cache, tmp_path / "ft2", init=str(head), n_ctx=4))


def test_finetune_without_stored_crops_is_refused(tmp_path):
    make_pixel_store(tmp_path / "nopix.zarr", pixels=False)
    with pytest.raises(CaerError, match="extract .*--pixels"):
        finetune(ft_config(tmp_path / "nopix.zarr", tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    with pytest.raises(CaerError, match="--precision fp16 needs CUDA"):
        finetune(ft_config(tmp_path / "nopix.zarr", tmp_path / "run", precision="fp16"))
    with pytest.raises(CaerError, match="divisible"):
        finetune(ft_config(tmp_path / "nopix.zarr", tmp_path / "run", accumulate=3))


def test_augmentation_rotates_within_4_degrees_and_flips_per_clip(pixel_cache):
    frame = torch.zeros(1, 3, 64, 64)
    frame[..., 2:10, 28:36] = 1.0  # a square at the top centre
    assert not torch.equal(augment_clip(frame, 4.0, flip=False), frame)
    assert torch.equal(augment_clip(frame, 0.0, flip=True), frame.flip(-1))
    quarter = augment_clip(frame, 90.0, flip=False)[0, 0]  # counter-clockwise: top -> left
    assert quarter[29:35, 3:9].min() > 0.9 and quarter[:, 16:].max() < 0.05
    small = augment_clip(frame, 4.0, flip=False)[0, 0]  # 4 degrees moves it about 2 pixels left
    assert small[:, :32].sum() > small[:, 32:].sum()
    store = open_store(pixel_cache)
    labels = store.manifest["label"].to_numpy()
    data = PixelClips(str(pixel_cache), np.arange(4), labels[:4], train=True, seed=0, candidates=K)
    face, context, label, row = data[2]
    assert face.shape == (S, 3, 224, 224) and 0 <= face.min() and face.max() <= 1 and row == 2
    again = data[2]
    assert torch.equal(face, again[0])  # a clip's draws are fixed by (seed, epoch, clip)
    data.set_epoch(1)
    assert not torch.equal(face, data[2][0])
    evaluation = PixelClips(str(pixel_cache), np.arange(4), labels[:4], train=False, candidates=K)
    raw = torch.from_numpy(store.pixels("face")[2][:, K // 2]).float() / 255
    assert torch.equal(evaluation[2][0], raw)  # middle candidate, no augmentation


def test_original_rotation_is_pil_s_nearest_rotate_and_follows_the_raw_crop(astronaut):
    from PIL import Image

    photo = astronaut  # a real photo, 512 x 512 RGB
    crop = photo[30:260, 160:320]  # a raw face crop, 160 wide, 230 high
    squashed = np.asarray(Image.fromarray(crop).resize((224, 224), Image.Resampling.BILINEAR))
    frames = squashed.transpose(2, 0, 1)[None]
    # Square (or unknown) raw crop: exactly PIL's own Image.rotate, nearest, black corners.
    expected = np.asarray(Image.fromarray(squashed).rotate(3.7)).transpose(2, 0, 1)
    assert np.array_equal(rotate_like_original(frames, 3.7)[0], expected)
    assert np.array_equal(rotate_like_original(frames, 3.7, np.array([[90, 90]]))[0], expected)
    assert pil_rotation_matrix(0.0, (224, 224), (160, 230)) == (1.0, 0.0, 0.0, -0.0, 1.0, 0.0)

    # The original rotates the raw crop, then squashes it. From the squashed crop, rotating as
    # the raw crop would have been is far closer to that than a plain rotation.
    original = np.asarray(Image.fromarray(crop).rotate(4.0).resize((224, 224), Image.Resampling.BILINEAR))
    emulated = rotate_like_original(frames, 4.0, np.array([[160, 230]]))[0].transpose(1, 2, 0)
    plain = rotate_like_original(frames, 4.0)[0].transpose(1, 2, 0)
    error = lambda x: np.abs(x.astype(np.int16) - original.astype(np.int16)).mean()  # noqa: E731
    assert error(emulated) < 0.6 * error(plain), (error(emulated), error(plain))
    black = lambda x: (x.max(-1) == 0)  # noqa: E731  the corners rotated in from outside
    assert (black(emulated) == black(original)).mean() > (black(plain) == black(original)).mean()


def test_raw_face_sizes_truncate_add_the_margin_and_clamp():
    boxes = np.array([[10.9, 20.5, 110.2, 140.8], [-5.0, 0.0, 630.0, 30.0], [np.nan] * 4])
    sizes = raw_face_sizes(boxes, width=640, height=480, margin=20)
    # int() first: 10..110 -> 0..130 wide (clamped at 0); 20..140 -> 0..160 high
    assert sizes.tolist() == [[130, 160], [640, 50], [640, 480]]


def test_original_augmentation_draws_each_stream_on_its_own(tmp_path):
    import zarr

    path = tmp_path / "p.zarr"
    make_pixel_store(path, n_train=12, n_test=1)
    group = zarr.open_group(str(path), mode="r+")  # frame sizes and boxes, as extract stores them
    group["clips/width"][:] = 640
    group["clips/height"][:] = 480
    box = np.zeros(group["faces/box"].shape, np.float32)
    box[...] = (200.0, 100.0, 300.0, 300.0)  # 140 x 240 with the margin: not square
    group["faces/box"][:] = box
    store = open_store(path)
    labels = store.manifest["label"].to_numpy()
    raw = store.pixels("face")
    ours = PixelClips(str(path), np.arange(12), labels[:12], train=True, candidates=K)
    theirs = PixelClips(str(path), np.arange(12), labels[:12], train=True, candidates=K,
                        augment="original")
    flips = []
    for i in range(12):
        for data in (ours, theirs):
            face, context, _, _ = data[i]
            # The moving bright square of segment 0 sits at columns 0..39: a flip moves it right.
            flips.append((data is theirs, bool(face[0, :, 80, :112].mean() < face[0, :, 80, 112:].mean()),
                          bool(context[0, :, 80, :112].mean() < context[0, :, 80, 112:].mean())))
    assert all(f == c for who, f, c in flips if not who)  # ours: one flip for both streams
    assert any(f != c for who, f, c in flips if who)  # original: drawn for each stream
    assert theirs[3][0].shape == (S, 3, 224, 224) and torch.equal(theirs[3][0], theirs[3][0])
    assert not torch.equal(theirs[3][0], torch.from_numpy(raw[3][:, 0]).float() / 255)
    with pytest.raises(CaerError, match="--augment"):
        PixelClips(str(path), np.arange(2), labels[:2], train=True, augment="torchvision")
    finetune(ft_config(path, tmp_path / "run", augment="original", epochs=1, max_steps=2))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["augment"] == "original"
