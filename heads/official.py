"""``import-official``: a checkpoint of the original CLIP-CAER release -> a caer-kit run.

The checkpoint is read by heads/unpickle.py (a restricted, bounded unpickler: nothing from
the file is executed) and converted by heads/official_convert.py (the authors' names and
layouts -> a transformers CLIPModel and caer-kit's head); this module checks --out, records
where the weights came from and saves the run.

RUN/clip carries CLIP's own BPE tokenizer (pipeline/tokenizer.py, built offline from OpenAI's
vocabulary), so a head trained later on ``extract --clip RUN/clip`` features tokenizes its
descriptors into the ids the original fed this CLIP; the imported run itself stores its
prompts' token ids and embeddings, so it never re-tokenizes. The run records the original's
preprocessing: pixels in [0, 1] without CLIP's mean/std (normalize "none") and squashed face
crops.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch

from cache.atomic import refuse_symlink
from cache.core.errors import CaerError
from heads.official_convert import (clip_state_dict, convert_openai_clip, n_layers,
                                    prompt_token_ids_from_checkpoint, temporal_weights)
from heads.unpickle import CheckpointError, load_official_checkpoint
from pipeline.config import PRESETS


def import_official(cfg: "ImportOfficialConfig") -> Path:  # noqa: F821 - heads.config
    """Convert a CLIP-CAER release checkpoint into a caer-kit run at ``cfg.out``."""
    from heads.model import CaerModel, HeadConfig
    from heads.run import save_run
    from pipeline.clip import LoadedClip, weights_digest
    from pipeline.tokenizer import VOCAB_SIZE, clip_tokenizer
    from cache.core.labels import load_label_set

    cfg.validate()
    checkpoint, out, labels, force = Path(cfg.checkpoint), Path(cfg.out), cfg.labels, cfg.force
    refuse_symlink(out, "--out")  # --force replaces a run, never what a link points to
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise CaerError(f"--out {out} exists and is not empty; choose another directory or "
                            f"pass --force to replace it")
        if not (out / "config.json").is_file():  # --force never deletes what is not a run
            raise CaerError(f"--out {out} is not a caer-kit run directory; --force replaces "
                            f"only a previous run")
    label_set = load_label_set(labels)
    obj = load_official_checkpoint(checkpoint)
    state_dict = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{checkpoint}: no state_dict of tensors inside")
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}  # DataParallel
    try:
        clip_model = convert_openai_clip(clip_state_dict(state_dict))
        ctx = state_dict["prompt_learner.ctx"]
        prefix = state_dict["prompt_learner.token_prefix"]
        suffix = state_dict["prompt_learner.token_suffix"]
        face = temporal_weights(state_dict, "temporal_net", "face_temporal")
        context = temporal_weights(state_dict, "temporal_net_body", "context_temporal")
        fusion_w, fusion_b = state_dict["project_fc.weight"], state_dict["project_fc.bias"]
    except KeyError as err:
        raise CheckpointError(f"{checkpoint}: not a CLIP-CAER checkpoint: {err} is missing") from None

    n_cls = prefix.shape[0]
    if ctx.dim() == 2:  # a generic context shared by all classes, as in CoOp's default
        ctx = ctx.unsqueeze(0).expand(n_cls, -1, -1)
    n_ctx, width = ctx.shape[1:]
    if len(label_set) != n_cls:
        raise CaerError(f"--labels {labels} has {len(label_set)} classes but the checkpoint has "
                        f"{n_cls} prompts; pass the label set it was trained with")
    token_embedding = clip_model.text_model.embeddings.token_embedding.weight.detach()
    token_ids, exact = prompt_token_ids_from_checkpoint(prefix, suffix, token_embedding, n_ctx)
    if token_ids.shape[1] != clip_model.config.text_config.max_position_embeddings:
        raise CheckpointError("the prompts' length differs from the CLIP's context length")

    qkv = face["face_temporal.layers.0.qkv.weight"]
    dim = qkv.shape[1]
    config = HeadConfig(
        feature_dim=dim, n_ctx=n_ctx,
        temporal_layers=n_layers(face, "face_temporal.layers."),
        # The original hard-codes 8 heads of 64; only their product is in the weights.
        temporal_heads=max(1, qkv.shape[0] // 3 // 64), temporal_dim_head=min(64, qkv.shape[0] // 3),
        temporal_mlp_dim=face["face_temporal.layers.0.mlp.0.weight"].shape[0],
        dropout=0.1, segments=face["face_temporal.pos_embedding"].shape[1] - 1, streams="both",
        logit_scale=100.0)
    if token_embedding.shape[0] != VOCAB_SIZE:
        raise CheckpointError(f"{checkpoint}: a text vocabulary of {token_embedding.shape[0]} "
                              f"tokens; CLIP's BPE tokenizer has {VOCAB_SIZE}")
    tokenizer = clip_tokenizer(token_ids.shape[1])
    digest = weights_digest(clip_model)
    clip = LoadedClip(clip_model, tokenizer, f"import-official:{checkpoint.name}", digest)
    model = CaerModel(config, clip, label_set, normalize="none", prompt_token_ids=token_ids)
    token_embeddings = torch.cat([prefix, torch.zeros(n_cls, n_ctx, width), suffix], dim=1)
    head = {**face, **context, "fusion.weight": fusion_w, "fusion.bias": fusion_b,
            "prompt_learner.ctx": ctx, "prompt_learner.token_embeddings": token_embeddings}
    own = model.state_dict()
    wrong = [k for k, v in head.items() if own[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"{checkpoint}: unexpected shapes for {', '.join(wrong[:3])}")
    model.load_state_dict({k: v.float() for k, v in head.items()}, strict=False)

    sha = hashlib.sha256()
    with open(checkpoint, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    extra = {"source": {"checkpoint": checkpoint.name, "sha256": sha.hexdigest(),
                        "epoch": obj.get("epoch"), "best_acc": _plain(obj.get("best_acc"))},
             "prompt_token_ids_exact": exact}
    if out.exists() and force:
        refuse_symlink(out, "--out")
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    save_run(out, model, kind="import-official", train_options={}, cache_fingerprint=None,
             extra=extra, save_clip=True,
             preprocessing={**PRESETS["original"], "face_resize": "squash", "face_margin": 20})
    return out


def _plain(value):
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return value if isinstance(value, (int, float, str, type(None))) else str(value)
