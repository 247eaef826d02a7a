"""Lung segmentation: models, training, inference, masks and the input plausibility check.

    covidcxr segment predict IMAGE... [--model lung-unet-vgg11|CKPT] --out DIR   # masks + overlays
    covidcxr segment train --data MANIFEST --out RUN [--init lung-unet-vgg11]   # scratch / fine-tune

Submodules: :mod:`~covidcxr.segment.model` (networks, strict fp16 -> fp32 loading),
:mod:`~covidcxr.segment.training`, :mod:`~covidcxr.segment.segmenter` (a network with its input convention,
torch or onnxruntime), :mod:`~covidcxr.segment.loading` (by catalogue name or file; ONNX exports),
:mod:`~covidcxr.segment.maskcache` (masks by image hash), :mod:`~covidcxr.segment.lungcrop` (the lung crop's
mask function), :mod:`~covidcxr.segment.maskspec` (which segmenter a lung-crop model needs, picklable),
:mod:`~covidcxr.segment.writer` (batch masks to files), :mod:`~covidcxr.segment.masks` (post-processing,
measurements) and :mod:`~covidcxr.segment.plausibility` (is this a frontal chest X-ray?).

Importing this package imports neither torch nor a model: names resolve on first use, so the
ONNX paths can use the masks and plausibility helpers without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "UNet": "model", "LungUNetVGG11": "model", "SegmenterError": "model", "load_pretrained_file": "model",
    "lung_logit": "model",
    "postprocess": "masks", "fill_holes": "masks", "dice": "masks", "dilate": "masks", "read_mask": "masks",
    "measure": "masks", "overlay": "masks",
    "LungSegmenter": "segmenter", "load_segmenter": "loading", "default_segmenter": "loading",
    "PRETRAINED": "loading", "FORMAT": "loading",
    "MaskCache": "maskcache", "CachedSegmenter": "maskcache", "image_hash": "maskcache",
    "lung_crop_provider": "lungcrop", "MaskSpec": "maskspec", "MaskSpecError": "maskspec",
    "predict_masks": "writer", "predict_files": "writer",
    "train_segmenter": "training", "evaluate_dice": "training", "summarize_dice": "training",
    "check_plausibility": "plausibility", "Plausibility": "plausibility",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'covidcxr.segment' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"covidcxr.segment.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
