"""What a run's files must hold, checked when a run is loaded, field by field.

A run directory (heads/run.py) and a training checkpoint (heads/train.py) are plain JSON and
safetensors, so they can be edited by hand, cut short by a copy or damaged on disk. Whatever
reads them (evaluate, predict, finetune --init, train-head --resume) checks them here first,
so a bad file ends in one line that names the file, the field and what to do, never in a
traceback from deep inside the model (a string where a number belongs, a token id past the
vocabulary, a NaN in the weights).
"""

from __future__ import annotations

import json
import math
import re
import typing
from dataclasses import fields
from pathlib import Path

from cache.core.errors import CaerError

RUN_KINDS = ("train-head", "finetune", "import-official")
STREAMS = ("both", "face", "context")  # as heads.model.STREAMS (not imported: no torch here)


class RunError(CaerError):
    """A run directory, or a file in it, that cannot be used as it is (exit 2)."""


# ------------------------------------------------------------------------------- value checks

def _kind_of(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {json.dumps(value)}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"the string {json.dumps(shown)}"
    if isinstance(value, (int, float)):
        return f"{value!r}"
    return "a list" if isinstance(value, list) else "an object"


class _Fields:
    """Checks the fields of one JSON file; every refusal names the file and the field."""

    def __init__(self, path: Path, advice: str):
        self.path, self.advice = path, advice

    def fail(self, field: str, problem: str):
        raise RunError(f"{self.path}: {field}: {problem}; {self.advice}")

    def obj(self, data: dict, key: str, where: str = "", nullable: bool = False) -> dict | None:
        value = self.present(data, key, where)
        if value is None and nullable:
            return None
        if not isinstance(value, dict):
            self.fail(where + key, f"is {_kind_of(value)}, expected an object")
        return value

    def present(self, data: dict, key: str, where: str = ""):
        if key not in data:
            self.fail(where + key, "missing")
        return data[key]

    def integer(self, data: dict, key: str, where: str = "", minimum: int | None = None,
                nullable: bool = False):
        value = self.present(data, key, where)
        if value is None and nullable:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(where + key, f"is {_kind_of(value)}, expected an integer"
                      + (f" >= {minimum}" if minimum is not None else ""))
        if minimum is not None and value < minimum:
            self.fail(where + key, f"is {value}, expected an integer >= {minimum}")
        return value

    def number(self, data: dict, key: str, where: str = "", low: float | None = None,
               high: float | None = None, nullable: bool = False):
        value = self.present(data, key, where)
        if value is None and nullable:
            return None
        if not isinstance(value, (int, float)) or isinstance(value, bool) \
                or not math.isfinite(value):
            self.fail(where + key, f"is {_kind_of(value)}, expected a finite number")
        if (low is not None and value < low) or (high is not None and value > high):
            self.fail(where + key, f"is {value}, expected a number in "
                      f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]")
        return value

    def string(self, data: dict, key: str, where: str = "", choices=None,
               nullable: bool = False):
        value = self.present(data, key, where)
        if value is None and nullable:
            return None
        if not isinstance(value, str) or not value:
            self.fail(where + key, f"is {_kind_of(value)}, expected a non-empty string")
        if choices is not None and value not in choices:
            self.fail(where + key, f"is {json.dumps(value)}, expected one of "
                      f"{', '.join(choices)}")
        return value

    def boolean(self, data: dict, key: str, where: str = ""):
        value = self.present(data, key, where)
        if not isinstance(value, bool):
            self.fail(where + key, f"is {_kind_of(value)}, expected true or false")
        return value

    def keys(self, data: dict, allowed, where: str = "") -> None:
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            self.fail(where + unknown[0], "unknown field (written by a newer caer-kit, or "
                      "edited by hand)")


def read_json(path: Path, what: str, advice: str):
    """A JSON file, or RunError naming it: cut short, not UTF-8, not JSON."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RunError(f"{path}: {what} is not UTF-8 text ({err.reason} at byte "
                       f"{err.start}); {advice}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise RunError(f"{path}: {what} is damaged (cut short or edited): not JSON ({err}); "
                       f"{advice}") from None


# ------------------------------------------------------------------------------- config.json

RUN_ADVICE = "restore the file from a copy of the run, or train again"
RUN_KEYS = ("format", "format_version", "kind", "caer_kit_version", "model", "clip", "labels",
            "prompts", "preprocessing", "cache_fingerprint", "train", "extra")
CLIP_KEYS = ("spec", "revision", "dir", "weights_digest", "image_encoder_trained")
PREPROCESSING_CHOICES = {"normalize": ("clip", "none"), "face_resize": ("squash", "letterbox")}


def check_run_config(config: dict, path: Path, head_config_class, preprocessing_keys) -> None:
    """Every field of a run's config.json has the type and range save_run writes."""
    f = _Fields(path, RUN_ADVICE)
    f.keys(config, RUN_KEYS)
    f.integer(config, "format_version", minimum=1)
    f.string(config, "kind", choices=RUN_KINDS)
    f.string(config, "caer_kit_version")

    model = f.obj(config, "model")
    hints = typing.get_type_hints(head_config_class)
    names = [field.name for field in fields(head_config_class)]
    f.keys(model, names, "model.")
    for name in names:  # by the field's type, so that a new HeadConfig field is checked too
        if name == "streams":
            f.string(model, name, "model.", choices=STREAMS)
        elif name == "dropout":
            f.number(model, name, "model.", low=0.0, high=0.99)
        elif name == "logit_scale":
            f.number(model, name, "model.", low=1e-6)
        elif hints[name] is bool:
            f.boolean(model, name, "model.")
        elif hints[name] is int:
            f.integer(model, name, "model.", minimum=1)
        elif hints[name] is float:
            f.number(model, name, "model.")
        elif hints[name] is str:
            f.string(model, name, "model.")
        else:
            f.present(model, name, "model.")

    clip = f.obj(config, "clip")
    f.keys(clip, CLIP_KEYS, "clip.")
    f.string(clip, "spec", "clip.")
    f.string(clip, "revision", "clip.", nullable=True)
    directory = f.string(clip, "dir", "clip.", nullable=True)
    if directory is not None and (Path(directory).name != directory or directory in ("..", ".")):
        f.fail("clip.dir", f"is {json.dumps(directory)}, expected a folder name inside the run "
                           f"(such as \"clip\"), not a path")
    f.string(clip, "weights_digest", "clip.", nullable=True)
    f.boolean(clip, "image_encoder_trained", "clip.")

    labels = f.obj(config, "labels")
    classes = f.present(labels, "classes", "labels.")
    if not isinstance(classes, list):
        f.fail("labels.classes", f"is {_kind_of(classes)}, expected a list")

    prompts = f.obj(config, "prompts")
    f.keys(prompts, ("token_ids",), "prompts.")
    ids = f.present(prompts, "token_ids", "prompts.")
    if not isinstance(ids, list) or not ids:
        f.fail("prompts.token_ids", f"is {_kind_of(ids)}, expected a list of one list of token "
                                    f"ids per class")
    if len(ids) != len(classes):
        f.fail("prompts.token_ids", f"holds {len(ids)} prompts for {len(classes)} classes")
    for c, row in enumerate(ids):
        if not isinstance(row, list) or not row or len(row) != len(ids[0]):
            f.fail(f"prompts.token_ids[{c}]", f"is {_kind_of(row)} of length "
                   f"{len(row) if isinstance(row, list) else '-'}, expected a list of "
                   f"{len(ids[0]) if isinstance(ids[0], list) else 'equal-length'} token ids")
        for t, token in enumerate(row):
            if not isinstance(token, int) or isinstance(token, bool) or token < 0:
                f.fail(f"prompts.token_ids[{c}][{t}]", f"is {_kind_of(token)}, expected a "
                                                       f"token id (an integer >= 0)")

    prep = f.obj(config, "preprocessing")
    f.keys(prep, preprocessing_keys, "preprocessing.")
    f.string(prep, "normalize", "preprocessing.", choices=PREPROCESSING_CHOICES["normalize"])
    if "face_resize" in prep:
        f.string(prep, "face_resize", "preprocessing.",
                 choices=PREPROCESSING_CHOICES["face_resize"])
    if "face_margin" in prep:
        f.integer(prep, "face_margin", "preprocessing.", minimum=0)
    from pipeline.config import ExtractConfig, PRESETS

    choices = {fd.name: fd.metadata["choices"] for fd in fields(ExtractConfig)
               if fd.name in PRESETS["caer"] and "choices" in fd.metadata}
    for name in PRESETS["caer"]:  # extract's preprocessing choices, as its options allow
        if name in prep and name != "normalize" and name in choices:
            f.string(prep, name, "preprocessing.", choices=choices[name])
    for name in ("segments", "image_size"):
        f.integer(prep, name, "preprocessing.", minimum=1)
    if prep["segments"] != model["segments"]:
        f.fail("preprocessing.segments", f"is {prep['segments']} but model.segments is "
                                         f"{model['segments']}")
    f.obj(config, "cache_fingerprint", nullable=True)
    f.obj(config, "train")
    f.obj(config, "extra")


def check_token_ids(token_ids, vocab_size: int, context_length: int, path: Path,
                    field: str = "prompts.token_ids") -> None:
    """Every prompt token id indexes the CLIP's token embedding; prompts fit its context."""
    length = len(token_ids[0])
    if length > context_length:
        raise RunError(f"{path}: {field}: prompts of {length} tokens, but the CLIP's "
                       f"context holds {context_length}; the run and its CLIP do not match; "
                       f"{RUN_ADVICE}")
    for c, row in enumerate(token_ids):
        for t, token in enumerate(row):
            if not 0 <= token < vocab_size:
                raise RunError(f"{path}: {field}[{c}][{t}]: token id {token} is out of "
                               f"range for the CLIP's vocabulary of {vocab_size} tokens "
                               f"(0..{vocab_size - 1}); {RUN_ADVICE}")


# ------------------------------------------------------------------------------- tensors

def check_finite(tensors, path: Path, advice: str) -> None:
    """RunError naming the first tensor of ``tensors`` ({name: tensor}) with NaN or inf."""
    import torch

    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            kinds = "NaN" if bool(torch.isnan(tensor).any()) else "inf"
            raise RunError(f"{path}: tensor {name} holds {bad} {kinds} value"
                           f"{'s' if bad > 1 else ''} of {tensor.numel()}: the weights "
                           f"are broken (training diverged, or the file is damaged); "
                           f"{advice}")


def load_safetensors(path: Path, what: str, advice: str) -> dict:
    """A safetensors file's tensors, or RunError naming it (cut short, damaged, missing)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise RunError(f"{path}: {what} is missing; {advice}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RunError(f"{path}: {what} is damaged or cut short ({detail}); "
                       f"{advice}") from None


# ------------------------------------------------------------------------------- checkpoints

WEIGHTS_NAME = re.compile(r"(last|best)-\d{4}p?\.safetensors")


def check_checkpoint_info(info, path: Path, name: str, advice: str) -> None:
    """last.json / best.json as heads/train.py writes them."""
    f = _Fields(path, advice)
    if not isinstance(info, dict):
        f.fail("(top level)", f"is {_kind_of(info)}, expected an object")
    weights = f.string(info, "weights")
    if not WEIGHTS_NAME.fullmatch(weights) or not weights.startswith(name + "-"):
        f.fail("weights", f"is {json.dumps(weights)}, expected a file name like "
                          f"{name}-0003.safetensors in the same folder")
    f.integer(info, "epoch", minimum=0)
    if name == "best":
        f.number(info, "val_uar", low=0.0, high=1.0, nullable=True)
        return
    f.integer(info, "step", minimum=0)
    f.integer(info, "best_epoch", minimum=1, nullable=True)
    f.number(info, "best_val_uar", low=0.0, high=1.0, nullable=True)
    f.boolean(info, "finished")
    f.obj(info, "options")
    f.obj(info, "cache_fingerprint")
    scheduler = f.obj(info, "scheduler")
    f.obj(scheduler, "milestones", "scheduler.")
    f.obj(info, "grad_scaler", nullable=True)
