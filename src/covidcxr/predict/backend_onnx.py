"""onnxruntime backend and the covidcxr metadata of exported ONNX files. Never imports torch.

Session settings (chosen by measurement, see docs/benchmarks.md "ONNX Runtime settings"): graph
optimisation ``ORT_ENABLE_ALL``, sequential execution, ``inter_op=1``, ``intra_op=threads`` (default:
onnxruntime's own choice, one per physical core).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from covidcxr.io import file_sha256  # noqa: F401  (re-exported: covidcxr.predict.file_sha256)
from covidcxr.predict.records import PredictorError

#: ONNX metadata_props keys written by covidcxr.export (values are JSON).
ONNX_META_PREFIX = "covidcxr."
GRAPH_OPT_LEVELS = ("disable", "basic", "extended", "all")


def session_options(threads: int | None = None, graph_opt: str = "all") -> Any:
    """onnxruntime SessionOptions as covidcxr uses them everywhere (service, CLI, benchmarks, Ray actors)."""
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if graph_opt not in levels:
        raise PredictorError(f"unknown ONNX graph optimisation level {graph_opt!r}; choose {', '.join(levels)}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = levels[graph_opt]
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return opts


class OnnxBackend:
    name = "onnx"

    def __init__(self, path: str, threads: int | None = None, graph_opt: str = "all"):
        import onnxruntime as ort

        try:
            self.session = ort.InferenceSession(path, sess_options=session_options(threads, graph_opt),
                                                providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own (unexported) exception types
            raise PredictorError(f"{path}: cannot load ONNX model ({type(err).__name__}: {err})") from None
        self.input_name = self.session.get_inputs()[0].name
        outputs = [o.name for o in self.session.get_outputs()]
        self.output_name = "logits" if "logits" in outputs else outputs[0]
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def logits(self, batch: Any) -> np.ndarray:
        """N x C x H x W (NumPy array, or anything with ``.numpy()``) -> N x classes float32 logits."""
        x = batch.numpy() if hasattr(batch, "numpy") and not isinstance(batch, np.ndarray) else batch
        x = np.ascontiguousarray(x, dtype=np.float32)
        return np.asarray(self.session.run([self.output_name], {self.input_name: x})[0], dtype=np.float32)


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The covidcxr metadata stored in an ONNX file's metadata_props, JSON-decoded."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:
        raise PredictorError(f"{path}: not a readable ONNX file ({type(err).__name__}: {err})") from None
    return decode_meta({p.key: p.value for p in model.metadata_props}, path)


def decode_meta(props: dict[str, str], path: str | os.PathLike) -> dict[str, Any]:
    """``covidcxr.*`` metadata_props -> {key: JSON value}; PredictorError when preset or classes are missing."""
    meta = {}
    for key, value in props.items():
        if key.startswith(ONNX_META_PREFIX):
            try:
                meta[key[len(ONNX_META_PREFIX) :]] = json.loads(value)
            except json.JSONDecodeError:
                meta[key[len(ONNX_META_PREFIX) :]] = value
    if "preset" not in meta or "classes" not in meta:
        raise PredictorError(
            f"{path}: ONNX file has no covidcxr metadata (preset, classes); export it with `covidcxr export`"
        )
    return meta
