"""Every command is declared one way: its options are its config's fields, and the config
checks itself, so a Python caller of the library gets the command line's one-line errors."""

import ast
import dataclasses
from pathlib import Path

import pytest

import cli
from cache.core.errors import CaerError
from heads.config import (ABLATE_SETS, AblateConfig, DemoConfig, EvaluateConfig, ExplainConfig,
                          FinetuneConfig, ImportOfficialConfig, PredictConfig, TrainConfig)
from pipeline.config import ExtractConfig, IndexConfig, InfoConfig, LabelsConfig

COMMANDS = {"extract": ExtractConfig, "train-head": TrainConfig, "finetune": FinetuneConfig,
            "evaluate": EvaluateConfig, "predict": PredictConfig,
            "import-official": ImportOfficialConfig, "demo": DemoConfig, "index": IndexConfig,
            "labels": LabelsConfig, "info": InfoConfig, "explain": ExplainConfig,
            "ablate": AblateConfig}


def command_fields(name: str) -> dict:
    """The fields a command's options must be: its config's, and for ablate also every
    train-head option it passes through to its runs (not those it sets per run)."""
    found = [f for f in dataclasses.fields(COMMANDS[name]) if f.metadata.get("cli", True)]
    if name == "ablate":
        found += [f for f in dataclasses.fields(TrainConfig) if f.name not in ABLATE_SETS]
    return {f.name: f for f in found}


def test_every_command_is_declared_by_a_config():
    assert set(cli.main.commands) == set(COMMANDS)


def test_cli_writes_no_option_by_hand():
    """Only the group's own --verbose is written out in cli.py; every command's come from its
    config (so no default or help is said twice)."""
    tree = ast.parse(Path(cli.__file__).read_text(encoding="utf-8"))
    by_hand = [node.args[0].value if node.args else "?" for node in ast.walk(tree)
               if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
               and node.func.attr in ("option", "argument")
               and getattr(node.func.value, "id", None) == "click"]
    assert by_hand == ["-v"]


@pytest.mark.parametrize("name", COMMANDS)
def test_a_commands_options_are_its_configs_fields_with_their_defaults(name):
    command, fields = cli.main.commands[name], command_fields(name)
    params = {p.name: p for p in command.params if p.name != "help"}
    assert set(params) == set(fields), f"{name}: hand-written options {set(params) - set(fields)}"
    for key, param in params.items():
        default = fields[key].default
        if isinstance(default, tuple) and default and isinstance(default[0], int):
            default = ",".join(map(str, default))  # 10,15 on the command line
        if param.required or (isinstance(default, tuple) and not default):
            continue
        assert param.default == default, f"{name} --{key}: {param.default!r} != {default!r}"


def test_library_functions_check_their_config(tmp_path):
    from heads.ablate import run_ablate
    from heads.demo import run_demo
    from heads.evaluate import evaluate
    from heads.explain import explain
    from heads.official import import_official
    from heads.predict import predict

    with pytest.raises(CaerError, match="--run is required"):
        evaluate(EvaluateConfig(cache="c.zarr"))
    with pytest.raises(CaerError, match="--batch-size must be at least 1"):
        evaluate(EvaluateConfig(run="r", cache="c.zarr", batch_size=0))
    with pytest.raises(CaerError, match="--device gpu: expected auto, cpu, cuda or cuda:N"):
        evaluate(EvaluateConfig(run="r", cache="c.zarr", device="gpu"))
    with pytest.raises(CaerError, match="no clip given"):
        predict(PredictConfig(run="r"))
    with pytest.raises(CaerError, match="--out is required"):
        import_official(ImportOfficialConfig(checkpoint="model.pth"))
    with pytest.raises(CaerError, match="--out is required"):
        explain(ExplainConfig(run="r", paths=("clip.mp4",)))
    with pytest.raises(CaerError, match="--limit goes with --split"):
        explain(ExplainConfig(run="r", out=str(tmp_path / "cams"), cache="c.zarr", ids=("a",),
                              limit=2))
    with pytest.raises(CaerError, match="--cache is required"):
        run_ablate(AblateConfig(out=str(tmp_path / "ablate")))
    with pytest.raises(CaerError, match="--clips-per-class must be at least 8"):
        run_demo(DemoConfig(out=str(tmp_path / "demo"), clips_per_class=3))
    assert not any(tmp_path.iterdir())  # each refused before anything was written
