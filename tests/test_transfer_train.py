"""Transfer recipes: head warm-up / linear probe freezing, best-by-val-AUC best.ckpt holding only what
inference needs with a val-chosen threshold, --overwrite, and the twice-transfer stages (ChestX-ray14
findings -> COVID with output neuron keeping).

A synthetic manifest (random 64 px PNGs, NIH-style findings) keeps every fit to a few seconds and needs no
shared data.
"""

from __future__ import annotations

import glob
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from covidcxr import models
from covidcxr.train import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
FAST = ["data.size=64", "data.batch_size=4", "data.num_workers=0", "trainer.accelerator=cpu", "trainer.devices=1",
        "trainer.progress_bar=false", "trainer.num_threads=1", "trainer.log_every_n_steps=1",
        "early_stopping.monitor=null", "data.augment=none"]
FINDINGS = {"normal": ["No Finding"], "pneumonia": ["Pneumonia", "Pneumonia|Infiltration", "Effusion|Pneumonia"]}


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A split manifest of 60 random images; NIH-like rows carry findings, COVID-19 rows none."""
    d = tmp_path_factory.mktemp("synth")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(60):
        label = ("normal", "pneumonia", "COVID-19")[i % 3]
        split = ("train",) * 6 + ("val",) * 2 + ("test",) * 2
        img = (rng.random((72, 80)) * 255).astype(np.uint8)
        if label == "COVID-19":
            img[20:50, 20:60] = 255  # something to learn
        p = d / f"img{i:03d}.png"
        cv2.imwrite(str(p), img)
        opts = FINDINGS.get(label)
        rows.append({"patient_id": f"p{i}", "path": str(p), "label": label, "source": "nih" if opts else "cohen",
                     "split": split[(i // 3) % 10], "findings": opts[(i // 3) % len(opts)] if opts else ""})
    out = d / "manifest.csv"
    pd.DataFrame(rows).to_csv(out, index=False)
    return out


def _cfg(recipe: str | None, extra: list[str] = ()) -> dict:
    return load_config(REPO / "configs" / recipe if recipe else None, [*FAST, *extra])


def _random_mobilenet(tmp_path: Path) -> Path:
    torch.manual_seed(1)
    net = models.build("mobilenet_v2", num_classes=1000)
    sd = {k: v for k, v in net.state_dict().items() if not k.startswith("classifier")}  # features only, as shared
    torch.save(sd, tmp_path / "init.pth")
    return tmp_path / "init.pth"


def _body(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if k.startswith("features.")}


# --------------------------------------------------------------------------- freezing


def test_warmup_freezes_body_and_batchnorm_then_fine_tunes(synth: Path, tmp_path: Path) -> None:
    from covidcxr.train import fit

    init = torch.load(_random_mobilenet(tmp_path), weights_only=True)
    over = ["model.arch=mobilenet_v2", f"model.weights={tmp_path / 'init.pth'}", "model.warmup_epochs=1",
            "trainer.limit_train_batches=3"]
    one = fit(_cfg(None, [*over, "trainer.max_epochs=1"]), synth, tmp_path / "one")
    b1 = models.load(one / "last.ckpt").model.state_dict()
    # after the warm-up epoch: every body tensor (weights and BatchNorm running statistics) as loaded
    assert all(torch.equal(b1[k], v) for k, v in init.items() if not k.endswith("num_batches_tracked"))
    two = fit(_cfg(None, [*over, "trainer.max_epochs=2"]), synth, tmp_path / "two")
    b2 = models.load(two / "last.ckpt").model.state_dict()
    changed = [k for k, v in _body(init).items() if v.dtype.is_floating_point and not torch.equal(b2[k], v)]
    assert len(changed) > 0.9 * sum(v.dtype.is_floating_point for v in _body(init).values())
    lrs = pd.read_csv(next((two / "logs").glob("version_*/metrics.csv")))
    assert {"lr-Adam/head", "lr-Adam/body"} <= set(lrs.columns)


def test_linear_probe_trains_only_the_head_and_body_lr_mult() -> None:
    from covidcxr.preprocess import get_preset
    from covidcxr.train import CXRClassifier

    classes, pre = ["normal", "pneumonia", "COVID-19"], get_preset("imagenet", size=64)
    probe = CXRClassifier(_cfg(None, ["model.arch=mobilenet_v2", "model.freeze_backbone=true"]), classes, pre)
    opt = probe.configure_optimizers()
    assert [g["name"] for g in opt.param_groups] == ["head"]
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == 1280 * 3 + 3
    before = {k: v.clone() for k, v in probe.model.state_dict().items()}
    probe.train()
    loss = probe._loss(probe(torch.rand(4, 3, 64, 64)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    opt.step()
    after = probe.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith("features."))
    assert not torch.equal(after["classifier.1.weight"], before["classifier.1.weight"])
    ft = CXRClassifier(_cfg(None, ["model.arch=mobilenet_v2", "optimizer.lr=1e-3", "optimizer.body_lr_mult=0.1"]),
                       classes, pre)
    groups = {g["name"]: g["lr"] for g in ft.configure_optimizers().param_groups}
    assert groups == {"head": 1e-3, "body": pytest.approx(1e-4)}
    with pytest.raises(ConfigError, match="warmup_epochs"):
        _cfg(None, ["model.warmup_epochs=-1"])
    with pytest.raises(ConfigError, match="body_lr_mult"):
        _cfg(None, ["optimizer.body_lr_mult=0"])


# --------------------------------------------------------------------------- best.ckpt, threshold, overwrite


@pytest.fixture(scope="module")
def run(synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from covidcxr.train import fit

    cfg = _cfg("transfer-mobilenet_v2.yaml", ["model.weights=none", "trainer.max_epochs=2",
                                              "trainer.limit_train_batches=3"])
    return fit(cfg, synth, tmp_path_factory.mktemp("tr") / "run")


def test_best_ckpt_is_the_inference_bundle_with_a_val_threshold(run: Path, synth: Path) -> None:
    import json

    from covidcxr.evaluate.core import val_operating_point

    raw = torch.load(run / "best.ckpt", map_location="cpu", weights_only=False)
    assert raw["format"] == "covidcxr-checkpoint" and "optimizer_states" not in raw and "covidcxr" not in raw
    last = torch.load(run / "last.ckpt", map_location="cpu", weights_only=False)
    assert "optimizer_states" in last and (run / "best.ckpt").stat().st_size < (run / "last.ckpt").stat().st_size / 1.5
    summary = json.loads((run / "summary.json").read_text())
    assert summary["monitor"] == "val_auc_covid" and summary["best_epoch"] in (0, 1)
    assert raw["training"]["epoch"] == summary["best_epoch"]
    # the stored threshold is the val operating point of the best weights, recomputed here independently
    lm = models.load(run / "best.ckpt")
    df = pd.read_csv(synth)
    val = df[df["split"] == "val"].reset_index(drop=True)
    x = torch.stack([lm.preset(cv2.imread(p, cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255.0) for p in val["path"]])
    with torch.no_grad():
        probs = torch.softmax(lm.model(x), 1).numpy()
    op = val_operating_point(val, probs, lm.classes, "COVID-19", 0.95)
    assert lm.threshold == pytest.approx(op["threshold"], rel=1e-4, abs=1e-6)
    assert summary["threshold"] == pytest.approx(lm.threshold)
    assert "validation" in raw["metrics"]["operating_point"]["note"]


def test_existing_run_is_refused_without_overwrite(run: Path, synth: Path, capsys: pytest.CaptureFixture) -> None:
    from covidcxr.cli import main

    before = (run / "best.ckpt").read_bytes()
    args = ["train", "--config", "configs/transfer-mobilenet_v2.yaml", "--data", str(synth), "--out", str(run),
            *[a for kv in FAST for a in ("--set", kv)], "--weights", "none", "--max-epochs", "1",
            "--set", "trainer.limit_train_batches=1"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert "already holds a trained run" in err and "--overwrite" in err and "\n" not in err
    assert (run / "best.ckpt").read_bytes() == before
    assert main([*args, "--overwrite"]) == 0
    assert (run / "best.ckpt").read_bytes() != before


# --------------------------------------------------------------------------- twice transfer (stages)


def test_findings_stage_then_covid_with_output_neuron_keeping(synth: Path, tmp_path: Path) -> None:
    import json

    from covidcxr.train import fit

    init = _random_mobilenet(tmp_path)
    cfg = _cfg("twice-transfer-mobilenet_v2.yaml", [f"model.weights={init}", "trainer.max_epochs=1",
                                                    "trainer.limit_train_batches=2"])
    out = fit(cfg, synth, tmp_path / "twice")
    nih = out / "stages" / "chestxray14" / "best.ckpt"
    b = models.checkpoint.read_bundle(nih)
    assert b["task"] == "findings-multilabel"
    assert b["classes"] == ["Effusion", "Infiltration", "No Finding", "Pneumonia"]
    assert torch.equal(_body(b["state_dict"])["features.0.0.weight"],
                       torch.load(init, weights_only=True)["features.0.0.weight"])  # warm-up: body kept
    final = models.checkpoint.read_bundle(out / "best.ckpt")
    assert final["classes"] == ["normal", "pneumonia", "COVID-19"]
    assert final["init"]["kept_neurons"].keys() == {"normal", "pneumonia"}
    assert final["init"]["sha256"] == json.loads((out / "summary.json").read_text())["training"]["stages"][0]["sha256"]
    # neuron keeping itself: the new head's rows are the NIH head's "No Finding" and "Pneumonia" rows
    net = models.create("mobilenet_v2", weights=str(nih))
    w = b["state_dict"]["classifier.1.weight"]
    assert torch.equal(net.classifier[1].weight[0], w[2]) and torch.equal(net.classifier[1].weight[1], w[3])
    assert not torch.equal(net.classifier[1].weight[2], w[0])
    # a chain killed after its first stage resumes without retraining that stage
    stage_bytes = nih.read_bytes()
    for f in ("best.ckpt", "last.ckpt", "summary.json"):
        (out / f).unlink()
    fit(cfg, synth, out, resume=True)
    assert nih.read_bytes() == stage_bytes and (out / "best.ckpt").is_file()


def test_stage_errors_are_one_line(synth: Path, tmp_path: Path) -> None:
    from covidcxr.train import fit

    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - name: a\n    overrides: {optimizer.lrr: 1}\n")
    with pytest.raises(ConfigError, match=r"stages\[0\] \(a\).*unknown key 'optimizer.lrr'"):
        load_config(bad)
    bad.write_text("stages:\n  - a\n")
    with pytest.raises(ConfigError, match=r"stages\[0\] must be a mapping"):
        load_config(bad)
    df = pd.read_csv(synth).drop(columns=["findings"])
    df.to_csv(tmp_path / "nofind.csv", index=False)
    with pytest.raises(ConfigError, match="needs a 'findings' column"):
        fit(_cfg(None, ["model.arch=mobilenet_v2", "data.task=findings", "loss.class_weights=null",
                        "checkpoint.monitor=val_loss"]), tmp_path / "nofind.csv", tmp_path / "r")


@pytest.mark.parametrize("recipe", sorted(Path(p).name for p in glob.glob(str(REPO / "configs" / "*.yaml"))
                                          if Path(p).name.startswith(("transfer-", "linear-probe-", "twice-"))))
def test_transfer_recipes_name_catalogue_weights_and_select_on_val_auc(recipe: str) -> None:
    from covidcxr.models import catalog

    cfg = load_config(REPO / "configs" / recipe)
    assert catalog.is_catalogued(cfg["model"]["weights"]), recipe
    assert (cfg["checkpoint"]["monitor"], cfg["checkpoint"]["mode"]) == ("val_auc_covid", "max")
    assert cfg["operating_point"]["target_sensitivity"] == 0.95


def test_lungcrop_recipe_crops_with_the_pretrained_unet(weights_dir: Path, dev_dir: Path, tmp_path: Path) -> None:
    """transfer-cxnet-lungcrop: prepare() gives the preset the lung U-Net, which finds lungs on a real CXR."""
    pytest.importorskip("covidcxr.segment.loading")
    from covidcxr.io import read_image
    from covidcxr.preprocess import get_preset
    from covidcxr.train.runner import prepare

    cfg = load_config(REPO / "configs" / "transfer-cxnet-lungcrop.yaml")
    pre = get_preset(cfg["data"]["preset"])
    assert pre.lung_crop and pre.clahe_clip == 2.0 and pre.size == 224 and pre.mean == (0.485, 0.456, 0.406)
    meta = pd.read_csv(dev_dir / "metadata.csv")
    img_path = dev_dir / "images" / meta["filename"].iloc[0]
    df = pd.DataFrame([{"patient_id": f"p{i}", "path": str(img_path), "label": lab, "source": "x", "split": s}
                       for i, (lab, s) in enumerate([("normal", "train"), ("COVID-19", "val")])])
    df.to_csv(tmp_path / "m.csv", index=False)
    dm, preset, _, summary = prepare(cfg, tmp_path / "m.csv")
    # the preset carries its segmenter (no process-wide hook), and the run records it for inference
    assert preset.masks is not None and summary["lung_segmenter"]["name"] == preset.masks.name
    assert len(summary["lung_segmenter"]["sha256"]) == 64
    img = read_image(img_path)
    mask = preset.masks(img)
    assert 0.05 < float(np.mean(mask)) < 0.8
    assert tuple(preset(img).shape) == (3, 224, 224)
