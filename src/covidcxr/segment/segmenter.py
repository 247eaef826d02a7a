"""A lung segmenter: a network with its input convention, run in torch or onnxruntime.

:class:`LungSegmenter` turns [0, 1] grayscale images into lung probability maps and boolean masks (each at
its image's own size, post-processed: two largest components, holes filled). Loading one by name or file
is :mod:`covidcxr.segment.loading`'s job; caching masks is :mod:`covidcxr.segment.maskcache`'s.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from covidcxr.segment.masks import postprocess


def _standardize(img: np.ndarray, size: int) -> np.ndarray:
    """Resize to ``size`` x ``size`` and standardise per image (the from-scratch U-Net's input)."""
    small = cv2.resize(img.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    return (small - small.mean()) / (small.std() + 1e-6)


class LungSegmenter:
    """A segmentation network with its input convention; predicts boolean lung masks.

    ``preset``: a :class:`~covidcxr.preprocess.Preset` (1 channel) for the pretrained and fine-tuned
    U-Nets; ``None`` means the from-scratch U-Net's per-image standardisation at ``size``.
    ``backend``: ``"torch"`` or ``"onnx"`` (``session`` is then an onnxruntime session).
    """

    def __init__(self, model: Any, size: int, path: str | None = None, meta: dict | None = None, *,
                 preset: Any = None, name: str | None = None, digest: str | None = None,
                 backend: str = "torch", session: Any = None, threshold: float = 0.5):
        self.model = model.eval() if model is not None else None
        self.size = int(size)
        self.path = path
        self.meta = meta or {}
        self.preset = preset
        self.name = name or (str(path) if path else "in-memory")
        self.digest = digest or ""
        self.backend = backend
        self.session = session
        self.threshold = threshold

    # ------------------------------------------------------------------ identity
    @property
    def id(self) -> str:
        """What produced a mask: name, weights digest, input size (recorded next to every mask)."""
        return f"{self.name}@{self.size}" + (f"#{self.digest[:12]}" if self.digest else "")

    def describe(self) -> dict:
        return {"segmenter": self.name, "id": self.id, "size": self.size, "backend": self.backend,
                "preset": self.preset.name if self.preset is not None else "per-image standardisation",
                "sha256": self.digest or None}

    # ------------------------------------------------------------------ inference
    def inputs(self, images: Sequence[np.ndarray]) -> np.ndarray:
        if self.preset is not None:
            return np.stack([self.preset.array(np.asarray(im, np.float32)) for im in images]).astype(np.float32)
        return np.stack([_standardize(im, self.size) for im in images])[:, None].astype(np.float32)

    def _lung_prob(self, x: np.ndarray) -> np.ndarray:
        """N x S x S lung probability at the network's resolution."""
        if self.backend == "onnx":
            (logit,) = self.session.run(None, {"image": x})
            _trim_heap()
            return 1.0 / (1.0 + np.exp(-logit[:, 0]))
        import torch

        from covidcxr.segment.model import lung_logit

        with torch.inference_mode():
            return torch.sigmoid(lung_logit(self.model, torch.from_numpy(x)))[:, 0].numpy()

    def probabilities(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Lung probability maps, each at its image's size."""
        if not len(images):
            return []
        prob = self._lung_prob(self.inputs(images))
        return [cv2.resize(p, (im.shape[1], im.shape[0]), interpolation=cv2.INTER_LINEAR)
                for p, im in zip(prob, images)]

    def predict(self, images: Sequence[np.ndarray], threshold: float | None = None) -> list[np.ndarray]:
        t = self.threshold if threshold is None else threshold
        return [postprocess(p, t) for p in self.probabilities(images)]

    def low_res(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Lung probability at the network's resolution (S x S, float16): what :class:`MaskCache` keeps, so a
        cached entry costs 2 S^2 bytes whatever the image size (a 2500 x 2048 mask held 5 MB)."""
        if not len(images):
            return []
        return [p.astype(np.float16) for p in self._lung_prob(self.inputs(images))]

    def mask_from_low_res(self, prob: np.ndarray, shape: tuple[int, ...], threshold: float | None = None) -> np.ndarray:
        """The boolean mask at ``shape`` (H, W) from :meth:`low_res` (resized, then thresholded and cleaned)."""
        t = self.threshold if threshold is None else threshold
        full = cv2.resize(np.asarray(prob, np.float32), (int(shape[1]), int(shape[0])), interpolation=cv2.INTER_LINEAR)
        return postprocess(full, t)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return self.predict([image])[0]

    # ------------------------------------------------------------------ onnx
    def export_onnx(self, path: str | os.PathLike) -> Path:
        """Write the network (one lung-logit output, dynamic batch) as ONNX; returns the path."""
        import torch

        from covidcxr.segment.model import lung_logit

        class _Logit(torch.nn.Module):
            def __init__(self, net):
                super().__init__()
                self.net = net

            def forward(self, x):
                return lung_logit(self.net, x)

        import io

        buf = io.BytesIO()
        x = torch.zeros(1, 1, self.size, self.size)
        import warnings

        with warnings.catch_warnings():  # the legacy exporter's deprecation notice; it handles this plain CNN
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(_Logit(self.model).eval(), (x,), buf, input_names=["image"],
                              output_names=["lung_logit"], dynamic_axes={"image": {0: "n"}, "lung_logit": {0: "n"}},
                              opset_version=17, dynamo=False)
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, out)  # two processes exporting at once never leave half a file
        return out


_TRIM: Any = None


def _trim_heap() -> None:
    """Hand the U-Net's freed activations back to the OS (glibc ``malloc_trim``; elsewhere nothing).

    Without a memory arena onnxruntime frees them after each run, but glibc keeps the pages: 60 MB more
    resident after five 256-px masks (measured). Trimming costs well under a millisecond here.
    """
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)

