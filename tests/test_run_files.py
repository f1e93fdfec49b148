"""Runs and checkpoints as people really have them: a config.json edited by hand (wrong types,
unknown or missing fields), prompt token ids past the vocabulary, a --resume whose last.json or
weights file was cut short, NaN in the weights. Every one is refused with one line naming the
file and the field, exit status 2, and nothing written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from cli import main
from heads.config import TrainConfig
from heads.train import train_head
from test_finetune import make_pixel_store
from test_train import make_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A pixel cache and a 1-epoch train-head run on it (random:tiny, so RUN/clip exists)."""
    base = tmp_path_factory.mktemp("runfiles")
    cache = base / "pixels.zarr"
    make_pixel_store(cache, n_train=10, n_test=5)
    run = base / "run"
    train_head(TrainConfig(cache=str(cache), out=str(run), epochs=1, val_fraction=0,
                           select="last", quiet=True, device="cpu"))
    return cache, run


def _copy(run, tmp_path):
    return shutil.copytree(run, tmp_path / "run")


def _edit_config(run, change):
    config = json.loads((run / "config.json").read_text())
    change(config)
    (run / "config.json").write_text(json.dumps(config, indent=2))


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line(result, status=2):
    assert result.exit_code == status, result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def _set(path, value):
    def change(config):
        *parents, last = path
        target = config
        for key in parents:
            target = target[key]
        if value is KeyError:
            del target[last]
        else:
            target[last] = value
    return change


@pytest.mark.parametrize("path,value,problem", [
    (("model", "segments"), "16", 'model.segments: is the string "16", expected an integer >= 1'),
    (("model", "temporal_heads"), -2, "model.temporal_heads: is -2, expected an integer >= 1"),
    (("model", "dropout"), "0.1", 'model.dropout: is the string "0.1", expected a finite number'),
    (("model", "n_ctx"), True, "model.n_ctx: is the boolean true, expected an integer >= 1"),
    (("model", "colour"), "blue", "model.colour: unknown field"),
    (("model", "feature_dim"), KeyError, "model.feature_dim: missing"),
    (("preprocessing",), KeyError, "preprocessing: missing"),
    (("preprocessing", "normalize"), "imagenet",
     'preprocessing.normalize: is "imagenet", expected one of clip, none'),
    (("preprocessing", "downscale"), "quick",
     'preprocessing.downscale: is "quick", expected one of fast, exact'),
    (("kind",), "train", 'kind: is "train", expected one of train-head, finetune, import-official'),
    (("clip", "dir"), "../../elsewhere", 'clip.dir: is "../../elsewhere", expected a folder name'),
    (("prompts", "token_ids"), [[1, 2]], "prompts.token_ids: holds 1 prompts for 5 classes"),
    (("extra_field",), 1, "extra_field: unknown field"),
])
def test_a_config_with_wrong_fields_is_refused_naming_file_and_field(trained, tmp_path, path,
                                                                     value, problem):
    cache, good = trained
    run = _copy(good, tmp_path)
    _edit_config(run, _set(path, value))
    out = tmp_path / "report"
    line = _one_line(_invoke("evaluate", "--run", run, "--cache", cache, "--out", out))
    assert line.startswith(f"error: {run / 'config.json'}: {problem}"), line
    assert line.endswith("restore the file from a copy of the run, or train again")
    assert not out.exists()


def test_every_command_that_loads_a_run_checks_its_config(trained, tmp_path):
    cache, good = trained
    run = _copy(good, tmp_path)
    _edit_config(run, _set(("model", "segments"), "16"))
    expected = f"error: {run / 'config.json'}: model.segments: is the string \"16\""
    for args in (["evaluate", "--run", run, "--cache", cache, "--out", tmp_path / "e"],
                 ["predict", "--run", run, tmp_path / "clip.mp4"],
                 ["finetune", "--cache", cache, "--init", run, "--out", tmp_path / "ft",
                  "--device", "cpu", "--workers", "0", "--quiet"]):
        assert _one_line(_invoke(*args)).startswith(expected), args
    assert not (tmp_path / "e").exists() and not (tmp_path / "ft").exists()


def test_a_prompt_token_id_past_the_vocabulary_is_one_line(trained, tmp_path):
    cache, good = trained
    run = _copy(good, tmp_path)

    def change(config):
        config["prompts"]["token_ids"][1][3] = 10 ** 6
    _edit_config(run, change)
    vocab = json.loads((run / "clip" / "config.json").read_text())["text_config"]["vocab_size"]
    for args in (["evaluate", "--run", run, "--cache", cache, "--out", tmp_path / "e"],
                 ["predict", "--run", run, tmp_path / "clip.mp4"]):
        line = _one_line(_invoke(*args))
        assert line.startswith(f"error: {run / 'config.json'}: prompts.token_ids[1][3]: token id "
                               f"1000000 is out of range for the CLIP's vocabulary of {vocab} "
                               f"tokens (0..{vocab - 1})"), line
    _edit_config(run, lambda c: c["prompts"]["token_ids"][1].__setitem__(3, -1))
    line = _one_line(_invoke("evaluate", "--run", run, "--cache", cache, "--out", tmp_path / "e"))
    assert "prompts.token_ids[1][3]: is -1, expected a token id" in line


def test_the_model_refuses_token_ids_past_its_vocabulary():
    from heads.model import CaerModel, HeadConfig
    from pipeline.clip import build_random_clip
    from cache.core.errors import CaerError
    from cache.core.labels import RAER5

    clip = build_random_clip("tiny")
    vocab = clip.model.text_model.embeddings.token_embedding.num_embeddings
    ids = torch.zeros(5, clip.model.text_model.config.max_position_embeddings, dtype=torch.long)
    ids[:, 5] = vocab  # one past the end: an IndexError inside the embedding before
    with pytest.raises(CaerError, match=f"prompt token id {vocab} is out of range for the "
                                        f"CLIP's vocabulary of {vocab} tokens"):
        CaerModel(HeadConfig(feature_dim=clip.feature_dim, segments=4), clip, RAER5,
                  prompt_token_ids=ids)


def _poison(file, name=None):
    tensors = dict(load_file(str(file)))
    name = name or next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(file), metadata={"format": "pt"})
    return name


def test_nan_in_the_weights_is_blamed_on_the_weights_not_the_cache(trained, tmp_path):
    cache, good = trained
    run = _copy(good, tmp_path)
    _poison(run / "head.safetensors", "fusion.weight")
    out = tmp_path / "report"
    line = _one_line(_invoke("evaluate", "--run", run, "--cache", cache, "--out", out))
    assert line.startswith(f"error: {run / 'head.safetensors'}: tensor fusion.weight holds 1 NaN "
                           f"value of "), line
    assert "features" not in line and "cache" not in line and not out.exists()
    shutil.copy(good / "head.safetensors", run / "head.safetensors")
    name = _poison(run / "clip" / "model.safetensors")
    line = _one_line(_invoke("predict", "--run", run, tmp_path / "clip.mp4"))
    assert line.startswith(f"error: {run / 'clip' / 'model.safetensors'}: tensor {name} holds")


# ---- --resume with torn files ---------------------------------------------------------------

RESUME = ["--epochs", "2", "--batch-size", "8", "--val-fraction", "0.2", "--milestones", "5",
          "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A run stopped after epoch 1 of 2 (--max-steps), with last and best checkpoints."""
    base = tmp_path_factory.mktemp("resume")
    make_store(base / "c.zarr", n_train=26, n_test=5, segments=2, candidates=1, flip=False)
    result = _invoke("train-head", "--cache", base / "c.zarr", "--out", base / "run",
                     "--max-steps", "3", *RESUME)
    assert result.exit_code == 0, result.output
    checkpoints = base / "run" / "checkpoints"
    assert json.loads((checkpoints / "last.json").read_text())["epoch"] == 1
    assert (checkpoints / "best.json").is_file()
    return base / "c.zarr", base / "run"


def _files(run):
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def _cut(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _weights_of(run, name):
    return run / "checkpoints" / json.loads((run / "checkpoints" / f"{name}.json").read_text())[
        "weights"]


@pytest.mark.parametrize("damage,problem", [
    (lambda run: _cut(run / "checkpoints" / "last.json"),
     "checkpoints/last.json: the checkpoint record is damaged (cut short or edited): not JSON"),
    (lambda run: _cut(_weights_of(run, "last")),
     "checkpoints/last-0001.safetensors: the checkpoint's weights file is damaged or cut short"),
    (lambda run: _cut(run / "checkpoints" / "best.json", 0.8),
     "checkpoints/best.json: the checkpoint record is damaged (cut short or edited): not JSON"),
    (lambda run: _cut(_weights_of(run, "best"), 0.3),
     "checkpoints/best-0001.safetensors: the checkpoint's weights file is damaged or cut short"),
    (lambda run: (run / "checkpoints" / "last.json").write_bytes(b"\x00" * 64),
     "checkpoints/last.json: the checkpoint record is damaged"),
    (lambda run: _edit_json(run / "checkpoints" / "last.json", epoch="1"),
     'checkpoints/last.json: epoch: is the string "1", expected an integer >= 0'),
    (lambda run: _edit_json(run / "checkpoints" / "last.json", weights="../../head.safetensors"),
     'checkpoints/last.json: weights: is "../../head.safetensors", expected a file name'),
    (lambda run: _poison(_weights_of(run, "last")),
     "checkpoints/last-0001.safetensors: tensor "),
])
def test_resume_from_a_torn_checkpoint_is_one_line_and_writes_nothing(stopped, tmp_path, damage,
                                                                      problem):
    cache, good = stopped
    run = _copy(good, tmp_path)
    damage(run)
    before = _files(run)
    line = _one_line(_invoke("train-head", "--cache", cache, "--out", run, "--resume", *RESUME))
    assert line.startswith(f"error: {run}/{problem}"), line
    assert line.endswith(f"resume cannot continue from it: delete {run / 'checkpoints'} and run "
                         f"the same command (with --resume) to train this run again from epoch "
                         f"1, or restore the file")
    assert _files(run) == before  # nothing trimmed, swept or written


def test_doing_what_the_torn_checkpoint_line_says_trains_the_run_again(stopped, tmp_path):
    cache, good = stopped
    run = _copy(good, tmp_path)
    _cut(_weights_of(run, "last"))
    _one_line(_invoke("train-head", "--cache", cache, "--out", run, "--resume", *RESUME))
    shutil.rmtree(run / "checkpoints")  # what the line says to do
    result = _invoke("train-head", "--cache", cache, "--out", run, "--resume", *RESUME)
    assert result.exit_code == 0, result.output
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2] and (run / "config.json").is_file()


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
