"""Render docs/benchmarks.md from the JSON files benchmarks/run.py writes.

    python benchmarks/write_docs.py                                    # benchmarks/results/all.json
    python benchmarks/write_docs.py benchmarks/results/all.json benchmarks/results/all-cuda.json

Every figure in the page comes from one of those files, with the machine, the date and the
command that measured it; nothing is typed in by hand. A benchmark that failed is listed as
failed, not left out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
DEFAULT = ROOT / "benchmarks" / "results" / "all.json"

HEADER = """# Benchmarks

Every figure below was measured by a script in `benchmarks/` and copied here by
`benchmarks/write_docs.py` from the JSON that `benchmarks/run.py` wrote; the machine, the date
and the command are given with each set. To measure on your machine:

```
python benchmarks/run.py --docs                 # CPU; rewrites this page
python benchmarks/run.py --device cuda          # GPU, then both on one page:
python benchmarks/write_docs.py benchmarks/results/all.json benchmarks/results/all-cuda.json
```

Timings depend on what else the machine is doing: the load average before and after each
script is recorded, and figures taken under load (load above the number of cores) are
marked.
"""


def _value(value, unit: str) -> str:
    if isinstance(value, float):
        text = f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    else:
        text = str(value)
    return f"{text} {unit}".strip()


def _machine(m: dict) -> str:
    cores = f"{m.get('cores')} cores / " if m.get("cores") else ""
    parts = [f"{m.get('cpu_model', '?')} ({cores}{m.get('logical_cpus', '?')} logical CPUs)"]
    if m.get("ram_gib"):
        parts.append(f"{m['ram_gib']} GiB RAM")
    if m.get("gpu"):
        parts.append(f"GPU {m['gpu']} (CUDA {m.get('cuda')})")
    parts.append(f"torch {m.get('torch', '?')} ({m.get('torch_threads', '?')} threads), "
                 f"Python {m.get('python', '?')}")
    if m.get("git_commit"):
        parts.append(f"caer-kit {m['git_commit']}")
    return "; ".join(parts)


def render(results: list[dict]) -> str:
    out = [HEADER]
    from run import BENCHMARKS  # benchmarks/run.py: the list of every benchmark

    measured = {b["name"] for data in results for b in data.get("benchmarks", [])
                if not b.get("error")}
    missing = [b for b in BENCHMARKS if b.name not in measured]
    if missing:
        out.append("**Not measured in the runs below**: "
                   + "; ".join(f"{b.name} (`python benchmarks/run.py --only {b.name}`)"
                               for b in missing) + ".\n")
    for data in results:
        m = data.get("machine", {})
        cores = m.get("cores") or m.get("logical_cpus") or 1
        title = "GPU" if data.get("device", "cpu") != "cpu" else "CPU"
        quick = " (quick sizes: a smoke run, not a measurement)" if data.get("quick") else ""
        out.append(f"\n## {title}: {data.get('date_utc', '?')} UTC{quick}\n")
        if not data.get("complete", True):
            out.append(f"**Incomplete run**: it stopped after {len(data.get('benchmarks', []))} "
                       f"benchmark(s); the others were not measured.\n")
        out.append(f"- Machine: {_machine(m)}")
        out.append(f"- Command: `{data.get('command', '?')}`\n")
        if data.get("note"):  # what the JSON cannot tell, e.g. other work on the machine
            out.append(f"**Note**: {data['note']}\n")
        for bench in data.get("benchmarks", []):
            loaded = max(bench.get("load_before", [0])[0], bench.get("load_after", [0])[0]) > cores
            out.append(f"### {bench['name']}\n")
            out.append(f"{bench.get('what', '')}\n")
            out.append(f"- Command: `{bench['command']}`")
            out.append(f"- Wall time {bench['wall_s']:.1f} s, peak RSS "
                       f"{bench['peak_rss_mib']:.0f} MiB, "
                       f"load average {bench['load_before'][0]:.1f} before / "
                       f"{bench['load_after'][0]:.1f} after"
                       + (" **(measured under load: noisy)**" if loaded else ""))
            if bench.get("extra_args"):
                out.append(f"- Run with extra arguments `{' '.join(bench['extra_args'])}`: "
                           f"figures that only its default run measures are missing")
            out.append(f"- Raw results: `{bench['json']}`\n")
            if bench.get("error"):
                out.append(f"**FAILED**: {bench['error']}. No figures.\n")
                continue
            figures = bench.get("figures") or []
            if not figures:
                out.append("No figures.\n")
                continue
            out.append("| Figure | Value | Goal | Met |")
            out.append("|---|---|---|---|")
            for f in figures:
                met = {True: "yes", False: "**no**"}.get(f.get("met"), "")
                note = f" ({f['note']})" if f.get("note") else ""
                cells = [f"{f['name']}{note}", _value(f["value"], f.get("unit") or ""),
                         str(f.get("goal") or ""), met]
                out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def write_docs(paths: list[Path], docs: Path = DOCS) -> Path:
    results = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        if data.get("format") != "caer-kit-benchmarks":
            raise SystemExit(f"error: {path} is not a benchmarks/run.py result")
        results.append(data)
    docs.write_text(render(results), encoding="utf-8")
    return docs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="*", type=Path, default=[DEFAULT],
                        help="combined JSON files from benchmarks/run.py (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DOCS, help="default: %(default)s")
    args = parser.parse_args(argv)
    missing = [p for p in args.json if not p.is_file()]
    if missing:
        print(f"error: no such file: {', '.join(map(str, missing))}; run "
              f"`python benchmarks/run.py` first", file=sys.stderr)
        return 2
    print(f"wrote {write_docs(args.json, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
