"""Run every benchmark, write one JSON of all figures, print a table.

    python benchmarks/run.py                          # all benchmarks, CPU, default sizes
    python benchmarks/run.py --device cuda            # on a GPU (to the scripts that take it)
    python benchmarks/run.py --only extract,head      # a subset (by name; see --list)
    python benchmarks/run.py --quick                  # small sizes: checks that everything runs
    python benchmarks/run.py --docs                   # ...and rewrite docs/benchmarks.md from it
    python benchmarks/run.py --only head --skip-full-run   # one script, with its own arguments

Each benchmark is its own script in benchmarks/ (also runnable alone); this runs each one in a
fresh process, so one script's memory does not inflate another's peak, and records for each:
the exact command, its exit status, its wall time, the peak resident memory of its process
tree's largest process (from wait4), and the figures of the JSON it wrote. A benchmark script
that is missing stops the run before anything starts (exit 2), naming it; a script that fails
is reported and makes the run exit 1, after the others have run. Figures measured on a busy
machine are noisy: the JSON records the load average before and after each script.

Figures: a script's JSON may list them itself as ``"figures": [{"name", "value", "unit",
"goal", "met", "note"}]``; otherwise this file's ``FIGURES`` picks them out, and failing that
every number in the JSON is a figure (named by its key path).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"


@dataclass(frozen=True)
class Benchmark:
    name: str
    script: str  # file in benchmarks/
    what: str  # one line for the table and the docs
    args: tuple[str, ...] = ()  # the recorded default run
    quick_args: tuple[str, ...] = ()  # --quick: small sizes, same code paths
    takes_device: bool = False  # accepts --device


BENCHMARKS = (
    Benchmark("extract", "bench_extract.py",
              "extract: pipeline time per clip against the image encoder alone; clips/s; "
              "peak memory for 20 vs 200 clips; cache size per clip",
              quick_args=("--quick",), takes_device=True),
    Benchmark("head", "bench_head.py",
              "train-head: epoch time against an end-to-end epoch; a 20-epoch RAER-sized run",
              quick_args=("--quick",), takes_device=True),
    Benchmark("head-step", "bench_head_step.py",
              "train-head step against a plain fp32 text tower forward+backward; each text "
              "tower saving; bf16; torch.compile; the 20-epoch projection",
              quick_args=("--quick",)),
    Benchmark("finetune", "bench_finetune.py",
              "finetune: end-to-end step time and memory",
              quick_args=("--quick",), takes_device=True),
    Benchmark("text-truncation", "bench_text_truncation.py",
              "prompt encoding: text tower run up to the longest EOT against all 77 positions",
              args=("--repeats", "20"), quick_args=("--clip", "tiny", "--repeats", "3",
                                                    "--warmup", "1")),
    Benchmark("bf16-matmul", "bench_bf16_matmul.py",
              "bf16 against fp32 for the three matrix products of a linear layer (CPU)",
              quick_args=("--rows", "64", "--repeats", "1", "--warmup", "0")),
    Benchmark("ablate", "bench_ablate.py",
              "ablate --grid table6 x 3 seeds, RAER-sized: step time of each of the 12 "
              "configurations, validation, test, baselines; the projected total",
              quick_args=("--quick",)),
    Benchmark("explain", "bench_explain.py",
              "explain: one clip with ViT-B/32 shapes (Grad-CAM of both streams, attention), "
              "and the whole command for one clip",
              quick_args=("--quick",)),
    Benchmark("decode", "bench_decode.py",
              "decoding: seeking to keyframes against decoding straight through",
              quick_args=("--size", "640x360", "--frames", "120", "--repeats", "1")),
    Benchmark("persons", "bench_persons.py",
              "the person detector (--context body without a box file) per frame, against the "
              "face detector, on three real frame sizes",
              quick_args=("--repeats", "3")),
    Benchmark("store-read", "bench_store_read.py",
              "train-head's store read before its first step: the whole manifest against the "
              "columns it needs, then the features; RAER-sized",
              quick_args=("--clips", "40", "--repeats", "1")),
    Benchmark("verify", "bench_verify.py",
              "store damage checks: zstd checksums and the missing-chunk check at train-head's "
              "load, and a full `info --verify`",
              quick_args=("--clips", "20", "--repeats", "1")),
)
BY_NAME = {b.name: b for b in BENCHMARKS}


# ----------------------------------------------------------------------------- the machine

def machine() -> dict:
    """What the figures were measured on."""
    info = {"cpu_model": platform.processor() or platform.machine(),
            "logical_cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info["cpu_model"] = fields.get("Model name", info["cpu_model"])
        info["logical_cpus"] = int(fields.get("CPU(s)", info["logical_cpus"]))
        if "Core(s) per socket" in fields:
            info["cores"] = int(fields["Core(s) per socket"]) * int(fields.get("Socket(s)", 1))
        info["cpu_flags_bf16"] = any(f in fields.get("Flags", "").split()
                                     for f in ("avx512_bf16", "amx_bf16"))
    except (OSError, subprocess.CalledProcessError, ValueError):
        pass
    try:
        with open("/proc/meminfo") as f:
            kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
        info["ram_gib"] = round(kib / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
    except ImportError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        info["git_commit"] = commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


# ----------------------------------------------------------------------------- figures

def _flatten(data, prefix: str = "") -> list[tuple[str, float]]:
    if isinstance(data, bool):
        return []
    if isinstance(data, (int, float)):
        return [(prefix, data)]
    if isinstance(data, dict):
        return [kv for k, v in data.items()
                for kv in _flatten(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(data, list) and len(data) <= 16:
        return [kv for i, v in enumerate(data) for kv in _flatten(v, f"{prefix}[{i}]")]
    return []


def _unit(name: str) -> str:
    for suffix, unit in (("_ms", "ms"), ("_s", "s"), ("_mb", "MB"), ("_mib", "MiB"),
                         ("_gb", "GB"), ("_gib", "GiB"), ("_per_s", "/s"), ("_pct", "%"),
                         ("_x", "x"), ("_bytes", "B")):
        if name.lower().endswith(suffix):
            return unit
    return ""


def _figure(name, value, unit="", goal=None, met=None, note=None) -> dict:
    return {"name": name, "value": value, "unit": unit, "goal": goal, "met": met, "note": note}


def _text_truncation_figures(d: dict) -> list[dict]:
    return [_figure("text side of a step, speedup from truncation", d["speedup"], "x",
                    note=f"{d['context_length']} -> {d['truncated_length']} positions, "
                         f"{d['clip']}, {d['prompts']} prompts"),
            _figure("text side of a step, full context", d["full_ms_median"], "ms"),
            _figure("text side of a step, truncated", d["truncated_ms_median"], "ms"),
            _figure("max |difference| of the text features", d["max_abs_diff"], "",
                    goal="< 1e-5", met=d["max_abs_diff"] < 1e-5)]


def _decode_figures(d: dict) -> list[dict]:
    out = []
    for name, clip in d.get("clips", {}).items():
        out.append(_figure(f"{name}: decode one frame", round(clip["decode_per_frame_ms"], 3), "ms",
                           note=f"{d['size']}, {clip['n_frames']} frames, "
                                f"{clip['keyframes']} keyframes"))
        for key in sorted(k for k in clip if k.startswith("read_K")):
            out.append(_figure(f"{name}: {key.removeprefix('read_').removesuffix('_s')} "
                               f"(16 segments)", round(clip[key], 4), "s"))
        if "crossover_frames" in clip:
            out.append(_figure(f"{name}: seeking wins from a gap of", clip["crossover_frames"],
                               "frames"))
    return out


# For scripts whose JSON has no "figures" list.
FIGURES = {"text_truncation": _text_truncation_figures, "decode": _decode_figures}


def figures_of(data: dict, name: str = "") -> list[dict]:
    """The figures of one script's JSON (see the module docstring)."""
    if isinstance(data.get("figures"), list):
        out = []
        for f in data["figures"]:
            if not isinstance(f, dict) or "name" not in f or "value" not in f:
                raise ValueError(f"malformed figure {f!r}: needs at least name and value")
            out.append({"name": str(f["name"]), "value": f["value"], "unit": f.get("unit", ""),
                        "goal": f.get("goal"), "met": f.get("met"), "note": f.get("note")})
        return out
    adapter = FIGURES.get(name.replace("-", "_"))
    if adapter is not None:
        try:
            return adapter(data)
        except (KeyError, TypeError) as err:  # the script changed its JSON: say so, keep going
            print(f"warning: {name}: cannot pick its figures ({err!r}); listing every number",
                  file=sys.stderr)
    return [_figure(k, v, _unit(k)) for k, v in _flatten(data)]


# ----------------------------------------------------------------------------- running

@dataclass
class Outcome:
    name: str
    command: list[str]
    status: int
    wall_s: float
    peak_rss_mib: float
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    json_path: str
    data: dict | None = None
    figures: list[dict] = field(default_factory=list)
    error: str | None = None
    extra_args: list[str] = field(default_factory=list)  # beyond the recorded defaults


def _rel(path: Path) -> str:
    """A path relative to the repository when it lies inside it: commands anyone can rerun."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def run_one(bench: Benchmark, device: str, quick: bool, extra: list[str],
            results_dir: Path) -> Outcome:
    json_path = results_dir / f"bench_{bench.name.replace('-', '_')}.json"
    if json_path.exists():
        json_path.unlink()  # a stale file must never pass for this run's figures
    args = ["--out", str(json_path), *(bench.quick_args if quick else bench.args), *extra]
    if bench.takes_device and device != "cpu":
        args += ["--device", device]
    shown = ["python", _rel(BENCH / bench.script), "--out", _rel(json_path), *args[2:]]
    print(f"\n=== {bench.name}: {shlex.join(shown)}", flush=True)
    load_before = os.getloadavg()
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(BENCH / bench.script), *args], cwd=ROOT)
    # wait4 gives this child's own resource usage: its peak RSS (and that of the largest of
    # the processes it waited for), not the whole session's.
    _, wait_status, usage = os.wait4(proc.pid, 0)
    proc.returncode = status = os.waitstatus_to_exitcode(wait_status)
    wall = time.perf_counter() - start
    outcome = Outcome(bench.name, shown, status, round(wall, 2),
                      round(usage.ru_maxrss / 1024, 1), load_before, os.getloadavg(),
                      _rel(json_path), extra_args=list(extra))
    if status != 0:
        outcome.error = f"exit status {status}"
    elif not json_path.is_file():
        outcome.error = f"exit status 0 but it wrote no {json_path.name}"
    else:
        try:
            outcome.data = json.loads(json_path.read_text())
            outcome.figures = figures_of(outcome.data, bench.name)
        except (ValueError, TypeError) as err:
            outcome.error = f"unreadable {json_path.name}: {err}"
    if outcome.error:
        print(f"=== {bench.name} FAILED: {outcome.error}", file=sys.stderr, flush=True)
    return outcome


def write_combined(path: Path, outcomes: list[Outcome], *, complete: bool, started, command: str,
                   device: str, quick: bool, info: dict) -> None:
    data = {
        "format": "caer-kit-benchmarks", "format_version": 1, "complete": complete,
        "date_utc": started.strftime("%Y-%m-%d %H:%M"), "command": command, "device": device,
        "quick": quick, "machine": info,
        "benchmarks": [{
            "name": o.name, "script": f"benchmarks/{BY_NAME[o.name].script}",
            "what": BY_NAME[o.name].what, "command": shlex.join(o.command),
            "status": o.status, "error": o.error, "wall_s": o.wall_s,
            "peak_rss_mib": o.peak_rss_mib, "load_before": o.load_before,
            "load_after": o.load_after, "json": o.json_path, "extra_args": o.extra_args,
            "figures": o.figures, "results": o.data} for o in outcomes],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def format_table(outcomes: list[Outcome]) -> str:
    rows = [("benchmark", "figure", "value", "goal", "met")]
    for o in outcomes:
        if o.error:
            rows.append((o.name, "FAILED", o.error, "", ""))
            continue
        for f in o.figures:
            value = f["value"]
            text = f"{value:.4g}" if isinstance(value, float) else str(value)
            rows.append((o.name, f["name"], f"{text} {f['unit'] or ''}".strip(),
                         str(f["goal"] or ""), {True: "yes", False: "NO"}.get(f["met"], "")))
        rows.append((o.name, "(wall time, peak RSS)", f"{o.wall_s:.1f} s, {o.peak_rss_mib:.0f} MiB",
                     "", ""))
    widths = [min(60, max(len(r[i]) for r in rows)) for i in range(5)]
    lines = ["  ".join(c[:w].ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("--only", default="", help="comma-separated benchmark names")
    parser.add_argument("--skip", default="", help="comma-separated benchmark names to leave out")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (default: cpu)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--out", default=None,
                        help="combined JSON (default: benchmarks/results/all[-DEVICE].json; "
                             "with --quick, under benchmarks/results/quick/)")
    parser.add_argument("--docs", action="store_true",
                        help="also rewrite docs/benchmarks.md from the combined JSON")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args, extra = parser.parse_known_args(argv)

    if args.list:
        for b in BENCHMARKS:
            present = "" if (BENCH / b.script).is_file() else "   [MISSING]"
            print(f"{b.name:16s} benchmarks/{b.script:26s} {b.what}{present}")
        return 0
    names = [n.strip() for n in args.only.split(",") if n.strip()] or [b.name for b in BENCHMARKS]
    skip = {n.strip() for n in args.skip.split(",") if n.strip()}
    unknown = [n for n in [*names, *skip] if n not in BY_NAME]
    if unknown:
        print(f"error: unknown benchmark(s) {', '.join(unknown)}; known: "
              f"{', '.join(BY_NAME)}", file=sys.stderr)
        return 2
    chosen = [BY_NAME[n] for n in names if n not in skip]
    missing = [b for b in chosen if not (BENCH / b.script).is_file()]
    if missing:
        print("error: benchmark script(s) missing: "
              + ", ".join(f"benchmarks/{b.script} ({b.name})" for b in missing)
              + "; nothing was run. Restore them, or leave them out with --skip "
              + ",".join(b.name for b in missing), file=sys.stderr)
        return 2
    if args.docs and args.quick:
        print("error: --docs records measurements, and a --quick run is a smoke test; drop one "
              "of them", file=sys.stderr)
        return 2
    if extra and len(chosen) != 1:
        print(f"error: unknown argument(s) {shlex.join(extra)}; arguments for a benchmark script "
              f"go through only with a single --only NAME", file=sys.stderr)
        return 2
    if extra:
        print(f"passing {shlex.join(extra)} to benchmarks/{chosen[0].script}", flush=True)

    results_dir = RESULTS / "quick" if args.quick else RESULTS
    results_dir.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.timezone.utc)
    suffix = f"-{args.device}" if args.device != "cpu" else ""
    out = Path(args.out) if args.out else results_dir / f"all{suffix}.json"
    command = shlex.join(["python", "benchmarks/run.py", *(argv if argv is not None
                                                            else sys.argv[1:])])
    info = machine()
    outcomes: list[Outcome] = []
    for bench in chosen:
        outcomes.append(run_one(bench, args.device, args.quick, extra, results_dir))
        # Rewritten after every script, so a long run that is stopped keeps what it measured.
        write_combined(out, outcomes, complete=len(outcomes) == len(chosen), started=started,
                       command=command, device=args.device, quick=args.quick, info=info)
    print("\n" + format_table(outcomes))
    print(f"\nwrote {out}")
    if args.docs:
        from write_docs import write_docs  # benchmarks/write_docs.py

        print(f"wrote {write_docs([out])}")
    failed = [o.name for o in outcomes if o.error]
    if failed:
        print(f"error: {len(failed)} benchmark(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
