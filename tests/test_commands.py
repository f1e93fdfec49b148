"""Every command is declared one way: its options are its config's fields, and the config
checks itself, so a Python caller of the library gets the command line's one-line errors."""

import dataclasses

import pytest

import cli
from cache.core.errors import CaerError
from heads.config import (DemoConfig, EvaluateConfig, FinetuneConfig, ImportOfficialConfig,
                          PredictConfig, TrainConfig)
from pipeline.config import ExtractConfig, IndexConfig, LabelsConfig

COMMANDS = {"extract": ExtractConfig, "train-head": TrainConfig, "finetune": FinetuneConfig,
            "evaluate": EvaluateConfig, "predict": PredictConfig,
            "import-official": ImportOfficialConfig, "demo": DemoConfig, "index": IndexConfig,
            "labels": LabelsConfig}


@pytest.mark.parametrize("name", COMMANDS)
def test_a_commands_options_are_its_configs_fields_with_their_defaults(name):
    command, config = cli.main.commands[name], COMMANDS[name]
    fields = {f.name: f for f in dataclasses.fields(config)}
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
    from heads.evaluate import evaluate
    from heads.official import import_official
    from heads.predict import predict
    from heads.demo import run_demo

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
    with pytest.raises(CaerError, match="--clips-per-class must be at least 8"):
        run_demo(DemoConfig(out=str(tmp_path / "demo"), clips_per_class=3))
    assert not (tmp_path / "demo").exists()  # refused before anything was written
