"""Frame sampling and decoding: real encoded videos (lossless, so frames compare exactly),
frame folders in natural order, rotation, truncated and broken clips."""

from dataclasses import replace

import av
import numpy as np
import pytest
from PIL import Image

from conftest import moving_square_frames, write_frame_folder, write_video
from pipeline.video import ClipError, probe_clip, read_frames, sample_indices
from cache.frames import middle_candidate
from cache.core.text import natural_key

GOP10 = "keyint=10:min-keyint=10:scenecut=0"  # x264 keeps its default B-frames


def numbered_frames(n=60, size=(48, 64)):
    """A sliding square with the frame number in green: every frame differs, knowably."""
    frames = moving_square_frames(n, size=size)
    frames[..., 1] = (np.arange(n) * 4 % 256)[:, None, None].astype(np.uint8)
    return frames


@pytest.fixture(scope="module")
def lossless(tmp_path_factory):
    """60 frames, RGB kept exactly (libx264rgb at qp 0), a keyframe every 10 frames."""
    frames = numbered_frames()
    path = tmp_path_factory.mktemp("video") / "lossless.mp4"
    write_video(path, frames, codec="libx264rgb", pix_fmt="rgb24",
                options={"qp": "0", "x264-params": GOP10})
    return path, frames


def _original_test_indices(n, segments=16):
    """The original code's test-time sampling (duration 1), written out as it is there."""
    if n > segments:
        tick = n / float(segments)
        return np.array([int(tick / 2.0 + tick * x) for x in range(segments)])
    return np.pad(np.arange(n), (0, segments - n), "edge")


# ------------------------------------------------------------------------------------ sampling

@pytest.mark.parametrize("n", [1, 5, 15, 16, 17, 30, 33, 38, 120, 1001])
def test_one_candidate_is_the_original_middle_frame(n):
    got = sample_indices(n, 16, 1)
    assert got.shape == (16, 1) and got.dtype == np.int64
    assert (got[:, 0] == _original_test_indices(n)).all()


def test_short_clip_repeats_its_last_frame():
    got = sample_indices(5, 16, 3)
    assert (got[:, 0] == [0, 1, 2, 3, 4] + [4] * 11).all()
    assert (got == got[:, :1]).all()  # every candidate of a segment is that one frame


@pytest.mark.parametrize("n,k", [(120, 3), (120, 4), (38, 5), (300, 7), (20, 2)])
def test_candidates_lie_inside_their_segment_in_order(n, k):
    got = sample_indices(n, 16, k)
    tick = n / 16
    for s in range(16):
        assert (got[s] >= np.floor(s * tick)).all() and (got[s] < np.ceil((s + 1) * tick)).all()
        assert (np.diff(got[s]) >= 0).all()
    if k % 2 == 1:  # the middle candidate is the one-candidate (evaluation) frame
        assert (got[:, middle_candidate(k)] == sample_indices(n, 16, 1)[:, 0]).all()
    assert (sample_indices(n, 16, k) == got).all()  # deterministic


def test_sampling_rejects_an_empty_clip():
    with pytest.raises(ValueError):
        sample_indices(0)


# ------------------------------------------------------------------------------------- decoding

def test_probe_counts_frames_and_keyframes(lossless):
    path, frames = lossless
    info = probe_clip(path)
    assert (info.kind, info.n_frames, info.width, info.height, info.rotation) == ("video", 60, 64, 48, 0)
    assert info.fps == pytest.approx(25.0)
    assert info.keyframes == [0, 10, 20, 30, 40, 50]


def test_decode_through_is_exact(lossless):
    path, frames = lossless
    got = read_frames(path, range(60), seek_min_gap=10**9)
    assert sorted(got) == list(range(60)) and not got.substituted
    for i in range(60):
        assert got[i].dtype == np.uint8 and got[i].shape == (48, 64, 3)
        assert np.array_equal(got[i], frames[i]), f"frame {i}"


class _CountingOpen:
    """av.open whose containers count their seeks (the container type is a C class)."""

    def __init__(self, real_open):
        self.real_open, self.seeks = real_open, 0

    def __call__(self, *args, **kwargs):
        outer = self

        class Container:
            def __init__(self, inner):
                self.inner = inner

            def __getattr__(self, name):
                return getattr(self.inner, name)

            def seek(self, *a, **kw):
                outer.seeks += 1
                return self.inner.seek(*a, **kw)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return self.inner.__exit__(*exc)

        return Container(self.real_open(*args, **kwargs))


@pytest.mark.parametrize("k", [1, 3])
def test_seeking_returns_the_same_frames_as_decoding_through(lossless, monkeypatch, k):
    path, frames = lossless
    info = probe_clip(path)
    # 4 segments: wanted frames far enough apart that a seek skips frames (with 16 segments of
    # a 60-frame clip every keyframe is within 4 frames of the last wanted frame).
    wanted = sample_indices(60, 4, k).reshape(-1)
    counting = _CountingOpen(av.open)
    monkeypatch.setattr(av, "open", counting)
    seek = read_frames(path, wanted, info, seek_min_gap=0)
    assert counting.seeks >= 3  # it really took the seek path
    counting.seeks = 0
    through = read_frames(path, wanted, info, seek_min_gap=10**9)
    assert counting.seeks == 0
    for i in wanted:
        assert np.array_equal(seek[i], through[i]) and np.array_equal(seek[i], frames[i])
    # Out of order with repeats, and frames just before / at / after keyframes.
    odd = [59, 9, 10, 11, 9, 0, 29, 31, 30]
    got = read_frames(path, odd, info, seek_min_gap=0)
    assert all(np.array_equal(got[i], frames[i]) for i in odd)


def test_an_edit_list_hides_its_frames_in_probe_decode_and_seek(tmp_path):
    # Frames stamped before 0 are pre-roll: the MP4 muxer writes an edit list that starts the
    # clip at pts 0, so a player shows frames 3..59 only, and so must we (as the frame count,
    # the numbering, the keyframes and the pixels, whether we seek or decode through).
    import fractions

    frames, preroll = numbered_frames(), 3
    path = tmp_path / "edited.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264rgb", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "rgb24"
        stream.options = {"qp": "0", "x264-params": GOP10}
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = i - preroll, fractions.Fraction(1, 25)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    assert b"elst" in path.read_bytes()
    shown = frames[preroll:]
    info = probe_clip(path)
    assert info.n_frames == len(shown)
    assert info.keyframes == [k - preroll for k in range(10, 60, 10)]
    through = read_frames(path, range(len(shown)), info, seek_min_gap=10**9)
    assert all(np.array_equal(through[i], shown[i]) for i in range(len(shown)))
    odd = [56, 0, 6, 7, 8, 1, 26, 27, 28, 0]
    seek = read_frames(path, odd, info, seek_min_gap=0)
    assert all(np.array_equal(seek[i], shown[i]) for i in odd)


def test_yuv444_is_within_rounding(tmp_path):
    # libx264 at qp 0 is lossless in YUV; RGB->YUV->RGB in 8 bits rounds twice, at most a
    # couple of levels (measured: 1).
    frames = numbered_frames(20)
    path = write_video(tmp_path / "yuv.mp4", frames, options={"qp": "0", "x264-params": GOP10},
                       pix_fmt="yuv444p")
    got = read_frames(path, range(20))
    assert max(np.abs(got[i].astype(int) - frames[i]).max() for i in range(20)) <= 2


def test_grayscale_video_becomes_rgb(tmp_path):
    frames = numbered_frames(12)
    gray = frames[..., 1]
    path = tmp_path / "gray.mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "gray"
        for g in gray:
            for packet in stream.encode(av.VideoFrame.from_ndarray(g, format="gray")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    got = read_frames(path, [0, 7, 11])
    for i in (0, 7, 11):
        assert got[i].shape == (48, 64, 3)
        assert all(np.array_equal(got[i][..., c], gray[i]) for c in range(3))


@pytest.mark.parametrize("degrees", [90, -90, 180])
def test_display_rotation_is_applied(tmp_path, degrees):
    frames = numbered_frames(12)
    path = tmp_path / f"rot{degrees}.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264rgb", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "rgb24"
        stream.options = {"qp": "0"}
        stream.set_display_rotation(degrees)
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    info = probe_clip(path)
    assert info.rotation == degrees % 360
    assert (info.width, info.height) == ((48, 64) if degrees % 180 else (64, 48))
    got = read_frames(path, [0, 11], info)
    for i in (0, 11):  # rotation is counter-clockwise, as the display matrix states
        assert np.array_equal(got[i], np.rot90(frames[i], k=degrees // 90))


def test_real_sample_video(carphone):
    info = probe_clip(carphone)
    assert (info.n_frames, info.width, info.height) == (120, 176, 144)
    assert info.fps == pytest.approx(29.97, abs=0.01)
    got = read_frames(carphone, sample_indices(120, 16, 1).reshape(-1), info)
    assert len(got) == 16 and all(f.shape == (144, 176, 3) for f in got.values())
    assert not np.array_equal(got[3], got[116])


# ------------------------------------------------------------------------------ truncated files

def _faststart_video(path, frames):
    """An MP4 whose index comes first, so a cut file still opens (as a partial download does)."""
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264rgb", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "rgb24"
        stream.options = {"qp": "0", "x264-params": GOP10 + ":bframes=0"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(path)) as container:
        ends = [p.pos + p.size for p in container.demux(container.streams.video[0]) if p.size]
    return ends


def test_truncated_file_keeps_what_is_on_disk(tmp_path):
    frames = numbered_frames(40)
    full = tmp_path / "full.mp4"
    ends = _faststart_video(full, frames)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(full.read_bytes()[:ends[24]])  # exactly the first 25 packets
    info = probe_clip(cut)
    assert info.n_frames == 25  # what is on disk, not the 40 the index promises
    got = read_frames(cut, [0, 12, 24], info)
    assert not got.substituted
    assert all(np.array_equal(got[i], frames[i]) for i in (0, 12, 24))

    half = tmp_path / "half.mp4"  # the last packet cut in the middle
    half.write_bytes(full.read_bytes()[:(ends[23] + ends[24]) // 2])
    info = probe_clip(half)
    assert info.n_frames == 25  # the partial packet is on disk ...
    got = read_frames(half, [0, 23, 24], info)
    assert all(np.array_equal(got[i], frames[i]) for i in (0, 23))
    # ... but does not decode: the frame before it stands in, and the result says so.
    assert got.substituted == {24: 23} and np.array_equal(got[24], frames[23])


def test_frames_past_the_last_decodable_one_get_the_last_decoded_frame(lossless):
    path, frames = lossless
    info = probe_clip(path)
    step = info.frame_pts[1] - info.frame_pts[0]
    # The container claims 5 more frames than decode: what a damaged tail looks like.
    claims = replace(info, n_frames=65, frame_pts=info.frame_pts + [info.frame_pts[-1] + step * (i + 1)
                                                                    for i in range(5)])
    got = read_frames(path, [5, 58, 62, 64], claims)
    assert got.substituted == {62: 59, 64: 59}
    assert np.array_equal(got[62], frames[59]) and np.array_equal(got[58], frames[58])


# --------------------------------------------------------------------------------- bad clips

def test_broken_clips_raise_one_line_reasons(tmp_path):
    with pytest.raises(ClipError, match="^file not found$"):
        probe_clip(tmp_path / "missing.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(ClipError, match="^empty file$"):
        probe_clip(tmp_path / "empty.mp4")
    (tmp_path / "notes.mp4").write_text("these are not frames\n" * 20)
    with pytest.raises(ClipError, match="^not a video: ") as err:
        probe_clip(tmp_path / "notes.mp4")
    assert "\n" not in str(err.value)
    audio = tmp_path / "tone.wav"
    with av.open(str(audio), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with pytest.raises(ClipError, match="^no video stream$"):
        probe_clip(audio)
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "list.txt").write_text("1.jpg\n")
    with pytest.raises(ClipError, match="^no readable image in folder$"):
        probe_clip(tmp_path / "nothing")


# ------------------------------------------------------------------------------- frame folders

def test_natural_key_orders_numbers_by_value():
    names = ["10.jpg", "2.jpg", "1.jpg", "frame_11.png", "frame_9.png", "B3.JPG", "b20.jpg"]
    assert sorted(names, key=natural_key) == [
        "1.jpg", "2.jpg", "10.jpg", "B3.JPG", "b20.jpg", "frame_9.png", "frame_11.png"]


def test_frame_folder_reads_in_natural_order_exactly(tmp_path):
    frames = numbered_frames(12)
    folder = write_frame_folder(tmp_path / "clip", frames, pattern="{i}.png")  # 1.png .. 12.png
    (folder / "notes.txt").write_text("not an image")
    Image.fromarray(frames[0]).save(folder / "13.BMP")  # suffixes are case-insensitive
    info = probe_clip(folder)
    assert (info.kind, info.n_frames, info.width, info.height, info.fps) == ("frames", 13, 64, 48, None)
    assert info.files[:3] == ["1.png", "2.png", "3.png"] and info.files[9] == "10.png"
    got = read_frames(folder, [0, 9, 11, 12, 9], info)
    assert np.array_equal(got[9], frames[9])      # "10.png", not "2.png"
    assert np.array_equal(got[11], frames[11]) and np.array_equal(got[12], frames[0])


def test_frame_folder_grayscale_and_jpeg(tmp_path):
    folder = tmp_path / "gray"
    folder.mkdir()
    gray = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (48, 1))
    Image.fromarray(gray, mode="L").save(folder / "1.png")
    write_frame_folder(tmp_path / "jpg", numbered_frames(3))
    got = read_frames(folder, [0])
    assert got[0].shape == (48, 64, 3) and np.array_equal(got[0][..., 2], gray)
    jpg = read_frames(tmp_path / "jpg", [2])
    assert np.abs(jpg[2].astype(int) - numbered_frames(3)[2]).mean() < 3  # JPEG q95


def test_unreadable_wanted_image_names_the_file(tmp_path):
    folder = write_frame_folder(tmp_path / "clip", numbered_frames(4))
    (folder / "3.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    info = probe_clip(folder)
    assert info.n_frames == 4
    assert len(read_frames(folder, [0, 1, 3], info)) == 3  # the broken file is not wanted
    with pytest.raises(ClipError, match="^unreadable image 3.jpg"):
        read_frames(folder, [2], info)


# ------------------------------------------------------------------- inputs people really have

def _apple_double(name: str) -> bytes:
    """An AppleDouble file as macOS writes "._NAME" beside NAME on a non-Apple file system:
    magic 0x00051607, version 2, a Finder-info entry (id 9) and an empty resource fork (id 2)."""
    import struct

    finder_info = b"JPEGprvw" + bytes(24)  # file type, creator, flags: 32 bytes
    header = struct.pack(">II16sH", 0x00051607, 0x00020000, b"Mac OS X        ", 2)
    entries_end = len(header) + 2 * 12
    entries = struct.pack(">III", 9, entries_end, len(finder_info))
    entries += struct.pack(">III", 2, entries_end + len(finder_info), 0)
    data = header + entries + finder_info
    return data + bytes(4096 - len(data))  # macOS pads them to 4 KiB


def test_hidden_files_and_apple_double_twins_are_not_frames(tmp_path):
    from pipeline.prepare import ClipTask, prepare_clip

    frames = numbered_frames(20)
    folder = write_frame_folder(tmp_path / "0001", frames)  # 1.jpg .. 20.jpg
    for i in range(1, 21):
        (folder / f"._{i}.jpg").write_bytes(_apple_double(f"{i}.jpg"))
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(2040))
    with pytest.raises(Exception):  # the twins really are not images
        Image.open(folder / "._3.jpg").load()
    info = probe_clip(folder)
    assert info.n_frames == 20 and not any(f.startswith(".") for f in info.files)
    assert info.files[:3] == ["1.jpg", "2.jpg", "3.jpg"]
    indices = sample_indices(info.n_frames, 16)
    got = read_frames(folder, indices, info)
    clean = write_frame_folder(tmp_path / "clean", frames)
    expected = read_frames(clean, indices)
    assert all(np.array_equal(got[i], expected[i]) for i in expected)
    task = ClipTask(index=0, path=str(folder), listed_frames=20, segments=16, candidates=1,
                    face_model="full", min_face_score=0.5, face_margin=20,
                    face_resize="squash", image_size=32, boxes={})
    result = prepare_clip(task)
    assert result.status == "ok" and result.n_frames == 20 and result.note == ""


def _two_stream_video(path, default: int | None):
    """Stream 0: 64x48 red frames; stream 1: 128x96 blue frames; ``default`` flags one."""
    with av.open(str(path), "w") as container:
        small = container.add_stream("libx264", rate=25)
        small.width, small.height, small.pix_fmt = 64, 48, "yuv420p"
        large = container.add_stream("libx264", rate=25)
        large.width, large.height, large.pix_fmt = 128, 96, "yuv420p"
        if default is not None:
            for i, stream in enumerate((small, large)):
                stream.disposition = (av.stream.Disposition.default if i == default
                                      else av.stream.Disposition(0))
        for i in range(12):
            for stream, color in ((small, (200, 0, 0)), (large, (0, 0, 200))):
                rgb = np.zeros((stream.height, stream.width, 3), np.uint8)
                rgb[:] = color
                for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                    container.mux(packet)
        for stream in (small, large):
            for packet in stream.encode():
                container.mux(packet)
    with av.open(str(path)) as container:  # the file really has two video streams
        assert len(container.streams.video) == 2
        flags = [bool(s.disposition & av.stream.Disposition.default)
                 for s in container.streams.video]
    return path, flags


@pytest.mark.parametrize("name,default,chosen,why", [
    ("first-default.mp4", 0, 0, "the default"),
    ("second-default.mp4", 1, 1, "the default"),
    ("no-default.mkv", None, 1, "the largest"),
])
def test_two_video_streams_read_the_default_else_the_largest(tmp_path, name, default, chosen, why):
    from pipeline.prepare import ClipTask, prepare_clip

    path, flags = _two_stream_video(tmp_path / name, default)
    assert flags == [default == 0, default == 1]
    info = probe_clip(path)
    size = ((64, 48), (128, 96))[chosen]
    assert info.stream_index == chosen and (info.width, info.height) == size
    assert info.n_frames == 12
    assert info.note == f"2 video streams; read stream #{chosen} ({why}, {size[0]}x{size[1]})"
    got = read_frames(path, [0, 6, 11], info)
    for frame in got.values():
        assert frame.shape == (size[1], size[0], 3)
        red, blue = frame[..., 0].mean(), frame[..., 2].mean()
        assert (red > 150 and blue < 50) if chosen == 0 else (blue > 150 and red < 50)
    task = ClipTask(index=0, path=str(path), listed_frames=-1, segments=4, candidates=1,
                    face_model="full", min_face_score=0.5, face_margin=20,
                    face_resize="squash", image_size=32, boxes={})
    result = prepare_clip(task)
    assert result.status == "ok" and result.note == info.note  # kept in the manifest


def test_frame_folder_as_images_has_the_arrays_pixels(tmp_path):
    """read_frames(images=True) hands PIL images on (pipeline.crops.Frame takes them); once
    in RGB they are read_frames' arrays exactly: JPEG, grayscale, palette, RGBA and an EXIF
    rotation."""
    folder = tmp_path / "odd"
    folder.mkdir()
    frames = numbered_frames(3)
    Image.fromarray(frames[0]).save(folder / "1.jpg", quality=90)
    Image.fromarray(frames[1]).convert("L").save(folder / "2.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # turned 90 degrees
    Image.fromarray(frames[2]).save(folder / "3.jpg", exif=exif)
    Image.fromarray(frames[0]).convert("P").save(folder / "4.png")
    Image.fromarray(np.dstack([frames[1], frames[1][..., :1]]), "RGBA").save(folder / "5.png")
    arrays = read_frames(folder, range(5))
    images = read_frames(folder, range(5), images=True)
    assert arrays[2].shape == (64, 48, 3)  # the EXIF turn applied
    for i in range(5):
        assert isinstance(images[i], Image.Image)
        assert np.array_equal(np.asarray(images[i].convert("RGB")), arrays[i]), i


def test_unwanted_non_reference_frames_are_skipped_and_the_wanted_ones_are_the_same(tmp_path):
    """read_frames lets the decoder skip unwanted frames no other frame refers to (B-frames
    here): fewer frames decode, and each wanted one is the frame decoding everything gives."""
    from pipeline import video

    path = write_video(tmp_path / "b.mp4", moving_square_frames(48, (96, 128)),
                       options={"bf": "3", "crf": "30"})
    info = probe_clip(path)
    wanted = [3, 10, 22, 35, 46]
    rank = {p: i for i, p in enumerate(info.frame_pts)}

    def decoded(skip: bool) -> dict:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            return {rank[f.pts]: f.to_ndarray(format="rgb24")
                    for f in video.decode_stream(container, stream, rank, set(wanted), skip)}

    everything, skipped = decoded(False), decoded(True)
    assert sorted(everything) == list(range(48))
    assert set(wanted) <= set(skipped) and len(skipped) <= 36  # B-frames were skipped
    got = read_frames(path, wanted, info)
    assert not got.substituted
    for n in wanted:
        assert np.array_equal(skipped[n], everything[n]) and np.array_equal(got[n], everything[n])
