"""A train-head step against a plain fp32 forward + backward of the same text tower, and what
each of the text tower's savings (heads/text.py) is worth, all in one run.

The plain step is what any implementation pays: the five RAER prompts (8 context tokens, EOT at
positions 33, 32, 36, 36, 37: random: CLIPs tokenize with CLIP's own BPE)
through the transformers CLIP text tower as it is, fp32, up to the longest EOT, frozen
weights, backward to the context. Goal (issue 17): a whole train-head step (8 cached clips
[8, 16, 512] per stream drawn from the feature bank, temporal transformers, fusion, prompts,
cross-entropy, backward, SGD) at most half of that.

Measured, interleaved round-robin so that background load hits every variant alike, medians:
- plain: fp32 at the longest EOT (the reference), at all 77 positions, and with weight
  gradients (requires_grad on the frozen tower, what "no weight gradients" saves);
- the text tower alone, fp32 and bf16: every saving on; each turned off alone; all off;
- whole train-head steps: "before" (the transformers tower, fp32: this project before issue 17)
  and "after" at fp32 and at bf16 (what --precision auto picks on a CPU with native bf16);
- the feature batch: from the in-memory bank against reading the same clips from the store;
- torch.compile of the tower's layers: the first call (compilation) and the steady step.

The 20-epoch figure is PROJECTED from the measured step: 270 steps x 20 epochs, plus a
validation pass per epoch (measured here too). bench_head.py's full run measures it whole.

Example:
  python benchmarks/bench_head_step.py --repeats 15
  python benchmarks/bench_head_step.py --quick       # random:tiny, 2 repeats: it runs
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cache import build_store_from_arrays, open_store  # noqa: E402
from heads.data import FeatureBank  # noqa: E402
from heads.model import CaerModel, HeadConfig  # noqa: E402
from heads.text import TowerOptions  # noqa: E402
from cache.core.runtime import autocast as autocast_for  # noqa: E402
from heads.step import StepModel, sample_dropout, use_sample_dropout  # noqa: E402
from pipeline.clip import build_random_clip  # noqa: E402
from cache.core.runtime import cpu_has_native_bf16  # noqa: E402

from cache.core.labels import RAER5  # noqa: E402
from common import environment, write_result  # noqa: E402  (benchmarks/common.py)

SAVINGS = ("pack", "last_layer_eot_only", "fused_qkv", "prepare_once")
ALL_OFF = TowerOptions(**{name: False for name in SAVINGS})


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Bench:
    def __init__(self, args):
        self.clip = build_random_clip(args.clip)  # CLIP's own BPE tokenizer: the real lengths
        torch.manual_seed(0)
        self.model = CaerModel(HeadConfig(segments=args.segments), self.clip, RAER5)
        use_sample_dropout(self.model)
        groups = self.model.param_groups(1e-2, 1e-3, 1e-5)
        self.optimizer = torch.optim.SGD(groups, lr=1e-2, momentum=0.9, weight_decay=1e-4)
        self.step_model = StepModel(self.model, pixels=False).train()
        self.device = torch.device("cpu")
        self.longest = int(self.model.prompt_learner.eot_positions.max()) + 1
        self.batch_size, self.positions = args.batch_size, None

    # ---- the text side alone -------------------------------------------------------------

    def text_step(self, encode, precision: str = "fp32", weight_grads: bool = False):
        text = self.model.clip.text_model

        def run():
            if weight_grads:
                text.requires_grad_(True)
            with autocast_for(self.device, precision):
                features = encode()
            features.float().sum().backward()
            self.model.zero_grad(set_to_none=True)
            if weight_grads:
                text.requires_grad_(False)
        return run

    def tower(self, options: TowerOptions):
        def encode():
            self.model.text_tower.options = options
            return self.model.encode_text()
        return encode

    # ---- a whole train-head step ---------------------------------------------------------

    def head_step(self, bank: FeatureBank, precision: str, plain_text: bool,
                  options: TowerOptions = TowerOptions()):
        rng = np.random.default_rng(0)

        def run():
            positions = rng.choice(len(bank), self.batch_size, replace=False)
            face, context, y = bank.batch(positions, train=True, seed=0, epoch=0)
            rows = [int(bank.rows[p]) for p in positions]
            self.model.text_tower.options = options
            with autocast_for(self.device, precision), sample_dropout(self.model, 0, 0, rows):
                # "before": the transformers tower to the longest EOT, as encode_text was
                text = self.model.encode_text_reference(self.longest) if plain_text else None
                logits = self.model.forward_features(face, context, text) if plain_text \
                    else self.step_model(face, context)
                loss = F.cross_entropy(logits.float(), y, reduction="sum") / len(y)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return run

    def validate(self, bank: FeatureBank, n_val: int):
        def run():
            self.model.eval()
            with torch.no_grad():
                positions = torch.arange(min(n_val, len(bank)))
                for i in range(0, len(positions), 256):
                    face, context, _ = bank.batch(positions[i:i + 256], train=False)
                    self.model(face, context)
            self.model.train()
        return run


def make_cache(path: Path, args, feature_dim: int) -> None:
    rng = np.random.default_rng(0)
    n = args.bank_clips
    labels = rng.integers(0, 5, n)
    views = {s: rng.normal(size=(n, args.segments, 1, feature_dim)).astype(np.float16)
             for s in ("face", "context", "face_flip", "context_flip")}
    build_store_from_arrays(path, labels=labels, splits=["train"] * n,
                            fingerprint={"clip_spec": f"random:{args.clip}"}, **views)


def read_batch_from_store(store, rows: np.ndarray):
    """What a loader without the bank would do per step: read the clips' features."""
    rows = np.sort(rows)
    return [torch.from_numpy(np.asarray(store.features(s)[rows])).float() for s in ("face", "context")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="random:tiny, 2 repeats")
    parser.add_argument("--clip", default="vit-b-32", help="random: CLIP shape")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--segments", type=int, default=16)
    parser.add_argument("--bank-clips", type=int, default=400, help="clips in the feature bank")
    parser.add_argument("--train-clips", type=int, default=2160, help="for the 20-epoch projection")
    parser.add_argument("--val-clips", type=int, default=216, help="validated once per epoch")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--skip-compile", action="store_true", help="do not time torch.compile")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_head_step.json"))
    args = parser.parse_args()
    if args.quick:
        args.clip, args.repeats, args.warmup, args.bank_clips = "tiny", 2, 1, 40
        args.skip_compile = True
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"benchmark": "head_step", "quick": args.quick, "clip": f"random:{args.clip}",
              "prompt_eot_positions": None,
              "native_bf16": cpu_has_native_bf16(), **environment(),
              "load_average_before": os.getloadavg()}
    b = Bench(args)
    result["prompt_eot_positions"] = b.model.prompt_learner.eot_positions.tolist()
    workdir = Path(tempfile.mkdtemp(prefix="bench_head_step_"))
    make_cache(workdir / "c.zarr", args, b.clip.feature_dim)
    store = open_store(workdir / "c.zarr")
    bank = FeatureBank(store, np.arange(args.bank_clips), with_flip=True)
    rng = np.random.default_rng(1)

    with torch.no_grad():  # every variant computes the plain tower's features (fp32)
        plain = b.model.encode_text_reference()
        exactness = {}
        for name, options in [("all", TowerOptions()), ("none", ALL_OFF)] + [
                (f"no-{s}", replace(TowerOptions(), **{s: False})) for s in SAVINGS]:
            b.model.text_tower.options = options
            exactness[name] = float((b.model.encode_text() - plain).abs().max())
    result["max_abs_diff_vs_plain_fp32"] = exactness

    variants = {
        "text plain fp32": b.text_step(lambda: b.model.encode_text_reference(b.longest)),
        "text plain fp32, 77 positions": b.text_step(lambda: b.model.encode_text_reference()),
        "text plain fp32, weight grads": b.text_step(
            lambda: b.model.encode_text_reference(b.longest), weight_grads=True),
        "text plain bf16": b.text_step(lambda: b.model.encode_text_reference(b.longest), "bf16"),
    }
    for precision in ("fp32", "bf16"):
        variants[f"text tower {precision}"] = b.text_step(b.tower(TowerOptions()), precision)
        variants[f"text tower {precision}, all savings off"] = b.text_step(b.tower(ALL_OFF), precision)
        for saving in SAVINGS:
            variants[f"text tower {precision}, no {saving}"] = b.text_step(
                b.tower(replace(TowerOptions(), **{saving: False})), precision)
    variants["step before (plain tower, fp32)"] = b.head_step(bank, "fp32", plain_text=True)
    variants["step after, fp32"] = b.head_step(bank, "fp32", plain_text=False)
    variants["step after, bf16"] = b.head_step(bank, "bf16", plain_text=False)
    variants["feature batch from the bank"] = lambda: bank.batch(
        rng.choice(len(bank), args.batch_size, replace=False), train=True)
    variants["feature batch read from the store"] = lambda: read_batch_from_store(
        store, rng.choice(len(bank), args.batch_size, replace=False))
    variants["validation pass, bf16 training's fp32 eval"] = b.validate(bank, args.val_clips)

    times = {name: [] for name in variants}
    for i in range(args.warmup + args.repeats):
        for name, fn in variants.items():
            t = timed(fn)
            if i >= args.warmup:
                times[name].append(t)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}

    if not args.skip_compile:
        compiled = replace(TowerOptions(), compile=True)
        first = timed(b.head_step(bank, "bf16", plain_text=False, options=compiled))
        pair = {"step after, bf16, compiled": b.head_step(bank, "bf16", False, compiled),
                "step after, bf16, eager": b.head_step(bank, "bf16", False)}
        compile_times = {name: [] for name in pair}
        for i in range(2 + args.repeats):
            for name, fn in pair.items():
                t = timed(fn)
                if i >= 2:
                    compile_times[name].append(t)
        ms.update({name: 1e3 * statistics.median(t) for name, t in compile_times.items()})
        result["compile_first_step_s"] = first
        times.update(compile_times)

    plain_ms = ms["text plain fp32"]
    steps = math.ceil(args.train_clips / args.batch_size) * args.epochs
    val_s = ms["validation pass, bf16 training's fp32 eval"] / 1e3 * args.val_clips / min(args.val_clips, args.bank_clips)
    project = lambda step_ms: (steps * step_ms / 1e3 + args.epochs * val_s) / 60  # noqa: E731
    best = "step after, bf16" if cpu_has_native_bf16() else "step after, fp32"
    result.update(ms_median=ms, ms_all={k: [round(1e3 * x, 2) for x in v] for k, v in times.items()},
                  repeats=args.repeats, load_average_after=os.getloadavg(),
                  step_over_plain={k: ms[k] / plain_ms for k in ms if k.startswith("step")},
                  projected_20_epoch_min={k: project(ms[k]) for k in ms if k.startswith("step")})
    ratio = ms[best] / plain_ms
    figures = [
        {"name": f"train-head step / plain fp32 text fwd+bwd, {best.split(', ')[-1]} "
                 f"({ms[best]:.1f} ms vs {plain_ms:.1f} ms)", "value": round(ratio, 3),
         "unit": "x", "goal": "<= 0.5", "met": ratio <= 0.5},
        {"name": f"before: train-head step / plain fp32 text fwd+bwd "
                 f"({ms['step before (plain tower, fp32)']:.1f} ms)",
         "value": round(ms["step before (plain tower, fp32)"] / plain_ms, 3), "unit": "x"},
        {"name": "after, fp32: train-head step / plain fp32 text fwd+bwd",
         "value": round(ms["step after, fp32"] / plain_ms, 3), "unit": "x"},
    ]
    for precision in ("fp32", "bf16"):
        full = ms[f"text tower {precision}"]
        for saving in SAVINGS + ("all savings",):
            key = (f"text tower {precision}, no {saving}" if saving in SAVINGS
                   else f"text tower {precision}, all savings off")
            figures.append({"name": f"text tower {precision}: without {saving} / with all "
                                    f"({ms[key]:.1f} ms vs {full:.1f} ms)",
                            "value": round(ms[key] / full, 3), "unit": "x"})
    figures += [
        {"name": "no weight gradients: plain with / without weight grads",
         "value": round(ms["text plain fp32, weight grads"] / plain_ms, 3), "unit": "x"},
        {"name": "plain fp32 77 positions / up to the longest EOT",
         "value": round(ms["text plain fp32, 77 positions"] / plain_ms, 3), "unit": "x"},
        {"name": "feature batch: read from the store / from the in-memory bank (ms)",
         "value": round(ms["feature batch read from the store"] / ms["feature batch from the bank"], 1),
         "unit": "x", "note": f"{ms['feature batch from the bank']:.2f} ms from the bank"},
        {"name": "max |difference| of the text features from the plain tower's, fp32, any saving",
         "value": max(exactness.values()), "unit": "", "goal": "< 1e-5",
         "met": max(exactness.values()) < 1e-5},
    ]
    for key in ("step before (plain tower, fp32)", best):
        figures.append({"name": f"PROJECTED {args.epochs}-epoch RAER-sized wall time, {key}",
                        "value": round(project(ms[key]), 1), "unit": "min", "goal": "<= 10",
                        "met": project(ms[key]) <= 10,
                        "note": f"{steps} steps x median step + {args.epochs} validations; "
                                f"a projection, not a run"})
    if "compile_first_step_s" in result:
        saved = ms["step after, bf16, eager"] - ms["step after, bf16, compiled"]
        pays = saved > 0 and steps * saved / 1e3 > result["compile_first_step_s"]
        figures.append({"name": f"torch.compile: eager / compiled bf16 step "
                                f"({ms['step after, bf16, eager']:.1f} vs "
                                f"{ms['step after, bf16, compiled']:.1f} ms; first step "
                                f"{result['compile_first_step_s']:.0f} s)",
                        "value": round(ms["step after, bf16, eager"] / ms["step after, bf16, compiled"], 3),
                        "unit": "x", "note": f"pays on {args.epochs} epochs: {'yes' if pays else 'no'}"})
    result["figures"] = figures
    store.close()

    print(f"{result['clip']}, batch {args.batch_size}, median of {args.repeats} "
          f"({torch.get_num_threads()} threads, native bf16 {cpu_has_native_bf16()})")
    for name, value in ms.items():
        print(f"  {name:<48}{value:>10.2f} ms")
    for f in figures:
        print(f"{f['name']}: {f['value']} {f['unit']}")
    print(f"wrote {write_result(result, args.out)}")


if __name__ == "__main__":
    main()
