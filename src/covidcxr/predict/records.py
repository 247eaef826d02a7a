"""Records and what a batch run reports at its end: counts per label and the failed inputs.

Also the few names every predict module shares (formerly in ``predict/rules.py``, whose decision
rule now lives in :mod:`covidcxr.decision`): ``PredictorError``, ``RESEARCH_NOTICE``, ``jsonable``.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

RESEARCH_NOTICE = (
    "For research use only. Not a medical device; not validated for clinical use. "
    "Do not use for diagnosis or patient management."
)


class PredictorError(RuntimeError):
    """A model file cannot serve predictions (wrong format, missing metadata, wrong task)."""


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

#: keys that hold arrays for heatmaps/severity inside a run; never written out
TRANSIENT_KEYS = ("tensor", "tensors", "heat")


def strip_transient(rec: dict[str, Any]) -> dict[str, Any]:
    """The record without its in-memory arrays (what writers and the service return)."""
    for k in TRANSIENT_KEYS:
        rec.pop(k, None)
    return rec


@dataclass
class Summary:
    """Counts per label and the failed files, for the end of a batch run."""

    total: int = 0
    labels: Counter = field(default_factory=Counter)
    failures: list[tuple[str, str]] = field(default_factory=list)

    def add(self, rec: dict[str, Any]) -> None:
        self.total += 1
        if rec.get("error"):
            self.failures.append((rec["path"], rec["error"]))
        else:
            self.labels[rec["label"]] += 1

    @property
    def ok(self) -> int:
        return self.total - len(self.failures)

    def lines(self, max_failures: int = 20) -> list[str]:
        by_label = ", ".join(f"{k}: {v}" for k, v in sorted(self.labels.items())) or "none"
        out = [f"{self.total} inputs: {self.ok} predicted ({by_label}), {len(self.failures)} failed"]
        for path, err in self.failures[:max_failures]:
            out.append(f"  FAILED {path}: {err}")
        if len(self.failures) > max_failures:
            out.append(f"  ... and {len(self.failures) - max_failures} more failures (see the output file)")
        return out
