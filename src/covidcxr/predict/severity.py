"""Severity from :mod:`covidcxr.severity` for images predicted COVID-19 (imported lazily; needs torch)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from covidcxr.decision import POSITIVE_CLASS
from covidcxr.predict.records import jsonable
from covidcxr.preprocess import Preset


class SeverityUnavailable(RuntimeError):
    """Severity was asked for but cannot be computed (module missing or not a severity checkpoint)."""


class SeverityScorer:
    """Severity for images predicted COVID-19 (or all, when asked)."""

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

    def score_tensor(self, tensor: Any) -> dict[str, Any]:
        """Severity of one image preprocessed with :attr:`preset` (C x H x W array or tensor)."""
        import torch

        t = torch.from_numpy(np.ascontiguousarray(tensor, dtype=np.float32)) if isinstance(tensor, np.ndarray) \
            else tensor
        return self.model.predict_tensor(t.unsqueeze(0) if t.ndim == 3 else t)[0]

    def score_array(self, image: np.ndarray) -> dict[str, Any]:
        return self.model.predict_arrays([image])[0]

    def info(self) -> dict[str, Any]:
        meta = getattr(self.model, "meta", {}) or {}
        return jsonable({
            "task": self.model.task,
            "outputs": list(self.model.classes),
            "arch": meta.get("arch"),
            "preset": self.preset.name,
            "metrics": meta.get("metrics", {}),
        })
