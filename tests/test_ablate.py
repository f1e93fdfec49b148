"""ablate: the grid, its files and their columns, ddof-1 spreads, resume after a real kill -9,
grid extension that trains only new runs, and nothing selected on the test split."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from heads.ablate import TABLE6, grid_points, run_ablate
from heads.ablate_report import RESULT_COLUMNS, SUMMARY_COLUMNS
from heads.config import AblateConfig, TrainConfig
from tests.test_train import make_store

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAST = dict(epochs=2, batch_size=8, quiet=True, device="cpu")


def ablate(cache, out, **kw) -> dict:
    train = {**FAST, **kw.pop("train", {})}
    return run_ablate(AblateConfig(cache=str(cache), out=str(out), train=TrainConfig(**train),
                                   **kw))


def _cli(*args):
    from cli import main

    return CliRunner().invoke(main, ["ablate", *map(str, args)])


def test_grid_is_the_product_of_the_lists_or_table6():
    points = grid_points(AblateConfig(n_ctx="4,8", temporal_layers="1,2", streams="face,both"))
    assert [(p.n_ctx, p.temporal_layers, p.streams) for p in points] == [
        (4, 1, "face"), (4, 2, "face"), (8, 1, "face"), (8, 2, "face"),
        (4, 1, "both"), (4, 2, "both"), (8, 1, "both"), (8, 2, "both")]
    assert [p.name for p in grid_points(AblateConfig())] == ["ctx8-layers1-both"]
    table6 = grid_points(AblateConfig(grid="table6"))
    assert len(table6) == 12 and {p.streams for p in table6} == {"face", "both"}
    assert {(p.n_ctx, p.temporal_layers) for p in table6} == set(TABLE6) == {
        (8, 1), (8, 2), (8, 3), (4, 1), (12, 1), (16, 1)}
    assert len(grid_points(AblateConfig(grid="table6", streams="context"))) == 6


@pytest.mark.parametrize("flags, message", [
    (["--grid", "table6", "--n-ctx", "4"], "--grid table6 sets --n-ctx"),
    (["--streams", "both,eyes"], "--streams both,eyes"),
    (["--n-ctx", "4,x"], "--n-ctx 4,x"),
    (["--n-ctx", "4,4"], "--n-ctx 4,4"),
    (["--baselines", "zero-shot,oracle"], "--baselines zero-shot,oracle"),
    (["--seeds", "1,1"], "--seeds must list distinct"),
    (["--select", "best"], "--select best"),  # a train-head option, checked by train-head
    (["--temporal-layers", "0"], "--temporal-layers 0"),
])
def test_bad_options_are_refused_with_one_line_and_nothing_written(tmp_path, flags, message):
    make_store(tmp_path / "c.zarr", n_train=10, n_test=0)
    result = _cli("--cache", tmp_path / "c.zarr", "--out", tmp_path / "ab", *flags)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output
    assert not (tmp_path / "ab").exists()


def test_every_train_head_option_passes_through_the_command_line():
    from cli import main
    from heads.config import ABLATE_SETS

    help_text = CliRunner().invoke(main, ["ablate", "--help"]).output
    for name in [f.name for c in (TrainConfig, AblateConfig) for f in dataclasses.fields(c)]:
        if name not in ABLATE_SETS and name != "train":
            assert "--" + name.replace("_", "-") in help_text, name


def test_files_columns_and_sample_std(tmp_path):
    make_store(tmp_path / "c.zarr", n_train=30, val=10, n_test=10, segments=4, candidates=1,
               flip=False, signal=0.5)
    result = _cli("--cache", tmp_path / "c.zarr", "--out", tmp_path / "ab", "--n-ctx", "4",
                  "--streams", "both,face", "--seeds", "1,2,3", "--epochs", "2", "--quiet",
                  "--device", "cpu", "--lr-temporal", "0.005")
    assert result.exit_code == 0, result.output
    out = tmp_path / "ab"
    results = pd.read_csv(out / "results.csv")
    assert tuple(results.columns) == RESULT_COLUMNS
    runs = results[results["method"] == "clip-caer"]
    assert len(runs) == 6 and sorted(set(runs["seed"])) == [1, 2, 3]
    assert set(results["method"]) == {"clip-caer", "zero-shot", "linear-probe"}
    assert sorted(results[results["method"] == "zero-shot"]["streams"]) == ["both", "face"]
    for row in runs.itertuples():
        run = Path(row.run)
        assert run == out / "runs" / f"ctx4-layers1-{row.streams}" / f"seed-{int(row.seed)}"
        config = json.loads((run / "config.json").read_text())
        assert config["kind"] == "train-head"  # an ordinary train-head run
        assert config["train"]["lr_temporal"] == 0.005 and config["train"]["epochs"] == 2
        assert config["model"]["streams"] == row.streams and config["model"]["n_ctx"] == 4
        assert row.val_uar == pytest.approx(100 * config["extra"]["val_uar"], abs=1e-4)
        report = json.loads((run / "eval" / "test" / "report.json").read_text())
        assert row.test_uar == pytest.approx(100 * report["uar"], abs=1e-4)
        assert row.test_war == pytest.approx(100 * report["war"], abs=1e-4)
    assert results[results["method"] != "clip-caer"]["run"].isna().all()  # empty cells

    summary = pd.read_csv(out / "summary.csv")
    assert tuple(summary.columns) == SUMMARY_COLUMNS
    for streams in ("both", "face"):
        values = runs[runs["streams"] == streams]
        row = summary[(summary["method"] == "clip-caer") & (summary["streams"] == streams)].iloc[0]
        assert row["n_seeds"] == 3
        for metric in ("val_uar", "test_uar", "test_war"):
            v = values[metric].astype(float).to_numpy()
            assert row[f"{metric}_mean"] == pytest.approx(v.mean(), abs=1e-3)
            assert row[f"{metric}_std"] == pytest.approx(np.std(v, ddof=1), abs=1e-3)
    single = summary[summary["method"] != "clip-caer"]
    assert (single["n_seeds"] == 1).all() and single["test_uar_std"].isna().all()

    markdown = (out / "summary.md").read_text()
    best = summary["test_uar_mean"].max()
    assert f"**{best:.2f}" in markdown and markdown.count("**") >= 6
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_nothing_is_selected_on_the_test_split(tmp_path):
    """Two caches that differ only in their test clips give the same runs, the same val
    scores and the same linear-probe C: the test split never takes part in a choice."""
    opts = dict(n_train=30, val=10, n_test=10, segments=4, candidates=1, flip=False, signal=0.5)
    make_store(tmp_path / "a.zarr", seed=0, **opts)
    store = make_store(tmp_path / "b.zarr", seed=0, **opts)
    test_rows = np.flatnonzero(store.manifest["split"].to_numpy() == "test")
    from cache import open_store

    writer = open_store(tmp_path / "b.zarr", mode="a")
    rng = np.random.default_rng(7)
    for stream in ("face", "context"):
        array = writer._root[f"features/{stream}"]
        array[test_rows[0]:test_rows[-1] + 1] = rng.normal(
            size=(len(test_rows), *array.shape[1:])).astype(np.float16) * 3
    del writer, store
    a = ablate(tmp_path / "a.zarr", tmp_path / "ab-a", seeds=(1,))
    b = ablate(tmp_path / "b.zarr", tmp_path / "ab-b", seeds=(1,))
    frame_a, frame_b = pd.DataFrame(a["rows"]), pd.DataFrame(b["rows"])
    assert frame_a["val_uar"].tolist() == frame_b["val_uar"].tolist()
    assert frame_a["test_uar"].tolist() != frame_b["test_uar"].tolist()  # the test data differ
    head = Path("runs") / "ctx8-layers1-both" / "seed-1" / "head.safetensors"
    wa, wb = load_file(str(tmp_path / "ab-a" / head)), load_file(str(tmp_path / "ab-b" / head))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ca = json.loads((tmp_path / "ab-a" / "ablate.json").read_text())["baseline_details"]
    cb = json.loads((tmp_path / "ab-b" / "ablate.json").read_text())["baseline_details"]
    assert ca["linear-probe"] == cb["linear-probe"]


def test_a_larger_grid_trains_only_its_new_runs_and_other_options_are_refused(tmp_path):
    make_store(tmp_path / "c.zarr", n_train=20, val=5, n_test=5, segments=2, candidates=1,
               flip=False)
    first = ablate(tmp_path / "c.zarr", tmp_path / "ab", n_ctx="4", seeds=(1,),
                   baselines="none")
    weights = tmp_path / "ab" / "runs" / "ctx4-layers1-both" / "seed-1" / "head.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert first["trained"] == 1
    bigger = ablate(tmp_path / "c.zarr", tmp_path / "ab", n_ctx="4,8", seeds=(1, 2),
                    baselines="none")
    assert bigger["trained"] == 3 and weights.stat().st_mtime_ns == stamp
    assert len(pd.read_csv(tmp_path / "ab" / "results.csv")) == 4
    again = ablate(tmp_path / "c.zarr", tmp_path / "ab", n_ctx="4,8", seeds=(1, 2),
                   baselines="none")
    assert again["trained"] == 0 and again["rows"] == bigger["rows"]
    result = _cli("--cache", tmp_path / "c.zarr", "--out", tmp_path / "ab", "--n-ctx", "4",
                  "--seeds", "1", "--epochs", "3", "--baselines", "none")
    assert result.exit_code == 2 and "--epochs (run 2, now 3)" in result.output, result.output
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    result = _cli("--cache", tmp_path / "c.zarr", "--out", tmp_path / "other")
    assert result.exit_code == 2 and "did not write" in result.output


@pytest.mark.slow
def test_killed_with_sigkill_then_rerun_gives_the_uninterrupted_results(tmp_path):
    make_store(tmp_path / "c.zarr", n_train=16, val=8, n_test=8, segments=2, candidates=1,
               flip=False)
    args = ["--n-ctx", "4", "--seeds", "1,2", "--epochs", "8", "--milestones", "3,6",
            "--quiet", "--device", "cpu", "--baselines", "zero-shot"]
    command = [sys.executable, str(ROOT / "cli.py"), "ablate", "--cache",
               str(tmp_path / "c.zarr"), "--out", str(tmp_path / "killed"), *args]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    # Killed inside the second run: the first is finished, the second has a checkpoint.
    last = (tmp_path / "killed" / "runs" / "ctx4-layers1-both" / "seed-2" / "checkpoints"
            / "last.json")
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None and not last.is_file():
        time.sleep(0.005)
    process.kill()
    process.wait()
    assert last.is_file(), process.stderr.read().decode()[-2000:]
    assert json.loads(last.read_text())["epoch"] < 8, "finished before the kill; make it longer"
    assert not (last.parents[1] / "config.json").exists()
    resumed = run_ablate_cli(tmp_path / "c.zarr", tmp_path / "killed", args)
    assert resumed.exit_code == 0, resumed.output
    assert run_ablate_cli(tmp_path / "c.zarr", tmp_path / "full", args).exit_code == 0
    read = lambda d: pd.read_csv(d / "results.csv").drop(columns="run")  # noqa: E731
    pd.testing.assert_frame_equal(read(tmp_path / "killed"), read(tmp_path / "full"))
    for seed in (1, 2):
        run = Path("runs") / "ctx4-layers1-both" / f"seed-{seed}" / "head.safetensors"
        wk, wf = load_file(str(tmp_path / "killed" / run)), load_file(str(tmp_path / "full" / run))
        assert all(torch.equal(wk[k], wf[k]) for k in wf)
    epochs = [json.loads(line)["epoch"] for line in
              (last.parents[1] / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 9))


def run_ablate_cli(cache, out, args):
    return _cli("--cache", cache, "--out", out, *args)
