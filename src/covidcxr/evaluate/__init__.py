"""Evaluation: metrics with patient-bootstrap CIs, curves, calibration, the report, model comparison.

    >>> from covidcxr.evaluate import evaluate_checkpoint, compare
    >>> evaluate_checkpoint("run/best.ckpt", "data/manifest.csv", split="test", out="report")

The metric functions work on plain arrays (labels, N x K probabilities, patient ids), so they
serve any predictor.
"""

from __future__ import annotations

from covidcxr.evaluate.compare import compare, count_macs, cpu_latency_ms
from covidcxr.evaluate.core import (
    SPLIT_CHOICES, EvaluateConfig, evaluate_checkpoint, evaluate_predictions, select_split,
)
from covidcxr.evaluate.groups import group_report, group_table, non_dominant_specificity, worst_group_sensitivity
from covidcxr.evaluate.metrics import (
    MetricsError,
    apply_temperature,
    compute_metrics,
    expected_calibration_error,
    fit_temperature,
    group_breakdown,
    predict_labels,
    weighted_ap,
    weighted_auc,
)
from covidcxr.evaluate.report import write_report

__all__ = [
    "SPLIT_CHOICES",
    "MetricsError",
    "apply_temperature",
    "compare",
    "compute_metrics",
    "count_macs",
    "cpu_latency_ms",
    "EvaluateConfig",
    "evaluate_checkpoint",
    "evaluate_predictions",
    "expected_calibration_error",
    "fit_temperature",
    "group_breakdown",
    "group_report",
    "group_table",
    "non_dominant_specificity",
    "worst_group_sensitivity",
    "predict_labels",
    "select_split",
    "weighted_ap",
    "weighted_auc",
    "write_report",
]
