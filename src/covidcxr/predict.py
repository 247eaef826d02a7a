"""One :class:`Predictor` for the CLI, the REST service and evaluation.

A predictor wraps either a covidcxr checkpoint (PyTorch eager) or an ONNX file written by
:func:`covidcxr.export.export_onnx` (onnxruntime). Both backends return logits; everything
after that -- temperature scaling, softmax, the operating threshold -- happens here, once,
so the two backends cannot drift apart::

    p = Predictor.from_path("run/best.ckpt")            # or "model.onnx"
    p.predict_arrays([covidcxr.io.read_image("x.png")])  # -> [{"label": ..., "probabilities": {...}}]
    for rec in p.predict_paths(["folder/", "manifest.csv"], batch_size=16, num_workers=2):
        ...

The label rule: with a threshold ``t`` for COVID-19, an image is COVID-19 when its COVID-19
probability is at least ``t``; otherwise it gets the most likely of the other classes.
Without a threshold the label is the argmax.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from covidcxr.io import SUPPORTED_SUFFIXES, CXRReadError, read_image
from covidcxr.preprocess import Preset, PresetError

log = logging.getLogger(__name__)

POSITIVE_CLASS = "COVID-19"
RESEARCH_NOTICE = (
    "For research use only. Not a medical device; not validated for clinical use. "
    "Do not use for diagnosis or patient management."
)
#: ONNX metadata_props keys written by covidcxr.export (values are JSON).
ONNX_META_PREFIX = "covidcxr."


class PredictorError(RuntimeError):
    """A model file cannot serve predictions (wrong format, missing metadata, wrong task)."""


# --------------------------------------------------------------------------- post-processing


def softmax_with_temperature(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` in float64 (stable), returned as float64."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature or 1.0)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def decide_label(probs: Sequence[float], classes: Sequence[str], threshold: float | None) -> str:
    """COVID-19 when its probability reaches ``threshold``, else argmax of the other classes."""
    p = np.asarray(probs, dtype=np.float64)
    if threshold is None or POSITIVE_CLASS not in classes:
        return classes[int(np.argmax(p))]
    pos = list(classes).index(POSITIVE_CLASS)
    if p[pos] >= threshold:
        return POSITIVE_CLASS
    rest = p.copy()
    rest[pos] = -np.inf
    return classes[int(np.argmax(rest))]


# --------------------------------------------------------------------------- backends


class _TorchBackend:
    name = "torch"

    def __init__(self, model: torch.nn.Module, device: str):
        self.model = model.eval().to(device)
        self.device = torch.device(device)

    def logits(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        x = torch.as_tensor(batch, dtype=torch.float32).to(self.device)
        with torch.inference_mode():
            out = self.model(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.float().cpu().numpy()


class _OnnxBackend:
    name = "onnx"

    def __init__(self, path: str, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own (unexported) exception types
            raise PredictorError(f"{path}: cannot load ONNX model ({type(err).__name__}: {err})") from None
        self.input_name = self.session.get_inputs()[0].name
        outputs = [o.name for o in self.session.get_outputs()]
        self.output_name = "logits" if "logits" in outputs else outputs[0]
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def logits(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        x = batch.numpy() if isinstance(batch, torch.Tensor) else np.asarray(batch)
        x = np.ascontiguousarray(x, dtype=np.float32)
        return np.asarray(self.session.run([self.output_name], {self.input_name: x})[0], dtype=np.float32)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The covidcxr metadata stored in an ONNX file's metadata_props, JSON-decoded."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:
        raise PredictorError(f"{path}: not a readable ONNX file ({type(err).__name__}: {err})") from None
    return _decode_meta({p.key: p.value for p in model.metadata_props}, path)


def _decode_meta(props: dict[str, str], path: str | os.PathLike) -> dict[str, Any]:
    meta = {}
    for key, value in props.items():
        if key.startswith(ONNX_META_PREFIX):
            try:
                meta[key[len(ONNX_META_PREFIX) :]] = json.loads(value)
            except json.JSONDecodeError:
                meta[key[len(ONNX_META_PREFIX) :]] = value
    if "preset" not in meta or "classes" not in meta:
        raise PredictorError(
            f"{path}: ONNX file has no covidcxr metadata (preset, classes); export it with `covidcxr export`"
        )
    return meta


# --------------------------------------------------------------------------- predictor


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
    torch_model: torch.nn.Module | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_path(
        cls,
        path: str | os.PathLike,
        backend: str | None = None,
        device: str = "cpu",
        threads: int | None = None,
    ) -> "Predictor":
        """Load a checkpoint (``backend="torch"``) or an ONNX file (``backend="onnx"``).

        ``backend=None`` picks ``onnx`` for ``*.onnx`` files and ``torch`` otherwise.
        """
        p = Path(path)
        if not p.is_file():
            raise PredictorError(f"{path}: model file not found")
        backend = backend or ("onnx" if p.suffix.lower() == ".onnx" else "torch")
        version = file_sha256(p)[:12]
        if backend == "torch":
            if p.suffix.lower() == ".onnx":
                raise PredictorError(f"{path}: an ONNX file needs --backend onnx (the torch backend loads checkpoints)")
            from covidcxr.models import load

            lm = load(p, device=device)
            return cls(
                backend=_TorchBackend(lm.model, device),
                preset=lm.preset,
                classes=list(lm.classes),
                arch=lm.arch,
                task=lm.task,
                threshold=lm.threshold,
                temperature=float(lm.temperature or 1.0),
                name=str(lm.training.get("run_name") or p.stem),
                version=version,
                path=str(p),
                training=dict(lm.training),
                metrics=dict(lm.metrics),
                torch_model=lm.model,
            )
        if backend == "onnx":
            if p.suffix.lower() != ".onnx":
                # A checkpoint passed with --backend onnx: say how to get an ONNX file.
                with open(p, "rb") as f:
                    head = f.read(4)
                if head[:2] == b"PK":  # torch.save zip archive
                    raise PredictorError(
                        f"{path}: this is a PyTorch checkpoint; export it first with "
                        f"`covidcxr export --model {path} --onnx MODEL.onnx`, or use --backend torch"
                    )
            be = _OnnxBackend(str(p), threads=threads)
            meta = _decode_meta(be.metadata, p)
            try:
                preset = Preset.from_dict(meta["preset"])
            except PresetError as err:
                raise PredictorError(f"{path}: {err}") from None
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
                version=version,
                path=str(p),
                training=dict(training),
                metrics=dict(meta.get("metrics") or {}),
            )
        raise PredictorError(f"unknown backend {backend!r}; choose torch or onnx")

    def require_classifier(self, severity_option: str) -> None:
        """Refuse a severity checkpoint as the screening model: its regression outputs are not classes."""
        if self.task != "classification":
            raise PredictorError(f"{self.path}: a {self.task!r} checkpoint, not a COVID-19 classifier; pass a "
                                 f"classifier as --model and this file as {severity_option}")

    @property
    def backend_name(self) -> str:
        return self.backend.name

    # ------------------------------------------------------------------ core
    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """H x W [0, 1] array -> C x H x W tensor, exactly as in training."""
        return self.preset(image)

    def probabilities(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        """N x C x H x W preprocessed batch -> N x classes calibrated probabilities (float64)."""
        return softmax_with_temperature(self.backend.logits(batch), self.temperature)

    def record(self, probs: Sequence[float]) -> dict[str, Any]:
        """One prediction record (without path) from a row of probabilities."""
        return {
            "label": decide_label(probs, self.classes, self.threshold),
            "probabilities": {c: float(v) for c, v in zip(self.classes, probs)},
            "threshold": self.threshold,
        }

    def predict_arrays(self, images: Sequence[np.ndarray], batch_size: int = 16) -> list[dict[str, Any]]:
        """Predict in-memory H x W [0, 1] images; one record per image, in order."""
        out: list[dict[str, Any]] = []
        for i in range(0, len(images), max(1, batch_size)):
            batch = torch.stack([self.preprocess(im) for im in images[i : i + batch_size]])
            out.extend(self.record(row) for row in self.probabilities(batch))
        return out

    def predict_paths(
        self,
        paths: Iterable[str | os.PathLike],
        batch_size: int = 16,
        num_workers: int = 0,
        progress: bool = False,
        with_tensors: bool = False,
        extra_presets: dict[str, Preset] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Predict files, folders (recursive) and manifest CSVs; yield one record per image, in order.

        A file that cannot be read or preprocessed yields ``{"path": ..., "error": "<reason>"}``
        and the batch goes on. ``with_tensors=True`` adds the preprocessed ``"tensor"`` to each
        good record (for heatmaps); it is not JSON-serialisable, drop it before writing.
        ``extra_presets`` ({name: preset}) adds ``"tensors"`` {name: tensor} made in the workers too
        (the severity model may use another preset than the classifier).
        """
        from torch.utils.data import DataLoader
        from tqdm.auto import tqdm

        files = collect_inputs(paths)
        ds = _PathDataset(files, self.preset, extra_presets or {})
        loader = DataLoader(
            ds,
            batch_size=max(1, batch_size),
            num_workers=max(0, num_workers),
            collate_fn=_collate,
            shuffle=False,
            persistent_workers=False,
        )
        bar = tqdm(total=len(files), unit="img", desc="predict", disable=not progress, dynamic_ncols=True)
        try:
            for items in loader:
                good = [it for it in items if it["tensor"] is not None]
                probs = self.probabilities(torch.stack([it["tensor"] for it in good])) if good else []
                it_probs = iter(probs)
                for it in items:
                    if it["tensor"] is None:
                        yield {"path": it["path"], "label": None, "probabilities": None,
                               "threshold": self.threshold, "error": it["error"]}
                        continue
                    rec = {"path": it["path"], **self.record(next(it_probs)), "error": None}
                    if with_tensors:
                        rec["tensor"] = it["tensor"]
                    if it["extra"]:
                        rec["tensors"] = it["extra"]
                    yield rec
                bar.update(len(items))
        finally:
            bar.close()

    def model_card(self) -> dict[str, Any]:
        """What the service's ``GET /v1/model`` returns: no weights, no patient data."""
        return {
            "name": self.name,
            "version": self.version,
            "arch": self.arch,
            "task": self.task,
            "backend": self.backend_name,
            "classes": list(self.classes),
            "threshold": self.threshold,
            "temperature": self.temperature,
            "preset": self.preset.to_dict(),
            "training": _jsonable(self.training),
            "metrics": _jsonable(self.metrics),
            "notice": RESEARCH_NOTICE,
        }


def _jsonable(obj: Any) -> Any:
    """Round-trip through JSON, turning tensors/paths/numpy scalars into plain values."""

    def default(o: Any) -> Any:
        if isinstance(o, (np.generic,)):
            return o.item()
        if isinstance(o, (torch.Tensor, np.ndarray)):
            return np.asarray(o).tolist()
        return str(o)

    return json.loads(json.dumps(obj, default=default))


# --------------------------------------------------------------------------- inputs


def _looks_like_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _manifest_paths(path: Path) -> list[str]:
    """Image paths listed in a manifest CSV (column ``path``, else ``filename``), resolved to its folder."""
    import pandas as pd

    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as err:
        raise CXRReadError(path, f"cannot read manifest CSV ({type(err).__name__}: {err})") from None
    col = "path" if "path" in df.columns else "filename" if "filename" in df.columns else None
    if col is None:
        raise CXRReadError(path, f"manifest has no 'path' (or 'filename') column; columns: {list(df.columns)}")
    base = path.parent
    out = []
    for value in df[col]:
        p = Path(value)
        if not p.is_absolute():
            p = base / p
            # metadata.csv files of the shared data sets list bare names that live in images/
            if col == "filename" and not p.exists() and (base / "images" / value).exists():
                p = base / "images" / value
        out.append(str(p))
    return out


def collect_inputs(paths: Iterable[str | os.PathLike]) -> list[str]:
    """Expand files, folders (recursive: supported suffixes and suffix-less DICOM) and manifest CSVs.

    A path that does not exist is kept, so it becomes an error record rather than vanishing.
    """
    out: list[str] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if not f.is_file() or f.name.startswith("."):
                    continue
                suffix = f.suffix.lower()
                if suffix in SUPPORTED_SUFFIXES or (suffix == "" and _looks_like_dicom(f)):
                    out.append(str(f))
        elif p.suffix.lower() == ".csv" and p.is_file():
            out.extend(_manifest_paths(p))
        else:
            out.append(str(p))
    return out


class _PathDataset(torch.utils.data.Dataset):
    """Reads and preprocesses in DataLoader workers; failures travel as error strings."""

    def __init__(self, files: list[str], preset: Preset, extra: dict[str, Preset]):
        self.files = files
        self.preset = preset
        self.extra = extra

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path = self.files[i]
        try:
            image = read_image(path)
            tensor = self.preset(image)
            extra = {name: p(image) for name, p in self.extra.items()}
            return {"path": path, "tensor": tensor, "extra": extra, "error": None}
        except CXRReadError as err:
            return {"path": path, "tensor": None, "extra": {}, "error": err.reason}
        except PresetError as err:
            return {"path": path, "tensor": None, "extra": {}, "error": f"preprocessing failed: {err}"}
        except Exception as err:  # one bad file must not stop a batch of thousands
            return {"path": path, "tensor": None, "extra": {}, "error": f"{type(err).__name__}: {err}"}


def _collate(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items


# --------------------------------------------------------------------------- summaries


@dataclass
class Summary:
    """Counts per label and the failed files, for the end of a batch run."""

    total: int = 0
    labels: Counter = field(default_factory=Counter)
    failures: list[tuple[str, str]] = field(default_factory=list)

    def add(self, rec: dict[str, Any]) -> None:
        self.total += 1
        if rec.get("error"):
            self.failures.append((rec["path"], rec["error"]))
        else:
            self.labels[rec["label"]] += 1

    @property
    def ok(self) -> int:
        return self.total - len(self.failures)

    def lines(self, max_failures: int = 20) -> list[str]:
        by_label = ", ".join(f"{k}: {v}" for k, v in sorted(self.labels.items())) or "none"
        out = [f"{self.total} inputs: {self.ok} predicted ({by_label}), {len(self.failures)} failed"]
        for path, err in self.failures[:max_failures]:
            out.append(f"  FAILED {path}: {err}")
        if len(self.failures) > max_failures:
            out.append(f"  ... and {len(self.failures) - max_failures} more failures (see the output file)")
        return out


# --------------------------------------------------------------------------- heatmaps and severity
# Both are optional add-ons owned by other modules (covidcxr.explain, covidcxr.severity). They are
# imported lazily, so prediction works without them, and a missing one is reported in words.


class HeatmapUnavailable(RuntimeError):
    """Heatmaps cannot be made for this predictor (ONNX backend, or covidcxr.explain missing)."""


class Heatmapper:
    """Grad-CAM maps from :mod:`covidcxr.explain` for a torch-backed predictor, rendered as PNGs."""

    def __init__(self, predictor: Predictor, method: str = "gradcam"):
        import copy
        import threading

        self.predictor = predictor
        self.method = method
        # Grad-CAM hooks a layer and reads its activations. On the shared model, a prediction running in
        # another service thread would fire the hook too and swap in its own activations, so the maps
        # use a private copy of the model, one map at a time.
        self.model = copy.deepcopy(predictor.torch_model).eval()
        self._lock = threading.Lock()

    @classmethod
    def for_predictor(cls, predictor: Predictor, method: str = "gradcam") -> "Heatmapper":
        """A heatmapper, or :class:`HeatmapUnavailable` saying why there can be none."""
        if predictor.torch_model is None:
            raise HeatmapUnavailable(
                "heatmaps need the PyTorch checkpoint (an ONNX model has no gradients); "
                "pass the .ckpt file as --model to get them"
            )
        try:
            _explain_fn()
        except ImportError as err:
            raise HeatmapUnavailable(f"covidcxr.explain is not available in this installation ({err})") from None
        return cls(predictor, method)

    def display_preset(self, side: int = 512) -> Preset:
        """The model's preset at a larger size: the same crop, for a readable overlay."""
        return self.predictor.preset.with_size(max(self.predictor.preset.size, side))

    def compute(self, tensor: torch.Tensor, target: int) -> np.ndarray:
        """H x W map in [0, 1] for one preprocessed C x H x W image and the class index ``target``."""
        batch = tensor.unsqueeze(0) if tensor.ndim == 3 else tensor
        with self._lock:
            out = _call_explain(_explain_fn(), self.model, self.predictor, batch, self.method, target)
        heat = _as_map(out)
        heat = np.nan_to_num(heat.astype(np.float32))
        lo, hi = float(heat.min()), float(heat.max())
        return (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)

    def for_record(self, rec: dict[str, Any]) -> np.ndarray:
        """The map for a record from :meth:`Predictor.predict_paths` (``with_tensors=True``), predicted class."""
        return self.compute(rec["tensor"], self.predictor.classes.index(rec["label"]))

    def write_overlay(self, rec: dict[str, Any], out_dir: Path) -> Path:
        """Save the model-input image with the map blended on top; the file name keeps the input's stem."""
        heat = self.for_record(rec)
        display = (rec.get("tensors") or {}).get("display")  # sharper background, same crop as the model's
        base = self.predictor.preset.denormalize(display if display is not None else rec["tensor"])
        rgb = overlay_rgb(base, heat)
        digest = hashlib.sha1(rec["path"].encode()).hexdigest()[:8]  # same stem in two folders must not collide
        out = Path(out_dir) / f"{Path(rec['path']).stem}-{digest}-{self.method}.png"
        import cv2

        cv2.imwrite(str(out), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        return out


def _explain_fn() -> Any:
    """covidcxr.explain's ``explain`` (imported lazily: prediction works without the explain extras)."""
    from covidcxr.explain import explain

    return explain


def _call_explain(explain: Any, model: torch.nn.Module, predictor: Predictor, batch: torch.Tensor, method: str,
                  target: int) -> Any:
    """``explain(model, batch, method, target=[target], ctx=Context(arch, preset))`` -> B x H x W."""
    from covidcxr.explain import Context

    return explain(model, batch, method, target=[target], ctx=Context(arch=predictor.arch, preset=predictor.preset))


def _as_map(out: Any) -> np.ndarray:
    """The first map of explain's B x H x W output as an H x W array."""
    arr = out.detach().float().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out, dtype=np.float32)
    return arr[0] if arr.ndim == 3 else arr


def overlay_rgb(base: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a [0, 1] map (jet colours) onto a [0, 1] grayscale image: H x W x 3 uint8."""
    import cv2

    h, w = base.shape
    heat = cv2.resize(heat.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    gray = np.repeat((np.clip(base, 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=2)
    colour = cv2.cvtColor(cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    a = (alpha * heat)[..., None]
    return (gray * (1 - a) + colour * a).clip(0, 255).astype(np.uint8)


def heat_rgba(heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A map as an RGBA layer (jet colours, alpha grows with the value) at ``size`` = (width, height)."""
    import cv2

    heat = cv2.resize(heat.astype(np.float32), size, interpolation=cv2.INTER_LINEAR).clip(0, 1)
    colour = cv2.cvtColor(cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    alpha = (np.clip((heat - 0.15) / 0.85, 0, 1) * 200).astype(np.uint8)  # weak evidence stays see-through
    return np.dstack([colour, alpha])


class SeverityUnavailable(RuntimeError):
    """Severity was asked for but cannot be computed (module missing or not a severity checkpoint)."""


class SeverityScorer:
    """Severity from :mod:`covidcxr.severity` for images predicted COVID-19 (or all, when asked)."""

    def __init__(self, model: Any, path: str):
        self.model = model
        self.path = path

    @classmethod
    def from_path(cls, path: str | os.PathLike, device: str = "cpu") -> "SeverityScorer":
        try:
            from covidcxr.severity.model import SeverityModel
        except ImportError as err:
            raise SeverityUnavailable(f"severity scoring is not available in this installation ({err})") from None
        return cls(SeverityModel.from_path(path, device=device), str(path))

    @property
    def preset(self) -> Preset:
        return self.model.preset

    def should_score(self, rec: dict[str, Any], threshold: float | None, always: bool = False) -> bool:
        """Only images whose COVID-19 probability passes the operating threshold, unless ``always``."""
        if always:
            return True
        p = (rec.get("probabilities") or {}).get(POSITIVE_CLASS)
        if p is None:
            return False
        return p >= threshold if threshold is not None else rec.get("label") == POSITIVE_CLASS

    def score_tensor(self, tensor: torch.Tensor) -> dict[str, Any]:
        return self.model.predict_tensor(tensor.unsqueeze(0) if tensor.ndim == 3 else tensor)[0]

    def score_array(self, image: np.ndarray) -> dict[str, Any]:
        return self.model.predict_arrays([image])[0]

    def info(self) -> dict[str, Any]:
        meta = getattr(self.model, "meta", {}) or {}
        return _jsonable({
            "task": self.model.task,
            "outputs": list(self.model.classes),
            "arch": meta.get("arch"),
            "preset": self.preset.name,
            "metrics": meta.get("metrics", {}),
        })
