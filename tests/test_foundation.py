"""The foundation every stage stands on: the CLI and the one CLIP loader."""

import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import cli
from pipeline.clip import ClipLoadError, build_random_clip, load_clip
from cache.core.labels import LabelSetError, load_label_set

STAGES = ["extract", "info", "train-head", "finetune", "evaluate", "predict",
          "import-official", "demo"]


def test_help_lists_every_stage():
    result = CliRunner().invoke(cli.main, ["--help"])
    assert result.exit_code == 0
    for stage in STAGES:
        assert stage in result.output


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_help_has_an_example(stage):
    result = CliRunner().invoke(cli.main, [stage, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output and "python cli.py" in result.output


def test_python_cli_runs_from_the_root_and_reports_version():
    out = subprocess.run([sys.executable, "cli.py", "--version"], capture_output=True,
                         text=True, cwd=cli.__file__.rsplit("/", 1)[0])
    assert out.returncode == 0 and "caer-kit" in out.stdout


def _images(astronaut):
    face = torch.tensor(astronaut[:224, 150:374]).permute(2, 0, 1).float() / 255
    rocket = torch.tensor(astronaut[250:474, 250:474]).permute(2, 0, 1).float() / 255
    return torch.stack([face, rocket, torch.rand(3, 224, 224), torch.zeros(3, 224, 224)])


def test_tiny_clip_reloads_from_disk_with_identical_features(tiny_clip_dir, astronaut):
    original = build_random_clip("tiny")
    reloaded = load_clip(str(tiny_clip_dir))
    images = _images(astronaut)
    texts = ["Relaxed mouth,open eyes", "a photo of a rocket", "X X X X"]
    with torch.no_grad():
        assert torch.equal(original.encode_images(images), reloaded.encode_images(images))
        assert torch.equal(original.encode_text(texts), reloaded.encode_text(texts))
    assert reloaded.revision == original.revision.split("-", 1)[1]
    assert reloaded.tokenizer(texts)["input_ids"] == original.tokenizer(texts)["input_ids"]


def test_tiny_clip_features_differ_between_images(astronaut):
    clip = build_random_clip("tiny")
    with torch.no_grad():
        f = torch.nn.functional.normalize(clip.encode_images(_images(astronaut)), dim=-1)
    cosine = f @ f.T
    off_diagonal = cosine[~torch.eye(len(f), dtype=torch.bool)]
    assert off_diagonal.max() < 0.95, cosine


def test_random_clip_is_the_same_for_the_same_seed():
    assert build_random_clip("tiny").revision == build_random_clip("tiny").revision


def test_random_vit_b_32_has_the_real_shapes():
    model = build_random_clip("vit-b-32").model
    n_params = sum(p.numel() for p in model.parameters())
    assert 151_000_000 < n_params < 152_000_000  # openai/clip-vit-base-patch32: 151.28M
    assert model.config.vision_config.num_attention_heads == 12
    assert model.config.text_config.num_attention_heads == 8


def test_hub_id_offline_fails_with_one_actionable_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ClipLoadError) as err:
        load_clip("openai/clip-vit-base-patch32")
    message = str(err.value)
    assert "HF_HUB_OFFLINE" in message and "save_pretrained" in message
    assert "\n" not in message


def test_unknown_random_shape_is_refused():
    with pytest.raises(ClipLoadError, match="random:tiny"):
        load_clip("random:huge")


def test_label_sets(tmp_path):
    raer = load_label_set("raer5")
    assert raer.names == ["Neutrality", "Enjoyment", "Confusion", "Fatigue", "Distraction"]
    assert raer.index("fatigue") == 3 and raer.index("4") == 4
    with pytest.raises(LabelSetError, match="out of range"):
        raer.index(5)
    custom = tmp_path / "labels.yaml"
    custom.write_text("name: two\nclasses:\n  - {name: a, descriptor: first}\n"
                      "  - {name: b, descriptor: second, face_descriptor: face b}\n")
    two = load_label_set(str(custom))
    assert two.descriptors("face") == ["first", "face b"]
    assert load_label_set(two.as_dict()) == two
