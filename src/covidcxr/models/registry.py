"""The model registry: one entry per architecture, with its paper, native size and preset.

Every registered model follows the same layout contract so that training, severity and
explanation code can treat them alike:

* ``spec.head`` is the dotted path of the final ``nn.Linear`` (logits = head(pooled features));
* ``spec.head_block`` is the part that is re-initialised when the number of outputs changes
  (usually the same module; COVID-CXNet's small MLP head is the whole ``classifier``);
* ``spec.cam_layer`` is the dotted path of the last convolutional block (Grad-CAM target).

:func:`get_head`, :func:`replace_head` and :func:`pooled_features` use these paths, so no model
needs a bespoke ``forward_features``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


class ModelError(ValueError):
    """A model name or model argument is not valid."""


class UnknownModelError(ModelError, KeyError):
    """The requested architecture is not in the registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    paper: str
    input_size: int
    preset: str
    #: builder(num_classes=..., in_chans=..., **kwargs) -> nn.Module with fresh weights
    builder: Callable[..., nn.Module]
    #: weight sources this architecture accepts besides "none" and a local file
    weight_sources: tuple[str, ...] = ()
    #: dotted path of the last convolutional block (Grad-CAM target)
    cam_layer: str | None = None
    #: dotted path of the final classification Linear layer
    head: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    #: module re-initialised when the output count changes (defaults to ``head``)
    head_block: str | None = None
    #: family for grouping in tables / docs ("resnet", "densenet", "covidnet", ...)
    family: str = ""
    #: figures published by the paper for this model, when it gives any
    published_params: float | None = None
    published_macs: float | None = None
    notes: str = ""
    #: dotted path of the first convolution (in-channel adaptation when loading weights)
    first_conv: str | None = None

    @property
    def reinit_block(self) -> str:
        return self.head_block or self.head or ""


REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.name in REGISTRY:
        raise ValueError(f"model {spec.name!r} registered twice")
    REGISTRY[spec.name] = spec
    return spec


def get_spec(name: str) -> ModelSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownModelError(f"unknown model {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


def list_models() -> list[str]:
    return sorted(REGISTRY)


# --------------------------------------------------------------------------- uniform head access


def _spec_of(model: nn.Module, spec: ModelSpec | str | None) -> ModelSpec:
    if isinstance(spec, ModelSpec):
        return spec
    name = spec or getattr(model, "covidcxr_arch", None)
    if not name:
        raise ModelError("model was not built by covidcxr.models; pass its registry name or spec")
    return get_spec(name)


def get_head(model: nn.Module, spec: ModelSpec | str | None = None) -> nn.Linear:
    """The final Linear layer of a registry model."""
    s = _spec_of(model, spec)
    head = model.get_submodule(s.head)
    if not isinstance(head, nn.Linear):
        raise ModelError(f"{s.name}: head {s.head!r} is {type(head).__name__}, expected Linear")
    return head


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` (``classifier.0``, ``fc``...)."""
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, module)


def replace_head(model: nn.Module, num_outputs: int, spec: ModelSpec | str | None = None) -> nn.Linear:
    """Swap the final Linear for a fresh one with ``num_outputs`` rows; returns the new layer."""
    s = _spec_of(model, spec)
    old = get_head(model, s)
    new = nn.Linear(old.in_features, int(num_outputs)).to(old.weight.device, old.weight.dtype)
    set_module(model, s.head, new)
    kw = dict(getattr(model, "covidcxr_arch_kwargs", {}) or {})
    if kw:
        kw["num_classes"] = int(num_outputs)
        model.covidcxr_arch_kwargs = kw
    return new


def pooled_features(model: nn.Module, x: torch.Tensor, spec: ModelSpec | str | None = None) -> torch.Tensor:
    """The input of the head Linear for batch ``x`` (one full forward pass, captured by a hook)."""
    head = get_head(model, spec)
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, inp, _out: captured.append(inp[0]))
    try:
        model(x)
    finally:
        handle.remove()
    return captured[0]
