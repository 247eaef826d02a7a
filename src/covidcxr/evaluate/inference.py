"""Batch probabilities for the rows of a manifest.

Inference goes through :class:`covidcxr.predict.Predictor` when that module provides a batch API
over paths, so evaluation, the CLI and the service share one code path. Until then (or when it is
missing) a small DataLoader over the manifest rows does the same thing: read, preset (with the
row's lung mask when the preset crops to the lungs), model, softmax(logits / temperature).

Unreadable images do not stop a run: they are returned in ``failures`` and left out of the metrics.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from covidcxr.models.checkpoint import LoadedModel

log = logging.getLogger(__name__)


@dataclass
class Predictions:
    """Probabilities for the readable rows of ``frame`` (same order), and the rows that failed."""

    frame: pd.DataFrame
    probs: np.ndarray
    failures: list[dict[str, str]] = field(default_factory=list)


class _RowDataset(Dataset):
    def __init__(self, paths: list[str], masks: list[str | None], preset: Any):
        self.paths, self.masks, self.preset = paths, masks, preset

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from covidcxr.io import CXRReadError, read_image
        from covidcxr.preprocess import PresetError

        try:
            img = read_image(self.paths[i])
            mask = None
            if self.preset.lung_crop and self.masks[i]:
                mask = read_image(self.masks[i]) > 0.5
            return self.preset(img, mask), i, ""
        except (CXRReadError, PresetError, OSError) as err:
            msg = str(err) if self.paths[i] in str(err) else f"{self.paths[i]}: {err}"
            size = self.preset.size
            return torch.zeros(self.preset.channels, size, size), i, msg


def _mask_col(frame: pd.DataFrame) -> list[str | None]:
    if "mask_path" not in frame.columns:
        return [None] * len(frame)
    return [v if isinstance(v, str) and v else None for v in frame["mask_path"]]


@torch.inference_mode()
def predict_frame(
    loaded: LoadedModel,
    frame: pd.DataFrame,
    *,
    batch_size: int = 16,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    temperature: float | None = None,
) -> Predictions:
    """Class probabilities (N x K) for every row of ``frame`` (needs a ``path`` column).

    ``temperature`` overrides the checkpoint's calibration temperature (1.0 = raw softmax).
    """
    t = float(loaded.temperature if temperature is None else temperature) or 1.0
    paths = [str(p) for p in frame["path"]]
    ds = _RowDataset(paths, _mask_col(frame), loaded.preset)
    dl = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    model = loaded.model.to(device).eval()
    k = len(loaded.classes)
    probs = np.full((len(paths), k), math.nan, dtype=np.float64)
    failures: list[dict[str, str]] = []
    for x, idx, err in dl:
        logits = model(x.to(device)).float()
        if logits.ndim != 2 or logits.shape[1] != k:
            raise ValueError(f"{loaded.path}: model returns shape {tuple(logits.shape)}, expected N x {k}")
        p = torch.softmax(logits / t, dim=1).cpu().double().numpy()
        for j, (i, e) in enumerate(zip(idx.tolist(), err)):
            if e:
                failures.append({"path": paths[i], "error": e})
            else:
                probs[i] = p[j]
    ok = ~np.isnan(probs).any(1)
    for f in failures:
        log.warning("skipped %s", f["error"])
    return Predictions(frame=frame[ok].reset_index(drop=True), probs=probs[ok], failures=failures)
