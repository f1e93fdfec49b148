"""Run directories: everything needed to rebuild a trained model, and nothing executable.

A run directory holds::

    RUN/config.json       JSON, written last (its presence marks a complete run):
        format            "caer-kit-run", format_version 1
        kind              train-head | finetune | import-official
        caer_kit_version  the version that wrote it
        model             HeadConfig fields (heads.model.HeadConfig)
        clip              {spec, revision, dir, weights_digest, image_encoder_trained}:
                          spec and revision name the
                          CLIP the run was built from (a cache's clip_spec/clip_revision); dir is
                          "clip" when the CLIP is stored in RUN/clip (random:, imported or
                          fine-tuned CLIPs), else null and spec is loaded with the shared
                          loader. load_run checks the revision, or for RUN/clip the
                          weights_digest (which differs from revision after finetune), so a
                          changed CLIP is refused
        labels            the label set (cache.core.labels.LabelSet.as_dict)
        prompts           {token_ids: [C][L]}: the exact prompt tokens, so loading never
                          re-tokenizes (a run keeps the ids it was trained with)
        preprocessing     what a cache or input must match: normalize ("clip" | "none"),
                          face_resize, face_margin, segments, image_size, ...
        cache_fingerprint the fingerprint of the cache it was trained on (null if none)
        train             every training option
        extra             anything else the writer records (e.g. import provenance)
    RUN/head.safetensors  CaerModel.trainable_state_dict(): temporal encoders, fusion, prompt
                          context, the prompts' frozen token embeddings; the image encoder's
                          weights are not repeated here when RUN/clip holds them
    RUN/clip/             CLIPModel.save_pretrained + tokenizer.save_pretrained (optional)

Training runs add metrics.jsonl, curves.png and checkpoints/ (heads/train.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, fields
from pathlib import Path

import torch

from cache.atomic import atomic_write, atomic_write_text, output_dir, write_failed
from heads.model import CaerModel, HeadConfig
from heads.run_checks import RunError
from cache.core import __version__
from pipeline.clip import LoadedClip, load_clip, weights_digest
from cache.core.labels import LabelSet, LabelSetError

log = logging.getLogger("caer")

FORMAT = "caer-kit-run"
FORMAT_VERSION = 1
CONFIG, WEIGHTS, CLIP_DIR = "config.json", "head.safetensors", "clip"
# Cache fingerprint fields that decide what the model sees; evaluate compares them.
PREPROCESSING_KEYS = ("normalize", "face_resize", "face_margin", "segments", "image_size",
                      "frame_order", "frame_count", "frame_sampling", "frame_decode",
                      "face_crop", "context", "context_resize", "downscale")
_IMAGE_ENCODER = ("clip.vision_model.", "clip.visual_projection.")


def recorded_choices(run_config: dict) -> dict:
    """extract's preprocessing choices (the keys of FINGERPRINT_DEFAULTS) the run was trained
    with: its ``preprocessing``, else its cache fingerprint, else, for a choice the run
    predates, the value every store had before that choice existed."""
    from cache.fingerprint import FINGERPRINT_DEFAULTS

    prep = run_config.get("preprocessing") or {}
    trained_on = run_config.get("cache_fingerprint") or {}
    return {k: prep.get(k, trained_on.get(k, v)) for k, v in FINGERPRINT_DEFAULTS.items()}


_WEIGHTS_ADVICE = ("train again (with lower learning rates if it diverged) or restore the run "
                   "from a copy")


def save_run(directory: str | os.PathLike, model: CaerModel, *, kind: str, train_options: dict,
             cache_fingerprint: dict | None, extra: dict | None = None,
             save_clip: bool | None = None, preprocessing: dict | None = None) -> Path:
    """Write ``model`` as a run directory (see the module docstring) and return its path.

    ``save_clip`` defaults to: copy the CLIP when it is ``random:``, imported
    (kind import-official) or fine-tuned; otherwise reference its spec.
    ``preprocessing`` overrides the fields taken from ``cache_fingerprint``.
    """
    directory = Path(directory)
    if save_clip is None:
        save_clip = (model.clip_spec.startswith("random:") or kind in ("import-official", "finetune")
                     or model.image_encoder_trained)
    prep = {k: cache_fingerprint[k] for k in PREPROCESSING_KEYS if k in (cache_fingerprint or {})}
    if prep.get("normalize", model.normalize) != model.normalize:
        log.warning("the cache was built with normalize=%s but the model uses %s",
                    prep["normalize"], model.normalize)
    prep.update(normalize=model.normalize, segments=model.config.segments,
                image_size=int(model.clip.config.vision_config.image_size))
    prep.update(preprocessing or {})

    output_dir(directory, "run directory")
    # An interrupted save leaves no config.json (unlink removes a planted link, not its target).
    (directory / CONFIG).unlink(missing_ok=True)
    clip_info = {"spec": model.clip_spec, "revision": model.clip_revision, "dir": None,
                 "weights_digest": None, "image_encoder_trained": model.image_encoder_trained}
    if save_clip:
        _save_clip_dir(LoadedClip(model.clip, model.tokenizer, model.clip_spec,
                                  model.clip_revision), directory / CLIP_DIR)
        clip_info.update(dir=CLIP_DIR, weights_digest=weights_digest(model.clip))

    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.trainable_state_dict().items()
             if not (save_clip and k.startswith(_IMAGE_ENCODER))}
    atomic_write(directory / WEIGHTS,
                 lambda tmp: save_file(state, str(tmp), metadata={"format": FORMAT, "kind": kind}))

    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind,
        "caer_kit_version": __version__,
        "model": asdict(model.config),
        "clip": clip_info,
        "labels": model.labels.as_dict(),
        "prompts": {"token_ids": model.prompt_learner.token_ids.cpu().tolist()},
        "preprocessing": prep,
        "cache_fingerprint": cache_fingerprint,
        "train": train_options,
        "extra": extra or {},
    }
    text = json.dumps(config, indent=2, default=str)
    # One line per prompt's token ids instead of one line per id.
    text = re.sub(r"\[\s+(-?\d+(?:,\s+-?\d+)*)\s+\]",
                  lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text)
    atomic_write_text(directory / CONFIG, text + "\n")
    return directory


def _save_clip_dir(clip: LoadedClip, target: Path) -> None:
    """save_pretrained into a fresh folder beside ``target``, then swap it in: a link planted
    at ``target`` (or inside it) is replaced, never written through."""
    import shutil
    import tempfile

    fresh = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        clip.save(fresh)
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.is_dir():
            shutil.rmtree(target)  # the run's own CLIP copy, inside the run directory
        os.replace(fresh, target)
    except OSError as err:
        shutil.rmtree(fresh, ignore_errors=True)
        raise write_failed(err, target) from None
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise


def read_run_config(directory: str | os.PathLike) -> dict:
    """The run's config.json, checked for format; a missing or unreadable one is refused."""
    directory = Path(directory)
    path = directory / CONFIG
    if not directory.is_dir():
        raise RunError(f"run {directory}: no such directory; pass the --out directory of "
                       f"train-head, finetune or import-official")
    if not path.is_file():
        raise RunError(f"run {directory}: no {CONFIG}; it is not a run directory or its save was "
                       f"interrupted; train again or pass another run")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunError(f"run {directory}: {CONFIG} is corrupt ({err}); restore it or train "
                       f"again") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise RunError(f"run {directory}: {CONFIG} is not a caer-kit run config")
    version = config.get("format_version", 0)
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise RunError(f"run {directory}: written by caer-kit {config.get('caer_kit_version')} "
                       f"(run format {config['format_version']}); upgrade caer-kit to read it")
    from heads.run_checks import check_run_config

    check_run_config(config, path, HeadConfig, PREPROCESSING_KEYS)
    return config


def load_run(directory: str | os.PathLike, device: str | torch.device = "cpu") -> CaerModel:
    """Rebuild a run's model from its directory alone, in eval mode on ``device``.

    Every file is checked before it is used (heads/run_checks.py): config.json field by field,
    the prompt token ids against the CLIP's vocabulary, the weights for NaN and inf."""
    from heads.run_checks import (check_finite, check_token_ids, load_safetensors)

    directory = Path(directory)
    config = read_run_config(directory)
    where = f"run {directory}"
    try:
        known = {f.name for f in fields(HeadConfig)}
        unknown = set(config["model"]) - known
        if unknown:
            raise RunError(f"{where}: unknown model options {sorted(unknown)}; upgrade caer-kit")
        head_config = HeadConfig(**config["model"])
        labels = LabelSet.from_dict(config["labels"], source=f"{where} labels")
        clip_info, prep = config["clip"], config["preprocessing"]
        token_ids = torch.tensor(config["prompts"]["token_ids"], dtype=torch.long)
    except (KeyError, TypeError, ValueError, LabelSetError) as err:
        raise RunError(f"{where}: {CONFIG} is incomplete or malformed ({type(err).__name__}: "
                       f"{err}); train again or restore the file") from None

    if clip_info.get("dir"):
        clip_dir = directory / clip_info["dir"]
        if not clip_dir.is_dir():
            raise RunError(f"{where}: its CLIP directory {clip_dir} is missing; copy the whole "
                           f"run directory, not only config.json and {WEIGHTS}")
        clip = load_clip(str(clip_dir))
        clip_file = clip_dir / "model.safetensors"
        check_finite(dict(clip.model.named_parameters()),
                     clip_file if clip_file.is_file() else clip_dir, _WEIGHTS_ADVICE)
        if clip_info.get("weights_digest") and clip.revision != clip_info["weights_digest"]:
            raise RunError(f"{where}: the weights in {clip_dir} differ from those saved with the "
                           f"run (digest {clip.revision} != {clip_info['weights_digest']}); the "
                           f"run directory was modified or corrupted")
        clip.spec, clip.revision = clip_info["spec"], clip_info["revision"]
    else:
        clip = load_clip(clip_info["spec"])
        if clip.revision != clip_info["revision"]:
            raise RunError(f"{where}: CLIP {clip_info['spec']} is now revision {clip.revision}, "
                           f"but the run was trained with {clip_info['revision']}; load that "
                           f"revision (e.g. a saved copy: --clip DIR) or train again")

    text = clip.model.text_model
    check_token_ids(config["prompts"]["token_ids"], text.embeddings.token_embedding.num_embeddings,
                    text.config.max_position_embeddings, directory / CONFIG)
    model = CaerModel(head_config, clip, labels, normalize=prep.get("normalize", "clip"),
                      prompt_token_ids=token_ids)
    weights = directory / WEIGHTS
    state = load_safetensors(weights, "the weights file", _WEIGHTS_ADVICE)
    check_finite(state, weights, _WEIGHTS_ADVICE)
    own = model.state_dict()
    expected = {k for k in model.trainable_state_dict() if not k.startswith(_IMAGE_ENCODER)}
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(state) & set(own) if state[k].shape != own[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(f"{name}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                           for name, keys in (("missing", missing), ("unexpected", unexpected),
                                              ("wrong shape", wrong)) if keys)
        raise RunError(f"{where}: {WEIGHTS} does not match {CONFIG} ({detail}); the files come "
                       f"from different runs")
    model.load_state_dict(state, strict=False)
    model.image_encoder_trained = (bool(clip_info.get("image_encoder_trained"))
                                   or any(k.startswith(_IMAGE_ENCODER) for k in state))
    return model.to(device).eval()
