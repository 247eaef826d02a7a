"""`covidcxr evaluate` and `covidcxr compare` on real dev-set images write every part of the report."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from covidcxr.cli import main


@pytest.fixture(scope="module")
def manifest(dev_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Dev-set patients (a few per class in val and test) plus one unreadable file in test."""
    df = pd.read_csv(dev_manifest)
    base = dev_manifest.parent
    df["path"] = [p if os.path.isabs(p) else str((base / p).resolve()) for p in df["path"]]
    parts = []
    for split, n in (("train", 2), ("val", 4), ("test", 6)):
        sub = df[df["split"] == split]
        keep = {p for ps in sub.groupby("label")["patient_id"].apply(lambda s: list(dict.fromkeys(s))[:n]) for p in ps}
        parts.append(sub[sub["patient_id"].isin(keep)])
    out_dir = tmp_path_factory.mktemp("evalset")
    bad = out_dir / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    row = parts[-1].iloc[[0]].copy()
    row["path"], row["patient_id"] = str(bad), "broken-patient"
    out = out_dir / "manifest.csv"
    pd.concat([*parts, row]).to_csv(out, index=False)
    return out


def _ckpt(path: Path, arch: str, seed: int) -> Path:
    from covidcxr import models
    from covidcxr.preprocess import get_preset

    torch.manual_seed(seed)
    net = models.build(arch, num_classes=3)
    preset = get_preset(models.get_spec(arch).preset, size=64)
    models.save(path, net, arch=arch, classes=["normal", "pneumonia", "COVID-19"], preset=preset,
                training={"run_name": path.stem})
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    d = tmp_path_factory.mktemp("ckpts")
    return [_ckpt(d / "r18.ckpt", "resnet18", 0), _ckpt(d / "cnet.ckpt", "covidnet-cxr-small", 1)]


def test_evaluate_writes_every_part(ckpts: list[Path], manifest: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "report"
    rc = main(["evaluate", "--model", str(ckpts[0]), "--data", str(manifest), "--split", "test", "--out", str(out),
               "--n-boot", "100", "--calibrate"])
    printed = capsys.readouterr().out
    assert rc == 0
    for f in ("metrics.json", "report.html", "report.md", "predictions.csv", "confusion_matrix.png", "roc.png",
              "pr.png", "reliability.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    m = json.loads((out / "metrics.json").read_text())
    test = pd.read_csv(manifest).query("split == 'test'")
    good = test[~test["path"].str.endswith("broken.png")]
    assert m["data"]["split"] == "test" and m["data"]["n_rows"] == len(test)
    assert m["metrics"]["n_images"] == len(good) and m["metrics"]["n_patients"] == good["patient_id"].nunique()
    assert len(m["failures"]) == 1 and "broken.png" in m["failures"][0]["error"]
    assert "skipped 1 unreadable" in printed and "broken.png" in printed
    pc = m["metrics"]["per_class"]
    for c in ("normal", "pneumonia", "COVID-19"):
        for k in ("sensitivity", "specificity", "ppv", "npv", "f1", "auc", "ap"):
            assert {"value", "ci_low", "ci_high", "n_images", "n_patients"} <= set(pc[c][k]), (c, k)
    assert [r["threshold"] for r in m["metrics"]["threshold_table"]] == pytest.approx([i / 10 for i in range(1, 10)])
    assert m["metrics"]["operating_point"]["target_sensitivity"] == 0.95
    assert set(m["by_source"]) == set(good["source"]) and m["by_view"]
    cal = m["calibration"]
    assert 0 <= cal["before"]["ece"] <= 1 and "after" in cal and cal["temperature_fitted"] > 0
    preds = pd.read_csv(out / "predictions.csv")
    assert len(preds) == len(good) and {"patient_id", "label", "pred", "prob_COVID-19", "correct"} <= set(preds.columns)
    assert preds[["prob_normal", "prob_pneumonia", "prob_COVID-19"]].sum(axis=1).round(6).eq(1).all()
    html = (out / "report.html").read_text()
    for part in ("Confusion matrix", "by threshold", "Calibration", "By source", "By view", "roc.png", "Research use only"):
        assert part in html, part
    # --calibrate stored the temperature in the checkpoint, and the predictor uses it
    from covidcxr.models import load

    assert load(ckpts[0]).temperature == pytest.approx(cal["temperature_fitted"])


def test_evaluate_bad_inputs_are_one_line(ckpts: list[Path], manifest: Path, tmp_path: Path, capsys) -> None:
    no_test = tmp_path / "m.csv"
    pd.read_csv(manifest).query("split != 'test'").to_csv(no_test, index=False)
    foreign = tmp_path / "f.csv"
    pd.read_csv(manifest).assign(label="tuberculosis").to_csv(foreign, index=False)
    cases = [
        (["--model", str(tmp_path / "none.ckpt"), "--data", str(manifest)], "not found"),
        (["--model", str(ckpts[0]), "--data", str(no_test)], "split 'test' has no rows"),
        (["--model", str(ckpts[0]), "--data", str(foreign)], "not classes of this model"),
    ]
    for args, msg in cases:
        rc = main(["evaluate", *args, "--out", str(tmp_path / "r")])
        err = capsys.readouterr().err.strip()
        assert rc == 1 and msg in err and "\n" not in err, err


def test_compare_writes_one_table(ckpts: list[Path], manifest: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cmp"
    rc = main(["compare", *map(str, ckpts), "--data", str(manifest), "--split", "test", "--out", str(out),
               "--n-boot", "50", "--latency-repeats", "1", "--names", "ResNet-18", "COVID-Net small"])
    assert rc == 0
    md = (out / "compare.md").read_text()
    assert "| ResNet-18 | resnet18 |" in md and "| COVID-Net small | covidnet-cxr-small |" in md
    for col in ("params (M)", "MACs (G)", "CPU ms/img", "accuracy", "sens. COVID-19", "PPV normal", "AUC COVID-19"):
        assert col in md, col
    csv = pd.read_csv(out / "compare.csv")
    assert list(csv["model"]) == ["ResNet-18", "COVID-Net small"]
    assert csv.loc[0, "params"] == sum(p.numel() for p in __import__("covidcxr").models.build("resnet18").parameters())
    # resnet18 at 64 px: 1.81 GMACs at 224 scaled by (64/224)^2, give or take the pooling
    assert 0.1e9 < csv.loc[0, "macs"] < 0.2e9
    assert (csv["cpu_latency_ms"] > 0).all()
    for c in ("accuracy_ci_low", "sensitivity_COVID-19_ci_high", "ppv_normal_value", "auc_covid_value"):
        assert c in csv.columns
    assert capsys.readouterr().out.count("| ResNet-18 |") == 1


def test_set_threshold_is_chosen_on_val_and_used_by_predict(ckpts: list[Path], manifest: Path, tmp_path: Path,
                                                            capsys) -> None:
    import shutil

    import numpy as np

    from covidcxr.data import read_manifest
    from covidcxr.evaluate.inference import predict_frame
    from covidcxr.models import read_bundle
    from covidcxr.predict import Predictor

    ckpt = tmp_path / "thr.ckpt"
    shutil.copy(ckpts[0], ckpt)
    rc = main(["evaluate", "--model", str(ckpt), "--data", str(manifest), "--split", "test", "--out",
               str(tmp_path / "r"), "--n-boot", "0", "--set-threshold", "--target-sensitivity", "0.9"])
    assert rc == 0
    thr = read_bundle(ckpt)["threshold"]
    assert thr is not None and 0.0 < thr < 1.0
    assert "stored in" in capsys.readouterr().out
    # The stored threshold reaches the target on val, and the next higher val score would not.
    pred = Predictor.from_path(ckpt)
    df = read_manifest(manifest)
    val = predict_frame(pred, df[df["split"] == "val"])
    covid = (val.frame["label"] == "COVID-19").to_numpy()
    p = val.probs[:, 2]
    assert (p[covid] >= thr).mean() >= 0.9
    higher = p[p > thr]
    if len(higher):
        assert (p[covid] >= higher.min()).mean() < 0.9
    assert pred.threshold == pytest.approx(thr)
    assert np.isfinite(p).all()


def test_evaluate_help_states_the_interval_plainly(capsys: pytest.CaptureFixture) -> None:
    """argparse does not %-format descriptions: a doubled percent sign reached the user verbatim."""
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    out = capsys.readouterr().out
    assert "95% bootstrap" in out and "%%" not in out


def test_evaluate_rejects_probabilities_outside_0_1(capsys: pytest.CaptureFixture) -> None:
    """--threshold 1.5 was accepted and reported sensitivity 0 without a word."""
    for opt, val in [("--threshold", "1.5"), ("--target-sensitivity", "95"), ("--threshold", "x")]:
        with pytest.raises(SystemExit) as exc:
            main(["evaluate", "--model", "m.ckpt", "--data", "d.csv", "--out", "o", opt, val])
        assert exc.value.code == 2
        assert f"argument {opt}:" in capsys.readouterr().err


def test_evaluate_checkpoint_takes_a_config(ckpts: list[Path], manifest: Path, tmp_path: Path) -> None:
    """EvaluateConfig (what `covidcxr evaluate` builds) and keyword overrides give the same metrics; a misspelt
    setting is a TypeError, not silently ignored."""
    from covidcxr.evaluate import EvaluateConfig, evaluate_checkpoint

    config = EvaluateConfig(split="val", n_boot=5, seed=3, progress=False)
    by_config = evaluate_checkpoint(ckpts[0], manifest, config, out=tmp_path / "a")
    by_keywords = evaluate_checkpoint(ckpts[0], manifest, split="val", n_boot=5, seed=3, progress=False,
                                      out=tmp_path / "b")
    assert by_config["data"]["split"] == "val" and by_config["metrics"] == by_keywords["metrics"]
    assert evaluate_checkpoint(ckpts[0], manifest, config, split="test", out=tmp_path / "c")["data"]["split"] == "test"
    with pytest.raises(TypeError, match="nboot"):
        evaluate_checkpoint(ckpts[0], manifest, nboot=5, out=tmp_path / "d")
