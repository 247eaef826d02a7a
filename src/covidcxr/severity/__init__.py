"""COVID-19 severity: COVID-Net CXR-S levels and COVID-Net S geographic-extent / opacity scores.

    >>> from covidcxr.severity import SeverityModel
    >>> sev = SeverityModel.from_path("runs/sev/best.ckpt")
    >>> sev.predict_arrays([image])      # or sev.predict_tensor(batch preprocessed with sev.preset)

Training, evaluation and cross-validation (``train_severity``, ``evaluate_severity``,
``cross_validate``) are imported on first use, so inference does not pull in Lightning.
Research use only; not for clinical use.
"""

from __future__ import annotations

from typing import Any

from covidcxr.severity.labels import (
    LEVELS,
    PROXY_THRESHOLD,
    SCORE_MAX,
    SCORES,
    SeverityError,
    level_proxy,
    load_table,
    read_covidxsev,
    read_manifest_severity,
    read_severity_csv,
)
from covidcxr.severity.metrics import level_metrics, score_metrics
from covidcxr.severity.model import SeverityModel, clamp_scores

_LAZY = {
    "train_severity": "covidcxr.severity.train",
    "SeverityConfig": "covidcxr.severity.train",
    "evaluate_severity": "covidcxr.severity.evaluate",
    "cross_validate": "covidcxr.severity.cv",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'covidcxr.severity' has no attribute {name!r}")


__all__ = [
    "LEVELS", "PROXY_THRESHOLD", "SCORES", "SCORE_MAX", "SeverityError", "SeverityModel", "SeverityConfig",
    "clamp_scores", "cross_validate", "evaluate_severity", "level_metrics", "level_proxy", "load_table",
    "read_covidxsev", "read_manifest_severity", "read_severity_csv", "score_metrics", "train_severity",
]
