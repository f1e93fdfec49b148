"""Crop geometry, letterboxing and the pixel normalisation CLIP sees."""

import numpy as np
import pytest
import torch

from pipeline.clip import CLIP_MEAN, CLIP_STD
from pipeline.crops import crop_box, face_crop, letterbox, normalize_pixels, to_clip_pixels

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _scene(h=120, w=200, box=(60, 30, 100, 90)):
    """A grey image with a red rectangle at box (x0, y0, x1, y1), x1/y1 exclusive."""
    image = np.full((h, w, 3), 128, np.uint8)
    x0, y0, x1, y1 = box
    image[y0:y1, x0:x1] = RED
    return image


def test_crop_box_grows_by_margin_and_clamps_to_the_image():
    assert crop_box((60, 30, 100, 90), 200, 120, margin=20) == (40, 10, 120, 110)
    assert crop_box((5, 3, 190, 115), 200, 120, margin=20) == (0, 0, 200, 120)
    # Fractional boxes round outwards, so the crop never cuts into the detected face.
    assert crop_box((60.4, 30.6, 99.2, 89.9), 200, 120, margin=0) == (60, 30, 100, 90)


def test_squash_without_margin_is_exactly_the_box():
    image = _scene()
    crop = face_crop(image, (60, 30, 100, 90), margin=0, size=224, resize="squash")
    assert crop.shape == (224, 224, 3) and crop.dtype == np.uint8
    assert (crop == RED).all()  # nothing of the grey background came in


def test_squash_with_margin_places_the_box_where_the_margin_says():
    image = _scene()
    # Box 40x60 plus 20 px each side -> an 80x100 crop, squashed to 160x160: x scale 2, y 1.6.
    crop = face_crop(image, (60, 30, 100, 90), margin=20, size=160, resize="squash")
    red = (crop == RED).all(axis=2)
    ys, xs = np.nonzero(red)
    # The red part spans [20, 60) x [20, 80) in the crop -> [40, 120) x [32, 128) after scaling;
    # bicubic blurs one or two pixels at the edges.
    assert abs(xs.min() - 40) <= 2 and abs(xs.max() + 1 - 120) <= 2
    assert abs(ys.min() - 32) <= 2 and abs(ys.max() + 1 - 128) <= 2
    assert (crop[:20, :] == 128).all() and (crop[:, :30] == 128).all()


def test_box_at_the_border_is_clamped_not_padded():
    image = _scene(box=(0, 0, 30, 20))
    crop = face_crop(image, (0, 0, 30, 20), margin=20, size=100, resize="squash")
    # The crop is [0, 50) x [0, 40): red fills its top-left 30x20 -> 60x50 of the 100x100 output.
    red = (crop == RED).all(axis=2)
    assert red[:45, :55].all() and not red[60:, :].any() and not red[:, 65:].any()


def test_letterbox_keeps_aspect_centres_and_pads_black():
    image = np.full((100, 200, 3), 200, np.uint8)  # wide: 224 wide, 112 tall, centred
    out = letterbox(image, 224)
    assert out.shape == (224, 224, 3)
    assert (out[:56] == 0).all() and (out[168:] == 0).all()
    assert (out[56:168] == 200).all()
    tall = letterbox(np.full((300, 100, 3), 50, np.uint8), 150)  # 50 wide, centred
    assert (tall[:, :50] == 0).all() and (tall[:, 100:] == 0).all() and (tall[:, 50:100] == 50).all()


def test_face_crop_letterbox_keeps_the_crop_aspect():
    image = _scene()
    crop = face_crop(image, (60, 30, 100, 90), margin=0, size=120, resize="letterbox")
    # A 40x60 box: 80 wide, 120 tall, centred -> black columns 0..19 and 100..119.
    assert (crop[:, :20] == 0).all() and (crop[:, 100:] == 0).all()
    assert (crop[:, 21:99] == RED).all()


def test_no_box_crops_the_whole_frame():
    image = _scene()
    whole = face_crop(image, None, size=64)
    assert (whole == np.asarray(face_crop(image, (0, 0, 200, 120), margin=0, size=64))).all()


def test_grayscale_and_single_channel_become_rgb():
    gray = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (25, 1))
    out = face_crop(gray, None, size=25)
    assert out.shape == (25, 25, 3)
    assert (out[..., 0] == gray).all() and (out[..., 1] == gray).all() and (out[..., 2] == gray).all()
    assert letterbox(gray[:, :, None], 25).shape == (25, 25, 3)
    with pytest.raises(TypeError):
        face_crop(gray.astype(np.float32), None)
    with pytest.raises(ValueError):
        face_crop(_scene(), None, resize="crop")


def test_to_clip_pixels_layout_range_and_normalisation():
    images = np.zeros((2, 4, 6, 3), np.uint8)
    images[0, ..., 0] = 255   # red channel full in image 0
    images[1, 1, 2] = (10, 20, 30)
    raw = to_clip_pixels(images, normalize="none")
    assert raw.shape == (2, 3, 4, 6) and raw.dtype == torch.float32
    assert raw[0, 0].eq(1).all() and raw[0, 1:].eq(0).all()
    assert torch.allclose(raw[1, :, 1, 2], torch.tensor([10, 20, 30]) / 255.0)
    normed = to_clip_pixels(torch.from_numpy(images), normalize="clip")
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    assert torch.allclose(normed[0, :, 0, 0], (torch.tensor([1.0, 0, 0]) - mean) / std)
    # The same normalisation on an already-[0, 1] tensor with leading dims [B, T, 3, H, W].
    video = raw.unsqueeze(0)
    assert torch.allclose(normalize_pixels(video, "clip")[0], normed)
    assert normalize_pixels(video, "none") is video
    with pytest.raises(ValueError):
        normalize_pixels(video, "imagenet")


# ---- pipeline.crops.Frame: one PIL image per kept frame must give the array path's bytes


def _frames_of(astronaut, carphone):
    from PIL import Image

    from pipeline.video import read_frames

    big = np.asarray(Image.fromarray(astronaut).resize((1280, 720)))  # landscape, as RAER
    video = read_frames(carphone, [0, 60])
    # "tall": a geometry where this Pillow resizes the height first (Frame then resizes it in
    # one step; sharing the width pass would differ by up to 5 levels)
    return {"landscape": big, "portrait": np.ascontiguousarray(big[:, :500]),
            "tall": np.ascontiguousarray(np.rot90(big)),
            "carphone": video[60], "astronaut": astronaut}


@pytest.mark.parametrize("resize", ["squash", "letterbox"])
def test_frame_crops_are_the_array_crops_exactly(astronaut, carphone, resize):
    from pipeline.crops import Frame

    for name, rgb in _frames_of(astronaut, carphone).items():
        h, w = rgb.shape[:2]
        boxes = [None, (w * 0.3, h * 0.2, w * 0.6, h * 0.7), (0, 0, w, h),
                 (-5.5, h * 0.5, w * 0.2, h + 3.2), (w - 3, h - 3, w + 1, h + 1)]
        for order in ("face first", "context first"):  # the shared horizontal pass either way
            frame = Frame(rgb)
            for box in boxes:
                if order == "context first":
                    assert np.array_equal(letterbox(frame, 224), letterbox(rgb, 224)), name
                got = face_crop(frame, box, 20, 224, resize)
                want = face_crop(rgb, box, 20, 224, resize)
                assert got.shape == want.shape == (224, 224, 3)
                assert np.array_equal(got, want), (name, box, resize, order)
                assert np.array_equal(letterbox(frame, 224), letterbox(rgb, 224)), name
            assert np.array_equal(letterbox(frame, 64), letterbox(rgb, 64))
            assert np.array_equal(letterbox(Frame(rgb), w if w >= h else h), letterbox(rgb, max(h, w)))


def test_frame_of_a_pil_image_is_its_rgb_array(astronaut):
    from PIL import Image

    from pipeline.crops import Frame

    for image in (Image.fromarray(astronaut).convert("L"), Image.fromarray(astronaut).convert("P"),
                  Image.fromarray(np.dstack([astronaut, astronaut[..., :1]]), "RGBA")):
        rgb = np.asarray(image.convert("RGB"))
        frame = Frame(image)
        assert frame.shape == rgb.shape and np.array_equal(frame.array, rgb)
        assert np.array_equal(face_crop(frame, None, size=96), face_crop(rgb, None, size=96))
        assert np.array_equal(letterbox(frame, 96), letterbox(rgb, 96))
    gray = Frame(astronaut[..., 0])  # a 2-D array becomes three equal channels
    assert gray.array.shape == (512, 512, 3) and (gray.array[..., 2] == astronaut[..., 0]).all()


# ---- downscale: "fast" is PIL's own two-step resize, "exact" the one bicubic pass


def test_fast_downscale_is_pils_reducing_gap_resize_and_close_to_exact(astronaut, carphone):
    from PIL import Image

    from pipeline.crops import Frame

    frames = _frames_of(astronaut, carphone)
    big = np.asarray(Image.fromarray(astronaut).resize((1920, 1080), Image.BICUBIC))  # RAER's
    for name, rgb in {**frames, "1080p": big}.items():
        h, w = rgb.shape[:2]
        image = Image.fromarray(rgb)
        scale = 224 / max(h, w)
        new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
        for frame in (Frame(rgb), rgb):
            fast = face_crop(frame, None, 20, 224, "squash", "fast")
            want = np.asarray(image.resize((224, 224), Image.BICUBIC, reducing_gap=2.0))
            assert np.array_equal(fast, want), name
            boxed = letterbox(frame, 224, "fast")
            top, left = (224 - new_h) // 2, (224 - new_w) // 2
            want = np.asarray(image.resize((new_w, new_h), Image.BICUBIC, reducing_gap=2.0))
            assert np.array_equal(boxed[top:top + new_h, left:left + new_w], want), name
            assert not boxed[:top].any() and not boxed[top + new_h:].any()
        exact = face_crop(Frame(rgb), None, 20, 224, "squash", "exact")
        assert np.array_equal(exact, face_crop(rgb, None, 20, 224, "squash")), name
        diff = np.abs(fast.astype(int) - exact)
        if w >= 4 * 224 or h >= 4 * 224:  # a real two-step shrink: other bytes, close ones
            assert diff.max() > 0, name
            assert diff.max() <= 12 and diff.mean() < 1.0, (name, diff.max(), diff.mean())
        else:  # less than 4x per axis: no box-averaging step, the same bytes
            assert diff.max() == 0, name


def test_a_face_region_shrunk_less_than_4x_is_the_same_either_way(astronaut):
    from pipeline.crops import Frame

    frame = Frame(astronaut)
    box = (180, 60, 330, 230)  # the face: a 190 px crop with the margin
    for resize in ("squash", "letterbox"):
        assert np.array_equal(face_crop(frame, box, 20, 224, resize, "fast"),
                              face_crop(frame, box, 20, 224, resize, "exact"))
    assert np.array_equal(face_crop(frame, box, 20, 64, "squash", "fast"),
                          face_crop(frame, box, 20, 64, "squash", "exact"))  # 3.0x
    with pytest.raises(ValueError, match="downscale must be one of"):
        face_crop(frame, box, 20, 224, "squash", "quick")
