"""Issue 11 §3 / 15 §7: one decision rule everywhere.

One checkpoint with a val-chosen COVID-19 threshold goes through every path that labels images --
``evaluate`` (predictions.csv), ``compare``, ``explain``, ``predict`` and the service -- and every path
must give every image the same label and state the rule with the threshold's value. The threshold is
set where it disagrees with argmax on some images, so a path that falls back to argmax fails.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from covidcxr import models
from covidcxr.cli import main
from covidcxr.decision import DecisionRule
from covidcxr.preprocess import get_preset

CLASSES = ["normal", "pneumonia", "COVID-19"]


def _images(root: Path, n: int) -> list[Path]:
    import cv2

    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        g = np.linspace(0, 1, 96)[:, None] * np.linspace(0.2, 1, 80)[None]
        img = np.clip(g * rng.uniform(0.3, 1.0) + rng.normal(0, rng.uniform(0.02, 0.3), g.shape), 0, 1)
        p = root / f"x{i:02d}.png"
        cv2.imwrite(str(p), (img * 255).astype(np.uint8))
        out.append(p)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from covidcxr.predict import Predictor

    root = tmp_path_factory.mktemp("rule")
    torch.manual_seed(3)
    ckpt = root / "m.ckpt"
    net = models.build("resnet18", num_classes=3)
    with torch.no_grad():  # make the COVID-19 output compete: a bias that puts it near the others
        net.fc.bias.copy_(torch.tensor([0.3, 0.2, 0.0]))
    models.save(ckpt, net, arch="resnet18", classes=CLASSES, preset=get_preset("deepcovid", size=64))
    imgs = _images(root, 16)
    labels = (CLASSES * 6)[:16]
    df = pd.DataFrame({"patient_id": [f"p{i}" for i in range(16)], "path": [str(p) for p in imgs], "label": labels,
                       "source": "synthetic", "split": ["val"] * 8 + ["test"] * 8})
    manifest = root / "manifest.csv"
    df.to_csv(manifest, index=False)
    # a threshold that disagrees with argmax on some test images: the median of p(COVID-19) on test
    pred = Predictor.from_path(ckpt)
    p = np.array([r["probabilities"]["COVID-19"] for r in pred.predict_paths([str(x) for x in imgs[8:]])])
    thr = float(np.median(p))
    argmax = [r["label"] for r in Predictor.from_path(ckpt).predict_paths([str(x) for x in imgs[8:]])]
    obj = torch.load(ckpt, map_location="cpu", weights_only=False)
    obj["threshold"] = thr
    obj.setdefault("metrics", {})["operating_point"] = {
        "threshold": thr, "target_sensitivity": 0.95, "chosen_on": "val", "positive": "COVID-19",
        "note": "threshold chosen on the validation split (8 images)"}
    torch.save(obj, ckpt)
    rule = DecisionRule.from_checkpoint(thr, obj["metrics"])
    probs = np.array([[r["probabilities"][c] for c in CLASSES] for r in
                      Predictor.from_path(ckpt).predict_paths([str(x) for x in imgs[8:]])])
    expected = {str(x): CLASSES[i] for x, i in zip(imgs[8:], rule.label_indices(probs, CLASSES))}
    assert any(argmax[k] != expected[str(imgs[8 + k])] for k in range(8)), "threshold must change some labels"
    return {"root": root, "ckpt": ckpt, "manifest": manifest, "test": [str(x) for x in imgs[8:]], "thr": thr,
            "expected": expected}


def test_every_path_gives_the_same_labels_and_states_the_rule(setup, tmp_path, capsys) -> None:
    ckpt, manifest, test, thr, expected = (setup[k] for k in ("ckpt", "manifest", "test", "thr", "expected"))
    thr_text = f"{thr:.4f}"

    # evaluate: predictions.csv, metrics.json, report.md
    rep = tmp_path / "eval"
    assert main(["evaluate", "--model", str(ckpt), "--data", str(manifest), "--split", "test", "--out", str(rep),
                 "--n-boot", "0"]) == 0
    pc = pd.read_csv(rep / "predictions.csv")
    assert dict(zip(pc["path"], pc["pred"])) == expected
    assert (pc["rule"] == "threshold").all() and np.allclose(pc["threshold"], thr)
    m = json.loads((rep / "metrics.json").read_text())
    assert m["decision_rule"]["threshold"] == pytest.approx(thr) and m["decision_rule"]["chosen_on"] == "val"
    report = (rep / "report.md").read_text()
    assert f"decision rule: COVID-19 if p(COVID-19) >= {thr_text}" in report and "validation split" in report
    assert "not used for labels" in report  # the test-fitted target-sensitivity threshold is labelled as such

    # compare: the same confusion matrix as evaluate, and the rule in its table
    cmp_out = tmp_path / "cmp"
    assert main(["compare", str(ckpt), "--data", str(manifest), "--split", "test", "--out", str(cmp_out),
                 "--n-boot", "0", "--latency-repeats", "1"]) == 0
    row = json.loads((cmp_out / "compare.json").read_text())["rows"][0]
    assert row["confusion_matrix"] == m["metrics"]["confusion_matrix"]
    assert row["decision_rule"]["threshold"] == pytest.approx(thr)
    assert f">= {thr_text} (val)" in (cmp_out / "compare.md").read_text()

    # explain: its predicted label
    ex = tmp_path / "ex"
    assert main(["explain", *test, "--model", str(ckpt), "--out", str(ex), "--method", "gradcam"]) == 0
    recs = json.loads((ex / "explain.json").read_text())["records"]
    assert {r["file"]: r["predicted"] for r in recs} == expected
    assert all(r["threshold"] == pytest.approx(thr) and thr_text in r["decision_rule"] for r in recs)

    # predict CLI
    out = tmp_path / "p.jsonl"
    assert main(["predict", *test, "--model", str(ckpt), "--out", str(out), "--workers", "0", "-q",
                 "--no-plausibility"]) == 0
    recs = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert {r["path"]: r["label"] for r in recs} == expected
    assert all(thr_text in r["decision_rule"] for r in recs)

    # the service (and the web page, which shows the response's decision_rule)
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from covidcxr.serve import create_app

    with TestClient(create_app(ckpt, api_key="", plausibility=False)) as c:
        card = c.get("/v1/model").json()
        assert card["decision_rule"]["threshold"] == pytest.approx(thr)
        for path in test:
            r = c.post("/v1/predict", files={"file": ("x.png", Path(path).read_bytes(), "image/png")}).json()
            assert r["label"] == expected[path] and thr_text in r["decision_rule"]
    capsys.readouterr()


def test_set_threshold_report_is_computed_at_the_new_threshold(setup, tmp_path) -> None:
    """15 §7: with --set-threshold the report used the old threshold (or argmax)."""
    ckpt = tmp_path / "m.ckpt"
    shutil.copy(setup["ckpt"], ckpt)
    obj = torch.load(ckpt, map_location="cpu", weights_only=False)
    obj["threshold"] = None  # start from argmax
    torch.save(obj, ckpt)
    rep = tmp_path / "r"
    assert main(["evaluate", "--model", str(ckpt), "--data", str(setup["manifest"]), "--split", "test",
                 "--out", str(rep), "--n-boot", "0", "--set-threshold", "--target-sensitivity", "0.5"]) == 0
    stored = torch.load(ckpt, map_location="cpu", weights_only=False)["threshold"]
    m = json.loads((rep / "metrics.json").read_text())
    assert m["decision_rule"]["rule"] == "threshold" and m["decision_rule"]["threshold"] == pytest.approx(stored)
    pc = pd.read_csv(rep / "predictions.csv")
    covid = pc["prob_COVID-19"] >= stored
    assert ((pc["pred"] == "COVID-19") == covid).all()  # labels at the new threshold, not argmax


def test_val_calibrate_after_ece_is_not_measured_on_the_fitting_data(setup, tmp_path, monkeypatch) -> None:
    """15 §7: --split val --calibrate measured the 'after' ECE on the data the temperature was fitted on."""
    import covidcxr.evaluate.core as core

    ckpt = tmp_path / "m.ckpt"
    shutil.copy(setup["ckpt"], ckpt)
    seen = []
    real_fit = core.fit_temperature

    def spy(y, probs):
        seen.append(len(y))
        return real_fit(y, probs)

    monkeypatch.setattr(core, "fit_temperature", spy)
    rep = tmp_path / "r"
    assert main(["evaluate", "--model", str(ckpt), "--data", str(setup["manifest"]), "--split", "val",
                 "--out", str(rep), "--n-boot", "0", "--calibrate"]) == 0
    cal = json.loads((rep / "metrics.json").read_text())["calibration"]
    assert cal["after_measured"] == "cross-fitted on the evaluated split" and "cross-fitted" in cal["note"]
    assert 4 in seen  # halves of the 8 val patients: each scaled by a temperature fitted on the other half
    assert "cross-fitted" in (rep / "report.md").read_text()


def test_rule_describes_itself_and_flags_a_test_fitted_threshold() -> None:
    r = DecisionRule.from_checkpoint(0.117, {"operating_point": {"chosen_on": "test"}})
    assert "0.1170" in r.describe(CLASSES) and "test" in r.describe(CLASSES)
    assert "optimistic" in r.describe(CLASSES, evaluated_split="test")
    assert DecisionRule().describe(CLASSES).startswith("argmax")
    old = DecisionRule.from_checkpoint(0.2, {"operating_point": {"note": "threshold chosen on the validation split"}})
    assert old.chosen_on == "val"
    p = np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    assert list(DecisionRule(0.15).label_indices(p, CLASSES)) == [2, 2]
    assert list(DecisionRule(None).label_indices(p, CLASSES)) == [0, 2]
