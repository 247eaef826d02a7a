"""Grad-CAM overlays for a torch-backed predictor (:mod:`covidcxr.explain`, imported lazily).

Prediction works without the explain extras; a missing one is reported in words
(:class:`HeatmapUnavailable`). torch is imported only when a heatmapper is built.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from covidcxr.preprocess import Preset

if TYPE_CHECKING:
    from covidcxr.predict.core import Predictor


class HeatmapUnavailable(RuntimeError):
    """Heatmaps cannot be made for this predictor (ONNX backend, or covidcxr.explain missing)."""


class Heatmapper:
    """Grad-CAM maps from :mod:`covidcxr.explain` for a torch-backed predictor, rendered as PNGs."""

    def __init__(self, predictor: "Predictor", method: str = "gradcam"):
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
    def for_predictor(cls, predictor: "Predictor", method: str = "gradcam") -> "Heatmapper":
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

    def compute(self, tensor: Any, target: int) -> np.ndarray:
        """H x W map in [0, 1] for one preprocessed C x H x W image (array or tensor) and class ``target``."""
        import torch

        t = torch.as_tensor(np.asarray(tensor, dtype=np.float32)) if isinstance(tensor, np.ndarray) else tensor
        batch = t.unsqueeze(0) if t.ndim == 3 else t
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
        heat = rec.get("heat")  # computed by the pipeline already, when it ran there
        if heat is None:
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


def _call_explain(explain: Any, model: Any, predictor: "Predictor", batch: Any, method: str, target: int) -> Any:
    """``explain(model, batch, method, target=[target], ctx=Context(arch, preset))`` -> B x H x W."""
    from covidcxr.explain import Context

    return explain(model, batch, method, target=[target], ctx=Context(arch=predictor.arch, preset=predictor.preset))


def _as_map(out: Any) -> np.ndarray:
    """The first map of explain's B x H x W output as an H x W array."""
    arr = out.detach().float().cpu().numpy() if hasattr(out, "detach") else np.asarray(out, dtype=np.float32)
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
