"""heads/metrics.py against scikit-learn on crafted predictions, including absent classes."""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext

import numpy as np
import pytest
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix,
                             precision_recall_fscore_support, recall_score)

from heads.metrics import (PER_CLASS_KEYS, REPORT_KEYS, compute_grouped, compute_report,
                           format_table, plot_confusion)

CLASSES = ["Neutrality", "Enjoyment", "Confusion", "Fatigue", "Distraction"]


def _crafted(seed=0, n=200, absent=(2,)):
    """Skewed labels like RAER's test split, with `absent` classes never true (but sometimes
    predicted) and a predictor that is right ~60 % of the time."""
    rng = np.random.default_rng(seed)
    weights = np.array([0.6, 0.1, 0.05, 0.1, 0.15])
    weights[list(absent)] = 0
    y_true = rng.choice(5, size=n, p=weights / weights.sum())
    y_pred = np.where(rng.random(n) < 0.6, y_true, rng.integers(0, 5, size=n))
    return y_true, y_pred


def _none_to_nan(values):
    return np.array([np.nan if v is None else v for v in values], dtype=float)


@pytest.mark.parametrize("seed,absent", [(0, ()), (1, (2,)), (2, (1, 4))])
def test_metrics_match_sklearn(seed, absent, caplog):
    y_true, y_pred = _crafted(seed, absent=absent)
    present = sorted(set(y_true.tolist()))
    assert [CLASSES[i] for i in range(5) if i not in present] == [CLASSES[i] for i in absent]
    with caplog.at_level(logging.WARNING, logger="caer"):
        report = compute_report(y_true, y_pred, CLASSES)

    assert report.n == len(y_true)
    assert report.war == pytest.approx(accuracy_score(y_true, y_pred))
    # UAR over the classes present in the split = sklearn's macro recall over those labels
    # = balanced accuracy (which also drops classes without support).
    assert report.uar == pytest.approx(recall_score(y_true, y_pred, labels=present,
                                                    average="macro"))
    with np.errstate(all="ignore"), pytest.warns(UserWarning) if absent else nullcontext():
        assert report.uar == pytest.approx(balanced_accuracy_score(y_true, y_pred))

    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=range(5),
                                                 zero_division=np.nan)
    per = [report.per_class[c] for c in CLASSES]
    np.testing.assert_allclose(_none_to_nan([m.recall for m in per]), r, equal_nan=True)
    np.testing.assert_allclose(_none_to_nan([m.precision for m in per]), p, equal_nan=True)
    np.testing.assert_allclose(_none_to_nan([m.f1 for m in per]), f, equal_nan=True)
    assert [m.support for m in per] == s.tolist()

    cm = confusion_matrix(y_true, y_pred, labels=range(5))
    assert report.confusion == cm.tolist()
    assert [m.predicted for m in per] == cm.sum(axis=0).tolist()
    rows = np.asarray(report.confusion_normalized)
    with np.errstate(invalid="ignore"):
        expected_rows = np.nan_to_num(confusion_matrix(y_true, y_pred, labels=range(5),
                                                       normalize="true"))
    np.testing.assert_allclose(rows, expected_rows)
    assert not np.isnan(rows).any()
    for i in range(5):  # present rows sum to 1, absent rows are exactly zero
        assert rows[i].sum() == pytest.approx(0.0 if i in absent else 1.0)

    assert report.absent_classes == [CLASSES[i] for i in absent]
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    if absent:
        assert len(warnings) == 1
        for i in absent:
            assert CLASSES[i] in warnings[0]
        assert "left out of UAR" in warnings[0]
    else:
        assert warnings == []


def test_absent_class_is_left_out_of_uar_not_counted_as_zero():
    # Class 2 never true; predicted once. Present classes' recalls: 1/2, 2/2, 1/3.
    y_true = [0, 0, 1, 1, 3, 3, 3]
    y_pred = [0, 1, 1, 1, 0, 2, 3]
    report = compute_report(y_true, y_pred, CLASSES)
    assert report.uar == pytest.approx((0.5 + 1.0 + 1 / 3) / 3)  # not divided by 5
    assert report.per_class["Confusion"].recall is None
    assert report.per_class["Confusion"].precision == 0.0  # predicted once, always wrong
    assert report.per_class["Distraction"].precision is None  # never predicted
    assert report.per_class["Fatigue"].precision == 1.0
    assert report.absent_classes == ["Confusion", "Distraction"]
    assert report.confusion_normalized[2] == [0.0] * 5


def test_report_json_keys_are_stable():
    y_true, y_pred = _crafted(3, n=60, absent=(2,))
    plain = compute_report(y_true, y_pred, CLASSES).to_dict()
    assert set(plain) == set(REPORT_KEYS)
    assert set(plain) == {"uar", "war", "n", "classes", "absent_classes", "per_class",
                          "confusion", "confusion_normalized", "group_by", "groups", "source"}
    assert list(plain["per_class"]) == CLASSES
    for m in plain["per_class"].values():
        assert set(m) == set(PER_CLASS_KEYS) == {"recall", "precision", "f1", "support",
                                                 "predicted"}
    assert plain["groups"] is None and plain["group_by"] is None
    # Strict JSON: undefined values are null, never NaN.
    text = json.dumps(plain, allow_nan=False)
    assert json.loads(text)["per_class"]["Confusion"]["recall"] is None

    scenes = np.array(["library", "classroom", "dormitory"])[np.arange(60) % 3]
    grouped = compute_grouped(y_true, y_pred, CLASSES, scenes, "scene").to_dict()
    assert set(grouped) == set(REPORT_KEYS)
    assert grouped["group_by"] == "scene"
    assert list(grouped["groups"]) == ["classroom", "dormitory", "library"]
    for key, g in grouped["groups"].items():
        assert set(g) == set(REPORT_KEYS)
        mask = scenes == key
        assert g["n"] == mask.sum()
        assert g["war"] == pytest.approx(accuracy_score(y_true[mask], y_pred[mask]))
        present = sorted(set(y_true[mask].tolist()))
        assert g["uar"] == pytest.approx(recall_score(y_true[mask], y_pred[mask],
                                                      labels=present, average="macro"))
    assert sum(g["n"] for g in grouped["groups"].values()) == 60
    json.dumps(grouped, allow_nan=False)


def test_group_values_missing_in_the_manifest_form_their_own_group():
    report = compute_grouped([0, 1, 1, 0], [0, 1, 0, 0], CLASSES[:2],
                             ["a", None, float("nan"), ""], "s")
    assert list(report.groups) == ["(missing)", "a"]
    assert report.groups["(missing)"].n == 3


def test_table_lists_every_class_and_both_summaries():
    report = compute_report([0, 0, 1, 1, 3, 3, 3], [0, 1, 1, 1, 0, 2, 3], CLASSES)
    table = format_table(report)
    lines = table.splitlines()
    for name in CLASSES:
        assert any(line.startswith(name) for line in lines)
    assert "UAR 61.11 %" in table  # (50 + 100 + 33.33) / 3
    assert "WAR 57.14 %" in table  # 4 / 7
    assert "absent: Confusion, Distraction" in table


def test_bad_labels_are_rejected():
    with pytest.raises(ValueError, match="outside"):
        compute_report([0, 5], [0, 1], CLASSES)
    with pytest.raises(ValueError, match="labels"):
        compute_report([0, 1], [0], CLASSES)


def test_confusion_png_is_a_valid_image(tmp_path):
    from PIL import Image

    y_true, y_pred = _crafted(4, n=80, absent=(2,))
    report = compute_report(y_true, y_pred, CLASSES, warn=False)
    path = plot_confusion(report, tmp_path / "confusion_matrix.png")
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        # figsize (5.5 + 1.2, 5.5) inches at 100 dpi for five classes
        assert image.size == (670, 550)
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 10  # not a blank canvas: cells, labels and colour bar are drawn
    # Seven classes make a larger figure, so names stay readable.
    seven = compute_report([0, 6], [0, 6], [f"class{i}" for i in range(7)], warn=False)
    with Image.open(plot_confusion(seven, tmp_path / "seven.png")) as image:
        assert image.size[0] > 670
