"""Medians over repeated runs of the extract benchmark (benchmarks/run.py --only extract ...):
the breakdown's CPU side (fa81252 -> --downscale exact -> fast, the default), the CPU side an
encoder share of 0.8 needs, and the encoder's share, serial and in the pipeline, per clip kind.

    python benchmarks/median_of_runs.py benchmarks/results/all-extract-quiet{3,4,5}.json

The machine is noisy from run to run; the median of a few runs of the same code is what
docs/benchmarks.md quotes.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


STAGES = ("probe", "decode", "colour", "detection", "face crop", "letterbox", "queueing",
          "writing", "before: writing", "encoding")


def _extract_results(path: Path) -> dict:
    data = json.loads(path.read_text())
    for bench in data["benchmarks"]:
        if bench["name"] == "extract":
            return bench["results"]
    raise SystemExit(f"{path}: no extract benchmark in it")


def medians(paths: list[Path]) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, list[float]]] = {}
    for path in paths:
        results = _extract_results(path)
        for b in results.get("breakdown", []):
            row = rows.setdefault(b["kind"], {})
            for stage in STAGES:
                row.setdefault(stage, []).append(b["stages_s"][stage] * 1e3)
            for key, value in (("before CPU side ms", b["before_cpu_side_s"] * 1e3),
                               ("exact CPU side ms", b["exact_cpu_side_s"] * 1e3),
                               ("CPU side ms", b["cpu_side_s"] * 1e3),
                               ("CPU side for 0.8 ms", b["cpu_side_for_share_0.8_s"] * 1e3),
                               ("before share", b["before_encoder_share_serial"]),
                               ("exact share", b["exact_encoder_share_serial"]),
                               ("share", b["encoder_share_serial"])):
                row.setdefault(key, []).append(value)
        precisions = {b["kind"]: b["precision"] for b in results.get("breakdown", [])}
        for r in results.get("runs", []):  # the breakdown's own: K=1, its precision
            if r["kind"] in rows and r["K"] == 1 and r["precision"] == precisions[r["kind"]]:
                rows[r["kind"]].setdefault("share in the pipeline", []).append(
                    r["encode_in_pipeline_s"] / r["extract_s"])
    return {kind: {k: statistics.median(v) for k, v in row.items()} | {"runs": len(paths)}
            for kind, row in rows.items()}


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit(__doc__)
    table = medians([Path(p) for p in argv])
    print(f"medians of {len(argv)} runs: " + ", ".join(argv))
    for kind, row in table.items():
        print(f"{kind}: CPU side {row['before CPU side ms']:.0f} -> {row['exact CPU side ms']:.0f}"
              f" -> {row['CPU side ms']:.0f} ms (fa81252 -> exact -> fast); 0.8 needs "
              f"<= {row['CPU side for 0.8 ms']:.0f} ms; encoder share serial "
              f"{row['before share']:.3f} -> {row['exact share']:.3f} -> {row['share']:.3f}, "
              f"in the pipeline {row['share in the pipeline']:.3f}")
        print("  stages, ms a clip: " + ", ".join(f"{s} {row[s]:.0f}" for s in STAGES))


if __name__ == "__main__":
    main(sys.argv[1:])
