"""The old home of segmenter loading, the mask cache, the lung crop and the batch mask writer.

Each role now has its own module: :mod:`~covidcxr.segment.segmenter` (the network with its input
convention), :mod:`~covidcxr.segment.loading` (by name or path, torch or onnxruntime),
:mod:`~covidcxr.segment.maskcache`, :mod:`~covidcxr.segment.lungcrop` and :mod:`~covidcxr.segment.writer`.
These names stay importable from here so that saved scripts keep working; new code imports the role modules.
"""

from __future__ import annotations

from covidcxr.segment.loading import (  # noqa: F401
    ENV_MODEL, FORMAT, PRETRAINED, PRETRAINED_SHA256, NoTorchFreeSegmenter, cache_dir, default_segmenter,
    export_onnx, load_segmenter, onnx_file,
)
from covidcxr.segment.lungcrop import lung_crop_provider  # noqa: F401
from covidcxr.segment.maskcache import CachedSegmenter, MaskCache, image_hash  # noqa: F401
from covidcxr.segment.segmenter import LungSegmenter  # noqa: F401
from covidcxr.segment.writer import predict_files, predict_masks  # noqa: F401
