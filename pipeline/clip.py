"""The one CLIP loader every stage uses: ``--clip SPEC``.

SPEC is a Hugging Face model id, a local directory written by ``save_pretrained``, or
``random:<shape>`` for an untrained CLIP built offline (tests, demo, benchmarks), which
tokenizes with CLIP's own BPE vocabulary (pipeline/tokenizer.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import DEFAULT_CLIP
from cache.core.errors import CaerError, first_line
from pipeline.tokenizer import VOCAB_SIZE, clean_text, clip_tokenizer

log = logging.getLogger("caer")

# CLIP's own pixel normalisation (OpenAI's values, also in every CLIPImageProcessor).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RANDOM_SEED = 0


class ClipLoadError(CaerError):
    """A --clip SPEC that cannot be turned into a model; the message says what to do."""


@dataclass(frozen=True)
class RandomClipShape:
    projection_dim: int
    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    text_width: int
    text_layers: int
    vocab_size: int = VOCAB_SIZE  # CLIP's BPE vocabulary, which every random: CLIP tokenizes with
    context_length: int = 77


# Heads follow OpenAI's rule (width // 64), so "vit-b-32" has exactly the real model's shapes.
RANDOM_SHAPES = {
    # Same shape as the authors' tiny reference checkpoint: 512-d features, 64-wide towers.
    "tiny": RandomClipShape(512, 224, 32, 64, 1, 64, 1),
    "vit-b-32": RandomClipShape(512, 224, 32, 768, 12, 512, 12),
    "vit-b-16": RandomClipShape(512, 224, 16, 768, 12, 512, 12),
}


@dataclass
class LoadedClip:
    """A CLIP model with its tokenizer and an identity that goes into every fingerprint."""

    model: "transformers.CLIPModel"  # noqa: F821
    tokenizer: object
    spec: str
    revision: str

    @property
    def feature_dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected CLS embeddings of already-normalised images ``[N, 3, H, W]``."""
        return pooled_features(self.model.get_image_features(pixel_values=pixel_values))

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer([clean_text(t) for t in texts], padding="max_length", truncation=True,
                                max_length=self.model.config.text_config.max_position_embeddings,
                                return_tensors="pt")
        device = next(self.model.parameters()).device
        return pooled_features(self.model.get_text_features(input_ids=tokens["input_ids"].to(device)))

    def save(self, directory: str | os.PathLike) -> None:
        _quiet_transformers()
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)


def pooled_features(out) -> torch.Tensor:
    """The projected embeddings ``[N, D]`` from what ``CLIPModel.get_image_features`` or
    ``get_text_features`` returned: transformers 5 returns a ModelOutput (the embeddings are its
    ``pooler_output``), 4.x the tensor itself."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def build_random_clip(shape: str, seed: int = RANDOM_SEED) -> LoadedClip:
    """An untrained CLIP of a named shape, identical for the same seed on every machine."""
    from transformers import CLIPConfig, CLIPModel

    if shape not in RANDOM_SHAPES:
        raise ClipLoadError(f"unknown random CLIP shape 'random:{shape}'; "
                            f"choose one of: {', '.join('random:' + s for s in RANDOM_SHAPES)}")
    s = RANDOM_SHAPES[shape]
    config = CLIPConfig(
        projection_dim=s.projection_dim,
        text_config=dict(hidden_size=s.text_width, intermediate_size=4 * s.text_width,
                         num_hidden_layers=s.text_layers,
                         num_attention_heads=max(1, s.text_width // 64),
                         max_position_embeddings=s.context_length, vocab_size=s.vocab_size,
                         bos_token_id=s.vocab_size - 2, eos_token_id=s.vocab_size - 1,
                         pad_token_id=s.vocab_size - 1, projection_dim=s.projection_dim),
        vision_config=dict(hidden_size=s.vision_width, intermediate_size=4 * s.vision_width,
                           num_hidden_layers=s.vision_layers,
                           num_attention_heads=max(1, s.vision_width // 64),
                           image_size=s.image_size, patch_size=s.patch_size,
                           projection_dim=s.projection_dim),
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = CLIPModel(config)
    finally:
        torch.random.set_rng_state(generator_state)
    if shape == "tiny":
        # At CLIP's 0.02 init a single 64-wide layer maps every image to nearly the same
        # feature (cosine > 0.99): the class token barely attends to the patches. A patch
        # embedding at a trained scale, sharp attention and a strong attention residual make
        # different images clearly different (cosine 0.4-0.8 between astronaut crops).
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            w = model.vision_model.embeddings.patch_embedding.weight
            w.copy_(torch.randn(w.shape, generator=g) * (1.0 / w[0].numel() ** 0.5))
            for layer in model.vision_model.encoder.layers:
                layer.self_attn.q_proj.weight.mul_(10.0)
                layer.self_attn.k_proj.weight.mul_(10.0)
                layer.self_attn.v_proj.weight.mul_(5.0)
                layer.self_attn.out_proj.weight.mul_(10.0)
    model.eval()
    return LoadedClip(model, clip_tokenizer(s.context_length), f"random:{shape}", f"seed{seed}-{weights_digest(model)}")


def weights_digest(model: torch.nn.Module) -> str:
    """A short hash of every parameter, so a fingerprint names the exact weights."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def load_clip(spec: str = DEFAULT_CLIP, device: str | torch.device = "cpu") -> LoadedClip:
    """Load a CLIP from a hub id, a local ``save_pretrained`` directory or ``random:<shape>``."""
    if spec.startswith("random:"):
        log.warning("--clip %s is an UNTRAINED CLIP: its features carry no learned meaning; "
                    "use it for tests, demos and timing only", spec)
        loaded = build_random_clip(spec.split(":", 1)[1])
    elif Path(spec).expanduser().is_dir():
        loaded = _load_pretrained(str(Path(spec).expanduser().resolve()), spec, local=True)
    elif Path(spec).expanduser().exists():
        raise ClipLoadError(f"--clip {spec}: is a file; pass the directory that save_pretrained "
                            f"wrote (it holds config.json and the weights)")
    else:
        loaded = _load_pretrained(spec, spec, local=False)
    loaded.model.to(device)
    return loaded


def _quiet_transformers() -> None:
    # Its per-shard progress bars would interleave with ours for a sub-second load or save.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _load_pretrained(source: str, spec: str, local: bool) -> LoadedClip:
    from transformers import AutoTokenizer, CLIPModel

    _quiet_transformers()
    # Offline or unreachable hub: use the local cache only, instead of retrying for 25 s.
    cached_only = {} if local or _hub_reachable() else {"local_files_only": True}
    try:
        model = CLIPModel.from_pretrained(source, dtype=torch.float32, **cached_only)
        tokenizer = AutoTokenizer.from_pretrained(source, **cached_only)
    except OSError as err:
        if local:
            raise ClipLoadError(f"--clip {spec}: not a loadable CLIP directory ({first_line(err)}); "
                                f"it must hold what CLIPModel.save_pretrained and the tokenizer's "
                                f"save_pretrained write") from None
        raise ClipLoadError(
            f"--clip {spec}: cannot load from the Hugging Face hub ({first_line(err)}). "
            f"Offline? Set HF_HUB_OFFLINE=1 to use a copy already in the local cache, or pass a "
            f"local directory written by save_pretrained (--clip /path/to/clip).") from None
    model.eval()
    if local:
        revision = weights_digest(model)
    else:
        revision = getattr(model.config, "_commit_hash", None) or weights_digest(model)
    return LoadedClip(model, tokenizer, spec, revision)


def _hub_reachable() -> bool:
    """False when the user said offline or the hub's host does not resolve.

    HF_HUB_OFFLINE is read here, not only by huggingface_hub at import time, and a failed
    DNS lookup takes milliseconds where huggingface_hub retries for ~25 s.
    """
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False
