"""ONNX export with the preprocessing preset in the metadata, and a parity check on real images.

The exported graph takes an ``N x C x H x W`` float32 batch (N is dynamic) already preprocessed
by the preset stored in the metadata, and has two outputs: ``logits`` (raw) and
``probabilities`` (softmax of logits / temperature + logit_bias). Metadata (``metadata_props``, JSON values):

    covidcxr.preset       Preset.to_dict()  (rebuild with covidcxr.preprocess.get_preset(dict))
    covidcxr.classes      ["normal", "pneumonia", "COVID-19"]
    covidcxr.threshold    COVID-19 operating threshold or null (argmax)
    covidcxr.temperature  calibration temperature
    covidcxr.logit_bias   per-class bias after the temperature (a ``site calibrate --bias`` checkpoint) or null
    covidcxr.arch, covidcxr.task, covidcxr.training, covidcxr.metrics,
    covidcxr.source_sha256 (the checkpoint it came from), covidcxr.covidcxr_version

:func:`export_onnx` refuses to report success unless onnxruntime's probabilities match
PyTorch's within ``atol`` (default 1e-4) on real images, at batch 1 and at a larger batch.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from covidcxr.io import MAX_UNREADABLE_SHARE
from covidcxr.predict import ONNX_META_PREFIX, Predictor, collect_inputs, file_sha256

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18


class ExportError(RuntimeError):
    """Export failed, or the exported model does not match PyTorch."""


class _Exportable(nn.Module):
    """The model plus its calibrated softmax, so the ONNX file is usable without covidcxr."""

    def __init__(self, model: nn.Module, temperature: float, logit_bias: Sequence[float] | None = None,
                 n_classes: int = 1):
        super().__init__()
        self.model = model
        self.register_buffer("temperature", torch.tensor(float(temperature or 1.0)))
        # no bias: no Add node, the graph exported before logit_bias existed
        self.has_bias = logit_bias is not None
        self.register_buffer("logit_bias", torch.tensor(list(logit_bias) if self.has_bias else [0.0] * n_classes,
                                                        dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        z = logits / self.temperature
        return logits, torch.softmax(z + self.logit_bias if self.has_bias else z, dim=1)


@dataclass
class ExportReport:
    onnx_path: str
    source: str
    exporter: str
    opset: int
    parity_images: int
    parity_source: str
    max_abs_diff: float
    atol: float
    labels_equal: bool
    batch_sizes: list[int] = field(default_factory=list)
    failed_images: list[str] = field(default_factory=list)

    @property
    def unreadable_share(self) -> float:
        total = self.parity_images + len(self.failed_images)
        return len(self.failed_images) / total if total else 0.0

    @property
    def passed(self) -> bool:
        return (self.max_abs_diff <= self.atol and self.labels_equal
                and self.unreadable_share <= MAX_UNREADABLE_SHARE)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def _shared_dev_images() -> Path | None:
    """The shared dev set's images, when present (for the default parity check)."""
    candidates = []
    if os.environ.get("COVIDCXR_SHARED"):
        candidates.append(Path(os.environ["COVIDCXR_SHARED"]))
    here = Path(__file__).resolve()
    candidates += [Path.cwd().parent / "shared" / "data", here.parents[3] / "shared" / "data"]
    for c in candidates:
        d = c / "covid-cxr-dev" / "images"
        if d.is_dir():
            return d
    return None


def _pick(files: list[str], n: int) -> list[str]:
    """``n`` files spread evenly over the sorted list (covers every source of the dev set)."""
    if len(files) <= n:
        return files
    idx = np.linspace(0, len(files) - 1, n).round().astype(int)
    return [files[i] for i in idx]


def _export_graph(wrapper: nn.Module, example: torch.Tensor, out: Path, opset: int, dynamo: bool) -> str:
    kwargs: dict[str, Any] = dict(input_names=["input"], output_names=["logits", "probabilities"], opset_version=opset)
    # the exporter's optimiser logs every pass at INFO; the CLI's INFO logging would print hundreds of lines
    for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation chatter from the exporters
        if dynamo:
            torch.onnx.export(
                wrapper,
                (example,),
                str(out),
                dynamo=True,
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
                external_data=False,
                verbose=False,
                **kwargs,
            )
            return "dynamo"
        torch.onnx.export(
            wrapper,
            (example,),
            str(out),
            dynamo=False,
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}, "probabilities": {0: "batch"}},
            **kwargs,
        )
        return "torchscript"


def _write_metadata(out: Path, meta: dict[str, Any]) -> None:
    import onnx

    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    del model.metadata_props[:]
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key = ONNX_META_PREFIX + key
        entry.value = json.dumps(value, default=str)
    model.doc_string = "covidcxr classifier. For research use only; not for clinical use."
    onnx.save(model, str(out))


def export_onnx(
    model_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    parity_images: Sequence[str | os.PathLike] | None = None,
    parity_count: int = 16,
    atol: float = 1e-4,
    opset: int = DEFAULT_OPSET,
    exporter: str = "auto",
) -> ExportReport:
    """Export a covidcxr checkpoint to ONNX and check it against PyTorch on real images.

    ``parity_images``: files, folders or manifests; by default ``parity_count`` images of the
    shared dev set (synthetic noise only when no real image can be found, said in the report).
    ``exporter``: ``"dynamo"``, ``"torchscript"`` (legacy) or ``"auto"`` (dynamo, then legacy).
    Raises :class:`ExportError` when the parity check fails (the file is kept for inspection), when more than
    :data:`MAX_UNREADABLE_SHARE` of the parity images cannot be read, and for any ``OSError`` (one line naming
    the file).
    """
    try:
        return _export_onnx(model_path, Path(out), parity_images, parity_count, atol, opset, exporter)
    except OSError as err:
        where = err.filename or out
        raise ExportError(f"{where}: {err.strerror or type(err).__name__}") from None


def _export_onnx(model_path: str | os.PathLike, out: Path, parity_images: Sequence[str | os.PathLike] | None,
                 parity_count: int, atol: float, opset: int, exporter: str) -> ExportReport:
    src = Predictor.from_path(model_path, backend="torch")
    if src.task != "classification":
        log.warning("exporting a %s model; the label rule assumes classification", src.task)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    wrapper = _Exportable(src.torch_model, src.temperature, src.logit_bias, len(src.classes)).eval()
    size = src.preset.size
    example = torch.zeros(2, src.preset.channels, size, size)

    order = {"auto": [True, False], "dynamo": [True], "torchscript": [False]}.get(exporter)
    if order is None:
        raise ExportError(f"unknown exporter {exporter!r}; choose auto, dynamo or torchscript")
    used, errors = None, []
    for dyn in order:
        try:
            used = _export_graph(wrapper, example, out, opset, dyn)
            break
        except Exception as err:  # the exporters raise many types; try the next one
            errors.append(f"{'dynamo' if dyn else 'torchscript'}: {type(err).__name__}: {str(err)[:300]}")
            log.warning("ONNX export with %s failed: %s", "dynamo" if dyn else "torchscript", errors[-1])
    if used is None:
        raise ExportError(f"{model_path}: ONNX export failed: " + " | ".join(errors))

    _write_metadata(
        out,
        {
            "preset": src.preset.to_dict(),
            "classes": src.classes,
            "threshold": src.threshold,
            "temperature": src.temperature,
            "logit_bias": src.logit_bias,
            "arch": src.arch,
            "task": src.task,
            "name": src.name,
            "training": src.training,
            "metrics": src.metrics,
            "site_calibration": src.site,  # a site checkpoint's conformal sets travel with it (covidcxr.site.sets)
            "source_sha256": file_sha256(src.path or model_path),  # src.path: "reference" resolved to its file
            "covidcxr_version": _version(),
        },
    )
    return check_parity(src, out, parity_images, parity_count, atol, used, opset, str(model_path))


def export_segmenters(model_path: str | os.PathLike, plausibility: bool = True) -> list[Path]:
    """Write the lung U-Net ONNX exports that the ONNX paths of ``model_path`` need (issue 21 §4).

    ONNX predictors run torch-free, so they can only load a U-Net export written beforehand (with torch and the
    weights, which exporting has): the plausibility check's (``lung-unet-vgg11`` at its check size) unless
    ``plausibility`` is off, and, for a lung-crop checkpoint, the segmenter that cropped its training images.
    Returns the files (already present ones included). Raises the segmenter's errors (e.g. weights missing).
    """
    from covidcxr.models.checkpoint import read_bundle
    from covidcxr.preprocess import Preset
    from covidcxr.segment.loading import PRETRAINED
    from covidcxr.segment.loading import export_onnx as export_segmenter

    out: list[Path] = []
    if plausibility:
        from covidcxr.segment.plausibility import SIZE

        out.append(export_segmenter(PRETRAINED, size=SIZE))
    bundle = read_bundle(model_path)
    if Preset.from_dict(bundle.get("preset")).needs_lung_mask:
        from covidcxr.segment.maskspec import MaskSpec

        spec = MaskSpec.for_model(bundle.get("training"))
        path = export_segmenter(spec.name)
        if path not in out:
            out.append(path)
    return out


def check_parity(
    src: Predictor,
    onnx_path: str | os.PathLike,
    parity_images: Sequence[str | os.PathLike] | None = None,
    parity_count: int = 16,
    atol: float = 1e-4,
    exporter: str = "",
    opset: int = DEFAULT_OPSET,
    source: str = "",
) -> ExportReport:
    """Compare PyTorch and onnxruntime probabilities (and labels) on real images."""
    from covidcxr.io import CXRReadError, read_image

    dst = Predictor.from_path(onnx_path, backend="onnx")
    if parity_images:
        files, origin = collect_inputs(parity_images), "given images"
    else:
        dev = _shared_dev_images()
        files, origin = (collect_inputs([dev]), f"shared dev set ({dev})") if dev else ([], "")
    files = _pick(files, parity_count)
    arrays, failed = [], []
    for f in files:
        try:
            arrays.append(read_image(f))
        except CXRReadError as err:
            failed.append(str(err))
    if not arrays:
        log.warning("no real image found for the parity check; using synthetic noise (pass --parity-images)")
        rng = np.random.default_rng(0)
        arrays = [rng.random((256, 256), dtype=np.float32) for _ in range(max(2, parity_count))]
        origin = "SYNTHETIC noise (no real images found)"
    batch = np.stack([src.preprocess(a) for a in arrays])
    p_torch = src.probabilities(batch)
    diffs = []
    # batch 1 (the service) and the full batch (batch prediction) exercise the dynamic axis
    sizes = sorted({1, len(arrays)})
    p_onnx_full = None
    for bs in sizes:
        p_onnx = np.concatenate([dst.probabilities(batch[i : i + bs]) for i in range(0, len(arrays), bs)])
        diffs.append(float(np.abs(p_onnx - p_torch).max()))
        p_onnx_full = p_onnx
    # the graph's own probabilities output must agree too (users outside covidcxr read it)
    raw = dst.backend.session.run(["probabilities"], {dst.backend.input_name: batch})[0]
    diffs.append(float(np.abs(raw - p_torch).max()))
    labels_t = [src.record(r)["label"] for r in p_torch]
    labels_o = [dst.record(r)["label"] for r in p_onnx_full]
    report = ExportReport(
        onnx_path=str(onnx_path),
        source=source,
        exporter=exporter,
        opset=opset,
        parity_images=len(arrays),
        parity_source=origin,
        max_abs_diff=max(diffs),
        atol=atol,
        labels_equal=labels_t == labels_o,
        batch_sizes=sizes,
        failed_images=failed,
    )
    if report.unreadable_share > MAX_UNREADABLE_SHARE:
        raise ExportError(
            f"{onnx_path}: parity check refused: {len(failed)} of {len(files)} parity images could not be read "
            f"({report.unreadable_share:.1%}, limit {MAX_UNREADABLE_SHARE:.0%}), e.g. {failed[0]}")
    if not report.passed:
        raise ExportError(
            f"{onnx_path}: parity check FAILED: max |p_onnx - p_torch| = {report.max_abs_diff:.2e} "
            f"(limit {atol:.0e}), labels equal: {report.labels_equal}, on {len(arrays)} images from {origin}"
        )
    return report


def _version() -> str:
    from covidcxr import __version__

    return __version__
