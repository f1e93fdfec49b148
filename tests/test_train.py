"""train-head: learns a cache whose classes differ, resumes exactly, never reads the test split,
skips failed clips, refuses bad flags and mismatched caches with one line."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from cache import build_store_from_arrays, open_store
from cache.layout import ClipResult
from heads.data import FeatureBank, split_clips
from heads.evaluate import predict_cache
from heads.train import TrainConfig, train_head
from pipeline.clip import build_random_clip
from cache.core.errors import CaerError

TINY_REVISION = build_random_clip("tiny").revision
C, D = 5, 512


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_store(path, *, n_train=40, n_test=10, segments=4, candidates=2, signal=1.0,
               flip=True, seed=0, nan_test=False, val=0, **fingerprint):
    """Features = class mean * signal + unit noise per frame; classes cycle so every split
    holds every class. ``nan_test`` poisons every test clip with NaN."""
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(123).normal(size=(C, D)).astype(np.float32)
    n = n_train + val + n_test
    labels = np.arange(n) % C
    splits = ["train"] * n_train + ["val"] * val + ["test"] * n_test

    def view():
        x = signal * means[labels][:, None, None] + rng.normal(size=(n, segments, candidates, D))
        if nan_test:
            x[n_train + val:] = np.nan
        return x.astype(np.float16)

    views = {"face": view(), "context": view()}
    if flip:
        views.update(face_flip=view(), context_flip=view())
    fp = {"clip_spec": "random:tiny", "clip_revision": TINY_REVISION, **fingerprint}
    return build_store_from_arrays(path, labels=labels, splits=splits, fingerprint=fp, **views)


def config(cache, out, **kw) -> TrainConfig:
    base = dict(cache=str(cache), out=str(out), quiet=True, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def weights(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "head.safetensors"))


def test_default_recipe_learns_a_cache_whose_classes_differ(tmp_path):
    make_store(tmp_path / "c.zarr", n_train=60, n_test=25, signal=0.5)
    summary = train_head(config(tmp_path / "c.zarr", tmp_path / "run"))  # the paper's recipe
    run = tmp_path / "run"
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == list(range(1, 21))
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert history[0]["lr"] == {"temporal": 1e-2, "prompt": 1e-3, "fusion": 1e-5}
    assert history[-1]["lr"]["temporal"] == pytest.approx(1e-4)  # / 10 at 10 and at 15
    assert set(history[0]) >= {"train_loss", "train_uar", "train_war", "val_uar", "val_war",
                               "seconds"}

    from heads import load_run

    model = load_run(run)
    ids, y_true, probs = predict_cache(model, open_store(tmp_path / "c.zarr"), "test")
    assert len(ids) == 25 and probs.shape == (25, C)
    recall = [(probs.argmax(1)[y_true == c] == c).mean() for c in range(C)]
    assert np.mean(recall) >= 0.8, recall  # chance is 0.2

    cfg = json.loads((run / "config.json").read_text())
    assert cfg["kind"] == "train-head"
    assert cfg["train"]["lr_temporal"] == 1e-2 and cfg["train"]["milestones"] == [10, 15]
    assert cfg["cache_fingerprint"]["clip_revision"] == TINY_REVISION
    assert cfg["labels"]["name"] == "raer5"
    assert cfg["extra"]["selected_epoch"] == summary["best_epoch"]
    assert (run / "curves.png").stat().st_size > 1000
    last = json.loads((run / "checkpoints" / "last.json").read_text())
    assert last["epoch"] == 20 and last["finished"]
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert best["epoch"] == summary["best_epoch"]
    # Only what was trained is saved with the run; the CLIP is copied because it is random:.
    assert not any(k.startswith("clip.") for k in weights(run))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_after_a_stop_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, precision):
    make_store(tmp_path / "c.zarr", n_train=26, n_test=5)
    opts = dict(epochs=4, milestones=(2, 3), batch_size=8, val_fraction=0.2, precision=precision)
    train_head(config(tmp_path / "c.zarr", tmp_path / "full", **opts))
    # 21 train clips after the val split -> 3 steps per epoch; stop at the end of epoch 2.
    train_head(config(tmp_path / "c.zarr", tmp_path / "cut", max_steps=6, **opts))
    assert json.loads((tmp_path / "cut" / "checkpoints" / "last.json").read_text())["epoch"] == 2
    train_head(config(tmp_path / "c.zarr", tmp_path / "cut", resume=True, **opts))

    full, cut = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert full.keys() == cut.keys()
    for k in full:
        assert torch.equal(full[k], cut[k]), k
    read = lambda run: [{k: v for k, v in json.loads(line).items() if k != "seconds"}  # noqa: E731
                        for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert read(tmp_path / "full") == read(tmp_path / "cut")


def test_drop_last_drops_each_epoch_s_last_partial_batch_on_any_rank_layout(tmp_path):
    from torch.utils.data import DistributedSampler

    from heads.inputs import full_batches_only

    make_store(tmp_path / "c.zarr", n_train=21, n_test=5)
    opts = dict(epochs=2, milestones=(1,), batch_size=8, val_fraction=0, select="last")
    train_head(config(tmp_path / "c.zarr", tmp_path / "keep", **opts))
    train_head(config(tmp_path / "c.zarr", tmp_path / "drop", drop_last=True, **opts))
    steps = lambda run: [json.loads(line)["step"]  # noqa: E731
                         for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps(tmp_path / "keep") == [3, 6] and steps(tmp_path / "drop") == [2, 4]
    assert json.loads((tmp_path / "drop" / "config.json").read_text())["train"]["drop_last"]

    # The kept clips are the first two global batches of the epoch's one permutation, whether
    # one process or two (DDP) share them.
    order = list(DistributedSampler(range(21), num_replicas=1, rank=0, shuffle=True, seed=3))
    one = full_batches_only(DistributedSampler(range(21), num_replicas=1, rank=0, seed=3), 21, 8, 1)
    assert list(one) == order[:16] and len(one) == 16
    ranks = [list(full_batches_only(DistributedSampler(range(21), num_replicas=2, rank=r, seed=3),
                                     21, 8, 2)) for r in (0, 1)]
    assert ranks[0] == order[0:16:2] and ranks[1] == order[1:16:2]

    with pytest.raises(CaerError, match="fewer than --batch-size 32"):
        train_head(config(tmp_path / "c.zarr", tmp_path / "none", drop_last=True,
                          **{**opts, "batch_size": 32}))
    assert not (tmp_path / "none").exists()


@pytest.mark.slow
def test_bf16_learns_as_fp32_does(tmp_path, caplog):
    """Same seed, same data: the held-out UAR agrees within noise and so do the loss curves."""
    from heads import load_run

    make_store(tmp_path / "c.zarr", n_train=60, n_test=40, signal=0.2)
    uar, losses = {}, {}
    for precision in ("fp32", "bf16"):
        with caplog.at_level(logging.INFO, logger="caer"):
            train_head(config(tmp_path / "c.zarr", tmp_path / precision, epochs=8,
                              milestones=(6,), select="last", precision=precision))
        assert f"precision {precision}: --precision {precision}" in caplog.text
        losses[precision] = np.array([json.loads(line)["train_loss"] for line in
                                      (tmp_path / precision / "metrics.jsonl").read_text().splitlines()])
        _, y, probs = predict_cache(load_run(tmp_path / precision), open_store(tmp_path / "c.zarr"),
                                    "test")
        uar[precision] = np.mean([(probs.argmax(1)[y == c] == c).mean() for c in range(C)])
    # 40 test clips, 8 a class: 0.1 is four clips. Measured: 1.0 and 1.0.
    assert uar["fp32"] >= 0.8 and abs(uar["bf16"] - uar["fp32"]) <= 0.1, uar
    assert losses["bf16"][-1] < 0.1 * losses["bf16"][0], losses
    # Every epoch within 8% of the starting loss of each other (measured: 2.5%, at epoch 3).
    assert np.abs(losses["bf16"] - losses["fp32"]).max() <= 0.08 * losses["fp32"][0], losses
    with pytest.raises(CaerError, match="--precision fp16 needs CUDA"):
        train_head(config(tmp_path / "c.zarr", tmp_path / "fp16", precision="fp16"))
    result = _cli("--cache", tmp_path / "c.zarr", "--out", tmp_path / "bf16", "--resume",
                  "--precision", "fp32", "--epochs", 9)
    assert result.exit_code == 2 and "--precision (run bf16, now fp32)" in result.output


def test_a_killed_run_without_a_checkpoint_epoch_is_replayed(tmp_path):
    """A stop inside an epoch (here --max-steps) leaves the previous checkpoint; --resume
    replays the unfinished epoch and lands on the uninterrupted result."""
    make_store(tmp_path / "c.zarr", n_train=24, n_test=5, flip=False, candidates=1)
    opts = dict(epochs=2, batch_size=8, val_fraction=0, select="last")
    train_head(config(tmp_path / "c.zarr", tmp_path / "full", **opts))
    train_head(config(tmp_path / "c.zarr", tmp_path / "cut", max_steps=4, **opts))  # mid epoch 2
    assert json.loads((tmp_path / "cut" / "checkpoints" / "last.json").read_text())["epoch"] == 1
    train_head(config(tmp_path / "c.zarr", tmp_path / "cut", resume=True, **opts))
    full, cut = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert all(torch.equal(full[k], cut[k]) for k in full)


def test_validation_and_training_never_read_the_test_split(tmp_path):
    make_store(tmp_path / "clean.zarr", n_train=20, n_test=10)
    make_store(tmp_path / "poisoned.zarr", n_train=20, n_test=10, nan_test=True)
    opts = dict(epochs=2, val_fraction=0.25)
    a = train_head(config(tmp_path / "clean.zarr", tmp_path / "a", **opts))
    b = train_head(config(tmp_path / "poisoned.zarr", tmp_path / "b", **opts))
    assert a["val_uar"] == b["val_uar"] is not None
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) and torch.isfinite(wa[k]).all() for k in wa)
    assert a["splits"] == {"train": 15, "val": 5, "test": 10, "val_source": "carved"}


def test_failed_clips_are_skipped_and_counted(tmp_path, caplog):
    store = make_store(tmp_path / "c.zarr", n_train=20, n_test=5)
    writer = open_store(tmp_path / "c.zarr", mode="a")
    for i in (0, 7):  # poisoned, then marked failed: reading them would raise
        writer._root["features/face"][i] = np.full(writer._root["features/face"].shape[1:], np.nan)
        writer.write_clip(i, ClipResult("failed", reason="decode error"))
    del store, writer
    with caplog.at_level(logging.INFO, logger="caer"):
        result = train_head(config(tmp_path / "c.zarr", tmp_path / "run", epochs=1,
                                   val_fraction=0.2))
    assert result["n_failed_skipped"] == 2
    assert result["splits"]["train"] + result["splits"]["val"] == 18
    assert "2 failed clips skipped" in caplog.text


def test_several_seeds_give_one_run_each_and_a_summary(tmp_path):
    make_store(tmp_path / "c.zarr", n_train=20, n_test=5)
    summary = train_head(config(tmp_path / "c.zarr", tmp_path / "runs", epochs=1,
                                seeds=(1, 2), val_fraction=0.25))
    assert summary["seeds"] == [1, 2]
    assert json.loads((tmp_path / "runs" / "summary.json").read_text())["val_uar"]["values"] \
        == summary["val_uar"]["values"]
    w1, w2 = weights(tmp_path / "runs" / "seed-1"), weights(tmp_path / "runs" / "seed-2")
    assert not torch.equal(w1["fusion.weight"], w2["fusion.weight"])
    # The val split is the same for every seed (--val-seed), so seeds differ only in training.
    c1 = json.loads((tmp_path / "runs" / "seed-1" / "config.json").read_text())
    assert c1["train"]["seed"] == 1 and c1["extra"]["splits"]["val"] == 5


def test_same_seed_gives_identical_weights(tmp_path):
    make_store(tmp_path / "c.zarr", n_train=16, n_test=4)
    train_head(config(tmp_path / "c.zarr", tmp_path / "a", epochs=1, val_fraction=0.25))
    train_head(config(tmp_path / "c.zarr", tmp_path / "b", epochs=1, val_fraction=0.25))
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_val_split_is_stratified_seeded_or_taken_from_the_cache(tmp_path):
    import pandas as pd

    manifest = pd.DataFrame({"label": np.arange(100) % 5, "split": ["train"] * 80 + ["test"] * 20,
                             "status": ["ok"] * 100})
    s = split_clips(manifest, 0.2, val_seed=0)
    counts = np.bincount(manifest["label"][s.val], minlength=5)
    assert len(s.val) == 16 and counts.min() == 3 and counts.max() == 4  # 16 / 5 classes
    assert not set(s.val) & set(s.train) and not set(s.val) & set(range(80, 100))
    assert np.array_equal(split_clips(manifest, 0.2, val_seed=0).val, s.val)
    assert not np.array_equal(split_clips(manifest, 0.2, val_seed=1).val, s.val)
    manifest.loc[70:79, "split"] = "val"
    s = split_clips(manifest, 0.2, val_seed=0)
    assert s.val_source == "cache" and s.val.tolist() == list(range(70, 80))


def test_training_draws_frames_and_flips_evaluation_takes_middle_frame_no_flip(tmp_path):
    # Every value encodes where it came from: candidate index + 10 * flipped.
    n, s, k = 6, 4, 3
    plain = np.broadcast_to(np.arange(k, dtype=np.float16)[None, None, :, None], (n, s, k, 8))
    store = build_store_from_arrays(
        tmp_path / "c.zarr", face=plain, context=plain, face_flip=plain + 10,
        context_flip=plain + 10, labels=np.arange(n) % 5, splits="train",
        fingerprint={"clip_spec": "random:tiny", "clip_revision": TINY_REVISION})
    bank = FeatureBank(store, np.arange(n), with_flip=True)
    face, context, _ = bank.batch(range(n), train=False)
    assert (face == 1).all() and (context == 1).all()  # middle of 3, never flipped
    draws = torch.cat([bank.batch(range(n), train=True, seed=0, epoch=e)[0] for e in range(10)])
    assert set(draws.unique().tolist()) == {0, 1, 2, 10, 11, 12}
    assert (draws[..., :1] == draws).all()  # one (frame, view) per segment
    flipped = (draws[:, :, 0] >= 10)
    assert (flipped.all(1) | (~flipped).all(1)).all()  # one flip draw per clip, both ways
    # A clip's draws do not depend on the batch it is in.
    one = bank.batch([3], train=True, seed=0, epoch=4)[0]
    assert torch.equal(one[0], bank.batch(range(n), train=True, seed=0, epoch=4)[0][3])


def test_validation_builds_no_autograd_graph(tmp_path, monkeypatch):
    from heads.model import CaerModel

    calls, forward = [], CaerModel.forward

    def recording_forward(self, *args, **kwargs):
        calls.append((self.training, torch.is_grad_enabled()))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(CaerModel, "forward", recording_forward)
    make_store(tmp_path / "c.zarr", n_train=20)
    train_head(config(tmp_path / "c.zarr", tmp_path / "run", epochs=1, val_fraction=0.25))
    assert calls and set(calls) == {(False, False)}  # validation, without a graph


def test_dropout_masks_follow_the_clip_not_its_place_in_the_batch(tmp_path):
    from heads.recipe import build_model
    from heads.step import sample_dropout, use_sample_dropout

    store = make_store(tmp_path / "c.zarr", n_train=10, n_test=0)
    model = build_model(config(tmp_path / "c.zarr", tmp_path / "x"), store)
    use_sample_dropout(model)
    model.train()
    bank = FeatureBank(store, np.arange(10), with_flip=False)
    face, context, _ = bank.batch(range(4), train=False)
    with sample_dropout(model, 0, 0, [0, 1, 2, 3]):
        forward = model(face, context)
    with sample_dropout(model, 0, 0, [3, 2, 1, 0]):
        backward = model(face.flip(0), context.flip(0))
    with sample_dropout(model, 0, 1, [0, 1, 2, 3]):
        other_epoch = model(face, context)
    torch.testing.assert_close(forward, backward.flip(0))
    assert not torch.allclose(forward, other_epoch)  # dropout is on


# ------------------------------------------------------------------------------ refusals

def _cli(*args):
    from cli import main

    return CliRunner().invoke(main, ["train-head", *map(str, args)])


@pytest.mark.parametrize("flags, message", [
    (["--streams", "eyes"], "--streams eyes"),
    (["--select", "best"], "--select best"),
    (["--milestones", "10,x"], "--milestones 10,x"),
    (["--milestones", "15,10"], "--milestones must be increasing"),
    (["--val-fraction", "0"], "--select val-uar needs validation clips"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
])
def test_bad_flags_are_refused_with_one_line_and_nothing_written(tmp_path, flags, message):
    make_store(tmp_path / "c.zarr", n_train=10, n_test=0)
    result = _cli("--cache", tmp_path / "c.zarr", "--out", tmp_path / "run", *flags)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output
    assert not (tmp_path / "run").exists()


def test_mismatched_caches_are_refused(tmp_path):
    make_store(tmp_path / "a.zarr", n_train=16, n_test=0)
    make_store(tmp_path / "b.zarr", n_train=16, n_test=0, face_margin=40)
    make_store(tmp_path / "other_clip.zarr", n_train=16, n_test=0, clip_revision="seed0-0000")
    assert _cli("--cache", tmp_path / "a.zarr", "--out", tmp_path / "run", "--epochs", 1,
                "--quiet").exit_code == 0
    # --resume with another cache
    result = _cli("--cache", tmp_path / "b.zarr", "--out", tmp_path / "run", "--epochs", 1,
                  "--resume")
    assert result.exit_code == 2 and "--face-margin (store 20, now 40)" in result.output
    # --resume with other options
    result = _cli("--cache", tmp_path / "a.zarr", "--out", tmp_path / "run", "--epochs", 1,
                  "--resume", "--lr-temporal", "0.1")
    assert result.exit_code == 2 and "--lr-temporal (run 0.01, now 0.1)" in result.output
    # an existing run without --resume
    result = _cli("--cache", tmp_path / "a.zarr", "--out", tmp_path / "run")
    assert result.exit_code == 2 and "pass --resume" in result.output
    # a cache whose features came from another CLIP than the one its fingerprint loads
    result = _cli("--cache", tmp_path / "other_clip.zarr", "--out", tmp_path / "run2")
    assert result.exit_code == 2 and "revision" in result.output
    assert not (tmp_path / "run2").exists()


def test_config_fields_are_the_cli_options():
    from cli import main

    help_text = CliRunner().invoke(main, ["train-head", "--help"]).output
    for f in (field.name for field in dataclasses.fields(TrainConfig)):
        assert "--" + f.replace("_", "-") in help_text, f
    with pytest.raises(CaerError, match="--device"):
        train_head(replace(TrainConfig(cache="c", out="o"), device="tpu"))


def test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_result(tmp_path):
    import subprocess
    import sys
    import time
    from pathlib import Path

    make_store(tmp_path / "c.zarr", n_train=16, n_test=0, segments=2, candidates=1, flip=False)
    # Killed as soon as epoch 1's checkpoint exists: 7 epochs are left to interrupt.
    opts = ["--epochs", "8", "--batch-size", "8", "--val-fraction", "0", "--select", "last",
            "--milestones", "3,6", "--device", "cpu", "--quiet"]
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, str(root / "cli.py"), "train-head", "--cache",
               str(tmp_path / "c.zarr"), "--out", str(tmp_path / "killed"), *opts]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    last = tmp_path / "killed" / "checkpoints" / "last.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if last.is_file():
            break
        time.sleep(0.005)
    process.kill()  # SIGKILL: no cleanup, possibly mid-write
    process.wait()
    killed_at = json.loads(last.read_text())["epoch"]
    if killed_at == 8:
        pytest.fail("the run finished before it could be killed; make it longer")
    assert not (tmp_path / "killed" / "config.json").exists()  # an unfinished run is not a run
    train_head(config(tmp_path / "c.zarr", tmp_path / "killed", resume=True, epochs=8,
                      val_fraction=0, select="last", milestones=(3, 6)))
    train_head(config(tmp_path / "c.zarr", tmp_path / "full", epochs=8, val_fraction=0,
                      select="last", milestones=(3, 6)))
    full, killed = weights(tmp_path / "full"), weights(tmp_path / "killed")
    assert all(torch.equal(full[k], killed[k]) for k in full)
    epochs = [json.loads(line)["epoch"]
              for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 9))
