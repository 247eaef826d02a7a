"""``covidcxr site check``: do a hospital's films look like the data the model was trained on?

No labels needed. The films' pooled features are compared with the training-feature summary the
checkpoint carries (:mod:`covidcxr.models.features`): for each training source, the fraction of the
site's films beyond the 95th percentile of that source's own held-out films' distance to the source
(by construction about 5 % for films like that source). A film "fits" a training source when it is
within that source's 95th percentile; the verdict figure is the fraction of films that fit **no**
training source. It is a screen for a shift of the image distribution, not a measure of accuracy.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)

#: verdict: the films differ from every training source when more than this fraction fits none of them
#: (films like a training source: about 0.05 by construction, a little more by chance on small sets)
DIFFERS_FRACTION = 0.25
LOOKS_LIKE = "looks like the training data"
DIFFERS = "differs from every training source: calibrate locally before use"
RESEARCH_NOTE = "Research use only: a screen for image-distribution shift, not a measure of diagnostic accuracy."


class SiteError(ValueError):
    """Input to site check / calibrate that cannot be used (one line, naming the file)."""


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_model(model: str | os.PathLike) -> Any:
    """The checkpoint as :func:`covidcxr.models.load` gives it, with the preset the predictor reads films with
    (for a lung-crop model, the preset that carries its lung segmenter), so site figures see what predict sees."""
    from covidcxr.models.checkpoint import load
    from covidcxr.predict import Predictor
    from covidcxr.predict.records import PredictorError

    lm = load(model)
    try:
        pred = Predictor.from_path(model, backend="torch")
    except PredictorError as err:
        raise SiteError(str(err)) from None
    lm.model, lm.preset = pred.torch_model, pred.preset  # one copy of the weights
    return lm


def reference_summary(lm: Any, manifest: str | os.PathLike, batch_size: int = 16) -> dict[str, Any]:
    """A training-feature summary computed now from a training manifest (its train rows fit the
    distribution, its val rows give the spread), for checkpoints saved without one."""
    from covidcxr.data.manifest import read_manifest
    from covidcxr.models.features import summarise_frames

    df = read_manifest(manifest)
    if "split" in df.columns and (df["split"] == "train").any():
        train, ref = df[df["split"] == "train"], df[df["split"] == "val"]
    else:
        train, ref = df, None
    if len(train) < 3:
        raise SiteError(f"{manifest}: fewer than 3 training images to summarise")
    summary = summarise_frames(lm.model, lm.preset, train, ref, batch_size=batch_size)
    summary["computed_from"] = str(Path(manifest).resolve())
    return summary


def load_summary(lm: Any, model_path: str | os.PathLike, reference_data: str | os.PathLike | None,
                 batch_size: int = 16) -> tuple[dict[str, Any], str]:
    """The checkpoint's stored summary, else one from ``reference_data``, else a one-line refusal."""
    from covidcxr.models.features import SUMMARY_KEY

    stored = lm.meta.get(SUMMARY_KEY)
    if isinstance(stored, dict) and reference_data is None:
        return stored, "stored in the checkpoint at training time"
    if reference_data is not None:
        return reference_summary(lm, reference_data, batch_size), f"computed from --reference-data {reference_data}"
    site = lm.meta.get("site_calibration") or {}
    why = ("its BatchNorm statistics were adapted to a site (--adapt-bn), so the training summary no longer "
           "applies" if site.get("adapt_bn") else "saved before covidcxr stored one")
    raise SiteError(f"{model_path}: the checkpoint has no training-feature summary ({why}); pass --reference-data "
                    "with the manifest it was trained on")


def site_features(lm: Any, files: Sequence[str], batch_size: int = 16,
                  num_workers: int = 0) -> tuple[list[str], np.ndarray, np.ndarray, list[dict[str, str]]]:
    """(readable paths, features, logits, failures) for image files, through the predictor's reader and preset."""
    from covidcxr.models.features import extract_features
    from covidcxr.predict.inputs import Loader, iter_batches, stack

    ok: list[str] = []
    failures: list[dict[str, str]] = []
    feats, logits = [], []
    for items in iter_batches(list(files), Loader(lm.preset), batch_size, num_workers):
        good = [it for it in items if it.array is not None]
        for it in items:
            if it.array is None:
                failures.append({"path": it.path, "error": str(it.error)})
                log.warning("skipped %s: %s", it.path, it.error)
        if good:
            f, z = extract_features(lm.model, [stack(good)])
            feats.append(f)
            logits.append(z)
            ok.extend(it.path for it in good)
    if not feats:
        return ok, np.zeros((0, 0)), np.zeros((0, len(lm.classes))), failures
    return ok, np.concatenate(feats), np.concatenate(logits), failures


def assess(summary: dict[str, Any], feats: np.ndarray) -> dict[str, Any]:
    """The figures and the verdict for the site's features against the training summary."""
    from covidcxr.models.features import feature_distances

    d = feature_distances(summary, feats)
    sources = summary["sources"]
    per_source: dict[str, Any] = {}
    fits = np.zeros((len(feats), len(sources)), dtype=bool)
    for j, (name, s) in enumerate(sources.items()):
        q95, q50 = float(s["own"]["q95"]), float(s["own"]["q50"])
        ds = d[f"source:{name}"]
        fits[:, j] = ds <= q95
        per_source[name] = {
            "n_train": s.get("n_train"), "spread_from": s.get("spread_from"), "n_spread": s.get("n_spread"),
            "own_q95": q95,
            "fraction_beyond_own_q95": float((ds > q95).mean()),
            "median_distance_in_source_medians": float(np.median(ds) / q50) if q50 > 0 else None,
        }
    overall = summary["all"]
    frac_none = float((~fits.any(1)).mean())
    med_units = float(np.median(d["all"]) / overall["q50"]) if overall["q50"] > 0 else None
    differs = frac_none > DIFFERS_FRACTION
    nearest = [list(sources)[i] for i in np.argmin(np.stack([d[f"source:{n}"] / sources[n]["own"]["q95"]
                                                              for n in sources], 1), 1)]
    return {
        "fraction_fitting_no_source": frac_none,
        "fraction_beyond_training_q95": float((d["all"] > overall["q95"]).mean()),
        "median_distance_in_training_medians": med_units,
        "expected_for_training_like_films": "about 0.05 of films beyond a source's own 95th percentile",
        "per_source": per_source,
        "verdict": DIFFERS if differs else LOOKS_LIKE,
        "differs": bool(differs),
        "verdict_rule": (f"differs when more than {DIFFERS_FRACTION:.0%} of the films lie beyond the 95th percentile "
                         "of every training source's own spread"),
        "_distances": d["all"], "_nearest": nearest, "_fits_none": ~fits.any(1),
    }


def check_site(model: str | os.PathLike, inputs: Sequence[str | os.PathLike], out: str | os.PathLike, *,
               reference_data: str | os.PathLike | None = None, batch_size: int = 16,
               num_workers: int = 0) -> dict[str, Any]:
    """Run the check; write ``out/site_check.json`` and ``out/site_check_images.csv``; return the report."""
    from covidcxr.decision import DecisionRule, softmax_with_temperature
    from covidcxr.predict.inputs import collect_inputs
    from covidcxr.site.sets import SITE_KEY, is_uncertain, prediction_set
    from covidcxr.reference_models import resolve_model

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SiteError(f"{out}: --out must be a folder")
    lm = load_model(model)
    if lm.task != "classification":
        raise SiteError(f"{model}: a {lm.task!r} checkpoint; site check needs a classifier")
    summary, summary_from = load_summary(lm, model, reference_data, batch_size)
    try:
        files = collect_inputs([str(p) for p in inputs])
    except Exception as err:  # an unreadable manifest CSV: one line naming it
        raise SiteError(str(err)) from None
    if not files:
        raise SiteError(f"no images found in {', '.join(map(str, inputs))}")
    paths, feats, logits, failures = site_features(lm, files, batch_size, num_workers)
    if not paths:
        raise SiteError(f"none of the {len(files)} input file(s) could be read (first: {failures[0]['error']})")
    probs = softmax_with_temperature(logits, lm.temperature, lm.logit_bias)
    rule = DecisionRule.from_checkpoint(lm.threshold, lm.metrics)
    labels = [lm.classes[i] for i in rule.label_indices(probs, lm.classes)]
    try:
        res = assess(summary, feats)
    except (KeyError, ValueError) as err:  # a summary of another model (a swapped head, a hand-edited bundle)
        raise SiteError(f"{model}: its training-feature summary does not fit the model ({err})") from None
    site = lm.meta.get(SITE_KEY)
    sets = [prediction_set(p, lm.classes, site) for p in probs] if isinstance(site, dict) else None
    model_file = resolve_model(model)  # "reference": the shipped file
    report: dict[str, Any] = {
        "model": str(Path(model_file).resolve()),
        "model_sha256": file_sha256(model_file),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "inputs": [str(p) for p in inputs],
        "n_images": len(paths),
        "n_unreadable": len(failures),
        "unreadable": failures,
        "summary_from": summary_from,
        "training_sources": {n: s.get("n_train") for n, s in summary["sources"].items()},
        **{k: v for k, v in res.items() if not k.startswith("_")},
        "predicted_label_mix": {c: int(labels.count(c)) for c in lm.classes},
        "decision_rule": rule.describe(lm.classes),
        "note": RESEARCH_NOTE,
    }
    if sets is not None:
        report["uncertain_sets"] = int(sum(is_uncertain(s) for s in sets))
    report["verdict_line"] = verdict_line(report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "site_check.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    with open(out / "site_check_images.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "distance", "distance_in_training_medians", "nearest_source", "fits_no_source"])
        med = float(summary["all"]["q50"]) or 1.0
        for i, p in enumerate(paths):
            w.writerow([p, labels[i], f"{res['_distances'][i]:.4f}", f"{res['_distances'][i] / med:.3f}",
                        res["_nearest"][i], int(res["_fits_none"][i])])
        for fl in failures:
            w.writerow([fl["path"], "", "", "", "", ""])
    return report


def verdict_line(report: dict[str, Any]) -> str:
    return (f"{report['verdict']} ({report['fraction_fitting_no_source']:.0%} of {report['n_images']} films lie beyond "
            f"the 95th percentile of every training source's own spread; median distance "
            f"{report['median_distance_in_training_medians']:.2f}x the training median)")
