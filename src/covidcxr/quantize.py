"""INT8 static quantization of an exported ONNX classifier, with a parity gate stored in the metadata.

:func:`quantize_int8` takes an fp32 file written by :func:`covidcxr.export.export_onnx` and a split
manifest, and writes a statically quantized model (onnxruntime's QDQ format, int8 per-channel weights,
uint8 activations, which is what onnxruntime's x86 VNNI kernels take):

* **calibration** reads images of the manifest's ``train`` split only, never ``val`` or ``test``;
* the fp32 file's metadata (preset, classes, threshold, temperature, checksums) is copied unchanged,
  plus ``covidcxr.quantization`` (mode, method, calibration images, the fp32 file's SHA-256) and
  ``covidcxr.parity_gate``;
* **the parity gate**: on held-out splits (default ``val`` and ``test``) the INT8 model's COVID-19
  one-vs-rest AUC may differ from fp32's by at most ``max_auc_change`` (0.01) and at least
  ``min_agreement`` (98 %) of the labels must agree. When the gate fails nothing is written at the
  output path: the rejected model is kept beside it as ``*.rejected.onnx`` and :class:`QuantizeError`
  says which condition failed with the measured values.

The gate measures agreement with the fp32 model, not clinical performance.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from covidcxr.predict import ONNX_META_PREFIX, POSITIVE_CLASS, Predictor, file_sha256, iter_batches

log = logging.getLogger(__name__)

#: operators quantized; the Softmax/Div of the graph's ``probabilities`` output stay fp32
OP_TYPES = ["Conv", "Gemm", "MatMul", "Add", "Mul", "Relu", "Clip", "MaxPool", "AveragePool",
            "GlobalAveragePool", "Concat", "Flatten", "Reshape", "Transpose", "Sigmoid", "HardSigmoid"]
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


class QuantizeError(RuntimeError):
    """Quantization failed or the INT8 model did not pass the parity gate."""


@dataclass
class ParityGate:
    splits: list[str]
    images: int
    auc_fp32: float | None
    auc_int8: float | None
    auc_change: float | None
    agreement: float
    max_auc_change: float
    min_agreement: float
    max_prob_diff: float
    failed_images: int = 0

    @property
    def passed(self) -> bool:
        return (self.auc_change is not None and self.auc_change <= self.max_auc_change
                and self.agreement >= self.min_agreement)

    def reasons(self) -> list[str]:
        out = []
        if self.auc_change is None:
            out.append(f"COVID-19 AUC undefined on {self.images} held-out images (need both COVID-19 and other labels)")
        elif self.auc_change > self.max_auc_change:
            out.append(f"COVID-19 AUC changed by {self.auc_change:.4f} ({self.auc_fp32:.4f} -> {self.auc_int8:.4f}), "
                       f"limit {self.max_auc_change}")
        if self.agreement < self.min_agreement:
            out.append(f"labels agree on {self.agreement:.1%} of {self.images} images, need >= {self.min_agreement:.0%}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


@dataclass
class QuantizeReport:
    out: str
    fp32: str
    method: str
    calibration_images: int
    calibration_source: str
    gate: ParityGate
    size_fp32_mb: float = 0.0
    size_int8_mb: float = 0.0
    failed_calibration: list[str] = field(default_factory=list)


def _manifest_rows(manifest: str | os.PathLike, splits: Sequence[str]) -> tuple[list[str], list[str]]:
    from covidcxr.data import read_manifest

    try:
        df = read_manifest(manifest, require_split=True, check_leakage=False)
    except Exception as err:  # ManifestError names the file already
        raise QuantizeError(str(err)) from None
    sub = df[df["split"].isin(list(splits))]
    return [str(p) for p in sub["path"]], [str(x) for x in sub["label"]]


def _spread(items: Sequence[Any], n: int | None) -> list[int]:
    """Indices of ``n`` items spread evenly over the list (all when n is None or large)."""
    if n is None or len(items) <= n:
        return list(range(len(items)))
    return sorted(set(np.linspace(0, len(items) - 1, n).round().astype(int).tolist()))


class _Calibration:
    """onnxruntime CalibrationDataReader over preprocessed train images, in small batches."""

    def __init__(self, predictor: Predictor, files: list[str], batch_size: int = 8, workers: int = 0):
        self.input_name = predictor.backend.input_name
        self.failed: list[str] = []
        self.used = 0
        self._it = self._batches(predictor, files, batch_size, workers)

    def _batches(self, predictor: Predictor, files: list[str], bs: int, workers: int) -> Iterator[np.ndarray]:
        for items in iter_batches(files, predictor.loader(), bs, workers):
            good = [it.array for it in items if it.array is not None]
            self.failed += [f"{it.path}: {it.error}" for it in items if it.array is None]
            if good:
                self.used += len(good)
                yield np.stack(good).astype(np.float32)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:  # pragma: no cover - only some calibrators call it
        pass


def _auc(y: np.ndarray, score: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    if y.min() == y.max():
        return None
    return float(roc_auc_score(y, score))


def parity_gate(fp32: Predictor, int8: Predictor, files: Sequence[str], labels: Sequence[str], splits: Sequence[str],
                max_auc_change: float = 0.01, min_agreement: float = 0.98, batch_size: int = 16,
                workers: int = 0) -> ParityGate:
    """Compare the two models on the same preprocessed images (one decode for both)."""
    p32, p8, ys = [], [], []
    failed = 0
    lab = dict(zip(files, labels))
    for items in iter_batches(list(files), fp32.loader(), batch_size, workers):
        good = [it for it in items if it.array is not None]
        failed += len(items) - len(good)
        if not good:
            continue
        x = np.stack([it.array for it in good]).astype(np.float32)
        p32.append(fp32.probabilities(x))
        p8.append(int8.probabilities(x))
        ys += [lab[it.path] == POSITIVE_CLASS for it in good]
    if not p32:
        raise QuantizeError(f"no readable held-out image in splits {list(splits)} for the parity gate")
    a, b, y = np.concatenate(p32), np.concatenate(p8), np.asarray(ys, dtype=int)
    la = [fp32.record(r)["label"] for r in a]
    lb = [int8.record(r)["label"] for r in b]
    if POSITIVE_CLASS in fp32.classes:
        k = fp32.classes.index(POSITIVE_CLASS)
        auc32, auc8 = _auc(y, a[:, k]), _auc(y, b[:, k])
    else:
        auc32 = auc8 = None
    change = abs(auc8 - auc32) if auc32 is not None and auc8 is not None else None
    return ParityGate(
        splits=list(splits), images=len(y), auc_fp32=auc32, auc_int8=auc8, auc_change=change,
        agreement=float(np.mean([u == v for u, v in zip(la, lb)])), max_auc_change=max_auc_change,
        min_agreement=min_agreement, max_prob_diff=float(np.abs(a - b).max()), failed_images=failed,
    )


def _set_metadata(path: Path, extra: dict[str, Any]) -> None:
    import onnx

    model = onnx.load(str(path))
    keep = {p.key: p.value for p in model.metadata_props}
    for key, value in extra.items():
        keep[ONNX_META_PREFIX + key] = json.dumps(value, default=str)
    del model.metadata_props[:]
    for key, value in keep.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))


def quantize_file(fp32: Predictor, out: str | os.PathLike, cal_files: Sequence[str], *, method: str = "minmax",
                  per_channel: bool = True, workers: int = 0) -> "_Calibration":
    """Quantize ``fp32`` (an ONNX-backed predictor) to ``out`` calibrated on ``cal_files``; no gate, no metadata.

    The building block of :func:`quantize_int8` (and of the speed benchmark, where weights are random and a
    gate means nothing). Returns the calibration reader (``used``, ``failed``).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    if method not in CALIBRATION_METHODS:
        raise QuantizeError(f"unknown calibration method {method!r}; choose {', '.join(CALIBRATION_METHODS)}")
    with tempfile.TemporaryDirectory(prefix=".quantize-pre-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            # shape inference + fp32 graph optimisation, as onnxruntime recommends before static quantization
            quant_pre_process(str(fp32.path), str(pre), skip_symbolic_shape=True)
        except Exception as err:
            log.warning("quantization pre-processing skipped (%s: %s)", type(err).__name__, str(err)[:200])
            pre = Path(str(fp32.path))
        reader = _Calibration(fp32, list(cal_files), workers=workers)
        cm = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[method]
        try:
            quantize_static(
                str(pre), str(out), reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=OP_TYPES,
                per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=cm, extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
            )
        except Exception as err:
            raise QuantizeError(f"{fp32.path}: INT8 quantization failed ({type(err).__name__}: {str(err)[:300]})") \
                from None
    return reader


def quantize_int8(
    fp32_path: str | os.PathLike,
    out: str | os.PathLike,
    calibrate: str | os.PathLike,
    *,
    calibration_count: int = 128,
    parity_splits: Sequence[str] = ("val", "test"),
    parity_count: int | None = None,
    max_auc_change: float = 0.01,
    min_agreement: float = 0.98,
    method: str = "minmax",
    per_channel: bool = True,
    workers: int = 0,
) -> QuantizeReport:
    """Statically quantize ``fp32_path`` to ``out``; calibrate on ``calibrate``'s train split; gate on held-out splits.

    Raises :class:`QuantizeError` (nothing at ``out``) when calibration or the parity gate fails.
    """
    if method not in CALIBRATION_METHODS:
        raise QuantizeError(f"unknown calibration method {method!r}; choose {', '.join(CALIBRATION_METHODS)}")
    if "train" in parity_splits:
        raise QuantizeError("the parity gate must use held-out splits (val/test), not the calibration split 'train'")
    out = Path(out)
    fp32 = Predictor.from_path(fp32_path, backend="onnx")
    if fp32.quantization:
        raise QuantizeError(f"{fp32_path}: already quantized ({fp32.quantization}); start from the fp32 export")

    cal_files, _ = _manifest_rows(calibrate, ["train"])
    if not cal_files:
        raise QuantizeError(f"{calibrate}: no 'train' rows to calibrate on (calibration never uses val or test)")
    cal_files = [cal_files[i] for i in _spread(cal_files, calibration_count)]
    par_files, par_labels = _manifest_rows(calibrate, parity_splits)
    if not par_files:
        raise QuantizeError(f"{calibrate}: no rows in held-out splits {list(parity_splits)} for the parity gate")
    idx = _spread(par_files, parity_count)
    par_files, par_labels = [par_files[i] for i in idx], [par_labels[i] for i in idx]

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".quantize-") as tmp:
        staged = Path(tmp) / "int8.onnx"
        reader = quantize_file(fp32, staged, cal_files, method=method, per_channel=per_channel, workers=workers)
        if reader.used == 0:
            raise QuantizeError(f"{calibrate}: none of {len(cal_files)} train images could be read for calibration")
        quant_meta = {
            "mode": "int8", "format": "QDQ", "weights": "int8 per-channel" if per_channel else "int8 per-tensor",
            "activations": "uint8", "method": method, "calibration_manifest": str(calibrate),
            "calibration_split": "train", "calibration_images": reader.used,
            "fp32_sha256": file_sha256(fp32_path),
        }
        _set_metadata(staged, {"quantization": quant_meta})
        int8 = Predictor.from_path(staged, backend="onnx")
        gate = parity_gate(fp32, int8, par_files, par_labels, parity_splits, max_auc_change, min_agreement,
                           workers=workers)
        _set_metadata(staged, {"parity_gate": gate.to_dict()})
        report = QuantizeReport(
            out=str(out), fp32=str(fp32_path), method=method, calibration_images=reader.used,
            calibration_source=f"{calibrate} (train split)", gate=gate,
            size_fp32_mb=Path(fp32_path).stat().st_size / 1e6, size_int8_mb=staged.stat().st_size / 1e6,
            failed_calibration=reader.failed,
        )
        if not gate.passed:
            rejected = out.with_name(out.stem + ".rejected.onnx")
            os.replace(staged, rejected)
            raise QuantizeError(f"{out}: INT8 parity gate FAILED: " + "; ".join(gate.reasons()) +
                                f" (on {gate.images} images of {'+'.join(gate.splits)}; rejected model kept at "
                                f"{rejected}, nothing written at {out})")
        os.replace(staged, out)  # same folder: atomic, and no half-written model at the output path
    return report
