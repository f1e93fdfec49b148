"""ablate's baselines, computed from the cache alone on train-head's own splits and frames.

- ``zero-shot``: no training. CLIP's text features of each class descriptor (the face-only
  descriptors for the face stream) against the mean of the stream's L2-normalised per-frame
  features; ``both`` averages the face and context streams' probabilities.
- ``linear-probe``: scikit-learn's logistic regression on the concatenated mean-pooled face
  and context features, its regularisation C chosen on the validation split.

Frames are those ``evaluate`` scores: the middle candidate of each segment, no flip. The
validation split is train-head's (``--val-fraction``/``--val-seed``, or the cache's val split);
the test split is read only to report the chosen model's numbers.
"""

from __future__ import annotations

import logging

import numpy as np

from heads.data import Splits
from heads.metrics import compute_report
from cache.core.errors import CaerError
from heads.data import middle_candidate  # the frame evaluate scores

log = logging.getLogger("caer")

# The regularisation strengths the linear probe tries (C, inverse strength), ascending: on a
# tie in validation UAR the stronger regularisation (smaller C) is kept.
PROBE_C = tuple(float(c) for c in np.logspace(-3, 3, 7))
LOGIT_SCALE = 100.0  # CLIP's trained scale; the head's logits use the same fixed 100


def frame_features(store, rows: np.ndarray, stream: str) -> np.ndarray:
    """float32 ``[len(rows), S, D]``: the middle candidate of each segment, no flip."""
    k = middle_candidate(int(store.fingerprint["candidates"]))
    if len(rows) == 0:
        return np.zeros((0, int(store.fingerprint["segments"]),
                         int(store.fingerprint["feature_dim"])), np.float32)
    return np.asarray(store.features(stream)[np.sort(rows)][:, :, k], np.float32)


def _scores(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> tuple:
    if len(y_true) == 0:
        return None, None
    report = compute_report(y_true, y_pred, classes, warn=False)
    return report.uar, report.war


def _row(method: str, streams: str, classes, labels: dict, predictions: dict, **extra) -> dict:
    val_uar, _ = _scores(labels["val"], predictions["val"], classes)
    test_uar, test_war = _scores(labels["test"], predictions["test"], classes)
    return {"method": method, "streams": streams, "val_uar": val_uar, "test_uar": test_uar,
            "test_war": test_war, **extra}


def zero_shot(store, splits: Splits, streams: list[str]) -> list[dict]:
    """One row per value of ``streams`` (both, face, context); UAR/WAR as fractions."""
    import torch

    from pipeline.clip import load_clip

    fp = store.fingerprint
    clip = load_clip(fp["clip_spec"])
    if clip.revision != fp["clip_revision"]:
        raise CaerError(f"zero-shot: the cache was built with CLIP {fp['clip_spec']} revision "
                        f"{fp['clip_revision']}, but it now loads as revision {clip.revision}; "
                        f"its text features would not match the cached image features")
    labels_all = store.clip_table(["label"])["label"].to_numpy()
    classes = list(store.labels.names)
    roles = {"val": splits.val, "test": splits.test}
    labels = {r: labels_all[np.sort(rows)] for r, rows in roles.items()}

    def text(stream: str) -> np.ndarray:
        t = clip.encode_text(store.labels.descriptors(stream)).float()
        return torch.nn.functional.normalize(t, dim=-1).numpy()

    def probabilities(stream: str, rows: np.ndarray) -> np.ndarray:
        x = frame_features(store, rows, stream)
        x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        video = x.mean(axis=1)
        video = video / np.maximum(np.linalg.norm(video, axis=-1, keepdims=True), 1e-12)
        logits = LOGIT_SCALE * video @ text(stream).T
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    out = []
    for streams_value in streams:
        predictions = {}
        for role, rows in roles.items():
            if streams_value == "both":
                p = (probabilities("face", rows) + probabilities("context", rows)) / 2
            else:
                p = probabilities(streams_value, rows)
            predictions[role] = p.argmax(axis=1)
        out.append(_row("zero-shot", streams_value, classes, labels, predictions))
    return out


def linear_probe(store, splits: Splits) -> dict:
    """The probe's row, with ``C`` and ``val_uar_by_c`` (the selection) added."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    import warnings

    if len(splits.val) == 0:
        raise CaerError("linear-probe chooses its regularisation on the validation split, and "
                        "there is none: set --val-fraction > 0, add a val split to the cache, "
                        "or pass --baselines zero-shot")
    labels_all = store.clip_table(["label"])["label"].to_numpy()
    classes = list(store.labels.names)

    def pooled(rows):
        return np.concatenate([frame_features(store, rows, s).mean(axis=1)
                               for s in ("face", "context")], axis=1)

    x_train, y_train = pooled(splits.train), labels_all[np.sort(splits.train)]
    if len(np.unique(y_train)) < 2:
        raise CaerError("linear-probe: the train split holds a single class")
    roles = {"val": splits.val, "test": splits.test}
    x = {r: pooled(rows) for r, rows in roles.items()}
    labels = {r: labels_all[np.sort(rows)] for r, rows in roles.items()}
    by_c, models = {}, {}
    for c in PROBE_C:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = LogisticRegression(C=c, max_iter=2000).fit(x_train, y_train)
        by_c[c], _ = _scores(labels["val"], model.predict(x["val"]), classes)
        models[c] = model
    best = max(PROBE_C, key=lambda c: (by_c[c], -c))  # ties: the smaller C
    model = models[best]
    predictions = {r: (model.predict(v) if len(v) else np.zeros(0, np.int64))
                   for r, v in x.items()}
    log.info("linear-probe: C %g chosen on val (val UAR %.2f %%)", best, 100 * by_c[best])
    return _row("linear-probe", "both", classes, labels, predictions, C=best,
                val_uar_by_c={f"{c:g}": v for c, v in by_c.items()})
