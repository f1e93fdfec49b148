"""Frames from a clip: a video file (PyAV) or a folder of images, sampled as METHOD.md says.

A clip's frames are numbered 0..n_frames-1 in presentation order. For a video that order comes
from the packets' timestamps (demuxing is cheap, decoding is not), so frame numbers are the
same whether a frame was reached by decoding straight through or by seeking to a keyframe.
For a folder it is the natural order of the file names ("2.jpg" before "10.jpg"); the
original code sorted them as strings, which puts "10.jpg" before "2.jpg". Hidden files (names
starting with ".") are not frames: a folder copied from a Mac holds an AppleDouble "._N.jpg"
beside each frame, which is metadata, not a JPEG.

A video with several video streams (two camera angles, a cover picture) is read from its
default stream (the container's disposition flag), else from its largest one; cover pictures
(attached_pic) are never chosen while there is a real stream. ``ClipInfo.note`` says which.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cache.core.errors import CaerError, first_line
from cache.core.text import natural_key

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")

# Seek to a keyframe instead of decoding through when that skips more than this many frames.
# A seek flushes the decoder, which then refills its reorder (B-frame) delay from the keyframe:
# benchmarks/bench_decode.py measured that at about 8-9 frame decodes for 1080p H.264 with
# B-frames (crossover 8 frames; at 640x360, 3), so skipping fewer frames is cheaper decoded.
SEEK_MIN_GAP = 8


class ClipError(CaerError):
    """A clip that cannot be used. ``str(err)`` is a one-line reason the extract step records."""


@dataclass
class ClipInfo:
    path: str
    kind: str                      # "video" | "frames"
    n_frames: int                  # frames on disk (packets for a video, image files for a folder)
    fps: float | None
    width: int                     # of the frames read_frames returns, i.e. after rotation
    height: int
    rotation: int = 0              # degrees counter-clockwise applied to decoded frames (0/90/180/270)
    keyframes: list[int] | None = None          # frame numbers of keyframes (video only)
    frame_pts: list[int] | None = field(default=None, repr=False)  # pts of frame i (video only)
    files: list[str] | None = field(default=None, repr=False)      # image names (folder only)
    stream_index: int = 0          # the container's index of the stream read (video only)
    note: str = ""                 # what the reader chose for the user, e.g. which stream


# ---------------------------------------------------------------------------------------- probe

def probe_clip(path, order: str = "natural") -> ClipInfo:
    """What a clip holds, without decoding more than its first frame.

    ``order`` numbers a folder's images in ``"natural"`` order or in ``"string"`` order (the
    original code's). Raises ClipError with a one-line reason for a clip that cannot be used.
    """
    path = Path(path)
    if path.is_dir():
        return _probe_folder(path, order)
    if not path.exists():
        raise ClipError("file not found")
    if not path.is_file():  # opening a FIFO would wait forever, a device read for ever
        raise ClipError("not a regular file (a device, FIFO or socket)")
    if path.stat().st_size == 0:
        raise ClipError("empty file")
    return _probe_video(path)


def _probe_folder(path: Path, order: str = "natural") -> ClipInfo:
    from PIL import Image

    if order not in ("natural", "string"):
        raise ValueError(f"order must be 'natural' or 'string', got {order!r}")
    files = sorted((p.name for p in path.iterdir() if not p.name.startswith(".")
                    and p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                   key=natural_key if order == "natural" else None)
    for name in files:  # the size comes from the first image whose header reads
        try:
            with Image.open(path / name) as img:
                width, height = img.size
                if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientation turns it
                    width, height = height, width
            break
        except Exception:
            continue
    else:
        raise ClipError("no readable image in folder")
    return ClipInfo(str(path), "frames", len(files), None, width, height, files=files)


def _probe_video(path: Path) -> ClipInfo:
    import av

    def open_video():
        try:
            container = av.open(str(path))
        except Exception as err:
            raise ClipError(f"not a video: {first_line(err)}") from None
        if not container.streams.video:
            container.close()
            raise ClipError("no video stream")
        return container, choose_stream(container.streams.video)

    container, stream = open_video()
    note, index = stream_note(container.streams.video, stream), stream.index  # while open
    with container:
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else None
        # Count frames by demuxing: stream.frames is 0 or wrong in many containers. Packets an
        # edit list marks as discarded decode to no frame, so they are not frames of the clip.
        # The packets before the first frame are decoded on the way, as container.decode
        # would (every packet, the discarded and the final flush one too): one pass over the
        # file, not a second open and read from its start for the frame size and rotation.
        pts, is_key = [], []
        first, decoding = None, True
        try:
            for packet in container.demux(stream):
                if decoding:
                    try:
                        first = next(iter(packet.decode()), None)
                    except Exception:  # noqa: BLE001 - an undecodable start: no frame
                        decoding = False
                    if first is not None:
                        decoding = False
                if packet.size == 0 or packet.is_discard:  # size 0: the flush packet at the end
                    continue
                pts.append(packet.pts)
                is_key.append(packet.is_keyframe)
        except Exception:
            pass  # a truncated file: keep the packets that demuxed
    if not pts:
        raise ClipError("no decodable frame")
    if any(p is None for p in pts) or len(set(pts)) != len(pts):
        frame_pts = None  # no usable timestamps: frame numbers are decode order
        keyframes = [i for i, k in enumerate(is_key) if k]
    else:
        frame_pts = sorted(pts)
        rank = {p: i for i, p in enumerate(frame_pts)}
        keyframes = sorted(rank[p] for p, k in zip(pts, is_key) if k)
    if first is None:
        raise ClipError("no decodable frame")
    rotation = _rotation(first)
    width, height = first.width, first.height
    if rotation in (90, 270):
        width, height = height, width
    return ClipInfo(str(path), "video", len(pts), fps, width, height, rotation, keyframes,
                    frame_pts, stream_index=index, note=note)


def choose_stream(streams):
    """The video stream to read: the default one, else the largest; pictures last."""
    def flags(stream) -> int:
        try:
            return int(stream.disposition)
        except Exception:  # noqa: BLE001 - a build without dispositions: no preference
            return 0

    import av

    picture = int(av.stream.Disposition.attached_pic) | int(av.stream.Disposition.still_image)
    moving = [s for s in streams if not flags(s) & picture] or list(streams)
    default = [s for s in moving if flags(s) & int(av.stream.Disposition.default)]
    if len(default) == 1:
        return default[0]
    # No single default: the most pixels (first of equals), as a viewer would show.
    return max(default or moving, key=lambda s: ((s.width or 0) * (s.height or 0), -s.index))


def stream_note(streams, chosen) -> str:
    if len(streams) < 2:
        return ""
    import av

    why = "the default" if int(chosen.disposition) & int(av.stream.Disposition.default) \
        else "the largest"
    return (f"{len(streams)} video streams; read stream #{chosen.index} ({why}, "
            f"{chosen.width}x{chosen.height})")


def _rotation(frame) -> int:
    """Counter-clockwise degrees that show the frame upright, from its display matrix."""
    try:
        degrees = frame.rotation or 0
    except Exception:
        return 0
    return int(round(degrees / 90.0)) % 4 * 90


# ------------------------------------------------------------------------------------- sampling

def sample_indices(n_frames: int, segments: int = 16, candidates: int = 1) -> np.ndarray:
    """Frame numbers to keep: int64 ``[segments, candidates]``.

    The clip is cut into ``segments`` equal spans of ``tick = n_frames / segments`` frames.
    Candidate j of segment s is frame ``int(tick * (s + (j + 0.5) / candidates))``: K evenly
    spaced frames inside the segment. With one candidate that is the segment's middle frame,
    exactly the original test-time rule ``int(tick / 2 + tick * s)``.

    A clip with no more frames than segments uses frame s for segment s and repeats its last
    frame for the segments past its end (the original's edge padding); every candidate of such
    a segment is that one frame. Deterministic: no randomness here (training picks one of the
    candidates at random later).
    """
    if n_frames < 1:
        raise ValueError(f"a clip needs at least one frame, got {n_frames}")
    if segments < 1 or candidates < 1:
        raise ValueError("segments and candidates must be >= 1")
    if n_frames <= segments:
        per_segment = np.minimum(np.arange(segments), n_frames - 1)
        return np.repeat(per_segment[:, None], candidates, axis=1).astype(np.int64)
    tick = n_frames / segments
    offsets = (np.arange(candidates) + 0.5) / candidates
    positions = tick * (np.arange(segments)[:, None] + offsets[None, :])
    return np.minimum(positions.astype(np.int64), n_frames - 1)


# ---------------------------------------------------------------------------------- reading

class Frames(dict):
    """``{frame number: uint8 RGB [H, W, 3]}``. ``substituted`` maps each wanted number that
    did not decode (a truncated or damaged file) to the number of the frame given instead:
    the last frame that decoded before it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.substituted: dict[int, int] = {}


def read_frames(path, indices, info: ClipInfo | None = None,
                seek_min_gap: int = SEEK_MIN_GAP, images: bool = False) -> Frames:
    """Decode the wanted frames of a clip as uint8 RGB ``[H, W, 3]``, rotated upright.

    ``indices`` may repeat and come in any order. A video is decoded straight through, except
    that the reader seeks to the keyframe before a wanted frame when that skips more than
    ``seek_min_gap`` frames; only wanted frames are converted to RGB.

    A truncated video (the container holds N packets but fewer decode) raises ClipError only
    when no frame decodes; otherwise a wanted frame that did not decode gets the last frame
    that did before it, recorded in ``result.substituted``. ``info.n_frames`` still counts what
    is on disk. In a folder, an unreadable wanted image raises ClipError naming the file.

    ``images=True`` gives a folder's frames as the decoded PIL images (mode as decoded, same
    pixels once converted to RGB), which saves two copies of each frame where PIL crops them
    next (pipeline.crops.Frame); a video's frames stay arrays.
    """
    info = info if info is not None else probe_clip(path)
    wanted = sorted({int(i) for i in np.asarray(indices).reshape(-1)})
    if not wanted:
        return Frames()
    if wanted[0] < 0 or wanted[-1] >= info.n_frames:
        raise ValueError(f"frame numbers must lie in [0, {info.n_frames}), got {wanted[0]}..{wanted[-1]}")
    if info.kind == "frames":
        return _read_folder(Path(path), info, wanted, images)
    out = _read_video(Path(path), info, wanted, seek_min_gap, skip_unwanted=True)
    if out.substituted:  # a damaged file: its stand-ins are the frames decoding through gives
        out = _read_video(Path(path), info, wanted, seek_min_gap, skip_unwanted=False)
    return out


def _read_folder(path: Path, info: ClipInfo, wanted: list[int], images: bool = False) -> Frames:
    from PIL import Image, ImageOps

    files = info.files if info.files is not None else _probe_folder(path).files
    out = Frames()
    for i in wanted:
        try:
            with Image.open(path / files[i]) as img:
                img.load()
                ImageOps.exif_transpose(img, in_place=True)  # a copy only when it turns
                if images:
                    out[i] = img
                else:
                    out[i] = np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
        except Exception as err:
            raise ClipError(f"unreadable image {files[i]}: {first_line(err)}") from None
    return out


def _to_rgb(frame, rotation: int) -> np.ndarray:
    rgb = frame.to_ndarray(format="rgb24")  # swscale handles gray, yuv*, 10-bit, palettes
    if rotation:
        rgb = np.ascontiguousarray(np.rot90(rgb, k=rotation // 90))
    return rgb


def decode_stream(container, stream, rank: dict | None, wanted: set, skip_unwanted: bool):
    """container.decode(stream), with the decoder told to skip each unwanted frame that no
    other frame refers to (FFmpeg's skip_frame "NONREF": about half the frames of an H.264
    clip with B-frames, and ones no wanted frame can depend on, so the wanted frames come
    out the same). Only where timestamps number the frames (``rank``)."""
    context = stream.codec_context
    for packet in container.demux(stream):
        if skip_unwanted and rank is not None:
            number = rank.get(packet.pts)
            context.skip_frame = "NONREF" if number is not None and number not in wanted \
                else "DEFAULT"
        yield from packet.decode()


def _read_video(path: Path, info: ClipInfo, wanted: list[int], seek_min_gap: int,
                skip_unwanted: bool = True) -> Frames:
    """``skip_unwanted`` lets the decoder skip unwanted non-reference frames; a wanted frame
    that does not decode then finds fewer frames before it to stand in, so read_frames reads
    a damaged clip again without skipping."""
    import av

    rank = {p: i for i, p in enumerate(info.frame_pts)} if info.frame_pts else None
    keyframes = info.keyframes or [0]
    can_seek = rank is not None
    wanted_set = set(wanted)
    out = Frames()
    try:
        container = av.open(str(path))
    except Exception as err:
        raise ClipError(f"not a video: {first_line(err)}") from None
    with container:
        stream = next((s for s in container.streams.video if s.index == info.stream_index),
                      None)
        if stream is None:
            raise ClipError(f"video stream #{info.stream_index} vanished since the probe")
        frames = None       # the running decode generator
        position = 0        # the number the next decoded frame will have
        previous = None     # (number, frame) last decoded
        for target in wanted:
            if target in out:
                continue
            before = bisect.bisect_right(keyframes, target) - 1
            key = keyframes[before] if before >= 0 else 0
            # Without timestamps a seek would lose the frame numbering: decode through.
            if can_seek and key - position > seek_min_gap:
                try:
                    container.seek(info.frame_pts[key], stream=stream, backward=True)
                    frames, position, previous = None, key, None
                except av.FFmpegError:
                    can_seek = False  # the position is unchanged: decode through from here
            if frames is None:
                frames = decode_stream(container, stream, rank, wanted_set, skip_unwanted)
            ended = True
            try:
                for frame in frames:
                    number = rank.get(frame.pts, position) if rank is not None else position
                    if number in wanted_set and number not in out:
                        out[number] = _to_rgb(frame, info.rotation)
                    if number > target and target not in out:  # the wanted frame never came
                        stand_in = previous if previous is not None else (number, frame)
                        out[target] = out[stand_in[0]] if stand_in[0] in out \
                            else _to_rgb(stand_in[1], info.rotation)
                        out.substituted[target] = stand_in[0]
                    previous, position = (number, frame), number + 1
                    if number >= target:
                        ended = False
                        break
            except (av.FFmpegError, ValueError):
                pass  # damaged data: keep what decoded
            if ended:
                break
    missing = [t for t in wanted if t not in out]
    if missing:  # the stream ended before these: they get the last frame that decoded
        if previous is None and not out:
            raise ClipError("no decodable frame")
        if previous is not None:
            last, rgb = previous[0], out.get(previous[0])
            if rgb is None:
                rgb = _to_rgb(previous[1], info.rotation)
        else:
            last = max(out)
            rgb = out[last]
        for target in missing:
            out[target] = rgb
            out.substituted[target] = out.substituted.get(last, last)
    return out
