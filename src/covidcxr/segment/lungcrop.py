"""The lung crop's mask function: segment (cached), then widen the lung box by a dilation."""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

from covidcxr.segment.loading import load_segmenter
from covidcxr.segment.maskcache import CachedSegmenter, MaskCache
from covidcxr.segment.masks import dilate
from covidcxr.segment.segmenter import LungSegmenter


def lung_crop_provider(spec: str | os.PathLike | LungSegmenter | None = None, dilation: float = 0.03,
                       cache: MaskCache | None = None, **load_kw) -> Callable[[np.ndarray], np.ndarray]:
    """A mask function for lung-crop presets: segment (cached), then dilate by ``dilation`` of the
    longer side (COVID-CXNet widens the lung box). Pass it to ``Preset.prepare(img, provider)``; a preset
    carries one as a picklable :class:`covidcxr.segment.maskspec.MaskSpec` (``preset.with_masks(spec)``).
    ``provider.id`` names segmenter and dilation."""
    seg = CachedSegmenter(load_segmenter(spec, **load_kw), cache)

    def provider(image: np.ndarray) -> np.ndarray:
        return dilate(seg(image), dilation)

    provider.segmenter = seg.segmenter  # type: ignore[attr-defined]
    provider.id = f"{seg.id}+dilate{dilation}"  # type: ignore[attr-defined]
    return provider

