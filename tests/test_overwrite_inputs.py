"""No command overwrites its own input: export, data build, site calibrate, evaluate and explain refuse, in one
line, an output that is one of their inputs, and the input survives byte for byte."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from covidcxr import models
from covidcxr.cli import main
from covidcxr.preprocess import get_preset

CLASSES = ["normal", "pneumonia", "COVID-19"]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("overwrite")
    torch.manual_seed(0)
    ckpt = root / "m.ckpt"
    models.save(ckpt, models.build("resnet18", num_classes=3), arch="resnet18", classes=CLASSES,
                preset=get_preset("deepcovid", size=64))
    rng = np.random.default_rng(0)
    imgs = []
    for i in range(6):
        p = root / "scans" / f"img{i}.png"
        p.parent.mkdir(exist_ok=True)
        cv2.imwrite(str(p), (rng.random((96, 80)) * 255).astype(np.uint8))
        imgs.append(p)
    return {"root": root, "ckpt": ckpt, "imgs": imgs}


def _refused(argv: list[str], capsys: pytest.CaptureFixture, *keep: Path) -> str:
    before = {p: p.read_bytes() for p in keep}
    try:
        rc = main(argv)
    except SystemExit as err:
        rc = int(err.code or 0)
    err = capsys.readouterr().err
    assert rc != 0, err
    lines = [ln for ln in err.splitlines() if "error" in ln.lower()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for p, data in before.items():
        assert p.read_bytes() == data, f"{p} was overwritten"
    return lines[0]


def test_export_never_writes_over_the_model_or_its_metadata(study, tmp_path, capsys) -> None:
    line = _refused(["export", "--model", str(study["ckpt"]), "--onnx", str(study["ckpt"])], capsys, study["ckpt"])
    assert "would write over its input" in line
    ref = tmp_path / "ref"
    ref.mkdir()
    from covidcxr.reference_models import CLASSIFIER, meta_file, weights_file

    for f in (weights_file(CLASSIFIER), meta_file(CLASSIFIER)):
        shutil.copy(f, ref / f.name)
    st = ref / weights_file(CLASSIFIER).name
    line = _refused(["export", "--model", str(st), "--onnx", str(st.with_suffix(".json"))], capsys,
                    st, st.with_suffix(".json"))
    assert "would write over its input" in line


def test_data_build_never_writes_over_its_source_csv(study, tmp_path, capsys) -> None:
    site = tmp_path / "site"
    site.mkdir()
    csv = site / "manifest.csv"
    pd.DataFrame({"path": [str(p) for p in study["imgs"]], "label": ["normal", "COVID-19"] * 3,
                  "patient_id": [f"p{i}" for i in range(6)]}).to_csv(csv, index=False)
    line = _refused(["data", "build", "--source", f"csv={csv}", "--out", str(site)], capsys, csv)
    assert "would write over its input" in line


def test_site_calibrate_never_writes_over_the_models_metadata(study, tmp_path, capsys) -> None:
    from covidcxr.reference_models import CLASSIFIER, meta_file, weights_file

    ref = tmp_path / "ref"
    ref.mkdir()
    for f in (weights_file(CLASSIFIER), meta_file(CLASSIFIER)):
        shutil.copy(f, ref / f.name)
    st = ref / weights_file(CLASSIFIER).name
    local = tmp_path / "local.csv"
    pd.DataFrame({"path": [str(p) for p in study["imgs"]], "label": ["normal", "COVID-19"] * 3,
                  "patient_id": [f"p{i}" for i in range(6)]}).to_csv(local, index=False)
    line = _refused(["site", "calibrate", "--model", str(st), "--data", str(local), "--out",
                     str(st.with_suffix(".json"))], capsys, st, st.with_suffix(".json"))
    assert "would write over its input" in line


def test_evaluate_never_writes_over_a_manifest_kept_in_its_report_folder(study, tmp_path, capsys) -> None:
    folder = tmp_path / "study"
    folder.mkdir()
    manifest = folder / "predictions.csv"
    pd.DataFrame({"path": [str(p) for p in study["imgs"]], "label": ["normal", "COVID-19"] * 3,
                  "patient_id": [f"p{i}" for i in range(6)], "split": ["test"] * 6,
                  "source": ["site"] * 6}).to_csv(manifest, index=False)
    line = _refused(["evaluate", "--model", str(study["ckpt"]), "--data", str(manifest), "--split", "test",
                     "--out", str(folder)], capsys, manifest)
    assert "would write over its input" in line
    line = _refused(["evaluate", "--model", str(study["ckpt"]), "--data", str(manifest), "--split", "test",
                     "--out", str(manifest)], capsys, manifest)
    assert "would write over its input" in line or "must be a folder" in line


def test_explain_never_writes_into_the_folder_of_its_inputs(study, tmp_path, capsys) -> None:
    folder = tmp_path / "ov"
    folder.mkdir()
    a, b = folder / "a.png", folder / "a_gradcam.png"  # a.png's overlay would be named a_gradcam.png
    shutil.copy(study["imgs"][0], a)
    shutil.copy(study["imgs"][1], b)
    line = _refused(["explain", str(folder), "--model", str(study["ckpt"]), "--out", str(folder)], capsys, a, b)
    assert "holds its input" in line


def test_evaluate_refuses_a_split_that_lists_one_image_twice(study, tmp_path, capsys) -> None:
    """Not an overwrite, but the same family of bad input: a repeated row would count one image twice in every
    metric (training only warns: oversampling by repetition is legitimate there)."""
    manifest = tmp_path / "m.csv"
    paths = [str(p) for p in study["imgs"]] + [str(study["imgs"][0])]
    pd.DataFrame({"path": paths, "label": ["normal", "COVID-19"] * 3 + ["normal"],
                  "patient_id": [f"p{i}" for i in range(6)] + ["p0"], "split": ["test"] * 7,
                  "source": ["site"] * 7}).to_csv(manifest, index=False)
    line = _refused(["evaluate", "--model", str(study["ckpt"]), "--data", str(manifest), "--split", "test",
                     "--out", str(tmp_path / "report")], capsys, manifest)
    assert "1 row(s) repeat an image" in line and "line 8" in line
    assert not (tmp_path / "report" / "metrics.json").exists()
