"""What a batch run reports at its end: counts per label and the failed inputs."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

#: keys that hold arrays for heatmaps/severity inside a run; never written out
TRANSIENT_KEYS = ("tensor", "tensors")


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
