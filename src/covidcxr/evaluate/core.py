"""``covidcxr evaluate``: a checkpoint on a manifest split -> metrics.json, report, predictions.csv."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from covidcxr.decision import POSITIVE_CLASS, DecisionRule
from covidcxr.evaluate.metrics import (
    MetricsError,
    apply_temperature,
    compute_metrics,
    expected_calibration_error,
    fit_temperature,
    group_breakdown,
    nll,
    operating_point,
    predict_labels,
)
from covidcxr.evaluate.groups import group_report, training_dominant_sources
from covidcxr.overrides import with_overrides

log = logging.getLogger(__name__)

SPLIT_CHOICES = ("test", "val", "train", "all")
#: below this many val images, fitting a temperature or threshold gets a warning
SMALL_VAL = 30


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def select_split(df: pd.DataFrame, split: str, manifest: str | Path = "") -> pd.DataFrame:
    """Rows of one split (or all rows); a clear error when the split is empty or unknown."""
    if split not in SPLIT_CHOICES:
        raise MetricsError(f"unknown split {split!r}; choose one of {list(SPLIT_CHOICES)}")
    if split == "all":
        return df.reset_index(drop=True)
    if "split" not in df.columns:
        raise MetricsError(f"{manifest}: manifest has no 'split' column; use --split all or build it with covidcxr data build")
    sub = df[df["split"] == split].reset_index(drop=True)
    if sub.empty:
        raise MetricsError(f"{manifest}: split {split!r} has no rows (splits present: {sorted(df['split'].dropna().unique())})")
    return sub


def label_indices(frame: pd.DataFrame, classes: Sequence[str], manifest: str | Path = "") -> np.ndarray:
    from covidcxr.data.labels import label_index_map

    index = label_index_map(list(classes))  # a binary model also reads normal/pneumonia as non-COVID
    unknown = sorted(set(frame["label"].astype(str)) - set(index))
    if unknown:
        raise MetricsError(
            f"{manifest}: label(s) {unknown} are not classes of this model ({classes}); "
            "filter the manifest or evaluate a model trained on these labels"
        )
    return np.array([index[str(v)] for v in frame["label"]], dtype=np.int64)


def _col(frame: pd.DataFrame, name: str) -> list[Any]:
    return list(frame[name]) if name in frame.columns else [None] * len(frame)


def evaluate_predictions(
    frame: pd.DataFrame,
    probs: np.ndarray,
    classes: Sequence[str],
    *,
    positive: str | None = "COVID-19",
    threshold: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    target_sensitivity: float = 0.95,
    temperature: float = 1.0,
    val: tuple[pd.DataFrame, np.ndarray] | None = None,
    rule: DecisionRule | None = None,
    split: str | None = None,
    same_data: bool = False,
    label_after_calibration: bool = False,
    dominant: Mapping[str, str] | None = None,
    dominant_from: str = "the evaluated images",
) -> dict[str, Any]:
    """Every figure of the report from a frame (label, patient_id, source, view) and its probabilities.

    Labels follow ``rule`` (a :class:`covidcxr.decision.DecisionRule`; default: ``threshold`` given by
    hand, else argmax). With ``val`` (frame, probs), a temperature is fitted on it and the calibration
    after scaling is reported; the headline metrics stay those of the probabilities as given. When
    ``same_data`` (the evaluated split *is* ``val``), the "after" ECE is cross-fitted: each half of the
    patients is scaled with a temperature fitted on the other half, never on itself. With
    ``label_after_calibration`` the headline figures use the probabilities after the fitted temperature
    (what the checkpoint will give once that temperature is stored in it).

    ``groups`` (:func:`covidcxr.evaluate.groups.group_report`) holds the source x class table, the
    worst-group sensitivity and the non-dominant-source specificity at the same labels, with the
    dominant source of each class from ``dominant`` (``dominant_from`` names where it was counted),
    else from the evaluated images.
    """
    classes = list(classes)
    if rule is None:
        rule = DecisionRule(threshold, positive or POSITIVE_CLASS, "user" if threshold is not None else None)
    threshold = rule.threshold if rule.uses_threshold(classes) else None
    y = label_indices(frame, classes)
    pats = [str(p) for p in frame["patient_id"]]
    kw = dict(positive=positive, threshold=threshold, seed=seed)
    t_fit = None
    if val is not None:
        t_fit = fit_temperature(label_indices(val[0], classes), val[1])
    head = apply_temperature(probs, t_fit) if (label_after_calibration and t_fit is not None) else probs
    metrics = compute_metrics(y, head, pats, classes, n_boot=n_boot, target_sensitivity=target_sensitivity, **kw)
    calib: dict[str, Any] = {
        "before": expected_calibration_error(y, probs),
        "nll_before": nll(y, probs),
        "temperature_used": float(temperature),
    }
    if val is not None:
        vf, vp = val
        vy = label_indices(vf, classes)
        assert t_fit is not None
        if same_data:
            after = _cross_fitted(y, probs, pats, seed)
            how = ("temperature fitted on the validation split, which is the split evaluated here: the 'after' "
                   "ECE is cross-fitted (two patient-disjoint halves, each scaled with the temperature fitted "
                   "on the other half), so it is never measured on the data it was fitted on")
        else:
            after = apply_temperature(probs, t_fit)
            how = f"temperature fitted on the validation split ({len(vy)} images), applied to this split"
        calib.update(
            temperature_fitted=float(temperature * t_fit),
            temperature_relative=float(t_fit),
            after=expected_calibration_error(y, after),
            nll_after=nll(y, after),
            after_measured="cross-fitted on the evaluated split" if same_data else "on the evaluated split",
            fitted_on={"split": "val", "n_images": int(len(vy)), "n_patients": int(vf["patient_id"].nunique())},
            note=how + ("; the headline figures above use the new temperature" if label_after_calibration else ""),
        )
    nb = max(200, n_boot // 2) if n_boot else 0
    metrics["decision"] = rule.describe(classes, split)
    op = metrics.get("operating_point")
    if op and op.get("threshold") is not None:
        # the target-sensitivity threshold compute_metrics fits on the evaluated data: say so plainly
        op["fitted_on"] = split or "the evaluated data"
        op["note"] = (f"fitted on this {split or 'evaluated'} split itself, for reference: optimistic, "
                      "and not the decision rule")
    # the per-group figures use the labels of the headline figures (same rule, same probabilities)
    pred = predict_labels(head, threshold, classes.index(positive) if positive in classes else None)
    groups = group_report(y, pred, list(frame["source"]) if "source" in frame.columns else None, pats, classes,
                          positive=positive, dominant=dominant, dominant_from=dominant_from, n_boot=n_boot,
                          seed=seed)
    return {
        "decision_rule": rule.to_dict(classes, split),
        "metrics": metrics,
        "groups": groups,
        "calibration": calib,
        "by_source": group_breakdown(y, head, pats, classes, _col(frame, "source"), n_boot=nb, **kw),
        "by_view": group_breakdown(y, head, pats, classes, _col(frame, "view"), n_boot=nb, **kw),
    }


def _cross_fitted(y: np.ndarray, probs: np.ndarray, patients: Sequence[str], seed: int) -> np.ndarray:
    """Probabilities where each patient-disjoint half is scaled by a temperature fitted on the other half."""
    uniq = np.array(sorted(set(patients)))
    rng = np.random.default_rng(seed)
    half = set(rng.permutation(uniq)[: len(uniq) // 2].tolist())
    in_a = np.array([p in half for p in patients])
    out = np.array(probs, dtype=np.float64, copy=True)
    if in_a.all() or not in_a.any():  # one patient: nothing to cross-fit on
        return out
    for fit_mask, apply_mask in ((~in_a, in_a), (in_a, ~in_a)):
        out[apply_mask] = apply_temperature(probs[apply_mask], fit_temperature(y[fit_mask], probs[fit_mask]))
    return out


def _predictions_frame(frame: pd.DataFrame, probs: np.ndarray, classes: list[str], pred: np.ndarray,
                       rule: DecisionRule | None = None) -> pd.DataFrame:
    keep = [c for c in ("patient_id", "path", "source", "view", "split", "label") if c in frame.columns]
    out = frame[keep].copy()
    out.insert(0, "index", frame["index"] if "index" in frame.columns else range(len(frame)))
    out["pred"] = [classes[i] for i in pred]
    if rule is not None:  # every row states the rule that made its label
        out["rule"] = "threshold" if rule.uses_threshold(classes) else "argmax"
        out["threshold"] = rule.threshold if rule.uses_threshold(classes) else None
    for i, c in enumerate(classes):
        out[f"prob_{c}"] = probs[:, i]
    out["correct"] = out["pred"] == out["label"].astype(str)
    return out


def _jsonable(o: Any) -> Any:
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating, float)):
        f = float(o)
        return None if math.isnan(f) or math.isinf(f) else f
    if isinstance(o, np.bool_):
        return bool(o)
    return o


def _update_bundle(ckpt: str | Path, what: str, fields: dict[str, Any], metrics: dict[str, Any]) -> None:
    """Write fields into a checkpoint's bundle (plain bundle or Lightning), atomically."""
    import torch

    from covidcxr.models.checkpoint import CheckpointError, atomic_torch_save

    from covidcxr.safeload import torch_load

    obj = torch_load(ckpt)  # weights_only=True unless --trust-checkpoint
    bundle = obj["covidcxr"] if isinstance(obj, dict) and "covidcxr" in obj else obj
    if not isinstance(bundle, dict) or "state_dict" not in bundle:
        raise CheckpointError(f"{ckpt}: cannot store a {what} in this checkpoint")
    bundle.update(fields)
    bundle.setdefault("metrics", {}).update(metrics)
    atomic_torch_save(obj, ckpt)


def save_temperature(ckpt: str | Path, temperature: float, info: dict[str, Any]) -> None:
    """Write the calibration temperature into a checkpoint."""
    _update_bundle(ckpt, "temperature", {"temperature": float(temperature)}, {"calibration": info})


def save_threshold(ckpt: str | Path, threshold: float, info: dict[str, Any]) -> None:
    """Write the COVID-19 operating threshold into a checkpoint; predict and serve then use it."""
    _update_bundle(ckpt, "threshold", {"threshold": float(threshold)}, {"operating_point": info})


def val_operating_point(
    frame: pd.DataFrame, probs: np.ndarray, classes: Sequence[str], positive: str, target: float
) -> dict[str, Any]:
    """Choose the positive-class threshold reaching ``target`` sensitivity on validation data."""
    y = label_indices(frame, classes)
    is_pos = y == list(classes).index(positive)
    pat = frame["patient_id"].astype(str).to_numpy()
    op = operating_point(is_pos, probs[:, list(classes).index(positive)], np.zeros(0), np.zeros(0), target, 0.95, pat)
    op["note"] = f"threshold chosen on the validation split ({len(y)} images, {int(is_pos.sum())} {positive})"
    op["chosen_on"] = "val"
    op["positive"] = positive
    return op


@dataclass(frozen=True)
class EvaluateConfig:
    """How ``covidcxr evaluate`` evaluates; :func:`evaluate_checkpoint` takes one (or keyword overrides)."""

    # what: the manifest split evaluated; the class whose operating point is reported (and set)
    split: str = "test"
    positive: str = POSITIVE_CLASS
    # figures: bootstrap resamples over patients for the 95 % CIs (0: none) and their seed; the sensitivity the
    # reported (and, with set_threshold, stored) operating point reaches
    n_boot: int = 1000
    seed: int = 0
    target_sensitivity: float = 0.95
    # the checkpoint's decision: calibrate fits a temperature on the val split and stores it; set_threshold chooses
    # the threshold reaching target_sensitivity on val (never on the evaluated split) and stores it; threshold
    # overrides the stored one for this evaluation only (None: the checkpoint's, else argmax)
    calibrate: bool = False
    set_threshold: bool = False
    threshold: float | None = None
    # inference: batch size, decode worker processes, a progress bar
    batch_size: int = 16
    num_workers: int = 0
    progress: bool = True


#: every file ``evaluate`` writes into its report folder
REPORT_FILES = ("metrics.json", "predictions.csv", "report.md", "report.html", "confusion_matrix.png", "roc.png",
                "pr.png", "reliability.png")


def evaluate_checkpoint(model: str | Path, manifest: str | Path, config: EvaluateConfig | None = None, *,
                        out: str | Path = "report", **overrides: Any) -> dict[str, Any]:
    """Evaluate a checkpoint on a manifest split and write OUT/{metrics.json, report.html, report.md,
    predictions.csv, *.png}. Returns the metrics.json content.

    ``config``: an :class:`EvaluateConfig` (what each setting does); keyword ``overrides`` replace its fields
    (``evaluate_checkpoint(m, manifest, split="val", out="rep", n_boot=20)``).
    """
    c = with_overrides(EvaluateConfig, config, overrides, where="evaluate_checkpoint")
    split, n_boot, seed, positive, target_sensitivity = c.split, c.n_boot, c.seed, c.positive, c.target_sensitivity
    calibrate, set_threshold, threshold = c.calibrate, c.set_threshold, c.threshold
    batch_size, num_workers, progress = c.batch_size, c.num_workers, c.progress
    from covidcxr.data import read_manifest
    from covidcxr.data.manifest import repeated_images
    from covidcxr.evaluate.inference import predict_frame
    from covidcxr.evaluate.report import write_report
    from covidcxr.predict import Predictor

    predictor = Predictor.from_path(model)
    if calibrate and predictor.logit_bias is not None:  # a new T alone would leave b fitted for the old one
        raise MetricsError(f"{model}: a site checkpoint with a logit bias (site calibrate --bias); --calibrate would "
                           "refit its temperature alone: recalibrate it with `covidcxr site calibrate --recalibrate "
                           "--bias` instead")
    classes = list(predictor.classes)
    df = read_manifest(manifest)
    frame = select_split(df, split, manifest)
    label_indices(frame, classes, manifest)  # fail before inference on foreign labels
    repeats = repeated_images(frame, manifest)
    if repeats:  # one image counted twice would bias every metric and narrow every CI
        raise MetricsError(repeats)
    out = Path(out)
    from covidcxr.outpaths import OverwriteError, refuse_overwrite

    try:  # a manifest or model kept in the report folder under a report file's name survives
        refuse_overwrite([out / n for n in REPORT_FILES], [manifest, predictor.path or model], "covidcxr evaluate")
    except OverwriteError as err:
        raise MetricsError(str(err)) from None
    if out.exists() and not out.is_dir():
        raise MetricsError(f"{out}: --out must be a folder (the report's files go into it), not a file")
    out.mkdir(parents=True, exist_ok=True)

    pr = predict_frame(predictor, frame, batch_size=batch_size, num_workers=num_workers, progress=progress)
    if len(pr.frame) == 0:
        raise MetricsError(f"{manifest}: no readable image in split {split!r} ({len(pr.failures)} failed)")
    pos = positive if positive in classes else None
    if set_threshold and pos is None:
        raise MetricsError(f"{model}: --set-threshold needs a {positive!r} output; classes are {classes}")
    if set_threshold and threshold is not None:
        raise MetricsError("--threshold and --set-threshold exclude each other: one chooses the threshold on val, "
                           "the other sets it by hand")
    vp = None
    if calibrate or set_threshold:
        vframe = select_split(df, "val", manifest)
        vp = predict_frame(predictor, vframe, batch_size=batch_size, num_workers=num_workers, progress=progress)
        if len(vp.frame) < SMALL_VAL:
            log.warning("%s: the val split has only %d readable images; the temperature/threshold fitted on it "
                        "and written into %s will be noisy", manifest, len(vp.frame), model)

    # The decision rule is settled before any figure is computed: the report describes the checkpoint as
    # predict and serve will use it after this command (new threshold included).
    rule = DecisionRule.from_predictor(predictor)
    op = None
    if set_threshold:
        vprobs = vp.probs
        if calibrate:
            vprobs = apply_temperature(vp.probs, fit_temperature(label_indices(vp.frame, classes), vp.probs))
        op = val_operating_point(vp.frame, vprobs, classes, pos, target_sensitivity)
        if op.get("threshold") is None:
            raise MetricsError(f"{manifest}: the val split has no {pos} image; cannot choose a threshold")
        op["manifest_sha256"] = sha256_file(manifest)
        rule = DecisionRule.from_checkpoint(op["threshold"], {"operating_point": op})
    elif threshold is not None:
        rule = rule.override(threshold)
    elif calibrate and rule.uses_threshold(classes):
        log.warning("%s: --calibrate changes the temperature, but the stored threshold %.4f was chosen at the old "
                    "one; add --set-threshold to choose it again on val", model, rule.threshold)
    thr = rule.threshold if rule.uses_threshold(classes) else None
    val = (vp.frame, vp.probs) if calibrate else None
    dominant, dominant_from = training_dominant_sources(df, classes, manifest)
    res = evaluate_predictions(pr.frame, pr.probs, classes, positive=pos, n_boot=n_boot, seed=seed,
                               target_sensitivity=target_sensitivity, temperature=predictor.temperature, val=val,
                               rule=rule, split=split, same_data=split == "val", label_after_calibration=True,
                               dominant=dominant, dominant_from=dominant_from)
    # the probabilities the checkpoint gives after this command (its new temperature, when calibrating)
    head = apply_temperature(pr.probs, res["calibration"]["temperature_relative"]) if calibrate else pr.probs
    training = {k: v for k, v in predictor.training.items() if k != "config"}
    temp = res["calibration"].get("temperature_fitted", predictor.temperature)
    res["model"] = {"path": str(model), "arch": predictor.arch, "preset": predictor.preset.name,
                    "temperature": temp, "threshold": thr, "training": training}
    res["data"] = {"manifest": str(manifest), "sha256": sha256_file(manifest), "split": split,
                   "n_rows": int(len(frame)), "n_evaluated": int(len(pr.frame))}
    res["failures"] = pr.failures
    res = _jsonable(res)

    y = label_indices(pr.frame, classes)
    pred = rule.label_indices(head, classes)
    _predictions_frame(pr.frame, head, classes, pred, rule).to_csv(out / "predictions.csv", index=False)
    (out / "metrics.json").write_text(json.dumps(res, indent=2), encoding="utf-8")
    write_report(res, y, head, out)
    if calibrate:
        cal = res["calibration"]
        save_temperature(model, cal["temperature_fitted"], {k: v for k, v in cal.items() if k not in ("before", "after")})
        log.info("stored temperature %.3f in %s", cal["temperature_fitted"], model)
    if set_threshold:
        save_threshold(model, op["threshold"], _jsonable(op))
        res["stored_threshold"] = _jsonable(op)
        log.info("stored threshold %.4f in %s", op["threshold"], model)
    return res
