"""Layer-wise relevance propagation with zennit, including a DenseNet canonizer.

zennit ships canonizers for VGG and ResNet but none for DenseNet. Running zennit's generic
``SequentialMergeBatchNorm`` on a torchvision DenseNet is wrong: in leaf order each dense
layer's ``conv2`` is followed by the *next* layer's ``norm1``, which normalises the whole
concatenated feature map, not that conv's output. DenseNet also applies BatchNorm -> ReLU
-> Conv (BatchNorm *before* the convolution, so it cannot be folded into it the usual
way) and ends with a functional ReLU and global average pooling that no rule can hook.

:class:`DenseNetCanonizer` rewrites the model into an exactly equivalent one that LRP
rules handle:

* Conv -> BatchNorm pairs (``conv0/norm0``, each dense layer's ``conv1/norm2``) are merged
  into one convolution with a bias, as for VGG/ResNet;
* BatchNorm -> ReLU -> Conv/Linear (each dense layer's ``norm1``, each transition's
  ``norm``, the final ``norm5`` before the classifier) uses

      relu(a * x + b) = a * x'',   x'' = (x + b/a) where a*x + b > 0, else 0

  (``a``, ``b``: the BatchNorm's per-channel scale and shift), so the BatchNorm becomes a
  shifted ReLU (:class:`ShiftReLU`, relevance passes through it unchanged) and its
  scale ``a`` moves into the input channels of the next layer. Exact for any padding;
* the final ``F.relu`` and ``F.adaptive_avg_pool2d`` become modules, so that the average
  pool gets zennit's ``Norm`` rule instead of a plain (non-conserving) gradient.

The rewrite swaps modules instead of editing weights in place, so ``remove()`` restores
the original modules exactly, whatever order zennit removes canonizers in. Cf. Motzkus et
al., "Optimizing explanations by network canonization and hyperparameter search" (2022).
"""

from __future__ import annotations

import copy
import types
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from zennit.canonizers import AttributeCanonizer, Canonizer, CompositeCanonizer, SequentialMergeBatchNorm
from zennit.composites import (
    EpsilonAlpha2Beta1Flat,
    EpsilonGammaBox,
    EpsilonPlus,
    EpsilonPlusFlat,
    LayerMapComposite,
)
from zennit.layer import Sum
from zennit.rules import Epsilon, Norm, Pass
from zennit.torchvision import ResNetCanonizer
from zennit.types import AvgPool, BatchNorm, Convolution

# --------------------------------------------------------------------------- modules


class ShiftReLU(nn.Module):
    """``x + b/a`` where ``a*x + b > 0``, else 0 (see the module docstring): ``a * out == relu(a*x + b)``."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        a, b = self.scale.view(shape), self.shift.view(shape)
        return torch.where(a * x + b > 0, x + b / a, torch.zeros_like(x))


def _bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) of an eval-mode BatchNorm: bn(x) = scale * x + shift."""
    var = bn.running_var if bn.running_var is not None else torch.ones(bn.num_features)
    mean = bn.running_mean if bn.running_mean is not None else torch.zeros(bn.num_features)
    weight = bn.weight if bn.weight is not None else torch.ones_like(var)
    bias = bn.bias if bn.bias is not None else torch.zeros_like(var)
    scale = weight / torch.sqrt(var + bn.eps)
    # A zero scale makes the channel constant (relu(b)); a tiny stand-in keeps the rewrite finite and exact.
    tiny = torch.full_like(scale, 1e-12)
    scale = torch.where(scale.abs() < 1e-12, torch.where(scale < 0, -tiny, tiny), scale)
    return scale.detach(), (bias - mean * scale).detach()


@torch.no_grad()
def merge_bn_after(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """A copy of ``layer`` (Conv/Linear) with the following BatchNorm folded into its output."""
    scale, shift = _bn_affine(bn)
    new = _copy_with_bias(layer)
    view = (-1,) + (1,) * (new.weight.ndim - 1)
    new.weight.mul_(scale.view(view))
    new.bias.copy_(new.bias * scale + shift)
    return new


@torch.no_grad()
def merge_bn_before(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """A copy of ``layer`` (Conv/Linear) that takes :class:`ShiftReLU`'s output instead of ``relu(bn(x))``."""
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        raise ValueError("merge_bn_before supports ungrouped convolutions only")
    scale, _ = _bn_affine(bn)
    new = copy.deepcopy(layer)
    view = (1, -1) + (1,) * (new.weight.ndim - 2)
    new.weight.mul_(scale.view(view))
    return new


def _copy_with_bias(layer: nn.Module) -> nn.Module:
    new = copy.deepcopy(layer)
    if new.bias is None:
        out = new.weight.shape[0]
        new.bias = nn.Parameter(torch.zeros(out, dtype=new.weight.dtype, device=new.weight.device))
    return new


# --------------------------------------------------------------------------- DenseNet canonizer


class DenseNetCanonizer(Canonizer):
    """Canonize a torchvision DenseNet for LRP (see the module docstring); exact and reversible."""

    def __init__(self) -> None:
        self.swaps: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, name, original)
        self.added: list[tuple[nn.Module, str]] = []
        self.root: nn.Module | None = None

    def copy(self) -> "DenseNetCanonizer":
        return DenseNetCanonizer()

    # zennit calls apply(root) and keeps what it returns to call remove() later
    def apply(self, root_module: nn.Module) -> list["DenseNetCanonizer"]:
        from torchvision.models.densenet import DenseNet

        if not isinstance(root_module, DenseNet):
            return []
        inst = self.copy()
        inst.register(root_module)
        return [inst]

    def _swap(self, parent: nn.Module, name: str, new: nn.Module) -> None:
        self.swaps.append((parent, name, parent._modules[name]))
        parent._modules[name] = new

    def _add(self, parent: nn.Module, name: str, new: nn.Module) -> None:
        parent.add_module(name, new)
        self.added.append((parent, name))

    @torch.no_grad()
    def register(self, model: nn.Module) -> None:  # type: ignore[override]
        from torchvision.models.densenet import _DenseLayer, _Transition

        self.root = model
        feats = model.features
        # stem: conv0 -> norm0 (ordinary merge)
        if "conv0" in feats._modules and "norm0" in feats._modules:
            self._swap(feats, "conv0", merge_bn_after(feats.conv0, feats.norm0))
            self._swap(feats, "norm0", nn.Identity())
        for module in list(model.modules()):
            if isinstance(module, _DenseLayer):
                a, b = _bn_affine(module.norm1)
                conv1 = merge_bn_before(module.conv1, module.norm1)  # BN before conv
                conv1 = merge_bn_after(conv1, module.norm2)  # conv1 -> norm2
                self._swap(module, "relu1", ShiftReLU(a, b))
                self._swap(module, "norm1", nn.Identity())
                self._swap(module, "conv1", conv1)
                self._swap(module, "norm2", nn.Identity())
            elif isinstance(module, _Transition):
                a, b = _bn_affine(module.norm)
                self._swap(module, "conv", merge_bn_before(module.conv, module.norm))
                self._swap(module, "relu", ShiftReLU(a, b))
                self._swap(module, "norm", nn.Identity())
        # head: norm5 -> relu -> global average pool -> classifier. Make the functional ops modules.
        head = _first_linear(model, "classifier")
        if "norm5" in feats._modules and head is not None:
            parent, name = head
            a, b = _bn_affine(feats.norm5)
            self._swap(parent, name, merge_bn_before(parent._modules[name], feats.norm5))
            self._swap(feats, "norm5", nn.Identity())
            self._add(model, "lrp_head_act", ShiftReLU(a, b))
        else:
            self._add(model, "lrp_head_act", nn.ReLU())
        self._add(model, "lrp_head_pool", nn.AdaptiveAvgPool2d((1, 1)))
        model.forward = types.MethodType(_densenet_forward, model)

    def remove(self) -> None:
        for parent, name, original in reversed(self.swaps):
            parent._modules[name] = original
        for parent, name in self.added:
            delattr(parent, name)
        if self.root is not None and "forward" in self.root.__dict__:
            del self.root.__dict__["forward"]
        self.swaps, self.added, self.root = [], [], None


def _first_linear(model: nn.Module, name: str) -> tuple[nn.Module, str] | None:
    """(parent, key) of the Linear that first sees the pooled features: ``classifier`` itself, or
    the first Linear of a ``classifier`` Sequential when only Dropout/Flatten precede it."""
    mod = model._modules.get(name)
    if isinstance(mod, nn.Linear):
        return model, name
    if isinstance(mod, nn.Sequential):
        for key, child in mod._modules.items():
            if isinstance(child, nn.Linear):
                return mod, key
            if not isinstance(child, (nn.Dropout, nn.Flatten, nn.Identity)):
                return None
    return None


def _densenet_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = self.lrp_head_pool(self.lrp_head_act(self.features(x)))
    return self.classifier(torch.flatten(out, 1))


# --------------------------------------------------------------------------- COVID-Net


class COVIDNetStageCanonizer(AttributeCanonizer):
    """COVID-Net's stages add the side projection and every PEPX output with ``+``; a gradient
    through ``a + b`` hands the full relevance to both terms. This routes each sum through a
    zennit ``Sum`` module, which the composites give the proportional ``Norm`` rule."""

    def __init__(self) -> None:
        super().__init__(self._attribute_map)

    @classmethod
    def _attribute_map(cls, name: str, module: nn.Module) -> dict | None:
        try:
            from covidcxr.models.covidnet import PEPXStage
        except ImportError:  # pragma: no cover
            return None
        if isinstance(module, PEPXStage):
            return {"forward": cls.forward.__get__(module), "canonizer_sums": nn.ModuleList(
                [Sum() for _ in range(len(module.blocks))])}
        return None

    @staticmethod
    def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        acc = self.canonizer_sums[0](torch.stack([self.side(x), self.blocks[0](x)], dim=-1))
        for block, add in zip(self.blocks[1:], self.canonizer_sums[1:]):
            acc = add(torch.stack([acc, block(acc)], dim=-1))
        return acc

    def copy(self) -> "COVIDNetStageCanonizer":
        return COVIDNetStageCanonizer()


class COVIDNetCanonizer(CompositeCanonizer):
    """COVID-Net: merge every Conv -> BatchNorm pair and make the stages' sums hookable."""

    def __init__(self) -> None:
        super().__init__((SequentialMergeBatchNorm(), COVIDNetStageCanonizer()))


# --------------------------------------------------------------------------- canonizer / composite choice

#: Extra canonizers by architecture name; other modules (COVID-Net) add theirs here.
EXTRA_CANONIZERS: dict[str, Callable[[], list[Canonizer]]] = {}


def canonizers_for(model: nn.Module, arch: str | None = None) -> list[Canonizer]:
    """The canonizers that fit ``model``: DenseNet (ours), ResNet and VGG (zennit), else BN merging."""
    from torchvision.models import DenseNet, ResNet, VGG

    if arch and arch in EXTRA_CANONIZERS:
        return EXTRA_CANONIZERS[arch]()
    hook = getattr(model, "lrp_canonizers", None)
    if callable(hook):  # a model may describe its own canonization (COVID-Net does)
        return list(hook())
    if isinstance(model, DenseNet):
        return [DenseNetCanonizer()]
    try:
        from covidcxr.models.covidnet import COVIDNet
    except ImportError:  # pragma: no cover
        COVIDNet = ()  # type: ignore[assignment]
    if COVIDNet and isinstance(model, COVIDNet):
        return [COVIDNetCanonizer()]
    if isinstance(model, ResNet):
        return [ResNetCanonizer()]
    if isinstance(model, VGG):
        return [SequentialMergeBatchNorm()]
    return [SequentialMergeBatchNorm()]


def _base_map() -> list:
    return [(ShiftReLU, Pass())]


COMPOSITES = ("epsilon-plus-flat", "epsilon-plus", "epsilon-gamma-box", "epsilon-alpha2-beta1-flat", "epsilon")


def make_composite(name: str, canonizers: list[Canonizer], *, low: torch.Tensor | None = None,
                   high: torch.Tensor | None = None, epsilon: float = 1e-6, zero_bias: bool = False):
    """A zennit composite by name. ``epsilon`` with ``zero_bias=True`` conserves relevance exactly (tests)."""
    zp = ["bias"] if zero_bias else None
    if name == "epsilon-plus-flat":
        return EpsilonPlusFlat(layer_map=_base_map(), canonizers=canonizers, zero_params=zp)
    if name == "epsilon-plus":
        return EpsilonPlus(epsilon=epsilon, layer_map=_base_map(), canonizers=canonizers, zero_params=zp)
    if name == "epsilon-alpha2-beta1-flat":
        return EpsilonAlpha2Beta1Flat(layer_map=_base_map(), canonizers=canonizers, zero_params=zp)
    if name == "epsilon-gamma-box":
        if low is None or high is None:
            raise ValueError("epsilon-gamma-box needs the input's low/high bounds")
        return EpsilonGammaBox(low=low, high=high, layer_map=_base_map(), canonizers=canonizers, zero_params=zp)
    if name == "epsilon":
        from zennit.types import Activation

        layer_map = _base_map() + [
            (Activation, Pass()),
            (Sum, Norm()),
            (AvgPool, Norm()),
            (BatchNorm, Pass()),
            (Convolution, Epsilon(epsilon=epsilon, zero_params=zp)),
            (nn.Linear, Epsilon(epsilon=epsilon, zero_params=zp)),
        ]
        return LayerMapComposite(layer_map=layer_map, canonizers=canonizers)
    raise ValueError(f"unknown LRP composite {name!r}; known: {', '.join(COMPOSITES)}")


def lrp(model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, arch: str | None = None,
        composite: str = "epsilon-plus-flat", bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
        zero_bias: bool = False, epsilon: float = 1e-6) -> torch.Tensor:
    """Input relevance (B x C x H x W) for class ``target``; the output relevance is the target logit."""
    from zennit.attribution import Gradient

    low, high = bounds if bounds is not None else (None, None)
    if low is not None:
        low, high = low.expand_as(x), high.expand_as(x)
    comp = make_composite(composite, canonizers_for(model, arch), low=low, high=high, zero_bias=zero_bias,
                          epsilon=epsilon)
    x = x.detach().clone().requires_grad_(True)
    with Gradient(model=model, composite=comp) as attributor:
        _, rel = attributor(x, lambda out: out * F.one_hot(target, out.shape[1]).to(out.dtype))
    return rel.detach()
