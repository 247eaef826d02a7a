"""One image in, one :class:`Analysis` out: prediction, severity, plausibility and the heatmap overlay.

The record comes from the one prediction pipeline (:class:`covidcxr.predict.pipeline.Pipeline`) on the
array that :func:`covidcxr.io.decode` returns, as ``covidcxr predict``, the service and the Ray engine
get theirs, so the SR carries the same label, probabilities, prediction set and severity as the CLI for
the same file. Only the DICOM header check (body part, lateral view) is the node's own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from covidcxr.predict import POSITIVE_CLASS, Predictor, SeverityScorer
from covidcxr.predict.pipeline import Pipeline, PipelineConfig

log = logging.getLogger(__name__)

#: Header values that say an image is not a frontal chest X-ray (the node then flags instead of labelling).
_CHEST_PARTS = {"", "CHEST", "THORAX", "LUNG", "CHEST_TO_PELVIS", "CHESTABDOMEN", "PORTABLE CHEST"}
_LATERAL_VIEWS = {"LL", "RL", "LATERAL", "LLD", "RLD"}
#: Side of the secondary capture (pixels): the model's crop shown at a readable size.
DISPLAY_SIDE = 512


@dataclass
class Analysis:
    """The result for one image. ``flag`` set means: not labelled, and the SR says why."""

    label: str | None = None
    probabilities: dict[str, float] | None = None
    threshold: float | None = None
    severity: dict[str, Any] | None = None
    plausibility: dict[str, Any] | None = None
    flag: str | None = None
    flag_reason: str | None = None
    overlay: np.ndarray | None = None  # H x W x 3 uint8: the model's crop with the heatmap blended on
    notes: list[str] = field(default_factory=list)
    error: str | None = None  # the analysis failed (a software error, not bad input): the SR says so
    prediction_set: list[str] | None = None  # a site-calibrated model's conformal set (issue 18)
    model: dict[str, Any] | None = None  # {name, version, sha256} of the model that made the record
    #: the pipeline's whole record (without arrays); None when the DICOM header alone decided
    record: dict[str, Any] | None = None

    @property
    def flagged(self) -> bool:
        return self.flag is not None


def header_flag(header: Any) -> tuple[str, str] | None:
    """A (flag, reason) when the DICOM header itself says this is no frontal chest X-ray."""
    part = str(header.get("BodyPartExamined", "") or "").strip().upper()
    if part not in _CHEST_PARTS:
        return "not_a_chest_xray", f"Body Part Examined is {part!r}, not chest"
    view = str(header.get("ViewPosition", "") or "").strip().upper()
    if view in _LATERAL_VIEWS:
        return "not_a_frontal_cxr", f"View Position is {view!r} (lateral); the model reads frontal views"
    return None


def plausibility_flag(rec: dict[str, Any]) -> tuple[str, str] | None:
    """The plausibility verdict a prediction record carries (covidcxr.segment.plausibility), if it failed.

    Accepted shapes: ``rec["plausibility"] = {"plausible": bool, "flag": str, "reason": str}`` and a
    top-level ``rec["flag"]``; a record without them passes.
    """
    p = rec.get("plausibility")
    if isinstance(p, dict):
        ok = p.get("plausible", p.get("ok", True))
        if ok is False or p.get("flag"):
            return str(p.get("flag") or "not_a_frontal_cxr"), str(p.get("reason") or "implausible lungs")
    if rec.get("flag"):
        return str(rec["flag"]), str(rec.get("flag_reason") or rec.get("reason") or rec["flag"])
    return None


class Engine:
    """The models the node and ``predict --dicom-out`` use, loaded once."""

    def __init__(self, predictor: Predictor, severity: SeverityScorer | None = None, always_severity: bool = False,
                 heatmaps: bool = True, plausibility: bool = True, label_implausible: bool = False) -> None:
        self.predictor = predictor
        self.severity = severity
        self.always_severity = always_severity
        # the one pipeline: plausibility gate (an ONNX model's node runs the U-Net's ONNX export, never torch),
        # decision rule, prediction set, severity, map
        config = PipelineConfig(model=str(predictor.path), backend=predictor.backend_name,
                                plausibility=plausibility, label_implausible=label_implausible,
                                severity=getattr(severity, "path", None), always_severity=always_severity,
                                heatmaps=heatmaps)
        self.pipeline = Pipeline(config, predictor=predictor, severity=severity)
        self.gate: Any = self.pipeline.gate if plausibility else None
        self.plausibility_note: str | None = None if plausibility else "plausibility check turned off"
        self.sha256 = predictor.sha256 or "unknown"
        self.heatmapper = self.pipeline.heatmapper
        self.heatmap_note: str | None = self.pipeline.heatmap_note

    @classmethod
    def from_paths(cls, model: str, severity: str | None = None, backend: str | None = None,
                   always_severity: bool = False, threads: int | None = None, plausibility: bool = True,
                   label_implausible: bool = False) -> "Engine":
        pred = Predictor.from_path(model, backend=backend, threads=threads)
        pred.require_classifier("--severity")
        sev = SeverityScorer.from_path(severity) if severity else None
        return cls(pred, sev, always_severity=always_severity, plausibility=plausibility,
                   label_implausible=label_implausible)

    @property
    def model_name(self) -> str:
        return str(self.predictor.name)

    def health(self) -> dict[str, Any]:
        """The pipeline's state (plausibility gate: ok, down after repeated failures, off) for the node's log."""
        return self.pipeline.health()

    # ------------------------------------------------------------------ analysis
    def analyze(self, image: np.ndarray, header: Any | None = None, rec: dict[str, Any] | None = None) -> Analysis:
        """Predict one H x W [0, 1] image (or take ``rec``, a record already predicted for it)."""
        p = self.predictor
        hflag = header_flag(header) if header is not None else None
        if hflag is not None:
            return Analysis(threshold=p.threshold, flag=hflag[0], flag_reason=hflag[1],
                            overlay=self._overlay(image, None))
        if rec is None:  # the one pipeline (its gate holds its own lock: one segmenter run at a time)
            rec = self.pipeline.run(self.pipeline.prepare(image, key=""))
        heat = rec.get("heat")
        rec = {k: v for k, v in rec.items() if k not in ("tensor", "tensors", "heat")}
        pflag = plausibility_flag(rec)
        labelled = rec.get("label") in p.classes  # a disease label (kept for a flagged input: --label-implausible)
        if not labelled:
            error = str(rec["error"]) if rec.get("error") else None
            if error and not pflag:  # a software failure is not bad input (issue 21 §2.5): the SR says which
                flag, reason = "analysis_failed", f"analysis failed: {error}"
            else:
                flag, reason = pflag or ("not_assessed", f"no disease label ({rec.get('label')})")
            return Analysis(threshold=p.threshold, plausibility=rec.get("plausibility"), flag=flag,
                            flag_reason=reason, overlay=self._overlay(image, None), error=error,
                            model=rec.get("model"), prediction_set=rec.get("prediction_set"), record=rec)
        a = Analysis(label=rec["label"], probabilities=dict(rec["probabilities"]), threshold=rec.get("threshold"),
                     plausibility=rec.get("plausibility"), flag=pflag[0] if pflag else None,
                     flag_reason=pflag[1] if pflag else None, prediction_set=rec.get("prediction_set"),
                     model=rec.get("model"), record=rec)
        a.severity = rec.get("severity")  # the pipeline's one severity rule decided it
        if heat is None and self.heatmapper is not None:  # a record of `predict --dicom-out` made without --heatmap
            heat = self.heatmapper.compute(p.preprocess(image), p.classes.index(a.label))
        if heat is None:
            a.notes.append(f"no heatmap: {self.heatmap_note or rec.get('heatmap_error')}")
        a.overlay = self._overlay(image, heat)
        return a

    def _overlay(self, image: np.ndarray, heat: np.ndarray | None) -> np.ndarray:
        """The model's crop at display size, as RGB, with the map blended on when there is one."""
        from covidcxr.predict import overlay_rgb

        preset = self.predictor.preset.with_size(max(self.predictor.preset.size, DISPLAY_SIDE))
        arr = preset.array(image, self.predictor.masks())
        base = preset.denormalize(arr)
        if heat is None:
            g = (np.clip(base, 0, 1) * 255).astype(np.uint8)
            return np.repeat(g[..., None], 3, axis=2)
        return overlay_rgb(base, heat)

    def is_positive(self, a: Analysis) -> bool:
        return a.label == POSITIVE_CLASS
