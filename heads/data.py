"""Batches for stage two: cached features held in RAM (train-head) or stored crops read per
clip with the paper's augmentation (finetune).

Every random choice for a clip (its frame per segment, its flip view, its rotation) comes
from a generator seeded by (seed, epoch, clip), never from a shared stream. A clip therefore
gets the same draws whatever the batch size, the number of DataLoader workers or of torchrun
ranks, and a resumed run replays an epoch exactly.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from cache.core.errors import CaerError
from cache.frames import middle_candidate

log = logging.getLogger("caer")

MAX_ROTATION_DEGREES = 4.0  # METHOD.md: one rotation within +-4 degrees per clip
FLIP_PROBABILITY = 0.5


def clip_seed(seed: int, epoch: int, clip: int, purpose: str = "") -> int:
    """A 63-bit seed for one clip in one epoch, independent of batch and rank layout."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{clip}/{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def clip_generator(seed: int, epoch: int, clip: int, purpose: str = "") -> torch.Generator:
    return torch.Generator().manual_seed(clip_seed(seed, epoch, clip, purpose))


# ------------------------------------------------------------------------------ splits

@dataclass
class Splits:
    """Store row numbers of the clips each role uses. Test rows are never read for training
    or model selection; they are listed only so that the counts can be reported."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    n_failed: int  # train/val clips skipped because extract could not process them
    val_source: str  # "cache" (a val split in the store), "carved" (from train) or "none"
    n_pending: int = 0  # train/val clips not extracted yet (used only with --allow-pending)

    def describe(self) -> str:
        return (f"{len(self.train)} train, {len(self.val)} val ({self.val_source}), "
                f"{len(self.test)} test clips; {self.n_failed} failed clips skipped"
                + (f", {self.n_pending} pending clips left out" if self.n_pending else ""))


def split_clips(manifest: pd.DataFrame, val_fraction: float, val_seed: int) -> Splits:
    """Train and val rows of a store: the store's own ``val`` split when it has one, else a
    stratified, seeded ``val_fraction`` of train."""
    ok = manifest["status"].to_numpy() == "ok"
    split = manifest["split"].astype(str).str.lower().to_numpy()
    status = manifest["status"].to_numpy()
    used = np.isin(split, ["train", "val"])
    n_failed = int(((status == "failed") & used).sum())
    n_pending = int(((status == "pending") & used).sum())
    train = np.flatnonzero(ok & (split == "train"))
    test = np.flatnonzero(ok & (split == "test"))
    if len(train) == 0:
        raise CaerError(f"the cache has no usable train clips (splits: "
                        f"{dict(pd.Series(split).value_counts())}, "
                        f"{int((status == 'failed').sum())} failed, "
                        f"{int((status == 'pending').sum())} pending)")
    cache_val = np.flatnonzero(ok & (split == "val"))
    if len(cache_val):
        if val_fraction:
            log.info("the cache has a val split (%d clips): using it instead of carving "
                     "--val-fraction %g from train", len(cache_val), val_fraction)
        return Splits(train, cache_val, test, n_failed, "cache", n_pending)
    if not val_fraction:
        return Splits(train, np.zeros(0, np.int64), test, n_failed, "none", n_pending)
    if not 0 < val_fraction < 1:
        raise CaerError(f"--val-fraction must be in [0, 1), not {val_fraction}")
    from sklearn.model_selection import train_test_split

    labels = manifest["label"].to_numpy()[train]
    n_val = max(1, int(round(val_fraction * len(train))))
    counts = np.bincount(labels)
    # sklearn needs two clips of every class (and a val set no smaller than the number of
    # classes) to stratify; below that, fall back to a plain seeded split and say so.
    n_classes = int((counts > 0).sum())
    stratify = (labels if counts[counts > 0].min() >= 2 and n_classes <= n_val <= len(train) - n_classes
                else None)
    if stratify is None:
        log.warning("val split not stratified: a class has fewer than 2 train clips or the val "
                    "split is smaller than the number of classes")
    kept, val = train_test_split(train, test_size=n_val, random_state=val_seed,
                                 stratify=stratify)
    return Splits(np.sort(kept), np.sort(val), test, n_failed, "carved", n_pending)


# ------------------------------------------------------------------------------ features

class FeatureBank:
    """The cached features of some clips, in RAM as float16 tensors ``[N, S, K, D]``.

    2,700 clips x 2 streams x 16 segments x 512 dims is 88 MB per frame candidate: reading
    the store once makes an epoch pure tensor indexing.
    """

    def __init__(self, store, rows: np.ndarray, with_flip: bool):
        rows = np.asarray(rows, np.int64)
        self.rows = rows
        table = store.clip_table(["id", "label"])
        self.labels = torch.as_tensor(table["label"].to_numpy()[rows], dtype=torch.long)
        self.flip = with_flip and bool(store.fingerprint.get("flip"))
        self.views = {}
        for stream in ("face", "context"):
            self.views[(stream, False)] = _read_rows(store.features(stream), rows)
            if self.flip:
                self.views[(stream, True)] = _read_rows(store.features(stream, flip=True), rows)
        _, self.segments, self.candidates, self.dim = self.views[("face", False)].shape
        ids = table["id"].to_numpy()[rows]
        for (stream, flipped), value in self.views.items():
            bad = ~torch.isfinite(value).flatten(1).all(1)
            if bad.any():
                shown = ", ".join(map(str, ids[bad.numpy()][:5]))
                raise CaerError(f"non-finite {stream}{' flip' if flipped else ''} features in "
                                f"{int(bad.sum())} clips ({shown}); extract them again")

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, positions, *, train: bool, seed: int = 0, epoch: int = 0):
        """float32 face and context ``[B, S, D]`` and labels ``[B]`` for positions in this bank.

        Training: a random candidate frame per segment and a random flip view per clip, drawn
        from the clip's own generator. Evaluation: the middle candidate, no flip.
        """
        positions = torch.as_tensor(positions, dtype=torch.long)
        s = self.segments
        if train:
            frames, flips = [], []
            for p in positions.tolist():
                g = clip_generator(seed, epoch, int(self.rows[p]), "features")
                frames.append(torch.randint(self.candidates, (s,), generator=g))
                flips.append(bool(self.flip and torch.rand((), generator=g) < FLIP_PROBABILITY))
            frame = torch.stack(frames)
            flip = torch.tensor(flips)
        else:
            frame = torch.full((len(positions), s), middle_candidate(self.candidates))
            flip = torch.zeros(len(positions), dtype=torch.bool)
        segment = torch.arange(s)
        out = []
        for stream in ("face", "context"):
            x = self.views[(stream, False)][positions[:, None], segment, frame]
            if flip.any():
                flipped = self.views[(stream, True)][positions[flip][:, None], segment, frame[flip]]
                x[flip] = flipped
            out.append(x.float())
        return out[0], out[1], self.labels[positions]


def _read_rows(array, rows: np.ndarray) -> torch.Tensor:
    # StoredArray takes a sorted index array; splits are kept sorted.
    order = np.argsort(rows, kind="stable")
    values = np.empty((len(rows),) + tuple(array.shape[1:]), np.float16)
    if len(rows):
        values[order] = array[rows[order]]
    return torch.from_numpy(values)


# ------------------------------------------------------------------------------ pixels

def augment_clip(frames: torch.Tensor, degrees: float, flip: bool) -> torch.Tensor:
    """Rotate float frames ``[T, 3, H, W]`` about their centre by ``degrees``
    counter-clockwise (bilinear, black outside, as torchvision's RandomRotation) and mirror
    them when ``flip``."""
    if degrees:
        theta = math.radians(degrees)
        cos, sin = math.cos(theta), math.sin(theta)
        # affine_grid maps each output point to the input point it reads (y points down;
        # square frames need no aspect term).
        matrix = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=frames.dtype)
        grid = F.affine_grid(matrix.expand(len(frames), 2, 3), list(frames.shape),
                             align_corners=False)
        frames = F.grid_sample(frames, grid, mode="bilinear", padding_mode="zeros",
                               align_corners=False)
    if flip:
        frames = frames.flip(-1)
    return frames


AUGMENTATIONS = ("ours", "original")


def pil_rotation_matrix(degrees: float, size: tuple[int, int],
                        raw_size: tuple[float, float] | None = None) -> tuple[float, ...]:
    """PIL's affine coefficients (output pixel -> input pixel) rotating an image of ``size``
    ``degrees`` counter-clockwise about its centre, as ``Image.rotate`` computes them.

    With ``raw_size`` the image is a ``raw_size`` crop squashed to ``size``, and the rotation
    is the one the raw crop would have had before that resize: in the squashed image it is
    S R S^-1 (S the per-axis scale), a rotation skewed by the crop's aspect ratio.
    """
    theta = -math.radians(degrees)
    a, b = round(math.cos(theta), 15), round(math.sin(theta), 15)
    d, e = -b, a
    w, h = size
    if raw_size is not None:
        sx, sy = w / raw_size[0], h / raw_size[1]
        b, d = b * sx / sy, d * sy / sx
    cx, cy = w / 2.0, h / 2.0
    return (a, b, cx - a * cx - b * cy, d, e, cy - d * cx - e * cy)


def rotate_like_original(crops: np.ndarray, degrees: float,
                         raw_sizes: np.ndarray | None = None) -> np.ndarray:
    """The original's ``RandomRotation`` on stored uint8 crops ``[T, 3, H, W]``: PIL's rotate
    with its default nearest resampling and black corners. ``raw_sizes`` ``[T, 2]`` (w, h of
    each face crop before it was squashed to H x W) make it the rotation of the raw crop."""
    from PIL import Image

    out = np.empty_like(crops)
    size = (crops.shape[3], crops.shape[2])
    for t in range(len(crops)):
        image = Image.fromarray(np.ascontiguousarray(crops[t].transpose(1, 2, 0)))
        if raw_sizes is None:
            rotated = image.rotate(degrees)
        else:
            rotated = image.transform(size, Image.Transform.AFFINE,
                                      pil_rotation_matrix(degrees, size, tuple(raw_sizes[t])),
                                      Image.Resampling.NEAREST)
        out[t] = np.asarray(rotated).transpose(2, 0, 1)
    return out


def raw_face_sizes(boxes: np.ndarray, width: int, height: int, margin: int) -> np.ndarray:
    """``[..., 2]`` (w, h) of the original's face crops for boxes ``[..., 4]`` (NaN: no face,
    the whole frame): coordinates truncated, the margin added, clamped to the frame."""
    whole = np.isnan(boxes).any(-1)
    b = np.where(whole[..., None], 0, np.nan_to_num(boxes)).astype(np.int64)  # int() truncates
    left, upper = np.maximum(0, b[..., 0] - margin), np.maximum(0, b[..., 1] - margin)
    right, lower = np.minimum(width, b[..., 2] + margin), np.minimum(height, b[..., 3] + margin)
    sizes = np.stack([right - left, lower - upper], -1)
    sizes[whole] = (width, height)
    return np.maximum(sizes, 1)


class PixelClips(torch.utils.data.Dataset):
    """Stored uint8 crops of some clips, one clip per item: ``(face, context, label, row)``,
    face and context float ``[S, 3, H, W]`` in [0, 1].

    Training draws, per clip, a candidate frame per segment, then with ``augment="ours"`` one
    rotation in +-4 degrees (bilinear) and one horizontal flip with p = 0.5 shared by both
    streams (they show the same moment). ``augment="original"`` draws rotation and flip for
    each stream on its own and rotates as the original does (PIL, nearest); the face crop is
    rotated as its raw, unsquashed crop would have been when the cache squashed faces
    (docs/reproducing.md says what stored crops cannot reproduce). The store is opened lazily
    so that each DataLoader worker has its own handle.
    """

    def __init__(self, store_path: str, rows: np.ndarray, labels: np.ndarray, *, train: bool,
                 seed: int = 0, candidates: int = 1, augment: str = "ours"):
        if augment not in AUGMENTATIONS:
            raise CaerError(f"--augment {augment}: choose one of {', '.join(AUGMENTATIONS)}")
        self.store_path, self.rows, self.labels = str(store_path), np.asarray(rows), labels
        self.train, self.seed, self.candidates, self.epoch = train, seed, candidates, 0
        self.augment = augment
        self._store = None
        self._frame_sizes = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self):  # the store handle stays in the process that opened it
        return {**self.__dict__, "_store": None}

    def __getitem__(self, i: int):
        if self._store is None:
            from cache import open_store

            self._store = open_store(self.store_path)
        row = int(self.rows[i])
        face = self._store.pixels("face")[row]  # [S, K, 3, H, W] uint8
        context = self._store.pixels("context")[row]
        s = face.shape[0]
        if self.train and self.augment == "original":
            return (*self._original_augmentation(row, face, context), int(self.labels[i]), row)
        if self.train:
            g = clip_generator(self.seed, self.epoch, row, "pixels")
            frame = torch.randint(self.candidates, (s,), generator=g).numpy()
            degrees = float((torch.rand((), generator=g) * 2 - 1) * MAX_ROTATION_DEGREES)
            flip = bool(torch.rand((), generator=g) < FLIP_PROBABILITY)
        else:
            frame = np.full(s, middle_candidate(self.candidates))
            degrees, flip = 0.0, False
        segment = np.arange(s)
        out = []
        for crops in (face, context):
            x = torch.from_numpy(np.ascontiguousarray(crops[segment, frame])).float().div_(255)
            out.append(augment_clip(x, degrees, flip) if self.train else x)
        return out[0], out[1], int(self.labels[i]), row

    def _original_augmentation(self, row: int, face: np.ndarray, context: np.ndarray):
        g = clip_generator(self.seed, self.epoch, row, "pixels-original")
        s = face.shape[0]
        frame = torch.randint(self.candidates, (s,), generator=g).numpy()
        segment = np.arange(s)
        raw = None
        fingerprint = self._store.fingerprint
        if fingerprint.get("face_resize") == "squash":
            if self._frame_sizes is None:
                sizes = self._store.clip_table(["width", "height"])
                self._frame_sizes = sizes.to_numpy()
            width, height = (int(v) for v in self._frame_sizes[row])
            if width > 0 and height > 0:  # else unknown (a store built from arrays)
                boxes = np.asarray(self._store.face_boxes[row])[segment, frame]
                raw = raw_face_sizes(boxes, width, height, int(fingerprint["face_margin"]))
        out = []
        for crops, sizes in ((face, raw), (context, None)):
            # The original transforms each stream's frames as one group: one angle, one flip.
            degrees = float((torch.rand((), generator=g) * 2 - 1) * MAX_ROTATION_DEGREES)
            flip = bool(torch.rand((), generator=g) < FLIP_PROBABILITY)
            x = rotate_like_original(np.ascontiguousarray(crops[segment, frame]), degrees, sizes)
            x = torch.from_numpy(x).float().div_(255)
            out.append(x.flip(-1) if flip else x)
        return out[0], out[1]
