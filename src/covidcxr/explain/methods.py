"""Attribution methods behind one signature: ``fn(model, x, target, ctx) -> B x H x W heatmap``.

* ``gradcam``  : Grad-CAM on the registry's ``cam_layer`` (the last convolutional block), ReLU'd and
  bilinearly upsampled to the input size. Non-negative.
* ``lrp``      : zennit LRP (EpsilonPlusFlat by default) with the canonizers of :mod:`.lrp`; summed
  over channels. Signed: positive = evidence for the target class.
* ``occlusion``: captum Occlusion, a square patch (1/8 of the side, stride 1/16) set to the
  preset's black level; the heatmap is the drop of the target logit. Signed.
* ``ig``       : captum IntegratedGradients from a black image, summed over channels. Signed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from covidcxr.preprocess import Preset


class ExplainError(ValueError):
    """A method cannot run on this model or input."""


@dataclass
class Context:
    """What a method may need besides the model: architecture name, preset and options."""

    arch: str | None = None
    preset: Preset | None = None
    cam_layer: str | None = None
    lrp_composite: str = "epsilon-plus-flat"
    ig_steps: int = 32
    occlusion_window: int | None = None
    occlusion_stride: int | None = None
    options: dict = field(default_factory=dict)

    def black(self, x: torch.Tensor) -> torch.Tensor:
        """The input a black image maps to (the natural 'absent' value for an X-ray)."""
        if self.preset is None:
            return torch.zeros_like(x)
        b = self.preset.finalize(np.zeros((x.shape[-2], x.shape[-1]), np.float32))
        return b.to(x).unsqueeze(0).expand_as(x)

    def bounds(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.preset is None:
            return x.detach().amin().expand(1), x.detach().amax().expand(1)
        h, w = x.shape[-2:]
        lo = self.preset.finalize(np.zeros((h, w), np.float32)).to(x).unsqueeze(0)
        hi = self.preset.finalize(np.ones((h, w), np.float32)).to(x).unsqueeze(0)
        return torch.minimum(lo, hi), torch.maximum(lo, hi)


Method = Callable[[nn.Module, torch.Tensor, torch.Tensor, Context], torch.Tensor]


def get_submodule(model: nn.Module, dotted: str) -> nn.Module:
    try:
        return model.get_submodule(dotted)
    except AttributeError:
        raise ExplainError(f"model has no layer {dotted!r} for Grad-CAM") from None


def find_cam_layer(model: nn.Module, arch: str | None = None) -> str:
    """The registry's ``cam_layer``; otherwise the last module that outputs a 4-D feature map."""
    if arch:
        try:
            from covidcxr.models import get_spec

            layer = get_spec(arch).cam_layer
            if layer:
                return layer
        except KeyError:
            pass
    last = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            last = name
    if last is None:
        raise ExplainError("no convolutional layer found for Grad-CAM")
    return last


def gradcam(model: nn.Module, x: torch.Tensor, target: torch.Tensor, ctx: Context) -> torch.Tensor:
    layer = get_submodule(model, ctx.cam_layer or find_cam_layer(model, ctx.arch))
    store: dict[str, torch.Tensor] = {}

    def hook(_m: nn.Module, _inp: object, out: torch.Tensor) -> torch.Tensor:
        if isinstance(out, (tuple, list)):
            out = out[0]
        store["act"] = out
        # hand a copy downstream: DenseNet applies an in-place ReLU to this block's output
        return out.clone()

    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            xin = x.detach().requires_grad_(True)
            logits = model(xin)
            score = logits.gather(1, target.view(-1, 1)).sum()
            act = store["act"]
            (grad,) = torch.autograd.grad(score, act)
    finally:
        handle.remove()
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * act).sum(1, keepdim=True))
    cam = nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return cam[:, 0].detach()


def lrp_method(model: nn.Module, x: torch.Tensor, target: torch.Tensor, ctx: Context) -> torch.Tensor:
    from covidcxr.explain.lrp import lrp

    bounds = ctx.bounds(x) if ctx.lrp_composite == "epsilon-gamma-box" else None
    rel = lrp(model, x, target, arch=ctx.arch, composite=ctx.lrp_composite, bounds=bounds)
    return rel.sum(1)


def occlusion(model: nn.Module, x: torch.Tensor, target: torch.Tensor, ctx: Context) -> torch.Tensor:
    from captum.attr import Occlusion

    size = x.shape[-1]
    win = ctx.occlusion_window or max(4, size // 8)
    stride = ctx.occlusion_stride or max(2, size // 16)
    c = x.shape[1]
    attr = Occlusion(model).attribute(
        x.detach(),
        sliding_window_shapes=(c, win, win),
        strides=(c, stride, stride),
        target=target,
        baselines=ctx.black(x[:1])[0],
        perturbations_per_eval=16,
    )
    return attr.mean(1).detach()


def integrated_gradients(model: nn.Module, x: torch.Tensor, target: torch.Tensor, ctx: Context) -> torch.Tensor:
    from captum.attr import IntegratedGradients

    attr = IntegratedGradients(model).attribute(
        x.detach(), baselines=ctx.black(x), target=target, n_steps=ctx.ig_steps,
        internal_batch_size=16,  # bounds memory at 480 px (COVID-Net) whatever the batch size
    )
    return attr.sum(1).detach()


METHODS: dict[str, Method] = {
    "gradcam": gradcam,
    "lrp": lrp_method,
    "occlusion": occlusion,
    "ig": integrated_gradients,
}
#: Methods whose maps are signed (positive = for the target class); Grad-CAM is non-negative.
SIGNED = {"lrp", "occlusion", "ig"}


def get_method(name: str | Method) -> Method:
    if callable(name):
        return name
    try:
        return METHODS[name]
    except KeyError:
        raise ExplainError(f"unknown method {name!r}; known: {', '.join(METHODS)}") from None


def explain(model: nn.Module, batch: torch.Tensor, method: str | Method = "gradcam",
            target: torch.Tensor | list[int] | int | None = None, ctx: Context | None = None) -> torch.Tensor:
    """Heatmaps (B x H x W, at the model's input size) for ``batch`` (B x C x H x W).

    ``target`` defaults to the predicted class of each image.
    """
    ctx = ctx or Context()
    model.eval()
    if batch.ndim != 4:
        raise ExplainError(f"expected a B x C x H x W batch, got shape {tuple(batch.shape)}")
    if target is None:
        with torch.no_grad():
            target = model(batch).argmax(1)
    target = torch.as_tensor(target, dtype=torch.long).reshape(-1)
    if target.numel() == 1 and batch.shape[0] > 1:
        target = target.expand(batch.shape[0])
    heat = get_method(method)(model, batch, target, ctx)
    if heat.shape != (batch.shape[0], batch.shape[2], batch.shape[3]):
        raise ExplainError(f"method returned shape {tuple(heat.shape)}, expected {(batch.shape[0], *batch.shape[2:])}")
    return heat
