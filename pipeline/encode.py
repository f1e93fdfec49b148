"""Extract's encoder side: the crops of a prepared clip stacked into views, encoded in
batches of exactly ``batch_size`` images across clips (``BatchEncoder``), and turned into the
``ClipResult`` the store writes.

Determinism, which resume and torchrun rely on: every encoder batch holds exactly
``batch_size`` images (the last one is padded). A CPU matrix multiply can round a row
differently when the number of rows changes, but not when only its neighbours change, so
with a fixed batch size a crop's features do not depend on which other clips shared its
batch, and a clip redone after a kill, or by another rank, is bit-identical.
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np

from cache.layout import ClipResult
from pipeline.prepare import PreparedClip


class BatchEncoder:
    """Encodes queued crops in batches of exactly ``batch_size`` images, across clips."""

    def __init__(self, clip, batch_size: int, normalize: str, device: str, precision: str):
        import torch

        self.clip, self.batch_size, self.normalize = clip, batch_size, normalize
        self.device, self.precision = device, precision
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.queue: deque = deque()  # [clip entry, next row to encode]
        self.queued = 0
        self.encode_seconds = 0.0
        self.n_batches = 0

    def add(self, entry: dict) -> None:
        self.queue.append([entry, 0])
        self.queued += len(entry["images"])

    def run(self, final: bool = False) -> list[dict]:
        """Encode full batches (and the padded rest when ``final``); return finished clips."""
        done = []
        while self.queued >= self.batch_size or (final and self.queued):
            done += self._one_batch()
        return done

    def _one_batch(self) -> list[dict]:
        import torch
        from pipeline.crops import to_clip_pixels

        parts, owners, n = [], [], 0
        for item in self.queue:
            entry, start = item
            take = min(len(entry["images"]) - start, self.batch_size - n)
            parts.append(entry["images"][start:start + take])
            owners.append((item, start, take))
            n += take
            if n == self.batch_size:
                break
        images = np.concatenate(parts)
        if n < self.batch_size:  # the fixed batch size keeps features independent of it
            pad = np.zeros((self.batch_size - n,) + images.shape[1:], np.uint8)
            images = np.concatenate([images, pad])
        t0 = time.perf_counter()
        pixels = to_clip_pixels(images, self.normalize).to(self.device)
        with torch.inference_mode(), torch.autocast(self.device.split(":")[0],
                                                    dtype=self.dtype or torch.float32,
                                                    enabled=self.dtype is not None):
            out = self.clip.encode_images(pixels).float().cpu().numpy().astype(np.float16)
        self.encode_seconds += time.perf_counter() - t0
        self.n_batches += 1
        finished, offset = [], 0
        for item, start, take in owners:
            entry = item[0]
            entry["features"][start:start + take] = out[offset:offset + take]
            offset += take
            item[1] = start + take
            self.queued -= take
        while self.queue and self.queue[0][1] == len(self.queue[0][0]["images"]):
            finished.append(self.queue.popleft()[0])
        return finished


def _distinct_frames(result: PreparedClip) -> tuple[np.ndarray, np.ndarray]:
    """(first slot of each distinct kept frame, slot -> its distinct frame): a frame kept in
    several slots (a short clip, the original's test frame in every candidate) is encoded
    once. Its crops are the same in every slot, since they depend on the frame alone."""
    _, first, inverse = np.unique(result.frame_index.reshape(-1), return_index=True,
                                  return_inverse=True)
    return first, inverse.reshape(-1)


def stack_views(result: PreparedClip, flip: bool) -> np.ndarray:
    """uint8 ``[V * F, H, W, 3]``, the F distinct kept frames of each view in the order face,
    context(, face_flip, context_flip)."""
    first, _ = _distinct_frames(result)
    size = result.face.shape[-2]
    face = result.face.reshape(-1, size, size, 3)[first]
    context = result.context.reshape(-1, size, size, 3)[first]
    views = [face, context]
    if flip:  # flipping the crop equals cropping the flipped frame with the mirrored box
        views += [face[..., ::-1, :], context[..., ::-1, :]]
    return np.ascontiguousarray(np.stack(views).reshape(-1, size, size, 3))


def to_clip_result(result: PreparedClip, features: np.ndarray | None, fp: dict) -> ClipResult:
    if result.status != "ok":
        return ClipResult("failed", reason=result.reason or "failed")
    s, k = fp["segments"], fp["candidates"]
    views = ["face", "context"] + (["face_flip", "context_flip"] if fp["flip"] else [])
    _, slot_frame = _distinct_frames(result)
    feats = features.reshape(len(views), -1, features.shape[-1])[:, slot_frame]
    feats = feats.reshape(len(views), s, k, -1)
    pixels = {}
    if fp["pixels"]:
        pixels = {name: np.ascontiguousarray(crops.transpose(0, 1, 4, 2, 3))
                  for name, crops in (("face", result.face), ("context", result.context))}
    return ClipResult("ok", note=result.note, n_frames=result.n_frames, fps=result.fps,
                      width=result.width, height=result.height,
                      frame_index=result.frame_index, box=result.box,
                      score=result.score, found=result.found,
                      body_box=result.body_box,
                      features={v: feats[i] for i, v in enumerate(views)}, pixels=pixels)
