"""The original release's state dict -> caer-kit's CLIP and head (used by heads/official.py).

The OpenAI-format CLIP becomes a transformers CLIPModel with every size inferred from the
tensors (attention heads = width // 64, as OpenAI's loader does), saved in RUN/clip. The head
maps ``temporal_net`` -> face_temporal, ``temporal_net_body`` -> context_temporal,
``project_fc`` -> fusion, ``prompt_learner.ctx`` -> the prompt context; the prompts' frozen
token embeddings (``token_prefix``, ``token_suffix``) are kept exactly, since the original
encodes those and not a fresh lookup. Each prompt's end-of-text position is derived from the
checkpoint itself (see ``prompt_token_ids_from_checkpoint``).
"""

from __future__ import annotations

import re

import torch

from heads.unpickle import CheckpointError


def n_layers(sd: dict, prefix: str) -> int:
    found = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if not found or found != set(range(max(found) + 1)):
        raise CheckpointError(f"no complete layer stack under {prefix}*")
    return max(found) + 1


def _openai_blocks_to_hf(sd: dict, src: str, dst: str, n: int) -> dict:
    out = {}
    for i in range(n):
        s, d = f"{src}{i}.", f"{dst}{i}."
        for kind in ("weight", "bias"):
            q, k, v = sd[f"{s}attn.in_proj_{kind}"].chunk(3, dim=0)
            out[f"{d}self_attn.q_proj.{kind}"] = q
            out[f"{d}self_attn.k_proj.{kind}"] = k
            out[f"{d}self_attn.v_proj.{kind}"] = v
            out[f"{d}self_attn.out_proj.{kind}"] = sd[f"{s}attn.out_proj.{kind}"]
            out[f"{d}layer_norm1.{kind}"] = sd[f"{s}ln_1.{kind}"]
            out[f"{d}layer_norm2.{kind}"] = sd[f"{s}ln_2.{kind}"]
            out[f"{d}mlp.fc1.{kind}"] = sd[f"{s}mlp.c_fc.{kind}"]
            out[f"{d}mlp.fc2.{kind}"] = sd[f"{s}mlp.c_proj.{kind}"]
    return out


def convert_openai_clip(sd: dict) -> "transformers.CLIPModel":  # noqa: F821
    """An OpenAI-format CLIP state dict (``visual.*``, ``transformer.*``, ``token_embedding``,
    ...) -> a transformers CLIPModel; every size is read from the tensors."""
    from transformers import CLIPConfig, CLIPModel

    v_width = sd["visual.conv1.weight"].shape[0]
    patch = sd["visual.conv1.weight"].shape[-1]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    if grid * grid + 1 != sd["visual.positional_embedding"].shape[0]:
        raise CheckpointError("the image positional embedding is not a square grid plus CLS")
    vocab, t_width = sd["token_embedding.weight"].shape
    context_length = sd["positional_embedding"].shape[0]
    projection_dim = sd["text_projection"].shape[1]
    if sd["visual.proj"].shape[1] != projection_dim:
        raise CheckpointError("the image and text projections have different output sizes")
    v_layers = n_layers(sd, "visual.transformer.resblocks.")
    t_layers = n_layers(sd, "transformer.resblocks.")
    config = CLIPConfig(
        projection_dim=projection_dim,
        logit_scale_init_value=float(sd["logit_scale"]) if "logit_scale" in sd else 2.6592,
        text_config=dict(
            hidden_size=t_width, num_hidden_layers=t_layers,
            intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            num_attention_heads=max(1, t_width // 64), max_position_embeddings=context_length,
            vocab_size=vocab, hidden_act="quick_gelu", layer_norm_eps=1e-5,
            bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=0,
            projection_dim=projection_dim),
        vision_config=dict(
            hidden_size=v_width, num_hidden_layers=v_layers,
            intermediate_size=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            num_attention_heads=max(1, v_width // 64), image_size=grid * patch, patch_size=patch,
            hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=projection_dim),
    )
    hf = {
        "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": sd["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": sd["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": sd["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": sd["visual.ln_post.bias"],
        "visual_projection.weight": sd["visual.proj"].t(),
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_model.final_layer_norm.weight": sd["ln_final.weight"],
        "text_model.final_layer_norm.bias": sd["ln_final.bias"],
        "text_projection.weight": sd["text_projection"].t(),
        **_openai_blocks_to_hf(sd, "visual.transformer.resblocks.", "vision_model.encoder.layers.", v_layers),
        **_openai_blocks_to_hf(sd, "transformer.resblocks.", "text_model.encoder.layers.", t_layers),
    }
    if "logit_scale" in sd:
        hf["logit_scale"] = sd["logit_scale"].reshape(())
    model = CLIPModel(config)
    own = model.state_dict()
    wrong = [k for k, t in hf.items() if k not in own or own[k].shape != t.shape]
    if wrong:
        raise CheckpointError(f"CLIP conversion produced unexpected tensors: {', '.join(wrong[:3])}")
    hf = {k: t.detach().to(torch.float32).contiguous().clone() for k, t in hf.items()}
    missing, _ = model.load_state_dict(hf, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing:
        raise CheckpointError(f"the checkpoint's CLIP lacks {', '.join(missing[:3])}")
    return model.eval()


def clip_state_dict(state_dict: dict) -> dict:
    """The OpenAI-format CLIP inside a CLIP-CAER state_dict, taking the parts the original's
    forward used (``image_encoder.*``, ``text_encoder.*``) and the rest from ``clip_model_.*``."""
    sd = {k[len("clip_model_."):]: v for k, v in state_dict.items() if k.startswith("clip_model_.")}
    for k, v in state_dict.items():
        if k.startswith("image_encoder."):
            sd["visual." + k[len("image_encoder."):]] = v
        elif k.startswith("text_encoder."):
            sd[k[len("text_encoder."):]] = v
    if "token_embedding.weight" not in sd or "visual.conv1.weight" not in sd:
        raise CheckpointError("the state_dict holds no OpenAI-format CLIP (clip_model_.*); is this "
                              "a CLIP-CAER checkpoint?")
    return sd


def temporal_weights(state_dict: dict, src: str, dst: str) -> dict:
    out = {f"{dst}.cls_token": state_dict[f"{src}.cls_token"],
           f"{dst}.pos_embedding": state_dict[f"{src}.pos_embedding"]}
    for i in range(n_layers(state_dict, f"{src}.temporal_transformer.layers.")):
        s, d = f"{src}.temporal_transformer.layers.{i}.", f"{dst}.layers.{i}."
        if f"{s}0.fn.fn.to_out.0.weight" not in state_dict:
            raise CheckpointError(f"{s}0: an attention without an output projection "
                                  f"(heads x dim_head == dim) is not supported")
        pairs = {"attn_norm": "0.fn.norm", "attn_out": "0.fn.fn.to_out.0", "mlp_norm": "1.fn.norm",
                 "mlp.0": "1.fn.fn.net.0", "mlp.3": "1.fn.fn.net.3"}
        for ours, theirs in pairs.items():
            for kind in ("weight", "bias"):
                out[f"{d}{ours}.{kind}"] = state_dict[f"{s}{theirs}.{kind}"]
        out[f"{d}qkv.weight"] = state_dict[f"{s}0.fn.fn.to_qkv.weight"]
    return out


def prompt_token_ids_from_checkpoint(prefix: torch.Tensor, suffix: torch.Tensor,
                                     token_embedding: torch.Tensor, n_ctx: int,
                                     placeholder_id: int = 343) -> tuple[torch.Tensor, bool]:
    """Each prompt's token ids, recovered from its frozen token embeddings.

    Returns ``(ids [C, 1 + n_ctx + S], exact)``. When every embedding equals a row of the CLIP's
    token embedding (a real release: the token embedding is frozen in training), the ids are
    exact. Otherwise (the token embedding changed after the prompts were embedded, as in the
    perturbed reference checkpoint) the end of text is found from the prompts' structure: the
    padding after EOT is one repeated vector at the end of every prompt, and the EOT vector
    is the same in every prompt; the other ids are then the nearest rows (informational only:
    the run encodes the stored embeddings, and only the EOT position is used).
    """
    vocab = token_embedding.shape[0]
    if vocab < 3:
        raise CheckpointError(f"a token embedding of {vocab} rows cannot hold the start, end and "
                              f"placeholder tokens")
    sot, eot = vocab - 2, vocab - 1
    # The context placeholder's id is never looked up (the learned context replaces it), but
    # it must index the vocabulary: CLIP's "X" (343) does not exist in a small one.
    placeholder_id = min(placeholder_id, vocab - 3)
    n_cls, length, width = suffix.shape
    distances = torch.cdist(suffix.reshape(-1, width).double(), token_embedding.double())
    nearest = distances.argmin(dim=1).reshape(n_cls, length)
    exact = bool((token_embedding[nearest] == suffix).all())
    if exact:
        ids = nearest
        has_eot = (ids == eot).any(dim=1)
        if not bool(has_eot.all()):
            raise CheckpointError("a prompt of the checkpoint has no end-of-text token")
        eot_pos = (ids == eot).int().argmax(dim=1)
    else:
        # Padding: the vector ending the most-padded prompt, stripped from every prompt's end.
        def trailing_run(rows):
            n = 1
            while n < len(rows) and torch.equal(rows[-n - 1], rows[-1]):
                n += 1
            return n
        runs = [trailing_run(suffix[i]) for i in range(n_cls)]
        pad_vector = suffix[max(range(n_cls), key=lambda i: runs[i]), -1]
        eot_pos = []
        for i in range(n_cls):
            p = length - 1
            while p >= 0 and torch.equal(suffix[i, p], pad_vector):
                p -= 1
            eot_pos.append(p)
        eot_pos = torch.tensor(eot_pos)
        eot_vectors = suffix[torch.arange(n_cls), eot_pos.clamp(min=0)]
        if bool((eot_pos < 0).any()) or not all(torch.equal(e, eot_vectors[0]) for e in eot_vectors):
            raise CheckpointError("cannot locate the end-of-text token of every prompt in the "
                                  "checkpoint's prompt embeddings")
        # Nearest rows, never the special tokens, for the positions before EOT.
        distances[:, [sot, eot]] = float("inf")
        ids = distances.argmin(dim=1).reshape(n_cls, length)
        for i in range(n_cls):
            ids[i, eot_pos[i]] = eot
            ids[i, eot_pos[i] + 1:] = 0  # the original tokenizer's padding id
    head = torch.tensor([[sot] + [placeholder_id] * n_ctx] * n_cls)
    return torch.cat([head, ids], dim=1), exact

