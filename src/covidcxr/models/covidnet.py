"""COVID-Net (Wang, Lin & Wong 2020) and COVID-Net CXR-2 (Pavlova et al. 2022) in PyTorch.

The authors released TensorFlow graphs but no layer code, so this follows the papers' figures
(and lindawangg/COVID-Net issue #2):

* a 7x7 stride-2 stem (CXR-2 adds a 3x3 stride-2 max-pool);
* four stages of 3, 4, 6 and 3 PEPX modules at output strides 4, 8, 16 and 32;
* PEPX = 1x1 projection -> 1x1 expansion -> 3x3 depth-wise -> 1x1 projection -> 1x1 extension,
  each convolution followed by BatchNorm and ReLU;
* densely connected long-range links: each stage has a 1x1 side projection of its input, and
  every module after the first receives the sum of that projection and the outputs of all
  earlier modules of the stage; the stage's output is that same running sum over all modules;
* a classifier head (global average pooling and three fully connected layers, as in the
  paper's "FC, FC, FC" figure; flattening a 15x15x2048 map would need ~0.5 G parameters).

The papers do not give the channel widths inside a PEPX module; :data:`VARIANTS` holds our
choices (see docs/models.md for measured vs published parameters and MACs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from covidcxr.models.registry import ModelSpec, register


def _cbr(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class PEPX(nn.Sequential):
    """Projection-Expansion-Projection-eXtension module; ``stride`` sits in the depth-wise conv."""

    def __init__(self, cin: int, cout: int, proj: int, expand: int, stride: int = 1) -> None:
        super().__init__(
            *_cbr(cin, proj),  # first-stage projection
            *_cbr(proj, expand),  # expansion
            *_cbr(expand, expand, 3, stride, groups=expand),  # depth-wise representation
            *_cbr(expand, proj),  # second-stage projection
            *_cbr(proj, cout),  # extension
        )


class PEPXStage(nn.Module):
    """A stage of PEPX modules with COVID-Net's densely connected long-range links."""

    def __init__(self, cin: int, cout: int, depth: int, proj: int, expand: int, stride: int) -> None:
        super().__init__()
        # 1x1 side projection of the stage input (BatchNorm keeps its scale comparable to the modules').
        self.side = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        mods = [PEPX(cin, cout, proj, expand, stride)]
        mods += [PEPX(cout, cout, proj, expand, 1) for _ in range(depth - 1)]
        self.blocks = nn.ModuleList(mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc = self.side(x) + self.blocks[0](x)
        for block in self.blocks[1:]:
            acc = acc + block(acc)  # input = side + all earlier outputs; add this output to the sum
        return acc


@dataclass(frozen=True)
class Variant:
    widths: tuple[int, int, int, int]
    #: PEPX inner widths per stage: (projection, expansion)
    inner: tuple[tuple[int, int], ...]
    stem: int = 64
    stem_pool: bool = False
    #: stride of each stage's first module (the stem gives stride 2, or 4 with the pool)
    strides: tuple[int, int, int, int] = (2, 2, 2, 2)
    depths: tuple[int, int, int, int] = (3, 4, 6, 3)
    hidden: tuple[int, ...] = (1024, 256)
    dropout: float = 0.0


VARIANTS: dict[str, Variant] = {
    # paper-scale widths (Fig. 2 of Wang et al.); PEPX projection = width/8, expansion = width/4
    "covidnet-cxr-large": Variant(
        widths=(256, 512, 1024, 2048),
        inner=((32, 64), (64, 128), (128, 256), (256, 512)),
    ),
    # half the widths, same ratios
    "covidnet-cxr-small": Variant(
        widths=(128, 256, 512, 1024),
        inner=((16, 32), (32, 64), (64, 128), (128, 256)),
        stem=32,
        hidden=(512, 128),
    ),
    # CXR-2 figure: 7x7 stem + max-pool, widths 160/328/640/2048, stride-2 first modules in stages 2-4.
    # PEPX twice as wide in the two high-resolution stages (width/4, width/2), width/8, width/4 after.
    "covidnet-cxr-2": Variant(
        widths=(160, 328, 640, 2048),
        inner=((40, 80), (82, 164), (80, 160), (256, 512)),
        stem_pool=True,
        strides=(1, 2, 2, 2),
    ),
}


class COVIDNet(nn.Module):
    """COVID-Net. ``cam_layer`` = ``stage4``, ``head`` = ``classifier.4`` (or the last Linear)."""

    def __init__(self, variant: str | Variant = "covidnet-cxr-large", num_classes: int = 3, in_chans: int = 3) -> None:
        super().__init__()
        v = VARIANTS[variant] if isinstance(variant, str) else variant
        stem: list[nn.Module] = [nn.Conv2d(in_chans, v.stem, 7, 2, 3, bias=False), nn.BatchNorm2d(v.stem), nn.ReLU()]
        if v.stem_pool:
            stem.append(nn.MaxPool2d(3, 2, 1))
        self.stem = nn.Sequential(*stem)
        cin = v.stem
        for i in range(4):
            proj, expand = v.inner[i]
            setattr(self, f"stage{i + 1}", PEPXStage(cin, v.widths[i], v.depths[i], proj, expand, v.strides[i]))
            cin = v.widths[i]
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        layers: list[nn.Module] = []
        for h in v.hidden:
            layers += [nn.Linear(cin, h), nn.ReLU()]
            if v.dropout:
                layers.append(nn.Dropout(v.dropout))
            cin = h
        layers.append(nn.Linear(cin, num_classes))
        self.classifier = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.stage4(self.stage3(self.stage2(self.stage1(x))))
        return self.classifier(self.pool(x))


def _builder(variant: str):
    def build(num_classes: int = 3, in_chans: int = 3, **_: object) -> nn.Module:
        return COVIDNet(variant, num_classes=num_classes, in_chans=in_chans)

    return build


_PAPER = {
    "covidnet-cxr-large": ("COVID-Net (Wang et al. 2020), CXR3-B scale", 11.75e6, 7.50e9),
    "covidnet-cxr-small": ("COVID-Net (Wang et al. 2020), narrow", None, None),
    "covidnet-cxr-2": ("COVID-Net CXR-2 (Pavlova et al. 2022)", 8.8e6, 5.55e9),
}

for _name, _v in VARIANTS.items():
    _paper, _pp, _pm = _PAPER[_name]
    _head = f"classifier.{len(_v.hidden) * (3 if _v.dropout else 2)}"
    register(
        ModelSpec(
            _name,
            _paper,
            480,
            "covidnet",
            _builder(_name),
            (),
            cam_layer="stage4",
            head=_head,
            family="covidnet",
            published_params=_pp,
            published_macs=_pm,
            first_conv="stem.0",
            notes=f"PEPX widths {'/'.join(map(str, _v.widths))}",
        )
    )
