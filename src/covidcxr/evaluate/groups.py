"""Per-group figures: does the model find the disease, or the hospital the film came from?

On a benchmark where the label is almost a function of the source (normal and pneumonia films from
NIH, COVID-19 films from elsewhere) a model can score a high AUC by recognising the source. The
figures here show it:

* **source x class table** -- for every (source, class) cell: n, and the sensitivity (recall of that
  class) at the decision rule the evaluation uses, with a patient-bootstrap CI;
* **worst-group sensitivity** -- the lowest cell sensitivity over cells of at least ``min_images``
  images (default 5), naming the cell;
* **non-dominant-source specificity** -- see :func:`non_dominant_specificity`;
* **source-concentration warnings** -- see :func:`source_warnings`.

The bootstrap is the one of :mod:`covidcxr.evaluate.metrics`: patients (not images) are drawn with
replacement, stratified -- here by the (source, class) cell holding most of a patient's images, a
refinement of the class stratification of ``compute_metrics``: every replicate keeps every cell's
patient count, so a cell is practically never missing from a replicate.

All functions are pure: plain arrays in (class indices, predicted indices, source names, patient ids),
JSON-able dicts out.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from covidcxr.evaluate.metrics import MetricsError, _bootstrap_weights, _fig, _n_pat, _ratio

#: cells with fewer images are listed but do not compete for the worst-group sensitivity
MIN_GROUP_IMAGES = 5
#: a class whose images come from one source at this share or more gets a warning
CONCENTRATION_SHARE = 0.9
MISSING = "(missing)"


def _gfig(value: float, boots: np.ndarray, ci: float, n_images: int, n_patients: int) -> dict[str, Any]:
    """A proportion with its CI (:func:`covidcxr.evaluate.metrics._fig`), naming this module's strata."""
    f = _fig(value, boots, ci, n_images, n_patients, proportion=True)
    f["ci_method"] = f["ci_method"].replace("stratified by class", "stratified by (source, class) cell")
    return f


def _sources(sources: Sequence[Any]) -> np.ndarray:
    """Source names as strings; None / NaN / "" become ``(missing)``."""
    return np.asarray([MISSING if (v is None or (isinstance(v, float) and math.isnan(v)) or str(v) == "") else str(v)
                       for v in sources])


def _inputs(y_true: Sequence[int], y_pred: Sequence[int], sources: Sequence[Any], patients: Sequence[Any],
            classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.int64)
    pred = np.asarray(y_pred, dtype=np.int64)
    src = _sources(sources)
    pat = np.asarray([str(p) for p in patients])
    if not (len(y) == len(pred) == len(src) == len(pat)):
        raise MetricsError(f"lengths differ: {len(y)} labels, {len(pred)} predictions, {len(src)} sources, "
                           f"{len(pat)} patient ids")
    if len(y) == 0:
        raise MetricsError("no predictions to evaluate (empty split?)")
    k = len(classes)
    for name, a in (("labels", y), ("predictions", pred)):
        if a.min() < 0 or a.max() >= k:
            raise MetricsError(f"{name} must be class indices 0..{k - 1}, got range {a.min()}..{a.max()}")
    return y, pred, src, pat


def _cells(y: np.ndarray, src: np.ndarray, classes: Sequence[str]) -> tuple[list[tuple[str, int]], np.ndarray]:
    """The non-empty (source, class index) cells, sorted by source then class order, and each image's cell."""
    cells = sorted({(s, int(c)) for s, c in zip(src, y)})
    index = {cell: i for i, cell in enumerate(cells)}
    return cells, np.asarray([index[(s, int(c))] for s, c in zip(src, y)], dtype=np.int64)


def group_weights(y_true: Sequence[int], sources: Sequence[Any], patients: Sequence[Any], n_boot: int,
                  seed: int = 0) -> np.ndarray:
    """B x N image weights of a patient bootstrap stratified by (source, class) cell.

    Each replicate draws every stratum's patients with replacement among themselves; a patient's stratum
    is the cell holding most of their images, so every cell keeps the patient count of those it holds
    most of (a cell made only of patients whose images lie mostly elsewhere can be missing from a
    replicate: its ``n_replicates`` says so).
    """
    y = np.asarray(y_true, dtype=np.int64)
    src = _sources(sources)
    pat = np.asarray([str(p) for p in patients])
    if n_boot <= 0:
        return np.zeros((0, len(y)))
    cells, code = _cells(y, src, [])
    uniq, pat_index = np.unique(pat, return_inverse=True)
    # one stratum per patient: the cell holding most of the patient's images (first cell on a tie). A
    # stratum per *set* of cells would make singletons of patients with images in two cells, and a
    # singleton is drawn in every replicate, which hides its share of the spread.
    counts = np.zeros((len(uniq), len(cells)))
    np.add.at(counts, (pat_index, code), 1.0)
    strata = counts.argmax(1)
    return _bootstrap_weights(pat_index, len(uniq), n_boot, seed, strata)


def _weights(y: np.ndarray, src: np.ndarray, pat: np.ndarray, weights: np.ndarray | None, n_boot: int,
             seed: int) -> np.ndarray:
    if weights is None:
        return group_weights(y, src, pat, n_boot, seed)
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 2 or w.shape[1] != len(y):
        raise MetricsError(f"bootstrap weights must be B x {len(y)}, got {w.shape}")
    return w


def _cell_sensitivity(y: np.ndarray, pred: np.ndarray, code: np.ndarray, n_cells: int,
                      w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Point (C,) and per-replicate (B x C) share of each cell's images called their own class."""
    hit = (pred == y).astype(np.float64)
    onehot = np.zeros((len(y), n_cells))
    onehot[np.arange(len(y)), code] = 1.0
    point = _ratio(hit @ onehot, np.ones(len(y)) @ onehot)
    boots = _ratio(w @ (onehot * hit[:, None]), w @ onehot) if len(w) else np.zeros((0, n_cells))
    return point, boots


def group_table(
    y_true: Sequence[int],
    y_pred: Sequence[int],
    sources: Sequence[Any],
    patients: Sequence[Any],
    classes: Sequence[str],
    *,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    min_images: int = MIN_GROUP_IMAGES,
    weights: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """One row per non-empty (source, class) cell: n images / patients and the sensitivity with its CI.

    ``y_pred`` are the labels of the decision rule being evaluated (class indices, as ``y_true``).
    ``eligible`` says whether the cell has at least ``min_images`` images (it then competes for the
    worst-group sensitivity). ``weights`` (B x N) replaces the bootstrap draw, to share one between figures.
    """
    y, pred, src, pat = _inputs(y_true, y_pred, sources, patients, classes)
    w = _weights(y, src, pat, weights, n_boot, seed)
    cells, code = _cells(y, src, classes)
    point, boots = _cell_sensitivity(y, pred, code, len(cells), w)
    rows = []
    for i, (s, c) in enumerate(cells):
        m = code == i
        rows.append({
            "source": s,
            "class": classes[c],
            "n_images": int(m.sum()),
            "n_patients": _n_pat(m, pat),
            "n_correct": int((pred[m] == c).sum()),
            "eligible": bool(m.sum() >= min_images),
            "sensitivity": _gfig(point[i], boots[:, i], ci, int(m.sum()), _n_pat(m, pat)),
        })
    return rows


def worst_group_sensitivity(
    y_true: Sequence[int],
    y_pred: Sequence[int],
    sources: Sequence[Any],
    patients: Sequence[Any],
    classes: Sequence[str],
    *,
    min_images: int = MIN_GROUP_IMAGES,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    weights: np.ndarray | None = None,
) -> dict[str, Any]:
    """The lowest (source, class) sensitivity over cells of at least ``min_images`` images, naming the cell.

    The CI comes from the minimum over the same cells in each bootstrap replicate (the worst cell may
    change between replicates; the figure is the worst group's sensitivity, whichever group that is).
    Without any eligible cell the value is None and ``note`` says why.
    """
    y, pred, src, pat = _inputs(y_true, y_pred, sources, patients, classes)
    w = _weights(y, src, pat, weights, n_boot, seed)
    cells, code = _cells(y, src, classes)
    sizes = np.bincount(code, minlength=len(cells))
    ok = np.nonzero(sizes >= min_images)[0]
    out: dict[str, Any] = {"min_images": int(min_images), "n_cells": len(cells), "n_eligible_cells": int(len(ok))}
    if len(ok) == 0:
        return {**out, "value": None, "ci_low": None, "ci_high": None, "source": None, "class": None,
                "note": f"no (source, class) cell has {min_images} or more images"}
    point, boots = _cell_sensitivity(y, pred, code, len(cells), w)
    j = ok[int(np.argmin(point[ok]))]  # first of equals: cells are sorted by source, then class
    with np.errstate(all="ignore"):
        b = np.min(boots[:, ok], axis=1) if len(w) else np.zeros(0)
    m = code == j
    fig = _gfig(point[j], b, ci, int(m.sum()), _n_pat(m, pat))
    s, c = cells[j]
    return {**out, **fig, "source": s, "class": classes[c], "cell": f"{classes[c]} from {s}"}


def dominant_sources(y_true: Sequence[int], sources: Sequence[Any], classes: Sequence[str]) -> dict[str, str]:
    """For every class present: the source that supplies most of its images (ties: alphabetical first)."""
    y = np.asarray(y_true, dtype=np.int64)
    src = _sources(sources)
    out = {}
    for i, c in enumerate(classes):
        s, n = np.unique(src[y == i], return_counts=True)
        if len(s):
            out[c] = str(s[int(np.argmax(n))])  # np.unique sorts, argmax takes the first maximum
    return out


def non_dominant_specificity(
    y_true: Sequence[int],
    y_pred: Sequence[int],
    sources: Sequence[Any],
    patients: Sequence[Any],
    classes: Sequence[str],
    *,
    positive: str = "COVID-19",
    dominant: Mapping[str, str] | None = None,
    dominant_from: str = "the evaluated images",
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    weights: np.ndarray | None = None,
) -> dict[str, Any]:
    """Share of non-``positive`` films from a non-dominant source that are NOT labelled ``positive``.

    Definition: for every class c other than ``positive`` (normal and pneumonia), the dominant source
    d(c) is the source that supplies most images of c -- taken from ``dominant`` (e.g. the training
    split's counts; ``dominant_from`` says where it came from), else from the evaluated images. The
    figure is, over all images whose true class c is not ``positive`` and whose source is not d(c), the
    proportion whose predicted label is not ``positive`` (a pneumonia called normal counts as a success:
    it was not called COVID-19). A model that learned "dominant source or not" scores about 0 here.
    ``per_class`` gives the same figure for each class c alone.
    """
    y, pred, src, pat = _inputs(y_true, y_pred, sources, patients, classes)
    classes = list(classes)
    base: dict[str, Any] = {
        "positive": positive,
        "definition": (f"share of films whose true class is not {positive}, from a source other than the one "
                       f"supplying most films of that class (dominant source per class, from {dominant_from}), "
                       f"that are not labelled {positive}"),
    }
    if positive not in classes:
        return {**base, "value": None, "ci_low": None, "ci_high": None, "dominant": {}, "per_class": {},
                "note": f"the model has no {positive} output"}
    pos = classes.index(positive)
    dom = dict(dominant) if dominant is not None else dominant_sources(y, src, classes)
    w = _weights(y, src, pat, weights, n_boot, seed)
    ok = pred != pos
    negatives = [i for i, c in enumerate(classes) if i != pos]
    # a class whose dominant source is unknown (absent from the training data) counts all its images
    d = np.asarray([dom.get(classes[c], None) if c != pos else None for c in y], dtype=object)
    include = (y != pos) & (src != d)

    def figure(mask: np.ndarray) -> dict[str, Any]:
        n = int(mask.sum())
        if n == 0:
            return _gfig(math.nan, np.zeros(0), ci, 0, 0)
        value = float(ok[mask].mean())
        b = _ratio(w @ (mask & ok).astype(float), w @ mask.astype(float)) if len(w) else np.zeros(0)
        return _gfig(value, b, ci, n, _n_pat(mask, pat))

    per_class = {}
    for i in negatives:
        c = classes[i]
        if not (y == i).any():
            continue
        per_class[c] = {"dominant_source": dom.get(c), **figure(include & (y == i))}
    out = {**base, **figure(include), "dominant": {c: dom.get(c) for c in per_class}, "dominant_from": dominant_from,
           "per_class": per_class}
    if out["value"] is None:
        out["note"] = (f"no film of a class other than {positive} comes from a non-dominant source in the evaluated "
                       "images")
    return out


def source_warnings(
    y_true: Sequence[int],
    sources: Sequence[Any],
    classes: Sequence[str],
    *,
    share: float = CONCENTRATION_SHARE,
) -> list[dict[str, Any]]:
    """A warning for every class whose evaluated images come from one source at ``share`` or more.

    Only where the evaluated images come from two or more sources: with a single source (a source
    hold-out) the source cannot tell the classes apart, so it cannot stand in for them.
    """
    y = np.asarray(y_true, dtype=np.int64)
    src = _sources(sources)
    if len(set(src.tolist())) < 2:
        return []
    out = []
    for i, c in enumerate(classes):
        s, n = np.unique(src[y == i], return_counts=True)
        if not len(s):
            continue
        j = int(np.argmax(n))
        frac = float(n[j] / n.sum())
        if frac >= share:
            pct = math.floor(frac * 100 + 1e-9)  # never round 99.6 % up to "100 %"
            out.append({"class": c, "source": str(s[j]), "share": frac, "n_images": int(n.sum()),
                        "text": f"class {c}: {pct} % from {s[j]} — sensitivity of {c} may measure the source, "
                                "not the disease"})
    return out


def group_report(
    y_true: Sequence[int],
    y_pred: Sequence[int],
    sources: Sequence[Any] | None,
    patients: Sequence[Any],
    classes: Sequence[str],
    *,
    positive: str | None = "COVID-19",
    dominant: Mapping[str, str] | None = None,
    dominant_from: str = "the evaluated images",
    min_images: int = MIN_GROUP_IMAGES,
    share: float = CONCENTRATION_SHARE,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Every per-group figure with one bootstrap draw: table, worst group, non-dominant specificity, warnings.

    ``sources`` None (a manifest without a ``source`` column) or all missing gives ``available: False``
    and a ``note`` saying why, instead of a table.
    """
    if sources is None or all(s == MISSING for s in _sources(sources)):
        return {"available": False, "note": "no source x class table: the manifest has no 'source' column "
                                            "(or it is empty for every evaluated image)"}
    y, pred, src, pat = _inputs(y_true, y_pred, sources, patients, classes)
    w = group_weights(y, src, pat, n_boot, seed)
    kw = dict(ci=ci, weights=w)
    out: dict[str, Any] = {
        "available": True,
        "table": group_table(y, pred, src, pat, classes, min_images=min_images, **kw),
        "worst_group_sensitivity": worst_group_sensitivity(y, pred, src, pat, classes, min_images=min_images, **kw),
        "warnings": source_warnings(y, src, classes, share=share),
        "settings": {"min_images": int(min_images), "concentration_share": float(share), "n_boot": int(n_boot),
                     "ci": ci, "seed": seed,
                     "bootstrap": "patients resampled within the (source, class) cell holding most of their images"},
    }
    if positive is not None and positive in classes:
        out["non_dominant_specificity"] = non_dominant_specificity(
            y, pred, src, pat, classes, positive=positive, dominant=dominant, dominant_from=dominant_from, **kw)
    return out


def training_dominant_sources(manifest: Any, classes: Sequence[str],
                              name: str | Any = "") -> tuple[dict[str, str] | None, str]:
    """Dominant source per class counted on the manifest's ``train`` split: the data the model learned from.

    ``manifest`` is the whole manifest frame. Returns (mapping, where it was counted), or (None, "the
    evaluated images") when the manifest has no ``source`` column or no train rows, so that
    :func:`non_dominant_specificity` falls back to the evaluated images. Rows whose label is not a class
    of the model are ignored.
    """
    from covidcxr.data.labels import label_index_map

    fallback: tuple[None, str] = (None, "the evaluated images")
    if "source" not in manifest.columns or "split" not in manifest.columns:
        return fallback
    train = manifest[manifest["split"] == "train"]
    index = label_index_map(list(classes))
    labels = [index.get(str(v)) for v in train["label"]]
    keep = [i for i, v in enumerate(labels) if v is not None]
    if not keep:
        return fallback
    src = [train["source"].iloc[i] for i in keep]
    dom = dominant_sources([labels[i] for i in keep], src, classes)
    dom = {c: s for c, s in dom.items() if s != MISSING}
    if not dom:
        return fallback
    where = f"the train split of {name}" if str(name) else "the train split of the manifest"
    return dom, where
