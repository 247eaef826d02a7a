"""Registry, COVID-Net, parameter/MAC table, checkpoints and `covidcxr models list`."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from covidcxr import models
from covidcxr.models.covidnet import PEPX, PEPXStage
from covidcxr.models.summary import MEASURED, count_macs, count_params, measure
from covidcxr.preprocess import get_preset

ALL = models.list_models()
EXPECTED = {
    "resnet18",
    "resnet50",
    "squeezenet1_1",
    "densenet121",
    "chexnet",
    "cxnet",
    "densenet169",
    "densenet201",
    "vgg19",
    "covidnet-cxr-large",
    "covidnet-cxr-small",
    "covidnet-cxr-2",
}


def test_registry_has_every_seed_model():
    assert EXPECTED <= set(ALL)
    for name in ALL:
        spec = models.get_spec(name)
        assert spec.preset in {"deepcovid", "chexnet", "cxnet", "covidnet", "xrv", "imagenet", "effnet-lite"}, name
        assert spec.cam_layer and spec.head and spec.first_conv, name
    assert models.get_spec("chexnet").preset == "chexnet"
    assert models.get_spec("cxnet").preset == "cxnet" and models.get_spec("cxnet").input_size == 320
    assert all(
        models.get_spec(n).input_size == 480 and models.get_spec(n).preset == "covidnet"
        for n in ALL
        if n.startswith("covidnet")
    )


def test_unknown_model_is_a_typed_error():
    with pytest.raises(models.UnknownModelError, match="unknown model 'nope'.*resnet18"):
        models.build("nope")
    with pytest.raises(KeyError):  # still a KeyError for callers that catch that
        models.get_spec("nope")


@pytest.mark.parametrize("name", ALL)
def test_head_cam_layer_and_features_are_uniform(name):
    spec = models.get_spec(name)
    net = models.build(name, num_classes=5).eval()
    head = models.get_head(net)
    assert isinstance(head, nn.Linear) and head.out_features == 5
    assert isinstance(net.get_submodule(spec.first_conv), nn.Conv2d)
    x = torch.randn(2, 3, 64, 64)
    feats = models.pooled_features(net, x)
    assert feats.shape == (2, head.in_features)
    # the head really is the last step: head(pooled features) reproduces the logits
    torch.testing.assert_close(head(feats), net(x))
    # swapping the head (what severity does) changes only the output width
    new = models.replace_head(net, 2)
    assert net(x).shape == (2, 2) and models.get_head(net) is new
    assert net.covidcxr_arch_kwargs["num_classes"] == 2


def _cam_probe(net: nn.Module, layer: str):
    """Hook the CAM layer; remember the activation and its version at capture time."""
    store = {}

    def hook(_m, _inp, out):
        out.retain_grad()
        store["act"], store["version"] = out, out._version

    return net.get_submodule(layer).register_forward_hook(hook), store


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "vgg19" else n for n in ALL])
def test_forward_backward_at_native_size(name):
    """Every model trains at its native size on the CPU; Grad-CAM's layer gets a gradient."""
    spec = models.get_spec(name)
    torch.manual_seed(0)
    net = models.build(name).train()
    handle, store = _cam_probe(net, spec.cam_layer)
    x = torch.randn(1, 3, spec.input_size, spec.input_size)
    logits = net(x)
    assert logits.shape == (1, 3)
    logits[0, 2].backward()
    handle.remove()
    act = store["act"]
    assert act.ndim == 4 and act.shape[-1] == spec.input_size // 32 or name.startswith("squeeze"), act.shape
    assert act._version == store["version"], "activation modified in place after the CAM layer"
    assert act.grad is not None and act.grad.abs().sum() > 0
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


# --------------------------------------------------------------------------- COVID-Net


def test_covidnet_stages_strides_and_pepx_layout():
    for name, first_strides in [("covidnet-cxr-large", (2, 2, 2, 2)), ("covidnet-cxr-2", (1, 2, 2, 2))]:
        net = models.build(name).eval()
        sizes = {}
        hooks = [
            getattr(net, f"stage{i}").register_forward_hook(lambda m, i_, o, i=i, s=sizes: s.__setitem__(i, o.shape))
            for i in range(1, 5)
        ]
        with torch.no_grad():
            net(torch.zeros(1, 3, 96, 96))
        for h in hooks:
            h.remove()
        assert [sizes[i][-1] for i in range(1, 5)] == [96 // 4, 96 // 8, 96 // 16, 96 // 32]
        stages = [getattr(net, f"stage{i}") for i in range(1, 5)]
        assert [len(s.blocks) for s in stages] == [3, 4, 6, 3]
        assert tuple(s.blocks[0][6].stride[0] for s in stages) == first_strides
        pepx = stages[1].blocks[1]
        convs = [m for m in pepx if isinstance(m, nn.Conv2d)]
        assert [c.kernel_size for c in convs] == [(1, 1), (1, 1), (3, 3), (1, 1), (1, 1)]
        assert convs[2].groups == convs[2].in_channels == convs[2].out_channels  # depth-wise
        assert sum(isinstance(m, nn.BatchNorm2d) for m in pepx) == 5 and sum(isinstance(m, nn.ReLU) for m in pepx) == 5
    widths = [getattr(models.build("covidnet-cxr-2"), f"stage{i}").side[0].out_channels for i in range(1, 5)]
    assert widths == [160, 328, 640, 2048]
    assert isinstance(models.build("covidnet-cxr-2").stem[-1], nn.MaxPool2d)
    widths = [getattr(models.build("covidnet-cxr-large"), f"stage{i}").side[0].out_channels for i in range(1, 5)]
    assert widths == [256, 512, 1024, 2048]


def test_pepx_stage_dense_links():
    """Module j's input is the side projection plus the outputs of modules 0..j-1."""
    torch.manual_seed(0)
    stage = PEPXStage(8, 16, depth=4, proj=4, expand=8, stride=2).eval()
    seen_in, seen_out = [], []

    def record(_m, inp, out):
        seen_in.append(inp[0])
        seen_out.append(out)

    for b in stage.blocks:
        b.register_forward_hook(record)
    x = torch.randn(2, 8, 16, 16)
    with torch.no_grad():
        y = stage(x)
        side = stage.side(x)
    assert torch.equal(seen_in[0], x)
    for j in range(1, 4):
        torch.testing.assert_close(seen_in[j], side + sum(seen_out[:j]))
    torch.testing.assert_close(y, side + sum(seen_out))
    assert isinstance(stage.blocks[0], PEPX)


@pytest.mark.parametrize("name", ["covidnet-cxr-large", "covidnet-cxr-2", "vgg19"])
def test_params_and_macs_within_25_percent_of_published(name):
    spec = models.get_spec(name)
    params, macs = measure(name)
    assert abs(params / spec.published_params - 1) <= 0.25, (params, spec.published_params)
    assert abs(macs / spec.published_macs - 1) <= 0.25, (macs, spec.published_macs)


def test_covidnet_native_480_forward_macs_on_real_tensors():
    """A real (not meta) forward at 480 px: counts agree with the meta-device count."""
    net = models.build("covidnet-cxr-small").eval()
    assert count_macs(net, 480) == MEASURED["covidnet-cxr-small"][1]
    assert count_params(net) == MEASURED["covidnet-cxr-small"][0]


def test_stored_table_matches_live_counts():
    for name in ALL:
        assert MEASURED[name] == measure(name), name


def test_mac_counter_on_a_known_layer():
    # 3x3 conv, 4->8 channels, 10x10 output: 4*8*9*100 MACs, plus a Linear 8->2 after pooling
    net = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)
    )
    assert count_macs(net, 10, in_chans=4) == 4 * 8 * 9 * 100 + 8 * 2


# --------------------------------------------------------------------------- checkpoints


def _ckpt(tmp_path, name="resnet18", in_chans=3, preset="deepcovid", **kw):
    torch.manual_seed(1)
    net = models.build(name, in_chans=in_chans).eval()
    path = tmp_path / f"{name}.ckpt"
    models.save(path, net, classes=list(models.DEFAULT_CLASSES), preset=get_preset(preset), **kw)
    return net, path


@pytest.mark.parametrize(
    "name,in_chans,preset",
    [("resnet18", 3, "deepcovid"), ("covidnet-cxr-small", 3, "covidnet"), ("densenet121", 1, "xrv")],
)
def test_checkpoint_round_trip_is_bit_identical(tmp_path, name, in_chans, preset):
    net, path = _ckpt(tmp_path, name, in_chans, preset, metrics={"auc": 0.5}, training={"epochs": 1})
    loaded = models.load(path)
    x = torch.randn(2, in_chans, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), net(x))
    assert loaded.arch == name and loaded.preset.name == preset and loaded.classes == list(models.DEFAULT_CLASSES)
    assert loaded.metrics == {"auc": 0.5} and loaded.training == {"epochs": 1}
    assert loaded.meta["arch_kwargs"]["in_chans"] == in_chans  # recorded by build, not repeated by the caller
    assert loaded.meta["covidcxr_version"]


def test_checkpoint_without_or_with_unknown_preset_fails_loudly(tmp_path):
    _, path = _ckpt(tmp_path)
    bundle = torch.load(path, weights_only=False)
    for bad, msg in [(None, "no preprocessing preset"), ({"name": "mystery"}, "unknown preprocessing preset")]:
        b = dict(bundle)
        if bad is None:
            b.pop("preset")
        else:
            b["preset"] = bad
        p = tmp_path / "bad.ckpt"
        torch.save(b, p)
        with pytest.raises(models.CheckpointError, match=msg):
            models.load(p)


def test_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(models.CheckpointError, match="not found"):
        models.load(tmp_path / "missing.ckpt")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(models.CheckpointError, match="junk.ckpt"):
        models.load(junk)
    net = models.build("resnet18")
    with pytest.raises(models.CheckpointError, match="2 class names"):
        models.save(tmp_path / "x.ckpt", net, classes=["a", "b"], preset=get_preset("deepcovid"))
    _, path = _ckpt(tmp_path)
    b = torch.load(path, weights_only=False)
    b["arch"] = "resnet50"
    torch.save(b, tmp_path / "wrong.ckpt")
    with pytest.raises(models.CheckpointError, match="do not match architecture 'resnet50'"):
        models.load(tmp_path / "wrong.ckpt")


def test_atomic_save_keeps_usual_permissions(tmp_path):
    """Checkpoints rewritten in place (calibrate, set-threshold) must stay readable by others, not 0600."""
    import os
    import stat

    from covidcxr.models.checkpoint import atomic_torch_save

    old = os.umask(0o022)
    try:
        atomic_torch_save({"a": 1}, tmp_path / "x.ckpt")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.ckpt").stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["x.ckpt"]  # no temporary left behind


# --------------------------------------------------------------------------- CLI


def test_cli_models_list_table_and_json(capsys):
    from covidcxr.cli import main

    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["name", "paper", "input", "preset"]
    for name in EXPECTED:
        assert any(line.startswith(name + " ") for line in lines), name
    assert main(["models", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == set(ALL)
    for r in rows:
        assert {"name", "params", "macs", "input_size", "preset", "paper", "cam_layer", "head"} <= set(r)
        assert r["params"] > 0 and r["macs"] > 0
    small = next(r for r in rows if r["name"] == "squeezenet1_1")
    net = models.build("squeezenet1_1")
    assert small["params"] == count_params(net) and small["macs"] == count_macs(net, 224)


def test_save_after_a_head_swap_records_the_real_output_count(tmp_path):
    """Severity swaps the head for a 2-output Linear by hand; the checkpoint still rebuilds."""
    net = models.build("densenet121", in_chans=1)
    net.classifier = nn.Linear(1024, 2)
    models.save(
        tmp_path / "s.ckpt",
        net,
        classes=["geographic_extent", "opacity"],
        preset=get_preset("xrv"),
        task="severity-scores",
    )
    loaded = models.load(tmp_path / "s.ckpt")
    assert loaded.meta["arch_kwargs"] == {"num_classes": 2, "in_chans": 1}
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), net.eval()(x))


def test_cli_models_show(capsys):
    from covidcxr.cli import main

    assert main(["models", "show", "densenet121", "--weights", "xrv-all", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["preset"] == "deepcovid" and row["preset_for_weights"] == "xrv" and row["head"] == "classifier"
    assert main(["models", "show", "covidnet-cxr-2"]) == 0
    out = capsys.readouterr().out
    assert "cam_layer" in out and "stage4" in out and "8.80 M" in out
    assert main(["models", "show", "nope"]) == 1
    assert "unknown model 'nope'" in capsys.readouterr().err
