"""``explain``: Grad-CAM maps and temporal attention of a run, per clip (the paper's Fig. 9).

For the target logit (the predicted class, or ``--target``) of each clip:

- Grad-CAM as it is usually done for ViTs. The activations are the output of the last vision
  block's first LayerNorm at the patch tokens (CLS left out); the channel weights are the
  target logit's gradient averaged over the patches, per frame; the map is ReLU of the
  weighted channel sum, resized bilinearly to the crop (``interpolate``,
  ``align_corners=False``). The text features are computed once and held fixed.
- The temporal transformer's CLS attention over the frames: its last layer, mean over the
  heads, renormalised over the frame positions.

The backward pass starts at that LayerNorm's output (a leaf there), so it runs through one
vision block and the head instead of the whole image encoder: the gradient is the same, since
nothing before the LayerNorm is differentiated.

Outputs per clip: ``DIR/<file>.npz`` (face_cam, context_cam ``[S, H, W]``; face_attention,
context_attention ``[S]``; probs ``[C]``; target) and a PNG; ``DIR/index.csv`` and
``DIR/index.html`` list them. A stream the run does not use has all-NaN maps and attention.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cache.atomic import atomic_write_bytes
from heads.config import ExplainConfig
from cache.core.errors import CaerError

log = logging.getLogger("caer")

INDEX_COLUMNS = ("id", "file", "label", "prediction", "probability")
NPZ_KEYS = ("face_cam", "context_cam", "face_attention", "context_attention", "probs", "target")


@dataclass
class Explanation:
    face_cam: np.ndarray  # float32 [S, H, W]
    context_cam: np.ndarray
    face_attention: np.ndarray  # float32 [S]
    context_attention: np.ndarray
    probs: np.ndarray  # float32 [C]
    target: int

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(getattr(self, k)) for k in NPZ_KEYS}


def grad_cam(activation: torch.Tensor, gradient: torch.Tensor,
             size: tuple[int, int]) -> torch.Tensor:
    """Tokens ``[S, 1 + P, C]`` (CLS first) and their gradient -> maps ``[S, H, W]``."""
    a, g = activation[:, 1:], gradient[:, 1:]
    weights = g.mean(dim=1, keepdim=True)  # per frame and channel, averaged over the patches
    cam = torch.relu((a * weights).sum(-1))
    side = int(round(math.sqrt(cam.shape[1])))
    if side * side != cam.shape[1]:
        raise CaerError(f"{cam.shape[1]} patch tokens do not form a square grid")
    cam = cam.view(-1, 1, side, side)
    return F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0]


def cls_attention(block, qkv: torch.Tensor) -> torch.Tensor:
    """A TemporalBlock's CLS attention over the frames ``[B, S]`` from its qkv output
    ``[B, 1 + S, 3 * heads * dim_head]``: softmax(q k^T / sqrt(dim_head)) as the block's
    scaled_dot_product_attention computes it, mean over heads, renormalised over frames."""
    b, n, _ = qkv.shape
    q, k, _ = qkv.view(b, n, 3, block.heads, block.dim_head).permute(2, 0, 3, 1, 4)
    attention = torch.softmax(q @ k.transpose(-1, -2) * block.dim_head ** -0.5, dim=-1)
    frames = attention[:, :, 0, 1:].mean(dim=1)
    return frames / frames.sum(dim=-1, keepdim=True)


def _frames(crops, device) -> torch.Tensor:
    """uint8 ``[S, H, W, 3]`` -> float ``[1, S, 3, H, W]`` in [0, 1]."""
    x = torch.as_tensor(np.ascontiguousarray(crops)).to(device)
    return x.permute(0, 3, 1, 2)[None].float().div_(255.0)


def explain_clip(model, face: np.ndarray | None, context: np.ndarray | None,
                 target: int | None = None, text_features: torch.Tensor | None = None,
                 device: str | torch.device = "cpu") -> Explanation:
    """One clip's maps, attention and probabilities. ``face``/``context``: uint8 crops
    ``[S, H, W, 3]`` (a stream the run does not use may be None)."""
    model.eval()
    model.requires_grad_(False)
    if text_features is None:
        with torch.no_grad():
            text_features = model.encode_text()
    layer_norm = model.clip.vision_model.encoder.layers[-1].layer_norm1
    captured: list[torch.Tensor] = []

    def keep_leaf(module, inputs, output):
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf

    temporal = {"face": model.face_temporal, "context": model.context_temporal}
    qkv: dict[str, torch.Tensor] = {}
    hooks = [layer_norm.register_forward_hook(keep_leaf)]
    for stream, encoder in temporal.items():
        if encoder is not None:
            hooks.append(encoder.layers[-1].qkv.register_forward_hook(
                lambda m, i, o, stream=stream: qkv.__setitem__(stream, o.detach())))
    crops = {"face": face, "context": context}
    features, activations, sizes = {}, {}, {}
    try:
        with torch.enable_grad():
            for stream, encoder in temporal.items():
                if encoder is None:
                    continue
                if crops[stream] is None:
                    raise CaerError(f"the run uses the {stream} stream but no {stream} crops "
                                    f"were given")
                captured.clear()
                features[stream] = model.encode_frames(_frames(crops[stream], device))
                activations[stream] = captured[-1]
                sizes[stream] = tuple(crops[stream].shape[1:3])
            logits = model.forward_features(features.get("face"), features.get("context"),
                                            text_features)[0]
            probs = torch.softmax(logits.float(), dim=-1)
            target = int(probs.argmax()) if target is None else int(target)
            streams = list(activations)
            gradients = torch.autograd.grad(logits[target], [activations[s] for s in streams])
    finally:
        for hook in hooks:
            hook.remove()

    segments = model.config.segments
    out = {}
    for stream in ("face", "context"):
        if stream in activations:
            g = gradients[streams.index(stream)]
            out[f"{stream}_cam"] = grad_cam(activations[stream].detach(), g, sizes[stream])
            block = temporal[stream].layers[-1]
            out[f"{stream}_attention"] = cls_attention(block, qkv[stream])[0]
        else:
            shape = crops[stream].shape[:3] if crops[stream] is not None else (segments, 1, 1)
            out[f"{stream}_cam"] = torch.full(shape, float("nan"))
            out[f"{stream}_attention"] = torch.full((shape[0],), float("nan"))
    as_np = {k: v.detach().float().cpu().numpy().astype(np.float32) for k, v in out.items()}
    return Explanation(**as_np, probs=probs.detach().cpu().numpy().astype(np.float32),
                       target=target)


# ------------------------------------------------------------------------------ the command

def check_explain(cfg: ExplainConfig, classes: list[str] | None = None) -> None:
    """The options (the config's own checks), then --target against the run's classes and
    --out on disk."""
    cfg.validate()
    if classes is not None and cfg.target is not None and cfg.target not in classes:
        raise CaerError(f"--target {cfg.target}: not a class of the run ({', '.join(classes)})")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise CaerError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "index.csv").is_file():
        raise CaerError(f"--out {out}: holds files that explain did not write; give a new or "
                        f"empty directory")


def file_stem(index: int, clip_id: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(clip_id)).strip("._") or "clip"
    return f"{index:04d}-{safe[:80]}"


def _save_npz(path: Path, arrays: dict) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def _listed_files(out: Path) -> set[str]:
    """The .npz names a previous explain listed in DIR/index.csv (plain names only)."""
    index = out / "index.csv"
    if not index.is_file():
        return set()
    with open(index, newline="", encoding="utf-8") as fh:
        names = {row.get("file") or "" for row in csv.DictReader(fh)}
    return {n for n in names if re.fullmatch(r"\d{4}-[A-Za-z0-9._-]+\.npz", n)}


def explain(cfg: ExplainConfig, progress: bool = True) -> dict:
    """Explain every selected clip; returns ``{"out", "clips": [index rows]}``."""
    from tqdm import tqdm

    from cache.core.runtime import check_device
    from heads.explain_inputs import cache_inputs, path_inputs
    from heads.explain_report import plot_clip, write_html
    from heads.run import load_run, read_run_config

    check_explain(cfg)
    check_device(cfg.device)
    run_config = read_run_config(cfg.run)
    model = load_run(cfg.run, device=cfg.device)
    classes = list(model.labels.names)
    check_explain(cfg, classes)
    target = None if cfg.target is None else classes.index(cfg.target)
    if cfg.cache:
        inputs = cache_inputs(cfg, run_config, model)
    else:
        inputs = path_inputs(cfg, run_config, model)
    out = Path(cfg.out)
    with torch.no_grad():
        text = model.encode_text()
    rows = []
    clips = list(inputs)  # every clip is read (or refused) before anything is written
    previous = _listed_files(out)
    out.mkdir(parents=True, exist_ok=True)
    for index, clip in enumerate(tqdm(clips, desc="explain", unit="clip", leave=False,
                                      disable=not progress or len(clips) < 2)):
        result = explain_clip(model, clip.face, clip.context, target, text, cfg.device)
        stem = file_stem(index, clip.id)
        _save_npz(out / f"{stem}.npz", result.arrays())
        predicted = int(result.probs.argmax())
        row = {"id": clip.id, "file": f"{stem}.npz",
               "label": "" if clip.label is None else classes[clip.label],
               "prediction": classes[predicted],
               "probability": float(result.probs[predicted])}
        plot_clip(out / f"{stem}.png", clip, result, classes, row)
        rows.append(row)
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(INDEX_COLUMNS))
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "probability": f"{row['probability']:.6f}"})
    atomic_write_bytes(out / "index.csv", text.getvalue().encode("utf-8"))
    write_html(out / "index.html", rows, cfg.run, classes, target)
    kept = {r["file"] for r in rows}
    for name in previous - kept:  # a previous explain's clips, listed in its own index.csv
        for suffix in (".npz", ".png"):
            (out / Path(name).with_suffix(suffix).name).unlink(missing_ok=True)
    return {"out": str(out), "clips": rows}
