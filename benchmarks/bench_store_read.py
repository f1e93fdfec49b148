"""What train-head pays to read a store before its first step: the manifest against the
columns it needs (FeatureStore.clip_table), and the features (heads.data.FeatureBank).

    python benchmarks/bench_store_read.py               # RAER-sized: 2,700 clips, 16 segments
    python benchmarks/bench_store_read.py --clips 40 --repeats 1    # quick

A per-clip column of the manifest (status, n_frames, fps, width, height, reason, note) is one
chunk file a clip, so a RAER-sized store's manifest opens about 19,000 files. Medians of
--repeats, each on a store opened afresh (nothing cached between them):
- "before": open, the whole manifest, then FeatureBank of the train and val clips, as
  train-head read its store until clip_table existed;
- "now": open, clip_table of label, split and status (what train-head's set-up needs), then
  FeatureBank (id and label, and the features), as train-head reads it now.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, write_result  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=2700)
    parser.add_argument("--segments", type=int, default=16)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                             "bench_store_read.json"))
    args = parser.parse_args(argv)

    from cache import build_store_from_arrays, open_store
    from heads.data import FeatureBank

    rng = np.random.default_rng(0)
    n = args.clips
    views = {s: rng.normal(size=(n, args.segments, args.dim)).astype(np.float16)
             for s in ("face", "context")}
    n_train = int(0.8 * n)
    work = Path(tempfile.mkdtemp(prefix="bench_store_read_"))
    try:
        path = work / "s.zarr"
        t0 = time.perf_counter()
        build_store_from_arrays(path, labels=rng.integers(0, 5, n),
                                splits=["train"] * n_train + ["test"] * (n - n_train),
                                fingerprint={"labels": "raer5"}, **views)
        build_s = time.perf_counter() - t0
        rows = np.arange(n_train)
        files = sum(len(f) for _, _, f in os.walk(path))

        def before():
            store = open_store(path)
            store.manifest
            FeatureBank(store, rows, with_flip=True)

        def now():
            store = open_store(path)
            store.clip_table(["label", "split", "status"])
            FeatureBank(store, rows, with_flip=True)

        def manifest():
            open_store(path).manifest

        def columns():
            open_store(path).clip_table(["label", "split", "status"])

        # Alternated, so that a slower stretch of the machine touches both alike.
        timings = {"before": [], "now": [], "manifest": [], "clip_table": []}
        for _ in range(args.repeats):
            for name, fn in (("before", before), ("now", now), ("manifest", manifest),
                             ("clip_table", columns)):
                t0 = time.perf_counter()
                fn()
                timings[name].append(time.perf_counter() - t0)
        med = {k: float(np.median(v)) for k, v in timings.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()[0]
    result = {
        "clips": n, "segments": args.segments, "dim": args.dim, "repeats": args.repeats,
        "store_files": files, "build_s": round(build_s, 2), "load_after": load,
        "median_s": {k: round(v, 3) for k, v in med.items()},
        "environment": environment(),
        "figures": [
            {"name": f"train-head's store read, {n} clips: before (whole manifest + features)",
             "value": round(med["before"], 2), "unit": "s"},
            {"name": f"train-head's store read, {n} clips: now (clip_table + features)",
             "value": round(med["now"], 2), "unit": "s",
             "note": f"{med['now'] / med['before']:.2f} x before, same run"},
            {"name": f"the whole manifest, {n} clips ({files} files in the store)",
             "value": round(med["manifest"], 2), "unit": "s"},
            {"name": f"clip_table(label, split, status), {n} clips",
             "value": round(med["clip_table"], 2), "unit": "s",
             "note": f"{med['clip_table'] / med['manifest']:.2f} x the whole manifest"},
        ],
    }
    out = write_result(result, args.out)
    for f in result["figures"]:
        print(f"{f['name']}: {f['value']} {f['unit']}" + (f" ({f['note']})" if "note" in f
                                                          else ""))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
