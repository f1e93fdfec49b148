"""extract's per-clip time split into its stages (bench_extract.py, part "breakdown").

Each stage runs alone, in this process, on one RAER-like clip with extract's default options
(16 segments, K=1, no flip, BlazeFace full range, squash face crops, batch 64, --precision
auto), through the pipeline's public functions, as a worker runs them now:

  probe       pipeline.video.probe_clip (one pass: demux, the first frame decoded on the way)
  decode      JPEG: read_frames(images=True), PIL decoding (libjpeg converts to RGB as it
              decodes: no colour stage of its own), EXIF transpose, one crops.Frame each;
              H.264: PyAV decoding straight through to the last kept frame, the decoder
              skipping the unwanted frames no other frame refers to
  colour      JPEG: 0 (inside decode); H.264: frame.to_ndarray("rgb24") (swscale), kept
              frames only
  detection   FaceDetector.detect on each kept frame's array (Frame.array: for a JPEG that
              is where the frame first becomes an array)
  face crop   pipeline.crops.face_crop of the Frame (box grown by 20 px, bicubic to 224x224;
              without a face the whole frame) with extract's default --downscale fast;
              "exact:" the same with --downscale exact, whose whole-frame resizes share
              their horizontal pass with the letterbox's
  letterbox   pipeline.crops.letterbox of the same Frame (the whole frame to 224x224)
  queueing    the worker's result (4.8 MB of crops) sent to another process over a real pipe
              and back, halved: pickling, the copy through the kernel, unpickling
  encoding    pipeline.encode.BatchEncoder, batches of 64 = two clips' 32 crops, per clip
  writing     cache.StoreWriter.write_clip of the clip's features into a fresh store (the
              writer keeps its arrays open; "before:" each opened afresh, as fa81252 did)

It also times two levers it does not take (detecting on a 2x reduced frame, and for
JPEG frames DCT-scaled decoding at 1/2): what each would save per clip, "levers_not_taken".

The same run times the code before issue 17's CPU-side change (caer-kit fa81252) on the same
clip, stage by stage ("before" below): the probe opening the file twice (a copy of that code
is kept here as the reference), every frame of a video decoded, JPEG frames transposed,
converted and copied to arrays (read_folder_before, a copy of that code), and the crops cut
from those arrays, each handed to PIL again.
fa81252 and --downscale exact give the same bytes (checked here on every frame, and in
tests/test_crops.py, tests/test_video.py); --downscale fast's differ by the grey levels
reported ("fast_vs_exact_grey_levels").

"decode + colour" is checked against pipeline.video.read_frames, and the CPU stages against
pipeline.prepare.prepare_clip (what a worker runs), both timed whole. Medians of --repeats.
The CPU side is everything but encoding: what a GPU machine still does on its cores.
"""

from __future__ import annotations

import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

# Published throughput of CLIP ViT-B/32's image tower (quick-GELU, as OpenAI's), AMP, batch
# 1024, RTX 4090: timm's results/benchmark-infer-amp-nchw-pt240-cu124-rtx4090.csv, row
# vit_base_patch32_clip_quickgelu_224. No H100 row is published there; an H100 is faster (dense
# bf16 tensor peak 989 TFLOPS SXM against the 4090's 165 with fp32 accumulation), so this is a
# floor for it.
PUBLISHED_ENCODER_IMAGES_PER_S = 8389.12
PUBLISHED_ENCODER_SOURCE = ("timm results/benchmark-infer-amp-nchw-pt240-cu124-rtx4090.csv, "
                            "vit_base_patch32_clip_quickgelu_224 (RTX 4090, AMP, batch 1024)")
PROJECTED_CORES = 16
CPU_STAGES = ("probe", "decode", "colour", "detection", "face crop", "letterbox", "queueing",
              "writing")


def h264_clip(path: Path, frames: int = 75, size=(1080, 1920), photo: float = 0.37) -> Path:
    """A 1080p H.264 clip (libx264, yuv420p, 25 fps) of the astronaut photo moving over a
    noisy background, as raer_like_clips draws its JPEG frames (``photo``: its height as a
    fraction of the frame's; at 0.9 BlazeFace finds its face)."""
    import av
    from PIL import Image
    from skimage import data

    h, w = size
    side = int(h * photo)
    face = np.asarray(Image.fromarray(data.astronaut()).resize((side, side)))
    rng = np.random.default_rng(0)
    background = np.kron(rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8),
                         np.ones((16, 16, 1), np.uint8))
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            frame = background.copy()
            y = int(h * 0.28) + i * h // 1500 if photo < 0.6 else (h - side) // 4
            x = int(w * 0.36) + i * w // 1000
            frame[y:y + side, x:x + side] = face
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _decode_split(path: Path, info, wanted: list[int],
                  skip_unwanted: bool = True) -> tuple[float, float, dict]:
    """(decode s, colour s, {number: Frame}) of the kept frames, as a worker reads them;
    ``skip_unwanted=False``: a video decoded as fa81252 did, every frame."""
    from pipeline.crops import Frame
    from pipeline.video import decode_stream

    if info.kind == "frames":
        from pipeline.video import read_frames

        t0 = time.perf_counter()
        images = read_frames(path, wanted, info, images=True)
        out = {n: Frame(image) for n, image in images.items()}
        return time.perf_counter() - t0, 0.0, out
    import av

    decode = colour = 0.0
    out, wanted_set = {}, set(wanted)
    rank = {p: i for i, p in enumerate(info.frame_pts)}
    with av.open(str(path)) as container:
        stream = next(s for s in container.streams.video if s.index == info.stream_index)
        frames = decode_stream(container, stream, rank, wanted_set, skip_unwanted)
        while len(out) < len(wanted_set):
            t0 = time.perf_counter()
            frame = next(frames)
            t1 = time.perf_counter()
            decode += t1 - t0
            number = rank[frame.pts]
            if number in wanted_set:
                out[number] = Frame(frame.to_ndarray(format="rgb24"))
                colour += time.perf_counter() - t1
    return decode, colour, out


def read_folder_before(path: Path, info, wanted: list[int]) -> dict:
    """A folder's kept frames as caer-kit fa81252 read them (the reference "before"): EXIF
    transposed (a copy), converted to RGB (a copy) and made an array."""
    from PIL import Image, ImageOps

    out = {}
    for i in wanted:
        with Image.open(path / info.files[i]) as img:
            out[i] = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    return out


def probe_before(path: Path):
    """The probe of caer-kit fa81252, kept as the reference "before": it demuxed every
    packet, then opened the file afresh to decode its first frame for the size and rotation."""
    import av

    from pipeline.video import ClipError, choose_stream

    container = av.open(str(path))
    stream = choose_stream(container.streams.video)
    with container:
        pts = [p.pts for p in container.demux(stream) if p.size and not p.is_discard]
    container = av.open(str(path))
    stream = choose_stream(container.streams.video)
    with container:
        first = next(iter(container.decode(stream)), None)
    if not pts or first is None:
        raise ClipError("no decodable frame")
    return len(pts), first.width, first.height, int(round((first.rotation or 0) / 90)) % 4 * 90


def _echo(conn) -> None:
    while True:
        payload = conn.recv()
        if payload is None:
            return
        conn.send(payload)


def _pipe_seconds(payload, repeats: int) -> float:
    """Median one-way seconds of ``payload`` between two processes (a round trip, halved)."""
    parent, child = multiprocessing.get_context("spawn").Pipe()
    process = multiprocessing.get_context("spawn").Process(target=_echo, args=(child,))
    process.start()
    try:
        times = []
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            parent.send(payload)
            parent.recv()
            if i:
                times.append((time.perf_counter() - t0) / 2)
        parent.send(None)
    finally:
        process.join(10)
    return statistics.median(times)


def _alternatives(path: Path, info, wanted: list[int], frames: dict, detector, record) -> None:
    """Two levers issue 17 lists that caer-kit does not take, timed on the same kept frames:
    detecting on the frame box-reduced 2x (the reduction counted; boxes mapped back would
    be 2x coarser), and, for JPEG frames, libjpeg's DCT-scaled decoding at 1/2 size (a face
    crop would still need the full frame, so a frame would be decoded twice)."""
    from PIL import Image

    t0 = time.perf_counter()
    found = 0
    for number in wanted:
        small = np.asarray(frames[number].image.reduce(2))
        found += detector.detect(small).box is not None
    record("alt: detection on a 2x reduced frame", time.perf_counter() - t0)
    record("_alt: faces found on a 2x reduced frame", found)
    if info.kind != "frames":
        return
    t0 = time.perf_counter()
    for number in wanted:
        with Image.open(path / info.files[number]) as image:
            image.draft("RGB", (image.width // 2, image.height // 2))
            image.convert("RGB").load()
    record("alt: decode, DCT-scaled to 1/2", time.perf_counter() - t0)


def stages(clip_path: Path, *, clip_spec: str, precision: str, repeats: int) -> dict:
    """Median seconds per clip of each stage, and the whole-worker and read_frames checks."""
    from cache import ClipResult, ClipRow, StoreWriter, make_fingerprint
    from cache.writer import create_zarr
    from pipeline.clip import load_clip
    from cache.core.runtime import resolve_precision
    from pipeline.config import ExtractConfig
    from pipeline.crops import Frame, face_crop, letterbox
    from pipeline.encode import BatchEncoder
    from pipeline.faces import FaceDetector
    from cache.core.labels import load_label_set
    from pipeline.prepare import ClipTask, prepare_clip
    from pipeline.video import probe_clip, read_frames, sample_indices

    cfg = ExtractConfig().resolved()  # the default preset's choices filled in
    precision = resolve_precision(cfg.precision if precision == "auto" else precision, "cpu")
    times: dict[str, list[float]] = {}

    def record(name, seconds):
        times.setdefault(name, []).append(seconds)

    detector = FaceDetector(cfg.face_model, cfg.min_face_score)
    detector.detect(np.zeros((64, 64, 3), np.uint8))  # the model loads on the first call
    for _ in range(repeats):
        t0 = time.perf_counter()
        info = probe_clip(clip_path)
        record("probe", time.perf_counter() - t0)
        if info.kind == "video":
            t0 = time.perf_counter()
            probe_before(Path(clip_path))
            record("before: probe", time.perf_counter() - t0)
        else:
            record("before: probe", times["probe"][-1])  # unchanged for a folder
        indices = sample_indices(info.n_frames, cfg.segments, cfg.candidates)
        wanted = sorted({int(i) for i in indices.reshape(-1)})
        decode, colour, frames = _decode_split(Path(clip_path), info, wanted)
        record("decode", decode)
        record("colour", colour)
        t0 = time.perf_counter()
        read_frames(clip_path, indices, info, images=True)
        record("decode + colour, as read_frames", time.perf_counter() - t0)
        if info.kind == "frames":  # fa81252: decoded, converted and copied to an array
            t0 = time.perf_counter()
            arrays = read_folder_before(Path(clip_path), info, wanted)
            record("before: decode", time.perf_counter() - t0)
            record("before: colour", 0.0)
        else:  # fa81252 decoded every frame
            arrays = read_frames(clip_path, indices, info)
            old_decode, old_colour, _ = _decode_split(Path(clip_path), info, wanted, False)
            record("before: decode", old_decode)
            record("before: colour", old_colour)
        boxes, seconds, old_seconds = {}, 0.0, 0.0
        for number in wanted:
            t0 = time.perf_counter()
            boxes[number] = detector.detect(frames[number].array).box
            t1 = time.perf_counter()
            detector.detect(np.ascontiguousarray(arrays[number][:, :, :3]))
            seconds, old_seconds = seconds + t1 - t0, old_seconds + time.perf_counter() - t1
        record("detection", seconds)
        record("before: detection", old_seconds)
        # The default crops (--downscale fast), the --downscale exact ones from a Frame made as
        # the worker makes it, and fa81252's (exact) from its arrays: exact must equal fa81252.
        exact_frames = {n: Frame(f.image if info.kind == "frames" else f.array)
                        for n, f in frames.items()}
        spent = dict.fromkeys(("face crop", "letterbox", "exact: face crop", "exact: letterbox",
                               "before: face crop", "before: letterbox"), 0.0)
        diffs = []
        for number in wanted:
            box = boxes[number]
            t = [time.perf_counter()]
            face = face_crop(frames[number], box, cfg.face_margin, 224, cfg.face_resize,
                             cfg.downscale)
            t.append(time.perf_counter())
            context = letterbox(frames[number], 224, cfg.downscale)
            t.append(time.perf_counter())
            exact_face = face_crop(exact_frames[number], box, cfg.face_margin, 224,
                                   cfg.face_resize, "exact")
            t.append(time.perf_counter())
            exact_context = letterbox(exact_frames[number], 224, "exact")
            t.append(time.perf_counter())
            old_face = face_crop(arrays[number], box, cfg.face_margin, 224, cfg.face_resize)
            t.append(time.perf_counter())
            old_context = letterbox(arrays[number], 224)
            t.append(time.perf_counter())
            if not (np.array_equal(exact_face, old_face)
                    and np.array_equal(exact_context, old_context)):
                raise RuntimeError(f"frame {number} of {clip_path}: the --downscale exact crops "
                                   f"differ from fa81252's")
            for name, t0, t1 in zip(spent, t, t[1:]):
                spent[name] += t1 - t0
            diffs += [np.abs(face.astype(np.int16) - exact_face),
                      np.abs(context.astype(np.int16) - exact_context)]
        for name, seconds in spent.items():
            record(name, seconds)
        record("_faces found", sum(b is not None for b in boxes.values()))
        record("_fast vs exact: max grey levels", max(int(d.max()) for d in diffs))
        record("_fast vs exact: mean grey levels", float(np.mean([d.mean() for d in diffs])))
        _alternatives(Path(clip_path), info, wanted, frames, detector, record)
    detector.close()
    task = ClipTask(index=0, path=str(clip_path), segments=cfg.segments,
                    candidates=cfg.candidates, listed_frames=-1, boxes=None,
                    face_model=cfg.face_model, min_face_score=cfg.min_face_score,
                    image_size=224, face_margin=cfg.face_margin, face_resize=cfg.face_resize,
                    downscale=cfg.downscale)
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = prepare_clip(task)
        record("worker total, as prepare_clip", time.perf_counter() - t0)
    if result.status != "ok":
        raise RuntimeError(f"prepare_clip failed on {clip_path}: {result.reason}")
    times["queueing"] = [_pipe_seconds(result, repeats)]

    clip = load_clip(clip_spec)
    images = np.concatenate([result.face.reshape(-1, 224, 224, 3),
                             result.context.reshape(-1, 224, 224, 3)])
    encoder = BatchEncoder(clip, cfg.batch_size, cfg.normalize, "cpu", precision)
    per_batch = max(1, cfg.batch_size // len(images))  # clips in one encoder batch
    for i in range(repeats + 1):
        for _ in range(per_batch):
            encoder.add({"result": result, "images": images,
                         "features": np.empty((len(images), clip.feature_dim), np.float16)})
        t0 = time.perf_counter()
        done = encoder.run(final=True)
        if i:  # the first batch warms up
            record("encoding", (time.perf_counter() - t0) / len(done))

    fp = make_fingerprint(clip_spec=clip_spec, clip_revision=clip.revision,
                          feature_dim=clip.feature_dim, image_size=224, segments=cfg.segments,
                          candidates=cfg.candidates, flip=cfg.flip, pixels=cfg.pixels,
                          normalize=cfg.normalize, face_model=cfg.face_model,
                          face_margin=cfg.face_margin, min_face_score=cfg.min_face_score,
                          face_resize=cfg.face_resize, face_boxes=None,
                          labels=load_label_set(cfg.labels), downscale=cfg.downscale)
    features = np.zeros((cfg.segments, cfg.candidates, clip.feature_dim), np.float16)
    clip_result = ClipResult("ok", n_frames=result.n_frames, fps=result.fps,
                             width=result.width, height=result.height,
                             frame_index=result.frame_index, box=result.box,
                             score=result.score, found=result.found,
                             features={"face": features, "context": features})
    with tempfile.TemporaryDirectory(prefix="breakdown_store_") as directory:
        store = Path(directory) / "s.zarr"
        rows = [ClipRow(f"c{i}", f"c{i}", 0, "train") for i in range(2 * repeats)]
        create_zarr(store, fp, rows, [])
        writer = StoreWriter(store)
        for i in range(repeats):
            t0 = time.perf_counter()
            writer.write_clip(2 * i, clip_result)
            t1 = time.perf_counter()
            # fa81252 opened every array afresh (reading its metadata) for every clip it wrote:
            # the writer's open arrays dropped, each is opened once in this write, as then
            writer._handles.clear()
            writer.write_clip(2 * i + 1, clip_result)
            record("writing", t1 - t0)
            record("before: writing", time.perf_counter() - t1)
        writer.close()
    median = {name: statistics.median(v) for name, v in times.items()}
    median["_downscale"] = cfg.downscale
    median["_precision"] = precision
    median["_kept"] = len(wanted)
    return median


def summarise(kind: str, s: dict) -> dict:
    """Shares, the CPU side's clips/s per core, and the paper projection; the same share
    with the stages fa81252 timed in this run ("before")."""
    cpu = sum(s[name] for name in CPU_STAGES)
    before = sum(s.get(f"before: {name}", s[name]) for name in CPU_STAGES)
    exact = sum(s.get(f"exact: {name}", s[name]) for name in CPU_STAGES)
    total = cpu + s["encoding"]
    alternatives = {"detection on a 2x reduced frame, saves": s["detection"]
                    - s["alt: detection on a 2x reduced frame"],
                    "faces found on a 2x reduced frame": s["_alt: faces found on a 2x reduced "
                                                           "frame"]}
    if "alt: decode, DCT-scaled to 1/2" in s:
        alternatives["decode DCT-scaled to 1/2, saves"] = (
            s["decode"] - s["alt: decode, DCT-scaled to 1/2"])
    alternatives = {k: round(v, 5) if "saves" in k else v for k, v in alternatives.items()}
    per_core = 1 / cpu
    cpu_16 = PROJECTED_CORES * per_core
    encoder_clips = PUBLISHED_ENCODER_IMAGES_PER_S / 32  # 16 face + 16 context crops a clip
    return {"kind": kind, "precision": s["_precision"],
            "stages_s": {k: round(v, 5) for k, v in s.items() if not k.startswith("_")},
            "downscale": s["_downscale"],
            "cpu_side_s": round(cpu, 4), "encoder_share_serial": round(s["encoding"] / total, 3),
            "cpu_side_for_share_0.8_s": round(s["encoding"] / 4, 4),
            "exact_cpu_side_s": round(exact, 4),
            "exact_encoder_share_serial": round(s["encoding"] / (exact + s["encoding"]), 3),
            "fast_vs_exact_grey_levels": {"max": s["_fast vs exact: max grey levels"],
                                          "mean": round(s["_fast vs exact: mean grey levels"], 3)},
            "levers_not_taken": alternatives,
            "before_cpu_side_s": round(before, 4),
            "faces_found": f"{s['_faces found']:.0f} of {s['_kept']} kept frames",
            "before_encoder_share_serial": round(s["encoding"] / (before + s["encoding"]), 3),
            "cpu_side_clips_per_s_per_core": round(per_core, 3),
            "projection": {"cores": PROJECTED_CORES,
                           "cpu_side_clips_per_s": round(cpu_16, 1),
                           "encoder_clips_per_s_published_floor": round(encoder_clips, 1),
                           "encoder_source": PUBLISHED_ENCODER_SOURCE,
                           "bottleneck": "CPU side" if cpu_16 < encoder_clips else "encoder",
                           "encoder_busy_fraction": round(min(1.0, cpu_16 / encoder_clips), 3)}}


def figures(breakdowns: list[dict]) -> list[dict]:
    out = []
    for b in breakdowns:
        name = f"extract breakdown, {b['kind']}, {b['precision']}"
        for stage in CPU_STAGES[:6] + ("queueing", "encoding", "writing"):
            out.append({"name": f"{name}: {stage}", "value": round(b["stages_s"][stage] * 1e3, 1),
                        "unit": "ms/clip"})
        out.append({"name": f"{name}: encoder share of the serial per-clip time",
                    "value": b["encoder_share_serial"], "unit": "fraction", "goal": ">= 0.8",
                    "met": b["encoder_share_serial"] >= 0.8,
                    "note": f"a share of 0.8 needs a CPU side of at most "
                            f"{1e3 * b['cpu_side_for_share_0.8_s']:.0f} ms (a quarter of this "
                            f"encoding time); it is {1e3 * b['cpu_side_s']:.0f} ms"})
        grey = b["fast_vs_exact_grey_levels"]
        out.append({"name": f"{name}: CPU side, fa81252 -> --downscale exact -> --downscale "
                            f"fast (the default), same run", "unit": "ms/clip",
                    "value": f"{1e3 * b['before_cpu_side_s']:.0f} -> "
                             f"{1e3 * b['exact_cpu_side_s']:.0f} -> {1e3 * b['cpu_side_s']:.0f}",
                    "note": f"encoder share {b['before_encoder_share_serial']} -> "
                            f"{b['exact_encoder_share_serial']} -> {b['encoder_share_serial']}; "
                            f"a face found in {b['faces_found']}; fast vs exact crops: max "
                            f"{grey['max']}, mean {grey['mean']} grey levels"})
        for lever, value in b["levers_not_taken"].items():
            out.append({"name": f"{name}: not taken: {lever}", "value":
                        round(value * 1e3, 1) if "saves" in lever else value,
                        "unit": "ms/clip" if "saves" in lever else "of the kept frames"})
        p = b["projection"]
        out.append({"name": f"{name}: CPU side clips/s per core", "unit": "clips/s",
                    "value": b["cpu_side_clips_per_s_per_core"]})
        out.append({"name": f"{name}: PROJECTION, {p['cores']} cores + H100: CPU side clips/s "
                            f"(encoder >= {p['encoder_clips_per_s_published_floor']} clips/s "
                            f"published)", "unit": "clips/s", "value": p["cpu_side_clips_per_s"],
                    "note": f"paper projection: {p['cores']} x the per-core rate measured here; "
                            f"encoder from {p['encoder_source']}, a floor for an H100; the "
                            f"{p['bottleneck']} sets the throughput, the encoder busy "
                            f"{100 * p['encoder_busy_fraction']:.0f}% of the time"})
    return out
