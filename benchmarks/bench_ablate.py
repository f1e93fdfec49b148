"""ablate --grid table6 with three seeds on a RAER-sized cache: measured parts, projected total.

A full measurement is tens of hours on a 2-core CPU (36 train-head runs of 20 epochs), so this
script measures what the total is made of, and projects it:

- the train-head step time (at --precision, default auto as ablate passes it: bf16 on a CPU
  with native bf16) of each of Table 6's 12 configurations (n_ctx x temporal layers x
  streams face/both), with random:vit-b-32 (the real ViT-B/32 text tower; CLIP's own BPE, so the
  RAER prompts have their real lengths), batch 8, 16 segments: the median of --steps steps after
  two warm-up steps, the same code as heads/train.py (per-clip dropout, SGD groups);
- one validation pass (216 clips, the default 10% of RAER's 2,160 training clips) and one
  test evaluation (540 clips) of the default configuration, from features in RAM;
- the two baselines (zero-shot, linear-probe) on a synthetic RAER-sized cache (2,160 train +
  540 test clips), through heads/baselines.py as ablate runs them.

Projection: per run, epochs x (ceil(train clips / batch) x step time + validation) + test
evaluation; times the seeds; plus the baselines once. Not included: loading the CLIP and the
feature bank per run (seconds), and anything else the machine does.

Example:
  python benchmarks/bench_ablate.py
  python benchmarks/bench_ablate.py --quick    # random:tiny, small sizes: checks that it runs
"""

from __future__ import annotations

import argparse
import math
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

from cache import build_store_from_arrays, open_store  # noqa: E402
from heads import baselines  # noqa: E402
from heads.ablate import TABLE6  # noqa: E402
from heads.data import split_clips  # noqa: E402
from heads.model import CaerModel, HeadConfig  # noqa: E402
from heads.step import use_sample_dropout  # noqa: E402
from pipeline.clip import build_random_clip  # noqa: E402
from cache.core.labels import RAER5  # noqa: E402
from cache.core.runtime import cpu_has_native_bf16, resolve_precision  # noqa: E402

from bench_head import time_steps  # noqa: E402
from common import environment, write_result  # noqa: E402


@torch.no_grad()
def forward_s(model, clips: int, segments: int, dim: int) -> float:
    """Seconds to score ``clips`` clips as train-head validates (chunks of 256, text once,
    fp32: train-head evaluates in fp32 whatever it trains in)."""
    model.eval()
    started = time.perf_counter()
    text = model.encode_text()
    for i in range(0, clips, 256):
        n = min(256, clips - i)
        model.forward_features(torch.randn(n, segments, dim), torch.randn(n, segments, dim), text)
    return time.perf_counter() - started


def _name(config: dict) -> str:
    return f"ctx{config['n_ctx']}-layers{config['temporal_layers']}-{config['streams']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--clip", default="vit-b-32")
    parser.add_argument("--train-clips", type=int, default=2160)
    parser.add_argument("--test-clips", type=int, default=540)
    parser.add_argument("--segments", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="of the training steps, as ablate passes it to train-head (auto: "
                             "bf16 on a CPU with native bf16, else fp32)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_ablate.json"))
    args = parser.parse_args()
    if args.quick:
        args.clip, args.train_clips, args.test_clips, args.steps = "tiny", 80, 20, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = resolve_precision(args.precision, "cpu")
    result = {"benchmark": "ablate", "quick": args.quick, "clip": f"random:{args.clip}",
              "precision": precision, "native_bf16": cpu_has_native_bf16(),
              **environment(), "load_average_before": os.getloadavg()}
    clip = build_random_clip(args.clip)
    labels_set = RAER5  # random: CLIPs tokenize with CLIP's own BPE: the real prompt lengths
    b, t, d = args.batch_size, args.segments, clip.feature_dim
    labels = torch.arange(b) % len(labels_set)
    features = [torch.randn(b, t, d) for _ in range(2)]
    val_clips = int(round(0.1 * args.train_clips))
    steps_per_epoch = math.ceil((args.train_clips - val_clips) / b)
    configs = []
    for streams in ("face", "both"):
        for n_ctx, layers in TABLE6:
            torch.manual_seed(0)
            model = CaerModel(HeadConfig(segments=t, n_ctx=n_ctx, temporal_layers=layers,
                                         streams=streams), clip, labels_set)
            use_sample_dropout(model)
            steps = time_steps(model, False, *features, labels, args.steps, 2, None, precision)
            step = statistics.median(steps)
            val_s = forward_s(model, val_clips, t, d)
            test_s = forward_s(model, args.test_clips, t, d)
            run_s = args.epochs * (steps_per_epoch * step + val_s) + test_s
            configs.append({"n_ctx": n_ctx, "temporal_layers": layers, "streams": streams,
                            "step_s": steps, "step_s_median": step, "val_s": val_s,
                            "test_s": test_s, "run_s_projected": run_s})
            print(f"ctx{n_ctx}-layers{layers}-{streams}: step {step:.3f} s, val {val_s:.2f} s, "
                  f"test {test_s:.2f} s -> run {run_s / 60:.1f} min (projected)", flush=True)
            del model

    work = Path(tempfile.mkdtemp(prefix="bench_ablate_"))
    try:
        rng = np.random.default_rng(0)
        n = args.train_clips + args.test_clips
        y = rng.choice(5, size=n, p=[0.65, 0.06, 0.02, 0.07, 0.20])
        means = rng.normal(size=(5, d)).astype(np.float32)
        views = {s: (0.3 * means[y][:, None] + rng.normal(size=(n, t, d))).astype(np.float16)
                 for s in ("face", "context")}
        build_store_from_arrays(
            work / "c.zarr", labels=y, splits=["train"] * args.train_clips
            + ["test"] * args.test_clips, **views,
            fingerprint={"clip_spec": f"random:{args.clip}", "clip_revision": clip.revision})
        del views
        store = open_store(work / "c.zarr")
        splits = split_clips(store.manifest, 0.1, 0)
        started = time.perf_counter()
        baselines.zero_shot(store, splits, ["face", "both"])
        zero_shot_s = time.perf_counter() - started
        started = time.perf_counter()
        baselines.linear_probe(store, splits)
        probe_s = time.perf_counter() - started
        store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    runs_s = sum(c["run_s_projected"] for c in configs)
    total_s = args.seeds * runs_s + zero_shot_s + probe_s
    result.update(configs=configs, steps_per_epoch=steps_per_epoch, epochs=args.epochs,
                  seeds=args.seeds, zero_shot_s=zero_shot_s, linear_probe_s=probe_s,
                  one_seed_of_the_grid_s_projected=runs_s, total_s_projected=total_s)
    fastest = min(configs, key=lambda c: c["step_s_median"])
    slowest = max(configs, key=lambda c: c["step_s_median"])
    result["figures"] = [
        {"name": "table6_3_seeds_total_h_projected", "value": round(total_s / 3600, 1),
         "unit": "h", "note": f"PROJECTED from the measured step, validation and test times "
                              f"below: {args.seeds} seeds x 12 configurations x {args.epochs} "
                              f"epochs x {steps_per_epoch} steps, + baselines; not a run"},
        {"name": "step_s_median_fastest", "value": round(fastest["step_s_median"], 3),
         "unit": "s", "note": _name(fastest)},
        {"name": "step_s_median_slowest", "value": round(slowest["step_s_median"], 3),
         "unit": "s", "note": _name(slowest)},
        {"name": "zero_shot_s", "value": round(zero_shot_s, 1), "unit": "s",
         "note": "measured: face and both on the RAER-sized cache"},
        {"name": "linear_probe_s", "value": round(probe_s, 1), "unit": "s",
         "note": f"measured: {len(baselines.PROBE_C)} values of C"},
    ]
    result["load_average_after"] = os.getloadavg()
    print(f"zero-shot {zero_shot_s:.1f} s, linear-probe {probe_s:.1f} s; projected total for "
          f"--grid table6 x {args.seeds} seeds: {total_s / 3600:.1f} h")
    print(f"wrote {write_result(result, args.out)}")


if __name__ == "__main__":
    main()
