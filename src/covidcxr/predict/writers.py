"""Record writers: JSON lines or CSV, chosen by the output file's suffix (stdout: JSON lines)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import IO, Any, Sequence

#: CSV columns before/after the per-class probabilities
CSV_HEAD = ["path", "label"]
CSV_TAIL = ["threshold", "decision_rule", "flag", "plausibility", "plausibility_reason", "prediction_set", "severity",
            "heatmap", "model_sha256", "error"]


def output_format(path: str | None) -> str:
    return "csv" if path and path.lower().endswith(".csv") else "jsonl"


def csv_row(rec: dict[str, Any], classes: Sequence[str]) -> dict[str, Any]:
    """A record flattened to the CSV columns (probabilities as p_<class>, severity as JSON)."""
    row = {k: rec.get(k) for k in (*CSV_HEAD, "threshold", "decision_rule", "flag", "heatmap", "error")}
    plaus = rec.get("plausibility") or {}
    row["plausibility"], row["plausibility_reason"] = plaus.get("verdict"), plaus.get("reason")
    for c in classes:
        row[f"p_{c}"] = (rec.get("probabilities") or {}).get(c)
    sev = rec.get("severity")
    row["severity"] = json.dumps(sev, default=str) if sev is not None else None
    pset = rec.get("prediction_set")  # site-calibrated models only: the conformal set, ';'-separated
    row["prediction_set"] = ";".join(pset) if pset is not None else None
    row["model_sha256"] = (rec.get("model") or {}).get("sha256")
    return row


class RecordWriter:
    """Streams records as JSON lines or CSV (by the output file's suffix); flushes after each record."""

    def __init__(self, out: str | None, classes: Sequence[str]):
        self.classes = list(classes)
        self.path = out
        self.fmt = output_format(out)
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
        self.fh: IO[str] = open(out, "w", newline="", encoding="utf-8") if out else sys.stdout
        self.csv = None
        if self.fmt == "csv":
            cols = [*CSV_HEAD, *[f"p_{c}" for c in self.classes], *CSV_TAIL]
            self.csv = csv.DictWriter(self.fh, fieldnames=cols, extrasaction="ignore")
            self.csv.writeheader()

    def write(self, rec: dict[str, Any]) -> None:
        if self.csv is None:
            self.fh.write(json.dumps(rec, default=str) + "\n")
        else:
            self.csv.writerow(csv_row(rec, self.classes))
        self.fh.flush()

    def close(self) -> None:
        if self.fh is not sys.stdout:
            self.fh.close()

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
