"""The one prediction pipeline: every entry point (``covidcxr predict``, the REST service, the DICOM node,
the Ray actors) builds a :class:`Pipeline` once and asks it for records; none of them re-decides anything.

::

    pipe = Pipeline(PipelineConfig(model="run/best.ckpt", severity="sev/best.ckpt"))
    rec = pipe.run(pipe.prepare(image, key="x.png"))        # or pipe.run_batch(items) for decoded batches

Steps, in this order, for each item (issue 21 §1, shared/design/README.md):

1. gate       the frontal-CXR plausibility check (:mod:`covidcxr.predict.gate`) on the same 512 px copy of the
              image at every entry point (:meth:`Pipeline.gate_input`); a failure is per image;
2. classify   the backend -> probabilities; a non-finite row is an error record, never a label;
3. calibrate  the checkpoint's temperature (in :meth:`Predictor.probabilities`);
4. decide     the checkpoint's decision rule -> label; the conformal prediction set when the checkpoint
              carries a ``site_calibration`` (:func:`covidcxr.site.sets.prediction_set`);
5. severity   when configured, by one rule: never for an input flagged not_a_frontal_cxr, else for
              inputs above the COVID-19 operating point (or every input with ``always_severity``);
6. explain    the Grad-CAM map of the model's disease label (transient key ``heat``) when heatmaps are
              configured (or asked for per call), flagged inputs included: it shows what the model looked at.

A record is a plain dict: ``path``, ``model`` ({name, version, sha256}), ``label``, ``probabilities``,
``threshold``, ``decision_rule``, ``plausibility``, ``flag``, ``prediction_set`` (site-calibrated models
only), ``severity``, ``severity_note``, ``error``. Writers, the HTTP response, the SR/SC and the Ray rows
only consume it. Nothing here imports torch unless the model, the severity model or heatmaps need it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, Iterator, Sequence

import numpy as np

from covidcxr.decision import POSITIVE_CLASS
from covidcxr.predict.core import Predictor
from covidcxr.predict.gate import DOWN_AFTER, PlausibilityGate
from covidcxr.predict.inputs import Item, Loader, as_extra_presets, log, stack
from covidcxr.predict.records import PredictorError

#: transient record keys (arrays) that no output writes: see :func:`covidcxr.predict.records.strip_transient`
HEAT_KEY = "heat"


@dataclass(frozen=True)
class PipelineConfig:
    """What a pipeline is built from; the CLI fills it from its options, tests build it directly. Picklable,
    so that a Ray actor builds its own pipeline from the driver's config."""

    model: str
    backend: str | None = None
    device: str = "cpu"
    threads: int | None = None
    #: the frontal-CXR check (``--no-plausibility`` turns it off; records then say 'unchecked')
    plausibility: bool = True
    #: keep the disease label of an input flagged not_a_frontal_cxr (still flagged)
    label_implausible: bool = False
    #: severity checkpoint, or None
    severity: str | None = None
    always_severity: bool = False
    #: compute a Grad-CAM map per labelled input (torch checkpoints only; otherwise a note says why not)
    heatmaps: bool = False
    #: consecutive failed plausibility checks after which the gate reports itself down
    gate_down_after: int = DOWN_AFTER

    def with_model(self, model: str | os.PathLike) -> "PipelineConfig":
        return replace(self, model=str(model))


class Pipeline:
    """Built once per process (or Ray actor); :meth:`run` / :meth:`run_batch` turn items into records."""

    def __init__(self, config: PipelineConfig, predictor: Predictor | None = None, severity: Any = None,
                 heatmapper: bool = False) -> None:
        """``predictor``/``severity``: already loaded ones (the service loads them first, to fail in one line);
        ``heatmapper=True``: build the heatmapper even when ``config.heatmaps`` is off (maps asked per call)."""
        self.config = config
        if predictor is None:
            predictor = Predictor.from_path(config.model, backend=config.backend, device=config.device,
                                            threads=config.threads)
        predictor.require_classifier("--severity")
        if config.threads and predictor.backend_name == "torch":  # ONNX sessions take threads at load
            from covidcxr.predict.backend_torch import set_threads

            set_threads(config.threads)
        self.predictor = predictor
        if severity is None and config.severity:
            from covidcxr.predict.severity import SeverityScorer, SeverityUnavailable

            try:
                severity = SeverityScorer.from_path(config.severity, device=config.device)
            except SeverityUnavailable as err:
                raise PredictorError(str(err)) from None
            except Exception as err:  # SeverityError / CheckpointError name the file already
                raise PredictorError(f"--severity {config.severity}: {err}") from None
        self.severity = severity
        self.gate = PlausibilityGate.for_predictor(predictor, enabled=config.plausibility,
                                                   label_implausible=config.label_implausible,
                                                   down_after=config.gate_down_after)
        self.heatmapper: Any = None
        self.heatmap_note: str | None = None if config.heatmaps or heatmapper else "heatmaps switched off"
        if config.heatmaps or heatmapper:
            from covidcxr.predict.heatmap import HeatmapUnavailable, Heatmapper

            try:
                self.heatmapper = Heatmapper.for_predictor(predictor)
            except HeatmapUnavailable as err:
                self.heatmap_note = str(err)

    @classmethod
    def from_config(cls, config: PipelineConfig) -> "Pipeline":
        return cls(config)

    # ------------------------------------------------------------------ identity
    @property
    def classes(self) -> list[str]:
        return list(self.predictor.classes)

    @property
    def model_ref(self) -> dict[str, str]:
        return self.predictor.model_ref

    # ------------------------------------------------------------------ inputs
    def extra_presets(self) -> dict[str, Any]:
        """The small per-image inputs the steps need besides the model's tensor (made in the decode workers)."""
        out: dict[str, Any] = dict(self.gate.extra_presets())
        if self.severity is not None:
            out["severity"] = self.severity.preset
        if self.heatmapper is not None:
            out["display"] = self.heatmapper.display_preset()
        return out

    def loader(self) -> Loader:
        """The picklable ``path -> Item`` for worker processes and Ray tasks."""
        return self.predictor.loader(self.extra_presets())

    def prepare(self, image: np.ndarray, key: str = "") -> Item:
        """An :class:`Item` from an already decoded H x W [0, 1] image (service upload, DICOM node).

        Raises :class:`covidcxr.preprocess.PresetError` when the model's preset cannot use the image.
        """
        from covidcxr.preprocess import lung_hist_fallbacks

        before = lung_hist_fallbacks()
        arr = self.predictor.preprocess(image)
        if lung_hist_fallbacks() > before:  # the segmenter found (almost) no lung: said, never fatal
            log.warning("%s: lung mask empty or tiny; histogram standardised over the whole film instead",
                        key or "image")
        masks = self.predictor.masks()  # a lung-crop model's segmenter (None otherwise)
        # the same extra inputs as the decode workers make (the gate's small copy included): see gate_input
        extra = {name: p.array(image, masks) if getattr(p, "needs_lung_mask", False) else p.array(image)
                 for name, p in as_extra_presets(self.extra_presets())}
        return Item(key, arr, extra, image=image)

    def gate_input(self, item: Item) -> np.ndarray | None:
        """What the plausibility gate judges, the same at every entry point: the image shrunk to
        :class:`~covidcxr.predict.gate.PlausibilityInput`'s size (512 px on its long side), made in the decode
        workers (CLI, Ray), by :meth:`prepare` (DICOM node) or here from the decoded image (the service's items).
        A full-size image gave another lung share, so one film could get two verdicts."""
        if not self.gate.enabled:  # records say 'unchecked' (turned off): nothing to shrink
            return None
        if "plausibility" in item.extra:
            return item.extra["plausibility"]
        return self.gate.input(item.image) if item.image is not None else None

    # ------------------------------------------------------------------ run
    def classify(self, items: Sequence[Item]) -> list[np.ndarray | None]:
        """Step 2-3: one model call for the good items; a row of calibrated probabilities per item (None: error)."""
        good = [it for it in items if it.array is not None and it.error is None]
        rows = iter(self.predictor.probabilities(stack(good)) if good else [])
        return [next(rows) if it.array is not None and it.error is None else None for it in items]

    def run_batch(self, items: Sequence[Item], heatmap: bool | None = None) -> list[dict[str, Any]]:
        """Records for a batch of items, in order (one model call)."""
        return [self.complete(it, row, heatmap) for it, row in zip(items, self.classify(items), strict=True)]

    def run(self, item: Item, heatmap: bool | None = None) -> dict[str, Any]:
        return self.run_batch([item], heatmap)[0]

    def error_record(self, key: str, error: str) -> dict[str, Any]:
        return {"path": key, "model": self.model_ref, **{k: None for k in ("label", "probabilities")},
                "threshold": self.predictor.threshold, "error": error}

    def complete(self, item: Item, probs: np.ndarray | None, heatmap: bool | None = None) -> dict[str, Any]:
        """Steps 1 and 4-6 for one item whose probabilities are known (the service's batcher computes them).

        ``heatmap``: compute the map for this item (default: ``config.heatmaps``); needs a heatmapper.
        """
        p = self.predictor
        if item.error is not None or probs is None:
            return self.error_record(item.path, item.error or "no model output for this input")
        rec: dict[str, Any] = {"path": item.path, "model": self.model_ref, **p.record(probs)}
        if rec["error"]:  # non-finite output: an error, never a label (issue 21 §2.2)
            return self.error_record(item.path, rec["error"])
        model_label = rec["label"]
        self.gate.apply(rec, self.gate_input(item))
        if p.site is not None:
            from covidcxr.site.sets import describe_set, is_uncertain, prediction_set

            pset = prediction_set(probs, p.classes, p.site)
            rec["prediction_set"] = pset
            rec["uncertain"] = is_uncertain(pset)
            rec["prediction_set_text"] = describe_set(pset)
        rec["severity"], rec["severity_note"] = self._severity(rec, item)
        if self.heatmapper is not None and (self.config.heatmaps if heatmap is None else heatmap):
            try:
                rec[HEAT_KEY] = self.heatmapper.compute(item.array, p.classes.index(model_label))
            except Exception as err:  # a broken heatmap must not lose the prediction
                rec["heatmap_error"] = f"{type(err).__name__}: {err}"
        # the arrays the outputs may render from (overlay, severity): transient, never written
        rec["tensor"] = item.array
        if item.extra:
            rec["tensors"] = dict(item.extra)
        return rec

    def _severity(self, rec: dict[str, Any], item: Item) -> tuple[dict[str, Any] | None, str | None]:
        """Step 5, the one rule: flagged inputs are never scored; else above the operating point (or always)."""
        if self.severity is None:
            return None, "no severity model is configured"
        if rec.get("flag"):
            return None, "not computed: the input does not look like a frontal chest X-ray"
        if not self.severity.should_score(rec, self.predictor.threshold, always=self.config.always_severity):
            return None, f"not computed: the {POSITIVE_CLASS} probability is below the operating threshold"
        if "severity" in item.extra:
            return self.severity.score_tensor(item.extra["severity"]), None
        if item.image is not None:
            return self.severity.score_array(item.image), None
        return None, "not computed: no severity input was prepared for this item"

    # ------------------------------------------------------------------ state
    def health(self) -> dict[str, Any]:
        """What ``/healthz`` and the node's log report about the steps: the plausibility gate's state."""
        return {"plausibility": self.gate.status()}

    def notes(self) -> list[str]:
        out = list(self.gate.notes())
        if self.config.heatmaps and self.heatmapper is None:
            out.append(f"note: heatmaps skipped: {self.heatmap_note}")
        return out



def run_paths(pipeline: Pipeline, files: Sequence[str], batch_size: int = 16, num_workers: int = 0,
              progress: bool = False) -> Iterator[dict[str, Any]]:
    """Records for files, in order: decode + preprocess in ``num_workers`` processes, then the pipeline."""
    from covidcxr.predict.inputs import iter_batches

    bar = None
    if progress:  # tqdm.auto imports asyncio: 30 ms that a quiet one-image run need not pay
        from tqdm.auto import tqdm

        bar = tqdm(total=len(files), unit="img", desc="predict", dynamic_ncols=True)
    try:
        for items in iter_batches(list(files), pipeline.loader(), batch_size, num_workers):
            yield from pipeline.run_batch(items)
            if bar is not None:
                bar.update(len(items))
    finally:
        if bar is not None:
            bar.close()
