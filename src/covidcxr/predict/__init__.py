"""Prediction: one :class:`Predictor` core for the CLI, the REST service, the DICOM node and Ray actors.

::

    p = Predictor.from_path("run/best.ckpt")            # or "model.onnx" (then torch is never imported)
    p.predict_arrays([covidcxr.io.read_image("x.png")])  # -> [{"label": ..., "probabilities": {...}}]
    for rec in p.predict_paths(["folder/", "manifest.csv"], batch_size=16, num_workers=2):
        ...

Modules, one concern each (none imports torch at import time; none imports FastAPI or Ray):

* :mod:`covidcxr.decision` (not in this package: evaluate uses it too) temperature softmax, the decision rule
* :mod:`.inputs`         files/folders/manifests -> paths; decode + preprocess in worker processes
* :mod:`.backend_torch`  PyTorch eager backend (imported only for checkpoints)
* :mod:`.backend_onnx`   onnxruntime backend, session options, ONNX metadata
* :mod:`.core`           :class:`Predictor`
* :mod:`.heatmap`        Grad-CAM overlays (torch backend)
* :mod:`.severity`       severity scorer gated by the operating threshold
* :mod:`.records`        ``PredictorError``, ``jsonable``, :class:`Summary` of a batch run
* :mod:`.gate`           the plausibility gate: applies :mod:`covidcxr.segment.plausibility`'s check to records
* :mod:`.writers`        JSONL/CSV record writers

The label rule: with a threshold ``t`` for COVID-19, an image is COVID-19 when its COVID-19
probability is at least ``t``; otherwise it gets the most likely of the other classes.
Without a threshold the label is the argmax.
"""

from covidcxr.predict.backend_onnx import (
    ONNX_META_PREFIX,
    OnnxBackend,
    decode_meta,
    file_sha256,
    read_onnx_metadata,
    session_options,
)
from covidcxr.predict.core import Predictor
from covidcxr.predict.heatmap import HeatmapUnavailable, Heatmapper, heat_rgba, overlay_rgb
from covidcxr.predict.inputs import Item, Loader, collect_inputs, iter_batches
from covidcxr.decision import POSITIVE_CLASS, decide_label, softmax_with_temperature
from covidcxr.predict.records import RESEARCH_NOTICE, PredictorError, Summary, jsonable, strip_transient
from covidcxr.predict.severity import SeverityScorer, SeverityUnavailable
from covidcxr.predict.writers import RecordWriter

__all__ = [
    "ONNX_META_PREFIX", "POSITIVE_CLASS", "RESEARCH_NOTICE", "HeatmapUnavailable", "Heatmapper", "Item", "Loader",
    "OnnxBackend", "Predictor", "PredictorError", "RecordWriter", "SeverityScorer", "SeverityUnavailable", "Summary",
    "collect_inputs", "decide_label", "decode_meta", "file_sha256", "heat_rgba", "iter_batches", "jsonable",
    "overlay_rgb", "read_onnx_metadata", "session_options", "softmax_with_temperature", "strip_transient",
]
