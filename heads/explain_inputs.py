"""The crops ``explain`` looks at, exactly those ``evaluate`` (or ``predict``) scores.

- Clips of a cache: the stored crops of ``extract --pixels`` (the middle candidate of each
  segment). A cache without them is re-decoded from each clip's path with the cache's own
  preprocessing: the same frames (checked against the stored frame numbers) and the stored
  face boxes, so the crops are those extract encoded.
- Clips given as paths: decoded with the run's preprocessing, the face found by the detector,
  as ``predict`` does.

Like predict, this stands above both stages: the re-decoding imports extract's per-clip
preparation (pipeline.prepare), only when it is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from heads.config import ExplainConfig
from heads.data import middle_candidate  # the frame evaluate scores
from cache.core.errors import CaerError


@dataclass
class ClipInput:
    id: str
    label: int | None  # None for a clip given as a path
    face: np.ndarray  # uint8 [S, H, W, 3]
    context: np.ndarray
    source: str  # where the crops came from, for the picture


def _select_rows(cfg: ExplainConfig, manifest) -> np.ndarray:
    ok = manifest["status"].to_numpy() == "ok"
    if cfg.ids:
        ids = manifest["id"].astype(str).to_numpy()
        rows = []
        for clip_id in cfg.ids:
            found = np.flatnonzero(ids == str(clip_id))
            if len(found) == 0:
                raise CaerError(f"--ids {clip_id}: no clip of --cache {cfg.cache} has that id")
            if not ok[found[0]]:
                raise CaerError(f"--ids {clip_id}: the clip failed extraction "
                                f"({manifest['reason'].iloc[found[0]]}); see `info`")
            rows.append(int(found[0]))
        return np.asarray(rows, np.int64)
    in_split = manifest["split"].astype(str).to_numpy() == cfg.split
    if not in_split.any():
        splits = ", ".join(sorted(set(manifest["split"].astype(str)))) or "none"
        raise CaerError(f"--split {cfg.split}: no clip of {cfg.cache} is in that split (its "
                        f"splits: {splits})")
    rows = np.flatnonzero(in_split & ok)
    if len(rows) == 0:
        raise CaerError(f"--split {cfg.split}: none of its clips was extracted successfully")
    return rows[:cfg.limit] if cfg.limit else rows


def cache_inputs(cfg: ExplainConfig, run_config: dict, model) -> list[ClipInput]:
    from cache import open_store
    from heads.evaluate import check_cache

    with open_store(cfg.cache) as store:
        fp = store.fingerprint
        check_cache(run_config, cfg.run, fp, cfg.cache, cfg.split or "test")
        manifest = store.manifest
        rows = _select_rows(cfg, manifest)
        k = middle_candidate(int(fp["candidates"]))
        out = []
        if fp.get("pixels"):
            face, context = store.pixels("face"), store.pixels("context")
            for row in rows:
                crops = [np.ascontiguousarray(np.asarray(a[np.array([row])][0, :, k])
                                              .transpose(0, 2, 3, 1)) for a in (face, context)]
                out.append(ClipInput(str(manifest["id"].iloc[row]),
                                     int(manifest["label"].iloc[row]), *crops,
                                     "the cache's stored crops"))
            return out
        frames = np.asarray(store.frame_indices[np.sort(rows)])
        boxes = np.asarray(store.face_boxes[np.sort(rows)])
        found = np.asarray(store.face_found[np.sort(rows)])
        bodies = store.body_boxes
        bodies = None if bodies is None else np.asarray(bodies[np.sort(rows)])
        position = {int(r): i for i, r in enumerate(np.sort(rows))}
        for row in rows:
            i = position[int(row)]
            clip = manifest.iloc[row]
            path = str(clip["path"])
            body = None if bodies is None or np.isnan(bodies[i]).any() else bodies[i]
            face, context = _redecode(cfg, fp, clip, frames[i], boxes[i], found[i], body, k)
            out.append(ClipInput(str(manifest["id"].iloc[row]), int(manifest["label"].iloc[row]),
                                 face, context, f"re-decoded from {path}"))
    return out


def _redecode(cfg: ExplainConfig, fp: dict, clip, frames: np.ndarray, boxes: np.ndarray,
              found: np.ndarray, body: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]:
    """extract's crops of one clip again, from its file: the cache's preprocessing choices,
    the same frames, the stored face (and body) boxes."""
    import pandas as pd

    from cache.fingerprint import FINGERPRINT_DEFAULTS
    from pipeline.prepare import ClipTask, prepare_clip
    from pipeline.video import ClipError, probe_clip

    path = str(clip["path"])
    choices = {key: fp.get(key, default) for key, default in FINGERPRINT_DEFAULTS.items()}
    why = (f"--cache {cfg.cache} holds no stored crops (it was built without --pixels), and "
           f"re-decoding the clip from {path} failed")
    try:
        info = probe_clip(path, order=choices["frame_order"])
    except ClipError as err:
        raise CaerError(f"{why}: {err}; rebuild the cache with `extract --pixels`, or put the "
                        f"clip back at that path") from None
    stored = {}
    for number, box, has_face in zip(frames.reshape(-1), boxes.reshape(-1, 4), found.reshape(-1)):
        number = int(number)
        if 0 <= number < info.n_frames:
            name = info.files[number] if info.kind == "frames" else str(number)
            stored[name] = [float(v) for v in box] if has_face else None
    listed = clip.get("listed_frames", -1)
    task = ClipTask(index=0, path=path, split=str(clip["split"]),
                    listed_frames=-1 if pd.isna(listed) else int(listed),
                    segments=int(fp["segments"]), candidates=int(fp["candidates"]),
                    face_model=fp.get("face_model", "full"),
                    min_face_score=fp.get("min_face_score", 0.5),
                    face_margin=fp.get("face_margin", 20),
                    face_resize=fp.get("face_resize", "squash"),
                    image_size=int(fp.get("image_size", 224)), boxes=stored,
                    frame_order=choices["frame_order"], frame_count=choices["frame_count"],
                    frame_sampling=choices["frame_sampling"],
                    frame_decode=choices["frame_decode"], face_crop=choices["face_crop"],
                    context=choices["context"], context_resize=choices["context_resize"],
                    downscale=choices["downscale"], body_source="file",
                    body_box=None if body is None else [float(v) for v in body])
    crops = prepare_clip(task)
    if crops.status != "ok":
        raise CaerError(f"{why}: {crops.reason}; rebuild the cache with `extract --pixels`")
    if not np.array_equal(crops.frame_index, frames):
        raise CaerError(f"{why}: the clip now has other frames than when it was extracted "
                        f"({info.n_frames} frames); extract it again")
    return crops.face[:, k], crops.context[:, k]


def path_inputs(cfg: ExplainConfig, run_config: dict, model) -> list[ClipInput]:
    """Clips given as paths, prepared as predict prepares them (the run's preprocessing)."""
    from pathlib import Path

    from heads.predict import clip_task, run_preprocessing
    from pipeline.prepare import prepare_clip

    prep = run_preprocessing(run_config, int(model.clip.config.vision_config.image_size))
    out = []
    for index, path in enumerate(cfg.paths):
        crops = prepare_clip(clip_task(index, path, prep))
        if crops.status != "ok":
            raise CaerError(f"{path}: cannot be explained: {crops.reason}")
        out.append(ClipInput(Path(path).name or str(path), None, crops.face[:, 0],
                             crops.context[:, 0], f"decoded from {path}"))
    return out
