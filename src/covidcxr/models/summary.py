"""Parameter and MAC counts for the registry (``covidcxr models list``).

MACs come from :class:`torch.utils.flop_counter.FlopCounterMode` (MACs = FLOPs / 2: it counts
convolutions and matrix products, which is what published MAC figures count). The model is
built on the ``meta`` device, so counting VGG-19 at 480 px costs milliseconds and no memory.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from covidcxr.models.registry import get_spec, list_models

#: (parameters, MACs) at the native size with 3 outputs, as measured by :func:`measure`, so that
#: ``covidcxr models list`` needs no model building. tests/test_models.py checks every entry
#: against a live count; a model missing here is counted live.
MEASURED: dict[str, tuple[int, int]] = {
    "chexnet": (6956931, 2833140736),
    "covidnet-cxr-2": (8712515, 5377966464),
    "covidnet-cxr-large": (11171459, 7679172864),
    "covidnet-cxr-small": (2819395, 2069524608),
    "cxnet": (6964139, 5781923870),
    "densenet121": (6956931, 2833140736),
    "densenet169": (12489475, 3358184320),
    "densenet201": (18098691, 4289451648),
    "efficientnet_lite0": (3374851, 383911392),
    "mobilenet_v2": (2227715, 299498112),
    "resnet18": (11178051, 1813562880),
    "resnet50": (23514179, 4087142400),
    "squeezenet1_1": (724035, 262625472),
    "vgg19": (20025923, 89579521536),
}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: int, in_chans: int = 3) -> int:
    """Multiply-accumulates of one forward pass of a 1 x C x S x S input."""
    device = next(model.parameters()).device
    x = torch.zeros(1, in_chans, input_size, input_size, device=device)
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    model.train(was_training)
    return int(counter.get_total_flops()) // 2


@functools.cache
def measure(name: str, num_classes: int = 3, input_size: int | None = None) -> tuple[int, int]:
    """(parameters, MACs) of a registry model at ``input_size`` (native size by default)."""
    from covidcxr.models import build

    spec = get_spec(name)
    with torch.device("meta"):
        model = build(name, num_classes=num_classes)
    return count_params(model), count_macs(model, input_size or spec.input_size)


def model_table(num_classes: int = 3, live: bool = False) -> list[dict[str, Any]]:
    """One dict per registered model: name, paper, input_size, preset, params, macs and more.

    Counts come from :data:`MEASURED` unless ``live`` (or the model is not in it).
    """
    rows = []
    for name in list_models():
        spec = get_spec(name)
        if live or num_classes != 3 or name not in MEASURED:
            params, macs = measure(name, num_classes)
        else:
            params, macs = MEASURED[name]
        rows.append(
            {
                "name": name,
                "paper": spec.paper,
                "family": spec.family,
                "input_size": spec.input_size,
                "preset": spec.preset,
                "params": params,
                "macs": macs,
                "published_params": spec.published_params,
                "published_macs": spec.published_macs,
                "weights": ["none", *spec.weight_sources, "PATH"],
                "cam_layer": spec.cam_layer,
                "head": spec.head,
                "head_block": spec.reinit_block,
                "first_conv": spec.first_conv,
                "notes": spec.notes,
            }
        )
    return rows
