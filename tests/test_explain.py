"""Explainability: every method on every registry architecture, LRP conservation, the DenseNet
canonizer, the randomisation sanity check, geometry back to the original image, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torchvision

from _explain_fixtures import CLASSES, synthetic_cxr
from covidcxr import models
from covidcxr.explain import Context, explain, sanity_check
from covidcxr.explain.lrp import DenseNetCanonizer, canonizers_for, lrp
from covidcxr.explain.render import crop_box, to_model, to_original
from covidcxr.preprocess import get_preset

SIZE = 64


def _randomize_bn(model: torch.nn.Module, seed: int = 0, shifts: bool = True) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics (fresh models have identity BNs, which would hide canonizer bugs)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) * 2.0 - 0.5)  # some negative scales
            if shifts:
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


@pytest.mark.parametrize("arch", models.list_models())
def test_every_method_on_every_architecture(arch):
    torch.manual_seed(0)
    model = _randomize_bn(models.build(arch, num_classes=3))
    # Some builders start the head at std 0.01 (torchvision's MobileNetV2), where an untrained model's
    # Grad-CAM can be negative for every class; a unit-scale head keeps the check about the method.
    head = models.get_head(model)
    torch.nn.init.normal_(head.weight, std=1.0)
    preset = get_preset(models.get_spec(arch).preset, size=SIZE)
    x = torch.randn(2, preset.channels, SIZE, SIZE)
    ctx = Context(arch=arch, preset=preset, ig_steps=3, occlusion_window=32, occlusion_stride=32)
    for method in ("gradcam", "lrp", "occlusion", "ig"):
        # Grad-CAM of an untrained model can be empty for one class: try every class there
        targets = range(3) if method == "gradcam" else [2]
        maps = torch.cat([explain(model, x, method, target=t, ctx=ctx) for t in targets])
        assert maps.shape == (2 * len(targets), SIZE, SIZE), (arch, method)
        assert torch.isfinite(maps).all(), (arch, method)
        assert maps.abs().sum() > 0, f"{arch}/{method}: all heatmaps are zero"
        if method == "gradcam":
            assert (maps >= 0).all()


def _tiny_nets() -> dict[str, torch.nn.Module]:
    from covidcxr.models.backbones import DenseNet
    from covidcxr.models.covidnet import COVIDNet, Variant

    torch.manual_seed(0)
    return {
        "densenet": DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2, num_classes=3),
        "resnet": torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=3),
        "covidnet": COVIDNet(Variant(widths=(8, 16, 16, 16), inner=((4, 8),) * 4, stem=8, depths=(2, 2, 2, 2),
                                     hidden=(16,)), num_classes=3),
    }


@pytest.mark.parametrize("name", ["densenet", "resnet", "covidnet"])
def test_lrp_conserves_relevance(name):
    """Epsilon rule, biases left out of the redistribution: sum of input relevance == target logit.

    BatchNorm scales (some negative) and variances are random, shifts zero, so after the
    canonizers merge them no unit is switched on by a bias alone. Tolerance: 1 % of the logit.
    """
    model = _randomize_bn(_tiny_nets()[name], seed=1, shifts=False)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(x)
    target = logits.argmax(1)
    rel = lrp(model, x, target, composite="epsilon", zero_bias=True, epsilon=1e-6)
    total = rel.sum(dim=(1, 2, 3))
    logit = logits.gather(1, target.view(-1, 1)).view(-1)
    assert torch.allclose(total, logit, rtol=1e-2, atol=1e-5), (total, logit)


def test_lrp_without_canonizer_breaks_conservation_on_densenet():
    """The DenseNet canonizer matters: without it the functional head pooling is a plain gradient."""
    from zennit.attribution import Gradient

    from covidcxr.explain.lrp import make_composite

    model = _randomize_bn(_tiny_nets()["densenet"], seed=1, shifts=False)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(x)
    t = logits.argmax(1)
    comp = make_composite("epsilon", [], zero_bias=True)
    with Gradient(model=model, composite=comp) as attr:
        _, rel = attr(x.clone().requires_grad_(True), lambda o: o * torch.nn.functional.one_hot(t, 3))
    logit = logits.gather(1, t.view(-1, 1)).view(-1)
    assert not torch.allclose(rel.sum((1, 2, 3)), logit, rtol=1e-2)


@pytest.mark.parametrize("arch", ["densenet121", "cxnet"])
def test_densenet_canonizer_keeps_output_and_restores(arch):
    model = _randomize_bn(models.build(arch, num_classes=3), seed=3)
    x = torch.randn(2, 3, SIZE, SIZE)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        y0 = model(x)
    (inst,) = DenseNetCanonizer().apply(model)
    with torch.no_grad():
        y1 = model(x)
    # canonized: BatchNorms gone (identities), head pooling is a module
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert hasattr(model, "lrp_head_pool")
    torch.testing.assert_close(y1, y0, rtol=1e-4, atol=1e-5)
    inst.remove()
    with torch.no_grad():
        y2 = model(x)
    torch.testing.assert_close(y2, y0, rtol=0, atol=0)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not hasattr(model, "lrp_head_pool") and "forward" not in model.__dict__


def test_canonizer_choice():
    assert type(canonizers_for(models.build("densenet121"))[0]).__name__ == "DenseNetCanonizer"
    assert type(canonizers_for(models.build("resnet18"))[0]).__name__ == "ResNetCanonizer"
    assert type(canonizers_for(models.build("covidnet-cxr-small"))[0]).__name__ == "COVIDNetCanonizer"


def _trained_tiny_cnn() -> tuple[torch.nn.Module, torch.Tensor]:
    """A small CNN trained for a few seconds to tell whether an image holds a bright square."""
    g = torch.Generator().manual_seed(0)

    def batch(n):
        x = torch.randn(n, 1, 32, 32, generator=g) * 0.3
        y = torch.randint(0, 2, (n,), generator=g)
        for i in range(n):
            if y[i]:
                r, c = (int(v) for v in torch.randint(2, 25, (2,), generator=g))
                x[i, 0, r : r + 6, c : c + 6] += 2.0
        return x, y

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(16, 2),
    )
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(60):
        x, y = batch(32)
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = batch(64)
    assert (net.eval()(x).argmax(1) == y).float().mean() > 0.9  # it learned the task
    return net, x[:6]


def test_sanity_check_flags_input_copy_and_passes_gradcam():
    model, x = _trained_tiny_cnn()

    def copy_of_input(_model, batch, _target, _ctx):  # ignores the weights entirely
        return batch.sum(1)

    res = {r.method: r for r in sanity_check(model, x, {"gradcam": "gradcam", "input": copy_of_input},
                                             ctx=Context(cam_layer="4"))}
    assert res["input"].flagged and res["input"].final > 0.99 and res["input"].steps_above == 4
    assert not res["gradcam"].flagged and res["gradcam"].final < 0.5 and res["gradcam"].steps_above < 2
    assert len(res["gradcam"].rank_correlation) == len(res["gradcam"].layers) == 4
    assert res["gradcam"].layers[0] == "8"  # cascade starts at the classifier


def test_sanity_flags_maps_that_ignore_the_upper_layers():
    """A method that only reacts to the first layer survives most of the cascade: flagged."""
    model, x = _trained_tiny_cnn()

    def first_layer_only(m, batch, _target, _ctx):
        return m[0](batch).abs().sum(1).detach()

    (res,) = sanity_check(model, x, {"first": first_layer_only}, ctx=Context(cam_layer="4"))
    assert res.final < 0.5 and res.steps_above == 3 and res.flagged


def test_geometry_maps_back_to_original():
    img = synthetic_cxr(5, h=120, w=90)[0].astype(np.float32) / 255
    p = get_preset("covidnet", size=SIZE)  # crop top 8 % + central square
    y0, y1, x0, x1 = crop_box(p, img.shape)
    assert (y1 - y0) == (x1 - x0) and y0 > 0
    np.testing.assert_allclose(to_model(img, p), p.prepare(img), atol=1e-5)
    heat = np.ones((SIZE, SIZE), np.float32)
    full = to_original(heat, p, img.shape)
    assert full.shape == img.shape
    assert full[:y0].sum() == 0 and np.allclose(full[y0:y1, x0:x1], 1)


@pytest.fixture(scope="module")
def checkpoint_and_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain_cli")
    ckpt = root / "r18.ckpt"
    torch.manual_seed(0)
    models.save(ckpt, models.build("resnet18", num_classes=3), arch="resnet18", classes=CLASSES,
                preset=get_preset("deepcovid", size=SIZE))
    paths = []
    for i in range(3):
        p = root / f"cxr{i}.png"
        cv2.imwrite(str(p), synthetic_cxr(i)[0])
        paths.append(str(p))
    bad = root / "truncated.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 20)
    return ckpt, paths, str(bad)


def test_cli_explain_writes_outputs_and_reports_bad_file(checkpoint_and_images, tmp_path, capsys):
    from covidcxr.cli import main

    ckpt, paths, bad = checkpoint_and_images
    out = tmp_path / "out"
    rc = main(["explain", paths[0], bad, paths[1], "--model", str(ckpt), "--method", "gradcam,lrp",
               "--out", str(out), "--batch-size", "2"])
    err = capsys.readouterr().err
    assert rc == 1  # one file failed
    assert bad in err and err.count("\n") == 1
    for stem in ("cxr0", "cxr1"):
        for m in ("gradcam", "lrp"):
            assert (out / f"{stem}_{m}.png").stat().st_size > 1000
            assert np.load(out / f"{stem}_{m}.npy").shape == (SIZE, SIZE)
            assert np.load(out / f"{stem}_{m}_original.npy").shape == (96, 80)
    summary = json.loads((out / "explain.json").read_text())
    assert len(summary["records"]) == 4 and summary["failures"][0]["file"] == bad
    rec = summary["records"][0]
    assert rec["predicted"] in CLASSES and 0 <= rec["probability"] <= 1
    assert abs(sum(rec["probabilities"].values()) - 1) < 1e-4


def test_cli_explain_target_and_unknown_method(checkpoint_and_images, tmp_path, capsys):
    from covidcxr.cli import main

    ckpt, paths, _ = checkpoint_and_images
    rc = main(["explain", paths[2], "--model", str(ckpt), "--method", "occlusion", "--target", "COVID-19",
               "--out", str(tmp_path)])
    assert rc == 0
    rec = json.loads((tmp_path / "explain.json").read_text())["records"][0]
    assert rec["target"] == "COVID-19" and rec["method"] == "occlusion"
    with pytest.raises(SystemExit):
        main(["explain", paths[2], "--model", str(ckpt), "--method", "saliency", "--out", str(tmp_path)])
    capsys.readouterr()
    # an unknown class name was a ValueError traceback
    assert main(["explain", paths[2], "--model", str(ckpt), "--target", "covid", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("covidcxr explain: error: --target 'covid' is not one of the classes") and "\n" not in err


def test_cli_sanity(checkpoint_and_images, tmp_path):
    from covidcxr.cli import main

    ckpt, paths, _ = checkpoint_and_images
    rc = main(["explain", *paths, "--model", str(ckpt), "--sanity", "--method", "gradcam", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "sanity.json").read_text())
    (res,) = data["results"]
    assert res["method"] == "gradcam" and len(res["rank_correlation"]) == len(res["layers"])
    assert "Sanity check" in (tmp_path / "sanity.md").read_text()


# --------------------------------------------------------------------------- issue 11 §10: readable overlays


def test_overlay_is_at_image_resolution_beside_the_plain_image(tmp_path):
    from PIL import Image

    from covidcxr.explain.render import MIN_LONG_SIDE, save_overlay

    heat = np.zeros((SIZE, SIZE), np.float32)
    heat[20:40, 20:40] = 0.08
    for shape in ((300, 250), (1500, 1200)):
        img = np.random.default_rng(0).random(shape).astype(np.float32)
        p = tmp_path / f"o{shape[0]}.png"
        info = save_overlay(p, img, heat, title="t", signed=False)
        w, h = Image.open(p).size
        long_side = max(shape[0], MIN_LONG_SIDE)
        # two panels side by side, each drawn at >= 1024 px (or the original's own resolution)
        assert h >= long_side and w >= 2 * long_side * shape[1] / shape[0]
        assert info["raw_max"] == pytest.approx(0.08) and info["scale"] == pytest.approx(0.08)


def test_normalised_scale_per_image_or_shared():
    from covidcxr.explain.render import heat_scale, normalise

    a = np.linspace(0, 0.08, 100, dtype=np.float32).reshape(10, 10)
    b = a * 4  # the same pattern, four times stronger (0..0.31 raw)
    na, ia = normalise(a, signed=False)
    nb, ib = normalise(b, signed=False)
    assert np.allclose(na, nb) and na.max() == pytest.approx(1.0)  # per image: each on its own 0..1
    assert (ia["raw_max"], ib["raw_max"]) == pytest.approx((0.08, 0.32))
    s = heat_scale([a, b], signed=False)
    na, ia = normalise(a, signed=False, scale=s)
    nb, _ = normalise(b, signed=False, scale=s)
    assert na.max() == pytest.approx(0.25) and nb.max() == pytest.approx(1.0) and ia["scope"] == "shared"
    ns, _ = normalise(np.array([[-2.0, 1.0]], np.float32), signed=True)
    assert ns.min() == -1.0 and ns.max() == 0.5


def test_cli_explain_heat_scale_batch_shares_one_scale(checkpoint_and_images, tmp_path, capsys):
    from PIL import Image

    from covidcxr.cli import main

    ckpt, paths, _ = checkpoint_and_images
    for mode in ("image", "batch"):
        out = tmp_path / mode
        assert main(["explain", paths[0], paths[1], "--model", str(ckpt), "--method", "gradcam",
                     "--out", str(out), "--heat-scale", mode]) == 0
        summary = json.loads((out / "explain.json").read_text())
        scales = [r["heat_scale"]["scale"] for r in summary["records"]]
        raw = [r["heat_scale"]["raw_max"] for r in summary["records"]]
        assert summary["heat_scale"]["mode"] == mode and "raw range" in summary["heat_scale"]["note"]
        if mode == "batch":
            assert scales[0] == scales[1] == pytest.approx(max(raw))
        else:
            assert scales == pytest.approx(raw)
        assert min(Image.open(out / "cxr0_gradcam.png").size) >= 1024  # 96x80 input, drawn at >= 1024 px
    assert "decision rule:" in capsys.readouterr().out
