"""torchvision backbones (Deep-COVID, CheXNet / COVID-CXNet, Bassi & Attux, VGG baseline) with new heads.

Every builder returns a fresh model whose final layer is an ``nn.Linear`` at the registry's
``head`` path, and whose first convolution accepts ``in_chans`` channels (1 for torchxrayvision
weights, 3 otherwise). Weights are loaded afterwards by :mod:`covidcxr.models.weights`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.densenet import DenseNet as _TVDenseNet

from covidcxr.models.registry import ModelSpec, register, set_module

#: ChestX-ray14 labels in the order of the CheXNet reimplementation (arnoweng/CheXNet), the
#: layout of a 14-output ``chexnet`` model.
CHEXNET_LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)

DEEPCOVID = "Deep-COVID (Minaee et al. 2020)"
BASSI = "Bassi & Attux 2021 (twice transfer learning)"


def set_in_chans(model: nn.Module, path: str, in_chans: int) -> None:
    """Give the first convolution ``in_chans`` input channels (fresh weights, same geometry)."""
    old = model.get_submodule(path)
    assert isinstance(old, nn.Conv2d)
    if old.in_channels == in_chans:
        return
    new = nn.Conv2d(
        in_chans,
        old.out_channels,
        old.kernel_size,
        old.stride,
        old.padding,
        old.dilation,
        old.groups,
        old.bias is not None,
        old.padding_mode,
    )
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    set_module(model, path, new)


# --------------------------------------------------------------------------- ResNet


def _resnet(arch: str):
    def build(num_classes: int = 3, in_chans: int = 3, **_: object) -> nn.Module:
        m = getattr(torchvision.models, arch)(weights=None)
        m.fc = nn.Linear(m.fc.in_features, num_classes)
        set_in_chans(m, "conv1", in_chans)
        return m

    return build


# --------------------------------------------------------------------------- DenseNet


class DenseNet(_TVDenseNet):
    """torchvision's DenseNet with a non-in-place final ReLU.

    torchvision applies ``F.relu(features, inplace=True)`` right after ``features``, which
    overwrites the very tensor a Grad-CAM hook on ``features`` captured. Same weights and keys.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.features(x))
        out = torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1)
        return self.classifier(out)


_DENSENET_CFG = {"densenet121": (6, 12, 24, 16), "densenet169": (6, 12, 32, 32), "densenet201": (6, 12, 48, 32)}


def _densenet_body(arch: str, in_chans: int) -> DenseNet:
    m = DenseNet(growth_rate=32, block_config=_DENSENET_CFG[arch], num_init_features=64)
    set_in_chans(m, "features.conv0", in_chans)
    return m


def _densenet(arch: str):
    def build(num_classes: int = 3, in_chans: int = 3, **_: object) -> nn.Module:
        m = _densenet_body(arch, in_chans)
        m.classifier = nn.Linear(m.classifier.in_features, num_classes)
        return m

    return build


def _chexnet(num_classes: int = 14, in_chans: int = 3, **_: object) -> nn.Module:
    """DenseNet-121 with CheXNet's head layout: ``classifier = Sequential(Linear(1024, n))``.

    The key names match the widely used CheXNet reimplementation (``classifier.0.*``), whose
    trailing ``Sigmoid`` is left out: the model returns logits and the loss applies the sigmoid.
    """
    m = _densenet_body("densenet121", in_chans)
    m.classifier = nn.Sequential(nn.Linear(1024, num_classes))
    return m


def _cxnet(num_classes: int = 3, in_chans: int = 3, hidden: int = 10, dropout: float = 0.2, **_: object) -> nn.Module:
    """COVID-CXNet: DenseNet-121 body, global pool -> Dense 10 ReLU -> Dropout 0.2 -> classes."""
    m = _densenet_body("densenet121", in_chans)
    m.classifier = nn.Sequential(
        nn.Linear(1024, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
    )
    return m


# --------------------------------------------------------------------------- SqueezeNet, VGG


def _squeezenet(num_classes: int = 3, in_chans: int = 3, **_: object) -> nn.Module:
    """SqueezeNet 1.1 with a Linear head on globally pooled Fire features.

    torchvision's head is Dropout -> 1x1 conv -> ReLU -> pool. A 1x1 conv followed by average
    pooling equals pooling followed by a Linear, so this is the same function class, except
    that the ReLU on the logits (which forbids negative logits) is dropped.
    """
    m = torchvision.models.squeezenet1_1(weights=None)
    m.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Dropout(0.5), nn.Linear(512, num_classes))
    set_in_chans(m, "features.0", in_chans)
    return m


def _vgg19(num_classes: int = 3, in_chans: int = 3, **_: object) -> nn.Module:
    """VGG-19 as in COVID-Net's comparison table: the 16 conv layers, global pooling and a Linear head.

    The 4096-wide ImageNet FC layers are left out, as COVID-Net's 20.37 M parameter count implies.
    """
    m = torchvision.models.vgg19(weights=None)
    m.avgpool = nn.AdaptiveAvgPool2d(1)
    m.classifier = nn.Linear(512, num_classes)
    set_in_chans(m, "features.0", in_chans)
    return m


# --------------------------------------------------------------------------- registry

for _arch, _size_note in (("resnet18", ""), ("resnet50", "")):
    register(
        ModelSpec(
            _arch,
            DEEPCOVID,
            224,
            "deepcovid",
            _resnet(_arch),
            ("imagenet",),
            cam_layer="layer4",
            head="fc",
            family="resnet",
            first_conv="conv1",
            notes="torchvision ResNet, new Linear head",
        )
    )

register(
    ModelSpec(
        "squeezenet1_1",
        DEEPCOVID,
        224,
        "deepcovid",
        _squeezenet,
        ("imagenet",),
        cam_layer="features",
        head="classifier.3",
        head_block="classifier",
        family="squeezenet",
        first_conv="features.0",
        notes="head: global pool -> Dropout 0.5 -> Linear (no ReLU on logits)",
    )
)

register(
    ModelSpec(
        "densenet121",
        DEEPCOVID,
        224,
        "deepcovid",
        _densenet("densenet121"),
        ("imagenet", "xrv-nih", "xrv-all"),
        cam_layer="features",
        head="classifier",
        family="densenet",
        first_conv="features.conv0",
        notes="torchvision DenseNet-121; xrv-* weights switch it to 1 channel and the xrv preset",
    )
)

register(
    ModelSpec(
        "chexnet",
        "CheXNet (Rajpurkar et al. 2017)",
        224,
        "chexnet",
        _chexnet,
        ("imagenet", "xrv-nih", "xrv-all"),
        cam_layer="features",
        head="classifier.0",
        head_block="classifier",
        family="densenet",
        first_conv="features.conv0",
        notes="DenseNet-121, head Sequential(Linear(1024, 14)) for the ChestX-ray14 labels",
    )
)

register(
    ModelSpec(
        "cxnet",
        "COVID-CXNet (Haghanifar et al. 2022)",
        320,
        "cxnet",
        _cxnet,
        ("imagenet", "xrv-nih", "xrv-all"),
        cam_layer="features",
        head="classifier.3",
        head_block="classifier",
        family="densenet",
        first_conv="features.conv0",
        notes="DenseNet-121, head: global pool -> Dense 10 ReLU -> Dropout 0.2 -> classes",
    )
)

for _arch in ("densenet169", "densenet201"):
    register(
        ModelSpec(
            _arch,
            BASSI,
            224,
            "chexnet",
            _densenet(_arch),
            ("imagenet",),
            cam_layer="features",
            head="classifier",
            family="densenet",
            first_conv="features.conv0",
            notes="torchvision DenseNet; twice transfer from a ChestX-ray14 checkpoint keeps the pneumonia neuron",
        )
    )

register(
    ModelSpec(
        "vgg19",
        "COVID-Net comparison baseline (Wang et al. 2020)",
        480,
        "covidnet",
        _vgg19,
        ("imagenet",),
        cam_layer="features",
        head="classifier",
        family="vgg",
        first_conv="features.0",
        published_params=20.37e6,
        published_macs=89.87e9,
        notes="VGG-19 conv layers, global pool, Linear head",
    )
)
