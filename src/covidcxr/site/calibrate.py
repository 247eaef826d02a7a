"""``covidcxr site calibrate``: correct a model at a new hospital with a few dozen labelled local films.

From the local cases it fits, in this order:

1. optionally (``adapt_bn``) BatchNorm running statistics re-estimated on the local images (AdaBN,
   Li et al. 2016): only the BN buffers change, no weight does;
2. a temperature (Guo et al. 2017, :func:`covidcxr.evaluate.fit_temperature`) on the local labels, or with
   ``bias`` a temperature and one logit bias per class together (bias-corrected temperature scaling, BCTS,
   Alexandari, Kundaje & Shrikumar, ICML 2020: softmax(z / T + b), :func:`fit_bias_temperature`), which can
   follow the site's class priors (e.g. a site without pneumonia films) where a temperature cannot;
3. the COVID-19 operating threshold reaching the parent's target sensitivity on the local cases (the
   validation operating-point logic of :func:`covidcxr.evaluate.core.val_operating_point`);
4. class-conditional (Mondrian) split-conformal prediction sets at ``coverage`` (crepes), from the
   scores 1 - p(true class) after the new temperature (and bias) (:mod:`covidcxr.site.sets`).

The new checkpoint's ordinary ``temperature``/``threshold`` fields hold the local values, so every
entry point uses them unchanged; the parent's values and everything else are kept under
``site_calibration``. Before/after figures on the local cases are cross-fitted: k folds by patient,
steps 1-4 refitted on k - 1 folds and applied to the held-out fold, so no case scores itself.
"""

from __future__ import annotations

import copy
import datetime as _dt
import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from covidcxr.site.check import SiteError, file_sha256, load_model
from covidcxr.site.sets import SCHEMA_VERSION, SITE_KEY, class_threshold, conformal_score, prediction_set

log = logging.getLogger(__name__)

POSITIVE = "COVID-19"
#: fewest local cases of a class to fit a threshold and report a sensitivity
MIN_PER_CLASS = 5
DEFAULT_TARGET = 0.95
#: BCTS objective: sum over the local films of -log p(true class) + BIAS_L2 * ||b||^2 (a Gaussian prior of
#: sd 1 on each bias). It keeps the bias of a class with no local films finite: that class is made rarer,
#: never impossible. With no penalty its bias would run to -inf.
BIAS_L2 = 0.5
#: the temperature's search range, as covidcxr.evaluate.fit_temperature's
T_RANGE = (0.05, 20.0)


# --------------------------------------------------------------------------- reading the local cases


def read_local_manifest(path: str | os.PathLike, site: str) -> pd.DataFrame:
    """A ``covidcxr data build`` manifest or a CSV with ``path,label,patient_id`` (paths relative to the
    CSV's folder); every row is a local case whatever its ``split``. No ``patient_id``: refused."""
    from covidcxr.data.manifest import REQUIRED_COLUMNS, ManifestError, read_manifest

    p = Path(path)
    if not p.is_file():
        raise SiteError(f"{p}: local manifest not found")
    try:
        head = pd.read_csv(p, nrows=0)
    except Exception as err:
        raise SiteError(f"{p}: not a readable CSV ({type(err).__name__}: {err})") from None
    missing = [c for c in ("path", "label", "patient_id") if c not in head.columns]
    if missing:
        raise SiteError(f"{p}: no {', '.join(repr(c) for c in missing)} column; a local manifest needs "
                        "path,label,patient_id (patients keep the cross-fitting honest), as `covidcxr data build` writes")
    if all(c in head.columns for c in REQUIRED_COLUMNS):
        try:
            return read_manifest(p, check_leakage=False)
        except ManifestError as err:
            raise SiteError(str(err)) from None
    try:
        df = pd.read_csv(p, dtype={"patient_id": str, "path": str, "label": str})
    except Exception as err:  # e.g. not UTF-8 (re-saved by a spreadsheet): one line, as the header read
        raise SiteError(f"{p}: not a readable CSV ({type(err).__name__}: {str(err)[:200]})") from None
    for col in ("path", "label", "patient_id"):
        bad = df[col].isna() | (df[col].astype(str).str.strip() == "")
        if bad.any():
            raise SiteError(f"{p}: {int(bad.sum())} row(s) with an empty '{col}' (first at line {int(bad.idxmax()) + 2})")
    base = p.resolve().parent
    df["path"] = [v if os.path.isabs(v) else str(base / v) for v in df["path"].astype(str)]
    df["source"] = site
    return df


def load_arrays(preset: Any, paths: Sequence[str], batch_size: int = 16,
                num_workers: int = 0) -> np.ndarray:
    """The local images through the model's reader and preset; any unreadable image: a refusal naming them."""
    from covidcxr.predict.inputs import Loader, iter_batches

    arrays, bad = [], []
    for items in iter_batches(list(paths), Loader(preset), batch_size, num_workers):
        for it in items:
            if it.array is None:
                bad.append(f"{it.path} ({it.error})")
            else:
                arrays.append(it.array)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise SiteError(f"{len(bad)} local image(s) cannot be read by the model: {'; '.join(bad[:3])}{more}")
    return np.stack(arrays).astype(np.float32, copy=False)


# --------------------------------------------------------------------------- AdaBN


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, images: np.ndarray, batch_size: int = 16) -> int:
    """AdaBN: replace every BatchNorm layer's running mean/variance by the statistics of ``images``
    (N x C x H x W), averaged over batches; weights and the other buffers stay as they are. Returns the
    number of BN layers adapted. The model comes back in eval mode."""
    bns = batchnorm_layers(model)
    if not bns:
        raise SiteError(f"{getattr(model, 'covidcxr_arch', type(model).__name__)}: the model has no BatchNorm "
                        "layer; --adapt-bn does not apply")
    saved = [bn.momentum for bn in bns]
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches, not an exponential one
        bn.train()
    try:
        bs = max(2, int(batch_size))  # a batch of one has no spread to estimate
        n = len(images)
        starts = list(range(0, n, bs))
        if len(starts) > 1 and n - starts[-1] < 2:
            starts.pop()  # fold a last single image into the previous batch
        for i, s in enumerate(starts):
            end = starts[i + 1] if i + 1 < len(starts) else n
            model(torch.from_numpy(np.ascontiguousarray(images[s:end])))
    finally:
        for bn, m in zip(bns, saved):
            bn.momentum = m
        model.eval()
    return len(bns)


@torch.no_grad()
def model_logits(model: nn.Module, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
    model.eval()
    out = []
    for s in range(0, len(images), max(1, batch_size)):
        z = model(torch.from_numpy(np.ascontiguousarray(images[s:s + batch_size])))
        out.append((z[0] if isinstance(z, (tuple, list)) else z).float().numpy())
    return np.concatenate(out).astype(np.float64)


# --------------------------------------------------------------------------- fitting


def _softmax(logits: np.ndarray, temperature: float = 1.0, bias: Sequence[float] | None = None) -> np.ndarray:
    from covidcxr.decision import softmax_with_temperature

    return softmax_with_temperature(logits, temperature, bias)  # the one rule every entry point uses


def fit_bias_temperature(logits: np.ndarray, y: np.ndarray, l2: float = BIAS_L2) -> tuple[float, list[float]]:
    """Bias-corrected temperature scaling (Alexandari et al. 2020): T > 0 and b (one per class) minimising
    sum_i -log softmax(z_i / T + b)[y_i] + l2 * ||b||^2, by scipy L-BFGS-B with the exact gradient
    (log T bounded to :data:`T_RANGE`). The penalty also fixes the free shift of b (softmax ignores a constant
    added to every bias): at the optimum the biases sum to 0."""
    from scipy.optimize import minimize

    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    n, k = z.shape
    onehot = np.eye(k)[y]

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        t, b = math.exp(theta[0]), theta[1:]
        u = z / t + b
        u = u - u.max(1, keepdims=True)
        logp = u - np.log(np.exp(u).sum(1, keepdims=True))
        g = np.exp(logp) - onehot  # d NLL / d u, per film and class
        f = -float((logp * onehot).sum()) + l2 * float(b @ b)
        grad_logt = float((g * (-z / t)).sum())  # du/dlogT = -z / T
        return f, np.concatenate([[grad_logt], g.sum(0) + 2 * l2 * b])

    bounds = [(math.log(T_RANGE[0]), math.log(T_RANGE[1]))] + [(None, None)] * k
    res = minimize(objective, np.zeros(k + 1), jac=True, method="L-BFGS-B", bounds=bounds,
                   options={"maxiter": 1000, "gtol": 1e-8})
    if not res.success:
        log.warning("bias-corrected temperature scaling: L-BFGS-B stopped early (%s)", res.message)
    return float(math.exp(res.x[0])), [float(v) for v in res.x[1:]]


def fit_conformal(probs: np.ndarray, y: np.ndarray, classes: Sequence[str], coverage: float) -> dict[str, Any]:
    """Class-conditional (Mondrian) split-conformal: crepes fitted on the scores 1 - p(true class), one
    Mondrian category per class; stored as one score threshold per class (see :mod:`covidcxr.site.sets`)."""
    import crepes
    from crepes import ConformalClassifier

    scores = conformal_score(probs)[np.arange(len(y)), y]
    cc = ConformalClassifier().fit(scores, bins=np.asarray(y))
    thresholds: dict[str, float | None] = {}
    always, n = [], {}
    for i, c in enumerate(classes):
        own = scores[y == i]
        n[c] = int(len(own))
        q = class_threshold(own, coverage)
        thresholds[c] = q
        if q is None:
            always.append(c)
    return {
        "method": f"class-conditional (Mondrian) split-conformal, crepes {getattr(crepes, '__version__', '')}".strip(),
        "score": "1 - p(class), after the site temperature (and logit bias, with --bias)",
        "classes": list(classes),
        "thresholds": thresholds,
        "always_in": always,
        "n": n,
        "coverage": float(coverage),
        "_crepes": cc,
    }


def crepes_sets(conf: dict[str, Any], probs: np.ndarray) -> np.ndarray:
    """N x K membership from crepes' non-smoothed Mondrian p-values (p >= 1 - coverage), the library's view
    of the same sets; a class without calibration scores is in every set."""
    cc = conf["_crepes"]
    alphas = conformal_score(probs)
    out = np.ones(alphas.shape, dtype=bool)
    for i, c in enumerate(conf["classes"]):
        if conf["n"][c] == 0 or c in conf["always_in"]:
            continue
        p = cc.predict_p(alphas, bins=np.full(len(alphas), i), smoothing=False)[:, i]
        out[:, i] = p >= 1 - conf["coverage"]
    return out


def fit_site(logits: np.ndarray, y: np.ndarray, patients: Sequence[str], classes: Sequence[str], coverage: float,
             target: float | None, bias: bool = False, bias_l2: float = BIAS_L2) -> dict[str, Any]:
    """Temperature (and, with ``bias``, per-class logit biases), then the COVID-19 threshold and conformal
    thresholds on the probabilities they give, from local logits and labels."""
    from covidcxr.evaluate.core import val_operating_point
    from covidcxr.evaluate.metrics import fit_temperature

    classes = list(classes)
    logit_bias = None
    if bias:
        temperature, logit_bias = fit_bias_temperature(logits, y, bias_l2)
    else:
        temperature = fit_temperature(y, _softmax(logits))
    probs = _softmax(logits, temperature, logit_bias)
    threshold, op = None, None
    if target is not None and POSITIVE in classes and (y == classes.index(POSITIVE)).any():
        frame = pd.DataFrame({"label": [classes[i] for i in y], "patient_id": list(patients)})
        op = val_operating_point(frame, probs, classes, POSITIVE, float(target))
        threshold = op.get("threshold")
    return {"temperature": float(temperature), "logit_bias": logit_bias,
            "threshold": None if threshold is None else float(threshold),
            "operating_point": op, "conformal": fit_conformal(probs, y, classes, coverage)}


def _labels(probs: np.ndarray, classes: Sequence[str], threshold: float | None) -> np.ndarray:
    from covidcxr.decision import DecisionRule

    return DecisionRule(threshold).label_indices(probs, classes)


def _figures(y: np.ndarray, probs: np.ndarray, pred: np.ndarray, classes: Sequence[str],
             sets: np.ndarray | None) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    classes = list(classes)
    sens = {c: (float((pred[y == i] == i).mean()) if (y == i).any() else None) for i, c in enumerate(classes)}
    vals = [v for v in sens.values() if v is not None]
    out: dict[str, Any] = {"macro_sensitivity": float(np.mean(vals)) if vals else None, "sensitivity": sens}
    if POSITIVE in classes:
        pos = y == classes.index(POSITIVE)
        out["covid_auc"] = float(roc_auc_score(pos, probs[:, classes.index(POSITIVE)])) if 0 < pos.sum() < len(y) else None
    if sets is not None:
        out["set_coverage"] = {c: (float(sets[y == i, i].mean()) if (y == i).any() else None)
                               for i, c in enumerate(classes)}
        out["mean_set_size"] = float(sets.sum(1).mean())
        out["fraction_uncertain"] = float((sets.sum(1) != 1).mean())
    return out


def _fold_ids(y: np.ndarray, patients: Sequence[str], folds: int, seed: int) -> np.ndarray:
    from sklearn.model_selection import StratifiedGroupKFold

    groups = pd.factorize(pd.Series(list(patients), dtype=str))[0]
    k = int(min(folds, len(set(groups))))
    fold = np.full(len(y), -1)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for f, (_, test) in enumerate(splitter.split(np.zeros(len(y)), y, groups)):
        fold[test] = f
    return fold


def cross_fit(model: nn.Module, images: np.ndarray, parent_logits: np.ndarray, y: np.ndarray,
              patients: Sequence[str], classes: Sequence[str], *, coverage: float, target: float | None,
              adapt_bn: bool, folds: int, seed: int, batch_size: int, bias: bool = False,
              bias_l2: float = BIAS_L2) -> dict[str, Any]:
    """Out-of-fold probabilities, labels and sets after site calibration (k folds by patient)."""
    fold = _fold_ids(y, patients, folds, seed)
    k = int(fold.max()) + 1
    probs = np.zeros(parent_logits.shape)
    pred = np.zeros(len(y), dtype=int)
    sets = np.zeros(parent_logits.shape, dtype=bool)
    agree = 0
    for f in range(k):
        test, train = fold == f, fold != f
        logits = parent_logits
        if adapt_bn:  # BN statistics from the training folds' images only
            m = copy.deepcopy(model)
            adapt_batchnorm(m, images[train], batch_size)
            logits = model_logits(m, images, batch_size)
        fitted = fit_site(logits[train], y[train], [patients[i] for i in np.flatnonzero(train)], classes, coverage,
                          target, bias, bias_l2)
        p = _softmax(logits[test], fitted["temperature"], fitted["logit_bias"])
        probs[test] = p
        pred[test] = _labels(p, classes, fitted["threshold"])
        site = {"conformal": fitted["conformal"]}
        mine = np.array([[c in prediction_set(row, classes, site) for c in classes] for row in p], dtype=bool)
        sets[test] = mine
        agree += int((mine == crepes_sets(fitted["conformal"], p)).all(1).sum())
    return {"folds": k, "fold": fold, "probs": probs, "pred": pred, "sets": sets,
            "crepes_agreement": agree / max(1, len(y))}


def _frame(paths: Sequence[str], patients: Sequence[str], y: np.ndarray, pred: np.ndarray, probs: np.ndarray,
           classes: Sequence[str]) -> pd.DataFrame:
    d = {"path": list(paths), "patient_id": list(patients), "label": [classes[i] for i in y],
         "pred": [classes[i] for i in pred]}
    for i, c in enumerate(classes):
        d[f"prob_{c}"] = probs[:, i]
    return pd.DataFrame(d)


# --------------------------------------------------------------------------- the command


def calibrate_site(model: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *,
                   coverage: float = 0.9, adapt_bn: bool = False, site: str | None = None,
                   recalibrate: bool = False, folds: int = 5, target_sensitivity: float | None = None,
                   batch_size: int = 16, num_workers: int = 0, seed: int = 0, n_boot: int = 1000,
                   bias: bool = False, bias_l2: float = BIAS_L2) -> dict[str, Any]:
    """Fit the site calibration, write the site checkpoint ``out`` and return its ``site_calibration`` dict.
    ``bias``: bias-corrected temperature scaling (a temperature and one logit bias per class, L2 weight
    ``bias_l2``) instead of the temperature alone."""
    from covidcxr.evaluate.paired import paired_bootstrap
    from covidcxr.models.checkpoint import atomic_torch_save, read_bundle
    from covidcxr.models.features import SUMMARY_KEY

    model, data, out = Path(model), Path(data), Path(out)
    if not 0 < coverage < 1:
        raise SiteError(f"--coverage {coverage}: must lie strictly between 0 and 1")
    if bias_l2 <= 0:
        raise SiteError(f"--bias-l2 {bias_l2}: must be > 0 (it keeps the bias of a class without local films finite)")
    if folds < 2:
        raise SiteError(f"--folds {folds}: cross-fitting needs at least 2 folds")
    from covidcxr.outpaths import OverwriteError, refuse_overwrite
    from covidcxr.reference_models import model_files

    try:
        refuse_overwrite([out], [*model_files(model), data], "covidcxr site calibrate")
    except OverwriteError as err:
        raise SiteError(str(err)) from None
    bundle = read_bundle(model)
    if bundle.get(SITE_KEY) and not recalibrate:
        prev = bundle[SITE_KEY]
        raise SiteError(f"{model}: already site-calibrated (site {prev.get('site')!r}, {prev.get('date')}); "
                        "pass --recalibrate to calibrate it again")
    lm = load_model(model)
    if lm.task != "classification":
        raise SiteError(f"{model}: a {lm.task!r} checkpoint; site calibrate needs a classifier")
    classes = list(lm.classes)
    site = site or data.stem
    df = read_local_manifest(data, site)
    from covidcxr.data.manifest import repeated_images

    repeats = repeated_images(df, data)
    if repeats:  # a repeated case would weigh double in the fitted temperature, threshold and conformal sets
        raise SiteError(repeats)
    unknown = sorted(set(df["label"].astype(str)) - set(classes))
    if unknown:
        raise SiteError(f"{data}: label(s) {unknown} are not outputs of the model {classes}")
    counts = {c: int((df["label"] == c).sum()) for c in classes}
    present = [c for c, n in counts.items() if n]
    if len(present) < 2:
        raise SiteError(f"{data}: only one class ({present[0] if present else 'none'}) among the local cases; "
                        "calibration needs labelled cases of every class")
    # the threshold separates COVID-19 from the rest: both sides need cases (a model without COVID-19 output:
    # argmax, every class it has); a class missing at the site stays in every set (conformal, below)
    if POSITIVE in classes:
        sides = {POSITIVE: counts[POSITIVE],
                 f"non-{POSITIVE} ({' + '.join(c for c in classes if c != POSITIVE)})":
                     sum(n for c, n in counts.items() if c != POSITIVE)}
    else:
        sides = dict(counts)
    few = [f"{c}: {n}" for c, n in sides.items() if n < MIN_PER_CLASS]
    if few:
        raise SiteError(f"{data}: fewer than {MIN_PER_CLASS} local cases of {'; '.join(few)}; the operating "
                        f"threshold needs at least {MIN_PER_CLASS} on each side")
    for c, n in counts.items():
        if n < MIN_PER_CLASS:
            log.warning("%s: only %d local case(s) of %s: its sensitivity is not measured and it stays in every "
                        "prediction set", data, n, c)
    paths = df["path"].astype(str).tolist()
    patients = df["patient_id"].astype(str).tolist()
    y = np.array([classes.index(v) for v in df["label"].astype(str)])
    images = load_arrays(lm.preset, paths, batch_size, num_workers)

    parent_op = dict((lm.metrics or {}).get("operating_point") or {})
    cfg_op = ((lm.training or {}).get("config") or {}).get("operating_point") or {}
    target = target_sensitivity if target_sensitivity is not None else (
        parent_op.get("target_sensitivity") or cfg_op.get("target_sensitivity") or DEFAULT_TARGET)

    net = lm.model
    parent_logits = model_logits(net, images, batch_size)
    # before: the parent exactly as deployed (its temperature, its threshold); nothing fitted, nothing to cross-fit
    before_probs = _softmax(parent_logits, lm.temperature, lm.logit_bias)
    before_pred = _labels(before_probs, classes, lm.threshold)
    cv = cross_fit(net, images, parent_logits, y, patients, classes, coverage=coverage, target=target,
                   adapt_bn=adapt_bn, folds=folds, seed=seed, batch_size=batch_size, bias=bias, bias_l2=bias_l2)

    n_bn = 0
    logits = parent_logits
    if adapt_bn:
        n_bn = adapt_batchnorm(net, images, batch_size)
        logits = model_logits(net, images, batch_size)
    fitted = fit_site(logits, y, patients, classes, coverage, target, bias, bias_l2)
    conformal = {k: v for k, v in fitted["conformal"].items() if not k.startswith("_")}

    a = _frame(paths, patients, y, before_pred, before_probs, classes)
    b = _frame(paths, patients, y, cv["pred"], cv["probs"], classes)
    paired = paired_bootstrap(a, b, positive=POSITIVE, n_boot=n_boot, seed=seed) if POSITIVE in classes and n_boot > 0 else None
    metrics = {
        "data": f"the {len(y)} local cases of {data.name} ({len(set(patients))} patients)",
        "folds": cv["folds"], "by": "patient_id",
        "how": ("before: the parent checkpoint as it is (its temperature and threshold); after: out-of-fold, each "
                f"fold scored by {'AdaBN, ' if adapt_bn else ''}temperature{', logit biases' if bias else ''}, "
                "threshold and conformal sets fitted "
                "on the other folds' patients"),
        "before": _figures(y, before_probs, before_pred, classes, None),
        "after": _figures(y, cv["probs"], cv["pred"], classes, cv["sets"]),
        "paired_bootstrap": paired,
        "crepes_agreement": cv["crepes_agreement"],
    }
    parent_meta = {"path": str(model.resolve()), "sha256": file_sha256(model), "temperature": lm.temperature,
                   "logit_bias": lm.logit_bias, "threshold": lm.threshold, "operating_point": parent_op or None}
    if bundle.get(SITE_KEY):
        parent_meta["site_calibration"] = {k: bundle[SITE_KEY].get(k) for k in ("site", "date", "parent")}
    op = fitted["operating_point"]
    if op is not None:
        op = {**op, "chosen_on": "site", "note": (f"threshold chosen on the local cases of site {site!r} "
                                                 f"({len(y)} images, {counts.get(POSITIVE, 0)} {POSITIVE})")}
    info: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "site": site,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "data": {"path": str(data.resolve()), "sha256": file_sha256(data)},
        "parent": parent_meta,
        "n_per_class": counts,
        "n_images": int(len(y)),
        "n_patients": int(len(set(patients))),
        "coverage": float(coverage),
        "temperature": fitted["temperature"],
        "logit_bias": fitted["logit_bias"],
        "bias": ({"method": "bias-corrected temperature scaling (Alexandari et al. 2020), scipy L-BFGS-B",
                  "objective": f"sum of -log p(true class) + {bias_l2} * ||b||^2", "l2": float(bias_l2)}
                 if bias else None),
        "threshold": fitted["threshold"],
        "threshold_rule": (f"{POSITIVE} sensitivity >= {target} on the local cases" if fitted["threshold"] is not None
                           else "argmax (no COVID-19 output or no target)"),
        "adapt_bn": bool(adapt_bn),
        "bn_layers_adapted": n_bn,
        "conformal": conformal,
        "metrics": metrics,
    }
    info = _jsonable(info)
    new = dict(bundle)
    if adapt_bn:
        new["state_dict"] = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        if SUMMARY_KEY in new:  # the training-feature summary describes the unadapted features
            new.pop(SUMMARY_KEY)
    new["temperature"] = fitted["temperature"]
    new["threshold"] = fitted["threshold"]
    if fitted["logit_bias"] is not None:
        new["logit_bias"] = fitted["logit_bias"]
    else:  # fitted from the raw logits: a recalibrated --bias parent's bias no longer applies
        new.pop("logit_bias", None)
    new_metrics = dict(new.get("metrics") or {})
    if op is not None:
        new_metrics["operating_point"] = _jsonable(op)
    else:
        new_metrics.pop("operating_point", None)
    new_metrics["site"] = info["metrics"]
    new["metrics"] = new_metrics
    new[SITE_KEY] = info
    atomic_torch_save(new, out)
    return info


def _jsonable(o: Any) -> Any:
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o
