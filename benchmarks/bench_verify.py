"""What the store's damage checks cost when train-head loads features, and a full verify.

    python benchmarks/bench_verify.py                  # 400 clips, 16 segments, --flip
    python benchmarks/bench_verify.py --clips 50       # quick

Measures, on one store built twice (this version's checksummed chunks, and the same data
with zarr's default codecs as older stores have them), the median of --repeats:
- reading every feature view of every clip as train-head's FeatureBank does, raw from zarr
  (checksums against none: the zstd content checksum's cost);
- the missing-chunk check train-head adds (one stat per clip and view);
- ``info --verify`` (verify_store) reading every chunk of the store.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, write_result  # noqa: E402

VIEWS = ("features/face", "features/context", "features/face_flip", "features/context_flip")


def _old_copy(new: Path, old: Path) -> None:
    import zarr

    from cache import open_store

    src = zarr.open_group(str(new), mode="r")
    dst = zarr.open_group(str(old), mode="w")
    for name in open_store(new)._specs:
        a = src[name]
        b = dst.create_array(name, shape=a.shape, chunks=a.chunks, dtype=a.dtype,
                             fill_value=a.fill_value)
        b[...] = a[...]
    attrs = dict(src.attrs)
    attrs["caer_kit"] = {k: v for k, v in attrs["caer_kit"].items() if k != "integrity"}
    dst.attrs.update(attrs)


def _median(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=400)
    parser.add_argument("--segments", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/bench_verify.json")
    args = parser.parse_args(argv)

    from cache import build_store_from_arrays, open_store
    from cache.verify import verify_store

    rng = np.random.default_rng(0)
    n, s, d = args.clips, args.segments, 512
    views = {v: rng.normal(size=(n, s, 1, d)).astype(np.float16)
             for v in ("face", "context", "face_flip", "context_flip")}
    tmp = Path(tempfile.mkdtemp(prefix="bench_verify."))
    try:
        new, old = tmp / "new.zarr", tmp / "old.zarr"
        build_store_from_arrays(new, labels=np.arange(n) % 5, splits="train",
                                fingerprint={"labels": "raer5"}, **views)
        _old_copy(new, old)
        rows = np.arange(n)
        stores = {"new": open_store(new), "old": open_store(old)}

        def raw_read(store):
            return lambda: [store._root[v][rows] for v in VIEWS]

        def check(store):
            def run():
                for v in VIEWS:
                    store.check_chunks(v, store._root[v], rows)
            return run

        for store in stores.values():  # warm the page cache and the status cache
            raw_read(store)()
            check(store)()
        read_new = _median(raw_read(stores["new"]), args.repeats)
        read_old = _median(raw_read(stores["old"]), args.repeats)
        check_new = _median(check(stores["new"]), args.repeats)
        verify_new = _median(lambda: verify_store(stores["new"]), max(1, args.repeats // 2))
        size_new = sum(p.stat().st_size for p in new.rglob("*") if p.is_file())
        size_old = sum(p.stat().st_size for p in old.rglob("*") if p.is_file())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    per_clip = lambda t: 1000 * t / n  # noqa: E731
    figures = [
        {"name": "read all features, checksummed chunks", "value": per_clip(read_new),
         "unit": "ms/clip", "note": f"{len(VIEWS)} views of {s}x512 float16"},
        {"name": "read all features, no checksum (older stores)", "value": per_clip(read_old),
         "unit": "ms/clip"},
        {"name": "checksum cost at load", "value": read_new / read_old, "unit": "x",
         "note": "checksummed / unchecksummed read time"},
        {"name": "missing-chunk check at load", "value": per_clip(check_new), "unit": "ms/clip",
         "note": "one stat per clip and view"},
        {"name": "missing-chunk check against the read", "value": check_new / read_new,
         "unit": "x"},
        {"name": "info --verify, whole store", "value": per_clip(verify_new), "unit": "ms/clip",
         "note": "every chunk of every array"},
        {"name": "store size with checksums against without", "value": size_new / size_old,
         "unit": "x"},
    ]
    result = {"clips": n, "segments": s, "repeats": args.repeats, **environment(),
              "seconds": {"read_checksummed": read_new, "read_plain": read_old,
                          "missing_chunk_check": check_new, "verify_store": verify_new},
              "bytes": {"checksummed": size_new, "plain": size_old}, "figures": figures}
    print(f"wrote {write_result(result, args.out)}")
    for f in figures:
        print(f"{f['name']:50s} {f['value']:.3g} {f['unit']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
