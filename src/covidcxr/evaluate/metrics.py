"""Classification metrics with 95% confidence intervals from a bootstrap over PATIENTS.

Images of one patient are correlated, so resampling images would give intervals that are too
narrow. Every bootstrap replicate draws patients with replacement and weights each image by how
often its patient was drawn. The draw is stratified by class (patients are resampled among those with
the same true class), so every replicate holds every class: with 3 COVID-19 patients in 60, an
unstratified replicate lacks COVID-19 about 5% of the time and the CI silently rests on the rest. Each
figure reports ``n_replicates``, the replicates its CI rests on, and ``ci_method``. Count-based figures (accuracy, sensitivity, ...) are computed for all
replicates at once from per-patient confusion matrices; AUC and AP use scikit-learn with
``sample_weight``.

Every figure is a dict ``{"value", "ci_low", "ci_high", "n_images", "n_patients", "n_replicates",
"ci_method"}`` where the
counts are the images/patients in the figure's denominator (e.g. the COVID-19 images for
COVID-19 sensitivity).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

DEFAULT_THRESHOLDS = tuple(round(0.1 * i, 1) for i in range(1, 10))


class MetricsError(ValueError):
    """Inputs to the metric functions are inconsistent (shapes, labels, classes)."""


# --------------------------------------------------------------------------- helpers


def _check(y_true: Sequence[int], probs: np.ndarray, patients: Sequence[Any], classes: Sequence[str]):
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    pat = np.asarray([str(x) for x in patients])
    k = len(classes)
    if p.ndim != 2 or p.shape[1] != k:
        raise MetricsError(f"probabilities must be N x {k} (one column per class {list(classes)}), got {p.shape}")
    if not (len(y) == len(p) == len(pat)):
        raise MetricsError(f"lengths differ: {len(y)} labels, {len(p)} probability rows, {len(pat)} patient ids")
    if len(y) == 0:
        raise MetricsError("no predictions to evaluate (empty split?)")
    if y.min() < 0 or y.max() >= k:
        raise MetricsError(f"labels must be class indices 0..{k - 1}, got range {y.min()}..{y.max()}")
    if not np.all(np.isfinite(p)):
        raise MetricsError("probabilities contain NaN or inf")
    return y, p, pat


def predict_labels(probs: np.ndarray, threshold: float | None = None, positive: int | None = None) -> np.ndarray:
    """Argmax, or: ``positive`` when its probability reaches ``threshold``, else argmax over the rest.

    The rule is :class:`covidcxr.decision.DecisionRule`, the one every tool labels with.
    """
    from covidcxr.decision import DecisionRule

    probs = np.asarray(probs, dtype=np.float64)
    names = [str(i) for i in range(probs.shape[1])]
    if threshold is None or positive is None:
        return DecisionRule(None).label_indices(probs, names)
    return DecisionRule(float(threshold), names[positive]).label_indices(probs, names)


def patient_strata(y: np.ndarray, pat_index: np.ndarray, n_pat: int) -> np.ndarray:
    """One stratum id per patient: the set of true classes among the patient's images.

    Resampling patients within these strata keeps every class's patient count in every replicate, so
    no replicate lacks a class (a rare class's figures are no longer computed on a subset of replicates).
    """
    k = int(y.max()) + 1 if len(y) else 1
    has = np.zeros((n_pat, k), dtype=bool)
    has[pat_index, y] = True
    _, strata = np.unique(has, axis=0, return_inverse=True)
    return np.asarray(strata).ravel()


def _bootstrap_weights(pat_index: np.ndarray, n_pat: int, n_boot: int, seed: int,
                       strata: np.ndarray | None = None) -> np.ndarray:
    """B x N image weights: how many times each image's patient was drawn in replicate b.

    With ``strata`` (one id per patient) each stratum's patients are drawn with replacement among
    themselves, as many as it holds (a stratified patient bootstrap); without, from all patients.
    """
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_boot, n_pat), dtype=np.float64)
    groups = [np.arange(n_pat)] if strata is None else [np.nonzero(strata == s)[0] for s in np.unique(strata)]
    rows = np.arange(n_boot)
    for members in groups:
        draws = members[rng.integers(0, len(members), size=(n_boot, len(members)))]
        np.add.at(counts, (np.repeat(rows, len(members)), draws.ravel()), 1.0)
    return counts[:, pat_index]


def _ci(samples: np.ndarray, level: float) -> tuple[float, float]:
    s = np.asarray(samples, dtype=np.float64)
    s = s[np.isfinite(s)]
    if len(s) == 0:
        return (math.nan, math.nan)
    a = (1.0 - level) / 2.0
    return float(np.quantile(s, a)), float(np.quantile(s, 1.0 - a))


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact binomial interval for k successes in n trials."""
    from scipy.stats import beta

    a = (1.0 - level) / 2.0
    lo = 0.0 if k <= 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k >= n else float(beta.ppf(1.0 - a, k + 1, n - k))
    return lo, hi


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _fig(value: float, boots: np.ndarray, level: float, n_images: int, n_patients: int,
         proportion: bool = False, **extra: Any) -> dict:
    """One figure with its percentile-bootstrap CI and ``n_replicates``: the replicates it rests on
    (those where the figure is defined, e.g. PPV needs a positive prediction).

    A proportion (``proportion=True``) whose replicates all equal its value at 0 or 1 -- every COVID-19
    patient found, say -- has no spread to read a CI from; the interval is then Clopper-Pearson over
    its ``n_patients`` (patients, not images: conservative for correlated images) and ``ci_method`` says so.
    """
    b = np.asarray(boots, dtype=np.float64)
    finite = b[np.isfinite(b)]
    lo, hi = _ci(finite, level)
    v = float(value)
    method = "percentile bootstrap over patients, stratified by class"
    if (proportion and len(finite) and not math.isnan(v) and v in (0.0, 1.0) and n_patients > 0
            and np.all(finite == v)):
        lo, hi = clopper_pearson(int(round(v * n_patients)), int(n_patients), level)
        method = (f"clopper-pearson over {int(n_patients)} patients (every bootstrap replicate gave {v:g}, "
                  "so the bootstrap has no spread)")
    return {
        "value": None if math.isnan(v) else v,
        "ci_low": None if math.isnan(lo) else lo,
        "ci_high": None if math.isnan(hi) else hi,
        "n_images": int(n_images),
        "n_patients": int(n_patients),
        "n_replicates": int(len(finite)),
        "n_boot": int(len(b)),
        "ci_method": method if len(finite) else "none",
        **extra,
    }


def _n_pat(mask: np.ndarray, pat: np.ndarray) -> int:
    return int(len(np.unique(pat[mask])))


# --------------------------------------------------------------------------- confusion-based


def _confusion_stats(cm: np.ndarray) -> dict[str, np.ndarray]:
    """cm[..., true, pred] -> per-class arrays [..., K] of tp/fp/fn/tn and the derived rates."""
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    actual = cm.sum(-1)
    predicted = cm.sum(-2)
    total = cm.sum((-2, -1))[..., None]
    fn = actual - tp
    fp = predicted - tp
    tn = total - tp - fn - fp
    return {
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": _ratio(tp.sum(-1, keepdims=True), total)[..., 0],
    }


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, k: int, weights: np.ndarray | None = None) -> np.ndarray:
    """K x K counts, rows = true class, columns = predicted; with ``weights`` B x N -> B x K x K."""
    idx = y_true * k + y_pred
    if weights is None:
        return np.bincount(idx, minlength=k * k).reshape(k, k).astype(np.float64)
    onehot = np.zeros((len(idx), k * k))
    onehot[np.arange(len(idx)), idx] = 1.0
    return (weights @ onehot).reshape(-1, k, k)


# --------------------------------------------------------------------------- ranking metrics


def _grouped(is_pos: np.ndarray, score: np.ndarray, w: np.ndarray, descending: bool):
    """Weighted positive/negative mass per distinct score (B x U), scores sorted."""
    order = np.argsort(-score if descending else score, kind="mergesort")
    s = score[order]
    starts = np.r_[0, np.nonzero(np.diff(s))[0] + 1]
    ws = w[:, order]
    pos = np.add.reduceat(ws * is_pos[order], starts, axis=1)
    neg = np.add.reduceat(ws * ~is_pos[order], starts, axis=1)
    return pos, neg


def weighted_auc(is_pos: np.ndarray, score: np.ndarray, w: np.ndarray) -> np.ndarray:
    """ROC AUC for each row of weights ``w`` (B x N) at once; ties count one half.

    Equals ``sklearn.metrics.roc_auc_score(y, s, sample_weight=w[b])``; NaN where a class is absent.
    """
    is_pos = np.asarray(is_pos, bool)
    pos, neg = _grouped(is_pos, np.asarray(score, float), np.atleast_2d(w), descending=False)
    neg_below = np.cumsum(neg, axis=1) - neg
    num = (pos * (neg_below + 0.5 * neg)).sum(1)
    den = pos.sum(1) * neg.sum(1)
    return _ratio(num, den)


def weighted_ap(is_pos: np.ndarray, score: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Average precision (sklearn's step-wise definition) for each row of ``w`` at once."""
    is_pos = np.asarray(is_pos, bool)
    pos, neg = _grouped(is_pos, np.asarray(score, float), np.atleast_2d(w), descending=True)
    tp, fp = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
    total = tp[:, -1:]
    precision = _ratio(tp, tp + fp)
    precision = np.where(np.isnan(precision), 0.0, precision)
    recall_step = _ratio(pos, np.broadcast_to(total, pos.shape))
    ap = (np.nan_to_num(recall_step) * precision).sum(1)
    return np.where(total[:, 0] > 0, ap, np.nan)


# --------------------------------------------------------------------------- public API


def compute_metrics(
    y_true: Sequence[int],
    probs: np.ndarray,
    patients: Sequence[Any],
    classes: Sequence[str],
    *,
    positive: str | None = "COVID-19",
    threshold: float | None = None,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    target_sensitivity: float = 0.95,
    ranking: bool = True,
) -> dict[str, Any]:
    """Accuracy, per-class sensitivity/specificity/PPV/NPV/F1/AUC/AP, each with a patient-bootstrap CI.

    ``probs`` is N x K (rows sum to 1), ``y_true`` class indices, ``patients`` one id per image.
    Predictions are the argmax, or -- when ``threshold`` is given -- ``positive`` whenever its
    probability reaches the threshold. With a ``positive`` class also returns the
    positive-vs-rest threshold table and the operating point for ``target_sensitivity``.
    """
    classes = list(classes)
    y, p, pat = _check(y_true, probs, patients, classes)
    k = len(classes)
    pos_idx = classes.index(positive) if positive in classes else None
    uniq, pat_index = np.unique(pat, return_inverse=True)
    strata = patient_strata(y, pat_index, len(uniq))
    w = _bootstrap_weights(pat_index, len(uniq), n_boot, seed, strata) if n_boot > 0 else np.zeros((0, len(y)))
    pred = predict_labels(p, threshold, pos_idx)

    cm = confusion_matrix(y, pred, k)
    cm_b = confusion_matrix(y, pred, k, w) if n_boot > 0 else np.zeros((0, k, k))
    point, boot = _confusion_stats(cm), _confusion_stats(cm_b)

    n_all, p_all = len(y), len(uniq)
    out: dict[str, Any] = {
        "classes": classes,
        "n_images": n_all,
        "n_patients": p_all,
        "class_counts": {c: int((y == i).sum()) for i, c in enumerate(classes)},
        "decision": "argmax" if threshold is None or pos_idx is None else f"{positive} if p >= {threshold}",
        "bootstrap": {"unit": "patient", "n_boot": int(n_boot), "ci": ci, "seed": seed,
                      "stratified_by": "class: patients are resampled within groups of the same true class(es)",
                      "n_strata": int(len(np.unique(strata)))},
        "accuracy": _fig(point["accuracy"], boot["accuracy"], ci, n_all, p_all, proportion=True),
        "confusion_matrix": cm.astype(int).tolist(),
        "per_class": {},
    }
    bal = np.nanmean(boot["sensitivity"], axis=-1) if n_boot > 0 else np.zeros(0)
    out["balanced_accuracy"] = _fig(np.nanmean(point["sensitivity"]), bal, ci, n_all, p_all)

    for i, c in enumerate(classes):
        is_c, pred_c = y == i, pred == i
        masks = {
            "sensitivity": is_c,
            "specificity": ~is_c,
            "ppv": pred_c,
            "npv": ~pred_c,
            "f1": is_c | pred_c,
        }
        row = {
            m: _fig(point[m][i], boot[m][:, i] if n_boot > 0 else np.zeros(0), ci, mask.sum(), _n_pat(mask, pat),
                    proportion=m != "f1")
            for m, mask in masks.items()
        }
        if ranking:
            one = np.ones((1, len(y)))
            auc_b = weighted_auc(is_c, p[:, i], w) if n_boot > 0 else np.zeros(0)
            ap_b = weighted_ap(is_c, p[:, i], w) if n_boot > 0 else np.zeros(0)
            extra = {"n_positive": int(is_c.sum()), "n_negative": int((~is_c).sum())}
            row["auc"] = _fig(weighted_auc(is_c, p[:, i], one)[0], auc_b, ci, n_all, p_all, **extra)
            row["ap"] = _fig(weighted_ap(is_c, p[:, i], one)[0], ap_b, ci, n_all, p_all, **extra)
        out["per_class"][c] = row

    if pos_idx is not None and ranking:
        out["threshold_table"] = threshold_table(y == pos_idx, p[:, pos_idx], pat_index, w, thresholds, ci, pat)
        out["operating_point"] = operating_point(
            y == pos_idx, p[:, pos_idx], pat_index, w, target_sensitivity, ci, pat
        )
        out["operating_point"]["positive"] = positive
    return out


def _binary_rates(is_pos: np.ndarray, score: np.ndarray, t: float, w: np.ndarray | None):
    """Sensitivity and specificity of ``score >= t`` (point, and per replicate when w is B x N)."""
    hit = score >= t
    if w is None:
        tp, fn = (is_pos & hit).sum(), (is_pos & ~hit).sum()
        tn, fp = (~is_pos & ~hit).sum(), (~is_pos & hit).sum()
    else:
        tp, fn = w @ (is_pos & hit), w @ (is_pos & ~hit)
        tn, fp = w @ (~is_pos & ~hit), w @ (~is_pos & hit)
    return _ratio(np.asarray(tp, float), np.asarray(tp + fn, float)), _ratio(
        np.asarray(tn, float), np.asarray(tn + fp, float)
    )


def threshold_table(
    is_pos: np.ndarray,
    score: np.ndarray,
    pat_index: np.ndarray,
    w: np.ndarray,
    thresholds: Sequence[float],
    ci: float,
    pat: np.ndarray,
) -> list[dict[str, Any]]:
    """Positive-vs-rest sensitivity and specificity at each threshold (Deep-COVID's table)."""
    del pat_index
    rows = []
    n_pos_p, n_neg_p = _n_pat(is_pos, pat), _n_pat(~is_pos, pat)
    for t in thresholds:
        se, sp = _binary_rates(is_pos, score, t, None)
        se_b, sp_b = _binary_rates(is_pos, score, t, w) if len(w) else (np.zeros(0), np.zeros(0))
        rows.append(
            {
                "threshold": float(t),
                "sensitivity": _fig(se, se_b, ci, is_pos.sum(), n_pos_p, proportion=True),
                "specificity": _fig(sp, sp_b, ci, (~is_pos).sum(), n_neg_p, proportion=True),
            }
        )
    return rows


def operating_point(
    is_pos: np.ndarray,
    score: np.ndarray,
    pat_index: np.ndarray,
    w: np.ndarray,
    target: float,
    ci: float,
    pat: np.ndarray,
) -> dict[str, Any]:
    """The highest threshold whose sensitivity reaches ``target`` on this data, and its specificity.

    The threshold is chosen on the evaluated data itself, so its specificity is optimistic; choose
    it on validation data and apply it to the test set for an honest figure.
    """
    del pat_index
    if is_pos.sum() == 0:
        return {"target_sensitivity": target, "threshold": None, "note": "no positive images"}
    cands = np.unique(score)[::-1]  # high to low: sensitivity grows as the threshold falls
    chosen = float(cands[-1])
    for t in cands:
        se, _ = _binary_rates(is_pos, score, t, None)
        if se >= target:
            chosen = float(t)
            break
    se, sp = _binary_rates(is_pos, score, chosen, None)
    se_b, sp_b = _binary_rates(is_pos, score, chosen, w) if len(w) else (np.zeros(0), np.zeros(0))
    return {
        "target_sensitivity": target,
        "threshold": chosen,
        "sensitivity": _fig(se, se_b, ci, is_pos.sum(), _n_pat(is_pos, pat), proportion=True),
        "specificity": _fig(sp, sp_b, ci, (~is_pos).sum(), _n_pat(~is_pos, pat), proportion=True),
        "note": "threshold chosen on the evaluated data itself; its specificity is optimistic",
    }


# --------------------------------------------------------------------------- calibration


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> dict[str, Any]:
    """Top-label ECE with equal-width confidence bins, and the bins for a reliability diagram."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y_true)
    conf = p.max(1)
    correct = (p.argmax(1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # bin i holds conf in (edges[i], edges[i+1]]; conf == 0 cannot occur for a softmax
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        m = which == b
        n = int(m.sum())
        acc = float(correct[m].mean()) if n else None
        cnf = float(conf[m].mean()) if n else None
        if n:
            ece += n / len(y) * abs(acc - cnf)
        bins.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": n, "accuracy": acc, "confidence": cnf})
    return {"ece": float(ece), "n_bins": n_bins, "bins": bins, "n_images": int(len(y))}


def fit_temperature(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Temperature T minimising the NLL of softmax(log(p) / T) (Guo et al. 2017).

    Works from probabilities: log(p) equals the logits up to a per-row constant, which
    softmax ignores.
    """
    from scipy.optimize import minimize_scalar

    logp = np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0))
    y = np.asarray(y_true, dtype=np.int64)

    def nll(log_t: float) -> float:
        z = logp / math.exp(log_t)
        z = z - z.max(1, keepdims=True)
        lse = np.log(np.exp(z).sum(1))
        return float((lse - z[np.arange(len(y)), y]).mean())

    res = minimize_scalar(nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded")
    return float(math.exp(res.x))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(p) / T): the probabilities a model with temperature T would give."""
    if temperature == 1.0:
        return np.asarray(probs, dtype=np.float64)
    z = np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)) / temperature
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def nll(y_true: np.ndarray, probs: np.ndarray) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)
    return float(-np.log(p[np.arange(len(p)), np.asarray(y_true)]).mean())


# --------------------------------------------------------------------------- subgroups


def group_breakdown(
    y_true: np.ndarray,
    probs: np.ndarray,
    patients: Sequence[Any],
    classes: Sequence[str],
    groups: Sequence[Any],
    *,
    positive: str | None = "COVID-19",
    threshold: float | None = None,
    n_boot: int = 500,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Per group value (source, view, ...): counts, accuracy and per-class sensitivity/PPV/AUC with CIs.

    A model that only works on one source shows here: compare the rows.
    """
    y = np.asarray(y_true)
    p = np.asarray(probs)
    pat = np.asarray([str(x) for x in patients])
    g = np.asarray(["(missing)" if (v is None or (isinstance(v, float) and math.isnan(v)) or v == "") else str(v)
                    for v in groups])
    out: dict[str, Any] = {}
    for val in sorted(set(g)):
        m = g == val
        r = compute_metrics(y[m], p[m], pat[m], classes, positive=positive, threshold=threshold,
                            n_boot=n_boot, ci=ci, seed=seed, thresholds=())
        out[val] = {
            "n_images": r["n_images"],
            "n_patients": r["n_patients"],
            "class_counts": r["class_counts"],
            "accuracy": r["accuracy"],
            "per_class": {
                c: {k2: r["per_class"][c][k2] for k2 in ("sensitivity", "ppv", "auc")} for c in classes
            },
        }
    return out
