"""How much running the text tower only up to the longest EOT saves per training step.

The prompt learner's context changes every step, so training re-encodes the class prompts
through the frozen CLIP text tower on every step (forward and backward). With CLIP's causal
mask no position after a prompt's EOT can influence its EOT output, so the tower can stop at
the longest EOT instead of running all 77 positions (tests/test_model.py proves equality).

Setup: the random:vit-b-32 text tower (the real ViT-B/32 shapes: 12 layers, width 512), the five
RAER prompts with 8 context tokens, tokenized by CLIP's BPE tokenizer (which random: CLIPs use):
EOT at positions 33, 32, 36, 36 and 37, as in the original code's tokenized prompts
(the authors' tiny reference checkpoint). Each repeat times one forward + backward of the text side of
a training step; full and truncated runs alternate so that background load hits both alike.

Example:
  python benchmarks/bench_text_truncation.py --repeats 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from heads.model import CaerModel, HeadConfig, tokenize_prompts  # noqa: E402
from pipeline.clip import build_random_clip  # noqa: E402
from cache.core.labels import RAER5  # noqa: E402
from common import environment, write_result  # noqa: E402  (benchmarks/common.py)

# Where CLIP's BPE tokenizer puts the EOT of "[SOS] X*8 <RAER descriptor>" for the five classes.
RAER_EOT_POSITIONS = (33, 32, 36, 36, 37)  # CLIP's BPE: "[SOS] X*8 <descriptor> [EOT]"
N_CTX = 8


def step(model: CaerModel, video: torch.Tensor, labels: torch.Tensor, truncate: bool) -> float:
    start = time.perf_counter()
    text = model.encode_text(truncate=truncate)
    loss = torch.nn.functional.cross_entropy(model.config.logit_scale * video @ text.t(), labels)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip", default="vit-b-32", help="random: shape of the text tower")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"
                                             / "bench_text_truncation.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    clip = build_random_clip(args.clip)
    context_length = clip.model.config.text_config.max_position_embeddings
    eos = clip.tokenizer.eos_token_id
    labels_set = RAER5
    ids = tokenize_prompts(clip.tokenizer, labels_set.descriptors(), N_CTX, context_length)
    assert tuple((ids == eos).int().argmax(1).tolist()) == RAER_EOT_POSITIONS
    torch.manual_seed(0)
    model = CaerModel(HeadConfig(), clip, labels_set, prompt_token_ids=ids).train()
    model.param_groups(1e-2, 1e-3, 1e-5)  # trains the context, as train-head does
    video = torch.nn.functional.normalize(torch.randn(8, clip.feature_dim), dim=-1)
    labels = torch.arange(8) % len(RAER5)

    with torch.no_grad():
        difference = model.encode_text(truncate=True) - model.encode_text(truncate=False)
        max_abs_diff = float(difference.abs().max())
    times = {True: [], False: []}
    for i in range(args.warmup + args.repeats):
        for truncate in (False, True):
            t = step(model, video, labels, truncate)
            if i >= args.warmup:
                times[truncate].append(t)

    full, truncated = statistics.median(times[False]), statistics.median(times[True])
    result = {
        "benchmark": "text_truncation",
        "clip": f"random:{args.clip}",
        "prompts": len(RAER5),
        "context_length": context_length,
        "truncated_length": max(RAER_EOT_POSITIONS) + 1,
        "repeats": args.repeats,
        "full_ms_median": round(full * 1e3, 2),
        "truncated_ms_median": round(truncated * 1e3, 2),
        "speedup": round(full / truncated, 2),
        "max_abs_diff": max_abs_diff,
        "full_ms_all": [round(t * 1e3, 2) for t in times[False]],
        "truncated_ms_all": [round(t * 1e3, 2) for t in times[True]],
        **environment(),
    }
    print(f"text tower forward+backward, {result['clip']}, {len(RAER5)} prompts, "
          f"median of {args.repeats} ({torch.get_num_threads()} threads)")
    print(f"{'run':<22}{'positions':>10}{'ms':>10}")
    print(f"{'full context':<22}{context_length:>10}{result['full_ms_median']:>10.1f}")
    print(f"{'up to longest EOT':<22}{result['truncated_length']:>10}{result['truncated_ms_median']:>10.1f}")
    print(f"speedup {result['speedup']:.2f}x; max |difference| of the text features {max_abs_diff:.1e}")
    print(f"wrote {write_result(result, args.out)}")


if __name__ == "__main__":
    main()
