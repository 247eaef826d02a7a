"""MobileNetV2 and EfficientNet-Lite0: registry entries, catalogue weights (remap, checksum, provenance),
Grad-CAM, and `covidcxr weights list`.

Tests that need ../shared/weights use the ``weights_dir`` fixture and skip without it.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from covidcxr import models
from covidcxr.models import catalog
from covidcxr.models.mobile import EFFNET_B0_STAGES, lukemelas_to_timm
from covidcxr.models.summary import measure
from covidcxr.models.weights import WeightsError

NEW = ("mobilenet_v2", "efficientnet_lite0")


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*_a, **_k):
        raise OSError("network blocked by test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def nothing_local(tmp_path, monkeypatch):
    """No catalogue folder, empty torch hub and Hugging Face caches."""
    import torch.hub

    monkeypatch.setenv(catalog.ENV_DIR, str(tmp_path / "w"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch" / "hub"))
    (tmp_path / "w").mkdir()
    return tmp_path


# --------------------------------------------------------------------------- registry


@pytest.mark.parametrize("name", NEW)
def test_registered_with_preset_cam_layer_and_counts(name):
    spec = models.get_spec(name)
    assert spec.input_size == 224 and spec.preset == {"mobilenet_v2": "imagenet", "efficientnet_lite0": "effnet-lite"}[name]
    assert f"{name}-imagenet" in spec.weight_sources and "imagenet" in spec.weight_sources
    net = models.build(name, num_classes=3)
    assert isinstance(net.get_submodule(spec.cam_layer), nn.Module)
    assert isinstance(net.get_submodule(spec.first_conv), nn.Conv2d)
    # published figures are for the 1000-class ImageNet head
    params, macs = measure(name, num_classes=1000)
    assert abs(params / spec.published_params - 1) < 0.06, params
    assert abs(macs / spec.published_macs - 1) < 0.06, macs


def test_models_list_shows_them(capsys):
    from covidcxr.cli import main

    assert main(["models", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    for name in NEW:
        assert rows[name]["cam_layer"] and rows[name]["params"] > 1e6 and rows[name]["macs"] > 1e8
        assert f"{name}-imagenet" in rows[name]["weights"]


@pytest.mark.parametrize("name", NEW)
def test_gradcam_on_the_cam_layer(name):
    from covidcxr.explain import Context, explain

    torch.manual_seed(0)
    net = models.build(name, num_classes=3).eval()
    x = torch.rand(2, 3, 96, 96)
    heat = explain(net, x, "gradcam", target=2, ctx=Context(arch=name))
    assert heat.shape == (2, 96, 96) and torch.isfinite(heat).all()
    assert float(heat.std()) > 0, "Grad-CAM on spec.cam_layer gives a non-constant map"


# --------------------------------------------------------------------------- lukemelas -> timm


def test_remap_rules_on_synthetic_keys():
    sd = {"_conv_stem.weight": torch.zeros(1), "_bn0.running_var": torch.zeros(1),
          "_blocks.0._depthwise_conv.weight": torch.zeros(1), "_blocks.0._project_conv.weight": torch.zeros(1),
          "_blocks.1._expand_conv.weight": torch.zeros(1), "_blocks.1._bn0.weight": torch.zeros(1),
          "_blocks.1._bn2.bias": torch.zeros(1), "_blocks.15._project_conv.weight": torch.zeros(1),
          "_conv_head.weight": torch.zeros(1), "_bn1.bias": torch.zeros(1), "_fc.weight": torch.zeros(1)}
    out = lukemelas_to_timm(sd)
    assert set(out) == {"conv_stem.weight", "bn1.running_var", "blocks.0.0.conv_dw.weight", "blocks.0.0.conv_pw.weight",
                        "blocks.1.0.conv_pw.weight", "blocks.1.0.bn1.weight", "blocks.1.0.bn3.bias",
                        "blocks.6.0.conv_pwl.weight", "conv_head.weight", "bn2.bias", "classifier.weight"}
    assert sum(EFFNET_B0_STAGES) == 16
    with pytest.raises(KeyError, match="squeeze-excite"):
        lukemelas_to_timm({"_blocks.3._se_reduce.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="beyond"):
        lukemelas_to_timm({"_blocks.16._bn0.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="not an EfficientNet-Lite0 key"):
        lukemelas_to_timm({"features.0.weight": torch.zeros(1)})


def test_lite0_remap_is_a_bijection_and_loads_strict(weights_dir):
    sd = torch.load(catalog.resolve("efficientnet_lite0-imagenet"), map_location="cpu", weights_only=True)
    mapped = lukemelas_to_timm(sd)
    net = models.build("efficientnet_lite0", num_classes=1000)
    target = net.state_dict()
    assert len(mapped) == len(sd) == len(target) and set(mapped) == set(target)
    assert all(mapped[k].shape == target[k].shape for k in target)
    net.load_state_dict(mapped, strict=True)


def _photo(img: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(img).permute(2, 0, 1).float()[None]
    h, w = x.shape[2:]
    s = min(h, w)
    x = x[:, :, (h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    return F.interpolate(x, size=224, mode="bilinear", antialias=True)


def test_lite0_imagenet_head_names_photos(weights_dir):
    """The remapped file, ImageNet head included, recognises scikit-image's bundled photos."""
    data = pytest.importorskip("skimage.data")
    net = models.create("efficientnet_lite0", num_classes=1000, weights="efficientnet_lite0-imagenet",
                        classes=[str(i) for i in range(1000)]).eval()
    assert net.covidcxr_init["head"] == "loaded"
    with torch.no_grad():
        cat = net((_photo(data.chelsea()) - 127) / 128).argmax(1).item()
        coffee = net((_photo(data.coffee()) - 127) / 128).softmax(1)
    assert 281 <= cat <= 285, cat  # tabby / tiger / Persian / Siamese / Egyptian cat
    assert coffee.argmax(1).item() == 967 and coffee[0, 967] > 0.5  # espresso


def test_lite0_fresh_head_starts_small():
    """A fresh EfficientNet-Lite0 head has PyTorch's default Linear init, not timm's TF-style
    U(+-1/sqrt(3)) for 3 outputs, whose logits of about +-8 on pretrained features saturated the
    probabilities and left the results run a stored COVID-19 threshold of 0.000."""
    head = models.build("efficientnet_lite0", num_classes=3).classifier
    assert head.weight.abs().max().item() <= 1 / 1280**0.5 + 1e-6
    with torch.no_grad():  # pooled ReLU6 features of a pretrained body are ~0..6; logits stay modest
        logits = head(torch.full((1, 1280), 0.5))
    assert logits.abs().max().item() < 1.0


def test_mobilenet_catalog_body_loaded_head_fresh(weights_dir):
    """features.* come from the file bit for bit; the 3-class head is new; provenance is recorded."""
    from skimage import data

    sd = torch.load(catalog.resolve("mobilenet_v2-imagenet"), map_location="cpu", weights_only=True)
    net = models.create("mobilenet_v2", weights="mobilenet_v2-imagenet").eval()
    own = net.state_dict()
    assert all(torch.equal(own[k], v) for k, v in sd.items())
    init = net.covidcxr_init
    assert init["head"] == "fresh" and init["preset"] == "imagenet"
    assert init["sha256"] == catalog.CATALOG["mobilenet_v2-imagenet"].sha256
    assert init["catalog"]["trained_on"].startswith("ImageNet") and init["catalog"]["license"]
    # the pretrained body tells photos apart, where a random body hardly does
    pre = get_preset_imagenet()
    feats = lambda m, img: models.pooled_features(m, pre(_photo(img)))  # noqa: E731
    with torch.no_grad():
        a, b, c = (feats(net, i) for i in (data.chelsea(), data.chelsea()[:, ::-1].copy(), data.coffee()))
    same, diff = F.cosine_similarity(a, b).item(), F.cosine_similarity(a, c).item()
    assert same - diff > 0.2, (same, diff)


def get_preset_imagenet():
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return lambda x: (x / 255.0 - mean) / std


def test_imagenet_maps_to_the_catalogue_file(weights_dir):
    for name in NEW:
        net = models.create(name, weights="imagenet")
        assert net.covidcxr_init["catalog"]["name"] == f"{name}-imagenet"
        assert models.preset_for(name, "imagenet") == models.preset_for(name, f"{name}-imagenet")


def test_catalogue_weights_with_a_wrong_checksum_are_refused(weights_dir, tmp_path, monkeypatch):
    bad = tmp_path / "w"
    bad.mkdir()
    data = bytearray((weights_dir / "mobilenet_v2-imagenet-features.pth").read_bytes())
    data[-100] ^= 0xFF  # same size, one byte flipped
    (bad / "mobilenet_v2-imagenet-features.pth").write_bytes(bytes(data))
    monkeypatch.setenv(catalog.ENV_DIR, str(bad))
    for w in ("mobilenet_v2-imagenet", "imagenet"):  # 'imagenet' never falls back to a download past a bad file
        with pytest.raises(WeightsError, match="sha256") as err:
            models.create("mobilenet_v2", weights=w)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", NEW)
def test_offline_without_the_file_is_one_line(name, no_network, nothing_local):
    with pytest.raises(WeightsError) as err:
        models.create(name, weights=f"{name}-imagenet")
    msg = str(err.value)
    assert "not found" in msg and catalog.ENV_DIR in msg and "\n" not in msg
    with pytest.raises(WeightsError) as err:
        models.create(name, weights="imagenet")
    msg = str(err.value)
    assert "offline" in msg and catalog.CATALOG[f"{name}-imagenet"].filename in msg and "\n" not in msg


def test_wrong_architecture_for_a_catalogue_name():
    with pytest.raises(WeightsError, match="no 'efficientnet_lite0-imagenet' weights for this architecture"):
        models.create("mobilenet_v2", weights="efficientnet_lite0-imagenet")


def test_checkpoint_and_models_show_carry_provenance(weights_dir, tmp_path, capsys):
    from covidcxr.cli import main
    from covidcxr.preprocess import get_preset

    net = models.create("efficientnet_lite0", weights="efficientnet_lite0-imagenet")
    models.save(tmp_path / "m.ckpt", net, classes=["normal", "pneumonia", "COVID-19"], preset=get_preset("effnet-lite"))
    lm = models.load(tmp_path / "m.ckpt")
    assert lm.meta["init"]["sha256"] == catalog.CATALOG["efficientnet_lite0-imagenet"].sha256
    assert main(["models", "show", str(tmp_path / "m.ckpt"), "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["arch"] == "efficientnet_lite0" and card["weights_init"] == "efficientnet_lite0-imagenet"
    assert card["weights_sha256"] == catalog.CATALOG["efficientnet_lite0-imagenet"].sha256
    assert card["weights_provenance"]["license"] == "Apache-2.0"


# --------------------------------------------------------------------------- weights list


def test_weights_list_found_verified_and_missing(weights_dir, tmp_path, monkeypatch, capsys):
    from covidcxr.cli import main

    assert main(["weights", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(catalog.CATALOG) | {"imagenet", "xrv-nih", "xrv-all"} <= set(rows)
    from covidcxr.reference_models import REFERENCE_DIR

    for name in catalog.CATALOG:
        home = REFERENCE_DIR if catalog.is_shipped(catalog.CATALOG[name]) else weights_dir  # shipped: in the package
        assert rows[name]["status"] == "ok" and Path(rows[name]["path"]).parent.resolve() == Path(home).resolve()
    assert "mobilenet_v2" in rows["imagenet"]["architectures"]
    # one folder with a copied good file and a corrupt one: found-and-ok, bad, missing
    d = tmp_path / "w"
    d.mkdir()
    shutil.copy(weights_dir / "mobilenet_v2-imagenet-features.pth", d)
    (d / "efficientnet_lite0-imagenet.pth").write_bytes(b"x" * 100)
    monkeypatch.setenv(catalog.ENV_DIR, str(d))
    assert main(["weights", "list"]) == 0
    out = capsys.readouterr().out
    line = {ln.split()[0]: ln for ln in out.splitlines() if ln.strip()}
    assert " ok " in line["mobilenet_v2-imagenet"] and str(d) in line["mobilenet_v2-imagenet"]
    assert " bad " in line["efficientnet_lite0-imagenet"]
    assert " missing " in line["lung-unet-vgg11"]
    assert "efficientnet_lite0-imagenet: bad:" in out and "100 bytes" in out
