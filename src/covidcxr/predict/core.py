"""The one :class:`Predictor` for the CLI, the REST service, the DICOM node, Ray actors and evaluation.

A predictor wraps either a covidcxr checkpoint (PyTorch eager) or an ONNX file written by
:func:`covidcxr.export.export_onnx` (onnxruntime). Both backends return logits; everything
after that -- temperature scaling, a site checkpoint's logit bias, softmax, the operating threshold --
happens here, once,
so the two backends cannot drift apart. Nothing here imports torch unless ``backend="torch"``,
nor FastAPI or Ray.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from covidcxr.predict.backend_onnx import OnnxBackend, decode_meta, file_sha256
from covidcxr.predict.inputs import Item, Loader, as_extra_presets, collect_inputs, iter_batches, stack
from covidcxr.decision import DecisionRule, finite_rows, logit_bias_of, softmax_with_temperature
from covidcxr.predict.records import RESEARCH_NOTICE, PredictorError, jsonable
from covidcxr.preprocess import Preset, PresetError
from covidcxr.site.sets import site_info

#: the error of a record whose model output was NaN or infinite (never a label)
NON_FINITE = "the model's output is not finite (NaN or infinite probabilities); no label is given"


@dataclass
class Predictor:
    """Preprocess, run, calibrate, threshold. Build it with :meth:`from_path`."""

    backend: Any
    preset: Preset
    classes: list[str]
    arch: str
    task: str = "classification"
    threshold: float | None = None
    temperature: float = 1.0
    name: str = "model"
    version: str = ""
    path: str | None = None
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    #: the PyTorch module (torch backend only); Grad-CAM needs it
    torch_model: Any = None
    #: the ONNX file's full covidcxr metadata (onnx backend only): quantization, parity gate, ...
    meta: dict[str, Any] = field(default_factory=dict)
    #: sha256 of the model file: every record names the file that made it
    sha256: str = ""
    #: the checkpoint's ``site_calibration`` (covidcxr.site.sets), when it is a site-calibrated one
    site: dict[str, Any] | None = None
    #: a lung-crop model's segmenter (covidcxr.segment.maskspec.MaskSpec): travels into workers and Ray tasks
    mask_spec: Any = None
    #: per-class bias added after the temperature (a ``site calibrate --bias`` checkpoint), None = none
    logit_bias: list[float] | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_path(
        cls,
        path: str | os.PathLike,
        backend: str | None = None,
        device: str = "cpu",
        threads: int | None = None,
        graph_opt: str = "all",
    ) -> "Predictor":
        """Load a checkpoint (``backend="torch"``) or an ONNX file (``backend="onnx"``).

        ``backend=None`` picks ``onnx`` for ``*.onnx`` files and ``torch`` otherwise.
        """
        from covidcxr.reference_models import ReferenceModelError, resolve_model

        try:  # "reference": the shipped reference classifier (torch-free lookup)
            p = Path(resolve_model(path))
        except ReferenceModelError as err:
            raise PredictorError(str(err)) from None
        if not p.is_file():
            raise PredictorError(f"{path}: model file not found")
        backend = backend or ("onnx" if p.suffix.lower() == ".onnx" else "torch")
        if backend == "torch":
            predictor = cls._from_checkpoint(p, device)
        elif backend == "onnx":
            predictor = cls._from_onnx(p, threads, graph_opt)
        else:
            raise PredictorError(f"unknown backend {backend!r}; choose torch or onnx")
        predictor.sha256 = file_sha256(p)
        predictor._ensure_lung_masks()
        return predictor

    def _ensure_lung_masks(self) -> None:
        """A lung-crop preset (COVID-CXNet style), or one standardising the histogram inside the lungs
        (``data.hist_standardize: lung``), needs a lung mask for every image, as in training: the
        segmenter the checkpoint records (the pretrained U-Net for older ones), loaded here so that a missing
        or different one is one line now; the ONNX backend loads its ONNX export, torch-free."""
        if not self.preset.needs_lung_mask:
            return
        from covidcxr.segment.maskspec import MaskSpec, MaskSpecError, provider

        self.mask_spec = MaskSpec.for_model(self.training, onnx=self.backend_name == "onnx")
        try:
            provider(self.mask_spec)
        except MaskSpecError as err:
            what = "crops to the lungs" if self.preset.lung_crop else "standardises the histogram inside the lungs"
            raise PredictorError(f"{self.path}: its preset {self.preset.name} {what}, but {err}") from None
        self.preset = self.preset.with_masks(self.mask_spec)  # travels with the preset (workers, Ray tasks)

    @classmethod
    def _from_checkpoint(cls, p: Path, device: str) -> "Predictor":
        if p.suffix.lower() == ".onnx":
            raise PredictorError(f"{p}: an ONNX file needs --backend onnx (the torch backend loads checkpoints)")
        from covidcxr.models import load
        from covidcxr.predict.backend_torch import TorchBackend

        lm = load(p, device=device)
        return cls(
            backend=TorchBackend(lm.model, device),
            preset=lm.preset,
            classes=list(lm.classes),
            arch=lm.arch,
            task=lm.task,
            threshold=lm.threshold,
            temperature=float(lm.temperature or 1.0),
            name=str(lm.training.get("run_name") or p.stem),
            # a shipped reference model has a release version; other checkpoints are named by their bytes
            version=str(lm.training.get("model_version") or file_sha256(p)[:12]),
            path=str(p),
            training=dict(lm.training),
            metrics=dict(lm.metrics),
            torch_model=lm.model,
            site=site_info(lm.meta),
            logit_bias=lm.logit_bias,
        )

    @classmethod
    def _from_onnx(cls, p: Path, threads: int | None, graph_opt: str) -> "Predictor":
        if p.suffix.lower() != ".onnx":
            # A checkpoint passed with --backend onnx: say how to get an ONNX file.
            with open(p, "rb") as f:
                head = f.read(4)
            if head[:2] == b"PK":  # torch.save zip archive
                raise PredictorError(
                    f"{p}: this is a PyTorch checkpoint; export it first with "
                    f"`covidcxr export --model {p} --onnx MODEL.onnx`, or use --backend torch"
                )
        be = OnnxBackend(str(p), threads=threads, graph_opt=graph_opt)
        meta = decode_meta(be.metadata, p)
        try:
            preset = Preset.from_dict(meta["preset"])
        except PresetError as err:
            raise PredictorError(f"{p}: {err}") from None
        training = meta.get("training") or {}
        return cls(
            backend=be,
            preset=preset,
            classes=list(meta["classes"]),
            arch=str(meta.get("arch", "unknown")),
            task=str(meta.get("task", "classification")),
            threshold=meta.get("threshold"),
            temperature=float(meta.get("temperature") or 1.0),
            name=str(training.get("run_name") or meta.get("name") or p.stem),
            version=str(training.get("model_version") or file_sha256(p)[:12]),  # a reference model's release
            path=str(p),
            training=dict(training),
            metrics=dict(meta.get("metrics") or {}),
            meta=meta,
            site=site_info(meta),
            logit_bias=cls._onnx_bias(meta, p),
        )

    @staticmethod
    def _onnx_bias(meta: dict[str, Any], p: Path) -> list[float] | None:
        try:
            return logit_bias_of(meta.get("logit_bias"), len(meta["classes"]), str(p))
        except ValueError as err:
            raise PredictorError(str(err)) from None

    def require_classifier(self, severity_option: str) -> None:
        """Refuse a severity checkpoint as the screening model: its regression outputs are not classes."""
        if self.task != "classification":
            raise PredictorError(f"{self.path}: a {self.task!r} checkpoint, not a COVID-19 classifier; pass a "
                                 f"classifier as --model and this file as {severity_option}")

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def quantization(self) -> str | None:
        """``"int8"`` for a quantized ONNX file, else None."""
        q = self.meta.get("quantization")
        return q.get("mode") if isinstance(q, dict) else None

    # ------------------------------------------------------------------ core
    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """H x W [0, 1] array -> C x H x W float32 array, exactly as in training (lung crop included)."""
        return self.preset.array(image, self.masks())

    def masks(self) -> Any:
        """The lung-mask function of a model that needs lung masks, in this process, else None."""
        return self.loader().masks()

    def loader(self, extra_presets: dict[str, Preset] | None = None) -> Loader:
        """The picklable ``path -> Item`` this predictor's inputs go through (worker processes, Ray tasks)."""
        return Loader(self.preset, as_extra_presets(extra_presets), self.mask_spec)

    def probabilities(self, batch: Any) -> np.ndarray:
        """N x C x H x W preprocessed batch (array or tensor) -> N x classes calibrated probabilities (float64)."""
        return softmax_with_temperature(self.backend.logits(batch), self.temperature, self.logit_bias)

    @property
    def decision_rule(self) -> DecisionRule:
        """The checkpoint's operating point (or argmax): the rule every tool labels with."""
        return DecisionRule.from_checkpoint(self.threshold, self.metrics)

    @property
    def model_ref(self) -> dict[str, str]:
        """``{name, version, sha256}`` of the file that makes the predictions: every record carries it."""
        return {"name": self.name, "version": self.version, "sha256": self.sha256}

    def record(self, probs: Sequence[float]) -> dict[str, Any]:
        """One prediction record (without path) from a row of probabilities; it states the rule it used.

        A row that is not finite (NaN or infinite) gets no label: the record has ``error`` set instead
        (softmax of [nan, 1, 2] would otherwise be 'normal' by the threshold rule, 'COVID-19' by argmax).
        """
        rule = self.decision_rule
        if not bool(finite_rows(probs)[0]):
            return {"label": None, "probabilities": None, "threshold": self.threshold,
                    "decision_rule": rule.describe(self.classes), "error": NON_FINITE}
        return {
            "label": rule.label(probs, self.classes),
            "probabilities": {c: float(v) for c, v in zip(self.classes, probs)},
            "threshold": self.threshold,
            "decision_rule": rule.describe(self.classes),
            "error": None,
        }

    def error_record(self, path: str, error: str) -> dict[str, Any]:
        return {"path": path, "label": None, "probabilities": None, "threshold": self.threshold, "error": error}

    def predict_arrays(self, images: Sequence[np.ndarray], batch_size: int = 16) -> list[dict[str, Any]]:
        """Predict in-memory H x W [0, 1] images; one record per image, in order."""
        out: list[dict[str, Any]] = []
        for i in range(0, len(images), max(1, batch_size)):
            batch = np.stack([self.preprocess(im) for im in images[i : i + batch_size]])
            out.extend(self.record(row) for row in self.probabilities(batch))
        return out

    def predict_items(self, items: Sequence[Item], with_tensors: bool = False) -> list[dict[str, Any]]:
        """Records for decoded items (one batch), in order; error items become error records."""
        good = [it for it in items if it.array is not None]
        probs = iter(self.probabilities(stack(good)) if good else [])
        out = []
        for it in items:
            if it.array is None:
                out.append(self.error_record(it.path, it.error or "unknown error"))
                continue
            rec = {"path": it.path, **self.record(next(probs))}
            if with_tensors:
                rec["tensor"] = it.array
            if it.extra:
                rec["tensors"] = it.extra
            out.append(rec)
        return out

    def predict_paths(
        self,
        paths: Iterable[str | os.PathLike],
        batch_size: int = 16,
        num_workers: int = 0,
        progress: bool = False,
        with_tensors: bool = False,
        extra_presets: dict[str, Preset] | None = None,
        files: Sequence[str] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Predict files, folders (recursive) and manifest CSVs; yield one record per image, in order.

        A file that cannot be read or preprocessed yields ``{"path": ..., "error": "<reason>"}``
        and the batch goes on. ``with_tensors=True`` adds the preprocessed ``"tensor"`` (C x H x W
        array) to each good record (for heatmaps); drop it before writing. ``extra_presets``
        ({name: preset}) adds ``"tensors"`` {name: array} made in the workers too (the severity model
        may use another preset than the classifier). ``files``: an already collected input list.
        """
        files = list(files) if files is not None else collect_inputs(paths)
        bar = None
        if progress:  # tqdm.auto imports asyncio: 30 ms that a quiet one-image run need not pay
            from tqdm.auto import tqdm

            bar = tqdm(total=len(files), unit="img", desc="predict", dynamic_ncols=True)
        try:
            for items in iter_batches(files, self.loader(extra_presets), batch_size, num_workers):
                yield from self.predict_items(items, with_tensors=with_tensors)
                if bar is not None:
                    bar.update(len(items))
        finally:
            if bar is not None:
                bar.close()

    def model_card(self) -> dict[str, Any]:
        """What the service's ``GET /v1/model`` returns: no weights, no patient data."""
        return {
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "arch": self.arch,
            "task": self.task,
            "backend": self.backend_name,
            "classes": list(self.classes),
            "threshold": self.threshold,
            "decision_rule": self.decision_rule.to_dict(self.classes),
            "temperature": self.temperature,
            "logit_bias": self.logit_bias,
            "preset": self.preset.to_dict(),
            "training": jsonable(self.training),
            "metrics": jsonable(self.metrics),
            "quantization": jsonable(self.meta.get("quantization")),
            "parity_gate": jsonable(self.meta.get("parity_gate")),
            "notice": RESEARCH_NOTICE,
        }
