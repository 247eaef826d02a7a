"""ONNX export: metadata, dynamic batch, parity with PyTorch on real images, the ONNX Predictor, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from covidcxr import models
from covidcxr.cli import main
from covidcxr.export import ExportError, check_parity, export_onnx
from covidcxr.predict import Predictor, read_onnx_metadata
from covidcxr.preprocess import get_preset

pytest.importorskip("onnxruntime")
CLASSES = ["normal", "pneumonia", "COVID-19"]


def make_ckpt(path: Path, seed: int = 0, threshold: float | None = 0.4, temperature: float = 1.7) -> Path:
    torch.manual_seed(seed)
    models.save(path, models.build("resnet18", num_classes=3), arch="resnet18", classes=CLASSES,
                preset=get_preset("deepcovid", size=64), threshold=threshold, temperature=temperature,
                training={"run_name": "tiny-export", "epochs": 0}, metrics={"auc": None})
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, dev_dir: Path) -> dict:
    d = tmp_path_factory.mktemp("export")
    ckpt = make_ckpt(d / "tiny.ckpt")
    report = export_onnx(ckpt, d / "tiny.onnx", parity_images=[dev_dir / "images"], parity_count=8)
    return {"ckpt": ckpt, "onnx": d / "tiny.onnx", "report": report, "dir": d}


def test_export_metadata_and_report(exported: dict) -> None:
    rep = exported["report"]
    assert rep.passed and rep.max_abs_diff <= 1e-4 and rep.labels_equal
    assert rep.parity_images == 8 and rep.batch_sizes == [1, 8] and "given images" in rep.parity_source
    meta = read_onnx_metadata(exported["onnx"])
    assert meta["classes"] == CLASSES and meta["threshold"] == 0.4 and meta["temperature"] == pytest.approx(1.7)
    assert meta["arch"] == "resnet18" and meta["task"] == "classification"
    assert get_preset(meta["preset"]) == get_preset("deepcovid", size=64)  # the preset round-trips exactly
    assert len(meta["source_sha256"]) == 64


def test_onnx_graph_has_dynamic_batch_and_calibrated_probabilities(exported: dict) -> None:
    import onnxruntime as ort

    s = ort.InferenceSession(str(exported["onnx"]), providers=["CPUExecutionProvider"])
    assert [o.name for o in s.get_outputs()] == ["logits", "probabilities"]
    assert not isinstance(s.get_inputs()[0].shape[0], int)  # symbolic batch axis
    tp = Predictor.from_path(exported["ckpt"])
    for n in (1, 3, 5):
        x = torch.randn(n, 3, 64, 64)
        logits, probs = s.run(None, {"input": x.numpy()})
        assert logits.shape == (n, 3) and probs.shape == (n, 3)
        np.testing.assert_allclose(probs, tp.probabilities(x), atol=1e-5)


def test_onnx_predictor_matches_torch_on_real_files(exported: dict, samples_dir: Path) -> None:
    tp = Predictor.from_path(exported["ckpt"])
    op = Predictor.from_path(exported["onnx"])  # backend chosen by suffix
    assert op.backend_name == "onnx" and op.torch_model is None
    assert (op.classes, op.threshold, op.temperature, op.arch) == (tp.classes, tp.threshold, tp.temperature, tp.arch)
    assert op.preset == tp.preset and op.name == "tiny-export"
    rt = list(tp.predict_paths([samples_dir]))
    ro = list(op.predict_paths([samples_dir]))
    assert len(rt) == len(ro) == 4
    for a, b in zip(rt, ro):
        assert a["label"] == b["label"]
        for c in CLASSES:
            assert abs(a["probabilities"][c] - b["probabilities"][c]) <= 1e-4


def test_parity_check_catches_a_mismatched_model(exported: dict, samples_dir: Path) -> None:
    other = Predictor.from_path(make_ckpt(exported["dir"] / "other.ckpt", seed=1))
    with pytest.raises(ExportError, match="parity check FAILED"):
        check_parity(other, exported["onnx"], [samples_dir])


def test_cli_export_and_predict_with_onnx(exported: dict, samples_dir: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "m.onnx"
    assert main(["export", "--model", str(exported["ckpt"]), "--onnx", str(out), "--parity-images",
                 str(samples_dir), "--exporter", "torchscript"]) == 0
    text = capsys.readouterr().out
    assert "parity: max |p_onnx - p_torch|" in text and "labels identical: True" in text
    assert main(["predict", str(samples_dir), "--model", str(out), "--backend", "onnx", "-q", "--workers", "0"]) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(recs) == 4 and all(r["error"] is None for r in recs)


def test_cli_export_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"garbage")
    assert main(["export", "--model", str(bad), "--onnx", str(tmp_path / "x.onnx")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "bad.ckpt" in err
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07")
    assert main(["predict", str(tmp_path), "--model", str(broken)]) == 1
    assert "cannot load ONNX model" in capsys.readouterr().err
    # a valid ONNX file without covidcxr metadata is refused with a hint, not guessed at
    plain = tmp_path / "plain.onnx"
    torch.onnx.export(torch.nn.Conv2d(3, 3, 1), (torch.zeros(1, 3, 8, 8),), str(plain), dynamo=False)
    assert main(["predict", str(tmp_path), "--model", str(plain)]) == 1
    err = capsys.readouterr().err
    assert "no covidcxr metadata" in err and "covidcxr export" in err


@pytest.mark.slow
def test_whole_dev_set_identical_labels_torch_vs_onnx(exported: dict, dev_dir: Path, tmp_path: Path) -> None:
    """The issue's acceptance check: `predict` over the whole dev set gives identical labels with both backends."""
    outs = {}
    for backend, model in (("torch", exported["ckpt"]), ("onnx", exported["onnx"])):
        out = tmp_path / f"{backend}.jsonl"
        rc = main(["predict", str(dev_dir / "metadata.csv"), "--model", str(model), "--backend", backend,
                   "--out", str(out), "--batch-size", "32", "--workers", "1", "-q",
                   # the model's labels, not the plausibility gate's (both backends run it; docs/deployment.md)
                   "--no-plausibility"])
        assert rc == 0
        outs[backend] = [json.loads(line) for line in out.read_text().splitlines()]
    t, o = outs["torch"], outs["onnx"]
    assert len(t) == len(o) == 443
    assert [r["path"] for r in t] == [r["path"] for r in o]
    assert [r["label"] for r in t] == [r["label"] for r in o]
    diff = max(abs(a["probabilities"][c] - b["probabilities"][c]) for a, b in zip(t, o) for c in CLASSES)
    assert diff <= 1e-4


def test_onnx_predict_and_service_never_import_torch(exported: dict, samples_dir: Path) -> None:
    """Issue 11 §7: the ONNX paths (CLI predict with workers, the service app) run without torch."""
    import subprocess
    import sys

    code = (
        "import sys, json\n"
        "from covidcxr.cli import main\n"
        f"rc = main(['predict', {str(samples_dir)!r}, '--model', {str(exported['onnx'])!r}, '-q', '--workers', '2',"
        " '--threads', '1'])\n"
        "from covidcxr.serve import create_app\n"
        f"app = create_app({str(exported['onnx'])!r}, api_key='')\n"
        "from fastapi.testclient import TestClient\n"
        f"r = TestClient(app).post('/v1/predict', files={{'file': open({str(samples_dir / 'nih-00000001_000.png')!r}, 'rb')}})\n"
        "assert r.status_code == 200, r.text\n"
        "print('TORCH', 'torch' in sys.modules, 'RC', rc, file=sys.stderr)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "TORCH False RC 0" in res.stderr, res.stderr[-2000:]
    assert len(res.stdout.strip().splitlines()) == 4
