"""INT8 export: calibration on train only, metadata as fp32, the parity gate (stored; fails the export loudly).

The passing export is gated with the DEFAULT gate (>= 98 % label agreement, COVID-19 AUC change <= 0.01), on a
real trained checkpoint: a resnet18 trained from scratch (3 epochs, 64 px, about 25 s on one thread) for
COVID-19 against the rest on a split manifest of the dev set plus NIH normal/pneumonia films (a subsample of
each: 295 train, 135 held-out images). Measured: all-INT8 calibration-set logit error 0.015, held-out labels
agree 100 %, AUC change 0.0005, max |dp| 0.024.

What did not pass, and why (so the gate is not loosened for it):
* the same resnet18 on the dev set alone (3 classes; only 26 of its 134 held-out images are not COVID-19, and
  3-epoch MobileNetV2s reached a held-out COVID-19 AUC of only 0.53-0.55 there): 3 labels flip (97.8 %);
* the ImageNet MobileNetV2 of ../shared/weights fine-tuned 3 epochs at 96 px on this manifest: even with its
  high-gain first blocks kept fp32 (``keep_fp32="auto"``, below), INT8 logits stay ~7 % of their spread off
  fp32, and with 6-10 held-out images within 0.5 logit of its threshold, 3-4 labels flip (97.0-97.8 %).
``test_mobilenet_v2_keeps_its_first_blocks_fp32`` checks the automatic fp32 stem on that pretrained body.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("onnxruntime.quantization")

from covidcxr.cli import main  # noqa: E402
from covidcxr.predict import Predictor, read_onnx_metadata  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SIZE = 64
FAST = ["model.weights=none", f"data.size={SIZE}", "data.batch_size=16", "data.num_workers=0",
        "trainer.accelerator=cpu", "trainer.devices=1", "trainer.progress_bar=false", "trainer.num_threads=1", "trainer.log_every_n_steps=1",
        "early_stopping.monitor=null", "trainer.max_epochs=3", "data.augment=none",
        # COVID-19 against the rest (Deep-COVID's task): labels can flip only at the COVID-19 threshold, not also
        # between normal and pneumonia, which 3 epochs cannot tell apart on NIH films
        "data.task=binary"]


@pytest.fixture(scope="module")
def manifest(dev_dir: Path, shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Dev set + NIH normal/pneumonia, split by patient (seed 62), then every 2nd dev COVID-19 and every 4th NIH
    row kept (rows are dropped after the split, so no patient crosses splits)."""
    nih = shared_dir / "nih-cxr14-subset"
    if not (nih / "Data_Entry_2017_v2020.csv").is_file():
        pytest.skip(f"NIH subset not found at {nih}")
    from covidcxr.data import build_manifest, read_manifest, write_manifest

    out = tmp_path_factory.mktemp("qdata")
    build_manifest(sources=[("csv", str(dev_dir / "metadata.csv")), ("nih", str(nih))], out=out / "all", seed=62,
                   near_duplicates=False)
    df = read_manifest(out / "all" / "manifest.csv", require_split=True, check_leakage=False)
    covid, is_nih = df["label"].eq("COVID-19"), df["source"].eq("nih")
    keep = (~covid & ~is_nih) | (covid & (df.groupby(covid).cumcount() % 2 == 0)) | (
        is_nih & (df.groupby(is_nih).cumcount() % 4 == 0))
    path = out / "manifest.csv"
    write_manifest(df[keep].reset_index(drop=True), path)
    return path


@pytest.fixture(scope="module")
def trained(manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from covidcxr.train import fit, load_config

    cfg = load_config(REPO / "configs" / "scratch-cpu.yaml", FAST)
    return fit(cfg, data=manifest, out=tmp_path_factory.mktemp("q") / "run") / "best.ckpt"


@pytest.fixture(scope="module")
def int8(trained: Path, manifest: Path, samples_dir: Path, tmp_path_factory: pytest.TempPathFactory
         ) -> dict:
    import contextlib
    import io

    from covidcxr import quantize

    seen: list[str] = []
    orig = quantize._Calibration.__init__

    def spy(self, predictor, files, *a, **k):  # record what calibration reads
        seen.extend(files)
        orig(self, predictor, files, *a, **k)

    quantize._Calibration.__init__ = spy
    try:
        out = tmp_path_factory.mktemp("int8") / "m.onnx"
        log = io.StringIO()
        with contextlib.redirect_stderr(log), contextlib.redirect_stdout(log):
            rc = main(["export", "--model", str(trained), "--onnx", str(out), "--parity-images", str(samples_dir),
                       "--exporter", "torchscript", "--quantize", "int8", "--calibrate", str(manifest)])
    finally:
        quantize._Calibration.__init__ = orig
    return {"rc": rc, "log": log.getvalue(), "out": out, "fp32": out.with_name("m.fp32.onnx"), "seen": seen}


def test_int8_export_passes_gate_and_keeps_metadata(int8: dict, manifest: Path, trained: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    assert int8["rc"] == 0, int8["log"]
    assert int8["out"].is_file() and int8["fp32"].is_file()
    m8, m32 = read_onnx_metadata(int8["out"]), read_onnx_metadata(int8["fp32"])
    for key in ("preset", "classes", "threshold", "temperature", "arch", "task", "source_sha256"):
        assert m8[key] == m32[key], key  # what inference needs travels unchanged
    q = m8["quantization"]
    from covidcxr.predict import file_sha256

    assert q["mode"] == "int8" and q["calibration_split"] == "train" and q["calibration_images"] == 128
    assert q["fp32_sha256"] == file_sha256(int8["fp32"])
    gate = m8["parity_gate"]
    assert gate["passed"] and gate["splits"] == ["val", "test"] and gate["auc_change"] <= 0.01
    # the gate, unrelaxed: the export's defaults
    assert gate["agreement"] >= 0.98 and gate["min_agreement"] == 0.98 and gate["max_auc_change"] == 0.01
    assert gate["images"] > 100 and gate["auc_fp32"] > 0.7  # a model that separates its held-out classes
    # measured on the calibration images first, all-INT8; keep_fp32="auto" keeps the stem fp32 only when that
    # first attempt's logit error is over the limit (the tiny fixture model sits near it: both outcomes seen)
    first = q["attempts"][0]
    assert first["fp32_convs"] == 0 and q["calibration_logit_error"] <= 0.05
    if first["logit_error"] <= 0.05:
        assert q["fp32_nodes"] == [] and len(q["attempts"]) == 1
    else:
        assert q["fp32_nodes"] == ["/model/conv1/Conv"] and q["attempts"][1]["fp32_convs"] == 1
    # the graph really is quantized: int8 weights, (de)quantize nodes
    import onnx

    g = onnx.load(str(int8["out"])).graph
    ops = {n.op_type for n in g.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert any(t.data_type == onnx.TensorProto.INT8 for t in g.initializer)
    assert int8["out"].stat().st_size < 0.4 * int8["fp32"].stat().st_size


def test_calibration_reads_only_the_train_split(int8: dict, manifest: Path) -> None:
    df = pd.read_csv(manifest)
    split_of = {str(Path(p).resolve()): s for p, s in zip(df["path"], df["split"])}
    seen = int8["seen"]
    assert len(seen) == 128  # the default --calibration-count
    assert {split_of[str(Path(p).resolve())] for p in seen} == {"train"}


def test_int8_predictor_agrees_with_fp32(int8: dict, samples_dir: Path) -> None:
    p8, p32 = Predictor.from_path(int8["out"]), Predictor.from_path(int8["fp32"])
    assert p8.quantization == "int8" and p32.quantization is None
    assert p8.model_card()["parity_gate"]["passed"] is True
    x = np.stack([p32.preprocess(np.random.default_rng(i).random((90, 80), dtype=np.float32)) for i in range(4)])
    a, b = p32.probabilities(x), p8.probabilities(x)
    assert np.abs(a - b).max() < 0.1 and not np.allclose(a, b, atol=1e-7)  # close, but really a different model


def test_gate_fails_loudly_with_bad_calibration(int8: dict, manifest: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    """Calibrating on black images clips every real activation: the gate must catch it and write nothing."""
    import cv2

    black = tmp_path / "black.png"
    cv2.imwrite(str(black), np.zeros((128, 128), np.uint8))
    df = pd.read_csv(manifest)
    base = manifest.parent
    df["path"] = [str(black) if s == "train" else str((base / p).resolve()) for p, s in zip(df["path"], df["split"])]
    bad = tmp_path / "bad.csv"
    df.to_csv(bad, index=False)
    from covidcxr.quantize import QuantizeError, quantize_int8

    out = tmp_path / "bad.onnx"
    with pytest.raises(QuantizeError, match="parity gate FAILED") as exc:
        quantize_int8(int8["fp32"], out, bad, calibration_count=8)
    assert not out.exists() and (tmp_path / "bad.rejected.onnx").is_file()
    assert "nothing written" in str(exc.value)
    meta = read_onnx_metadata(tmp_path / "bad.rejected.onnx")
    assert meta["parity_gate"]["passed"] is False


def test_cli_quantize_user_errors(int8: dict, manifest: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture) -> None:
    from covidcxr.quantize import QuantizeError, quantize_int8

    with pytest.raises(QuantizeError, match="held-out"):
        quantize_int8(int8["fp32"], tmp_path / "x.onnx", manifest, parity_splits=["train"])
    with pytest.raises(QuantizeError, match="already quantized"):
        quantize_int8(int8["out"], tmp_path / "x.onnx", manifest)
    assert main(["export", "--model", "m.ckpt", "--onnx", str(tmp_path / "y.onnx"), "--quantize", "int8"]) == 1
    assert "needs --calibrate" in capsys.readouterr().err
    no_split = tmp_path / "nosplit.csv"
    pd.read_csv(manifest).drop(columns=["split"]).to_csv(no_split, index=False)
    with pytest.raises(QuantizeError) as exc:
        quantize_int8(int8["fp32"], tmp_path / "x.onnx", no_split)
    assert "\n" not in str(exc.value) and "nosplit.csv" in str(exc.value)
    assert json.loads(json.dumps(read_onnx_metadata(int8["out"])["parity_gate"]))  # stored as plain JSON


def test_logit_error_measures_contrast_against_spread() -> None:
    from covidcxr.quantize import logit_error

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(64, 3)) * 4
    assert logit_error(ref, ref) == 0.0
    assert logit_error(ref, ref + 7.0) < 1e-12  # a shift common to all classes changes no probability
    noise = rng.normal(size=ref.shape) * 0.4
    assert 0.05 < logit_error(ref, ref + noise) < 0.2  # ~0.1 of a spread of ~4
    assert logit_error(ref, ref * 2) > logit_error(ref, ref * 1.1)


def test_mobilenet_v2_keeps_its_first_blocks_fp32(weights_dir: Path, manifest: Path, tmp_path: Path) -> None:
    """The pretrained MobileNetV2 body: all-INT8 logits are far off; ``keep_fp32="auto"`` keeps the first convs fp32.

    Its first blocks fold BatchNorm into depthwise gains near 100 (channels that were nearly constant on
    ImageNet), so the rounding of the per-tensor uint8 activations that feed them is amplified.
    """
    import onnx
    import torch

    from covidcxr import models
    from covidcxr.export import export_onnx
    from covidcxr.preprocess import get_preset
    from covidcxr.quantize import MAX_LOGIT_ERROR, quantize_file

    torch.manual_seed(0)
    classes = ["non-COVID", "COVID-19"]
    net = models.create("mobilenet_v2", 2, weights="mobilenet_v2-imagenet", classes=classes, progress=False)
    ckpt = tmp_path / "mnv2.ckpt"
    models.save(ckpt, net, arch="mobilenet_v2", classes=classes, preset=get_preset("imagenet").with_size(96),
                threshold=0.5)
    export_onnx(ckpt, tmp_path / "m.onnx", parity_count=2, exporter="torchscript")
    df = pd.read_csv(manifest)
    files = [str(p) for p in df.loc[df["split"] == "train", "path"]][::8][:32]
    reader = quantize_file(Predictor.from_path(tmp_path / "m.onnx"), tmp_path / "q.onnx", files, keep_fp32="auto")
    tried = reader.attempts
    assert tried[0]["fp32_convs"] == 0 and tried[0]["logit_error"] > 3 * MAX_LOGIT_ERROR  # all INT8: far off
    assert reader.logit_error < tried[0]["logit_error"] / 3 and 0 < len(reader.fp32_nodes) <= 26
    assert reader.fp32_nodes[0].startswith("/model/features/features.0/")  # the stem, in graph order
    g = onnx.load(str(tmp_path / "q.onnx")).graph
    fp32_nodes = set(reader.fp32_nodes)
    deq = {o for n in g.node if n.op_type == "DequantizeLinear" for o in n.output}
    convs = [n for n in g.node if n.op_type == "Conv"]
    for n in convs:  # the kept convs take fp32 weights; every other conv takes dequantized int8 weights
        assert (n.input[1] in deq) == (n.name not in fp32_nodes), n.name
    assert sum(n.name not in fp32_nodes for n in convs) >= 26


def test_the_probability_head_after_the_logits_stays_fp32(tmp_path: Path) -> None:
    """A site checkpoint's bias adds an Add between the logits and the Softmax: like the Div by the temperature,
    it is left out of quantization, so the INT8 file's probabilities are exactly softmax(logits / T + b)."""
    import onnx
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from covidcxr.export import _Exportable
    from covidcxr.quantize import OP_TYPES, _after_logits

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 3))
    T, b = 1.7, [0.4, -0.9, 0.5]
    fp32 = tmp_path / "m.onnx"
    torch.onnx.export(_Exportable(net, T, b, 3).eval(), (torch.zeros(1, 3, 16, 16),), str(fp32), dynamo=False,
                      input_names=["image"], output_names=["logits", "probabilities"],
                      dynamic_axes={"image": {0: "n"}, "logits": {0: "n"}, "probabilities": {0: "n"}})
    head = _after_logits(fp32)
    ops = {n.name: n.op_type for n in onnx.load(str(fp32)).graph.node}
    assert sorted(ops[n] for n in head) == ["Add", "Div", "Softmax"]

    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(4, 3, 16, 16)).astype(np.float32) for _ in range(4)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(batches)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"image": x}

    int8 = tmp_path / "m.int8.onnx"
    quantize_static(str(fp32), str(int8), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=OP_TYPES,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=head,
                    extra_options={"OpTypesToExcludeOutputQuantization": ["Gemm", "MatMul"]})
    g = onnx.load(str(int8)).graph
    assert any(n.op_type == "QuantizeLinear" for n in g.node)  # the body is quantized
    made_by = {o: n for n in g.node for o in n.output}
    add = next(n for n in g.node if n.op_type == "Add")
    assert all(i not in made_by or made_by[i].op_type != "DequantizeLinear" for i in add.input)
    sess = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    logits, probs = sess.run(None, {"image": batches[0]})
    z = logits / T + np.asarray(b, np.float32)
    want = np.exp(z - z.max(1, keepdims=True))
    assert np.allclose(probs, want / want.sum(1, keepdims=True), atol=1e-6)
