"""No command overwrites its own input: export, data build, site calibrate, evaluate and explain refuse, in one
line, an output that is one of their inputs, and the input survives byte for byte."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from covidcxr.cli import main
from test_data_factories import tiny_classifier_and_scans


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("overwrite")
    ckpt, imgs = tiny_classifier_and_scans(root, n=6, scans="scans")
    return {"root": root, "ckpt": ckpt, "imgs": imgs}


def _reference_copy(tmp_path: Path) -> Path:
    """The shipped classifier and its metadata, copied: a failing refusal must not touch the package's own."""
    from covidcxr.reference_models import CLASSIFIER, meta_file, weights_file

    ref = tmp_path / "ref"
    ref.mkdir()
    for f in (weights_file(CLASSIFIER), meta_file(CLASSIFIER)):
        shutil.copy(f, ref / f.name)
    return ref / weights_file(CLASSIFIER).name


def _csv(path: Path, imgs: list[Path], **extra: list) -> Path:
    n = len(imgs)
    pd.DataFrame({"path": [str(p) for p in imgs], "label": (["normal", "COVID-19"] * n)[:n],
                  "patient_id": [f"p{i}" for i in range(n)], **extra}).to_csv(path, index=False)
    return path


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
    st = _reference_copy(tmp_path)
    line = _refused(["export", "--model", str(st), "--onnx", str(st.with_suffix(".json"))], capsys,
                    st, st.with_suffix(".json"))
    assert "would write over its input" in line


def test_data_build_never_writes_over_its_source_csv(study, tmp_path, capsys) -> None:
    site = tmp_path / "site"
    site.mkdir()
    csv = _csv(site / "manifest.csv", study["imgs"])
    line = _refused(["data", "build", "--source", f"csv={csv}", "--out", str(site)], capsys, csv)
    assert "would write over its input" in line


def test_site_calibrate_never_writes_over_the_models_metadata(study, tmp_path, capsys) -> None:
    st = _reference_copy(tmp_path)
    local = _csv(tmp_path / "local.csv", study["imgs"])
    line = _refused(["site", "calibrate", "--model", str(st), "--data", str(local), "--out",
                     str(st.with_suffix(".json"))], capsys, st, st.with_suffix(".json"))
    assert "would write over its input" in line


def test_evaluate_never_writes_over_a_manifest_kept_in_its_report_folder(study, tmp_path, capsys) -> None:
    folder = tmp_path / "study"
    folder.mkdir()
    manifest = _csv(folder / "predictions.csv", study["imgs"], split=["test"] * 6, source=["site"] * 6)
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
    assert "a folder it searches for inputs" in line or "holds its input" in line
    line = _refused(["explain", str(folder), "--model", str(study["ckpt"]), "--out", str(folder / "overlays")],
                    capsys, a, b)
    assert "a folder it searches for inputs" in line and not (folder / "overlays").exists()
    line = _refused(["explain", str(a), "--model", str(study["ckpt"]), "--out", str(folder)], capsys, a, b)
    assert "holds its input" in line  # a file named on its own, in the output folder: its overlay's neighbour


def test_evaluate_refuses_a_split_that_lists_one_image_twice(study, tmp_path, capsys) -> None:
    """Not an overwrite, but the same family of bad input: a repeated row would count one image twice in every
    metric (training only warns: oversampling by repetition is legitimate there)."""
    manifest = _csv(tmp_path / "m.csv", [*study["imgs"], study["imgs"][0]], split=["test"] * 7, source=["site"] * 7)
    line = _refused(["evaluate", "--model", str(study["ckpt"]), "--data", str(manifest), "--split", "test",
                     "--out", str(tmp_path / "report")], capsys, manifest)
    assert "1 row(s) repeat an image" in line and "line 8" in line
    assert not (tmp_path / "report" / "metrics.json").exists()
