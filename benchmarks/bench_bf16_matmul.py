"""Why bf16 autocast is slow on a CPU without native bf16: the three matrix products of one
linear layer, fp32 against bf16.

A linear layer's training step multiplies three ways: the forward ``x @ W.T``, the input
gradient ``g @ W`` and the weight gradient ``g.T @ x``. On a CPU without AVX512-BF16 or AMX,
torch has no fast bf16 kernel for some of these layouts and falls back to a slow one; this
times each layout (ViT-B/32's MLP shape, 768 -> 3072, with the rows of 8 crops x 50 tokens)
so that the cause of finetune's bf16 slowdown is a measured figure, not a guess.

Example:
  python benchmarks/bench_bf16_matmul.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache.core.runtime import cpu_has_native_bf16  # noqa: E402
from common import environment, write_result  # noqa: E402  (benchmarks/common.py)

LAYOUTS = {
    "forward x@W.T": lambda x, w, g: x @ w.t(),
    "input grad g@W": lambda x, w, g: g @ w,
    "weight grad g.T@x": lambda x, w, g: g.t() @ x,
}


def median_ms(fn, repeats: int, warmup: int) -> float:
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=400, help="tokens (8 crops x 50 for ViT-B/32)")
    parser.add_argument("--in-features", type=int, default=768)
    parser.add_argument("--out-features", type=int, default=3072)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"
                                             / "bench_bf16_matmul.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    m, k, n = args.rows, args.in_features, args.out_features
    x32, w32, g32 = torch.randn(m, k), torch.randn(n, k), torch.randn(m, n)
    tensors = {"fp32": (x32, w32, g32),
               "bf16": tuple(t.to(torch.bfloat16) for t in (x32, w32, g32))}
    rows, figures = [], []
    for name, product in LAYOUTS.items():
        ms = {p: median_ms(lambda: product(*tensors[p]), args.repeats, args.warmup)
              for p in ("fp32", "bf16")}
        ratio = ms["bf16"] / ms["fp32"]
        rows.append({"layout": name, "fp32_ms": round(ms["fp32"], 2),
                     "bf16_ms": round(ms["bf16"], 2), "bf16_over_fp32": round(ratio, 1)})
        figures.append({"name": f"bf16 / fp32 time, {name} "
                                f"({ms['fp32']:.1f} ms fp32, {ms['bf16']:.1f} ms bf16)",
                        "value": round(ratio, 1), "unit": "x", "note": ""})

    print(f"[{m} x {k}] x [{k} x {n}] products, median of {args.repeats}, "
          f"{torch.get_num_threads()} threads, native bf16: {cpu_has_native_bf16()}")
    print(f"{'layout':<20}{'fp32 ms':>10}{'bf16 ms':>10}{'bf16/fp32':>11}")
    for r in rows:
        print(f"{r['layout']:<20}{r['fp32_ms']:>10.1f}{r['bf16_ms']:>10.1f}"
              f"{r['bf16_over_fp32']:>10.1f}x")
    result = {"benchmark": "bf16_matmul", "shape": [m, k, n], "repeats": args.repeats,
              "native_bf16": cpu_has_native_bf16(), "rows": rows, "figures": figures,
              **environment()}
    print(f"wrote {write_result(result, args.out)}")


if __name__ == "__main__":
    main()
