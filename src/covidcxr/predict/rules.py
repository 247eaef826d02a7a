"""The decision rule shared by every tool: calibrated softmax, then the COVID-19 operating threshold.

Torch-free on purpose: the ONNX paths (service, DICOM node, Ray actors) import this without torch.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Sequence

import numpy as np

from covidcxr.decision import POSITIVE_CLASS, DecisionRule  # noqa: F401  (re-exported)
RESEARCH_NOTICE = (
    "For research use only. Not a medical device; not validated for clinical use. "
    "Do not use for diagnosis or patient management."
)


class PredictorError(RuntimeError):
    """A model file cannot serve predictions (wrong format, missing metadata, wrong task)."""


def softmax_with_temperature(logits: Any, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` in float64 (stable), returned as float64."""
    if hasattr(logits, "detach"):  # a torch tensor (tests and callers holding torch outputs)
        logits = logits.detach().float().cpu().numpy()
    z = np.asarray(logits, dtype=np.float64) / float(temperature or 1.0)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def decide_label(probs: Sequence[float], classes: Sequence[str], threshold: float | None) -> str:
    """COVID-19 when its probability reaches ``threshold``, else argmax of the other classes.

    The rule itself lives in :mod:`covidcxr.decision`, shared with evaluate, compare and explain.
    """
    return DecisionRule(threshold, POSITIVE_CLASS).label(probs, classes)


def jsonable(obj: Any) -> Any:
    """Round-trip through JSON, turning tensors/arrays/paths/numpy scalars into plain values."""

    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        torch = sys.modules.get("torch")  # never import torch just to recognise its tensors
        if isinstance(o, np.ndarray) or (torch is not None and isinstance(o, torch.Tensor)):
            return np.asarray(o).tolist()
        return str(o)

    return json.loads(json.dumps(obj, default=default))
