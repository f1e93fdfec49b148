"""explain: the time to explain one clip with ViT-B/32 shapes (goal: at most 30 s on a CPU).

A train-head run on random:vit-b-32 (the real ViT-B/32 shapes; 16 segments, both streams) is
saved, and a one-clip cache with stored crops is written. Then, in this process:
- ``explain_clip`` alone (Grad-CAM of both streams, temporal attention, probabilities) on
  that clip, timed --repeats times after one warm-up, each right before a no-grad forward
  pass of the same clip (the floor: explain must run that forward), so that their ratio holds
  on a busy machine;
- the whole ``explain`` command for that clip: load the run, read the crops, explain, write
  the .npz, the PNG, index.csv and index.html.

Example:
  python benchmarks/bench_explain.py            # ViT-B/32 shapes
  python benchmarks/bench_explain.py --quick    # random:tiny, checks that it runs
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cache import build_store_from_arrays  # noqa: E402
from heads.config import ExplainConfig  # noqa: E402
from heads.explain import explain, explain_clip  # noqa: E402
from heads.model import CaerModel, HeadConfig  # noqa: E402
from heads.run import load_run, save_run  # noqa: E402
from pipeline.clip import build_random_clip  # noqa: E402
from cache.core.labels import RAER5  # noqa: E402

from common import environment, write_result  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="random:tiny, 4 segments")
    parser.add_argument("--clip", default="vit-b-32")
    parser.add_argument("--segments", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"
                                             / "bench_explain.json"))
    args = parser.parse_args()
    if args.quick:
        args.clip, args.segments, args.repeats = "tiny", 4, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"benchmark": "explain", "quick": args.quick, "clip": f"random:{args.clip}",
              "segments": args.segments, **environment(), "load_average_before": os.getloadavg()}
    work = Path(tempfile.mkdtemp(prefix="bench_explain_"))
    try:
        clip = build_random_clip(args.clip)
        torch.manual_seed(0)
        model = CaerModel(HeadConfig(segments=args.segments), clip, RAER5)
        # The CLIP is rebuilt from its spec when the run loads (save_clip=False), as for a
        # run on a hub CLIP; random: shapes build deterministically.
        run = save_run(work / "run", model, kind="train-head", train_options={},
                       cache_fingerprint=None, save_clip=False,
                       preprocessing={"segments": args.segments})
        rng = np.random.default_rng(0)
        crops = {s: rng.integers(0, 256, (1, args.segments, 1, 3, 224, 224), dtype=np.uint8)
                 for s in ("face", "context")}
        features = np.zeros((1, args.segments, 1, clip.feature_dim), np.float16)
        build_store_from_arrays(work / "c.zarr", face=features, context=features, labels=[0],
                                splits="test", pixels_face=crops["face"],
                                pixels_context=crops["context"],
                                fingerprint={"clip_spec": f"random:{args.clip}",
                                             "clip_revision": clip.revision})
        model = load_run(run)
        face, context = (c[0, :, 0].transpose(0, 2, 3, 1) for c in crops.values())
        times, forward = [], []
        pixels = [torch.from_numpy(c[0, :, 0])[None].float().div(255) for c in crops.values()]
        with torch.no_grad():
            text = model.encode_text()
        for i in range(args.repeats + 1):
            started = time.perf_counter()
            explain_clip(model, face, context, text_features=text)
            middle = time.perf_counter()
            with torch.no_grad():  # the same clip through the model, no gradient: the floor
                model.forward_pixels(*pixels, text)
            if i:  # the first is a warm-up
                times.append(middle - started)
                forward.append(time.perf_counter() - middle)
        del model
        started = time.perf_counter()
        explain(ExplainConfig(run=str(run), cache=str(work / "c.zarr"), split="test",
                              out=str(work / "cams")), progress=False)
        command_s = time.perf_counter() - started
    finally:
        shutil.rmtree(work, ignore_errors=True)
    median = statistics.median(times)
    ratio = statistics.median(t / f for t, f in zip(times, forward))
    result.update(explain_clip_s=times, explain_clip_s_median=median, forward_s=forward,
                  explain_over_forward_median=ratio,
                  explain_command_one_clip_s=command_s)
    result["figures"] = [
        {"name": "explain_clip_s", "value": round(median, 2), "unit": "s", "goal": "<= 30",
         "met": median <= 30 if not args.quick else None,
         "note": f"median of {len(times)} after a warm-up; Grad-CAM of both streams "
                 f"({args.segments} frames each) + attention"},
        {"name": "explain_over_forward", "value": round(ratio, 2), "unit": "x",
         "note": "explain_clip against a no-grad forward of the same clip, each pair timed "
                 "back to back (median of the ratios): robust to the machine's load"},
        {"name": "explain_command_one_clip_s", "value": round(command_s, 2), "unit": "s",
         "goal": "<= 30", "met": command_s <= 30 if not args.quick else None,
         "note": "the whole command for one clip: load the run (builds the CLIP), read the "
                 "crops, explain, write npz + PNG + index"},
    ]
    result["load_average_after"] = os.getloadavg()
    print(f"explain / forward: {ratio:.2f} x; explain_clip: median {median:.2f} s ({', '.join(f'{t:.2f}' for t in times)}); "
          f"whole command for one clip: {command_s:.2f} s")
    print(f"wrote {write_result(result, args.out)}")


if __name__ == "__main__":
    main()
