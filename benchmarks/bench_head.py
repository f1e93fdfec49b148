"""train-head against end-to-end training, and a full 20-epoch train-head on a RAER-sized cache.

Part 1, per-epoch time: a train-head step (cached features [8, 16, 512] per stream -> temporal
transformers, fusion, prompts through the frozen text tower, backward, SGD) against an
end-to-end step on the same batch (crops [8, 16, 3, 224, 224] per stream through the trainable
CLIP image encoder as well), both with random:vit-b-32 (the real ViT-B/32 shapes) and the same
code as heads/train.py (per-clip dropout, SGD groups). Each is timed over a few steps after a
warm-up and EXTRAPOLATED to an epoch of ceil(2160 / 8) = 270 steps; an end-to-end epoch on this
CPU takes hours, so it is not run whole. Data loading is left out of both (train-head indexes
RAM; end-to-end would also decode and augment crops).

Part 2, a real run: `python cli.py train-head` (the default recipe: 20 epochs, batch 8) in a
fresh process on a synthetic RAER-sized cache (2,160 train + 540 test clips, 16 segments, 512-d
features) whose fingerprint names random:vit-b-32, so the run loads and runs that text tower.
Wall time and the process's peak RSS are measured from outside (wait4).

Prompt length: random: CLIPs tokenize with CLIP's own BPE, so the RAER prompts end where the
original's do (EOT at positions 33, 32, 36, 36, 37) and the text tower does the real model's work.

Example:
  python benchmarks/bench_head.py                 # both parts (the 20-epoch run is long)
  python benchmarks/bench_head.py --quick         # smoke test: random:tiny, tiny sizes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cache import build_store_from_arrays  # noqa: E402
from heads.model import CaerModel, HeadConfig  # noqa: E402
from cache.core.runtime import autocast as autocast_for  # noqa: E402
from heads.step import StepModel, sample_dropout, use_sample_dropout  # noqa: E402
from pipeline.clip import build_random_clip  # noqa: E402
from cache.core.runtime import resolve_precision  # noqa: E402
from cache.core.labels import RAER5  # noqa: E402

from common import environment, write_result  # noqa: E402  (benchmarks/common.py)


def time_steps(model, pixels: bool, face, context, labels, steps: int, warmup: int,
               lr_image_encoder: float | None, precision: str = "fp32") -> list[float]:
    groups = model.param_groups(1e-2, 1e-3, 1e-5, lr_image_encoder)
    optimizer = torch.optim.SGD(groups, lr=1e-2, momentum=0.9, weight_decay=1e-4)
    step_model = StepModel(model, pixels).train()
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        with autocast_for(face.device, precision), sample_dropout(model, 0, 0, range(len(labels))):
            loss = torch.nn.functional.cross_entropy(step_model(face, context).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def per_epoch(args, device) -> dict:
    clip = build_random_clip(args.clip)
    labels_set = RAER5
    torch.manual_seed(0)
    model = CaerModel(HeadConfig(segments=args.segments), clip, labels_set).to(device)
    use_sample_dropout(model)
    b, t = args.batch_size, args.segments
    labels = (torch.arange(b) % len(labels_set)).to(device)
    features = [torch.randn(b, t, clip.feature_dim, device=device) for _ in range(2)]
    precision = resolve_precision(args.precision, device.type)  # as train-head resolves it
    head = time_steps(model, False, *features, labels, args.head_steps, 2, None, precision)
    if args.skip_e2e:
        e2e = [float("nan")]
    else:
        crops = [torch.rand(b, t, 3, clip.image_size, clip.image_size, device=device)
                 for _ in range(2)]
        e2e = time_steps(model, True, *crops, labels, args.e2e_steps, 1, 1e-5)
    steps_per_epoch = math.ceil(args.train_clips / b)
    head_s, e2e_s = statistics.median(head), statistics.median(e2e)
    return {
        "clip": f"random:{args.clip}", "batch_size": b, "segments": t, "precision": precision,
        "steps_per_epoch": steps_per_epoch, "head_step_s": head, "e2e_step_s": e2e,
        "head_step_s_median": head_s, "e2e_step_s_median": e2e_s,
        "head_epoch_s_extrapolated": head_s * steps_per_epoch,
        "e2e_epoch_s_extrapolated": e2e_s * steps_per_epoch,
        "speedup": e2e_s / head_s,
        "prompt_eot_positions": [int(p) for p in model.prompt_learner.eot_positions],
    }


def _vm_hwm_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:  # the process just ended
        pass
    return 0


def full_run(args, workdir: Path) -> dict:
    clip = build_random_clip(args.clip)
    rng = np.random.default_rng(0)
    n = args.train_clips + args.test_clips
    labels = rng.choice(5, size=n, p=[0.65, 0.06, 0.02, 0.07, 0.20])  # RAER-like skew
    means = rng.normal(size=(5, clip.feature_dim)).astype(np.float32)
    views = {s: (0.3 * means[labels][:, None] + rng.normal(size=(n, args.segments, clip.feature_dim))
                 ).astype(np.float16) for s in ("face", "context")}
    cache = workdir / "raer_sized.zarr"
    started = time.perf_counter()
    build_store_from_arrays(
        cache, labels=labels, splits=["train"] * args.train_clips + ["test"] * args.test_clips,
        fingerprint={"clip_spec": f"random:{args.clip}", "clip_revision": clip.revision,
                     "labels": "raer5"},
        **views)
    build_s = time.perf_counter() - started
    del views
    run = workdir / "run"
    command = [sys.executable, str(ROOT / "cli.py"), "train-head", "--cache", str(cache),
               "--out", str(run), "--epochs", str(args.epochs), "--device", args.device, "--quiet",
               "--precision", args.precision]
    started = time.perf_counter()
    log_path = workdir / "train-head.log"
    peak_kib = 0
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, text=True)
        # VmHWM of the child's own address space. getrusage(RUSAGE_CHILDREN) would carry this
        # process's peak (15 GB after the end-to-end steps above) over fork+exec into the child.
        while process.poll() is None:
            peak_kib = max(peak_kib, _vm_hwm_kib(process.pid))
            time.sleep(0.5)
    wall = time.perf_counter() - started
    peak_mib = peak_kib / 1024
    if process.returncode:
        raise SystemExit(f"train-head failed ({process.returncode}):\n"
                         f"{log_path.read_text()[-3000:]}")
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {
        "command": " ".join(command), "clips": {"train": args.train_clips, "test": args.test_clips},
        "epochs": args.epochs, "cache_build_s": build_s, "wall_s": wall,
        "peak_rss_mib": peak_mib, "epoch_s": [h["seconds"] for h in history],
        "epoch_s_median": statistics.median(h["seconds"] for h in history),
        "last_val_uar": history[-1]["val_uar"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="Smoke test: random:tiny, 80 + 20 clips, 2 epochs, few steps.")
    parser.add_argument("--clip", default="vit-b-32", help="random: CLIP shape")
    parser.add_argument("--train-clips", type=int, default=2160)
    parser.add_argument("--test-clips", type=int, default=540)
    parser.add_argument("--segments", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--head-steps", type=int, default=20, help="timed train-head steps")
    parser.add_argument("--e2e-steps", type=int, default=2, help="timed end-to-end steps")
    parser.add_argument("--skip-full-run", action="store_true", help="Part 1 only.")
    parser.add_argument("--skip-e2e", action="store_true",
                        help="No end-to-end steps (minutes each on a CPU): part 1 times "
                             "train-head steps only, e.g. before a part-2 run.")
    parser.add_argument("--precision", default="auto",
                        help="train-head --precision of the part-2 run (default: its default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_head.json"))
    args = parser.parse_args()
    if args.quick:
        args.clip, args.train_clips, args.test_clips, args.epochs = "tiny", 80, 20, 2
        args.head_steps, args.e2e_steps = 3, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    result = {"benchmark": "head", "quick": args.quick, "device": str(device), **environment(),
              "load_average_before": os.getloadavg()}
    result["per_epoch"] = pe = per_epoch(args, device)
    print(f"per-epoch time, {pe['clip']}, batch {pe['batch_size']}, {pe['segments']} frames, "
          f"{pe['steps_per_epoch']} steps/epoch (extrapolated from median step times)")
    print(f"{'':<14}{'s/step':>10}{'s/epoch':>12}")
    print(f"{'train-head':<14}{pe['head_step_s_median']:>10.3f}{pe['head_epoch_s_extrapolated']:>12.1f}")
    print(f"{'end-to-end':<14}{pe['e2e_step_s_median']:>10.3f}{pe['e2e_epoch_s_extrapolated']:>12.1f}")
    if not args.skip_e2e:
        print(f"train-head is {pe['speedup']:.0f}x faster per epoch (goal >= 100x)")
    figures = [] if args.skip_e2e else [
        {"name": "head_epoch_speedup", "value": round(pe["speedup"], 1), "unit": "x",
         "goal": ">= 100", "met": pe["speedup"] >= 100,
         "note": "median step times x 270 steps; data loading excluded"}]
    figures.append({"name": f"head_step_s ({pe['precision']})",
                    "value": round(pe["head_step_s_median"], 4), "unit": "s"})
    if not args.skip_e2e:
        figures.append({"name": "e2e_step_s", "value": round(pe["e2e_step_s_median"], 3),
                        "unit": "s"})
    if not args.skip_full_run:
        workdir = Path(tempfile.mkdtemp(prefix="bench_head_"))
        try:
            result["full_run"] = fr = full_run(args, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        print(f"\n{fr['epochs']}-epoch train-head on {args.train_clips} + {args.test_clips} clips: "
              f"{fr['wall_s'] / 60:.1f} min wall (goal <= 10), peak RSS {fr['peak_rss_mib']:.0f} MiB "
              f"(goal <= 2048), median epoch {fr['epoch_s_median']:.1f} s")
        figures += [
            {"name": "head_20_epochs_wall_min", "value": round(fr["wall_s"] / 60, 2), "unit": "min",
             "goal": "<= 10", "met": fr["wall_s"] <= 600 if not args.quick else None},
            {"name": "head_20_epochs_peak_rss", "value": round(fr["peak_rss_mib"]), "unit": "MiB",
             "goal": "<= 2048", "met": fr["peak_rss_mib"] <= 2048 if not args.quick else None},
        ]
    result["figures"] = figures
    result["load_average_after"] = os.getloadavg()
    print(f"wrote {write_result(result, args.out)}")


if __name__ == "__main__":
    main()
