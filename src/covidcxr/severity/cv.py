"""Monte-Carlo cross-validation over patients for the geographic-extent / opacity scores.

As COVID-Net S did, the scored images are split at random *by patient* into train and test sets
many times; every method sees the same splits:

* ``mean``     - trivial baseline: the training split's mean score for every test image;
* ``ridge``    - Cohen et al.'s approach: ridge regression (RidgeCV) on frozen penultimate
                 features of the COVID detector (``--init``), computed once;
* ``finetune`` - the network fine-tuned end to end (new 2-output head) for ``max_epochs`` epochs on
                 each split, no early stopping (the test split is never looked at during training).

Each split also gives the PROXY level accuracy (level2 = geographic extent >= threshold) obtained
from the predicted extent. Summaries are mean, SD, min/max over splits and a 95 % CI of the mean
with the Nadeau-Bengio correction for overlapping splits.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from covidcxr.overrides import with_overrides
from covidcxr.severity import labels as L_
from covidcxr.severity.labels import SCORES, SeverityError
from covidcxr.severity.metrics import corrected_t_interval, level_point, score_point
from covidcxr.severity.model import Initial, clamp_scores, feature_extractor, initial_model

log = logging.getLogger(__name__)

METHODS = ("mean", "ridge", "finetune")
#: metrics shown in the summary table, in order
TABLE_METRICS = [f"{s}_{m}" for s in SCORES for m in ("r2", "pearson_r", "mae", "rmse")] + [
    "level_proxy_accuracy", "level_proxy_balanced_accuracy"]


def mc_splits(patients: Sequence[str], n_splits: int, test_fraction: float, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n_splits`` random (train_idx, test_idx) splits with no patient on both sides."""
    from sklearn.model_selection import GroupShuffleSplit

    pats = np.asarray(patients, dtype=str)
    if len(np.unique(pats)) < 2:
        raise SeverityError("cross-validation needs images from at least 2 patients")
    gss = GroupShuffleSplit(n_splits=n_splits, test_size=test_fraction, random_state=seed)
    return list(gss.split(np.zeros(len(pats)), groups=pats))


def _metrics(y: np.ndarray, pred: np.ndarray, threshold: float) -> dict[str, float]:
    pred = clamp_scores(pred)
    m = score_point(y, pred)
    lp = level_point(L_.level_proxy(y[:, 0], threshold), L_.level_proxy(pred[:, 0], threshold))
    m["level_proxy_accuracy"] = lp["accuracy"]
    m["level_proxy_balanced_accuracy"] = lp["balanced_accuracy"]
    return m


def ridge_predict(f_tr: np.ndarray, y_tr: np.ndarray, f_te: np.ndarray) -> tuple[np.ndarray, float]:
    """Standardised features -> RidgeCV (alpha by efficient leave-one-out on the training split)."""
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pipe = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 5, 15)))
    pipe.fit(f_tr, y_tr)
    return pipe.predict(f_te), float(pipe[-1].alpha_)


def _summarise(values: np.ndarray, n_train: int, n_test: int) -> dict[str, Any]:
    """Mean, SD, min, max and corrected CI over splits, ignoring splits where the metric is undefined
    (e.g. Pearson r of the constant mean baseline)."""
    v = values[~np.isnan(values)]
    if not len(v):
        return {"mean": float("nan"), "sd": None, "min": None, "max": None, "n_defined": 0,
                "ci95_corrected": [float("nan"), float("nan")]}
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else None,
            "min": float(v.min()), "max": float(v.max()), "n_defined": int(len(v)),
            "ci95_corrected": corrected_t_interval(v, n_train, n_test)}


@dataclass(frozen=True)
class CVConfig:
    """How ``covidcxr severity cv`` cross-validates; :func:`cross_validate` takes one (or keyword overrides)."""

    # the starting network: a COVID detector checkpoint (init), else arch with weights (none | imagenet | catalogue
    # name | PATH); preset and size of its input (None: the detector's or the arch's default); images: the folder
    # the table's paths are relative to
    init: str | None = None
    arch: str = "resnet18"
    preset: str | None = None
    size: int | None = 128
    weights: str | None = None
    images: str | None = None
    # the splits: splits random patient-level train/test splits with test_fraction of the patients held out
    splits: int = 5
    test_fraction: float = 0.2
    # the methods compared on every split (METHODS: mean, ridge, finetune) and finetune's training
    methods: tuple[str, ...] = METHODS
    max_epochs: int = 5
    batch_size: int = 16
    lr: float = 1e-3
    freeze_epochs: int = 0
    augment: str = "light"
    seed: int = 0
    # the PROXY level: level2 when the geographic extent reaches this
    level_threshold: float = L_.PROXY_THRESHOLD


def cross_validate(data: str | os.PathLike, out: str | os.PathLike, config: CVConfig | None = None,
                   **overrides: Any) -> dict[str, Any]:
    """Run the CV; writes ``cv.json``, ``cv_splits.csv`` and ``cv_table.md`` to ``out``.

    ``config``: a :class:`CVConfig` (what each setting does); keyword ``overrides`` replace its fields.
    """
    c = with_overrides(CVConfig, config, overrides, where="cross_validate")
    init, arch, preset, size, weights, images = c.init, c.arch, c.preset, c.size, c.weights, c.images
    splits, test_fraction, methods, seed = c.splits, c.test_fraction, c.methods, c.seed
    level_threshold = c.level_threshold
    max_epochs, batch_size, lr, freeze_epochs, augment = c.max_epochs, c.batch_size, c.lr, c.freeze_epochs, c.augment
    import torch

    from covidcxr.severity.evaluate import DISCLAIMER, jsonable
    from covidcxr.severity.train import SeverityConfig, file_sha256, fit_model, prepare_images, run_model

    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SeverityError(f"unknown CV method(s) {sorted(unknown)}; known: {', '.join(METHODS)}")
    t0 = time.time()
    table = L_.load_table(data, images)
    df, y, _ = L_.select(table, "scores", "all")
    if len(df) < 4:
        raise SeverityError(f"{data}: cross-validation needs scored images; found {len(df)}")
    ini0 = initial_model("scores", init, arch, size, preset, weights)
    arrays, ok, bad = prepare_images(df, ini0.preset)
    df, y = df[ok].reset_index(drop=True), y[ok].astype(np.float64)
    feats = None
    if "ridge" in methods:
        feats = run_model(feature_extractor(ini0.model, ini0.arch), arrays, ini0.preset, batch_size=32)
    state0 = copy.deepcopy(ini0.model.state_dict())
    rows: list[dict[str, Any]] = []
    for k, (tr, te) in enumerate(mc_splits(df["patient_id"].tolist(), splits, test_fraction, seed)):
        base = {"split": k, "n_train": len(tr), "n_test": len(te),
                "n_train_patients": int(df["patient_id"].iloc[tr].nunique()),
                "n_test_patients": int(df["patient_id"].iloc[te].nunique())}
        if "mean" in methods:
            pred = np.tile(y[tr].mean(0), (len(te), 1))
            rows.append({**base, "method": "mean", **_metrics(y[te], pred, level_threshold)})
        if "ridge" in methods:
            pred, alpha = ridge_predict(feats[tr], y[tr], feats[te])
            rows.append({**base, "method": "ridge", "ridge_alpha": alpha, **_metrics(y[te], pred, level_threshold)})
        if "finetune" in methods:
            model = copy.deepcopy(ini0.model)
            model.load_state_dict(state0)
            ini = Initial(model=model, arch=ini0.arch, preset=ini0.preset, init=ini0.init)
            cfg = SeverityConfig(task="scores", data=str(data), out=str(out), max_epochs=max_epochs,
                                 batch_size=batch_size, lr=lr, freeze_epochs=freeze_epochs, augment=augment,
                                 seed=seed + k, val_fraction=0)
            t1 = time.time()
            fit_model(ini, "scores", [arrays[i] for i in tr], y[tr], [], np.zeros((0, 2)), cfg)
            pred = run_model(model, [arrays[i] for i in te], ini0.preset)
            rows.append({**base, "method": "finetune", "train_seconds": round(time.time() - t1, 1),
                         **_metrics(y[te], pred, level_threshold)})
        log.info("CV split %d/%d done (%.0f s)", k + 1, splits, time.time() - t0)
    per = pd.DataFrame(rows)
    n_te = float(per["n_test"].mean())
    n_tr = float(per["n_train"].mean())
    summary: dict[str, dict[str, Any]] = {}
    for m in [m for m in METHODS if m in methods]:
        sub = per[per["method"] == m]
        summary[m] = {}
        for col in TABLE_METRICS:
            summary[m][col] = _summarise(sub[col].to_numpy(float), int(n_tr), int(n_te))
    report = {
        "data": str(data), "data_sha256": file_sha256(data),
        "n_images": int(len(df)), "n_patients": int(df["patient_id"].nunique()),
        "splits": int(splits), "test_fraction": test_fraction, "seed": seed, "methods": list(methods),
        "arch": ini0.arch, "preset": ini0.preset.name, **ini0.init,
        "finetune": {"max_epochs": max_epochs, "batch_size": batch_size, "lr": lr, "freeze_epochs": freeze_epochs,
                     "augment": augment} if "finetune" in methods else None,
        "level_proxy": f"level2 = geographic_extent >= {level_threshold:g} (PROXY; see docs/severity.md)",
        "ci_note": "ci95_corrected: t-interval of the mean over splits with the Nadeau-Bengio variance correction",
        "skipped_files": bad, "seconds": round(time.time() - t0, 1), "torch_threads": torch.get_num_threads(),
        "summary": summary, "disclaimer": DISCLAIMER,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cv.json").write_text(json.dumps(jsonable(report), indent=2, default=str))
    per.to_csv(out / "cv_splits.csv", index=False)
    (out / "cv_table.md").write_text(markdown_table(summary))
    return report


def markdown_table(summary: dict[str, dict[str, Any]], metrics: Sequence[str] = TABLE_METRICS) -> str:
    """One row per metric, one column per method: mean ± SD [corrected 95 % CI] over the splits."""
    def cell(d: dict[str, Any]) -> str:
        if d["mean"] is None or not np.isfinite(d["mean"]):
            return "n/a"
        sd = f" ± {d['sd']:.3f}" if d.get("sd") is not None else ""
        lo, hi = d["ci95_corrected"]
        ci = f" [{lo:.3f}, {hi:.3f}]" if lo is not None and np.isfinite(lo) else ""
        return f"{d['mean']:.3f}{sd}{ci}"

    methods = list(summary)
    head = "| metric | " + " | ".join(methods) + " |\n|---|" + "---|" * len(methods) + "\n"
    return head + "".join(f"| {c} | " + " | ".join(cell(summary[m][c]) for m in methods) + " |\n" for c in metrics)
