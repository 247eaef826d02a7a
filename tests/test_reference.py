"""The shipped reference models: safe fp16 files within the size budget, in the catalogue with their sha256,
loadable by name everywhere a model is accepted, used and announced by default, with a model card, and
exported to ONNX with parity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from covidcxr import reference_models as rm

pytestmark = pytest.mark.skipif(not rm.weights_file("reference").is_file(),
                                reason="reference weights not in this checkout (scripts/train_reference.sh packs them)")

MITCHELL = ["Model details", "Intended use", "Factors", "Metrics", "Training data", "Evaluation data",
            "Quantitative analyses", "Ethical considerations", "Caveats and recommendations"]


def _sha256(p: Path) -> str:
    import hashlib

    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_files_are_fp16_safetensors_within_budget_with_provenance():
    from safetensors import safe_open

    from covidcxr.models.reference import MAX_TOTAL_BYTES

    total = sum(p.stat().st_size for p in rm.REFERENCE_DIR.iterdir() if p.is_file())
    assert total <= MAX_TOTAL_BYTES == 12_000_000
    for name in (rm.CLASSIFIER, rm.SEVERITY):
        with safe_open(str(rm.weights_file(name)), framework="pt") as f:  # no pickle anywhere
            dtypes = {str(f.get_tensor(k).dtype) for k in f.keys()}
        assert "torch.float16" in dtypes and "torch.float32" not in dtypes
        meta = json.loads(rm.meta_file(name).read_text())
        t = meta["training"]
        for key in ("manifest_sha256", "recipe", "seed", "model_version", "weights_init"):
            assert t.get(key) not in (None, ""), f"{name}: provenance lacks {key}"
        assert meta["covidcxr_version"] and meta["preset"]["name"]
        assert "CC BY-NC-SA" in meta["card"]["license"]


def test_catalogue_lists_them_with_the_files_sha256(capsys):
    from covidcxr.cli import main
    from covidcxr.models import catalog

    for name in (rm.CLASSIFIER, rm.SEVERITY):
        entry = catalog.get_entry(name)
        assert entry.sha256 == _sha256(rm.weights_file(name))
        assert entry.size == rm.weights_file(name).stat().st_size
        assert "non-commercial" in entry.license
    assert main(["weights", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[rm.CLASSIFIER]["status"] == "ok" and rows[rm.SEVERITY]["status"] == "ok"


def test_a_changed_byte_is_caught_by_the_catalogue(tmp_path, monkeypatch):
    from covidcxr.models import catalog

    bad = tmp_path / rm.weights_file("reference").name
    data = bytearray(rm.weights_file("reference").read_bytes())
    data[-1] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(catalog.WeightsError, match="sha256"):
        catalog.verify(bad, catalog.get_entry(rm.CLASSIFIER))


def test_reference_loads_without_unpickling_anything(monkeypatch):
    import torch

    from covidcxr import models
    from covidcxr.predict import Predictor
    from covidcxr.severity.model import SeverityModel

    def no_pickle(*a, **k):
        raise AssertionError("torch.load (pickle) used for a shipped reference model")

    monkeypatch.setattr(torch, "load", no_pickle)
    lm = models.load("reference")
    assert lm.classes == ["normal", "pneumonia", "COVID-19"] and lm.task == "classification"
    assert all(p.dtype == torch.float32 for p in lm.model.parameters())  # fp16 on disk, fp32 to run
    assert lm.threshold is not None and 0 < lm.threshold < 1
    pred = Predictor.from_path("reference")
    assert (pred.name, pred.version) == (rm.CLASSIFIER, rm.version(rm.CLASSIFIER))
    sev = SeverityModel.from_path("reference")  # --severity reference: the severity model, not the classifier
    assert sev.task == "severity-scores" and sev.classes == ["geographic_extent", "opacity"]


def test_predict_without_model_uses_and_announces_the_reference(dev_dir, tmp_path, capsys):
    from covidcxr.cli import main
    from covidcxr.io import read_image
    from covidcxr.predict import Predictor

    img = sorted((dev_dir / "images").iterdir())[0]
    out = tmp_path / "p.jsonl"
    assert main(["predict", str(img), "--no-plausibility", "-q", "--out", str(out)]) == 0
    err = capsys.readouterr().err.splitlines()
    notice = [ln for ln in err if ln.startswith("model: ")]
    assert len(notice) == 1
    assert rm.CLASSIFIER in notice[0] and rm.version(rm.CLASSIFIER) in notice[0] and "research use only" in notice[0]
    rec = json.loads(out.read_text().splitlines()[0])
    assert rec["model"]["name"] == rm.CLASSIFIER and rec["model"]["version"] == rm.version(rm.CLASSIFIER)
    # the default is the reference itself: same probabilities as loading the shipped file explicitly
    p = Predictor.from_path(rm.resolve_model("reference"))
    want = p.probabilities(np.stack([p.preprocess(read_image(img))]))[0]
    got = [rec["probabilities"][c] for c in p.classes]
    assert np.allclose(got, want, atol=1e-6)


def test_an_explicit_model_is_not_announced_as_default(capsys):
    assert rm.model_or_default("run/best.ckpt") == "run/best.ckpt"
    assert capsys.readouterr().err == ""
    assert rm.model_or_default(None) == "reference"
    assert "no --model given" in capsys.readouterr().err


def test_missing_reference_is_one_line(tmp_path, monkeypatch, capsys):
    from covidcxr.cli import main

    monkeypatch.setattr(rm, "REFERENCE_DIR", tmp_path)
    assert main(["export", "--model", "reference", "--onnx", str(tmp_path / "x.onnx")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not installed" in err and "covidcxr-reference" in err


def test_models_show_prints_the_card(capsys):
    from covidcxr.cli import main

    assert main(["models", "show", "covidcxr-reference"]) == 0
    out = capsys.readouterr().out
    for title in MITCHELL:
        assert f"### {title}" in out
    assert "research use only" in out.lower() and "site check" in out and "site calibrate" in out
    # the card's headline figure is the stored evaluation's, not typed text
    card = rm.card("reference")
    auc = card["figures"]["test"]["covid_auc"]
    assert f"{auc['value']:.3f} [{auc['ci_low']:.3f}, {auc['ci_high']:.3f}]" in out
    assert main(["models", "show", "covidcxr-reference-severity"]) == 0
    assert "geographic" in capsys.readouterr().out.lower()


def test_export_onnx_of_the_reference_keeps_parity(dev_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    from covidcxr.export import export_onnx
    from covidcxr.predict import Predictor

    imgs = sorted((dev_dir / "images").iterdir())[:4]
    rep = export_onnx("reference", tmp_path / "ref.onnx", parity_images=[str(p) for p in imgs])
    assert rep.passed and rep.max_abs_diff <= 1e-4
    onnx_pred = Predictor.from_path(tmp_path / "ref.onnx")
    assert onnx_pred.name == rm.CLASSIFIER and onnx_pred.threshold == pytest.approx(Predictor.from_path("reference").threshold)


def test_pack_refuses_over_budget(tmp_path, monkeypatch):
    from covidcxr import models
    from covidcxr.models import reference
    from covidcxr.models.checkpoint import CheckpointError
    from covidcxr.preprocess import get_preset

    ckpt = tmp_path / "tiny.ckpt"
    net = models.build("squeezenet1_1", num_classes=3)
    models.save(ckpt, net, classes=["normal", "pneumonia", "COVID-19"], preset=get_preset("imagenet"))
    row = reference.pack(ckpt, "covidcxr-reference", version="9.9", out_dir=tmp_path / "ok")
    assert row[rm.CLASSIFIER]["version"] == "9.9"
    lm = models.load(tmp_path / "ok" / "covidcxr-reference.safetensors")
    assert lm.arch == "squeezenet1_1"
    x = __import__("torch").rand(1, 3, 64, 64)
    assert (lm.model(x) - net.eval()(x)).abs().max() < 1e-2  # fp16 storage: close, not equal
    before = (tmp_path / "ok" / "covidcxr-reference.safetensors").read_bytes()
    monkeypatch.setattr(reference, "MAX_TOTAL_BYTES", 1000)
    with pytest.raises(CheckpointError, match="budget"):
        reference.pack(ckpt, "covidcxr-reference", version="10.0", out_dir=tmp_path / "ok")
    assert (tmp_path / "ok" / "covidcxr-reference.safetensors").read_bytes() == before  # nothing replaced
    assert not [p for p in (tmp_path / "ok").iterdir() if p.name.startswith(".")]


def _films(shared_dir: Path) -> list[str]:
    """Real films that no calibration reads: the source excerpts (Cohen, Actualmed, Figure1 in their original layouts,
    256 px) and the reader samples, less the MONOCHROME1 reader test (not a film a model should be asked about)."""
    from covidcxr.predict import collect_inputs

    files = [f for f in collect_inputs([shared_dir / "source-samples"]) if "/images/" in f.replace("\\", "/")]
    return files + [str(p) for p in sorted((shared_dir / "samples").iterdir()) if "monochrome1" not in p.name]


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="reference 1.0.0 misses the bar (measured: 96.0% of 50 films; its own gate: "
                   "96.6% of 378 val+test images): threshold 0.041 sits in its probability mass and the INT8 error is "
                   "spread over the whole network (docs/deployment.md, 'The default model'; quantization-aware fine-tuning did "
                   "not fix it either: 'Quantization-aware fine-tuning'); strict: passing means "
                   "the export can be served, so this mark goes")
def test_int8_reference_agrees_with_fp32_on_independent_films(shared_dir, tmp_path):
    """The reference exported to INT8 as `covidcxr export --quantize int8` does (train-split calibration of the
    merged benchmark, keep_fp32 auto) labels >= 98 % of real films no calibration read as fp32 does."""
    pytest.importorskip("onnxruntime")
    from covidcxr.data import build_manifest
    from covidcxr.export import export_onnx
    from covidcxr.io import read_image
    from covidcxr.predict import Predictor
    from covidcxr.quantize import _manifest_rows, _spread, quantize_file

    nih, han = shared_dir / "nih-cxr14-subset", shared_dir / "hannover-covid"
    if not nih.is_dir() or not han.is_dir():
        pytest.skip(f"merged benchmark sources not found under {shared_dir}")
    build_manifest(sources=[("csv", str(shared_dir / "covid-cxr-dev" / "metadata.csv")), ("nih", str(nih)),
                            ("hannover", str(han))], out=tmp_path / "data", seed=62)
    cal, _ = _manifest_rows(tmp_path / "data" / "manifest.csv", ["train"])
    films = _films(shared_dir)
    assert len(films) >= 40 and not set(films) & set(cal)
    export_onnx("reference", tmp_path / "ref.fp32.onnx", parity_images=films[:4])
    fp32 = Predictor.from_path(tmp_path / "ref.fp32.onnx", backend="onnx")
    quantize_file(fp32, tmp_path / "ref.int8.onnx", [cal[i] for i in _spread(cal, 128)], keep_fp32="auto")
    int8 = Predictor.from_path(tmp_path / "ref.int8.onnx", backend="onnx")
    x = np.stack([fp32.preprocess(read_image(f)) for f in films])
    la = [fp32.record(r)["label"] for r in fp32.probabilities(x)]
    lb = [int8.record(r)["label"] for r in int8.probabilities(x)]
    agree = float(np.mean([u == v for u, v in zip(la, lb)]))
    assert agree >= 0.98, f"INT8 labels agree with fp32 on {agree:.1%} of {len(films)} independent films"


def test_update_card_keeps_the_manifest_sha256_true(tmp_path):
    """scripts/model_card.py --refresh rewrites only the stored card: weights untouched, MANIFEST follows the sidecar."""
    from covidcxr import models
    from covidcxr.models import reference
    from covidcxr.preprocess import get_preset

    ckpt = tmp_path / "tiny.ckpt"
    models.save(ckpt, models.build("squeezenet1_1", num_classes=3), classes=["normal", "pneumonia", "COVID-19"],
                preset=get_preset("imagenet"))
    out = tmp_path / "ref"
    reference.pack(ckpt, "covidcxr-reference", version="9.9", card={"name": "x", "figures": {}}, out_dir=out)
    weights = (out / "covidcxr-reference.safetensors").read_bytes()
    rows = reference.update_card("reference", {"name": "x", "figures": {"audit": {"images": 3}}}, out_dir=out)
    side = out / "covidcxr-reference.json"
    assert json.loads(side.read_text())["card"]["figures"]["audit"] == {"images": 3}
    assert rows[rm.CLASSIFIER]["metadata_sha256"] == _sha256(side)
    assert json.loads((out / "MANIFEST.json").read_text()) == rows
    assert (out / "covidcxr-reference.safetensors").read_bytes() == weights
    assert json.loads(side.read_text())["training"]["model_version"] == "9.9"
