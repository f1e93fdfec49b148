"""The CLIP-CAER model: two temporal transformers, a fusion layer, a prompt learner and a
frozen CLIP text tower (the paper's model; docs/reproducing.md).

    face frames    -> CLIP image encoder -> face_temporal    --\\
                                                                concat -> fusion -> L2 norm = video
    context frames -> CLIP image encoder -> context_temporal --/
    [SOS] [ctx x n_ctx] descriptor [EOT] -> frozen CLIP text tower -> L2 norm = text (one per class)
    logits = logit_scale * video @ text.T

``forward_features`` starts from cached per-frame features (train-head); ``forward_pixels``
starts from cropped frames in [0, 1] (finetune, import-official parity, predict).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from heads.text import TextTower
from pipeline.clip import CLIP_MEAN, CLIP_STD, LoadedClip, pooled_features
from cache.core.errors import CaerError
from cache.core.labels import LabelSet
from pipeline.tokenizer import clean_text

log = logging.getLogger("caer")

STREAMS = ("both", "face", "context")
NORMALIZE = ("clip", "none")


@dataclass
class HeadConfig:
    """The head's shape. Every field is a ``train-head`` option; defaults are the paper's."""

    feature_dim: int = 512  # the CLIP's projection_dim; checked against the CLIP
    n_ctx: int = 8  # learnable context vectors per class
    temporal_layers: int = 1
    temporal_heads: int = 8
    temporal_dim_head: int = 64
    temporal_mlp_dim: int = 1024
    dropout: float = 0.1
    segments: int = 16  # frames per clip; the temporal transformers have segments + 1 positions
    streams: str = "both"  # both | face | context; "face" encodes the face-only descriptors
    logit_scale: float = 100.0  # fixed: logits = 100 * cosine; CLIP's own scale is unused


class TemporalBlock(nn.Module):
    """Pre-LN transformer block: bias-free qkv, tanh-GELU MLP, dropout after each branch."""

    def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.attn_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.attn_out = nn.Linear(heads * dim_head, dim)
        self.attn_dropout = nn.Dropout(dropout)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(approximate="tanh"),
                                 nn.Dropout(dropout), nn.Linear(mlp_dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)  # scale dim_head ** -0.5, no attention dropout
        x = x + self.attn_dropout(self.attn_out(a.transpose(1, 2).reshape(b, n, -1)))
        return x + self.mlp(self.mlp_norm(x))


class TemporalTransformer(nn.Module):
    """Per-frame features ``[B, T, D]`` -> clip feature ``[B, D]`` at a learnable CLS token.

    There is no final LayerNorm: the original returns the last block's residual stream.
    """

    def __init__(self, dim: int, segments: int, depth: int, heads: int, dim_head: int,
                 mlp_dim: int, dropout: float):
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, segments + 1, dim))
        self.layers = nn.ModuleList(TemporalBlock(dim, heads, dim_head, mlp_dim, dropout)
                                    for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        if t + 1 > self.pos_embedding.shape[1]:
            raise CaerError(f"{t} frames per clip, but the temporal transformer has positions "
                            f"for {self.pos_embedding.shape[1] - 1}; use the run's --segments")
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1) + self.pos_embedding[:, :t + 1]
        for block in self.layers:
            x = block(x)
        return x[:, 0]


def tokenize_prompts(tokenizer, descriptors: list[str], n_ctx: int,
                     context_length: int) -> torch.Tensor:
    """``[C, context_length]`` ids: [SOS] [X] * n_ctx descriptor [EOT] [0...].

    The "X" placeholders are overwritten by the learned context; a descriptor that does not
    fit is truncated, keeping its EOT (the original code would refuse it). Text is cleaned as
    OpenAI's tokenizer cleans it, and padded with 0 as its ``clip.tokenize`` pads (the
    original's prompts); padding never reaches the EOT output through the causal mask.
    """
    placeholder = tokenizer("X", add_special_tokens=False)["input_ids"][0]
    eot = tokenizer.eos_token_id
    pad = 0
    if n_ctx + 2 > context_length:
        raise CaerError(f"--n-ctx {n_ctx} leaves no room for a descriptor in the CLIP's "
                        f"{context_length}-token context")
    rows, truncated = [], 0
    for text in descriptors:
        body = tokenizer(clean_text(text), add_special_tokens=True, verbose=False)["input_ids"]
        ids = body[:1] + [placeholder] * n_ctx + body[1:]
        if len(ids) > context_length:
            truncated += 1
            ids = ids[:context_length - 1] + [eot]
        rows.append(ids + [pad] * (context_length - len(ids)))
    if truncated:
        log.warning("%d of %d class descriptors were truncated to fit the CLIP's %d tokens",
                    truncated, len(descriptors), context_length)
    return torch.tensor(rows, dtype=torch.long)


def causal_mask(config, inputs_embeds: torch.Tensor):
    """The text tower's causal mask, from transformers' own ``create_causal_mask``.

    transformers 5.24 renamed its ``past_key_values`` argument to ``cache`` (the old name warns
    from then on); the tower keeps no cache, so None goes under the name this version takes.
    """
    import inspect

    from transformers.masking_utils import create_causal_mask

    name = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
    return create_causal_mask(config=config, inputs_embeds=inputs_embeds, attention_mask=None,
                              **{name: None})


class PromptLearner(nn.Module):
    """Class-specific context vectors spliced into each prompt's frozen token embeddings.

    The frozen embeddings are a buffer, as in the original (its token_prefix/token_suffix), so
    an imported checkpoint keeps exactly the embeddings it was trained with.
    """

    def __init__(self, token_ids: torch.Tensor, token_embeddings: torch.Tensor, n_ctx: int,
                 eos_token_id: int):
        super().__init__()
        n_cls, _, width = token_embeddings.shape
        self.n_ctx = n_ctx
        self.ctx = nn.Parameter(torch.randn(n_cls, n_ctx, width) * 0.02)
        self.register_buffer("token_ids", token_ids.clone())
        self.register_buffer("token_embeddings", token_embeddings.detach().clone())
        is_eot = token_ids == eos_token_id
        if not bool(is_eot.any(dim=1).all()):
            raise CaerError("a prompt has no end-of-text token; the tokenizer and the CLIP disagree")
        # First EOT of each prompt: padding may repeat the EOT id, as CLIP's tokenizer does.
        self.register_buffer("eot_positions", is_eot.int().argmax(dim=1))

    def forward(self, length: int) -> torch.Tensor:
        """Prompt embeddings ``[C, length, W]`` with the context in positions 1..n_ctx."""
        e = self.token_embeddings
        return torch.cat([e[:, :1], self.ctx, e[:, 1 + self.n_ctx:length]], dim=1)


class CaerModel(nn.Module):
    def __init__(self, config: HeadConfig, clip: LoadedClip, labels: LabelSet,
                 normalize: str = "clip", prompt_token_ids: torch.Tensor | None = None):
        """``prompt_token_ids`` (``[C, L]``) skips tokenizing, for runs that stored theirs."""
        super().__init__()
        if config.streams not in STREAMS:
            raise CaerError(f"--streams {config.streams}: choose one of {', '.join(STREAMS)}")
        if normalize not in NORMALIZE:
            raise CaerError(f"normalize {normalize!r}: choose one of {', '.join(NORMALIZE)}")
        if config.feature_dim != clip.feature_dim:
            raise CaerError(f"feature_dim {config.feature_dim} differs from the CLIP's projection "
                            f"dim {clip.feature_dim} ({clip.spec})")
        self.config, self.labels, self.normalize = config, labels, normalize
        self.clip_spec, self.clip_revision = clip.spec, clip.revision
        self.tokenizer = clip.tokenizer
        self.image_encoder_trained = False

        # The whole CLIP is a frozen submodule, so .to(device) moves it; finetune unfreezes
        # the image encoder through param_groups.
        self.clip = clip.model
        self.clip.requires_grad_(False)
        text = self.clip.text_model

        c, d = config, config.feature_dim

        def temporal() -> TemporalTransformer:
            return TemporalTransformer(d, c.segments, c.temporal_layers, c.temporal_heads,
                                       c.temporal_dim_head, c.temporal_mlp_dim, c.dropout)

        self.face_temporal = temporal() if c.streams in ("both", "face") else None
        self.context_temporal = temporal() if c.streams in ("both", "context") else None
        self.fusion = nn.Linear(2 * d, d) if c.streams == "both" else None

        eos = getattr(clip.tokenizer, "eos_token_id", None)
        eos = text.config.eos_token_id if eos is None else eos
        if prompt_token_ids is None:
            prompt_token_ids = tokenize_prompts(
                clip.tokenizer, labels.descriptors(c.streams), c.n_ctx,
                text.config.max_position_embeddings)
        if prompt_token_ids.shape[0] != len(labels):
            raise CaerError(f"{prompt_token_ids.shape[0]} prompts for {len(labels)} classes")
        vocab = text.embeddings.token_embedding.num_embeddings
        if prompt_token_ids.numel() and not (0 <= int(prompt_token_ids.min())
                                             and int(prompt_token_ids.max()) < vocab):
            bad = prompt_token_ids[(prompt_token_ids < 0) | (prompt_token_ids >= vocab)][0]
            raise CaerError(f"prompt token id {int(bad)} is out of range for the CLIP's "
                            f"vocabulary of {vocab} tokens ({clip.spec})")
        with torch.no_grad():
            token_embeddings = text.embeddings.token_embedding(
                prompt_token_ids.to(text.embeddings.token_embedding.weight.device))
        self.prompt_learner = PromptLearner(prompt_token_ids, token_embeddings, c.n_ctx, eos)
        self.text_tower = TextTower(self.clip, self.prompt_learner)  # no parameters of its own
        self.register_buffer("pixel_mean", torch.tensor(CLIP_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(CLIP_STD).view(3, 1, 1), persistent=False)

    # ---- text ----------------------------------------------------------------------------

    def encode_text(self, truncate: bool = True) -> torch.Tensor:
        """L2-normalised text features ``[C, D]``, one per class.

        With ``truncate`` the prompts run through heads/text.py's ``TextTower``: each cut at
        its own EOT, the last layer for the EOT rows only, weights prepared once; exact,
        because the causal mask stops later positions from reaching any EOT. Without it,
        the plain transformers tower over the full context (``encode_text_reference``).
        """
        if not truncate:
            return self.encode_text_reference()
        return F.normalize(self.text_tower(self.prompt_learner.ctx).float(), dim=-1)

    def encode_text_reference(self, length: int | None = None) -> torch.Tensor:
        """The same features from the transformers text tower run as it is, over the first
        ``length`` positions (default: the full context): the reference the fast path is
        tested and benchmarked against."""
        text = self.clip.text_model
        eot = self.prompt_learner.eot_positions
        length = self.prompt_learner.token_ids.shape[1] if length is None else length
        x = text.embeddings(inputs_embeds=self.prompt_learner(length))  # + position embeddings
        mask = causal_mask(text.config, x)
        x = text.encoder(inputs_embeds=x, attention_mask=mask, is_causal=True).last_hidden_state
        x = text.final_layer_norm(x)
        x = self.clip.text_projection(x[torch.arange(x.shape[0], device=x.device), eot])
        return F.normalize(x.float(), dim=-1)

    # ---- video ---------------------------------------------------------------------------

    def encode_video(self, face: torch.Tensor | None, context: torch.Tensor | None) -> torch.Tensor:
        """Per-frame features ``[B, T, D]`` of each stream -> L2-normalised clip features ``[B, D]``.

        With one stream (``streams`` face or context) the other may be None and the stream's
        temporal output is used directly, without a fusion layer (DFER-CLIP's face-only head).
        """
        if self.fusion is not None:
            x = self.fusion(torch.cat([self.face_temporal(face), self.context_temporal(context)], -1))
        elif self.face_temporal is not None:
            x = self.face_temporal(face)
        else:
            x = self.context_temporal(context)
        return F.normalize(x.float(), dim=-1)

    def forward_features(self, face: torch.Tensor | None, context: torch.Tensor | None,
                         text_features: torch.Tensor | None = None) -> torch.Tensor:
        """Cached per-frame features ``[B, T, D]`` -> logits ``[B, C]``.

        ``text_features`` (from ``encode_text``) saves re-encoding the prompts when they do
        not change between calls, as in evaluation.
        """
        video = self.encode_video(face, context)
        text = self.encode_text() if text_features is None else text_features
        # The cosines in fp32 whatever the autocast: x100 would scale bf16's rounding to 0.2.
        with torch.autocast(video.device.type, enabled=False):
            return self.config.logit_scale * video.float() @ text.float().t()

    forward = forward_features

    def encode_frames(self, pixels: torch.Tensor) -> torch.Tensor:
        """Cropped frames ``[B, T, 3, H, W]`` in [0, 1] -> CLIP image features ``[B, T, D]``.

        Applies the run's normalisation: CLIP's mean/std, or "none" for the original code's
        raw [0, 1] input.
        """
        b, t = pixels.shape[:2]
        x = pixels.flatten(0, 1).to(self.pixel_mean.dtype)
        if self.normalize == "clip":
            x = (x - self.pixel_mean) / self.pixel_std
        return pooled_features(self.clip.get_image_features(pixel_values=x)).view(b, t, -1)

    def forward_pixels(self, face: torch.Tensor | None, context: torch.Tensor | None,
                       text_features: torch.Tensor | None = None) -> torch.Tensor:
        """Cropped frames ``[B, T, 3, H, W]`` in [0, 1] of each stream -> logits ``[B, C]``."""
        return self.forward_features(
            self.encode_frames(face) if self.face_temporal is not None else None,
            self.encode_frames(context) if self.context_temporal is not None else None,
            text_features)

    # ---- training ------------------------------------------------------------------------

    def image_encoder_parameters(self) -> list[nn.Parameter]:
        return [*self.clip.vision_model.parameters(), *self.clip.visual_projection.parameters()]

    def param_groups(self, lr_temporal: float, lr_prompt: float, lr_fusion: float,
                     lr_image_encoder: float | None = None) -> list[dict]:
        """SGD parameter groups, each with a ``name``. Passing ``lr_image_encoder`` unfreezes
        the CLIP image encoder (finetune); without it the image encoder is frozen."""
        temporal = [p for m in (self.face_temporal, self.context_temporal) if m is not None
                    for p in m.parameters()]
        groups = [{"name": "temporal", "params": temporal, "lr": lr_temporal},
                  {"name": "prompt", "params": [self.prompt_learner.ctx], "lr": lr_prompt}]
        if self.fusion is not None:
            groups.append({"name": "fusion", "params": list(self.fusion.parameters()), "lr": lr_fusion})
        self.image_encoder_trained = lr_image_encoder is not None
        for p in self.image_encoder_parameters():
            p.requires_grad_(self.image_encoder_trained)
        if self.image_encoder_trained:
            groups.append({"name": "image_encoder", "params": self.image_encoder_parameters(),
                           "lr": lr_image_encoder})
        return groups

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What training changes, plus the prompts' frozen token embeddings (needed to rebuild
        the run exactly): temporal encoders, fusion, prompt learner, and the image encoder's
        weights when it was fine-tuned."""
        keep = ("face_temporal.", "context_temporal.", "fusion.", "prompt_learner.")
        if self.image_encoder_trained:
            keep += ("clip.vision_model.", "clip.visual_projection.")
        return {k: v for k, v in self.state_dict().items() if k.startswith(keep)}
