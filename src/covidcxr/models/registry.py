"""The model registry: one entry per architecture, with its paper, native size and preset."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    name: str
    paper: str
    input_size: int
    preset: str
    #: builder(num_classes=..., **kwargs) -> nn.Module with fresh weights
    builder: Callable[..., nn.Module]
    #: weight sources this architecture accepts besides "none" and a local file
    weight_sources: tuple[str, ...] = ()
    #: dotted path of the last convolutional block (Grad-CAM target)
    cam_layer: str | None = None
    #: dotted path of the final classification Linear layer
    head: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)


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
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


def list_models() -> list[str]:
    return sorted(REGISTRY)
