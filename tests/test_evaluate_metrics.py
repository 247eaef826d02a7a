"""Metrics against hand-computed values on a fixed prediction set, and the patient bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from covidcxr.evaluate.metrics import (
    MetricsError,
    apply_temperature,
    compute_metrics,
    expected_calibration_error,
    fit_temperature,
    group_breakdown,
    predict_labels,
    weighted_ap,
    weighted_auc,
)

CLASSES = ["normal", "pneumonia", "COVID-19"]
# 8 images, 5 patients. Argmax predictions: 0, 2, 1, 0, 2, 2, 1, 2
Y = np.array([0, 0, 1, 1, 2, 2, 2, 2])
P = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.3, 0.2, 0.5],
        [0.1, 0.8, 0.1],
        [0.6, 0.3, 0.1],
        [0.1, 0.1, 0.8],
        [0.2, 0.1, 0.7],
        [0.1, 0.5, 0.4],
        [0.05, 0.05, 0.9],
    ]
)
PAT = ["a", "a", "b", "c", "d", "d", "e", "e"]


@pytest.fixture(scope="module")
def m() -> dict:
    return compute_metrics(Y, P, PAT, CLASSES, n_boot=300, seed=1)


def test_confusion_and_accuracy(m: dict) -> None:
    assert m["confusion_matrix"] == [[1, 0, 1], [1, 1, 0], [0, 1, 3]]
    assert m["accuracy"]["value"] == pytest.approx(5 / 8)
    assert m["accuracy"]["n_images"] == 8 and m["accuracy"]["n_patients"] == 5
    assert m["balanced_accuracy"]["value"] == pytest.approx((0.5 + 0.5 + 0.75) / 3)


def test_per_class_hand_computed(m: dict) -> None:
    covid = m["per_class"]["COVID-19"]  # TP 3, FN 1, FP 1, TN 3
    for k in ("sensitivity", "specificity", "ppv", "npv", "f1"):
        assert covid[k]["value"] == pytest.approx(0.75), k
    normal = m["per_class"]["normal"]  # TP 1, FN 1, FP 1 (row 3), TN 5
    assert normal["sensitivity"]["value"] == pytest.approx(0.5)
    assert normal["specificity"]["value"] == pytest.approx(5 / 6)
    assert normal["ppv"]["value"] == pytest.approx(0.5)
    assert normal["npv"]["value"] == pytest.approx(5 / 6)
    assert normal["f1"]["value"] == pytest.approx(0.5)
    # COVID AUC: 15 of 16 positive/negative pairs ranked right; AP: precisions 1, 1, 1, 4/5 at the positives
    assert covid["auc"]["value"] == pytest.approx(15 / 16)
    assert covid["ap"]["value"] == pytest.approx((1 + 1 + 1 + 0.8) / 4)


def test_counts_behind_each_figure(m: dict) -> None:
    covid = m["per_class"]["COVID-19"]
    assert (covid["sensitivity"]["n_images"], covid["sensitivity"]["n_patients"]) == (4, 2)  # d, e
    assert (covid["specificity"]["n_images"], covid["specificity"]["n_patients"]) == (4, 3)  # a, b, c
    assert (covid["ppv"]["n_images"], covid["ppv"]["n_patients"]) == (4, 3)  # rows 1, 4, 5, 7: a, d, e
    assert covid["auc"]["n_positive"] == 4 and covid["auc"]["n_negative"] == 4


def test_cis_bracket_the_value(m: dict) -> None:
    for c in CLASSES:
        for k, f in m["per_class"][c].items():
            if f["value"] is None or f["ci_low"] is None:
                continue
            assert 0.0 <= f["ci_low"] <= f["ci_high"] <= 1.0, (c, k)
    assert m["accuracy"]["ci_low"] < m["accuracy"]["value"] < m["accuracy"]["ci_high"]


def test_threshold_table_and_operating_point(m: dict) -> None:
    rows = {r["threshold"]: r for r in m["threshold_table"]}
    assert [r["threshold"] for r in m["threshold_table"]] == pytest.approx([0.1 * i for i in range(1, 10)])
    # p(COVID) >= 0.5: rows 1 (negative), 4, 5, 7 -> sens 3/4, spec 3/4
    assert rows[0.5]["sensitivity"]["value"] == pytest.approx(0.75)
    assert rows[0.5]["specificity"]["value"] == pytest.approx(0.75)
    # >= 0.3 adds row 6 (positive): sens 1, spec 3/4; >= 0.1 everything is positive
    assert rows[0.3]["sensitivity"]["value"] == pytest.approx(1.0)
    assert rows[0.1]["specificity"]["value"] == pytest.approx(0.0)
    op = m["operating_point"]
    assert op["threshold"] == pytest.approx(0.4)  # highest threshold reaching sensitivity 0.95
    assert op["sensitivity"]["value"] == pytest.approx(1.0)
    assert op["specificity"]["value"] == pytest.approx(0.75)


def test_threshold_decision_rule() -> None:
    assert predict_labels(P).tolist() == [0, 2, 1, 0, 2, 2, 1, 2]
    # p(COVID) >= 0.35 turns row 6 (0.4) into COVID-19; rows below fall back to argmax of the rest
    assert predict_labels(P, 0.35, 2).tolist() == [0, 2, 1, 0, 2, 2, 2, 2]
    r = compute_metrics(Y, P, PAT, CLASSES, threshold=0.35, n_boot=0)
    assert r["per_class"]["COVID-19"]["sensitivity"]["value"] == pytest.approx(1.0)
    assert r["per_class"]["COVID-19"]["sensitivity"]["ci_low"] is None  # no bootstrap asked


def test_bootstrap_is_over_patients() -> None:
    """Duplicating every image inside its patient changes nothing; splitting patients narrows the CI."""
    rng = np.random.default_rng(0)
    n = 60
    y = rng.integers(0, 3, n)
    p = rng.dirichlet([1, 1, 1], n)
    pat = [f"p{i // 3}" for i in range(n)]
    base = compute_metrics(y, p, pat, CLASSES, n_boot=400, seed=3)
    dup = compute_metrics(np.repeat(y, 2), np.repeat(p, 2, 0), np.repeat(pat, 2), CLASSES, n_boot=400, seed=3)
    for k in ("value", "ci_low", "ci_high"):
        assert dup["accuracy"][k] == pytest.approx(base["accuracy"][k])
        assert dup["per_class"]["COVID-19"]["auc"][k] == pytest.approx(base["per_class"]["COVID-19"]["auc"][k])
    assert dup["accuracy"]["n_images"] == 2 * base["accuracy"]["n_images"]
    # the same duplicates treated as separate patients give a narrower (wrong) interval
    fake = compute_metrics(np.repeat(y, 2), np.repeat(p, 2, 0), [str(i) for i in range(2 * n)], CLASSES,
                           n_boot=400, seed=3)
    width = lambda f: f["ci_high"] - f["ci_low"]  # noqa: E731
    assert width(fake["accuracy"]) < width(base["accuracy"])


def test_weighted_ranking_matches_sklearn() -> None:
    rng = np.random.default_rng(5)
    for _ in range(10):
        n = int(rng.integers(6, 40))
        y = rng.random(n) < 0.4
        y[:2] = [True, False]
        s = np.round(rng.random(n), 1)  # ties on purpose
        w = rng.integers(1, 4, (3, n)).astype(float)
        auc, ap = weighted_auc(y, s, w), weighted_ap(y, s, w)
        for b in range(3):
            assert auc[b] == pytest.approx(roc_auc_score(y, s, sample_weight=w[b]))
            assert ap[b] == pytest.approx(average_precision_score(y, s, sample_weight=w[b]))
    assert np.isnan(weighted_auc(np.array([True, True]), np.array([0.1, 0.2]), np.ones((1, 2))))[0]


def test_ece_hand_computed_and_torchmetrics() -> None:
    # 10 bins: (0.4,0.5]: conf .5 .5 acc 0 -> .125; (0.5,0.6]: .6 acc 0 -> .075; (0.6,0.7]: .7 .7 acc 1 -> .075;
    # (0.7,0.8]: .8 .8 acc 1 -> .05; (0.8,0.9]: .9 acc 1 -> .0125
    e = expected_calibration_error(Y, P, n_bins=10)
    assert e["ece"] == pytest.approx(0.3375)
    assert sum(b["n"] for b in e["bins"]) == 8
    import torch
    from torchmetrics.functional.classification import multiclass_calibration_error

    rng = np.random.default_rng(2)
    p = rng.dirichlet([2, 1, 1], 500)
    y = rng.integers(0, 3, 500)
    ref = multiclass_calibration_error(torch.tensor(p), torch.tensor(y), num_classes=3, n_bins=15, norm="l1")
    assert expected_calibration_error(y, p, 15)["ece"] == pytest.approx(float(ref), abs=1e-6)


def test_temperature_recovers_known_value() -> None:
    rng = np.random.default_rng(4)
    z = rng.normal(0, 3, (4000, 3))
    true_p = apply_temperature(np.exp(z) / np.exp(z).sum(1, keepdims=True), 2.0)
    y = np.array([rng.choice(3, p=row) for row in true_p])
    over = np.exp(z) / np.exp(z).sum(1, keepdims=True)  # overconfident by a factor 2
    assert fit_temperature(y, over) == pytest.approx(2.0, rel=0.1)
    assert np.allclose(apply_temperature(over, 2.0), true_p)


def test_group_breakdown_shows_per_source() -> None:
    src = ["x", "x", "x", "x", "y", "y", "y", "y"]
    g = group_breakdown(Y, P, PAT, CLASSES, src, n_boot=50)
    assert set(g) == {"x", "y"}
    assert g["x"]["n_images"] == 4 and g["x"]["n_patients"] == 3
    assert g["y"]["accuracy"]["value"] == pytest.approx(3 / 4)
    assert g["x"]["per_class"]["COVID-19"]["sensitivity"]["value"] is None  # no COVID image in x
    assert g["x"]["accuracy"]["value"] == pytest.approx(2 / 4)


@pytest.mark.parametrize(
    "args, msg",
    [
        ((Y, P[:, :2], PAT), "N x 3"),
        ((Y[:5], P, PAT), "lengths differ"),
        ((Y + 1, P, PAT), "class indices"),
        ((Y, np.full_like(P, np.nan), PAT), "NaN"),
    ],
)
def test_bad_inputs(args: tuple, msg: str) -> None:
    with pytest.raises(MetricsError, match=msg):
        compute_metrics(*args, CLASSES, n_boot=10)


def _rare_covid(missed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """60 patients, one image each; patients 0-2 have COVID-19, ``missed`` of them called normal."""
    y = np.array([2, 2, 2] + [0, 1] * 28 + [0])
    p = np.tile([0.6, 0.3, 0.1], (60, 1))
    p[y == 1] = [0.2, 0.7, 0.1]
    p[:3] = [0.1, 0.1, 0.8]
    p[:missed] = [0.7, 0.2, 0.1]
    return y, p, [f"p{i:02d}" for i in range(60)]


def test_rare_class_ci_is_not_a_point_when_every_covid_patient_is_found() -> None:
    """3 COVID-19 patients out of 60, all found: the bootstrap alone gives [1.0, 1.0]; the CI must not."""
    y, p, pat = _rare_covid()
    r = compute_metrics(y, p, pat, CLASSES, n_boot=500, seed=0)
    se = r["per_class"]["COVID-19"]["sensitivity"]
    assert se["value"] == 1.0 and se["n_patients"] == 3
    assert (se["ci_low"], se["ci_high"]) != (1.0, 1.0)
    assert se["ci_low"] == pytest.approx(0.025 ** (1 / 3), abs=1e-9)  # Clopper-Pearson, 3 of 3
    assert se["ci_high"] == 1.0 and "clopper-pearson over 3 patients" in se["ci_method"]
    assert se["n_replicates"] == 500


def test_stratified_bootstrap_keeps_every_class_in_every_replicate() -> None:
    """One of the 3 COVID-19 patients missed: no replicate lacks COVID-19, and the figure says how many
    replicates its CI rests on (an unstratified draw loses ~5% of them to NaN)."""
    y, p, pat = _rare_covid(missed=1)
    r = compute_metrics(y, p, pat, CLASSES, n_boot=400, seed=2)
    assert "class" in r["bootstrap"]["stratified_by"] and r["bootstrap"]["n_strata"] == 3
    se = r["per_class"]["COVID-19"]["sensitivity"]
    assert se["value"] == pytest.approx(2 / 3)
    assert se["n_replicates"] == 400 and se["ci_method"].startswith("percentile bootstrap")
    assert se["ci_low"] < 2 / 3 and se["ci_high"] == 1.0
    # each stratum keeps its size: the weights of the 3 COVID-19 images sum to 3 in every replicate
    from covidcxr.evaluate.metrics import _bootstrap_weights, patient_strata

    idx = np.arange(60)
    w = _bootstrap_weights(idx, 60, 200, 0, patient_strata(y, idx, 60))
    assert np.all(w[:, :3].sum(1) == 3) and np.all(w.sum(1) == 60)
    # a PPV can still be undefined in a replicate; then n_replicates says so instead of hiding it
    ppv = r["per_class"]["COVID-19"]["ppv"]
    assert 0 < ppv["n_replicates"] <= 400


def test_report_marks_exact_and_thinned_intervals() -> None:
    """The report says when a CI is Clopper-Pearson or rests on fewer replicates: nothing changes silently."""
    from covidcxr.evaluate.report import _fmt_ci

    y, p, pat = _rare_covid(missed=1)
    r = compute_metrics(y, p, pat, CLASSES, n_boot=200, seed=0)
    assert "†" in _fmt_ci(compute_metrics(*_rare_covid(), CLASSES, n_boot=50)["per_class"]["COVID-19"]["sensitivity"])
    se = r["per_class"]["COVID-19"]["sensitivity"]
    assert se["n_boot"] == 200 and "replicates" not in _fmt_ci(se) and "†" not in _fmt_ci(se)
    thin = {**se, "n_replicates": 150}
    assert _fmt_ci(thin).endswith("(150/200 replicates)")
