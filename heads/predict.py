"""``predict``: labels for new clips straight from disk, with no cache built by hand.

Each clip goes through extract's own per-clip function (``pipeline.prepare.prepare_clip``:
decode, the middle frame of each segment, face detection, face and context crops), with the
preprocessing the run records, and then through the run's CLIP image encoder and head
(``CaerModel.forward_pixels``, which applies the run's pixel normalisation). A clip predicted
here therefore gets the same crops as ``extract --candidates 1`` followed by ``evaluate``;
the only difference is that a cache stores features in float16.

A clip that cannot be used (missing, not a video, no decodable frame, ...) is reported with
its reason and the others go on; the CLI then exits with status 3, as extract does.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from heads.config import PredictConfig  # noqa: F401 - heads.predict.PredictConfig as before
from cache.core.errors import CaerError

log = logging.getLogger("caer")

# What extract uses when a run does not record a value (import-official runs record only
# normalize, face_resize and face_margin): pipeline.config.ExtractConfig's defaults.
_FALLBACK = {"face_model": "full", "min_face_score": 0.5, "face_margin": 20,
             "face_resize": "squash"}


@dataclass
class ClipPrediction:
    path: str
    status: str  # "ok" | "failed"
    reason: str = ""  # why a clip failed
    label: str | None = None
    probabilities: dict[str, float] | None = None  # class name -> probability, label set order
    faces_found: int = 0  # segments whose frame had a detected face (others use the whole frame)
    segments: int = 0
    note: str = ""  # e.g. frames that did not decode and were stood in for


@dataclass
class Predictions:
    run: str
    classes: list[str]
    preprocessing: dict
    clips: list[ClipPrediction] = field(default_factory=list)

    @property
    def n_failed(self) -> int:
        return sum(c.status != "ok" for c in self.clips)

    @property
    def exit_code(self) -> int:
        return 3 if self.n_failed else 0

    def to_dict(self) -> dict:
        return {"run": self.run, "classes": self.classes, "preprocessing": self.preprocessing,
                "n_clips": len(self.clips), "n_failed": self.n_failed,
                "clips": [asdict(c) for c in self.clips]}


def run_preprocessing(run_config: dict, image_size: int) -> dict:
    """The crop options extract used for the run's training cache (what the run records)."""
    values = dict(_FALLBACK)
    trained_on = run_config.get("cache_fingerprint") or {}
    values.update({k: trained_on[k] for k in _FALLBACK if k in trained_on})
    prep = run_config.get("preprocessing") or {}
    values.update({k: prep[k] for k in _FALLBACK if k in prep})
    head = run_config.get("model") or {}
    values["segments"] = int(prep.get("segments", head.get("segments", 16)))
    values["image_size"] = int(prep.get("image_size", image_size))
    values["normalize"] = prep.get("normalize", "clip")
    from heads.run import recorded_choices
    from pipeline.config import PRESETS

    # The crop choices (extract --preset and its options); frames are the clip's as found.
    choices = recorded_choices(run_config)
    for key in PRESETS["caer"]:
        if key not in ("normalize", "frame_count"):
            values[key] = choices[key]
    if trained_on.get("face_boxes"):
        log.warning("the run was trained on faces from a --face-boxes file; predict finds faces "
                    "with the %s-range detector instead", values["face_model"])
    if values["context"] == "body" and not str(trained_on.get("body_boxes")).startswith(
            "detector:"):
        log.warning("the run was trained on body boxes from a box file; predict crops the "
                    "context to the person the built-in detector finds instead")
    return values


def clip_task(index: int, path, prep: dict):
    """The task extract builds for a clip, under the run's preprocessing (run_preprocessing),
    with one frame per segment (its middle) and the built-in detectors."""
    from pipeline.prepare import ClipTask

    return ClipTask(index=index, path=str(path), listed_frames=-1,
                    segments=prep["segments"], candidates=1,
                    face_model=prep["face_model"], min_face_score=prep["min_face_score"],
                    face_margin=prep["face_margin"], face_resize=prep["face_resize"],
                    image_size=prep["image_size"], boxes=None,
                    **{k: prep[k] for k in ("frame_order", "frame_sampling", "frame_decode",
                                            "face_crop", "context", "context_resize",
                                            "downscale")},
                    body_source="detector")


def predict(cfg: PredictConfig, progress: bool = True) -> Predictions:
    """Predict every path; a clip that fails is recorded with its reason, never raised."""
    from tqdm import tqdm

    from cache.core.runtime import check_device
    from heads.run import load_run, read_run_config
    from pipeline.prepare import prepare_clip

    cfg.validate()
    run_config = read_run_config(cfg.run)
    check_device(cfg.device)
    model = load_run(cfg.run, device=cfg.device)
    prep = run_preprocessing(run_config, int(model.clip.config.vision_config.image_size))
    if prep["normalize"] != model.normalize:  # load_run takes it from the same record
        raise CaerError(f"run {cfg.run}: preprocessing says normalize={prep['normalize']} but "
                        f"the model uses {model.normalize}")
    classes = list(model.labels.names)
    result = Predictions(str(cfg.run), classes, prep)
    for index, path in enumerate(tqdm(cfg.paths, desc="predict", unit="clip", leave=False,
                                      disable=not progress or len(cfg.paths) < 2)):
        crops = prepare_clip(clip_task(index, path, prep))
        if crops.status != "ok":
            result.clips.append(ClipPrediction(str(path), "failed", reason=crops.reason))
            log.warning("%s: %s", path, crops.reason)
            continue
        probs = predict_crops(model, crops.face[:, 0], crops.context[:, 0], cfg.device)
        result.clips.append(ClipPrediction(
            str(path), "ok", label=classes[int(np.argmax(probs))],
            probabilities={c: float(p) for c, p in zip(classes, probs)},
            faces_found=int(crops.found[:, 0].sum()), segments=prep["segments"],
            note=crops.note))
    return result


@torch.inference_mode()
def predict_crops(model, face: np.ndarray, context: np.ndarray, device="cpu") -> np.ndarray:
    """uint8 crops ``[S, H, W, 3]`` of one clip -> class probabilities ``[C]``."""
    def frames(x):  # -> [1, S, 3, H, W] in [0, 1]; the model normalises as the run did
        return torch.from_numpy(np.ascontiguousarray(x)).to(device).permute(0, 3, 1, 2)[None] \
            .float().div_(255.0)

    logits = model.forward_pixels(frames(face), frames(context))
    return torch.softmax(logits.float(), dim=-1)[0].cpu().numpy()


def format_predictions(result: Predictions) -> str:
    """One row per clip: the label, every class's probability (%), faces found; failures
    with their reason."""
    names = [Path(c.path).name or c.path for c in result.clips]
    width = max([len("clip")] + [len(n) for n in names])
    label_width = max([len("label")] + [len(c) for c in result.classes])
    cols = [max(len(c), 6) for c in result.classes]
    lines = [f"{'clip':<{width}}  {'label':<{label_width}}  "
             + "  ".join(f"{c:>{w}}" for c, w in zip(result.classes, cols)) + "  faces"]
    for name, clip in zip(names, result.clips):
        if clip.status != "ok":
            lines.append(f"{name:<{width}}  FAILED: {clip.reason}")
            continue
        probs = "  ".join(f"{100 * clip.probabilities[c]:>{w}.1f}"
                          for c, w in zip(result.classes, cols))
        lines.append(f"{name:<{width}}  {clip.label:<{label_width}}  {probs}  "
                     f"{clip.faces_found}/{clip.segments}")
    lines.append(f"(probabilities in %; faces: segments whose frame had a detected face, the "
                 f"others use the whole frame)")
    if result.n_failed:
        lines.append(f"{result.n_failed} of {len(result.clips)} clips failed")
    return "\n".join(lines)
