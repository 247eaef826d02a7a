"""Quantization-aware fine-tuning (covidcxr.train.qat, `covidcxr qat`): synthetic images, a small MobileNetV2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from covidcxr.models import build
from covidcxr.models.checkpoint import load, save
from covidcxr.preprocess import get_preset
from covidcxr.train.qat import Simulator, finetune, fold_batchnorm

CLASSES = ["COVID-19", "normal", "pneumonia"]


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = build("mobilenet_v2", num_classes=3)
    with torch.no_grad():  # BatchNorm statistics as after training: folding has something to fold
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.2)
                mod.running_var.uniform_(0.2, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.1)
    return m.eval()


def _images(n: int = 48, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def test_folding_batchnorm_keeps_the_function_and_the_architecture():
    m = _model()
    x = _images(8)
    with torch.no_grad():
        before = m(x)
        folded = _model()
        n = fold_batchnorm(folded)
        after = folded(x)
    assert n == 52  # every Conv2d -> BatchNorm2d pair of MobileNetV2
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)
    assert set(folded.state_dict()) == set(m.state_dict())  # loads into the same arch
    bns = [b for b in folded.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    assert all(torch.all(b.weight == 1) and torch.all(b.running_mean == 0) for b in bns)


def test_simulated_int8_moves_the_logits_only_while_enabled_and_leaves_plain_weights():
    m = _model()
    fold_batchnorm(m)
    x = _images(8)
    with torch.no_grad():
        ref = m(x)
    sim = Simulator(m)
    sim.observe(iter([x]))
    assert all(np.isfinite(r.hi) for r in sim.ranges.values()) and len(sim.ranges) > 30
    with torch.no_grad():
        assert torch.allclose(m(x), ref)  # disabled: fp32
        sim.enabled = True
        q = m(x)
        sim.enabled = False
    assert not torch.allclose(q, ref, atol=1e-3)
    sim.remove()
    assert set(m.state_dict()) == set(_model().state_dict())
    with torch.no_grad():
        assert torch.allclose(m(x), ref)


def test_layers_the_export_keeps_fp32_are_not_rounded():
    from torch.nn.utils import parametrize

    from covidcxr.train.qat import QATError

    m = _model()
    fold_batchnorm(m)
    convs = [c for c in m.modules() if isinstance(c, torch.nn.Conv2d)]
    sim = Simulator(m, fp32_convs=4)
    assert not any(parametrize.is_parametrized(c, "weight") for c in convs[:4])
    assert all(parametrize.is_parametrized(c, "weight") for c in convs[4:])
    assert sim.weights == len(convs) - 4 + 1  # and the classifier's Linear
    assert "features.2.conv.0.0.input" not in sim.ranges and "features.2.conv.1.0.input" in sim.ranges
    sim.remove()
    with pytest.raises(QATError, match="keep-fp32"):
        Simulator(m, fp32_convs=len(convs) + 1)


def test_boundary_margin_is_the_nearer_of_the_two_label_changes():
    from covidcxr.train.qat import _boundary_margin

    z = torch.tensor([[0.0, 0.0, 0.0], [5.0, 0.0, -1.0], [-4.0, 3.0, 0.0]])
    m = _boundary_margin(z, 1.0, 0, 0.5)
    assert m[0] == 0  # on both boundaries
    assert abs(float(m[1]) - 1.0) < 1e-6  # COVID-19 far above 0.5 (log-odds 4.7), normal vs pneumonia 1 apart
    assert abs(float(m[2]) - 3.0) < 1e-6  # COVID-19 log-odds -7.05, far below; normal and pneumonia 3 apart
    assert abs(float(_boundary_margin(z, 1.0, 0, 0.001)[2]) - abs(-7.0486 + 6.9068)) < 1e-3  # now COVID-19 is near


def test_finetuning_lowers_its_objective_and_leaves_the_input_model_alone():
    # a random network's logits hardly vary between images, so its INT8 error says nothing (docs/deployment.md has
    # the figures on real films); what holds here: the objective falls, and the input model is untouched
    m = _model()
    x = _images(48)
    with torch.no_grad():
        p = torch.softmax(m(x), 1)[:, 0]
    state = {k: v.clone() for k, v in m.state_dict().items()}
    m.train()  # the caller's mode is the caller's
    tuned, rep = finetune(m, x, temperature=1.0, positive_index=0, threshold=float(p.median()), epochs=4, lr=1e-5,
                          batch_size=8, calibration_count=16)
    assert rep.steps == 24 and rep.bn_folded == 52 and rep.calibration_images == 16
    assert rep.history[-1]["loss"] < rep.history[0]["loss"]
    assert m.training and all(p.requires_grad for p in m.parameters())
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
    assert set(tuned.state_dict()) == set(m.state_dict())
    with torch.no_grad():  # the input model is untouched
        assert torch.allclose(torch.softmax(m.eval()(x), 1)[:, 0], p)


def _write_run(tmp: Path, arch: str = "mobilenet_v2") -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        f = tmp / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (72, 72), dtype=np.uint8)).save(f)
        rows.append({"patient_id": f"p{i}", "path": str(f), "label": CLASSES[i % 3], "source": "s",
                     "split": "train" if i < 18 else "val"})
    man = tmp / "manifest.csv"
    pd.DataFrame(rows).to_csv(man, index=False)
    model = _model() if arch == "mobilenet_v2" else build(arch, num_classes=3).eval()
    ckpt = tmp / "model.ckpt"
    save(ckpt, model, arch=arch, classes=CLASSES, preset=get_preset("imagenet", size=64), threshold=0.3,
         training={"recipe": "test", "model_version": "9.9", "run_name": "src-model"})
    return ckpt, man


def _cli(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("covidcxr")  # the console script, as a user runs it
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=600)


def test_cli_writes_a_loadable_checkpoint_with_the_qat_record(tmp_path):
    ckpt, man = _write_run(tmp_path)
    out = tmp_path / "qat.ckpt"
    r = _cli("qat", "--model", str(ckpt), "--data", str(man), "--out", str(out), "--epochs", "1",
             "--batch-size", "6", "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert "simulated INT8 logit error" in r.stdout
    lm = load(out)
    assert lm.arch == "mobilenet_v2" and lm.classes == CLASSES and lm.threshold == 0.3
    q = lm.training["qat"]
    assert q["train_images"] == 18 and q["steps"] == 3 and q["from_sha256"] and lm.training["recipe"] == "test"
    assert lm.preset.size == 64
    from covidcxr.models.checkpoint import read_bundle
    from covidcxr.models.features import SUMMARY_KEY

    b = read_bundle(out)
    assert SUMMARY_KEY in b and "card" not in b  # site check can compare a site with these weights
    assert "model_version" not in lm.training and "run_name" not in lm.training  # not the input's release
    assert q["from"]["version"] == "9.9" and q["from"]["name"] == "src-model"
    assert lm.metrics["operating_point"]["chosen_on"] == "inherited"


def test_cli_refuses_its_own_input_and_other_architectures_in_one_line(tmp_path):
    ckpt, man = _write_run(tmp_path)
    before = ckpt.read_bytes()
    r = _cli("qat", "--model", str(ckpt), "--data", str(man), "--out", str(ckpt))
    assert r.returncode == 1 and "would write over its input" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and ckpt.read_bytes() == before
    other = tmp_path / "r"
    other.mkdir()
    rckpt, rman = _write_run(other, arch="resnet18")
    r = _cli("qat", "--model", str(rckpt), "--data", str(rman), "--out", str(other / "q.ckpt"))
    assert r.returncode == 1 and "mobilenet_v2 only" in r.stderr and "Traceback" not in r.stderr
    assert not (other / "q.ckpt").exists()


def test_cli_refuses_a_manifest_without_train_rows(tmp_path):
    ckpt, man = _write_run(tmp_path)
    df = pd.read_csv(man)
    df["split"] = "val"
    df.to_csv(man, index=False)
    r = _cli("qat", "--model", str(ckpt), "--data", str(man), "--out", str(tmp_path / "q.ckpt"))
    assert r.returncode == 1 and "no 'train' rows" in r.stderr and "Traceback" not in r.stderr
