"""Model registry, builders, weight sources and self-contained checkpoints.

>>> from covidcxr import models
>>> net = models.create("resnet18", num_classes=3, weights="none")
>>> loaded = models.load("run/best.ckpt")      # model + preset + classes
"""

from __future__ import annotations

from typing import Any

from torch import nn

from covidcxr.models import backbones as _backbones  # noqa: F401  (registers torchvision models)
from covidcxr.models import covidnet as _covidnet  # noqa: F401  (registers COVID-Net)
from covidcxr.models import mobile as _mobile  # noqa: F401  (registers MobileNetV2, EfficientNet-Lite0)
from covidcxr.models.checkpoint import CheckpointError, LoadedModel, load, read_bundle, save
from covidcxr.models.registry import (
    REGISTRY,
    ModelError,
    ModelSpec,
    UnknownModelError,
    get_head,
    get_spec,
    list_models,
    pooled_features,
    replace_head,
)
from covidcxr.models.weights import DEFAULT_CLASSES, WeightsError
from covidcxr.models.weights import resolve_preset as preset_for


def _no_inplace(model: nn.Module) -> None:
    """Turn in-place activations off: hooks (Grad-CAM, zennit, captum) need unmodified outputs."""
    for m in model.modules():
        if getattr(m, "inplace", False) is True:
            m.inplace = False


def build(name: str, num_classes: int = 3, **kwargs: Any) -> nn.Module:
    """A fresh (randomly initialised) model from the registry.

    The model remembers how it was built (``covidcxr_arch``, ``covidcxr_arch_kwargs``) so that
    :func:`save` can write a checkpoint that rebuilds it without repeating the arguments.
    """
    spec = get_spec(name)
    kw = {**spec.defaults, **kwargs}
    model = spec.builder(num_classes=num_classes, **kw)
    _no_inplace(model)
    model.covidcxr_arch = name
    model.covidcxr_arch_kwargs = {"num_classes": int(num_classes), **kw}
    return model


def create(
    name: str,
    num_classes: int = 3,
    weights: str | None = "none",
    *,
    classes: list[str] | tuple[str, ...] | None = None,
    keep_neurons: bool = True,
    progress: bool = True,
    **kwargs: Any,
) -> nn.Module:
    """Build a registry model and initialise it from ``weights``.

    ``weights``: ``"none"``, ``"imagenet"``, a catalogue name (``"mobilenet_v2-imagenet"``, see
    ``covidcxr weights list``), ``"xrv-nih"``, ``"xrv-all"`` or a local file (state_dict, Lightning
    checkpoint, covidcxr checkpoint or safetensors). ``model.covidcxr_init`` records the source, its
    file and sha256 (and the catalogue provenance), which checkpoints keep under ``init``.

    ``classes`` names the outputs (default: normal / pneumonia / COVID-19 for 3 outputs); when
    the source head has a same-named neuron (e.g. ChestX-ray14 "Pneumonia") and
    ``keep_neurons`` is true, that row is copied (Bassi & Attux's output neuron keeping).
    ``in_chans`` (1 or 3) defaults to what the weights need: 1 for ``xrv-*``. Use
    :func:`preset_for` for the matching preprocessing preset; the model also carries it as
    ``model.covidcxr_init["preset"]``.
    """
    from covidcxr.models.weights import apply_weights

    return apply_weights(
        name, weights, num_classes=num_classes, classes=classes, keep_neurons=keep_neurons, progress=progress, **kwargs
    )


__all__ = [
    "REGISTRY",
    "ModelSpec",
    "ModelError",
    "UnknownModelError",
    "WeightsError",
    "CheckpointError",
    "get_head",
    "replace_head",
    "pooled_features",
    "preset_for",
    "DEFAULT_CLASSES",
    "LoadedModel",
    "build",
    "create",
    "get_spec",
    "list_models",
    "load",
    "read_bundle",
    "save",
]
