"""Paired patient bootstrap: is model B better than model A on the same test images?

``covidcxr compare`` gives each model its own CI; two overlapping CIs say nothing about the
difference, because both models were scored on the same patients. Here every bootstrap replicate
draws the patients once and scores *both* models on that draw, so the CI of the difference
(B - A) accounts for the pairing.

Patients are resampled within strata (the set of labels a patient's images carry), so every
replicate keeps each stratum's patient count: a replicate never lacks a class that the test
split has, and no replicate is dropped (the plain bootstrap drops replicates without positives,
which makes a rare class's CI too narrow). The number of replicates a CI rests on is reported.

Inputs are two ``predictions.csv`` files written by ``covidcxr evaluate`` on the same split:

    python -m covidcxr.evaluate.paired BASELINE_REPORT OTHER_REPORT [--negatives normal] [--out paired.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from covidcxr.evaluate.metrics import MetricsError, weighted_auc

METRICS = ("auc", "accuracy", "macro_sensitivity")
#: added when both prediction files carry a ``source`` column (covidcxr.evaluate.groups defines them)
GROUP_METRICS = ("worst_group_sensitivity", "non_dominant_specificity")
_KEY = ("path",)


def read_predictions(path: str | Path) -> pd.DataFrame:
    """A ``predictions.csv`` (or the report folder holding one), checked for the needed columns."""
    p = Path(path)
    if p.is_dir():
        p = p / "predictions.csv"
    if not p.is_file():
        raise MetricsError(f"{p}: no such predictions file (run `covidcxr evaluate` first)")
    df = pd.read_csv(p, dtype={"patient_id": str, "path": str, "label": str, "pred": str})
    missing = [c for c in ("patient_id", "path", "label", "pred") if c not in df.columns]
    if missing:
        raise MetricsError(f"{p}: missing column(s) {', '.join(missing)}; not a covidcxr predictions.csv")
    if df["path"].duplicated().any():
        raise MetricsError(f"{p}: image {df['path'][df['path'].duplicated()].iloc[0]!r} appears twice")
    df.attrs["source"] = str(p)
    return df


def align(a: pd.DataFrame, b: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The two frames on the same images in the same order; an error if their images or labels differ."""
    sa, sb = set(a["path"]), set(b["path"])
    if sa != sb:
        only_a, only_b = sorted(sa - sb), sorted(sb - sa)
        raise MetricsError(
            f"{a.attrs.get('source', 'A')} and {b.attrs.get('source', 'B')} are not scored on the same images "
            f"({len(only_a)} only in A, {len(only_b)} only in B; e.g. {(only_a or only_b)[0]!r})")
    a = a.sort_values("path").reset_index(drop=True)
    b = b.sort_values("path").reset_index(drop=True)
    if not (a["label"].astype(str).to_numpy() == b["label"].astype(str).to_numpy()).all():
        raise MetricsError("the two prediction files give different labels for the same image")
    if not (a["patient_id"].astype(str).to_numpy() == b["patient_id"].astype(str).to_numpy()).all():
        raise MetricsError("the two prediction files give different patient ids for the same image")
    return a, b


def stratified_patient_weights(patients: Sequence[str], strata: Sequence[str], n_boot: int, seed: int) -> np.ndarray:
    """B x N image weights: patients drawn with replacement within their stratum, each stratum
    keeping its size; an image's weight is how often its patient was drawn."""
    pat = np.asarray(patients, dtype=str)
    uniq, pat_index = np.unique(pat, return_inverse=True)
    first = pd.Series(np.asarray(strata, dtype=str)).groupby(pat_index).first()
    pat_stratum = first.reindex(range(len(uniq))).to_numpy()
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_boot, len(uniq)))
    for s in np.unique(pat_stratum):
        members = np.flatnonzero(pat_stratum == s)
        draws = rng.integers(0, len(members), size=(n_boot, len(members)))
        rows = np.repeat(np.arange(n_boot), len(members))
        np.add.at(counts, (rows, members[draws.ravel()]), 1.0)
    return counts[:, pat_index]


def _metric(name: str, frame: pd.DataFrame, w: np.ndarray, positive: str, negatives: Sequence[str] | None,
            classes: Sequence[str], dominant: Mapping[str, str] | None = None) -> np.ndarray:
    """The metric for each weight row (B x N -> B); NaN where it is undefined."""
    label = frame["label"].astype(str).to_numpy()
    if name in GROUP_METRICS:
        return _group_metric(name, frame, w, positive, dominant)
    if name == "auc":
        col = f"prob_{positive}"
        if col not in frame.columns:
            raise MetricsError(f"{frame.attrs.get('source', 'predictions')}: no {col!r} column for the AUC")
        keep = np.isin(label, list(negatives) + [positive]) if negatives else np.ones(len(label), bool)
        return weighted_auc(label[keep] == positive, frame[col].to_numpy(float)[keep], w[:, keep])
    correct = (frame["pred"].astype(str).to_numpy() == label).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        if name == "accuracy":
            return (w @ correct) / w.sum(1)
        if name == "macro_sensitivity":
            sens = [(w[:, label == c] @ correct[label == c]) / w[:, label == c].sum(1) for c in classes]
            return np.nanmean(np.vstack(sens), axis=0) if sens else np.full(len(w), np.nan)
    raise MetricsError(f"unknown paired metric {name!r}; known: {', '.join(METRICS)}")


def _group_metric(name: str, frame: pd.DataFrame, w: np.ndarray, positive: str,
                  dominant: Mapping[str, str] | None) -> np.ndarray:
    """Worst-group sensitivity or non-dominant-source specificity per weight row, as defined in
    :mod:`covidcxr.evaluate.groups` (cells of >= MIN_GROUP_IMAGES images; dominant source per class from
    ``dominant``, else from these images)."""
    from covidcxr.evaluate.groups import MIN_GROUP_IMAGES, dominant_sources

    if "source" not in frame.columns:
        raise MetricsError(f"{frame.attrs.get('source', 'predictions')}: no 'source' column for {name}")
    label = frame["label"].astype(str).to_numpy()
    src = frame["source"].astype(str).to_numpy()
    pred = frame["pred"].astype(str).to_numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        if name == "worst_group_sensitivity":
            cells = pd.Series(1, index=pd.MultiIndex.from_arrays([src, label])).groupby(level=[0, 1]).size()
            sens = []
            for s, c in cells[cells >= MIN_GROUP_IMAGES].index:
                m = (src == s) & (label == c)
                sens.append((w[:, m] @ (pred[m] == c).astype(float)) / w[:, m].sum(1))
            if not sens:
                return np.full(len(w), np.nan)
            v = np.vstack(sens)
            return np.where(np.isnan(v).all(0), np.nan, np.nanmin(np.where(np.isnan(v), np.inf, v), axis=0))
        classes = sorted(set(label))
        dom = dict(dominant) if dominant is not None else dominant_sources(
            [classes.index(x) for x in label], src, classes)
        m = (label != positive) & (src != np.asarray([dom.get(x) for x in label], dtype=object))
        if not m.any():
            return np.full(len(w), np.nan)
        return (w[:, m] @ (pred[m] != positive).astype(float)) / w[:, m].sum(1)


def read_dominant(report: str | Path) -> dict[str, str] | None:
    """The dominant source per class that ``covidcxr evaluate`` used (its metrics.json beside predictions.csv)."""
    p = Path(report)
    p = (p if p.is_dir() else p.parent) / "metrics.json"
    try:
        nd = json.loads(p.read_text(encoding="utf-8"))["groups"]["non_dominant_specificity"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return nd.get("dominant") or None


def paired_bootstrap(a: pd.DataFrame, b: pd.DataFrame, *, positive: str = "COVID-19",
                     negatives: Sequence[str] | None = None, metrics: Sequence[str] | None = None,
                     n_boot: int = 1000, seed: int = 0, ci: float = 0.95,
                     dominant: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Each metric for A and B (``a``, ``b`` with ``a_ci``, ``b_ci``) and the difference B - A
    (``diff``, ``ci_low``, ``ci_high``) with its paired, stratified patient-bootstrap CI.

    ``negatives`` restricts the AUC to ``positive`` vs these labels (e.g. COVID-19 vs normal);
    default: positive vs every other image. ``metrics`` default: METRICS, plus GROUP_METRICS when both
    files have a ``source`` column (``dominant``: the dominant source per class, see
    :func:`covidcxr.evaluate.groups.non_dominant_specificity`; default: counted on these images). ``p_two_sided`` is the bootstrap share of replicates on
    the other side of 0, doubled (a rough guide; the CI is the figure to read).
    """
    a, b = align(a, b)
    if metrics is None:
        metrics = METRICS + (GROUP_METRICS if "source" in a.columns and "source" in b.columns else ())
    label = a["label"].astype(str).to_numpy()
    classes = sorted(set(label))
    pats = a["patient_id"].astype(str).to_numpy()
    strata = pd.Series(label).groupby(pats).transform(lambda s: "|".join(sorted(set(s)))).to_numpy()
    one = np.ones((1, len(a)))
    w = stratified_patient_weights(pats, strata, n_boot, seed)
    lo_q, hi_q = (1 - ci) / 2, 1 - (1 - ci) / 2
    out: dict[str, Any] = {
        "n_images": int(len(a)), "n_patients": int(len(set(pats))), "class_counts": pd.Series(label).value_counts().to_dict(),
        "positive": positive, "auc_negatives": list(negatives) if negatives else "all other classes",
        "bootstrap": {"unit": "patient", "stratified_by": "the set of labels of each patient's images",
                      "n_boot": int(n_boot), "seed": int(seed), "ci": ci},
        "difference": "B - A", "metrics": {},
    }
    if dominant is not None:
        out["dominant"] = dict(dominant)
    for m in metrics:
        args = (positive, negatives, classes, dominant)
        va, vb = _metric(m, a, one, *args)[0], _metric(m, b, one, *args)[0]
        ra, rb = _metric(m, a, w, *args), _metric(m, b, w, *args)
        d = (rb - ra)[np.isfinite(rb - ra)]
        row: dict[str, Any] = {"a": _num(va), "b": _num(vb), "diff": _num(vb - va), "ci_low": None, "ci_high": None,
                               "n_replicates": int(len(d)), "p_two_sided": None}
        for name, r in (("a", ra), ("b", rb)):  # each model's own CI from the same replicates
            r = r[np.isfinite(r)]
            row[f"{name}_ci"] = [float(np.quantile(r, lo_q)), float(np.quantile(r, hi_q))] if len(r) else None
        if len(d):
            row["ci_low"], row["ci_high"] = float(np.quantile(d, lo_q)), float(np.quantile(d, hi_q))
            row["p_two_sided"] = float(min(1.0, 2 * min((d <= 0).mean(), (d >= 0).mean())))
        out["metrics"][m] = row
    return out


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def format_diff(row: dict[str, Any], digits: int = 3) -> str:
    """``+0.123 [0.050, 0.190]`` for a metric row of :func:`paired_bootstrap`."""
    if row.get("diff") is None:
        return "n/a"
    ci = f" [{row['ci_low']:.{digits}f}, {row['ci_high']:.{digits}f}]" if row.get("ci_low") is not None else ""
    return f"{row['diff']:+.{digits}f}{ci}"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m covidcxr.evaluate.paired",
                                 description="Paired patient-bootstrap difference (B - A) of two evaluate reports "
                                             "scored on the same split.")
    ap.add_argument("a", help="baseline: report folder or predictions.csv")
    ap.add_argument("b", help="other model: report folder or predictions.csv")
    ap.add_argument("--positive", default="COVID-19")
    ap.add_argument("--negatives", help="comma list: AUC of positive vs these labels only (default: vs the rest)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the result as JSON here")
    args = ap.parse_args(argv)
    if args.bootstrap < 1:
        ap.error("--bootstrap must be at least 1")
    try:
        res = paired_bootstrap(read_predictions(args.a), read_predictions(args.b), positive=args.positive,
                               negatives=args.negatives.split(",") if args.negatives else None,
                               n_boot=args.bootstrap, seed=args.seed, dominant=read_dominant(args.a))
    except (MetricsError, OSError, pd.errors.ParserError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    res["a"], res["b"] = str(args.a), str(args.b)
    for m, r in res["metrics"].items():
        print(f"{m}: A {r['a'] if r['a'] is None else round(r['a'], 3)}  B {r['b'] if r['b'] is None else round(r['b'], 3)}"
              f"  B-A {format_diff(r)}  ({r['n_replicates']} replicates)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
