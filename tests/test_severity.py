"""Severity: label readers, clamping, metrics, and train/evaluate/cv from the CLI on a tiny manifest."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from covidcxr.severity import labels as L
from covidcxr.severity import metrics as M
from covidcxr.severity.labels import SeverityError
from covidcxr.severity.model import SeverityModel, clamp_scores


# ----------------------------------------------------------------------------- label readers
def test_read_covidxsev_synthetic(tmp_path: Path) -> None:
    f = tmp_path / "sev.txt"
    f.write_text("P 1 a.png level1 ricord\n\n419639-001863 b.png LEVEL2 ricord\n", encoding="utf-8")
    df = L.read_covidxsev(f, images_dir=tmp_path / "imgs")
    assert df["patient_id"].tolist() == ["P 1", "419639-001863"]  # ids with spaces survive
    assert df["severity_level"].tolist() == ["level1", "level2"]
    assert df["path"].tolist() == [str((tmp_path / "imgs" / n).resolve()) for n in ("a.png", "b.png")]
    assert df["geographic_extent"].isna().all()


@pytest.mark.parametrize("line, needle", [("p a.png level3 ricord", "level3"), ("p a.png", "expected")])
def test_read_covidxsev_errors_name_file_and_line(tmp_path: Path, line: str, needle: str) -> None:
    f = tmp_path / "bad.txt"
    f.write_text("p0 ok.png level1 ricord\n" + line + "\n")
    with pytest.raises(SeverityError, match=rf"bad.txt:2: .*{needle}"):
        L.read_covidxsev(f)


def test_read_covidxsev_shared(shared_dir: Path) -> None:
    f = shared_dir / "covidx-labels" / "train_COVIDxSev.txt"
    df = L.read_covidxsev(f)
    n_lines = sum(1 for ln in f.read_text().splitlines() if ln.strip())
    assert len(df) == n_lines
    assert set(df["severity_level"]) == {"level1", "level2"}
    assert df["patient_id"].nunique() < len(df)  # several images per patient: splits must group them


def test_read_severity_annotations_shared(shared_dir: Path) -> None:
    f = shared_dir / "covidx-labels" / "severity_annotations.csv"
    raw = pd.read_csv(f)
    df = L.read_severity_csv(f)
    # the published file has 18 opacity means above the 0-6 scale: those rows are left out, never clipped
    both = raw["Geographic"].notna() & raw["Opacity"].notna() & (raw["Opacity"] <= 6)
    assert int((raw["Opacity"] > 6).sum()) == 18 and len(df) == int(both.sum())
    assert np.allclose(df["geographic_extent"].to_numpy(), raw.loc[both, "Geographic"].to_numpy())
    assert np.allclose(df["opacity"].to_numpy(), raw.loc[both, "Opacity"].to_numpy())
    assert df["geographic_extent"].between(0, 8).all() and df["opacity"].between(0, 6).all()
    assert (df["patient_id"] != "").all()


def test_read_severity_csv_synthetic(tmp_path: Path) -> None:
    f = tmp_path / "s.csv"
    f.write_text("filename,Geographic,Opacity,patientid\na.jpg,2.5,1,p1\nb.jpg,,3,p2\nc.jpg,8,6,p3\n")
    df = L.read_severity_csv(f)
    assert df["patient_id"].tolist() == ["p1", "p3"]  # row without Geographic skipped
    assert df[["geographic_extent", "opacity"]].to_numpy().tolist() == [[2.5, 1.0], [8.0, 6.0]]
    f.write_text("filename,Geographic,Opacity\na.jpg,1,7\nb.jpg,9,1\n")
    with pytest.raises(SeverityError, match=r"s.csv: row 3: geographic_extent=9 outside .*0-8"):
        L.read_severity_csv(f)
    f.write_text("filename,Geographic,Opacity\na.jpg,1,7\nb.jpg,1,-1\n")
    with pytest.raises(SeverityError, match=r"s.csv: row 3: opacity=-1 outside .*0-6"):
        L.read_severity_csv(f)
    f.write_text("filename,Geographic,Opacity\na.jpg,1,7\nb.jpg,2,6\n")
    out = L.read_severity_csv(f)  # an opacity of 7 is off the 0-6 scale: that row is left out, not clipped to 6
    assert out["path"].map(lambda p: Path(p).name).tolist() == ["b.jpg"] and out["opacity"].tolist() == [6.0]
    f.write_text("filename,Geographic,Opacity\na.jpg,two,1\n")
    with pytest.raises(SeverityError, match="not a number"):
        L.read_severity_csv(f)
    f.write_text("filename,Opacity\na.jpg,1\n")
    with pytest.raises(SeverityError, match=r"lacks column.*Geographic"):
        L.read_severity_csv(f)


def test_level_proxy_and_targets() -> None:
    g = np.array([0.0, 3.99, 4.0, 8.0, np.nan])
    assert L.level_proxy(g).tolist() == [0, 0, 1, 1, -1]
    assert L.level_proxy(g, threshold=3.0).tolist() == [0, 1, 1, 1, -1]
    df = L._frame([{"path": "a", "patient_id": "p", "severity_level": "", "geographic_extent": 5.0, "opacity": 1.0}])
    y, desc = L.level_targets(df)
    assert y.tolist() == [1] and desc.startswith("proxy")
    df.loc[0, "severity_level"] = "level1"
    y, desc = L.level_targets(df)
    assert y.tolist() == [0] and desc == "severity_level"


def test_dev_manifest_scores(dev_manifest: Path) -> None:
    """The shared dev set's manifest carries 256 scored images; the 6 whose opacity mean lies above the 0-6 scale
    are left unscored (never clipped), so 250 remain; the proxy splits them about evenly."""
    df = L.read_manifest_severity(dev_manifest)
    scored, y, _ = L.select(df, "scores", "all")
    assert len(scored) == 250 and scored["patient_id"].nunique() > 100
    assert y[:, 0].max() <= 8 and y[:, 1].max() <= 6
    lv, desc = L.level_targets(scored)
    assert desc.startswith("proxy") and 0.3 < lv.mean() < 0.7


# ----------------------------------------------------------------------------- clamping
def test_clamp_scores_tensor_and_array() -> None:
    x = torch.tensor([[-1.0, 7.0], [9.5, -0.1], [3.0, 2.0]])
    assert clamp_scores(x).tolist() == [[0.0, 6.0], [8.0, 0.0], [3.0, 2.0]]
    assert clamp_scores(x.numpy()).tolist() == [[0.0, 6.0], [8.0, 0.0], [3.0, 2.0]]


# ----------------------------------------------------------------------------- metrics
def test_level_metrics_hand_computed() -> None:
    y = np.array([0, 0, 1, 1, 1])
    pred = np.array([0, 1, 1, 1, 0])
    rep = M.level_metrics(y, pred, patients=list("abcde"), n_boot=200, seed=1)
    m = {k: v["value"] for k, v in rep["metrics"].items()}
    assert rep["confusion_matrix"]["counts"] == [[1, 1], [1, 2]]
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["sensitivity_level1"] == pytest.approx(1 / 2) and m["sensitivity_level2"] == pytest.approx(2 / 3)
    assert m["ppv_level1"] == pytest.approx(1 / 2) and m["ppv_level2"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    lo, hi = rep["metrics"]["accuracy"]["ci95"]
    assert 0 <= lo <= 3 / 5 <= hi <= 1 and hi > lo


def test_score_metrics_hand_computed_and_match_sklearn() -> None:
    from scipy.stats import pearsonr
    from sklearn.metrics import mean_absolute_error, r2_score

    y = np.array([[1.0, 0.0], [2.0, 1.0], [3.0, 2.0]])
    p = np.array([[2.0, 0.0], [2.0, 2.0], [2.0, 2.0]])
    m = M.score_point(y, p)
    assert m["geographic_extent_mae"] == pytest.approx(2 / 3)
    assert m["geographic_extent_rmse"] == pytest.approx(math.sqrt(2 / 3))
    assert m["geographic_extent_r2"] == pytest.approx(0.0)  # predicting the mean
    assert math.isnan(m["geographic_extent_pearson_r"])  # constant prediction
    assert math.isnan(M.pearson(np.array([1.0, 2.0, 3.0]), np.array([0.1 + 0.2, 0.3, 0.3])))  # constant up to rounding
    assert m["opacity_r2"] == pytest.approx(1 - 1 / 2)
    rng = np.random.default_rng(0)
    y, p = rng.uniform(0, 8, (40, 2)), rng.uniform(0, 8, (40, 2))
    m = M.score_point(y, p)
    assert m["opacity_r2"] == pytest.approx(r2_score(y[:, 1], p[:, 1]))
    assert m["opacity_mae"] == pytest.approx(mean_absolute_error(y[:, 1], p[:, 1]))
    assert m["geographic_extent_pearson_r"] == pytest.approx(pearsonr(y[:, 0], p[:, 0])[0])


def test_bootstrap_resamples_patients_not_images() -> None:
    y = np.array([0, 1, 1, 0])
    pred = np.array([0, 1, 0, 1])
    # one patient: every resample is the whole set, so the interval collapses onto the estimate
    rep = M.level_metrics(y, pred, patients=["p"] * 4, n_boot=50)
    assert rep["metrics"]["accuracy"]["ci95"] == [0.5, 0.5]
    rep = M.level_metrics(y, pred, patients=list("abcd"), n_boot=300)
    lo, hi = rep["metrics"]["accuracy"]["ci95"]
    assert lo < 0.5 < hi


def test_corrected_t_interval_wider_than_naive() -> None:
    from scipy import stats

    v = [0.6, 0.7, 0.65, 0.55, 0.7]
    lo, hi = M.corrected_t_interval(v, n_train=80, n_test=20)
    se = math.sqrt((1 / 5 + 20 / 80) * np.var(v, ddof=1))
    t = stats.t.ppf(0.975, 4)
    assert (lo, hi) == pytest.approx((np.mean(v) - t * se, np.mean(v) + t * se))
    naive = t * math.sqrt(np.var(v, ddof=1) / 5)
    assert hi - lo > 2 * naive


# ----------------------------------------------------------------------------- CLI end to end
def _tiny_manifest(root: Path, n_patients: int = 12, bad_file: bool = False) -> Path:
    """Synthetic 80 px images whose brightness grows with the scores (so there is something to learn)."""
    import cv2

    img_dir = root / "imgs"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    splits = ["train"] * 8 + ["val"] * 2 + ["test"] * 2
    for i in range(n_patients):
        for j in range(2):
            g = float(rng.uniform(0, 8))
            o = g * 0.7
            img = np.clip(rng.normal(40 + 25 * g, 20, (80, 80)), 0, 255).astype(np.uint8)
            name = f"p{i}_{j}.png"
            cv2.imwrite(str(img_dir / name), img)
            scored = not (i == 0 and j == 1)  # one unscored row: must be skipped
            rows.append({"patient_id": f"p{i}", "path": f"imgs/{name}", "label": "COVID-19",
                         "source": "synth" if i % 3 else "other",
                         "split": splits[i % len(splits)], "geographic_extent": g if scored else None,
                         "opacity": o if scored else None})
    if bad_file:
        (img_dir / "broken.png").write_bytes(b"not an image")
        rows.append({"patient_id": "p1", "path": "imgs/broken.png", "label": "COVID-19", "source": "synth",
                     "split": "train", "geographic_extent": 3.0, "opacity": 2.0})
    m = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(m, index=False)
    return m


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny manifest and a tiny 'detector' checkpoint (resnet18, 3 classes, 64 px)."""
    from covidcxr import models
    from covidcxr.preprocess import get_preset

    root = tmp_path_factory.mktemp("sev")
    man = _tiny_manifest(root, bad_file=True)
    torch.manual_seed(0)
    det = models.build("resnet18", num_classes=3)
    ckpt = root / "detector.ckpt"
    models.save(ckpt, det, arch="resnet18", classes=["normal", "pneumonia", "COVID-19"],
                preset=get_preset("deepcovid", size=64), task="classification", threshold=0.5)
    return {"root": root, "manifest": man, "detector": ckpt}


def _cli(*args: str) -> int:
    from covidcxr.cli import main

    return main(list(args))


def test_cli_scores_train_evaluate(tiny: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    from covidcxr import models

    run, rep = tiny["root"] / "run_scores", tiny["root"] / "rep_scores"
    assert _cli("severity", "train", "--task", "scores", "--data", str(tiny["manifest"]), "--out", str(run),
                "--init", str(tiny["detector"]), "--max-epochs", "2", "--freeze-epochs", "1", "--batch-size", "8") == 0
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["n_train"] == 15  # 8 train patients x 2 - 1 unscored; the broken file is skipped
    assert len(summary["skipped_files"]) == 1 and "broken.png" in summary["skipped_files"][0]["path"]
    assert set(summary["train_mean"]) == {"geographic_extent", "opacity"}
    lm = models.load(run / "best.ckpt")  # rebuilt by the plain registry builder
    assert lm.task == "severity-scores" and lm.classes == ["geographic_extent", "opacity"]
    assert lm.preset.size == 64 and lm.training["init"] == str(tiny["detector"])
    assert [h["backbone_frozen"] for h in summary["history"] if "backbone_frozen" in h] == [True, False]
    det = torch.load(tiny["detector"], weights_only=False)["state_dict"]
    last = models.load(run / "last.ckpt").model.state_dict()
    assert not torch.equal(last["layer1.0.conv1.weight"], det["layer1.0.conv1.weight"])  # unfrozen after epoch 1

    assert _cli("severity", "evaluate", "--model", str(run / "best.ckpt"), "--data", str(tiny["manifest"]),
                "--split", "test", "--out", str(rep), "--bootstrap", "50") == 0
    out = json.loads((rep / "metrics.json").read_text())
    assert out["n_images"] == 4 and out["split"] == "test"
    for k in ("geographic_extent_mae", "geographic_extent_r2", "opacity_rmse", "opacity_pearson_r"):
        assert k in out["scores"]["metrics"]
    assert "baseline_train_mean" in out and "level_proxy_from_scores" in out
    pred = pd.read_csv(rep / "predictions.csv")
    assert pred["pred_geographic_extent"].between(0, 8).all() and pred["pred_opacity"].between(0, 6).all()
    assert "95% CI" in capsys.readouterr().out


def test_cli_level_train_evaluate_with_frozen_backbone(tiny: dict[str, Path]) -> None:
    from covidcxr import models

    run, rep = tiny["root"] / "run_level", tiny["root"] / "rep_level"
    # the backbone stays frozen for longer than training lasts: it must equal the detector's
    assert _cli("severity", "train", "--task", "level", "--data", str(tiny["manifest"]), "--out", str(run),
                "--init", str(tiny["detector"]), "--max-epochs", "1", "--freeze-epochs", "2",
                "--batch-size", "8") == 0
    det = torch.load(tiny["detector"], weights_only=False)["state_dict"]
    sev = models.load(run / "best.ckpt")
    # trained on the extent proxy: named so, never CXR-S's level1/level2
    assert sev.task == "severity-level" and sev.classes == ["proxy-level1", "proxy-level2"]
    assert sev.training["level_source"].startswith("proxy:geographic_extent>=4")
    state = sev.model.state_dict()
    for k, v in det.items():
        if not k.startswith("fc."):
            assert torch.equal(state[k], v), k
    assert state["fc.weight"].shape == (2, 512)

    assert _cli("severity", "evaluate", "--model", str(run / "best.ckpt"), "--data", str(tiny["manifest"]),
                "--split", "all", "--out", str(rep), "--bootstrap", "30") == 0
    out = json.loads((rep / "metrics.json").read_text())
    assert "PROXY" in out["note"]
    cm = np.array(out["level"]["confusion_matrix"]["counts"])
    assert cm.sum() == out["n_images"] == 23
    assert "sensitivity_proxy-level2" in out["level"]["metrics"] and "ppv_proxy-level1" in out["level"]["metrics"]
    assert "never compare with CXR-S" in out["note"]
    assert {k: v["n_images"] for k, v in out["by_source"].items()} == {"other": 7, "synth": 16}

    sm = SeverityModel.from_path(run / "best.ckpt")
    img = np.random.default_rng(0).uniform(0, 1, (90, 70)).astype(np.float32)
    (res,) = sm.predict_arrays([img])
    assert res["level"] in ("proxy-level1", "proxy-level2") and sum(res["probabilities"].values()) == pytest.approx(1.0)


def test_cli_trains_from_covidxsev_and_score_csv(tiny: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    """The published label formats train too: a COVIDxSev .txt (levels) and a score CSV, images via --images."""
    man = pd.read_csv(tiny["manifest"]).dropna(subset=["geographic_extent"])
    man = man[~man["path"].str.contains("broken")]
    names = man["path"].str.replace("imgs/", "", regex=False)
    txt = tiny["root"] / "train_COVIDxSev.txt"
    txt.write_text("".join(f"{p} {n} {'level2' if g >= 4 else 'level1'} synth\n"
                           for p, n, g in zip(man["patient_id"], names, man["geographic_extent"])))
    csv = tiny["root"] / "annotations.csv"
    pd.DataFrame({"filename": names, "Geographic": man["geographic_extent"], "Opacity": man["opacity"],
                  "patientid": man["patient_id"]}).to_csv(csv, index=False)
    imgs = str(tiny["root"] / "imgs")
    run = tiny["root"] / "run_txt"
    assert _cli("severity", "train", "--task", "level", "--data", str(txt), "--images", imgs, "--out", str(run),
                "--max-epochs", "1", "--size", "64", "--batch-size", "8") == 0
    from covidcxr import models

    lm = models.load(run / "best.ckpt")
    assert lm.training["targets"] == "severity_level" and "seeded patient split" in lm.training["split"]
    assert lm.training["n_train"] + lm.training["n_val"] == len(man)
    assert _cli("severity", "evaluate", "--model", str(run / "best.ckpt"), "--data", str(txt), "--images", imgs,
                "--split", "test", "--out", str(tiny["root"] / "r")) == 1  # a .txt has no split column
    assert "use --split all" in capsys.readouterr().err
    assert _cli("severity", "evaluate", "--model", str(run / "best.ckpt"), "--data", str(txt), "--images", imgs,
                "--split", "all", "--out", str(tiny["root"] / "r_txt"), "--bootstrap", "20") == 0
    rep = json.loads((tiny["root"] / "r_txt" / "metrics.json").read_text())
    assert rep["targets"] == "severity_level" and "note" not in rep  # real levels: no proxy note
    run = tiny["root"] / "run_csv"
    assert _cli("severity", "train", "--task", "scores", "--data", str(csv), "--images", imgs, "--out", str(run),
                "--max-epochs", "1", "--size", "64", "--arch", "resnet18") == 0
    assert models.load(run / "best.ckpt").training["n_train"] > 0


def test_without_validation_the_last_epoch_is_kept() -> None:
    from covidcxr.severity import train as T
    from covidcxr.severity.model import initial_model

    ini = initial_model("scores", None, "resnet18", 64)
    rng = np.random.default_rng(0)
    arrays = [rng.uniform(0, 1, (64, 64)).astype(np.float32) for _ in range(6)]
    cfg = T.SeverityConfig(task="scores", data="-", out="-", max_epochs=2, batch_size=3, val_fraction=0)
    m = T.fit_model(ini, "scores", arrays, rng.uniform(0, 6, (6, 2)), [], np.zeros((0, 2)), cfg)
    assert m.best["epoch"] == 1 and [h["epoch"] for h in m.history] == [0, 1]


def test_severity_model_clamps_scores(tiny: dict[str, Path]) -> None:
    from covidcxr import models
    from covidcxr.preprocess import get_preset

    net = models.build("resnet18", num_classes=2)
    with torch.no_grad():
        net.fc.weight.zero_()
        net.fc.bias.copy_(torch.tensor([11.0, -3.0]))  # out of range on both sides
    p = tiny["root"] / "scores_const.ckpt"
    models.save(p, net, arch="resnet18", classes=["geographic_extent", "opacity"], preset=get_preset("deepcovid", 64),
                task="severity-scores")
    (res,) = SeverityModel.from_path(p).predict_tensor(torch.zeros(1, 3, 64, 64))
    assert res["geographic_extent"] == 8.0 and res["opacity"] == 0.0


def test_severity_model_refuses_a_detector(tiny: dict[str, Path]) -> None:
    from covidcxr.models import CheckpointError

    with pytest.raises(CheckpointError, match="not a severity model"):
        SeverityModel.from_path(tiny["detector"])


def test_cli_cv_mean_and_ridge(tiny: dict[str, Path]) -> None:
    out = tiny["root"] / "cv"
    assert _cli("severity", "cv", "--data", str(tiny["manifest"]), "--out", str(out), "--init", str(tiny["detector"]),
                "--splits", "3", "--methods", "mean,ridge,finetune", "--max-epochs", "1", "--size", "64") == 0
    rep = json.loads((out / "cv.json").read_text())
    per = pd.read_csv(out / "cv_splits.csv")
    assert len(per) == 9 and set(per["method"]) == {"mean", "ridge", "finetune"}
    assert rep["n_images"] == 23 and rep["summary"]["ridge"]["opacity_r2"]["mean"] is not None
    # the mean baseline never correlates and is never better than predicting the training mean
    assert (per.loc[per["method"] == "mean", "geographic_extent_r2"] <= 0).all()
    table = (out / "cv_table.md").read_text()
    assert table.startswith("| metric | mean | ridge | finetune |") and "| opacity_r2 |" in table
    assert "n/a" in table  # Pearson r of the constant baseline is undefined, not 0


def test_cross_validate_takes_a_config(tiny: dict[str, Path], tmp_path: Path) -> None:
    """CVConfig (what `severity cv` builds) and keyword overrides of it; a misspelt setting is a TypeError."""
    from covidcxr.severity.cv import CVConfig, cross_validate

    config = CVConfig(init=str(tiny["detector"]), size=64, splits=2, methods=("mean",))
    rep = cross_validate(tiny["manifest"], tmp_path / "a", config)
    again = cross_validate(tiny["manifest"], tmp_path / "b", config, splits=3)
    assert rep["splits"] == 2 and again["splits"] == 3 and rep["methods"] == ["mean"]
    assert len(pd.read_csv(tmp_path / "b" / "cv_splits.csv")) == 3
    with pytest.raises(TypeError, match="n_splits"):
        cross_validate(tiny["manifest"], tmp_path / "c", config, n_splits=2)


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "scores.csv"
    bad.write_text("filename,Geographic,Opacity\na.jpg,12,1\n")
    assert _cli("severity", "train", "--task", "scores", "--data", str(bad), "--out", str(tmp_path / "r")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "scores.csv: row 2" in err[0] and "0-8" in err[0]
    assert _cli("severity", "evaluate", "--model", str(tmp_path / "nope.ckpt"), "--data", str(bad),
                "--out", str(tmp_path / "r")) == 1
    assert "checkpoint not found" in capsys.readouterr().err


def test_cli_severity_train_rejects_degenerate_sizes(tmp_path, capsys):
    """--max-epochs 0 wrote an untrained best.ckpt ('best epoch None'); --size 7 trained a 7-pixel model."""
    from covidcxr.cli import main

    for opt, val in (("--max-epochs", "0"), ("--size", "7"), ("--batch-size", "0")):
        with pytest.raises(SystemExit) as exc:
            main(["severity", "train", "--task", "scores", "--data", str(tmp_path / "m.csv"),
                  "--out", str(tmp_path / "o"), opt, val])
        assert exc.value.code == 2
        assert f"argument {opt}: {val} is below the minimum" in capsys.readouterr().err


@pytest.mark.parametrize("arch, preset", [("mobilenet_v2", "imagenet"), ("efficientnet_lite0", "effnet-lite")])
def test_scores_from_a_transfer_detector(tiny: dict[str, Path], arch: str, preset: str) -> None:
    """--init from a MobileNetV2 / EfficientNet-Lite0 classifier (the transfer recipes' checkpoints): body and
    preset kept, a new 2-output head; the severity checkpoint reloads, predicts, and feeds the CV's ridge."""
    from covidcxr import models
    from covidcxr.preprocess import get_preset

    torch.manual_seed(0)
    det = models.build(arch, num_classes=3)
    ckpt = tiny["root"] / f"det_{arch}.ckpt"
    models.save(ckpt, det, arch=arch, classes=["normal", "pneumonia", "COVID-19"], preset=get_preset(preset, size=64),
                task="classification", threshold=0.5)
    run = tiny["root"] / f"run_{arch}"
    assert _cli("severity", "train", "--task", "scores", "--data", str(tiny["manifest"]), "--out", str(run),
                "--init", str(ckpt), "--max-epochs", "1", "--freeze-epochs", "1", "--batch-size", "8") == 0
    sev = models.load(run / "best.ckpt")
    assert sev.arch == arch and sev.task == "severity-scores" and sev.preset.size == 64
    assert sev.training["init_arch"] == arch
    head = models.get_head(sev.model, arch)
    assert head.out_features == 2
    state, det_state = sev.model.state_dict(), det.state_dict()
    head_keys = {k for k in det_state if k.startswith(models.get_spec(arch).head + ".")}
    for k, v in det_state.items():  # frozen for the only epoch: the body is the detector's, BN statistics too
        if k not in head_keys:
            assert torch.equal(state[k], v), k
    (res,) = SeverityModel.from_path(run / "best.ckpt").predict_arrays([np.full((70, 90), 0.5, np.float32)])
    assert 0 <= res["geographic_extent"] <= 8 and 0 <= res["opacity"] <= 6
    out = tiny["root"] / f"cv_{arch}"
    assert _cli("severity", "cv", "--data", str(tiny["manifest"]), "--out", str(out), "--init", str(ckpt),
                "--splits", "2", "--methods", "mean,ridge", "--size", "64") == 0
    assert json.loads((out / "cv.json").read_text())["arch"] == arch


def test_scores_from_imagenet_weights_without_a_detector(tiny: dict[str, Path], weights_dir: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    """--arch mobilenet_v2 --weights mobilenet_v2-imagenet: the catalogue body (sha256 recorded), its preset;
    --init with --weights, or a missing catalogue file, is a one-line error."""
    from covidcxr import models

    run = tiny["root"] / "run_imagenet"
    assert _cli("severity", "train", "--task", "scores", "--data", str(tiny["manifest"]), "--out", str(run),
                "--arch", "mobilenet_v2", "--weights", "mobilenet_v2-imagenet", "--size", "64", "--max-epochs", "1",
                "--freeze-epochs", "1", "--batch-size", "8") == 0
    sev = models.load(run / "best.ckpt")
    assert sev.arch == "mobilenet_v2" and sev.preset.name.startswith("imagenet")
    assert sev.training["init_weights"] == "mobilenet_v2-imagenet" and len(sev.training["init_sha256"]) == 64
    ref = torch.load(weights_dir / "mobilenet_v2-imagenet-features.pth", weights_only=True)
    assert torch.equal(sev.model.state_dict()["features.0.0.weight"], ref["features.0.0.weight"])  # frozen epoch
    capsys.readouterr()
    assert _cli("severity", "train", "--task", "scores", "--data", str(tiny["manifest"]), "--out", str(run) + "x",
                "--init", str(tiny["detector"]), "--weights", "imagenet") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not both" in err[0]
    assert _cli("severity", "cv", "--data", str(tiny["manifest"]), "--out", str(run) + "y", "--arch", "mobilenet_v2",
                "--weights", str(tiny["root"] / "missing.pth"), "--methods", "mean") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.pth" in err[0]
