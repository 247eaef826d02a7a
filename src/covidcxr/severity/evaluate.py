"""``severity evaluate``: metrics of a severity checkpoint on a labelled set, with patient-bootstrap CIs."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidcxr.severity import labels as L_
from covidcxr.severity.labels import SCORES, SeverityError
from covidcxr.severity.metrics import level_metrics, score_metrics
from covidcxr.severity.model import SeverityModel

log = logging.getLogger(__name__)

DISCLAIMER = "Research use only; not for clinical use. Figures hold for this data set and split only."


def jsonable(obj: Any) -> Any:
    """NaN/inf -> None and numpy scalars -> Python, so metrics.json is strict JSON."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _level_threshold_of(sev: SeverityModel) -> float:
    """The PROXY threshold the checkpoint was trained with, so evaluation uses the same definition."""
    tr = sev.meta.get("training", {})
    return float(tr.get("level_threshold") or L_.PROXY_THRESHOLD)


def evaluate_severity(
    model: str | os.PathLike,
    data: str | os.PathLike,
    split: str = "test",
    out: str | os.PathLike | None = None,
    images: str | os.PathLike | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    batch_size: int = 32,
    level_source: str | None = None,
    level_threshold: float | None = None,
) -> dict[str, Any]:
    """Evaluate a ``severity-level`` or ``severity-scores`` checkpoint on ``split`` of ``data``.

    Writes ``metrics.json`` and ``predictions.csv`` to ``out`` when given. Level targets are the
    data's ``severity_level`` labels when it has any, else the PROXY (geographic extent >= the
    checkpoint's threshold); ``level_source`` ("column" | "proxy") forces one.
    """
    from covidcxr.severity.train import outputs_to_predictions, prepare_images, run_model

    sev = SeverityModel.from_path(model)
    task = "level" if sev.task == "severity-level" else "scores"
    # real severity_level labels when the data has them, else the PROXY at the checkpoint's threshold
    src = level_source or "auto"
    thr = float(level_threshold) if level_threshold is not None else _level_threshold_of(sev)
    table = L_.load_table(data, images)
    df, y, target_desc = L_.select(table, task, split, src, thr)
    if len(df) == 0:
        raise SeverityError(f"{data}: no rows with {task} labels in split {split!r}")
    arrays, ok, bad = prepare_images(df, sev.preset)
    if not arrays:
        raise SeverityError(f"{data}: none of the {len(df)} images could be read")
    df, y = df[ok].reset_index(drop=True), y[ok]
    pred = outputs_to_predictions(task, run_model(sev.model, arrays, sev.preset, batch_size))
    pats = df["patient_id"].tolist()
    training = sev.meta.get("training", {})
    report: dict[str, Any] = {
        "task": sev.task,
        "model": str(model),
        "data": str(data),
        "split": split,
        "targets": target_desc,
        "preset": sev.preset.name,
        "n_images": int(len(df)),
        "n_patients": int(df["patient_id"].nunique()),
        "skipped_files": bad,
        "disclaimer": DISCLAIMER,
    }
    if task == "level":
        names = L_.level_classes(target_desc)  # proxy-level1/2 for proxy targets, never CXR-S's names
        if target_desc.startswith("proxy"):
            report["note"] = (f"PROXY levels: proxy-level2 = geographic_extent >= {thr:g} (see docs/severity.md). "
                              + L_.PROXY_NOTE)
        if L_.level_classes(target_desc) != L_.level_classes(str(training.get("targets", target_desc))):
            report["target_mismatch"] = (f"the model was trained on {training.get('targets')!r} targets and is "
                                         f"evaluated on {target_desc!r}")
        report["level"] = level_metrics(y, pred, pats, n_boot, seed, classes=names)
        counts = training.get("train_counts")
        if counts:  # trivial baseline: always the training set's majority level (counts in logit order)
            major = int(np.argmax(list(counts.values())))
            report["baseline_majority"] = {"level": names[major],
                                           **level_metrics(y, np.full(len(y), major), pats, n_boot, seed,
                                                           classes=names)}
        out_cols = {f"prob_{c}": pred[:, i] for i, c in enumerate(names)}
        out_cols.update({"true_level": [names[i] for i in y], "pred_level": [names[i] for i in pred.argmax(1)]})
    else:
        report["scores"] = score_metrics(y, pred, pats, n_boot, seed)
        mean = training.get("train_mean")
        if mean:  # trivial baseline: the training set's mean score for every image
            base = np.tile([mean[s] for s in SCORES], (len(y), 1))
            report["baseline_train_mean"] = {"train_mean": mean, **score_metrics(y, base, pats, n_boot, seed)}
        # PROXY level from the predicted extent, so score models can be compared with level models
        yl, pl = L_.level_proxy(y[:, 0], thr), L_.level_proxy(pred[:, 0], thr)
        report["level_proxy_from_scores"] = {
            "definition": f"proxy-level2 = geographic_extent >= {thr:g} (PROXY; see docs/severity.md)",
            "note": L_.PROXY_NOTE,
            **level_metrics(yl, pl, pats, n_boot, seed),
        }
        out_cols = {}
        for i, s in enumerate(SCORES):
            out_cols[f"true_{s}"] = y[:, i]
            out_cols[f"pred_{s}"] = pred[:, i]
    # per-source figures (no CIs): sources differ in acquisition and in how images were chosen
    if df["source"].nunique() > 1:
        from covidcxr.severity.metrics import level_point, score_point

        by = {}
        for src_name, idx in df.groupby("source").indices.items():
            pt = level_point(y[idx], pred[idx].argmax(1)) if task == "level" else score_point(y[idx], pred[idx])
            by[str(src_name)] = {"n_images": int(len(idx)), **pt}
        report["by_source"] = by
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(jsonable(report), indent=2, default=str))
        pd.DataFrame({"path": df["path"], "patient_id": df["patient_id"], **out_cols}).to_csv(
            out / "predictions.csv", index=False)
    return report
