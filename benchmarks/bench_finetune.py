"""finetune: seconds per optimizer step and peak memory of end-to-end training, with and without
mixed precision and gradient checkpointing.

One step = the paper's batch (8 clips x 16 frames x 2 streams = 256 crops of 224x224) through
the trainable CLIP image encoder (random:vit-b-32: the real ViT-B/32 shapes), the temporal
transformers, fusion and prompts (the text tower runs every step), backward, SGD. It uses
heads/train.py's own pieces (per-clip dropout, autocast, gradient checkpointing of the vision
layers, GradScaler for fp16). Data loading is left out: the crops are random tensors already in
memory (in training, DataLoader workers decode and augment them in parallel).

Every configuration runs in a fresh process, so its peak memory is its own: on CUDA
torch.cuda.max_memory_allocated, on CPU the process's peak RSS (which includes the ~0.6 GB of
weights; the RSS after setup is recorded too). On a CPU without native bf16 (no AVX512-BF16/AMX)
bf16 autocast is emulated and slower than fp32; it is measured anyway and marked.

Example:
  python benchmarks/bench_finetune.py                  # CPU: fp32/bf16 x checkpointing off/on
  python benchmarks/bench_finetune.py --device cuda    # GPU: fp32/bf16/fp16 x off/on
  python benchmarks/bench_finetune.py --quick          # smoke test: random:tiny, tiny batch
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import environment, write_result  # noqa: E402  (benchmarks/common.py)


def one(args) -> dict:
    """Time one configuration in this process (called in a child process)."""
    from heads.model import CaerModel, HeadConfig
    from cache.core.runtime import autocast as autocast_for
    from heads.step import (StepModel, enable_grad_checkpointing, sample_dropout,
                             use_sample_dropout)
    from pipeline.clip import build_random_clip
    from cache.core.runtime import cpu_has_native_bf16
    from cache.core.labels import RAER5

    precision, checkpointing = args.one.split(",")
    checkpointing = checkpointing == "on"
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    clip = build_random_clip(args.clip)
    torch.manual_seed(0)
    model = CaerModel(HeadConfig(segments=args.segments), clip, RAER5)
    groups = model.param_groups(1e-2, 1e-3, 1e-5, lr_image_encoder=1e-5)
    use_sample_dropout(model)
    if checkpointing:
        enable_grad_checkpointing(model)
    model.to(device)
    optimizer = torch.optim.SGD(groups, lr=1e-2, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    step_model = StepModel(model, pixels=True).train()
    b, t, size = args.batch_size, args.segments, clip.image_size
    face, context = (torch.rand(b, t, 3, size, size, device=device) for _ in range(2))
    labels = (torch.arange(b) % len(RAER5)).to(device)
    rss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with autocast_for(device, precision), sample_dropout(model, 0, i, range(b)):
            loss = torch.nn.functional.cross_entropy(step_model(face, context).float(), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    result = {"precision": precision, "grad_checkpointing": checkpointing,
              "step_s": times, "step_s_median": statistics.median(times),
              "loss_finite": bool(torch.isfinite(loss).item())}
    if device.type == "cuda":
        result["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["memory_kind"] = "cuda max_memory_allocated"
    else:
        result["peak_memory_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["rss_after_setup_mib"] = rss_setup
        result["memory_kind"] = "process peak RSS"
        if precision == "bf16" and not cpu_has_native_bf16():
            result["note"] = "bf16 emulated: this CPU has no native bf16"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="Smoke test: random:tiny, batch 2, 4 frames, one timed step.")
    parser.add_argument("--clip", default="vit-b-32", help="random: CLIP shape")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--segments", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precisions", default=None,
                        help="comma-separated (default: fp32,bf16 on CPU; fp32,bf16,fp16 on CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: "precision,on|off"
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_finetune.json"))
    args = parser.parse_args()
    if args.quick:
        args.clip, args.batch_size, args.segments, args.steps = "tiny", 2, 4, 1
    if args.one:
        print("RESULT " + json.dumps(one(args)))
        return

    precisions = (args.precisions.split(",") if args.precisions else
                  ["fp32", "bf16", "fp16"] if args.device.startswith("cuda") else ["fp32", "bf16"])
    runs = []
    for precision in precisions:
        for checkpointing in ("off", "on"):
            command = [sys.executable, __file__, "--one", f"{precision},{checkpointing}",
                       "--clip", args.clip, "--batch-size", str(args.batch_size),
                       "--segments", str(args.segments), "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--device", args.device]
            if args.threads:
                command += ["--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True)
            line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
            if done.returncode or line is None:
                runs.append({"precision": precision, "grad_checkpointing": checkpointing == "on",
                             "error": done.stderr.strip().splitlines()[-1:] or [done.returncode]})
                continue
            runs.append(json.loads(line[len("RESULT "):]))

    print(f"finetune step, random:{args.clip}, batch {args.batch_size} x {args.segments} frames x "
          f"2 streams, {args.device}, median of {args.steps} step(s) after {args.warmup} warm-up")
    print(f"{'precision':<11}{'checkpointing':<15}{'s/step':>10}{'peak MiB':>10}  note")
    figures = []
    for r in runs:
        if "error" in r:
            print(f"{r['precision']:<11}{str(r['grad_checkpointing']):<15}{'failed':>10}  {r['error']}")
            continue
        print(f"{r['precision']:<11}{str(r['grad_checkpointing']):<15}{r['step_s_median']:>10.2f}"
              f"{r['peak_memory_mib']:>10.0f}  {r.get('note', '')}")
        tag = f"{r['precision']}_{'ckpt' if r['grad_checkpointing'] else 'nockpt'}"
        figures += [{"name": f"finetune_step_s_{tag}", "value": round(r["step_s_median"], 3),
                     "unit": "s", "note": r.get("note", "")},
                    {"name": f"finetune_peak_mib_{tag}", "value": round(r["peak_memory_mib"]),
                     "unit": "MiB", "note": r["memory_kind"]}]
    result = {"benchmark": "finetune", "quick": args.quick, "clip": f"random:{args.clip}",
              "device": args.device, "batch_size": args.batch_size, "segments": args.segments,
              "runs": runs, "figures": figures, **environment(),
              "load_average": os.getloadavg()}
    print(f"wrote {write_result(result, args.out)}")
    if any("error" in r for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
