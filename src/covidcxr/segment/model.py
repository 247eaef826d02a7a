"""Segmentation networks: the compact U-Net trained from scratch, and the pretrained VGG-11 lung U-Net.

``LungUNetVGG11`` reproduces the layout of ``../shared/weights/lung-unet-vgg11-fp16.pth`` (see that
folder's README): a 1x1 ``init_conv`` (1 -> 3 channels) in front of the VGG-11 convolutions
(``conv1`` ... ``conv5s``, ReLU after each, 2x2 max-pooling between stages), a ``center`` block on
the pooled fifth stage, and decoder blocks ``dec5`` ... ``dec1`` that each take the previous output,
bilinearly upsampled to the matching encoder stage's size, concatenated *before* that stage's
features. Every decoder block is conv3x3-BN-ReLU twice; a 1x1 ``out`` conv gives 2 logits
(index 1 = lung). The file is float16 on disk and loads strictly into float32.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from covidcxr.models.checkpoint import CheckpointError


class SegmenterError(CheckpointError):
    """A segmentation checkpoint is missing or unusable (a CheckpointError, so the CLI prints one line)."""


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net (Ronneberger et al. 2015), ``depth`` poolings, width doubling from ``base``; 1-channel in,
    one lung logit out. The segmenter trained from scratch on the dev masks."""

    out_kind = "sigmoid"

    def __init__(self, base: int = 16, depth: int = 4, in_channels: int = 1):
        super().__init__()
        widths = [base * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList([_block(in_channels, widths[0])] +
                                  [_block(widths[i], widths[i + 1]) for i in range(depth)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(depth))])
        self.dec = nn.ModuleList([_block(widths[i] * 2, widths[i]) for i in reversed(range(depth))])
        self.head = nn.Conv2d(widths[0], 1, 1)
        self.depth = depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for up, dec in zip(self.up, self.dec):
            x = up(x)
            x = dec(torch.cat([skips.pop(), x], dim=1))
        return self.head(x)


class _DecBlock(nn.Module):
    """conv3x3-BN-ReLU twice, with the pretrained file's names (conv1, bn1, conv2, bn2)."""

    def __init__(self, cin: int, mid: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, cout, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(x)), inplace=True)


class LungUNetVGG11(nn.Module):
    """The pretrained lung U-Net's architecture (Montgomery + Shenzhen, VGG-11 encoder); 2 logits out."""

    out_kind = "softmax2"
    #: encoder parameter prefixes (frozen when fine-tuning with ``freeze_encoder``)
    ENCODER = ("init_conv", "conv1", "conv2", "conv3", "conv3s", "conv4", "conv4s", "conv5", "conv5s")

    def __init__(self) -> None:
        super().__init__()
        self.init_conv = nn.Conv2d(1, 3, 1)
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1)
        self.conv2 = nn.Conv2d(64, 128, 3, padding=1)
        self.conv3 = nn.Conv2d(128, 256, 3, padding=1)
        self.conv3s = nn.Conv2d(256, 256, 3, padding=1)
        self.conv4 = nn.Conv2d(256, 512, 3, padding=1)
        self.conv4s = nn.Conv2d(512, 512, 3, padding=1)
        self.conv5 = nn.Conv2d(512, 512, 3, padding=1)
        self.conv5s = nn.Conv2d(512, 512, 3, padding=1)
        self.center = _DecBlock(512, 512, 256)
        self.dec5 = _DecBlock(512 + 256, 512, 256)
        self.dec4 = _DecBlock(512 + 256, 512, 128)
        self.dec3 = _DecBlock(256 + 128, 256, 64)
        self.dec2 = _DecBlock(128 + 64, 128, 32)
        self.dec1 = _DecBlock(64 + 32, 64, 32)
        self.out = nn.Conv2d(32, 2, 1)

    @staticmethod
    def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.init_conv(x))
        e1 = F.relu(self.conv1(x))
        e2 = F.relu(self.conv2(F.max_pool2d(e1, 2)))
        e3 = F.relu(self.conv3s(F.relu(self.conv3(F.max_pool2d(e2, 2)))))
        e4 = F.relu(self.conv4s(F.relu(self.conv4(F.max_pool2d(e3, 2)))))
        e5 = F.relu(self.conv5s(F.relu(self.conv5(F.max_pool2d(e4, 2)))))
        c = self.center(F.max_pool2d(e5, 2))
        d5 = self.dec5(torch.cat([self._up(c, e5), e5], 1))
        d4 = self.dec4(torch.cat([self._up(d5, e4), e4], 1))
        d3 = self.dec3(torch.cat([self._up(d4, e3), e3], 1))
        d2 = self.dec2(torch.cat([self._up(d3, e2), e2], 1))
        d1 = self.dec1(torch.cat([self._up(d2, e1), e1], 1))
        return self.out(d1)

    def encoder_parameters(self):
        for name, p in self.named_parameters():
            if name.split(".")[0] in self.ENCODER:
                yield p


def lung_logit(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One lung logit per pixel (N x 1 x H x W) whatever the head: for the 2-class head, l1 - l0,
    whose sigmoid is the softmax probability of class 1."""
    out = model(x)
    if getattr(model, "out_kind", "sigmoid") == "softmax2":
        return out[:, 1:2] - out[:, 0:1]
    return out


def load_state_strict(model: nn.Module, state: dict, where: str) -> nn.Module:
    """Load ``state`` strictly, casting float16 (or any float) tensors to the model's float32."""
    try:
        own = model.state_dict()
        cast = {k: (v.to(own[k].dtype) if k in own and torch.is_tensor(v) and v.is_floating_point() else v)
                for k, v in state.items()}
        model.load_state_dict(cast, strict=True)
    except (RuntimeError, KeyError) as err:
        first = str(err).strip().splitlines()[0][:200]
        raise SegmenterError(f"{where}: weights do not fit the {type(model).__name__} architecture ({first})") from None
    return model.float()


def load_pretrained_file(path: str | os.PathLike) -> LungUNetVGG11:
    """The pretrained lung U-Net from its (float16) state_dict file, strictly, in float32."""
    p = Path(path)
    if not p.is_file():
        raise SegmenterError(f"{path}: lung U-Net weights not found")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:
        raise SegmenterError(f"{path}: cannot read lung U-Net weights ({type(err).__name__}: {err})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise SegmenterError(f"{path}: not a state_dict")
    return load_state_strict(LungUNetVGG11(), state, str(path)).eval()


ARCHS = {"unet": UNet, "lung-unet-vgg11": LungUNetVGG11}


def build(arch: str, kwargs: dict | None = None) -> nn.Module:
    if arch not in ARCHS:
        raise SegmenterError(f"unknown segmenter architecture {arch!r}; known: {', '.join(ARCHS)}")
    return ARCHS[arch](**(kwargs or {}))
