"""``ablate``: a grid of ordinary train-head runs over one cache, their test scores, the
baselines, and the tables and plot that summarise them (the paper's Table 6 over seeds).

Each configuration x seed is a train-head run in ``DIR/runs/<configuration>/seed-N``: it
selects its weights on the validation split exactly as train-head does, and only then is it
scored on the test split (``evaluate``'s rule, into ``RUN/eval/test``). Nothing is chosen on
test. A run with ``config.json`` is finished and skipped when its options match; a directory
without one is a killed run and is resumed (train-head --resume), so running the same command
again finishes the grid, and a larger grid in the same DIR trains only its new runs.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

from heads.config import ABLATE_SETS, BASELINES, GRIDS, AblateConfig
from cache.core.errors import CaerError

log = logging.getLogger("caer")

STREAMS = ("both", "face", "context")
# Table 6: temporal depth at 8 prompt tokens, then prompt length at 1 layer (n_ctx, layers).
TABLE6 = ((8, 1), (8, 2), (8, 3), (4, 1), (12, 1), (16, 1))
MARKER = "ablate.json"  # marks DIR as ablate's, so a rerun may write into it
SCORES = "scores.json"  # RUN/eval/test/scores.json, written last: the run's test scores
# Options that may differ between the command and a finished run without changing the run.
NOT_COMPARED = ("device", "workers", "quiet", "resume", "out", "cache")


@dataclass(frozen=True)
class GridPoint:
    n_ctx: int
    temporal_layers: int
    streams: str

    @property
    def name(self) -> str:
        return f"ctx{self.n_ctx}-layers{self.temporal_layers}-{self.streams}"


def _ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CaerError(f"{option} {text}: expected integers separated by commas, "
                        f"e.g. 4,8,12,16") from None
    if not values or len(set(values)) != len(values) or min(values) < 1:
        raise CaerError(f"{option} {text}: expected distinct integers >= 1, e.g. 4,8,12,16")
    return values


def _names(text: str, option: str, allowed: tuple[str, ...]) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in allowed]
    if bad or not values or len(set(values)) != len(values):
        raise CaerError(f"{option} {text}: expected distinct names among "
                        f"{', '.join(allowed)}, comma-separated")
    return values


def grid_points(config: AblateConfig) -> list[GridPoint]:
    """The configurations, streams outermost, in the order the options list them."""
    if config.grid not in GRIDS:
        raise CaerError(f"--grid {config.grid}: choose {' or '.join(GRIDS)}")
    table6 = config.grid == "table6"
    streams = _names(config.streams or ("face,both" if table6 else "both"), "--streams", STREAMS)
    if table6:
        if config.n_ctx or config.temporal_layers:
            raise CaerError("--grid table6 sets --n-ctx and --temporal-layers itself (its rows: "
                            "1, 2, 3 layers at 8 tokens; 4, 8, 12, 16 tokens at 1 layer); drop "
                            "them, or use --grid product")
        pairs = list(TABLE6)
    else:
        pairs = [(n, depth) for n in _ints(config.n_ctx or "8", "--n-ctx")
                 for depth in _ints(config.temporal_layers or "1", "--temporal-layers")]
    return [GridPoint(n, depth, s) for s in streams for n, depth in pairs]


def baselines_of(config: AblateConfig) -> list[str]:
    if config.baselines.strip() in ("", "none"):
        return []
    return _names(config.baselines, "--baselines", BASELINES)


def run_config(config: AblateConfig, point: GridPoint, seed: int) -> "TrainConfig":  # noqa: F821
    run_dir = run_directory(config.out, point, seed)
    return replace(config.train, cache=config.cache, out=str(run_dir), n_ctx=point.n_ctx,
                   temporal_layers=point.temporal_layers, streams=point.streams, seeds=(seed,),
                   resume=run_dir.exists())


def run_directory(out: str | Path, point: GridPoint, seed: int) -> Path:
    return Path(out) / "runs" / point.name / f"seed-{seed}"


def check_ablate(config: AblateConfig) -> tuple[list[GridPoint], list[str]]:
    """Every refusal before anything is read or written: the grid, the baselines, every
    run's train-head options (train-head's own checks), --out."""
    config.validate()
    points = grid_points(config)
    baselines = baselines_of(config)
    if not config.seeds or len(set(config.seeds)) != len(config.seeds):
        raise CaerError("--seeds must list distinct integers, e.g. 42,43,44")
    for point in points:
        run_config(config, point, config.seeds[0]).validate()
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise CaerError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise CaerError(f"--out {out}: holds files that ablate did not write; give a new or "
                        f"empty directory, or a previous ablate's --out to resume or extend it")
    return points, baselines


def _options_differ(run_dir: Path, cfg, seed: int) -> list[str]:
    from heads.run import read_run_config
    from heads.checkpoints import recorded_options

    trained = read_run_config(run_dir).get("train") or {}
    wanted = recorded_options(cfg, seed)
    return [f"--{k.replace('_', '-')} (run {trained.get(k)}, now {wanted[k]})"
            for k in wanted if k not in NOT_COMPARED
            and json.dumps(wanted[k]) != json.dumps(trained.get(k))]


def _finished(run_dir: Path, cfg, seed: int, fingerprint: dict) -> bool:
    """True for a complete run of these options on this cache; refuses one of others."""
    from cache import describe_mismatch, fingerprint_mismatch
    from heads.run import read_run_config

    if not (run_dir / "config.json").is_file():
        return False
    changed = _options_differ(run_dir, cfg, seed)
    if changed:
        raise CaerError(f"{run_dir} was trained with other options than this command's: "
                        f"{'; '.join(changed)}; pass the same options, or another --out")
    old = read_run_config(run_dir).get("cache_fingerprint") or {}
    keys = fingerprint_mismatch(old, fingerprint)
    if keys:
        raise CaerError(f"{run_dir} was trained on another cache than --cache: "
                        f"{describe_mismatch(old, fingerprint, keys)}; use another --out")
    return True


def _test_scores(run_dir: Path, cache: str, has_test: bool) -> dict:
    """The run's test UAR/WAR (fractions) with its selected weights, computed once."""
    from heads.evaluate import EvaluateConfig, evaluate
    from heads.checkpoints import read_json, write_json

    folder = run_dir / "eval" / "test"
    done = read_json(folder / SCORES)
    if done is not None:
        return done
    scores = {"test_uar": None, "test_war": None, "n": 0}
    if has_test:
        result = evaluate(EvaluateConfig(run=str(run_dir), cache=cache, split="test",
                                         out=str(folder)), progress=False)
        scores = {"test_uar": result.report.uar, "test_war": result.report.war,
                  "n": result.report.n}
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / SCORES, scores)
    return scores


def _pct(value):
    return None if value is None else 100.0 * float(value)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def run_ablate(config: AblateConfig) -> dict:
    """Baselines, then every run of the grid (skipping finished ones), then the tables.
    Returns ``{"rows": [...], "files": {...}}``; rows as in results.csv."""
    from cache import open_store
    from heads import baselines as base
    from heads.ablate_report import write_outputs
    from heads.data import split_clips
    from heads.checkpoints import write_json
    from heads.train import train_head

    points, baselines = check_ablate(config)
    out = Path(config.out)
    seeds = list(config.seeds)
    with open_store(config.cache) as store:
        fingerprint = store.fingerprint
        manifest = store.clip_table(["label", "split", "status"])
        has_test = bool(((manifest["split"] == "test") & (manifest["status"] == "ok")).any())
        splits = split_clips(manifest, config.train.val_fraction, config.train.val_seed)
        baseline_rows, details = [], {}
        if "zero-shot" in baselines:
            streams = list(dict.fromkeys(p.streams for p in points))
            baseline_rows += base.zero_shot(store, splits, streams)
        if "linear-probe" in baselines:
            probe = base.linear_probe(store, splits)
            details["linear-probe"] = {"C": probe.pop("C"),
                                       "val_uar_by_c": probe.pop("val_uar_by_c"),
                                       "C_tried": list(base.PROBE_C)}
            baseline_rows.append(probe)
    baseline_rows = [{**r, "n_ctx": None, "temporal_layers": None, "seed": None, "run": "",
                      **{k: _pct(r[k]) for k in ("val_uar", "test_uar", "test_war")}}
                     for r in baseline_rows]

    out.mkdir(parents=True, exist_ok=True)
    shared = {k: v for k, v in vars(config.train).items() if k not in ABLATE_SETS}
    write_json(out / MARKER, {"written_by": "python cli.py ablate", "cache": config.cache,
                               "grid": [p.name for p in points], "seeds": seeds,
                               "baselines": baselines, "train_options": shared,
                               "baseline_details": details, "val_split": splits.describe()})

    runs = [(p, s) for p in points for s in seeds]
    rows, trained_seconds, started = [], [], time.perf_counter()
    for i, (point, seed) in enumerate(runs, 1):
        cfg = run_config(config, point, seed)
        run_dir = Path(cfg.out)
        if _finished(run_dir, cfg, seed, fingerprint):
            log.info("ablate run %d/%d: %s seed %d finished earlier, skipped", i, len(runs),
                     point.name, seed)
        else:
            left = sum(1 for p, s in runs[i - 1:]
                       if not (run_directory(out, p, s) / "config.json").is_file())
            eta = (f"ETA {_clock(left * sum(trained_seconds) / len(trained_seconds))}"
                   if trained_seconds else "ETA after the first run")
            log.info("ablate run %d/%d: %s seed %d%s (%s, %d to train)", i, len(runs),
                     point.name, seed, ", resuming" if cfg.resume else "", eta, left)
            t = time.perf_counter()
            train_head(cfg)
            trained_seconds.append(time.perf_counter() - t)
        scores = _test_scores(run_dir, config.cache, has_test)
        from heads.run import read_run_config

        extra = read_run_config(run_dir).get("extra") or {}
        rows.append({"method": "clip-caer", "n_ctx": point.n_ctx,
                     "temporal_layers": point.temporal_layers, "streams": point.streams,
                     "seed": seed, "val_uar": _pct(extra.get("val_uar")),
                     "test_uar": _pct(scores["test_uar"]), "test_war": _pct(scores["test_war"]),
                     "run": str(run_dir)})
        write_outputs(out, rows + baseline_rows, plot=False)  # a kill keeps what is done
    files = write_outputs(out, rows + baseline_rows, plot=True)
    log.info("ablate: %d runs (%d trained now, %s) and %d baselines -> %s", len(runs),
             len(trained_seconds), _clock(time.perf_counter() - started), len(baseline_rows),
             ", ".join(str(f) for f in files.values()))
    return {"rows": rows + baseline_rows, "files": files, "trained": len(trained_seconds)}
