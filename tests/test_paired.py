"""covidcxr.evaluate.paired: the paired, stratified patient bootstrap of a difference between two models."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from covidcxr.evaluate.metrics import MetricsError
from covidcxr.evaluate.paired import (
    main,
    paired_bootstrap,
    read_predictions,
    stratified_patient_weights,
)

CLASSES = ["normal", "pneumonia", "COVID-19"]


def frame(labels, probs_covid, patients, seed=0):
    """A predictions.csv-like frame; pred is COVID-19 when p >= 0.5, else the true label if not COVID, else normal."""
    rng = np.random.default_rng(seed)
    labels = list(labels)
    p = np.asarray(probs_covid, float)
    rest = (1 - p)[:, None] * rng.dirichlet([1, 1], size=len(p))
    pred = ["COVID-19" if pc >= 0.5 else (lab if lab != "COVID-19" else "normal") for pc, lab in zip(p, labels)]
    return pd.DataFrame({"index": range(len(p)), "patient_id": patients, "path": [f"img{i}.png" for i in range(len(p))],
                         "label": labels, "pred": pred, "prob_normal": rest[:, 0], "prob_pneumonia": rest[:, 1],
                         "prob_COVID-19": p})


def toy(n=60, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.choice(CLASSES, size=n, p=[0.3, 0.2, 0.5])
    pats = [f"p{i // 2}" for i in range(n)]  # two images per patient
    # one label per patient (as in the benchmark)
    labels = [labels[2 * (i // 2)] for i in range(n)]
    return labels, pats


def test_identical_models_give_zero_difference():
    labels, pats = toy()
    p = np.random.default_rng(1).random(len(labels))
    a = frame(labels, p, pats)
    res = paired_bootstrap(a, a.copy(), n_boot=200)
    for m, row in res["metrics"].items():
        assert row["diff"] == 0.0, m
        assert row["ci_low"] == 0.0 and row["ci_high"] == 0.0, m
        assert row["n_replicates"] == 200


def test_better_model_has_ci_above_zero_and_point_values_match_sklearn():
    labels, pats = toy(120)
    y = np.asarray(labels) == "COVID-19"
    rng = np.random.default_rng(2)
    weak = rng.random(len(y))                               # chance
    strong = np.clip(y * 0.6 + rng.random(len(y)) * 0.4, 0, 1)  # separates perfectly
    res = paired_bootstrap(frame(labels, weak, pats), frame(labels, strong, pats, seed=3), n_boot=500)
    auc = res["metrics"]["auc"]
    assert auc["a"] == pytest.approx(roc_auc_score(y, weak))
    assert auc["b"] == pytest.approx(1.0)
    assert auc["ci_low"] > 0
    assert auc["a_ci"][0] < auc["a"] < auc["a_ci"][1] and auc["b_ci"] == [1.0, 1.0]
    assert auc["p_two_sided"] < 0.05
    # shuffled order of B's rows must not matter: rows are matched by path
    b = frame(labels, strong, pats, seed=3).sample(frac=1.0, random_state=0)
    assert paired_bootstrap(frame(labels, weak, pats), b, n_boot=500)["metrics"]["auc"]["diff"] == pytest.approx(auc["diff"])


def test_auc_negatives_restricts_to_covid_vs_normal():
    labels, pats = toy(80)
    rng = np.random.default_rng(4)
    p = rng.random(len(labels))
    a = frame(labels, p, pats)
    b = frame(labels, p ** 2, pats)  # same ranking: difference 0 under any subset
    res = paired_bootstrap(a, b, negatives=["normal"], n_boot=100)
    keep = np.isin(labels, ["normal", "COVID-19"])
    want = roc_auc_score(np.asarray(labels)[keep] == "COVID-19", p[keep])
    assert res["metrics"]["auc"]["a"] == pytest.approx(want)
    assert res["metrics"]["auc"]["diff"] == pytest.approx(0.0)
    assert res["auc_negatives"] == ["normal"]


def test_stratified_weights_keep_each_stratum_size():
    pats = ["a", "a", "b", "c", "d", "e", "e"]
    strata = ["x", "x", "x", "y", "y", "y", "y"]
    w = stratified_patient_weights(pats, strata, n_boot=300, seed=0)
    # per replicate: patients drawn from stratum x = 2 (a, b), from y = 3 (c, d, e)
    per_patient = pd.DataFrame(w.T).groupby(np.asarray(pats)).first()
    x = per_patient.loc[["a", "b"]].sum(axis=0).to_numpy()
    y = per_patient.loc[["c", "d", "e"]].sum(axis=0).to_numpy()
    assert (x == 2).all() and (y == 3).all()
    assert (w[:, 0] == w[:, 1]).all()  # both images of patient a share a weight
    assert w[:, 0].std() > 0           # and it varies across replicates


def test_rare_class_never_missing_from_a_replicate():
    # 1 normal patient among 40: a plain bootstrap would lose it in ~37% of replicates
    labels = ["normal"] + ["COVID-19"] * 39
    pats = [f"p{i}" for i in range(40)]
    p = np.linspace(0, 1, 40)
    res = paired_bootstrap(frame(labels, p, pats), frame(labels, p[::-1], pats), n_boot=300)
    assert res["metrics"]["auc"]["n_replicates"] == 300
    assert res["metrics"]["macro_sensitivity"]["n_replicates"] == 300


def test_different_images_or_labels_are_refused():
    labels, pats = toy(20)
    p = np.random.default_rng(0).random(20)
    a = frame(labels, p, pats)
    with pytest.raises(MetricsError, match="not scored on the same images"):
        paired_bootstrap(a, a.iloc[1:].copy())
    b = a.copy()
    b.loc[0, "label"] = "pneumonia" if b.loc[0, "label"] != "pneumonia" else "normal"
    with pytest.raises(MetricsError, match="different labels"):
        paired_bootstrap(a, b)


def test_cli_writes_json_and_one_line_errors(tmp_path, capsys):
    labels, pats = toy(40)
    p = np.random.default_rng(0).random(40)
    for name, q in (("A", p), ("B", np.sqrt(p))):
        (tmp_path / name).mkdir()
        frame(labels, q, pats).to_csv(tmp_path / name / "predictions.csv", index=False)
    out = tmp_path / "paired.json"
    assert main([str(tmp_path / "A"), str(tmp_path / "B"), "--bootstrap", "50", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["metrics"]) == {"auc", "accuracy", "macro_sensitivity"}
    assert res["bootstrap"]["n_boot"] == 50
    assert main([str(tmp_path / "A"), str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0] and "no such predictions file" in err[0]
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(MetricsError, match="missing column"):
        read_predictions(bad)
