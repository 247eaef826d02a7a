"""`covidcxr site check` / `site calibrate`: conformal sets, AdaBN, the training-feature summary, refusals,
and a small real run on a model trained for a few steps on dev-set films."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from covidcxr.cli import main
from covidcxr.site.sets import class_threshold, describe_set, is_uncertain, prediction_set

CLASSES = ["normal", "pneumonia", "COVID-19"]
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- prediction sets (numpy only)


def test_prediction_set_follows_thresholds_and_always_in() -> None:
    site = {"conformal": {"thresholds": {"normal": 0.5, "pneumonia": None, "COVID-19": 0.3},
                          "always_in": ["pneumonia"]}}
    assert prediction_set([0.6, 0.1, 0.3], CLASSES, site) == ["normal", "pneumonia"]  # 1-0.3=0.7 > 0.3
    assert prediction_set([0.2, 0.05, 0.75], CLASSES, site) == ["pneumonia", "COVID-19"]  # 1-0.2 > 0.5
    # classes are matched by name, whatever their order
    assert prediction_set([0.75, 0.05, 0.2], ["COVID-19", "pneumonia", "normal"], site) == ["COVID-19", "pneumonia"]
    one = {"conformal": {"thresholds": {"normal": 0.5, "pneumonia": 0.5, "COVID-19": 0.5}, "always_in": []}}
    assert prediction_set([0.1, 0.1, 0.8], CLASSES, one) == ["COVID-19"]
    assert not is_uncertain(["COVID-19"]) and is_uncertain(["normal", "COVID-19"]) and is_uncertain([])
    assert describe_set(["normal", "COVID-19"]) == "uncertain: refer (normal, COVID-19)"
    from covidcxr.site import SiteCalibrationError

    with pytest.raises(SiteCalibrationError, match="no conformal threshold"):
        prediction_set([0.2, 0.8], ["normal", "other"], one)
    with pytest.raises(SiteCalibrationError, match="2 probabilities for 3 classes"):
        prediction_set([0.2, 0.8], CLASSES, one)


def test_sets_module_imports_no_torch() -> None:
    code = "import sys, covidcxr.site, covidcxr.site.sets; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def _synthetic(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A noisy 3-class 'model': logits = signal on the true class + noise."""
    y = rng.integers(0, 3, n)
    z = rng.normal(0, 1.0, (n, 3)) + 1.5 * np.eye(3)[y] * np.array([0.6, 1.0, 1.6])
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    return p, y


def test_conformal_sets_reach_per_class_coverage_on_synthetic_data() -> None:
    from covidcxr.site.calibrate import crepes_sets, fit_conformal

    rng = np.random.default_rng(3)
    for coverage in (0.8, 0.9):
        cov = {c: [] for c in CLASSES}
        for rep in range(5):
            pc, yc = _synthetic(900, rng)  # ~300 calibration cases per class
            conf = fit_conformal(pc, yc, CLASSES, coverage)
            assert conf["always_in"] == []
            pt, yt = _synthetic(2500, rng)
            sets = np.array([[c in prediction_set(row, CLASSES, {"conformal": conf}) for c in CLASSES] for row in pt])
            # the stored thresholds give exactly the library's (crepes) sets
            assert (sets == crepes_sets(conf, pt)).all()
            for i, c in enumerate(CLASSES):
                cov[c].append(sets[yt == i, i].mean())
        for c in CLASSES:  # marginal per-class coverage: >= nominal, and not much above it
            assert coverage - 0.02 <= np.mean(cov[c]) <= coverage + 0.03, (coverage, c, cov[c])
    # a wrong rule (argmax only) would not reach it: the sets above are not just the top class
    assert sets.sum(1).mean() > 1.0


def test_class_with_too_few_cases_is_always_in_the_set() -> None:
    from covidcxr.site.calibrate import fit_conformal

    rng = np.random.default_rng(0)
    assert class_threshold(rng.random(8), 0.9) is None  # (8 + 1) * 0.1 < 1
    assert class_threshold(rng.random(9), 0.9) is None  # (9 + 1) * 0.1 = 1: the smallest p-value is alpha
    s = rng.random(10)
    assert class_threshold(s, 0.9) == pytest.approx(s.max())  # 11 * 0.1 > 1: the largest score is the cut
    p, y = _synthetic(400, rng)
    keep = np.flatnonzero(y != 0)
    few = np.concatenate([keep, np.flatnonzero(y == 0)[:6]])
    conf = fit_conformal(p[few], y[few], CLASSES, 0.9)
    assert conf["always_in"] == ["normal"] and conf["thresholds"]["normal"] is None and conf["n"]["normal"] == 6
    # so every set holds normal, even for a film the model calls COVID-19 with certainty
    assert "normal" in prediction_set([0.0, 0.0, 1.0], CLASSES, {"conformal": conf})


# --------------------------------------------------------------------------- AdaBN


def test_adapt_bn_sets_running_stats_to_the_local_images_and_keeps_weights() -> None:
    from covidcxr import models
    from covidcxr.site.calibrate import adapt_batchnorm, batchnorm_layers

    torch.manual_seed(0)
    net = models.build("resnet18", num_classes=3).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = np.random.default_rng(1)
    images = (rng.normal(0.7, 0.3, (12, 3, 48, 48))).astype(np.float32)  # brighter, wider than ImageNet-normalised
    conv_out: list[torch.Tensor] = []
    h = net.conv1.register_forward_hook(lambda _m, _i, o: conv_out.append(o.detach()))
    n = adapt_batchnorm(net, images, batch_size=6)
    h.remove()
    assert n == len(batchnorm_layers(net)) > 0 and not net.training
    # bn1 sees conv1's output: its running mean is the average of the per-batch channel means
    want = torch.stack([o.mean(dim=(0, 2, 3)) for o in conv_out]).mean(0)
    assert torch.allclose(net.bn1.running_mean, want, atol=1e-5)
    want_var = torch.stack([o.var(dim=(0, 2, 3), unbiased=True) for o in conv_out]).mean(0)
    assert torch.allclose(net.bn1.running_var, want_var, rtol=1e-4, atol=1e-5)
    after = net.state_dict()
    params = {k for k, _ in net.named_parameters()}
    for k, v in before.items():
        if k in params:
            assert torch.equal(v, after[k]), f"weight {k} changed"
    assert not torch.allclose(before["bn1.running_mean"], after["bn1.running_mean"])
    assert not torch.allclose(before["layer4.1.bn2.running_var"], after["layer4.1.bn2.running_var"])
    # the momentum the model trains with is restored
    assert all(bn.momentum == 0.1 for bn in batchnorm_layers(net))


# --------------------------------------------------------------------------- a small real run


@pytest.fixture(scope="module")
def data(dev_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small training manifest (dev train split, cohen COVID-19 capped) and a local-site CSV of other
    patients (the dev val + test splits: normal 9, pneumonia 17, COVID-19 25)."""
    from covidcxr.data import read_manifest

    df = read_manifest(dev_manifest)
    d = tmp_path_factory.mktemp("site")
    tr = df[df["split"] == "train"]
    cap = tr[(tr["source"] == "cohen") & (tr["label"] == "COVID-19")].index[40:]
    train = pd.concat([tr.drop(cap), df[df["split"] == "val"]])
    train.to_csv(d / "train.csv", index=False)
    held = df[df["split"].isin(["val", "test"])]
    local = pd.concat([held[held["label"] != "COVID-19"], held[held["label"] == "COVID-19"].head(25)])
    local[["path", "label", "patient_id"]].to_csv(d / "local.csv", index=False)
    test = df[df["split"] == "test"]
    return {"dir": d, "train": d / "train.csv", "local": d / "local.csv",
            "test_paths": test["path"].tolist()}


@pytest.fixture(scope="module")
def run(data: dict[str, Path]) -> Path:
    """ResNet-18 at 64 px, a few optimiser steps (covidcxr.train.fit, so the runner stores the summary)."""
    from covidcxr.train import fit
    from covidcxr.train.config import load_config

    cfg = load_config(REPO / "configs" / "dev-resnet18.yaml", [
        "model.weights=none", "data.size=64", "data.batch_size=8", "data.num_workers=0", "trainer.accelerator=cpu",
        "trainer.devices=1", "trainer.progress_bar=false", "trainer.num_threads=1", "early_stopping.monitor=null",
        "trainer.max_epochs=1", "trainer.limit_train_batches=4", "trainer.log_every_n_steps=1"])
    out = data["dir"] / "run"
    fit(cfg, data=data["train"], out=out)
    return out / "best.ckpt"


def test_training_stores_a_small_feature_summary(run: Path) -> None:
    from covidcxr.models.checkpoint import read_bundle
    from covidcxr.models.features import SUMMARY_KEY

    b = read_bundle(run)
    s = b[SUMMARY_KEY]
    assert set(s["sources"]) == {"actualmed", "cohen", "figure1"}
    assert s["dim"] == 512 and s["m"] == 64 and len(s["basis"]) == 64 and len(s["basis"][0]) == s["k"]
    assert s["sources"]["cohen"]["spread_from"].startswith("val")  # 35 held-out cohen films
    assert s["all"]["q05"] < s["all"]["q50"] < s["all"]["q95"]
    assert len(pickle.dumps(s)) < 32_000, "the summary must stay small"
    json.dumps(s)  # JSON-serialisable


def test_summary_failure_only_warns(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    from covidcxr.models.features import attach_feature_summary

    bundle: dict = {}
    assert attach_feature_summary(bundle, tmp_path / "missing.ckpt", object()) is False
    assert bundle == {} and "no training-feature summary stored" in caplog.text


def _inverted(paths: list[str], out: Path, n: int = 30) -> Path:
    import cv2

    from covidcxr.io import read_image

    out.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(paths[:n]):
        img = read_image(p)
        cv2.imwrite(str(out / f"inv_{i:03d}.png"), np.round((1.0 - img) * 255).astype(np.uint8))
    return out


def test_site_check_verdicts(run: Path, data: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    like = tmp_path / "like.csv"
    pd.DataFrame({"path": data["test_paths"]}).to_csv(like, index=False)
    assert main(["site", "check", str(like), "--model", str(run), "--out", str(tmp_path / "a")]) == 0
    a = json.loads((tmp_path / "a" / "site_check.json").read_text())
    assert a["verdict"] == "looks like the training data", a["verdict_line"]
    assert a["n_images"] == len(data["test_paths"]) and sum(a["predicted_label_mix"].values()) == a["n_images"]

    inv = _inverted(data["test_paths"], tmp_path / "inverted")
    (inv / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a png")
    capsys.readouterr()
    assert main(["site", "check", str(inv), "--model", str(run), "--out", str(tmp_path / "b")]) == 0
    printed = capsys.readouterr().out
    b = json.loads((tmp_path / "b" / "site_check.json").read_text())
    assert b["verdict"] == "differs from every training source: calibrate locally before use", b["verdict_line"]
    assert b["fraction_fitting_no_source"] > a["fraction_fitting_no_source"]
    assert b["n_images"] == 30 and b["n_unreadable"] == 1 and b["unreadable"][0]["path"].endswith("broken.png")
    assert "verdict: differs from every training source" in printed and "broken.png" in printed
    rows = pd.read_csv(tmp_path / "b" / "site_check_images.csv")
    assert len(rows) == 31 and set(rows["nearest_source"].dropna()) <= {"actualmed", "cohen", "figure1"}


def test_site_check_needs_a_summary_or_reference_data(run: Path, data: dict, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    from covidcxr.models.checkpoint import atomic_torch_save, read_bundle
    from covidcxr.models.features import SUMMARY_KEY

    b = read_bundle(run)
    b.pop(SUMMARY_KEY)
    old = tmp_path / "old.ckpt"
    atomic_torch_save(b, old)
    imgs = data["test_paths"][:4]
    assert main(["site", "check", *imgs, "--model", str(old), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip()
    assert "no training-feature summary" in err and "--reference-data" in err and "\n" not in err
    assert main(["site", "check", *imgs, "--model", str(old), "--out", str(tmp_path / "y"),
                 "--reference-data", str(data["train"])]) == 0
    r = json.loads((tmp_path / "y" / "site_check.json").read_text())
    assert r["summary_from"].startswith("computed from --reference-data") and r["n_images"] == 4


def test_site_calibrate_writes_a_site_checkpoint(run: Path, data: dict, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    from covidcxr.models.checkpoint import read_bundle
    from covidcxr.predict import Predictor
    from covidcxr.site.check import file_sha256

    out = tmp_path / "site.ckpt"
    rc = main(["site", "calibrate", "--model", str(run), "--data", str(data["local"]), "--out", str(out),
               "--site", "dev-holdout", "--folds", "3", "--bootstrap", "100"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    b = read_bundle(out)
    s = b["site_calibration"]
    assert s["site"] == "dev-holdout" and s["n_per_class"] == {"normal": 9, "pneumonia": 17, "COVID-19": 25}
    assert s["parent"]["sha256"] == file_sha256(run) and s["coverage"] == 0.9 and s["adapt_bn"] is False
    assert b["temperature"] == s["temperature"] and b["threshold"] == s["threshold"]
    assert b["metrics"]["operating_point"]["chosen_on"] == "site"
    # 9 normal films are too few for 90 % coverage: always in, and the command says so
    assert s["conformal"]["always_in"] == ["normal"] and "normal is always in the prediction set" in printed
    m = s["metrics"]
    assert m["folds"] == 3 and m["by"] == "patient_id" and m["crepes_agreement"] == 1.0
    for key in ("macro_sensitivity", "sensitivity", "covid_auc"):
        assert key in m["before"] and key in m["after"]
    assert m["after"]["set_coverage"]["normal"] == 1.0 and 1.0 <= m["after"]["mean_set_size"] <= 3.0
    assert m["paired_bootstrap"]["metrics"]["macro_sensitivity"]["ci_low"] is not None
    # the weights are the parent's (no --adapt-bn)
    parent = read_bundle(run)
    assert all(torch.equal(parent["state_dict"][k], v) for k, v in b["state_dict"].items())
    # every entry point reads the ordinary fields: the predictor uses the site temperature and threshold
    pred = Predictor.from_path(out)
    assert pred.temperature == pytest.approx(s["temperature"]) and pred.threshold == pytest.approx(s["threshold"])
    rec = next(pred.predict_paths(data["test_paths"][:1]))
    pset = prediction_set([rec["probabilities"][c] for c in pred.classes], pred.classes, s)
    assert "normal" in pset
    # already calibrated: refused unless --recalibrate
    assert main(["site", "calibrate", "--model", str(out), "--data", str(data["local"]), "--out",
                 str(tmp_path / "again.ckpt")]) == 1
    err = capsys.readouterr().err.strip()
    assert "already site-calibrated" in err and "--recalibrate" in err and "\n" not in err
    again = tmp_path / "again.ckpt"
    assert main(["site", "calibrate", "--model", str(out), "--data", str(data["local"]), "--out", str(again),
                 "--recalibrate", "--folds", "2", "--bootstrap", "0"]) == 0
    s2 = read_bundle(again)["site_calibration"]
    assert s2["parent"]["sha256"] == file_sha256(out) and s2["parent"]["site_calibration"]["site"] == "dev-holdout"
    assert s2["parent"]["temperature"] == pytest.approx(s["temperature"])


def test_site_calibrate_adapt_bn_changes_only_bn_statistics(run: Path, data: dict, tmp_path: Path) -> None:
    from covidcxr.models.checkpoint import read_bundle

    out = tmp_path / "adabn.ckpt"
    assert main(["site", "calibrate", "--model", str(run), "--data", str(data["local"]), "--out", str(out),
                 "--adapt-bn", "--folds", "2", "--bootstrap", "0", "--coverage", "0.8"]) == 0
    b, parent = read_bundle(out), read_bundle(run)
    s = b["site_calibration"]
    assert s["adapt_bn"] is True and s["bn_layers_adapted"] == 20 and s["coverage"] == 0.8
    changed = {k for k, v in b["state_dict"].items() if not torch.equal(parent["state_dict"][k], v)}
    assert changed and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed)
    assert "feature_summary" not in b  # it described the unadapted features


def _refusal(args: list[str], capsys: pytest.CaptureFixture) -> str:
    rc = main(["site", "calibrate", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 1, err
    assert "\n" not in err and err.startswith("covidcxr site: error:"), err
    return err


def test_site_calibrate_refusals(run: Path, data: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    local = pd.read_csv(data["local"])
    base = ["--model", str(run), "--out", str(tmp_path / "o.ckpt")]

    def csv(name: str, frame: pd.DataFrame) -> str:
        frame.to_csv(tmp_path / name, index=False)
        return str(tmp_path / name)

    err = _refusal([*base, "--data", csv("one.csv", local[local["label"] == "COVID-19"])], capsys)
    assert "only one class (COVID-19)" in err
    few = pd.concat([local[local["label"] != "COVID-19"], local[local["label"] == "COVID-19"].head(3)])
    assert "fewer than 5 local cases of COVID-19: 3" in _refusal([*base, "--data", csv("few.csv", few)], capsys)
    rest = pd.concat([local[local["label"] == "COVID-19"], local[local["label"] == "normal"].head(2),
                      local[local["label"] == "pneumonia"].head(2)])
    err = _refusal([*base, "--data", csv("rest.csv", rest)], capsys)
    assert "fewer than 5 local cases of non-COVID-19 (normal + pneumonia): 4" in err
    bad = local.copy()
    bad.loc[bad.index[0], "path"] = str(tmp_path / "gone.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a png")
    bad.loc[bad.index[1], "path"] = str(tmp_path / "broken.png")
    err = _refusal([*base, "--data", csv("bad.csv", bad)], capsys)
    assert "2 local image(s) cannot be read" in err and "gone.png" in err and "broken.png" in err
    err = _refusal([*base, "--data", csv("nopid.csv", local.drop(columns=["patient_id"]))], capsys)
    assert "no 'patient_id' column" in err
    err = _refusal(["--model", str(run), "--out", str(run), "--data", str(data["local"])], capsys)
    assert "would write over its input" in err
    unknown = local.copy()
    unknown.loc[unknown.index[0], "label"] = "tuberculosis"
    assert "tuberculosis" in _refusal([*base, "--data", csv("unk.csv", unknown)], capsys)
    assert not (tmp_path / "o.ckpt").exists()


def test_site_sets_travel_to_onnx(run: Path, data: dict, tmp_path: Path) -> None:
    """An ONNX export of a site checkpoint carries site_calibration and logit_bias: its records give the same
    probabilities and sets."""
    pytest.importorskip("onnxruntime")
    from covidcxr.export import export_onnx
    from covidcxr.predict import Predictor

    site_ckpt = tmp_path / "site.ckpt"
    assert main(["site", "calibrate", "--model", str(run), "--data", str(data["local"]), "--out", str(site_ckpt),
                 "--folds", "2", "--bootstrap", "0", "--bias"]) == 0
    export_onnx(site_ckpt, tmp_path / "site.onnx", parity_images=data["test_paths"][:2])
    paths = data["test_paths"][:6]
    sets, probs = {}, {}
    for name in ("site.ckpt", "site.onnx"):
        pred = Predictor.from_path(tmp_path / name)
        assert pred.site is not None and pred.site["site"] == "local", name
        assert pred.logit_bias is not None and pred.logit_bias == pytest.approx(pred.site["logit_bias"]), name
        recs = list(pred.predict_paths(paths))
        probs[name] = np.array([[r["probabilities"][c] for c in pred.classes] for r in recs])
        sets[name] = [prediction_set([r["probabilities"][c] for c in pred.classes], pred.classes, pred.site)
                      for r in recs]
    assert sets["site.ckpt"] == sets["site.onnx"] and len(sets["site.ckpt"]) == 6
    np.testing.assert_allclose(probs["site.onnx"], probs["site.ckpt"], atol=1e-4)


def _without_pneumonia(local_csv: str | Path, tmp_path: Path) -> Path:
    """The local manifest without its pneumonia films (like the actualmed hold-out: COVID-19 and normal only)."""
    local = pd.read_csv(local_csv)
    csv = tmp_path / "nopneu.csv"
    local[local["label"] != "pneumonia"].to_csv(csv, index=False)
    return csv


def test_site_without_a_class_calibrates_and_keeps_it_in_every_set(run: Path, data: dict, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    """Like the actualmed hold-out (COVID-19 and normal films, no pneumonia): calibrated, pneumonia never excluded."""
    from covidcxr.models.checkpoint import read_bundle

    csv = _without_pneumonia(data["local"], tmp_path)
    out = tmp_path / "nopneu.ckpt"
    assert main(["site", "calibrate", "--model", str(run), "--data", str(csv), "--out", str(out),
                 "--folds", "2", "--bootstrap", "0"]) == 0
    printed = capsys.readouterr().out
    s = read_bundle(out)["site_calibration"]
    assert s["n_per_class"]["pneumonia"] == 0 and "pneumonia" in s["conformal"]["always_in"]
    assert s["metrics"]["after"]["sensitivity"]["pneumonia"] is None
    assert "pneumonia is always in the prediction set" in printed
    assert "pneumonia" in prediction_set([0.5, 0.0, 0.5], CLASSES, s)


# --------------------------------------------------------------------------- --bias (bias-corrected temperature scaling)


def _softmax_np(u: np.ndarray) -> np.ndarray:
    e = np.exp(u - u.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_bias_temperature_recovers_a_known_bias() -> None:
    from covidcxr.site.calibrate import fit_bias_temperature

    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, (20000, 3))
    b0, t0 = np.array([0.8, -1.2, 0.4]), 1.5  # biases summing to 0: the penalty's choice among equivalent shifts
    p = _softmax_np(z / t0 + b0)
    y = (rng.random((len(z), 1)) > p.cumsum(1)).sum(1)  # labels drawn from softmax(z / T0 + b0)
    t, b = fit_bias_temperature(z, y)
    assert t == pytest.approx(t0, rel=0.05)
    np.testing.assert_allclose(b, b0, atol=0.08)


def test_bias_of_a_class_without_local_cases_is_finite_and_negative() -> None:
    from covidcxr.site.calibrate import fit_bias_temperature

    rng = np.random.default_rng(1)
    y = rng.choice([0, 2], 60)  # no class-1 film at the site, as pneumonia at actualmed
    z = rng.normal(0, 1, (60, 3)) + 2.0 * np.eye(3)[y]
    t, b = fit_bias_temperature(z, y)
    assert np.isfinite(b).all() and 0 < t
    assert b[1] < 0 and b[1] < min(b[0], b[2])
    assert (_softmax_np(z / t + b)[:, 1] > 0).all()  # rarer, never impossible
    _, weak = fit_bias_temperature(z, y, l2=0.05)  # a weaker penalty lets it fall further, still finite
    assert np.isfinite(weak[1]) and weak[1] < b[1]


def test_logit_bias_is_checked_on_load() -> None:
    from covidcxr.decision import logit_bias_of, softmax_with_temperature

    assert logit_bias_of(None, 3, "x.ckpt") is None and logit_bias_of([1, 0, -1], 3, "x.ckpt") == [1.0, 0.0, -1.0]
    for bad in ([1.0, 2.0], [0.0, float("nan"), 0.0], "abc"):
        with pytest.raises(ValueError, match="x.ckpt: logit_bias"):
            logit_bias_of(bad, 3, "x.ckpt")
    z = np.array([[1.0, 2.0, 3.0]])
    np.testing.assert_allclose(softmax_with_temperature(z, 2.0, None), _softmax_np(z / 2.0))
    np.testing.assert_allclose(softmax_with_temperature(z, 2.0, [1.0, 0.0, -1.0]), _softmax_np(z / 2.0 + [1, 0, -1]))


def test_site_calibrate_bias_reaches_predict(run: Path, data: dict, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    """--bias: the checkpoint carries logit_bias and `covidcxr predict` gives softmax(z / T + b)."""
    from covidcxr.cli.models import checkpoint_card
    from covidcxr.io import read_image
    from covidcxr.models import load
    from covidcxr.models.checkpoint import read_bundle

    csv = _without_pneumonia(data["local"], tmp_path)
    out = tmp_path / "bias.ckpt"
    args = ["site", "calibrate", "--model", str(run), "--data", str(csv), "--out", str(out), "--folds", "2",
            "--bootstrap", "0"]
    assert "--bias-l2 needs --bias" in _refusal(args[2:] + ["--bias-l2", "1"], capsys)
    assert main(args + ["--bias"]) == 0
    printed = capsys.readouterr().out
    b = read_bundle(out)
    bias, s = b["logit_bias"], b["site_calibration"]
    assert len(bias) == 3 and np.isfinite(bias).all() and s["logit_bias"] == bias and s["bias"]["l2"] == 0.5
    assert bias[CLASSES.index("pneumonia")] < 0  # no local pneumonia: made rarer
    assert "logit bias" in printed and checkpoint_card(str(out))["logit_bias"] == bias
    assert "logit_bias" not in read_bundle(run)  # the parent is untouched
    # evaluate --calibrate would refit T alone under a bias fitted with the old T: refused, one line
    assert main(["evaluate", "--model", str(out), "--data", str(data["train"]), "--split", "val", "--calibrate",
                 "--out", str(tmp_path / "rep")]) == 1
    err = capsys.readouterr().err.strip()
    assert "site calibrate --recalibrate --bias" in err and "\n" not in err

    paths = data["test_paths"][:4]
    preds = tmp_path / "preds.jsonl"
    assert main(["predict", *paths, "--model", str(out), "--out", str(preds), "--workers", "0", "-q"]) == 0
    recs = {r["path"]: r for r in map(json.loads, preds.read_text().splitlines())}
    lm = load(run)  # the parent's weights (no --adapt-bn): the site checkpoint's T and b, applied here by hand
    x = torch.stack([torch.from_numpy(lm.preset.array(read_image(p))) for p in paths])
    with torch.no_grad():
        z = lm.model(x).double().numpy()
    expected = _softmax_np(z / b["temperature"] + np.array(bias))
    got = np.array([[recs[p]["probabilities"][c] for c in CLASSES] for p in paths])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert not np.allclose(got, _softmax_np(z / b["temperature"]), atol=1e-3)  # the bias did something


def test_site_check_with_the_reference_model_by_name(tmp_path: Path, capsys) -> None:
    """`--model reference` names the shipped file: the report records that file and its sha256."""
    import cv2

    from covidcxr.reference_models import CLASSIFIER, weights_file
    from covidcxr.site.check import file_sha256

    rng = np.random.default_rng(3)
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"s{i}.png"), (rng.random((256, 256)) * 255).astype(np.uint8))
    rc = main(["site", "check", str(tmp_path), "--model", "reference", "--out", str(tmp_path / "check")])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "check" / "site_check.json").read_text())
    assert rep["model"] == str(weights_file(CLASSIFIER).resolve())
    assert rep["model_sha256"] == file_sha256(weights_file(CLASSIFIER))
