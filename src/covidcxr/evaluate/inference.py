"""Batch probabilities for the rows of a manifest, through the one :class:`covidcxr.predict.Predictor`.

Evaluation, the CLI and the service therefore share preprocessing, temperature and threshold
handling. Unreadable images do not stop a run: they come back in ``failures`` and are left out
of the metrics (the report lists them).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


@dataclass
class Predictions:
    """Probabilities for the readable rows of ``frame`` (same order), and the rows that failed."""

    frame: pd.DataFrame
    probs: np.ndarray
    failures: list[dict[str, str]] = field(default_factory=list)


def predict_frame(predictor: Any, frame: pd.DataFrame, *, batch_size: int = 16, num_workers: int = 0,
                  progress: bool = False) -> Predictions:
    """Class probabilities (N x K, calibrated with the model's temperature) for every row of ``frame``.

    ``predictor`` is a :class:`covidcxr.predict.Predictor` (or anything with its ``classes`` and
    ``predict_paths``); ``frame`` needs a ``path`` column.
    """
    paths = [str(p) for p in frame["path"]]
    classes = list(predictor.classes)
    probs = np.full((len(paths), len(classes)), np.nan, dtype=np.float64)
    failures: list[dict[str, str]] = []
    recs = predictor.predict_paths(paths, batch_size=batch_size, num_workers=num_workers, progress=progress)
    n = 0
    for i, rec in enumerate(recs):
        n += 1
        if rec.get("error"):
            err = str(rec["error"])
            failures.append({"path": str(rec.get("path", paths[i])), "error": err if paths[i] in err else f"{paths[i]}: {err}"})
            log.warning("skipped %s", failures[-1]["error"])
            continue
        probs[i] = [rec["probabilities"][c] for c in classes]
    if n != len(paths):
        raise RuntimeError(f"predictor returned {n} records for {len(paths)} paths")
    ok = ~np.isnan(probs).any(1)
    return Predictions(frame=frame[ok].reset_index(drop=True), probs=probs[ok], failures=failures)
