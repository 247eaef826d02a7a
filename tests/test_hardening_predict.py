"""Issue 11 §4: `predict --out` never destroys input or earlier results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covidcxr.cli import main
from test_data_factories import tiny_classifier_and_scans

CLASSES = ["normal", "pneumonia", "COVID-19"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], Path]:
    root = tmp_path_factory.mktemp("predict_out")
    ckpt, imgs = tiny_classifier_and_scans(root, n=5)
    manifest = root / "m.csv"
    pd.DataFrame({"path": [str(p) for p in imgs], "label": ["normal"] * 5}).to_csv(manifest, index=False)
    return ckpt, imgs, manifest


def _args(ckpt: Path) -> list[str]:
    return ["--model", str(ckpt), "--workers", "0", "-q", "--no-plausibility"]


def _predict(*argv: str) -> int:
    try:
        return main(["predict", *argv])
    except SystemExit as err:  # argparse
        return int(err.code or 0)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def test_output_that_is_an_input_is_refused(setup, capsys) -> None:
    ckpt, imgs, manifest = setup
    before = manifest.read_bytes()
    assert _predict(str(manifest), "--out", str(manifest), *_args(ckpt)) == 1
    err = capsys.readouterr().err
    assert "is also an input" in err and err.count("\n") == 1
    assert manifest.read_bytes() == before  # the manifest survives
    img_before = imgs[0].read_bytes()
    assert _predict(str(imgs[0].parent), "--out", str(imgs[0]), *_args(ckpt)) == 1  # an image found in a folder
    assert imgs[0].read_bytes() == img_before


def test_a_folder_as_out_or_heatmaps_among_the_inputs_are_refused_up_front(setup, tmp_path, capsys) -> None:
    ckpt, imgs, _ = setup
    assert _predict(*map(str, imgs), "--out", str(tmp_path), *_args(ckpt)) == 1
    err = capsys.readouterr().err
    assert "is a folder" in err and err.count("\n") == 1
    scans = tmp_path / "scans"
    scans.mkdir()
    for p in imgs[:2]:
        (scans / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "p.jsonl"
    for heat in (scans, scans / "overlays"):  # the folder searched, or one inside it (searched recursively)
        assert _predict(str(scans), "--out", str(out), "--heatmap", str(heat), *_args(ckpt)) == 1
        err = capsys.readouterr().err
        assert "a folder it searches for inputs" in err and err.count("\n") == 1
        assert sorted(f.name for f in scans.iterdir()) == sorted(p.name for p in imgs[:2]) and not out.exists()
    # a file named on its own does not make its folder a searched one
    assert _predict(str(scans / imgs[0].name), "--out", str(out), "--heatmap", str(scans), *_args(ckpt)) == 0


def test_resume_skips_done_inputs_and_appends(setup, tmp_path, capsys) -> None:
    ckpt, imgs, manifest = setup
    out = tmp_path / "preds.jsonl"
    assert _predict(*map(str, imgs[:3]), "--out", str(out), *_args(ckpt)) == 0
    first = _jsonl(out)
    assert [r["path"] for r in first] == [str(p) for p in imgs[:3]]
    capsys.readouterr()
    assert _predict(*map(str, imgs), "--out", str(out), "--resume", *_args(ckpt)) == 0
    assert "3 of 5 inputs already have a record" in capsys.readouterr().err
    recs = _jsonl(out)
    assert [r["path"] for r in recs] == [str(p) for p in imgs]  # no duplicates, old ones first and unchanged
    assert recs[:3] == first
    csv_out = tmp_path / "preds.csv"
    assert _predict(*map(str, imgs[:2]), "--out", str(csv_out), *_args(ckpt)) == 0
    assert _predict(*map(str, imgs), "--out", str(csv_out), "--resume", *_args(ckpt)) == 0
    assert list(pd.read_csv(csv_out)["path"]) == [str(p) for p in imgs]


def test_interrupted_run_leaves_a_valid_file_and_says_how_far(setup, tmp_path, capsys,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from covidcxr.predict.output import SafeRecordWriter

    ckpt, imgs, _ = setup
    real_write = SafeRecordWriter.write

    def write_then_ctrl_c(self, rec):  # Ctrl-C arrives while the third record is due
        if self.written == 2:
            raise KeyboardInterrupt
        real_write(self, rec)

    monkeypatch.setattr(SafeRecordWriter, "write", write_then_ctrl_c)
    out = tmp_path / "run.jsonl"
    assert _predict(*map(str, imgs), "--out", str(out), *_args(ckpt)) == 130
    err = capsys.readouterr().err
    assert "interrupted after 2 of 5 inputs" in err and "--resume" in err and str(out) in err
    assert [r["path"] for r in _jsonl(out)] == [str(p) for p in imgs[:2]]  # valid JSON lines, whole records
    assert not list(tmp_path.glob(".*partial*"))  # no temporary left behind

    # Re-running without --resume and interrupting again must not wipe the earlier file
    before = out.read_bytes()
    assert _predict(*map(str, imgs), "--out", str(out), *_args(ckpt)) == 130
    err = capsys.readouterr().err
    assert out.read_bytes() == before and "run.partial.jsonl" in err
    # ... and --resume continues from it
    monkeypatch.setattr(SafeRecordWriter, "write", real_write)
    assert _predict(*map(str, imgs), "--out", str(out), "--resume", *_args(ckpt)) == 0
    assert [r["path"] for r in _jsonl(out)] == [str(p) for p in imgs]


def test_resume_takes_only_this_outputs_interrupted_files_and_never_a_running_ones(tmp_path) -> None:
    from covidcxr.predict.output import SafeRecordWriter, leftovers

    rec = json.dumps({"path": "x.png", "label": "normal"}) + "\n"
    mine = tmp_path / ".preds.ab12cd_9.partial.jsonl"
    other = tmp_path / ".preds.site2.ab12cd_9.partial.jsonl"  # the temporary file of preds.site2.jsonl
    for f in (mine, other):
        f.write_text(rec)
    assert leftovers(tmp_path / "preds.jsonl") == [mine]
    assert leftovers(tmp_path / "preds.site2.jsonl") == [other]
    running = SafeRecordWriter(str(tmp_path / "run.jsonl"), CLASSES)  # holds its temporary file locked
    running.write({"path": "y.png", "label": "normal", "probabilities": {}})
    try:
        assert leftovers(tmp_path / "run.jsonl") == []
    finally:
        running.finish(True)
    assert (tmp_path / "run.jsonl").is_file()


def test_a_killed_run_resumes_from_what_it_had_written(setup, tmp_path) -> None:
    """SIGKILL (no Python handler runs): the records already written are in the temporary file beside --out;
    --resume picks them up, predicts only the rest, and leaves one file with every input once."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import cv2

    ckpt, _, _ = setup
    scans = tmp_path / "scans"
    scans.mkdir()
    yy, xx = np.mgrid[0:1400, 0:1400]
    cv2.imwrite(str(scans / "base.png"), ((xx + yy) % 256).astype(np.uint8))  # large: each read takes a while
    for i in range(150):  # hard links: distinct inputs, one file on disk
        os.link(scans / "base.png", scans / f"s{i:03d}.png")
    (scans / "base.png").unlink()
    out = tmp_path / "preds.jsonl"
    cli = str(Path(sys.executable).with_name("covidcxr"))
    proc = subprocess.Popen([cli, "predict", str(scans), "--out", str(out), "--batch-size", "1", *_args(ckpt)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def written() -> int:
        return sum(len(_jsonl(f)) for f in tmp_path.glob(".preds.*.partial.jsonl"))

    end = time.time() + 600
    while written() < 3 and proc.poll() is None and time.time() < end:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not out.exists() and written() >= 3
    r = subprocess.run([cli, "predict", str(scans), "--out", str(out), "--resume", *_args(ckpt)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "interrupted run(s) on it" in r.stderr
    import re

    kept = re.search(r"(\d+) of 150 inputs already have a record", r.stderr)
    assert kept and int(kept.group(1)) >= 3, r.stderr  # those were not predicted again
    paths = [rec["path"] for rec in _jsonl(out)]
    assert sorted(paths) == sorted(str(p) for p in scans.glob("*.png")) and len(set(paths)) == 150
    assert not list(tmp_path.glob(".preds.*partial*"))  # the killed run's file was taken in and removed


# --------------------------------------------------------------------------- issue 11 §6: plausibility gate


def test_predict_flags_nonsense_and_gives_it_no_disease_label(setup, tmp_path, weights_dir, dev_dir, capsys) -> None:
    import cv2

    ckpt, _, _ = setup
    blank, strip = tmp_path / "blank.png", tmp_path / "strip.png"
    cv2.imwrite(str(blank), np.zeros((512, 512), np.uint8))
    cv2.imwrite(str(strip), (np.random.default_rng(1).random((70, 4000)) * 255).astype(np.uint8))
    cxr = sorted((dev_dir / "images").glob("*.jpg"))[0]
    out = tmp_path / "p.jsonl"
    base = ["--model", str(ckpt), "--workers", "0", "-q"]
    assert _predict(str(blank), str(strip), str(cxr), "--out", str(out), *base) == 0
    recs = {Path(r["path"]).name: r for r in _jsonl(out)}
    for name in ("blank.png", "strip.png"):
        r = recs[name]
        assert r["flag"] == "not_a_frontal_cxr" and r["label"] == "not_a_frontal_cxr", r
        assert r["plausibility"]["verdict"] == "not_a_frontal_cxr" and r["plausibility"]["reason"]
        assert set(r["probabilities"]) == set(CLASSES)  # still reported, for transparency
    r = recs[cxr.name]
    assert r["flag"] is None and r["label"] in CLASSES and r["plausibility"]["verdict"] == "frontal_cxr"
    assert "did not look like a frontal chest X-ray" in capsys.readouterr().err
    # the override keeps the disease label, still flagged
    out2 = tmp_path / "p2.csv"
    assert _predict(str(blank), "--out", str(out2), "--label-implausible", *base) == 0
    row = pd.read_csv(out2).iloc[0]
    assert row["label"] in CLASSES and row["flag"] == "not_a_frontal_cxr" and row["plausibility"] == "not_a_frontal_cxr"


def test_predict_without_segmenter_weights_says_unchecked(setup, tmp_path, monkeypatch, capsys, caplog) -> None:
    ckpt, imgs, _ = setup
    monkeypatch.setenv("COVIDCXR_WEIGHTS_DIR", str(tmp_path / "no-weights"))
    out = tmp_path / "u.jsonl"
    assert _predict(str(imgs[0]), "--out", str(out), "--model", str(ckpt), "--workers", "0", "-q") == 0
    r = _jsonl(out)[0]
    assert r["plausibility"]["verdict"] == "unchecked" and "unavailable" in r["plausibility"]["reason"]
    assert r["label"] in CLASSES
    said = capsys.readouterr().err + caplog.text
    assert said.count("plausibility check unavailable") == 1  # said once (a log warning), not per record


def test_service_flags_a_blank_upload_and_page_shows_it(setup, tmp_path) -> None:
    """The blank black PNG the web page called COVID-19: now flagged, no disease label, reason given."""
    import cv2

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from covidcxr.serve import create_app

    ckpt, _, _ = setup
    ok, blank = cv2.imencode(".png", np.zeros((512, 512), np.uint8))
    with TestClient(create_app(ckpt, api_key="")) as c:
        r = c.post("/v1/predict", files={"file": ("blank.png", blank.tobytes(), "image/png")})
        assert r.status_code == 200, r.text
        j = r.json()
        assert j["flag"] == "not_a_frontal_cxr" and j["label"] == "not_a_frontal_cxr"
        assert j["plausibility"]["rule"] == "uniform" and "uniform" in j["plausibility"]["reason"]
        page_js = c.get("/static/app.js").text if c.get("/static/app.js").status_code == 200 else ""
    if page_js:
        assert "not_a_frontal_cxr" in page_js and "decision_rule" in page_js
    with TestClient(create_app(ckpt, api_key="", label_implausible=True)) as c:
        j = c.post("/v1/predict", files={"file": ("blank.png", blank.tobytes(), "image/png")}).json()
        assert j["flag"] == "not_a_frontal_cxr" and j["label"] in CLASSES
