"""torchvision backbones (Deep-COVID, CheXNet / COVID-CXNet, Bassi & Attux, VGG baseline) with new heads."""

from __future__ import annotations

import torchvision
from torch import nn

from covidcxr.models.registry import ModelSpec, register


def _resnet(arch: str):
    def build(num_classes: int = 3, **_: object) -> nn.Module:
        m = getattr(torchvision.models, arch)(weights=None)
        m.fc = nn.Linear(m.fc.in_features, num_classes)
        return m

    return build


def _densenet(arch: str):
    def build(num_classes: int = 3, **_: object) -> nn.Module:
        m = getattr(torchvision.models, arch)(weights=None)
        m.classifier = nn.Linear(m.classifier.in_features, num_classes)
        return m

    return build


register(ModelSpec("resnet18", "Deep-COVID (Minaee et al.)", 224, "deepcovid", _resnet("resnet18"),
                   ("imagenet",), cam_layer="layer4", head="fc"))
register(ModelSpec("densenet121", "Deep-COVID / CheXNet", 224, "deepcovid", _densenet("densenet121"),
                   ("imagenet",), cam_layer="features", head="classifier"))
