"""One prediction pipeline for every entry point (issue 21 §1, §2.1, §2.2, §2.9).

The same five inputs -- a film, a blank image, a corrupt file (one classifier), a film through a lung-crop
classifier, and a film through a classifier whose output is NaN -- go through `covidcxr predict`, the REST
service (in-process, FastAPI's TestClient), the DICOM node's analysis engine and the Ray engine (a real local
Ray), and must come back as the same records. Tiny 64 px models; the gate's lung U-Net and the lung crop need
../shared/weights.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from covidcxr import models  # noqa: E402
from covidcxr.cli import main  # noqa: E402
from covidcxr.preprocess import get_preset  # noqa: E402

CLASSES = ["normal", "pneumonia", "COVID-19"]
#: a site calibration whose conformal thresholds keep every class with p >= 0.1: a near-uniform tiny model
#: then gets a set of several classes, shown as "uncertain: refer"
SITE = {"schema_version": 1, "site": "test", "coverage": 0.9,
        "conformal": {"classes": CLASSES, "thresholds": {c: 0.9 for c in CLASSES}, "always_in": []}}


def _save(path: Path, preset: str, *, nan: bool = False, site: dict | None = None, run_name: str) -> Path:
    torch.manual_seed(0)
    net = models.build("resnet18", num_classes=3)
    if nan:  # a broken model: every output NaN
        with torch.no_grad():
            net.fc.bias.fill_(float("nan"))
    from covidcxr.models.checkpoint import make_bundle

    bundle = make_bundle(net, arch="resnet18", classes=CLASSES, preset=get_preset(preset, size=64),
                         threshold=0.4, training={"run_name": run_name})
    if site is not None:
        bundle["site_calibration"] = site
    torch.save(bundle, path)
    return path


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory, samples_dir: Path, weights_dir: Path) -> dict[str, Any]:
    import cv2

    d = tmp_path_factory.mktemp("pipeline")
    film = d / "film.png"
    film.write_bytes((samples_dir / "nih-00000001_000.png").read_bytes())
    blank = d / "blank.png"
    cv2.imwrite(str(blank), np.zeros((256, 256), np.uint8))
    corrupt = d / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    return {
        "dir": d,
        "models": {
            "film": _save(d / "film.ckpt", "deepcovid", site=SITE, run_name="pipe-film"),
            "lungcrop": _save(d / "lungcrop.ckpt", "cxnet-lungcrop", run_name="pipe-lungcrop"),
            "nan": _save(d / "nan.ckpt", "deepcovid", nan=True, run_name="pipe-nan"),
        },
        # which inputs each model sees: five (model, input) pairs in all
        "inputs": {"film": [film, blank, corrupt], "lungcrop": [film], "nan": [film]},
    }


def _norm(rec: dict[str, Any]) -> dict[str, Any]:
    """The fields every entry point must agree on (the rest is entry-point specific)."""
    probs = rec.get("probabilities")
    return {
        "label": rec.get("label"),
        "probabilities": {c: round(float(v), 5) for c, v in probs.items()} if probs else None,
        "flag": rec.get("flag"),
        "verdict": (rec.get("plausibility") or {}).get("verdict"),
        "prediction_set": rec.get("prediction_set"),
        "model": rec.get("model"),
        "error": bool(rec.get("error")),
        "severity": rec.get("severity"),
    }


def _cli(model: Path, inputs: list[Path], out: Path) -> dict[str, dict]:
    main(["predict", *map(str, inputs), "--model", str(model), "--out", str(out), "--workers", "0", "-q"])
    return {Path(r["path"]).name: r for r in map(json.loads, out.read_text().splitlines())}


def _service(model: Path, inputs: list[Path]) -> dict[str, dict]:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from covidcxr.serve import create_app

    out = {}
    with TestClient(create_app(model), raise_server_exceptions=False) as client:
        for f in inputs:
            r = client.post("/v1/predict", files={"file": (f.name, f.read_bytes(), "image/png")})
            j = r.json()
            if r.status_code == 200:
                out[f.name] = j
            else:  # an unusable upload (422) or a model failure (500): the record's error, as one sentence
                assert r.status_code in (422, 500), (r.status_code, j)
                out[f.name] = {"error": j["detail"], "status": r.status_code}
    return out


def _engine(model: Path, inputs: list[Path]) -> dict[str, dict]:
    from covidcxr.dicom.analysis import Engine
    from covidcxr.io import CXRReadError, read_image

    engine = Engine.from_paths(str(model))
    out = {}
    for f in inputs:
        try:
            image = read_image(f)
        except CXRReadError as err:  # the node's own decode: an unreadable instance never reaches the engine
            out[f.name] = {"error": err.reason}
            continue
        a = engine.analyze(image)
        out[f.name] = {**a.record, "analysis_flag": a.flag}
    return out


def _ray(model: Path, inputs: list[Path], out: Path) -> dict[str, dict]:
    from covidcxr.predict.distributed import predict_ray, read_records

    predict_ray([], model, out, files=[str(f) for f in inputs], workers=1, batch_size=4, threads=1)
    return {Path(r["path"]).name: r for r in read_records(out)}


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=150 * 1024 * 1024,
             ignore_reinit_error=True)
    yield ray
    ray.shutdown()


@pytest.mark.timeout(900)
def test_four_entry_points_give_the_same_records(case: dict[str, Any], local_ray, tmp_path: Path) -> None:
    from covidcxr.predict import file_sha256
    from covidcxr.predict.core import NON_FINITE

    for kind, model in case["models"].items():
        inputs = case["inputs"][kind]
        got = {
            "cli": _cli(model, inputs, tmp_path / f"{kind}.jsonl"),
            "service": _service(model, inputs),
            "engine": _engine(model, inputs),
            "ray": _ray(model, inputs, tmp_path / f"{kind}-shards"),
        }
        for f in inputs:
            recs = {where: by[f.name] for where, by in got.items()}
            cli = recs["cli"]
            if kind == "nan":  # a non-finite output is an error everywhere, never a label
                assert cli["error"] == NON_FINITE and cli["label"] is None
                assert recs["ray"]["error"] == NON_FINITE and recs["engine"]["error"] == NON_FINITE
                assert recs["engine"]["analysis_flag"] == "analysis_failed"
                assert recs["service"]["status"] == 500 and NON_FINITE in recs["service"]["error"]
                continue
            if f.name == "corrupt.png":  # the same reason from every reader
                assert cli["error"] and cli["label"] is None
                for where in ("service", "engine", "ray"):
                    assert cli["error"] in recs[where]["error"], (where, recs[where])
                continue
            # every labelled record names the model file that made it
            assert cli["model"] == {"name": f"pipe-{kind}", "version": file_sha256(model)[:12],
                                    "sha256": file_sha256(model)}
            want = _norm(cli)
            for where in ("service", "engine", "ray"):
                rec = dict(recs[where])
                if where == "service":  # the service's model ref adds arch and backend
                    rec["model"] = {k: rec["model"][k] for k in ("name", "version", "sha256")}
                assert _norm(rec) == want, (kind, f.name, where, _norm(rec), want)
            if f.name == "blank.png":  # not a film: flagged, no disease label, everywhere
                assert cli["flag"] == "not_a_frontal_cxr" and cli["label"] == "not_a_frontal_cxr"
            else:
                assert cli["flag"] is None and cli["label"] in CLASSES and cli["error"] is None
                assert math.isclose(sum(cli["probabilities"].values()), 1.0, abs_tol=1e-6)
            if kind == "film":  # site-calibrated: a set of several classes is "uncertain: refer"
                assert len(cli["prediction_set"]) > 1 and cli["uncertain"] is True
                assert recs["service"]["uncertain"] is True and recs["service"]["referral"] == "uncertain: refer"
            else:
                assert "prediction_set" not in cli and recs["service"]["prediction_set"] is None


def test_non_finite_probabilities_are_an_error_not_a_label(case: dict[str, Any]) -> None:
    """Softmax of [nan, 1, 2] was labelled normal by the threshold rule and COVID-19 by argmax (§2.2)."""
    from covidcxr.decision import softmax_with_temperature
    from covidcxr.predict import Predictor
    from covidcxr.predict.core import NON_FINITE

    p = Predictor.from_path(case["models"]["film"])
    for logits in ([math.nan, 1.0, 2.0], [math.inf, 1.0, 2.0], [1.0, -math.inf, math.inf]):
        rec = p.record(softmax_with_temperature(np.array([logits]))[0])
        assert rec["label"] is None and rec["probabilities"] is None and rec["error"] == NON_FINITE, logits
    ok = p.record(softmax_with_temperature(np.array([[0.0, 1.0, -math.inf]]))[0])  # -inf logit: p = 0, finite
    assert ok["error"] is None and ok["label"] in CLASSES


def test_gate_failure_is_per_image_and_reported_down(case: dict[str, Any], weights_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """§2.1: one failure used to turn the gate off for the life of the process. Now each image is tried, the
    failures are counted, and after N in a row /healthz says the gate is down, until a check works again."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from covidcxr.serve import create_app

    film = case["inputs"]["film"][0].read_bytes()
    app = create_app(case["models"]["film"])
    gate = app.state.service.gate
    gate.down_after = 2
    with TestClient(app) as client:  # the gate loads its U-Net on its first check: here, without weights
        monkeypatch.setenv("COVIDCXR_WEIGHTS_DIR", str(tmp_path / "no-weights"))  # the U-Net cannot load
        for n in (1, 2):
            j = client.post("/v1/predict", files={"file": ("f.png", film, "image/png")}).json()
            assert j["plausibility"]["verdict"] == "unchecked" and "unavailable" in j["plausibility"]["reason"]
            assert j["label"] in CLASSES  # unchecked, not refused
            h = client.get("/healthz").json()
            assert h["plausibility"]["failures"] == n
        assert h["status"] == "degraded" and h["plausibility"]["state"] == "down"
        monkeypatch.setenv("COVIDCXR_WEIGHTS_DIR", str(weights_dir))  # the weights are back: the next image loads them
        j = client.post("/v1/predict", files={"file": ("f.png", film, "image/png")}).json()
        assert j["plausibility"]["verdict"] == "frontal_cxr", j["plausibility"]  # checked again: not sticky
        h = client.get("/healthz").json()
        assert h["status"] == "ok" and h["plausibility"]["state"] == "ok" and h["plausibility"]["failures"] == 2


def test_resume_refuses_another_model_and_compares_resolved_paths(case: dict[str, Any], tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture) -> None:
    """§2.9: --resume mixed two models in one file, and predicted a folder twice when it was given once
    relative and once absolute."""
    d = case["dir"]
    folder = tmp_path / "scans"
    folder.mkdir()
    for f in case["inputs"]["film"][:2]:
        (folder / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "p.jsonl"
    base = ["--workers", "0", "-q", "--no-plausibility"]
    monkeypatch.chdir(tmp_path)
    assert main(["predict", "scans", "--model", str(case["models"]["film"]), "--out", str(out), *base]) == 0
    first = [json.loads(x) for x in out.read_text().splitlines()]
    from covidcxr.predict import file_sha256

    assert len(first) == 2 and {r["model"]["sha256"] for r in first} == {file_sha256(case["models"]["film"])}
    capsys.readouterr()
    # the same folder, absolute this time: nothing to do, no record twice
    assert main(["predict", str(folder.resolve()), "--model", str(case["models"]["film"]), "--out", str(out),
                 "--resume", *base]) == 0
    assert "2 of 2 inputs already have a record" in capsys.readouterr().err
    assert len(out.read_text().splitlines()) == 2
    # another model may not continue it
    before = out.read_bytes()
    assert main(["predict", "scans", "--model", str(case["models"]["lungcrop"]), "--out", str(out), "--resume",
                 *base]) == 1
    err = capsys.readouterr().err
    assert "written by another model" in err and len(err.strip().splitlines()) == 1
    assert out.read_bytes() == before
    assert d.is_dir()


def test_dicom_engine_logs_when_the_gate_is_down(case: dict[str, Any], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """§2.1 for the node: each failed check is per image, and the node's log says once that the gate is down."""
    import logging

    from covidcxr.dicom.analysis import Engine
    from covidcxr.io import read_image

    engine = Engine.from_paths(str(case["models"]["film"]))
    engine.gate.down_after = 3
    image = read_image(case["inputs"]["film"][0])
    monkeypatch.setenv("COVIDCXR_WEIGHTS_DIR", str(tmp_path / "no-weights"))  # before the gate's first check
    with caplog.at_level(logging.WARNING):
        for _ in range(4):
            a = engine.analyze(image)
            assert a.plausibility["verdict"] == "unchecked" and a.label in CLASSES
    assert engine.health()["plausibility"]["state"] == "down"
    assert engine.health()["plausibility"]["failures"] == 4
    assert caplog.text.count("plausibility gate is down") == 1


def test_gate_sees_the_same_input_from_every_entry_point(case: dict[str, Any], tmp_path: Path) -> None:
    """The gate got the full-size image in the service and the DICOM node but the decode workers' 512 px copy in
    the CLI and Ray paths, so one film could get two verdicts. Every entry point now gives it the same input
    (through the pipeline): the same verdict, reason and measured lung share."""
    import cv2

    model = case["models"]["film"]
    film = tmp_path / "film-1280.png"  # a film the decode workers shrink for the gate (the sample is 512 px)
    small = cv2.imread(str(case["inputs"]["film"][0]), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(film), cv2.resize(small, (1280, 1280), interpolation=cv2.INTER_CUBIC))
    cli = _cli(model, [film], tmp_path / "p.jsonl")[film.name]["plausibility"]
    assert cli["verdict"] == "frontal_cxr" and 0.04 < cli["lung_fraction"] < 0.7
    assert _service(model, [film])[film.name]["plausibility"] == cli
    assert _engine(model, [film])[film.name]["plausibility"] == cli
