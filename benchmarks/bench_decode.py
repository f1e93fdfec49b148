"""When does seeking to a keyframe beat decoding straight through? (pipeline/video.py)

Writes two synthetic H.264 clips (moving blocky texture, B-frames, 1920x1080 by default):
  long_gop:     300 frames, a keyframe every 30
  one_keyframe: 300 frames, a single keyframe (nothing to seek to)
and measures, best of --repeats:
  - probing and decoding every frame (no RGB conversion): the cost of one frame;
  - read_frames for the 16 middle frames (K=1) and 16x3 candidates with the seek threshold at
    0 (always seek), the default SEEK_MIN_GAP and infinity (never seek). On one_keyframe the
    three must cost the same: their spread is the machine's noise;
  - on long_gop, the extra time to reach a keyframe after reading the frame g+1 frames before
    it, by seeking and by decoding through. The crossover is the smallest g from which seeking
    wins; seek_cost_frames is a seek's fixed cost in frame decodes. SEEK_MIN_GAP comes from it.

    python benchmarks/bench_decode.py                 # 1920x1080, writes benchmarks/results/bench_decode.json
    python benchmarks/bench_decode.py --size 640x360 --repeats 5
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.video import SEEK_MIN_GAP, probe_clip, read_frames, sample_indices  # noqa: E402
from common import write_result  # noqa: E402  (benchmarks/common.py)


def write_clip(path: Path, n: int, width: int, height: int, gop: int) -> Path:
    import av

    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    texture = np.kron(texture, np.ones((8, 8, 1), np.uint8))  # blocky: compressible, not trivial
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23",
                          "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"}
        for i in range(n):
            frame = np.roll(texture, shift=(i * 3, i * 5), axis=(0, 1))
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def decode_first(path: Path, count: int, seek_pts=None) -> None:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if seek_pts is not None:
            container.seek(seek_pts, stream=stream, backward=True)
        for i, _ in enumerate(container.decode(stream)):
            if i + 1 >= count:
                break


def bench_clip(path: Path, repeats: int) -> dict:
    info = probe_clip(path)
    probe_s = best_of(lambda: probe_clip(path), repeats)
    n = info.n_frames
    decode_all = best_of(lambda: decode_first(path, n), repeats)
    per_frame = decode_all / n
    result = {"n_frames": n, "keyframes": len(info.keyframes), "probe_s": probe_s,
              "decode_all_s": decode_all, "decode_per_frame_ms": per_frame * 1e3}
    if len(info.keyframes) > 1:
        # After reading frame key-g-1, fetch keyframe `key`: decoding through costs g+1 frames,
        # seeking costs a seek plus one frame. Each is timed net of reading frame key-g-1 alone.
        key = info.keyframes[len(info.keyframes) // 2]
        sweep = {}
        for g in (1, 2, 3, 4, 6, 8, 16, 28):
            if key - g - 1 < 0:
                continue
            row = {}
            for label, gap in (("seek", 0), ("through", 10**9)):
                base = best_of(lambda: read_frames(path, [key - g - 1], info, seek_min_gap=gap), repeats)
                both = best_of(lambda: read_frames(path, [key - g - 1, key], info, seek_min_gap=gap), repeats)
                row[f"{label}_extra_ms"] = (both - base) * 1e3
            sweep[g] = row
        result["gap_sweep"] = sweep
        # The crossover: the smallest g from which seeking wins at every larger g measured.
        crossover = None
        for g in sorted(sweep, reverse=True):
            if sweep[g]["seek_extra_ms"] >= sweep[g]["through_extra_ms"]:
                break
            crossover = g
        result["crossover_frames"] = crossover
        # A seek's fixed cost in frame decodes: (seek + 1 frame) minus 1 frame.
        result["seek_cost_frames"] = sweep[1]["seek_extra_ms"] / (per_frame * 1e3) - 1
    for k in (1, 3):
        wanted = sample_indices(n, 16, k).reshape(-1)
        for label, gap in (("always_seek", 0), (f"default_gap_{SEEK_MIN_GAP}", SEEK_MIN_GAP),
                           ("never_seek", 10**9)):
            result[f"read_K{k}_{label}_s"] = best_of(
                lambda: read_frames(path, wanted, info, seek_min_gap=gap), repeats)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1920x1080")
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--gop", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_decode.json"))
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))

    results = {"size": args.size, "frames": args.frames, "gop": args.gop, "clips": {}}
    with tempfile.TemporaryDirectory() as tmp:
        clips = {"long_gop": write_clip(Path(tmp) / "long.mp4", args.frames, width, height, args.gop),
                 "one_keyframe": write_clip(Path(tmp) / "short.mp4", args.frames, width, height,
                                            args.frames + 1)}
        for name, path in clips.items():
            results["clips"][name] = bench_clip(path, args.repeats)

    out = write_result(results, args.out)
    keys = sorted({k for r in results["clips"].values() for k in r if k != "gap_sweep"})
    print(f"{'metric':32s}" + "".join(f"{name:>16s}" for name in results["clips"]))
    for key in keys:
        row = [results["clips"][name].get(key) for name in results["clips"]]
        print(f"{key:32s}" + "".join(f"{v:16.4g}" if v is not None else f"{'-':>16s}" for v in row))
    sweep = results["clips"]["long_gop"].get("gap_sweep", {})
    if sweep:
        print("\nlong_gop: extra ms to reach the next keyframe after reading the frame g+1 before it")
        print(f"{'g (frames skipped)':>20s}{'seek':>10s}{'through':>10s}")
        for g, row in sweep.items():
            print(f"{g:>20d}{row['seek_extra_ms']:10.2f}{row['through_extra_ms']:10.2f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
