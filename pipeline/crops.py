"""Face and context crops (uint8, 224x224) and the pixel normalisation CLIP sees.

Resizing uses PIL's bicubic filter: CLIP's own preprocessing resizes with bicubic, so crops
look like the images CLIP was trained on. (PIL's bicubic antialiases when it shrinks, which a
1920x1080 frame going down to 224 needs.)

``downscale`` says how a large shrink is done (extract --downscale; the store records it):
"exact" is one bicubic resize, whose kernel spans 4 x the shrink factor in source pixels (34
taps across a 1920-wide frame going to 224). "fast" is PIL's own two-step resize,
``Image.resize(size, BICUBIC, reducing_gap=2.0)``: each axis is first box-averaged by the whole
factor that leaves bicubic at least a 2x shrink, then bicubic as before. A 1920x1080 frame
squashed to 224x224 takes a third of the time and lies within about 10 grey levels of
"exact" (0.2-0.7 on average; benchmarks/extract_breakdown.py measures both). A crop that
shrinks by less than 4x on both axes comes out the same either way.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # torch is imported where it is used: decode workers never load it
    import torch

RESIZE_MODES = ("squash", "letterbox")
DOWNSCALES = ("fast", "exact")
_REDUCING_GAP = {"fast": 2.0, "exact": None}


def _gap(downscale: str) -> float | None:
    if downscale not in _REDUCING_GAP:
        raise ValueError(f"downscale must be one of {DOWNSCALES}, got {downscale!r}")
    return _REDUCING_GAP[downscale]


def _as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an image [H, W] or [H, W, 3], got shape {image.shape}")
    return image


def _resize(image, width: int, height: int, downscale: str = "exact") -> np.ndarray:
    if isinstance(image, Frame):
        return image.resized(width, height, downscale=downscale)
    if image.shape[1] == width and image.shape[0] == height:
        return np.ascontiguousarray(image)
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize(
        (width, height), Image.BICUBIC, reducing_gap=_gap(downscale)))


class Frame:
    """One kept frame, handed to PIL once and shared by its face crop and its context.

    ``image`` is a uint8 array (as ``_as_rgb`` accepts) or a PIL image (converted to RGB
    as read_frames converts it). A whole-frame resize reuses the horizontal pass of an
    earlier one to the same width: PIL's bicubic resize runs horizontally, then vertically,
    through an 8-bit image, so resizing to (width, frame height) and then to (width, height)
    gives the one-step resize's bytes exactly where PIL runs that pass first. Which pass it
    runs first depends on the sizes only (this Pillow runs the vertical one first for some
    tall images), so _rows_first checks it once per geometry on a noise image, and the frame
    is resized in one step where it is not so (tests/test_crops.py compares the crops with
    the one-step ones). A landscape frame with no face found is squashed and letterboxed
    from one horizontal pass. With ``downscale="fast"`` each resize is PIL's own two-step one
    and shares nothing: its box-averaging step already does most of the shrinking.
    """

    def __init__(self, image):
        if isinstance(image, Image.Image):
            self._image = image if image.mode == "RGB" else image.convert("RGB")
            self._array = None
            self.width, self.height = self._image.size
        else:
            self._array = np.ascontiguousarray(_as_rgb(image))
            self._image = None  # made when first cropped: --preset original never needs it
            self.height, self.width = self._array.shape[:2]
        self._rows: dict[int, Image.Image] = {}  # width -> the frame resized to that width

    @property
    def image(self) -> Image.Image:
        if self._image is None:
            self._image = Image.fromarray(self._array)
        return self._image

    @property
    def array(self) -> np.ndarray:
        """The frame as uint8 RGB ``[H, W, 3]`` (what the detector and --preset original
        take)."""
        if self._array is None:
            self._array = np.ascontiguousarray(np.asarray(self._image))
        return self._array

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.height, self.width, 3

    def resized(self, width: int, height: int, box=None, downscale: str = "exact") -> np.ndarray:
        """The frame, or its integer ``box`` (x0, y0, x1, y1), bicubic to width x height."""
        gap = _gap(downscale)
        if box is not None and tuple(box) != (0, 0, self.width, self.height):
            return np.asarray(self.image.crop(tuple(box)).resize((width, height), Image.BICUBIC,
                                                                 reducing_gap=gap))
        if (width, height) == (self.width, self.height):
            return np.array(self.image)
        if gap is not None:
            return np.asarray(self.image.resize((width, height), Image.BICUBIC,
                                                reducing_gap=gap))
        if width == self.width or not _rows_first(self.width, self.height, width, height):
            return np.asarray(self.image.resize((width, height), Image.BICUBIC))
        rows = self._rows.get(width)
        if rows is None:
            rows = self._rows[width] = self.image.resize((width, self.height), Image.BICUBIC)
        if height == self.height:
            return np.array(rows)
        return np.asarray(rows.resize((width, height), Image.BICUBIC))


def letterbox(rgb, size: int = 224, downscale: str = "exact") -> np.ndarray:
    """The longer side resized to ``size``, centred on a black ``size x size`` square.
    ``rgb``: a uint8 image or a Frame."""
    rgb = rgb if isinstance(rgb, Frame) else _as_rgb(rgb)
    h, w = rgb.shape[:2]
    scale = size / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    out = np.zeros((size, size, 3), np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top:top + new_h, left:left + new_w] = _resize(rgb, new_w, new_h, downscale)
    return out


@functools.lru_cache(maxsize=64)
def _rows_first(in_w: int, in_h: int, out_w: int, out_h: int) -> bool:
    """Whether PIL's bicubic resize from in_w x in_h to out_w x out_h equals resizing the
    width first and the height then (two 8-bit passes): checked on noise, whose two pass
    orders never agree, once per geometry in a process."""
    noise = np.random.default_rng(0).integers(0, 256, (in_h, in_w, 3), np.uint8)
    image = Image.fromarray(noise)
    one_step = np.asarray(image.resize((out_w, out_h), Image.BICUBIC))
    two_steps = image.resize((out_w, in_h), Image.BICUBIC).resize((out_w, out_h), Image.BICUBIC)
    return bool(np.array_equal(one_step, np.asarray(two_steps)))


def crop_box(box, width: int, height: int, margin: int = 20) -> tuple[int, int, int, int]:
    """``box`` (x0, y0, x1, y1) grown by ``margin`` pixels each side, rounded outwards to whole
    pixels and clamped to the image. Returns integer (x0, y0, x1, y1), x1/y1 exclusive."""
    x0, y0, x1, y1 = (float(v) for v in box)
    x0 = int(np.clip(np.floor(x0 - margin), 0, width - 1))
    y0 = int(np.clip(np.floor(y0 - margin), 0, height - 1))
    x1 = int(np.clip(np.ceil(x1 + margin), x0 + 1, width))
    y1 = int(np.clip(np.ceil(y1 + margin), y0 + 1, height))
    return x0, y0, x1, y1


def face_crop(rgb, box=None, margin: int = 20, size: int = 224,
              resize: str = "squash", downscale: str = "exact") -> np.ndarray:
    """The face region as uint8 ``[size, size, 3]``.

    ``box`` is (x0, y0, x1, y1) in pixels; it grows by ``margin`` pixels each side and is
    clamped to the image. ``None`` (no face found) crops the whole frame; the caller records
    that. ``rgb`` is a uint8 image or a Frame. ``resize="squash"`` stretches the crop to a
    square as the original does; ``"letterbox"`` keeps its aspect ratio and pads with black.
    ``downscale``: see the module docstring.
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    _gap(downscale)
    if isinstance(rgb, Frame):
        if box is None:
            return (letterbox(rgb, size, downscale) if resize == "letterbox"
                    else rgb.resized(size, size, downscale=downscale))
        region = crop_box(box, rgb.width, rgb.height, margin)
        if resize == "squash":
            return rgb.resized(size, size, region, downscale)
        rgb = rgb.array  # a letterboxed face: a small crop, cut as an array
    rgb = _as_rgb(rgb)
    if box is not None:
        x0, y0, x1, y1 = crop_box(box, rgb.shape[1], rgb.shape[0], margin)
        rgb = rgb[y0:y1, x0:x1]
    if resize == "letterbox":
        return letterbox(rgb, size, downscale)
    return _resize(rgb, size, size, downscale)


def normalize_pixels(x: torch.Tensor, normalize: str = "clip") -> torch.Tensor:
    """``x`` float in [0, 1] with channels at dim -3 (``[..., 3, H, W]``). ``"clip"`` applies
    CLIP's mean/std; ``"none"`` leaves [0, 1] values, as the original code fed them."""
    if normalize == "none":
        return x
    if normalize != "clip":
        raise ValueError(f"normalize must be 'clip' or 'none', got {normalize!r}")
    import torch

    from pipeline.clip import CLIP_MEAN, CLIP_STD

    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def to_clip_pixels(images, normalize: str = "clip") -> torch.Tensor:
    """uint8 images ``[N, H, W, 3]`` (numpy or torch) -> float32 ``[N, 3, H, W]``: [0, 1], then
    CLIP's mean/std unless ``normalize="none"``."""
    import torch

    x = torch.as_tensor(np.asarray(images)) if not torch.is_tensor(images) else images
    if x.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {x.dtype}")
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected images [N, H, W, 3], got shape {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    return normalize_pixels(x, normalize).contiguous()
