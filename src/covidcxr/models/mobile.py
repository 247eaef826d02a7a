"""Small ImageNet-pretrained bodies for transfer learning on a CPU: MobileNetV2 and EfficientNet-Lite0.

* ``mobilenet_v2``: torchvision's MobileNetV2 (width 1.0) with a new ``classifier.1`` Linear.
* ``efficientnet_lite0``: timm's ``tf_efficientnet_lite0`` (EfficientNet-B0 without squeeze-excite,
  ReLU6, TensorFlow "same" padding, BatchNorm eps 1e-3), the network of Google's TF-Lite checkpoint.

Their pretrained files (``covidcxr.models.catalog``: ``mobilenet_v2-imagenet``,
``efficientnet_lite0-imagenet``) are loaded by :mod:`covidcxr.models.weights`; the EfficientNet file
uses lukemelas/EfficientNet-PyTorch key names, which :func:`lukemelas_to_timm` maps onto timm's.
"""

from __future__ import annotations

import re

import torch
import torchvision
from torch import nn

from covidcxr.models.backbones import set_in_chans
from covidcxr.models.registry import ModelError, ModelSpec, register


#: blocks per stage of EfficientNet-B0/Lite0 (lukemelas numbers the 16 blocks flat, timm by stage)
EFFNET_B0_STAGES: tuple[int, ...] = (1, 2, 2, 3, 3, 4, 1)


def _mobilenet_v2(num_classes: int = 3, in_chans: int = 3, dropout: float = 0.2, **_: object) -> nn.Module:
    m = torchvision.models.mobilenet_v2(weights=None, dropout=dropout)
    m.classifier[1] = nn.Linear(m.last_channel, num_classes)
    set_in_chans(m, "features.0.0", in_chans)
    return m


def _efficientnet_lite0(num_classes: int = 3, in_chans: int = 3, drop_rate: float = 0.2, **_: object) -> nn.Module:
    try:
        import timm
    except ImportError:  # a declared dependency; say which one when an old environment lacks it
        raise ModelError("efficientnet_lite0 needs timm (pip install timm)") from None
    m = timm.create_model(
        "tf_efficientnet_lite0", pretrained=False, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate
    )
    # timm initialises the Linear head as TF does, U(+-1/sqrt(fan_out)): +-0.58 for 3 classes. On pretrained
    # features that gives logits of about +-8 (first-epoch loss ~7, probabilities saturated at 0/1, a stored
    # COVID-19 threshold of 0.000). reset_classifier builds a PyTorch-default Linear (+-1/sqrt(1280)), as
    # the other architectures' fresh heads are.
    m.reset_classifier(num_classes)
    return m


# --------------------------------------------------------------------------- key mapping

_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# a block without expansion (the first: depthwise-separable) and an inverted residual block
_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
       "_project_conv": "conv_pwl", "_bn2": "bn3"}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(_[a-z_]+[0-9]?)\.(.+)$")
_TOP_KEY = re.compile(r"^(_[a-z_]+[0-9]?)\.(.+)$")


def _stage_index(flat: int) -> tuple[int, int]:
    for stage, n in enumerate(EFFNET_B0_STAGES):
        if flat < n:
            return stage, flat
        flat -= n
    raise KeyError(flat)


def lukemelas_to_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-Lite0 state_dict from lukemelas/EfficientNet-PyTorch to timm's names.

    Every key must map (a ``KeyError`` names the first that does not) and no two keys may map to one
    name: the renaming is a bijection, so a strict load afterwards checks the file completely.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        m = _BLOCK_KEY.match(key)
        if m:
            flat, part, rest = int(m.group(1)), m.group(2), m.group(3)
            try:
                stage, idx = _stage_index(flat)
            except KeyError:
                raise KeyError(f"{key}: block {flat} beyond EfficientNet-Lite0's {sum(EFFNET_B0_STAGES)}") from None
            table = _DS if stage == 0 else _IR
            if part not in table:
                raise KeyError(f"{key}: unknown block part {part!r} (squeeze-excite? Lite0 has none)")
            new = f"blocks.{stage}.{idx}.{table[part]}.{rest}"
        else:
            t = _TOP_KEY.match(key)
            if not t or t.group(1) not in _TOP:
                raise KeyError(f"{key}: not an EfficientNet-Lite0 key in lukemelas layout")
            new = f"{_TOP[t.group(1)]}.{t.group(2)}"
        if new in out:
            raise KeyError(f"{key}: maps onto {new!r} twice")
        out[new] = value
    return out


def is_lukemelas(sd: dict[str, object]) -> bool:
    return any(k.startswith("_blocks.") for k in sd) and "_conv_stem.weight" in sd


# --------------------------------------------------------------------------- registry

register(
    ModelSpec(
        "mobilenet_v2",
        "MobileNetV2 (Sandler et al. 2018), ImageNet transfer",
        224,
        "imagenet",
        _mobilenet_v2,
        ("imagenet", "mobilenet_v2-imagenet"),
        cam_layer="features",
        head="classifier.1",
        family="mobilenet",
        first_conv="features.0.0",
        published_params=3.4e6,
        published_macs=0.300e9,
        notes="torchvision MobileNetV2 1.0 (Sandler et al. 2018), Dropout 0.2 -> new Linear head",
    )
)

register(
    ModelSpec(
        "efficientnet_lite0",
        "EfficientNet-Lite0 (Tan & Le 2019), ImageNet transfer",
        224,
        "effnet-lite",
        _efficientnet_lite0,
        ("imagenet", "efficientnet_lite0-imagenet"),
        cam_layer="bn2",
        head="classifier",
        family="efficientnet",
        first_conv="conv_stem",
        published_params=4.7e6,
        published_macs=0.407e9,
        notes="timm tf_efficientnet_lite0 (B0 without SE, ReLU6, TF same padding), Dropout 0.2 -> new Linear head",
    )
)
