"""INT8 static quantization of an exported ONNX classifier, with a parity gate stored in the metadata.

:func:`quantize_int8` takes an fp32 file written by :func:`covidcxr.export.export_onnx` and a split
manifest, and writes a statically quantized model (onnxruntime's QDQ format, int8 per-channel weights,
uint8 activations, which is what onnxruntime's x86 VNNI kernels take):

* **calibration** reads images of the manifest's ``train`` split only, never ``val`` or ``test``;
* the logits (the final Gemm's output) stay fp32, and with ``keep_fp32="auto"`` (the default) the first
  convolutions stay fp32 when the INT8 logits measured on the calibration images are far from fp32's (an
  ImageNet MobileNetV2's first blocks: see :func:`quantize_file`); which layers, and the attempts, are stored;
* the fp32 file's metadata (preset, classes, threshold, temperature, checksums) is copied unchanged,
  plus ``covidcxr.quantization`` (mode, method, calibration images, the fp32 file's SHA-256, the fp32 layers) and
  ``covidcxr.parity_gate``;
* **the parity gate**: on held-out splits (default ``val`` and ``test``) the INT8 model's COVID-19
  one-vs-rest AUC may differ from fp32's by at most ``max_auc_change`` (0.01) and at least
  ``min_agreement`` (98 %) of the labels must agree. When the gate fails nothing is written at the
  output path: the rejected model is kept beside it as ``*.rejected.onnx`` and :class:`QuantizeError`
  says which condition failed with the measured values.

The gate measures agreement with the fp32 model, not clinical performance. **Unreadable images are counted**:
when more than :data:`MAX_UNREADABLE_SHARE` (2 %) of the calibration or of the held-out images cannot be read,
the quantization is refused, since a gate on the images that happened to decode says little about the rest.

Temporary files go beside the output (never to ``/tmp``), so the final rename stays on one filesystem (a Docker
volume is usually another one); every ``OSError`` (full disk, no permission, missing folder) becomes a
:class:`QuantizeError` of one line naming the file.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from covidcxr.predict import ONNX_META_PREFIX, POSITIVE_CLASS, Predictor, file_sha256, iter_batches
from covidcxr.io import MAX_UNREADABLE_SHARE
from covidcxr.train.qat import logit_error  # one definition for the export's choice and the fine-tuning's report

log = logging.getLogger(__name__)

#: operators quantized; the nodes after the logits (Div, the bias Add, Softmax: ``probabilities``) stay fp32
OP_TYPES = ["Conv", "Gemm", "MatMul", "Add", "Mul", "Relu", "Clip", "MaxPool", "AveragePool",
            "GlobalAveragePool", "Concat", "Flatten", "Reshape", "Transpose", "Sigmoid", "HardSigmoid"]
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
#: calibration-set logit error (:func:`logit_error`) at which ``keep_fp32="auto"`` stops keeping layers fp32
MAX_LOGIT_ERROR = 0.05


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
    max_unreadable_share: float = MAX_UNREADABLE_SHARE

    @property
    def unreadable_share(self) -> float:
        total = self.images + self.failed_images
        return self.failed_images / total if total else 0.0

    @property
    def passed(self) -> bool:
        return (self.auc_change is not None and self.auc_change <= self.max_auc_change
                and self.agreement >= self.min_agreement and self.unreadable_share <= self.max_unreadable_share)

    def reasons(self) -> list[str]:
        out = []
        if self.unreadable_share > self.max_unreadable_share:
            out.append(f"{self.failed_images} of {self.images + self.failed_images} held-out images could not be read "
                       f"({self.unreadable_share:.1%}, limit {self.max_unreadable_share:.0%})")
        if self.auc_change is None:
            out.append(f"COVID-19 AUC undefined on {self.images} held-out images (need both COVID-19 and other labels)")
        elif self.auc_change > self.max_auc_change:
            out.append(f"COVID-19 AUC changed by {self.auc_change:.4f} ({self.auc_fp32:.4f} -> {self.auc_int8:.4f}), "
                       f"limit {self.max_auc_change}")
        if self.agreement < self.min_agreement:
            out.append(f"labels agree on {self.agreement:.1%} of {self.images} images, need >= {self.min_agreement:.0%}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "unreadable_share": round(self.unreadable_share, 4), "passed": self.passed}


def _os_error(err: OSError, fallback: str | os.PathLike) -> QuantizeError:
    """One line naming the file: what the system said, never a traceback."""
    where = err.filename or fallback
    return QuantizeError(f"{where}: {err.strerror or type(err).__name__}"
                         + (f" (-> {err.filename2})" if getattr(err, "filename2", None) else ""))


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
    fp32_nodes: list[str] = field(default_factory=list)


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
    """onnxruntime CalibrationDataReader over preprocessed train images, in small batches.

    The images are decoded once and kept (128 images at 224 px: 77 MB), so that each quantization attempt
    and the fidelity check of :func:`quantize_file` reuse them (:meth:`rewind`).
    """

    def __init__(self, predictor: Predictor, files: list[str], batch_size: int = 8, workers: int = 0):
        self.input_name = predictor.backend.input_name
        self.failed: list[str] = []
        self.batches: list[np.ndarray] = []
        for items in iter_batches(files, predictor.loader(), batch_size, workers):
            good = [it.array for it in items if it.array is not None]
            self.failed += [f"{it.path}: {it.error}" for it in items if it.array is None]
            if good:
                self.batches.append(np.stack(good).astype(np.float32))
        self.used = sum(len(b) for b in self.batches)
        self._next = 0
        #: what :func:`quantize_file` chose: the convolutions kept fp32, its calibration-set logit error, the attempts
        self.fp32_nodes: list[str] = []
        self.logit_error: float | None = None
        self.attempts: list[dict[str, Any]] = []

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self.batches):
            return None
        self._next += 1
        return {self.input_name: self.batches[self._next - 1]}

    def rewind(self) -> None:
        self._next = 0


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


def _conv_nodes(path: Path) -> list[str]:
    import onnx

    return [n.name for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == "Conv"]


def _after_logits(path: Path) -> list[str]:
    """The nodes that turn the logits into ``probabilities`` (Div by the temperature, the bias Add, Softmax): they
    stay fp32, as the logits do; 8-bit steps there would only move the probabilities near the threshold."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    if not graph.output:
        return []
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    seen: list[str] = []
    todo = [graph.output[0].name]  # covidcxr exports: logits first
    while todo:
        for n in consumers.get(todo.pop(), []):
            if n.name not in seen:
                seen.append(n.name)
                todo.extend(n.output)
    return seen


def _run_logits(path: Path, reader: "_Calibration", threads: int | None = 1) -> np.ndarray:
    import onnxruntime as ort

    from covidcxr.predict import session_options

    sess = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
    name = sess.get_outputs()[0].name  # covidcxr exports: logits first
    return np.concatenate([sess.run([name], {reader.input_name: b})[0] for b in reader.batches])


def quantize_file(fp32: Predictor, out: str | os.PathLike, cal_files: Sequence[str], *, method: str = "minmax",
                  per_channel: bool = True, workers: int = 0, keep_fp32: int | str = 0,
                  max_logit_error: float = MAX_LOGIT_ERROR) -> "_Calibration":
    """Quantize ``fp32`` (an ONNX-backed predictor) to ``out`` calibrated on ``cal_files``; no gate, no metadata.

    ``keep_fp32``: how many of the first convolutions stay fp32 (0: quantize all). ``"auto"`` measures on the
    calibration images themselves (train split; the held-out gate is not consulted) how far the INT8 logits
    are from fp32 (:func:`logit_error`) and keeps the first 0, 1, 2, 4, ... convolutions in fp32 until the
    error is at most ``max_logit_error`` (up to half of them; the best attempt otherwise). Why: an
    ImageNet MobileNetV2's first blocks hold depthwise channels whose BatchNorm folds into gains near 100;
    per-tensor uint8 activations feeding them amplify rounding noise into switched channels (the pooled
    features were 44 % off). Keeping those few early layers fp32 costs little speed.

    The building block of :func:`quantize_int8` (and of the speed benchmarks, where weights are random, a
    gate means nothing and everything is quantized). Returns the calibration reader (``used``, ``failed``,
    ``fp32_nodes``, ``logit_error``, ``attempts``).
    """
    if method not in CALIBRATION_METHODS:
        raise QuantizeError(f"unknown calibration method {method!r}; choose {', '.join(CALIBRATION_METHODS)}")
    if keep_fp32 != "auto" and (not isinstance(keep_fp32, int) or keep_fp32 < 0):
        raise QuantizeError(f"keep_fp32 must be 'auto' or a count >= 0, not {keep_fp32!r}")
    out = Path(out)
    try:
        return _quantize_file(fp32, out, cal_files, method, per_channel, workers, keep_fp32, max_logit_error)
    except OSError as err:
        raise _os_error(err, out) from None


def _quantize_file(fp32: Predictor, out: Path, cal_files: Sequence[str], method: str, per_channel: bool,
                   workers: int, keep_fp32: int | str, max_logit_error: float) -> "_Calibration":
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    out.parent.mkdir(parents=True, exist_ok=True)
    # beside the output, not in /tmp: the final os.replace must not cross filesystems (EXDEV)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".quantize-pre-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            # shape inference + fp32 graph optimisation, as onnxruntime recommends before static quantization
            quant_pre_process(str(fp32.path), str(pre), skip_symbolic_shape=True)
        except Exception as err:
            log.warning("quantization pre-processing skipped (%s: %s)", type(err).__name__, str(err)[:200])
            pre = Path(str(fp32.path))
        reader = _Calibration(fp32, list(cal_files), workers=workers)
        if reader.used == 0:
            return reader
        cm = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[method]
        convs = _conv_nodes(pre)
        head = _after_logits(pre)
        if keep_fp32 == "auto":
            counts = [0] + [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= len(convs) // 2]
        else:
            counts = [min(int(keep_fp32), len(convs))]
        ref = _run_logits(pre, reader) if keep_fp32 == "auto" else None
        best: tuple[float, Path, int] | None = None
        for k in counts:
            target = Path(tmp) / f"int8-{k}.onnx"
            reader.rewind()
            try:
                quantize_static(
                    str(pre), str(target), reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=OP_TYPES,
                    per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=cm, nodes_to_exclude=convs[:k] + head,
                    # the logits stay fp32: rounding them to 8 bits would only add error at the threshold
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True,
                                   "OpTypesToExcludeOutputQuantization": ["Gemm", "MatMul"]},
                )
            except Exception as err:
                raise QuantizeError(f"{fp32.path}: INT8 quantization failed ({type(err).__name__}: "
                                    f"{str(err)[:300]})") from None
            if ref is None:
                best = (float("nan"), target, k)
                break
            err = logit_error(ref, _run_logits(target, reader))
            reader.attempts.append({"fp32_convs": k, "logit_error": round(err, 4)})
            log.info("INT8 with the first %d convolutions fp32: calibration-set logit error %.3f", k, err)
            if best is None or err < best[0]:
                best = (err, target, k)
            if err <= max_logit_error:
                break
        assert best is not None
        os.replace(best[1], out)
        reader.fp32_nodes = convs[:best[2]]
        reader.logit_error = None if ref is None else round(best[0], 4)
        reader.rewind()
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
    keep_fp32: int | str = "auto",
) -> QuantizeReport:
    """Statically quantize ``fp32_path`` to ``out``; calibrate on ``calibrate``'s train split; gate on held-out splits.

    ``keep_fp32``: leading convolutions kept fp32 (see :func:`quantize_file`; ``"auto"`` chooses on the
    calibration images). Raises :class:`QuantizeError` (nothing at ``out``) when calibration or the parity
    gate fails.
    """
    if method not in CALIBRATION_METHODS:
        raise QuantizeError(f"unknown calibration method {method!r}; choose {', '.join(CALIBRATION_METHODS)}")
    if "train" in parity_splits:
        raise QuantizeError("the parity gate must use held-out splits (val/test), not the calibration split 'train'")
    out = Path(out)
    try:
        return _quantize_int8(fp32_path, out, calibrate, calibration_count, parity_splits, parity_count,
                              max_auc_change, min_agreement, method, per_channel, workers, keep_fp32)
    except OSError as err:
        raise _os_error(err, out) from None


def _quantize_int8(fp32_path: str | os.PathLike, out: Path, calibrate: str | os.PathLike, calibration_count: int,
                   parity_splits: Sequence[str], parity_count: int | None, max_auc_change: float,
                   min_agreement: float, method: str, per_channel: bool, workers: int,
                   keep_fp32: int | str) -> QuantizeReport:
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
        reader = quantize_file(fp32, staged, cal_files, method=method, per_channel=per_channel, workers=workers,
                               keep_fp32=keep_fp32)
        if reader.used == 0:
            raise QuantizeError(f"{calibrate}: none of {len(cal_files)} train images could be read for calibration")
        if len(reader.failed) > MAX_UNREADABLE_SHARE * len(cal_files):
            raise QuantizeError(
                f"{calibrate}: {len(reader.failed)} of {len(cal_files)} calibration images could not be read "
                f"({len(reader.failed) / len(cal_files):.1%}, limit {MAX_UNREADABLE_SHARE:.0%}); e.g. "
                f"{reader.failed[0]}")
        quant_meta = {
            "mode": "int8", "format": "QDQ", "weights": "int8 per-channel" if per_channel else "int8 per-tensor",
            "activations": "uint8", "method": method, "calibration_manifest": str(calibrate),
            "calibration_split": "train", "calibration_images": reader.used,
            "fp32_sha256": file_sha256(fp32_path), "fp32_nodes": reader.fp32_nodes,
            "calibration_logit_error": reader.logit_error, "attempts": reader.attempts,
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
            failed_calibration=reader.failed, fp32_nodes=reader.fp32_nodes,
        )
        if not gate.passed:
            rejected = out.with_name(out.stem + ".rejected.onnx")
            os.replace(staged, rejected)
            raise QuantizeError(f"{out}: INT8 parity gate FAILED: " + "; ".join(gate.reasons()) +
                                f" (on {gate.images} images of {'+'.join(gate.splits)}; rejected model kept at "
                                f"{rejected}, nothing written at {out})")
        os.replace(staged, out)  # same folder: atomic, and no half-written model at the output path
    return report
