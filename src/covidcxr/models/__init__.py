"""Model registry, builders, weight sources and self-contained checkpoints.

    >>> from covidcxr import models
    >>> net = models.create("resnet18", num_classes=3, weights="none")
    >>> loaded = models.load("run/best.ckpt")      # model + preset + classes
"""

from __future__ import annotations

from typing import Any

from torch import nn

from covidcxr.models import backbones as _backbones  # noqa: F401  (registers torchvision models)
from covidcxr.models.checkpoint import CheckpointError, LoadedModel, load, read_bundle, save
from covidcxr.models.registry import REGISTRY, ModelSpec, get_spec, list_models

try:  # COVID-Net registers itself when its module exists
    from covidcxr.models import covidnet as _covidnet  # noqa: F401
except ImportError:  # pragma: no cover
    pass


def build(name: str, num_classes: int = 3, **kwargs: Any) -> nn.Module:
    """A fresh (randomly initialised) model from the registry."""
    spec = get_spec(name)
    kw = {**spec.defaults, **kwargs}
    return spec.builder(num_classes=num_classes, **kw)


def create(name: str, num_classes: int = 3, weights: str | None = "none", **kwargs: Any) -> nn.Module:
    """Build a registry model and initialise it from ``weights``.

    ``weights``: ``"none"``, ``"imagenet"``, ``"xrv-nih"``, ``"xrv-all"`` or a local file
    (state_dict, Lightning checkpoint, covidcxr checkpoint or safetensors).
    """
    from covidcxr.models.weights import apply_weights

    model = build(name, num_classes=num_classes, **kwargs)
    if weights in (None, "none", ""):
        return model
    return apply_weights(model, name, weights, num_classes=num_classes, **kwargs)


__all__ = [
    "REGISTRY",
    "ModelSpec",
    "CheckpointError",
    "LoadedModel",
    "build",
    "create",
    "get_spec",
    "list_models",
    "load",
    "read_bundle",
    "save",
]
