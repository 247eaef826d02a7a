"""Conformal prediction sets of a site-calibrated checkpoint (numpy only: the ONNX paths import this).

``covidcxr site calibrate`` writes a checkpoint whose bundle carries, under the key
:data:`SITE_KEY` (``"site_calibration"``), a JSON-serialisable dict. Its schema (version 1)::

    schema_version   1
    site             site name given with --site (free text)
    date             ISO-8601 UTC time of the calibration, e.g. "2026-12-07T15:04:05Z"
    data             the local manifest's path and sha256
    parent           {"path", "sha256" (of the parent checkpoint file), "temperature", "logit_bias",
                      "threshold", "operating_point"}: the parent's own values, kept here because the site
                      checkpoint's ordinary ``temperature``/``threshold`` fields are the local ones
    n_per_class      {class: number of local images}, n_images, n_patients
    coverage         nominal per-class coverage 1 - alpha, e.g. 0.9
    temperature      temperature fitted on the local cases (also the checkpoint's ``temperature``)
    logit_bias       with ``--bias``: per-class biases fitted with the temperature (also the checkpoint's
                     ``logit_bias``; probabilities are softmax(z / T + b)), else None; ``bias`` records
                     the method and its L2 weight
    threshold        COVID-19 threshold chosen on the local cases (also the checkpoint's ``threshold``)
                     and how (``threshold_rule``)
    adapt_bn         True when BatchNorm statistics were re-estimated on the local images (AdaBN)
    conformal        {
        "method":     "class-conditional (Mondrian) split-conformal, crepes <version>",
        "score":      "1 - p(class)", computed on the probabilities *after* the site temperature (and bias),
        "classes":    class names in logit order,
        "thresholds": {class: q or None}; class c is in the set when 1 - p(c) <= q;
                      None: the class is always in the set,
        "always_in":  classes always in the set because too few local cases for the coverage
                      (with n cases, when (n + 1) * alpha <= 1: no score can be excluded),
        "n":          {class: number of calibration scores},
      }
    metrics          cross-fitted before/after figures on the local cases (k-fold by patient):
                     {"folds", "by": "patient_id", "before": {...}, "after": {...}}, each with
                     macro_sensitivity, sensitivity {class}, covid_auc, and for "after"
                     set_coverage {class} and mean_set_size

:func:`prediction_set` is the one function every entry point (predict records, the service, the
DICOM SR, the Ray engine) calls for a record of a site checkpoint; :func:`is_uncertain` says
whether the set is shown as "uncertain: refer".
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

SITE_KEY = "site_calibration"
SCHEMA_VERSION = 1
UNCERTAIN_TEXT = "uncertain: refer"
#: float slack when comparing a score with a stored threshold: rounding only (a threshold is itself a
#: calibration score, which the same probabilities must reproduce as "in")
_EPS = 1e-12


class SiteCalibrationError(ValueError):
    """A site_calibration dict that does not fit the model's classes or lacks its thresholds."""


def conformal_score(probs: np.ndarray) -> np.ndarray:
    """Non-conformity of each class: 1 - p(class) (crepes' ``hinge``)."""
    return 1.0 - np.asarray(probs, dtype=np.float64)


def class_threshold(scores: Sequence[float], coverage: float) -> float | None:
    """The largest score still inside the set for one class at ``coverage``, or None (always in).

    Matches crepes' non-smoothed Mondrian p-value, p(s) = (#{calibration scores >= s} + 1) / (n + 1),
    with the class in the set when p(s) >= alpha = 1 - coverage: s is in when at least
    j = ceil(alpha (n + 1) - 1) calibration scores are >= s, i.e. s <= the j-th largest score.
    With j <= 0 ((n + 1) alpha <= 1) every score is in: the class is always in the set.
    """
    a = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    alpha = 1.0 - float(coverage)
    j = math.ceil(round(alpha * (len(a) + 1) - 1, 9))
    if j <= 0 or len(a) == 0:
        return None
    return float(a[j - 1])


def prediction_set(probs: Sequence[float], classes: Sequence[str], site: Mapping[str, Any]) -> list[str]:
    """The classes in the conformal prediction set of one record, in ``classes`` order.

    ``probs`` are the predictor's probabilities for ``classes`` (after the checkpoint's temperature);
    ``site`` is the bundle's ``site_calibration`` dict (schema in this module's docstring). The set can
    hold several classes (shown as "uncertain: refer") or none (no class is typical enough of the
    site's calibration cases; also referred, see :func:`is_uncertain`).
    """
    conf = site.get("conformal") if isinstance(site, Mapping) else None
    if not isinstance(conf, Mapping) or not isinstance(conf.get("thresholds"), Mapping):
        raise SiteCalibrationError("site_calibration has no conformal thresholds")
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    classes = list(classes)
    if len(p) != len(classes):
        raise SiteCalibrationError(f"{len(p)} probabilities for {len(classes)} classes")
    thresholds = conf["thresholds"]
    missing = [c for c in classes if c not in thresholds]
    if missing:
        raise SiteCalibrationError(f"site_calibration has no conformal threshold for {missing}")
    always = set(conf.get("always_in") or [])
    out = []
    for c, s in zip(classes, conformal_score(p)):
        q = thresholds[c]
        if c in always or q is None or s <= float(q) + _EPS:
            out.append(c)
    return out


def is_uncertain(pset: Sequence[str]) -> bool:
    """True when the set is not a single class: more than one class ("uncertain: refer"), or none."""
    return len(list(pset)) != 1


def describe_set(pset: Sequence[str]) -> str:
    """One short text for a set: the class alone, or "uncertain: refer (a, b)" / "uncertain: refer (no class)"."""
    pset = list(pset)
    if len(pset) == 1:
        return pset[0]
    return f"{UNCERTAIN_TEXT} ({', '.join(pset) if pset else 'no class'})"


def site_info(bundle_or_meta: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The ``site_calibration`` dict of a checkpoint bundle (or ``LoadedModel.meta``), or None."""
    if not isinstance(bundle_or_meta, Mapping):
        return None
    site = bundle_or_meta.get(SITE_KEY)
    return dict(site) if isinstance(site, Mapping) else None
