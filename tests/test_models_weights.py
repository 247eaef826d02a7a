"""Weight sources: offline imagenet / xrv errors, local files, and output neuron keeping."""

from __future__ import annotations

import socket

import pytest
import torch

from covidcxr import models
from covidcxr.models.backbones import CHEXNET_LABELS
from covidcxr.models.weights import WeightsError, imagenet_cache_path, transfer, xrv_model_source
from covidcxr.preprocess import get_preset

xrv = pytest.importorskip("torchxrayvision")


@pytest.fixture
def no_network(monkeypatch):
    """Every connection attempt (DNS, TCP) fails, as on an offline machine."""

    def refuse(*_a, **_k):
        raise OSError("network blocked by test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Fresh torch hub and torchxrayvision caches (nothing downloaded before)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


# --------------------------------------------------------------------------- imagenet


def test_imagenet_offline_gives_one_clear_line(no_network, empty_caches):
    with pytest.raises(WeightsError) as info:
        models.create("resnet18", weights="imagenet")
    msg = str(info.value)
    assert "\n" not in msg
    cache = empty_caches / "torch" / "hub" / "checkpoints"
    assert f"place the file resnet18-f37072fd.pth in {cache}/" in msg
    assert "weights=PATH" in msg and "network blocked" in msg


def test_imagenet_offline_cli_prints_one_line(no_network, empty_caches, capsys, monkeypatch):
    """The CLI frame prints WeightsError as one line, no traceback (probe command added for the test)."""
    from covidcxr import cli

    real = cli.build_parser

    def parser_with_probe():
        parser = real()
        sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        sub.add_parser("probe").set_defaults(func=lambda _a: models.create("squeezenet1_1", weights="imagenet"))
        return parser

    monkeypatch.setattr(cli, "build_parser", parser_with_probe)
    rc = cli.main(["probe"])
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "squeezenet1_1-b8a52dc0.pth" in err[0], err
    assert cap.out == ""  # no stray "Downloading ..." line before the error


def test_imagenet_loads_from_the_cache_without_network(no_network, empty_caches):
    """A file placed where the error says is used: ImageNet body loaded, head fresh."""
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.squeezenet1_1(weights=None)
    path = imagenet_cache_path("squeezenet1_1")
    path.parent.mkdir(parents=True)
    torch.save(tv.state_dict(), path)
    net = models.create("squeezenet1_1", weights="imagenet").eval()
    assert torch.equal(net.features[3].squeeze.weight, tv.features[3].squeeze.weight)
    assert net.covidcxr_init["head"] == "fresh" and net.covidcxr_init["preset"] == "deepcovid"


def test_imagenet_densenet_legacy_key_names(no_network, empty_caches):
    """torchvision's DenseNet files use pre-0.4 names (norm.1); they are mapped."""
    import re

    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.densenet121(weights=None)
    legacy = {
        re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v for k, v in tv.state_dict().items()
    }
    assert any(".norm.1." in k for k in legacy)
    path = imagenet_cache_path("cxnet")
    path.parent.mkdir(parents=True)
    torch.save(legacy, path)
    net = models.create("cxnet", weights="imagenet")
    assert torch.equal(
        net.features.denseblock4.denselayer16.conv2.weight, tv.features.denseblock4.denselayer16.conv2.weight
    )


def test_weight_source_not_offered():
    with pytest.raises(WeightsError, match="covidnet-cxr-large: no 'imagenet' weights"):
        models.create("covidnet-cxr-large", weights="imagenet")
    with pytest.raises(WeightsError, match="resnet18: no 'xrv-nih' weights"):
        models.create("resnet18", weights="xrv-nih")
    with pytest.raises(WeightsError, match="read 1 channel.*drop in_chans=3"):
        models.create("densenet121", weights="xrv-nih", in_chans=3)
    with pytest.raises(WeightsError, match="xrv-foo: no such weights file"):
        models.create("densenet121", weights="xrv-foo")


# --------------------------------------------------------------------------- torchxrayvision


def test_xrv_offline_fails_clearly(no_network, empty_caches):
    with pytest.raises(WeightsError) as info:
        models.create("densenet121", weights="xrv-nih")
    msg = str(info.value)
    assert "\n" not in msg
    assert "nih-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt" in msg
    assert str(empty_caches / "home" / ".torchxrayvision") in msg and "weights=PATH" in msg


def test_xrv_selects_the_xrv_preset():
    assert models.preset_for("densenet121", "xrv-all") == "xrv"
    assert models.preset_for("cxnet", "xrv-nih") == "xrv"
    assert models.preset_for("densenet121", "imagenet") == "deepcovid"
    assert models.preset_for("covidnet-cxr-2", "none") == "covidnet"
    assert get_preset(models.preset_for("chexnet", "xrv-nih")).channels == 1


def _xrv_model(seed=0):
    torch.manual_seed(seed)
    m = xrv.models.DenseNet(weights=None).eval()
    with torch.no_grad():  # torchxrayvision zero-initialises biases; make the copy visible
        m.classifier.bias.normal_()
    return m


@pytest.mark.parametrize("target", ["densenet121", "chexnet"])
def test_xrv_mapping_keeps_the_pneumonia_neuron(target):
    xm = _xrv_model()
    net = models.build(target, in_chans=1).eval()
    report = transfer(net, models.get_spec(target), xrv_model_source(xm), classes=models.DEFAULT_CLASSES)
    assert report["kept_neurons"] == {"pneumonia": "Pneumonia (row 8 of classifier)"}
    x = torch.randn(2, 1, 64, 64) * 500
    with torch.no_grad():
        ours, theirs = net(x), xm(x)
    # the new pneumonia logit equals the source's Pneumonia logit; the other rows are fresh
    torch.testing.assert_close(ours[:, 1], theirs[:, xm.targets.index("Pneumonia")], rtol=1e-5, atol=1e-5)
    head = models.get_head(net)
    assert not torch.equal(head.weight[0], xm.classifier.weight[0])
    assert torch.equal(net.features.conv0.weight, xm.features.conv0.weight)


def test_chexnet14_from_xrv_keeps_all_fourteen_neurons(tmp_path, monkeypatch):
    """A 14-label chexnet started from an 18-output xrv model reorders the matching neurons."""
    monkeypatch.setenv("COVIDCXR_TRUST_CHECKPOINT", "1")  # a pickled module: loads only when trusted
    xm = _xrv_model(2)
    path = tmp_path / "xrv.pt"
    torch.save(xm, path)
    net = models.create("chexnet", num_classes=14, weights=str(path)).eval()
    assert len(net.covidcxr_init["kept_neurons"]) == 14
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        ours, theirs = net(x), xm(x)
    order = [xm.targets.index(lab) for lab in CHEXNET_LABELS]
    torch.testing.assert_close(ours, theirs[:, order], rtol=1e-5, atol=1e-5)


def test_xrv_pickled_file_as_local_weights(tmp_path, monkeypatch):
    """A torchxrayvision .pt file (the whole pickled model) placed by hand works as weights=PATH, if trusted."""
    from covidcxr.models.weights import WeightsError

    xm = _xrv_model(1)
    path = tmp_path / "nih-densenet121.pt"
    torch.save(xm, path)
    monkeypatch.delenv("COVIDCXR_TRUST_CHECKPOINT", raising=False)
    with pytest.raises(WeightsError, match=r"nih-densenet121.pt: refused: .*--trust-checkpoint") as err:
        models.create("densenet121", weights=str(path))  # a pickled module is never unpickled silently
    assert "\n" not in str(err.value)
    monkeypatch.setenv("COVIDCXR_TRUST_CHECKPOINT", "1")
    net = models.create("densenet121", weights=str(path)).eval()
    assert net.covidcxr_init["preset"] == "xrv" and net.features.conv0.in_channels == 1
    assert models.preset_for("densenet121", str(path)) == "xrv"
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(x)[:, 1], xm(x)[:, 8], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- twice transfer learning


def test_neuron_keeping_from_a_chexnet_checkpoint(tmp_path):
    """Bassi & Attux: a 3-class model started from a 14-label ChestX-ray14 model keeps "Pneumonia"."""
    torch.manual_seed(2)
    source = models.build("chexnet", num_classes=14).eval()
    with torch.no_grad():
        source.classifier[0].bias.normal_()
    path = tmp_path / "chexnet14.ckpt"
    models.save(path, source, classes=list(CHEXNET_LABELS), preset=get_preset("chexnet"))
    torch.manual_seed(3)
    net = models.create("densenet121", num_classes=3, weights=str(path)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        new, old = net(x), source(x)
    pneu = CHEXNET_LABELS.index("Pneumonia")
    torch.testing.assert_close(new[:, 1], old[:, pneu], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(new[:, 0], old[:, 0]) and not torch.allclose(new[:, 2], old[:, 2])
    assert net.covidcxr_init["kept_neurons"] == {"pneumonia": "Pneumonia (row 6 of classifier.0)"}
    assert net.covidcxr_init["preset"] == "chexnet"  # the source checkpoint's preset
    assert models.preset_for("densenet121", str(path)) == "chexnet"
    gray = models.create("densenet121", weights=str(path), in_chans=1)  # 3 -> 1 channel: preset must follow
    assert gray.covidcxr_init["preset"] == "xrv"
    # the provenance travels into the next checkpoint
    models.save(tmp_path / "covid.ckpt", net, classes=list(models.DEFAULT_CLASSES), preset=get_preset("chexnet"))
    assert models.load(tmp_path / "covid.ckpt").meta["init"]["kept_neurons"]["pneumonia"].startswith("Pneumonia")


def test_neuron_keeping_from_a_bare_14_output_state_dict(tmp_path):
    """No label names in the file: 14 outputs are read in CheXNet's label order."""
    torch.manual_seed(4)
    source = models.build("chexnet", num_classes=14).eval()
    with torch.no_grad():
        source.classifier[0].bias.normal_()
    path = tmp_path / "chexnet.pth"
    torch.save({"state_dict": {f"module.densenet121.{k}": v for k, v in source.state_dict().items()}}, path)
    net = models.create("chexnet", num_classes=3, weights=str(path)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(x)[:, 1], source(x)[:, 6], rtol=1e-5, atol=1e-5)
    off = models.create("chexnet", num_classes=3, weights=str(path), keep_neurons=False)
    assert off.covidcxr_init["kept_neurons"] == {}


def test_cxnet_from_chexnet_keeps_body_but_cannot_keep_neurons(tmp_path):
    source = models.build("chexnet", num_classes=14)
    path = tmp_path / "c.ckpt"
    models.save(path, source, classes=list(CHEXNET_LABELS), preset=get_preset("chexnet"))
    net = models.create("cxnet", weights=str(path))
    assert torch.equal(net.features.norm5.weight, source.features.norm5.weight)
    assert net.covidcxr_init["kept_neurons"] == {}  # the Dense-10 layer sits between body and logits


# --------------------------------------------------------------------------- local files


def _same_outputs(a, b, chans=3):
    x = torch.randn(1, chans, 64, 64)
    a.eval(), b.eval()
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def test_local_state_dict_lightning_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(5)
    src = models.build("resnet18").eval()
    sd = src.state_dict()
    plain, light, safe = tmp_path / "w.pt", tmp_path / "l.ckpt", tmp_path / "w.safetensors"
    torch.save(sd, plain)
    torch.save(
        {
            "epoch": 3,
            "state_dict": {**{f"model.{k}": v for k, v in sd.items()}, "criterion.weight": torch.ones(3)},
            "hyper_parameters": {"lr": 1e-3},
        },
        light,
    )
    save_file({k: v.contiguous() for k, v in sd.items()}, str(safe))
    for p in (plain, light, safe):
        net = models.create("resnet18", weights=str(p))
        assert net.covidcxr_init["head"] == "loaded", p
        assert _same_outputs(net, src), p


def test_local_file_errors_list_missing_and_unexpected_keys(tmp_path):
    torch.save(models.build("resnet18").state_dict(), tmp_path / "resnet.pt")
    with pytest.raises(WeightsError) as info:
        models.create("densenet121", weights=str(tmp_path / "resnet.pt"))
    msg = str(info.value)
    assert "resnet.pt" in msg and "do not fit densenet121" in msg
    assert "missing keys ['features.conv0.weight'" in msg and "unexpected keys ['conv1.weight'" in msg

    torch.save(models.build("resnet18", num_classes=3).state_dict(), tmp_path / "r18.pt")
    with pytest.raises(WeightsError, match=r"shape mismatches \['conv1.weight|missing keys"):
        models.create("resnet50", weights=str(tmp_path / "r18.pt"))

    (tmp_path / "junk.pt").write_bytes(b"\x00garbage")
    with pytest.raises(WeightsError, match="junk.pt: cannot read weights"):
        models.create("resnet18", weights=str(tmp_path / "junk.pt"))
    torch.save({"epoch": 1}, tmp_path / "nosd.pt")
    with pytest.raises(WeightsError, match=r"nosd.pt: no state_dict in this file \(top-level keys: \['epoch'\]\)"):
        models.create("resnet18", weights=str(tmp_path / "nosd.pt"))
    with pytest.raises(WeightsError, match="missing.pt: no such weights file"):
        models.create("resnet18", weights=str(tmp_path / "missing.pt"))


def test_grayscale_weights_into_rgb_model_adapt_the_first_conv(tmp_path):
    """A 1-channel model's weights into a 3-channel build: same response to a gray image."""
    torch.manual_seed(6)
    src = models.build("resnet18", in_chans=1).eval()
    torch.save(src.state_dict(), tmp_path / "gray.pt")
    net = models.create("resnet18", weights=str(tmp_path / "gray.pt"), in_chans=3).eval()
    assert "1 -> 3 input channels" in net.covidcxr_init["adapted"]
    g = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(g.expand(1, 3, 64, 64)), src(g), rtol=1e-4, atol=1e-5)
