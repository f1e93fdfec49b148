"""``evaluate``: a run on one split of a cache -> UAR/WAR table, report.json, predictions.csv
and confusion_matrix.png.

Evaluation follows METHOD.md's test rule: the middle frame of each segment (the middle
candidate when the cache holds several per segment), no flip. Clips that failed extraction
(or are still pending) have no features; they are skipped, counted and listed in the report,
never silently dropped.

Before any prediction the cache is checked against the run: a cache built with another CLIP
or other preprocessing gives features the head was never trained on, so it is refused with
the reason and the ``extract`` command that builds a matching cache.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cache import fingerprint_mismatch, open_store
from cache.core.runtime import check_device
from cache.atomic import atomic_write, atomic_write_text, output_dir, refuse_symlink
from cache.fingerprint import FINGERPRINT_DEFAULTS, FINGERPRINT_OPTIONS
from heads.config import EvaluateConfig  # noqa: F401 - heads.evaluate.EvaluateConfig as before
from cache.verify import refuse_pending
from heads.metrics import (Report, compute_grouped, compute_report, format_table, pct,
                           plot_confusion)
from cache.core import __version__
from cache.core.errors import CaerError
from cache.frames import middle_candidate

log = logging.getLogger("caer")

# Runs whose image encoder no cache's features came from: they re-encode the stored crops.
PIXEL_KINDS = ("finetune",)


def reencodes_crops(run_config: dict) -> bool:
    """True for runs whose image encoder was fine-tuned: cached features cannot serve them."""
    return (run_config.get("kind") in PIXEL_KINDS
            or bool((run_config.get("clip") or {}).get("image_encoder_trained")))
# Differences from the training cache that shift the data but do not make it unusable (a test
# set comes with its own boxes file): warned about, not refused.
SOFT_FIELDS = ("face_model", "min_face_score")


@dataclass
class Evaluation:
    report: Report
    predictions: pd.DataFrame  # one row per evaluated clip
    out: Path | None  # where the files went (None when not written)


def required_fingerprint(run_config: dict) -> dict:
    """The fingerprint values a cache must have for this run.

    The run's ``preprocessing`` (normalize, face_resize, face_margin, segments, image_size, as
    heads/run.py records them), its classes in order, and then by kind: the CLIP weights that
    computed the features (``clip_revision``, ``feature_dim``) for runs that read cached
    features, or stored crops (``pixels``) for finetune runs, whose image encoder changed.
    """
    wanted = {k: v for k, v in (run_config.get("preprocessing") or {}).items()
              if k in FINGERPRINT_OPTIONS}
    from heads.run import PREPROCESSING_KEYS, recorded_choices

    wanted.update({k: v for k, v in recorded_choices(run_config).items()
                   if k in PREPROCESSING_KEYS})  # as predict cuts the run's clips
    wanted["labels"] = _class_names(run_config.get("labels"))
    if reencodes_crops(run_config):
        wanted["pixels"] = True
    else:
        wanted["clip_revision"] = (run_config.get("clip") or {}).get("revision")
        wanted["feature_dim"] = (run_config.get("model") or {}).get("feature_dim")
    return {k: v for k, v in wanted.items() if v is not None}


def check_cache(run_config: dict, run_dir: str | Path, fingerprint: dict, cache: str,
                split: str = "test") -> None:
    """Raise CaerError naming every mismatch and the extract command for a matching cache;
    log a warning for differences that only shift the data."""
    wanted = required_fingerprint(run_config)
    stored = {k: fingerprint.get(k, FINGERPRINT_DEFAULTS.get(k)) for k in wanted}
    if "labels" in wanted:  # descriptors may differ (the run keeps its own); classes may not
        stored["labels"] = _class_names(stored["labels"])
    keys = fingerprint_mismatch(stored, wanted)
    if keys:
        run_clip = extract_clip_spec(run_config, run_dir)
        parts = []
        for k in keys:
            cache_value, run_value = json.dumps(stored.get(k)), json.dumps(wanted.get(k))
            if k in ("clip_revision", "feature_dim"):
                cache_value = f"{fingerprint.get('clip_spec')} [{k} {cache_value}]"
                run_value = f"{run_clip} [{k} {run_value}]"
            if k == "pixels":
                cache_value, run_value = "no stored crops", "a finetune run re-encodes the crops"
            parts.append(f"{FINGERPRINT_OPTIONS.get(k, k)} (cache {cache_value}, run {run_value})")
        command = extract_command(run_config, run_dir, split)
        raise CaerError(f"--cache {cache} does not match --run {run_dir}: {'; '.join(parts)}. "
                        f"Build a matching cache with: {command}")

    trained_on = run_config.get("cache_fingerprint") or {}
    for k in SOFT_FIELDS:
        if k in trained_on and fingerprint.get(k) != trained_on[k]:
            log.warning("%s: the run was trained on a cache with %s %s, this cache has %s",
                        cache, FINGERPRINT_OPTIONS[k], trained_on[k], fingerprint.get(k))
    def faces_from(fp: dict) -> str:
        return "the face detector" if fp.get("face_boxes") is None else "a --face-boxes file"

    if trained_on and faces_from(trained_on) != faces_from(fingerprint):
        log.warning("%s: the run was trained on faces from %s, this cache's come from %s",
                    cache, faces_from(trained_on), faces_from(fingerprint))


def extract_clip_spec(run_config: dict, run_dir: str | Path) -> str:
    """The --clip a matching cache is extracted with.

    import-official: the run's own converted CLIP (RUN/clip). finetune: the CLIP its training
    cache was built with (only the crops are used). Otherwise the run's CLIP spec, which
    reproduces its revision (``random:tiny`` and its saved copy differ in revision string).
    """
    clip = run_config.get("clip") or {}
    kind = run_config.get("kind")
    trained_on = run_config.get("cache_fingerprint") or {}
    if kind == "import-official" and clip.get("dir"):
        return str(Path(run_dir) / clip["dir"])
    if reencodes_crops(run_config) and trained_on.get("clip_spec"):
        return str(trained_on["clip_spec"])
    return str(clip.get("spec") or trained_on.get("clip_spec") or "CLIP")


def extract_command(run_config: dict, run_dir: str | Path, split: str = "test") -> str:
    """The ``extract`` command line that builds a cache this run can be evaluated on.

    Annotation files and paths are the user's: they appear as ANNOTATIONS and NEW_CACHE.zarr
    (``--split`` names list files' clips; a CSV's own split column wins).
    Options the run does not constrain keep the training cache's values.
    """
    fp = dict(run_config.get("cache_fingerprint") or {})
    fp.update(run_config.get("preprocessing") or {})
    args = ["python", "cli.py", "extract", "--annotations", "ANNOTATIONS", "--split", split,
            "--cache", "NEW_CACHE.zarr", "--clip", extract_clip_spec(run_config, run_dir)]
    labels = run_config.get("labels") or fp.get("labels")
    if isinstance(labels, dict):
        from cache.core.labels import BUILTIN

        builtin = BUILTIN.get(str(labels.get("name")))
        args += ["--labels", labels["name"] if builtin and builtin.as_dict() == labels
                 else "LABELS.yaml"]
    from pipeline.config import PRESETS

    preset = PRESETS["original"]
    keys = ["segments", "normalize", "face_resize", "face_margin", "face_model",
            "min_face_score"]
    from heads.run import recorded_choices

    fp.update(recorded_choices(run_config))
    if all(fp.get(k) == v for k, v in preset.items()):
        args += ["--preset", "original"]
        keys = [k for k in keys if k not in preset]
    else:  # a choice is named only where it is not caer-kit's own
        keys += [k for k, v in PRESETS["caer"].items()
                 if k != "normalize" and fp.get(k) not in (None, v)]
    for key in keys:
        if fp.get(key) is not None:
            args += [FINGERPRINT_OPTIONS[key], str(fp[key])]
    if run_config.get("kind") == "import-official":  # the release's own box files
        args += ["--face-boxes", "face_detection_result.json"]
        if fp.get("context") == "body":
            args += ["--body-boxes", "body_detection_result.json"]
    elif fp.get("face_boxes"):  # only its sha256 is recorded: the file is the user's
        args += ["--face-boxes", "BOXES.json"]
    body = fp.get("body_boxes")
    if fp.get("context") == "body" and body and not str(body).startswith("detector:") \
            and run_config.get("kind") != "import-official":
        args += ["--body-boxes", "BODY_BOXES.json"]
    if reencodes_crops(run_config):
        args.append("--pixels")
    return shlex.join(args)


def _class_names(labels) -> str | None:
    if isinstance(labels, dict):
        return ", ".join(str(c.get("name")) for c in labels.get("classes", []))
    return labels


# ------------------------------------------------------------------------------ predictions

@torch.inference_mode()
def predict_rows(model, store, rows: np.ndarray, *, pixels: bool, batch_size: int = 64,
                 device: str | torch.device = "cpu", progress: bool = True) -> np.ndarray:
    """Class probabilities ``[len(rows), C]`` of store rows (sorted), middle candidate of each
    segment, no flip. ``pixels``: re-encode the stored crops (fine-tuned image encoder)."""
    from tqdm import tqdm

    k = middle_candidate(int(store.fingerprint["candidates"]))
    if pixels:
        face, context = store.pixels("face"), store.pixels("context")
    else:
        face, context = store.features("face"), store.features("context")
    model.to(device)
    out = []
    with tqdm(total=len(rows), desc="evaluate", unit="clip", disable=not progress,
              leave=False) as bar:
        for start in range(0, len(rows), batch_size):
            idx = rows[start:start + batch_size]
            f = torch.from_numpy(np.ascontiguousarray(face[idx][:, :, k])).to(device)
            c = torch.from_numpy(np.ascontiguousarray(context[idx][:, :, k])).to(device)
            if pixels:
                logits = model.forward_pixels(f.float().div_(255.0), c.float().div_(255.0))
            else:
                logits = model.forward_features(f.float(), c.float())
            out.append(torch.softmax(logits.float(), dim=-1).cpu().numpy())
            bar.update(len(idx))
    n_classes = len(store.labels)
    return np.concatenate(out) if out else np.zeros((0, n_classes), np.float32)


def predict_cache(model, store, split: str, *, pixels: bool | None = None, batch_size: int = 64,
                  device: str | torch.device = "cpu", progress: bool = False):
    """``(ids, y_true, probs)`` of a split's usable clips (middle frame, no flip).

    ``pixels`` (default: whether the model's image encoder was fine-tuned; pass True for a
    finetune run) re-encodes the stored crops, refused without them; otherwise cached
    features are read, which must come from the model's CLIP."""
    manifest = store.clip_table(["id", "label", "split", "status"])
    rows = np.flatnonzero((manifest["split"] == split).to_numpy()
                          & (manifest["status"] == "ok").to_numpy())
    pixels = bool(model.image_encoder_trained) if pixels is None else pixels
    if pixels and not store.fingerprint.get("pixels"):
        raise CaerError(f"{store.path}: this run fine-tuned the image encoder, so it needs the "
                        f"stored crops; extract the cache with --pixels")
    if not pixels and store.fingerprint.get("clip_revision") != model.clip_revision:
        raise CaerError(f"{store.path}: features from CLIP {store.fingerprint.get('clip_spec')} "
                        f"({store.fingerprint.get('clip_revision')}) but the run uses "
                        f"{model.clip_spec} ({model.clip_revision})")
    model.eval()
    probs = predict_rows(model, store, rows, pixels=pixels, batch_size=batch_size,
                         device=device, progress=progress)
    return (manifest["id"].to_numpy()[rows], manifest["label"].to_numpy()[rows], probs)


# ------------------------------------------------------------------------------ evaluate

def evaluate(cfg: EvaluateConfig, write: bool = True, progress: bool = True) -> Evaluation:
    """Check, predict, score, and (``write``) write report.json, predictions.csv and
    confusion_matrix.png. Every refusal happens before anything is computed or written."""
    from heads.run import read_run_config

    cfg.validate()
    run_config = read_run_config(cfg.run)
    out = None
    if write:
        out = Path(cfg.out) if cfg.out else default_out(cfg)
        if not cfg.out:  # a shared run's eval/ folder may hold a planted link too
            refuse_symlink(out.parent, "the run's eval folder")
        refuse_symlink(out, "--out")
        if out.exists() and not out.is_dir():
            raise CaerError(f"--out {out}: exists and is not a directory")
    check_device(cfg.device)
    with open_store(cfg.cache) as store:
        report, predictions = _evaluate_store(cfg, run_config, store, progress)
    if out is not None:
        write_outputs(report, predictions, out)
    return Evaluation(report, predictions, out)


def default_out(cfg: EvaluateConfig) -> Path:
    return Path(cfg.run) / "eval" / f"{Path(cfg.cache).stem}-{cfg.split}"


def _evaluate_store(cfg: EvaluateConfig, run_config: dict, store, progress: bool):
    from heads.run import load_run

    check_cache(run_config, cfg.run, store.fingerprint, cfg.cache, cfg.split)
    manifest = store.manifest  # its index is the store row
    in_split = manifest.index[manifest["split"] == cfg.split].to_numpy()
    if len(in_split) == 0:
        splits = sorted(set(manifest["split"])) or ["none"]
        raise CaerError(f"--split {cfg.split}: no clip of {cfg.cache} is in that split "
                        f"(its splits: {', '.join(splits)})")
    if cfg.group_by is not None and cfg.group_by not in store.metadata_columns:
        columns = ", ".join(store.metadata_columns) or "none"
        raise CaerError(f"--group-by {cfg.group_by}: not a metadata column of {cfg.cache} "
                        f"(its metadata columns: {columns})")
    refuse_pending(store, in_split, f"'{cfg.split}'", cfg.allow_pending)
    status = manifest.loc[in_split, "status"].to_numpy()
    rows = in_split[status == "ok"]
    skipped = manifest.loc[in_split[status != "ok"], ["id", "status", "reason"]]
    if len(rows) == 0:
        raise CaerError(f"--split {cfg.split}: none of its {len(in_split)} clips was extracted "
                        f"successfully; see `python cli.py info {cfg.cache}`")
    if len(skipped):
        counts = skipped["status"].value_counts().to_dict()
        log.warning("%d of %d clips in split '%s' are skipped: %s (see report.json "
                    "source.skipped)", len(skipped), len(in_split), cfg.split,
                    ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))

    model = load_run(cfg.run)
    pixels = reencodes_crops(run_config)
    probs = predict_rows(model, store, rows, pixels=pixels, batch_size=cfg.batch_size,
                         device=cfg.device, progress=progress)
    ids = manifest.loc[rows, "id"].to_numpy()
    bad = ~np.isfinite(probs).all(axis=1)
    if bad.any():
        shown = (f"non-finite predictions for {int(bad.sum())} clips "
                 f"({', '.join(map(str, ids[bad][:5]))})")
        # load_run refused weights holding NaN; so either these clips' inputs are damaged, or
        # finite weights overflow on finite inputs. Say which.
        damaged = not pixels and not all(
            np.isfinite(store.features(stream)[rows[bad]]).all() for stream in ("face", "context"))
        if damaged:
            raise CaerError(f"{shown}: their stored features in {cfg.cache} hold NaN or inf; "
                            f"extract them again")
        raise CaerError(f"{shown}: their stored {'crops' if pixels else 'features'} are finite, "
                        f"so the run {cfg.run} overflows on them; train it again with lower "
                        f"learning rates")

    classes = list(store.labels.names)
    y_true = manifest.loc[rows, "label"].to_numpy(np.int64)
    y_pred = probs.argmax(axis=1)
    if cfg.group_by:
        report = compute_grouped(y_true, y_pred, classes, manifest.loc[rows, cfg.group_by],
                                 cfg.group_by)
    else:
        report = compute_report(y_true, y_pred, classes)
    k = middle_candidate(int(store.fingerprint["candidates"]))
    report.source = {
        "run": str(cfg.run), "run_kind": run_config.get("kind"), "cache": str(cfg.cache),
        "split": cfg.split, "clips_in_split": int(len(in_split)), "evaluated": int(len(rows)),
        "skipped": [{"id": r.id, "status": r.status, "reason": r.reason}
                    for r in skipped.itertuples()],
        "frames": f"candidate {k} of {store.fingerprint['candidates']} (the middle one) in each "
                  f"of {store.fingerprint['segments']} segments, no flip",
        "inputs": "stored crops re-encoded by the run's CLIP" if pixels
                  else "cached CLIP features",
        "caer_kit_version": __version__,
    }

    predictions = pd.DataFrame({
        "id": ids,
        "true_label": [classes[i] for i in y_true],
        "predicted_label": [classes[i] for i in y_pred],
        "correct": y_true == y_pred,
    })
    if cfg.group_by:
        predictions[cfg.group_by] = manifest.loc[rows, cfg.group_by].to_numpy()
    for j, name in enumerate(classes):
        predictions[f"prob_{name}"] = probs[:, j]
    return report, predictions


def write_outputs(report: Report, predictions: pd.DataFrame, out: Path) -> None:
    """Each file through a temporary and a rename (cache.atomic): a link planted in ``out``
    is replaced, never followed."""
    output_dir(out, "--out")
    if os.path.lexists(out / "report.json"):
        log.info("evaluate: replacing the earlier report in %s", out)
    atomic_write_text(out / "report.json",
                      json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n")
    atomic_write(out / "predictions.csv",
                 lambda tmp: predictions.to_csv(tmp, index=False, float_format="%.6f"))
    source = report.source
    title = (f"{Path(source.get('run', '')).name} on {Path(source.get('cache', '')).name} "
             f"[{source.get('split', '')}]\n"
             f"UAR {pct(report.uar)} %   WAR {pct(report.war)} %   n = {report.n}")
    atomic_write(out / "confusion_matrix.png",
                 lambda tmp: plot_confusion(report, tmp, title=title))


def format_evaluation(evaluation: Evaluation) -> str:
    src = evaluation.report.source
    head = (f"run {src['run']} ({src['run_kind']}) on {src['cache']}, split {src['split']}: "
            f"{src['evaluated']} clips evaluated"
            + (f", {len(src['skipped'])} skipped (failed or pending extraction)"
               if src["skipped"] else ""))
    tail = f"\nwritten to {evaluation.out}/ (report.json, predictions.csv, " \
           f"confusion_matrix.png)" if evaluation.out else ""
    return f"{head}\n\n{format_table(evaluation.report)}{tail}"
