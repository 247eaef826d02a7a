"""Which lung segmenter crops a lung-crop model's images, as a small picklable value (issue 21 §1).

A lung-crop preset (COVID-CXNet style) needs a lung mask for every image. Instead of a provider
installed process-wide, the model says which segmenter cropped its training images
(``training["lung_segmenter"] = {"name", "sha256"}``, written by ``covidcxr train``), and a
:class:`MaskSpec` built from it travels with the preset into decode workers and Ray tasks, where
:func:`provider` loads that segmenter once per process. A segmenter whose weights differ from the
recorded sha256 is refused (:class:`MaskSpecError`, one line): ``$COVIDCXR_LUNG_MODEL`` no longer decides
silently at inference.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

#: the key of a checkpoint's ``training`` summary that names the segmenter of its lung crop
TRAINING_KEY = "lung_segmenter"


class MaskSpecError(RuntimeError):
    """The recorded segmenter cannot be loaded, or the one found is not the recorded one."""


@dataclass(frozen=True)
class MaskSpec:
    """A lung segmenter by name (catalogue name or file) and sha256 of its weights; picklable."""

    name: str
    sha256: str = ""
    dilation: float = 0.03
    #: "torch" or "onnx"; ``torch_free``: the ONNX predictors never import torch (the U-Net's ONNX export)
    backend: str = "torch"
    torch_free: bool = False

    @classmethod
    def for_model(cls, training: Mapping[str, Any] | None, onnx: bool = False) -> "MaskSpec":
        """The spec a checkpoint (or ONNX file) records; older files without one were cropped by the
        pretrained ``lung-unet-vgg11`` (the default at the time, unless $COVIDCXR_LUNG_MODEL was set)."""
        from covidcxr.segment.loading import PRETRAINED, PRETRAINED_SHA256

        rec = (training or {}).get(TRAINING_KEY) or {}
        name = str(rec.get("name") or PRETRAINED)
        sha = str(rec.get("sha256") or (PRETRAINED_SHA256 if name == PRETRAINED else ""))
        return cls(name, sha, backend="onnx" if onnx else "torch", torch_free=onnx)

    @classmethod
    def for_training(cls) -> "MaskSpec":
        """The segmenter that crops a new training run's images: ``$COVIDCXR_LUNG_MODEL`` when set (said in
        the run's summary), else the pretrained U-Net; its sha256 filled in from the loaded weights."""
        from covidcxr.segment.loading import default_segmenter

        spec = cls(default_segmenter())
        fn = provider(spec)
        return cls(spec.name, str(getattr(fn.segmenter, "digest", "") or ""))  # type: ignore[attr-defined]

    def describe(self) -> str:
        return f"{self.name}" + (f" (sha256 {self.sha256[:12]})" if self.sha256 else "")

    def record(self) -> dict[str, str]:
        """``{"name", "sha256"}`` for a checkpoint's training summary (:data:`TRAINING_KEY`)."""
        return {"name": self.name, "sha256": self.sha256}

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """The dilated lung mask of ``image`` (a preset's mask function: ``preset.with_masks(spec)``)."""
        return provider(self)(image)


_LOCK = threading.Lock()


def provider(spec: MaskSpec) -> Callable[[np.ndarray], np.ndarray]:
    """The mask function of ``spec`` in this process (loaded once); :class:`MaskSpecError` when it cannot be
    loaded or its weights are not the recorded ones."""
    with _LOCK:  # one load per process even when two threads ask at once
        return _process_provider(spec)


# The one per-process memo of the segment package, on purpose: a MaskSpec travels by value into decode workers,
# training data loaders and Ray tasks and is called once per image; without the memo every image would load the
# U-Net again and lose the mask cache (a training run re-segments each image every epoch). Keyed by the frozen
# spec (segmenter name + sha256 + dilation + backend); a failed load raises and is not remembered.
@functools.lru_cache(maxsize=8)
def _process_provider(spec: MaskSpec) -> Callable[[np.ndarray], np.ndarray]:
    from covidcxr.segment.lungcrop import lung_crop_provider

    kw: dict[str, Any] = {"backend": "onnx", "torch_free": True} if spec.torch_free else {"backend": spec.backend}
    try:
        fn = lung_crop_provider(spec.name, spec.dilation, **kw)
    except Exception as err:  # no weights, no ONNX export: one line naming the segmenter
        raise MaskSpecError(f"the lung segmenter {spec.describe()} could not be loaded: "
                            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    found = str(getattr(fn.segmenter, "digest", "") or "")  # type: ignore[attr-defined]
    if spec.sha256 and found and found != spec.sha256:
        raise MaskSpecError(f"the model's lung crop was trained with segmenter {spec.describe()}, but "
                            f"{spec.name} here has sha256 {found[:12]}; refusing to crop with another segmenter")
    return fn
