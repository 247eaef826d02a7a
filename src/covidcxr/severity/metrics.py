"""Severity metrics with bootstrap confidence intervals over patients.

Point estimates use plain numpy formulas (checked against scikit-learn / scipy in the tests) so that
1000 bootstrap resamples stay fast. Resampling draws *patients* with replacement and keeps all of
a patient's images together: images of one patient are not independent.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from covidcxr.severity.labels import LEVELS, SCORES


# ----------------------------------------------------------------------------- point estimates
def mae(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean(np.abs(np.asarray(y, float) - np.asarray(p, float))))


def rmse(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(y, float) - np.asarray(p, float)) ** 2)))


def r2(y: np.ndarray, p: np.ndarray) -> float:
    """Coefficient of determination (as sklearn.metrics.r2_score); NaN when y is constant."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    if ss_tot == 0.0:
        return float("nan")
    return 1.0 - float(np.sum((y - p) ** 2)) / ss_tot


def pearson(y: np.ndarray, p: np.ndarray) -> float:
    """Pearson correlation; NaN when either side is constant."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    if len(y) < 2 or _constant(y) or _constant(p):  # rounding noise must not pass for a correlation
        return float("nan")
    yc, pc = y - y.mean(), p - p.mean()
    return float(np.sum(yc * pc) / np.sqrt(np.sum(yc**2) * np.sum(pc**2)))


def _constant(v: np.ndarray) -> bool:
    return bool(np.ptp(v) <= 1e-9 * max(1.0, float(np.max(np.abs(v)))))


def confusion(y: np.ndarray, pred: np.ndarray, n: int = 2) -> np.ndarray:
    """n x n counts, rows = true class, columns = predicted class."""
    y, pred = np.asarray(y, int), np.asarray(pred, int)
    return np.bincount(y * n + pred, minlength=n * n).reshape(n, n)


def _safe_div(a: float, b: float) -> float:
    return float(a) / float(b) if b else float("nan")


def level_point(y: np.ndarray, pred: np.ndarray, classes: Sequence[str] = LEVELS) -> dict[str, float]:
    """Accuracy, balanced accuracy, and per-level sensitivity (recall) and PPV (precision)."""
    cm = confusion(y, pred, len(classes))
    out = {"accuracy": _safe_div(np.trace(cm), cm.sum())}
    sens = []
    for i, c in enumerate(classes):
        out[f"sensitivity_{c}"] = _safe_div(cm[i, i], cm[i, :].sum())
        out[f"ppv_{c}"] = _safe_div(cm[i, i], cm[:, i].sum())
        sens.append(out[f"sensitivity_{c}"])
    out["balanced_accuracy"] = float(np.nanmean(sens)) if not np.all(np.isnan(sens)) else float("nan")
    return out


def score_point(y: np.ndarray, p: np.ndarray, names: Sequence[str] = SCORES) -> dict[str, float]:
    """MAE, RMSE, R^2 and Pearson r for each score column."""
    y, p = np.atleast_2d(np.asarray(y, float)), np.atleast_2d(np.asarray(p, float))
    out: dict[str, float] = {}
    for j, n in enumerate(names):
        out[f"{n}_mae"] = mae(y[:, j], p[:, j])
        out[f"{n}_rmse"] = rmse(y[:, j], p[:, j])
        out[f"{n}_r2"] = r2(y[:, j], p[:, j])
        out[f"{n}_pearson_r"] = pearson(y[:, j], p[:, j])
    return out


# ----------------------------------------------------------------------------- bootstrap
def patient_bootstrap(
    stat: Callable[[np.ndarray], dict[str, float]],
    patients: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, list[float]]:
    """Percentile CIs of every value ``stat(indices)`` returns, resampling patients with replacement.

    Resamples where a metric is undefined (NaN, e.g. no level2 image drawn) are left out of that
    metric's interval.
    """
    pats = np.asarray([str(p) for p in patients])
    uniq, inv = np.unique(pats, return_inverse=True)
    groups = [np.flatnonzero(inv == k) for k in range(len(uniq))]
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(int(n_boot)):
        pick = rng.integers(0, len(groups), len(groups))
        idx = np.concatenate([groups[k] for k in pick])
        for k, v in stat(idx).items():
            draws.setdefault(k, []).append(v)
    ci = {}
    for k, vals in draws.items():
        a = np.asarray(vals, float)
        a = a[~np.isnan(a)]
        ci[k] = [float(np.percentile(a, 100 * alpha / 2)), float(np.percentile(a, 100 * (1 - alpha / 2)))] if len(a) else [float("nan")] * 2
    return ci


def _with_ci(point: dict[str, float], ci: dict[str, list[float]]) -> dict[str, dict]:
    return {k: {"value": v, "ci95": ci.get(k, [float("nan")] * 2)} for k, v in point.items()}


def level_metrics(
    y: np.ndarray, prob: np.ndarray, patients: Sequence[str], n_boot: int = 1000, seed: int = 0,
    classes: Sequence[str] = LEVELS,
) -> dict:
    """Level metrics with patient-bootstrap 95 % CIs, plus the confusion matrix.

    ``prob``: N x 2 probabilities (or N predicted class indices).
    """
    y = np.asarray(y, int)
    prob = np.asarray(prob, float)
    pred = prob.argmax(1) if prob.ndim == 2 else prob.astype(int)
    point = level_point(y, pred, classes)
    ci = patient_bootstrap(lambda i: level_point(y[i], pred[i], classes), patients, n_boot, seed) if n_boot else {}
    cm = confusion(y, pred, len(classes))
    return {
        "metrics": _with_ci(point, ci),
        "confusion_matrix": {"rows_true_cols_pred": list(classes), "counts": cm.tolist()},
        "support": {c: int((y == i).sum()) for i, c in enumerate(classes)},
        "n_images": int(len(y)),
        "n_patients": int(len(set(map(str, patients)))),
        "bootstrap": {"n": int(n_boot), "seed": int(seed), "unit": "patient", "interval": "percentile 95%"},
    }


def score_metrics(
    y: np.ndarray, pred: np.ndarray, patients: Sequence[str], n_boot: int = 1000, seed: int = 0,
    names: Sequence[str] = SCORES,
) -> dict:
    """Per-score MAE, RMSE, R^2 and Pearson r with patient-bootstrap 95 % CIs."""
    y, pred = np.asarray(y, float), np.asarray(pred, float)
    point = score_point(y, pred, names)
    ci = patient_bootstrap(lambda i: score_point(y[i], pred[i], names), patients, n_boot, seed) if n_boot else {}
    return {
        "metrics": _with_ci(point, ci),
        "n_images": int(len(y)),
        "n_patients": int(len(set(map(str, patients)))),
        "bootstrap": {"n": int(n_boot), "seed": int(seed), "unit": "patient", "interval": "percentile 95%"},
    }


def corrected_t_interval(values: Sequence[float], n_train: int, n_test: int, alpha: float = 0.05) -> list[float]:
    """95 % CI of a Monte-Carlo cross-validation mean with the Nadeau-Bengio correction.

    Random train/test splits overlap, so the naive t-interval is too narrow; the corrected variance
    is ``(1/k + n_test/n_train) * s^2`` (Nadeau & Bengio 2003, Machine Learning 52:239).
    """
    from scipy import stats

    v = np.asarray([x for x in values if not np.isnan(x)], float)
    k = len(v)
    if k < 2:
        return [float("nan"), float("nan")]
    se = np.sqrt((1.0 / k + n_test / max(n_train, 1)) * v.var(ddof=1))
    t = stats.t.ppf(1 - alpha / 2, k - 1)
    return [float(v.mean() - t * se), float(v.mean() + t * se)]
