"""Torch Dataset over a manifest: decode -> preset.prepare (cached) -> augment -> preset.finalize."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from covidcxr.data.cache import PreparedCache
from covidcxr.data.labels import CLASSES
from covidcxr.data.manifest import ManifestError
from covidcxr.io import CXRReadError, read_image
from covidcxr.preprocess import AUGMENT_RECIPES, Augment, Preset, get_preset, lung_hist_fallbacks

log = logging.getLogger(__name__)
SCORE_COLUMNS = ("geographic_extent", "opacity")


def _label_index(classes: Sequence[str] | Mapping[str, int]) -> dict[str, int]:
    if isinstance(classes, Mapping):
        return {str(k): int(v) for k, v in classes.items()}
    return {c: i for i, c in enumerate(classes)}


def _blank(v: object) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or str(v).strip() == ""


def cache_fingerprint(preset: Preset) -> str:
    """The prepared-image cache's folder name: the preset's fingerprint and, where its films need a lung mask, the
    segmenter that makes them (the preset's own fingerprint leaves it out), so another segmenter never reads
    films cropped or standardised with the old one's masks."""
    fp = preset.fingerprint()
    rec = getattr(preset.masks, "record", None)
    if preset.needs_lung_mask and callable(rec):
        fp += "-" + hashlib.sha256(json.dumps(rec(), sort_keys=True).encode()).hexdigest()[:8]
    return fp


class CXRDataset(Dataset):
    """Images of a manifest frame as dicts ``{"image", "label", "index", "scores", "path", "patient_id",
    "source", "group"}``.

    - ``image``: C x H x W float32 tensor from ``preset``; ``label``: class index, -1 if unlabelled;
      ``index``: row position; ``scores``: ``[geographic_extent, opacity]`` with NaN where missing.
    - ``source``: index of the row's ``source`` in ``sources`` (default: the frame's sources, sorted), -1
      when unknown; ``group``: ``source * num_classes + label``, the (source, class) cell that group-robust
      training balances (-1 when either is unknown). Pass the same ``sources`` to every split.
    - ``classes``: class names (index = position) or a mapping ``{label: index}`` to merge classes
      (e.g. ``{"normal": 0, "pneumonia": 0, "COVID-19": 1}``). A label outside it is an error.
    - ``augment``: an :class:`~covidcxr.preprocess.Augment`, a recipe name, or None; it is seeded by
      ``(index, epoch)``, so call :meth:`set_epoch` (the samplers do it) to vary it per epoch.
    - ``cache_dir``: keep ``preset.prepare`` outputs on disk (see :mod:`covidcxr.data.cache`).

    An unreadable image raises :class:`~covidcxr.io.CXRReadError` naming the file; run
    :meth:`check` first to find (and drop) every bad file in one pass.
    """

    def __init__(self, frame: pd.DataFrame, preset: str | Preset | dict = "covidnet",
                 augment: Augment | str | None = None, cache_dir: str | os.PathLike | None = None,
                 classes: Sequence[str] | Mapping[str, int] = CLASSES, sources: Sequence[str] | None = None):
        if "path" not in frame.columns:
            raise ManifestError("dataset frame has no 'path' column")
        self.frame = frame.reset_index(drop=True)
        self.preset = get_preset(preset)
        if isinstance(augment, str):
            if augment not in AUGMENT_RECIPES:
                raise ValueError(f"unknown augmentation recipe {augment!r}; known: {sorted(AUGMENT_RECIPES)}")
            augment = AUGMENT_RECIPES[augment]
        self.augment = augment
        self.classes = classes
        self.class_to_index = _label_index(classes)
        self.num_classes = len(set(self.class_to_index.values()))
        if sources is None:
            sources = sorted({str(v) for v in frame.get("source", pd.Series(dtype=str)) if not _blank(v)})
        self.sources = [str(s) for s in sources]
        self.cache_dir = cache_dir
        self.cache = PreparedCache(cache_dir, cache_fingerprint(self.preset)) if cache_dir else None
        self.epoch = 0
        self._refresh()

    def _refresh(self) -> None:
        labels = self.frame["label"] if "label" in self.frame.columns else pd.Series([None] * len(self.frame))
        unknown = sorted({str(v) for v in labels if not _blank(v) and str(v) not in self.class_to_index})
        if unknown:
            where = self.frame.attrs.get("manifest_path", "the manifest")
            raise ManifestError(f"{where}: label(s) {unknown} not among the classes {list(self.class_to_index)}; "
                                "filter them out (label_filter) or pass a class mapping")
        self.labels = np.array([-1 if _blank(v) else self.class_to_index[str(v)] for v in labels], dtype=np.int64)
        cols = [self.frame[c].astype(float).to_numpy() if c in self.frame.columns else np.full(len(self.frame), np.nan)
                for c in SCORE_COLUMNS]
        self.scores = np.stack(cols, axis=1).astype(np.float32) if len(self.frame) else np.zeros((0, 2), np.float32)
        self.paths = self.frame["path"].astype(str).tolist()
        self.masks = (self.frame["mask_path"].tolist() if "mask_path" in self.frame.columns else [None] * len(self.frame))
        self.patients = (self.frame["patient_id"].astype(str).tolist() if "patient_id" in self.frame.columns
                         else [""] * len(self.frame))
        src_index = {s: i for i, s in enumerate(self.sources)}
        srcs = self.frame["source"] if "source" in self.frame.columns else pd.Series([None] * len(self.frame))
        self.source_index = np.array([-1 if _blank(v) else src_index.get(str(v), -1) for v in srcs], dtype=np.int64)
        self.groups = np.where((self.source_index >= 0) & (self.labels >= 0),
                               self.source_index * self.num_classes + self.labels, -1).astype(np.int64)

    def group_names(self) -> list[str]:
        """Name of each group id: ``"source/class"`` (group = source index x num_classes + class index)."""
        names = {}
        for lab, i in self.class_to_index.items():
            names.setdefault(i, lab)  # merged classes (binary task) are named by their first label
        return [f"{s}/{names[c]}" for s in self.sources for c in range(self.num_classes)]

    def __len__(self) -> int:
        return len(self.frame)

    def set_epoch(self, epoch: int) -> None:
        """Re-seed augmentation for a new epoch (deterministic per (seed, epoch, index))."""
        self.epoch = int(epoch)

    def _mask_path(self, i: int) -> str | None:
        # lung-field standardisation takes the segmenter's mask even where the manifest has one: its template was
        # built from segmenter masks and inference has only those (a hand-drawn mask can cover half the area, and
        # the fitted mapping would differ between training, threshold choice and prediction)
        if self.preset.hist_region == "lung" and self.preset.masks is not None:
            return None
        m = self.masks[i]
        return None if _blank(m) else str(m)

    def prepared(self, i: int) -> np.ndarray:
        """H x W [0,1] float32 after ``preset.prepare``, from the cache when possible."""
        path = self.paths[i]
        mask_path = self._mask_path(i) if self.preset.needs_lung_mask else None
        key = None
        if self.cache is not None:
            try:
                key = self.cache.key(path, mask_path)
            except FileNotFoundError:
                raise CXRReadError(path, "file not found") from None
            hit = self.cache.get(key)
            if hit is not None:
                return hit
        img = read_image(path)
        mask = None
        if mask_path is not None:
            mask = read_image(mask_path) > 0.5
        before = lung_hist_fallbacks()
        out = self.preset.prepare(img, mask)
        if lung_hist_fallbacks() > before:  # the segmenter found (almost) no lung: said per film, never fatal
            log.warning("%s: lung mask empty or tiny; histogram standardised over the whole film instead", path)
        if self.cache is not None and key is not None:
            return self.cache.put(key, out)
        return out

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        img: np.ndarray | torch.Tensor = self.prepared(i)
        if self.augment is not None:
            img = self.augment(img, index=i, epoch=self.epoch)
        return {
            "image": self.preset.finalize(img),
            "label": int(self.labels[i]),
            "index": i,
            "scores": torch.from_numpy(self.scores[i].copy()),
            "path": self.paths[i],
            "patient_id": self.patients[i],
            "source": int(self.source_index[i]),
            "group": int(self.groups[i]),
        }

    def check(self, skip_bad: bool = True) -> list[CXRReadError]:
        """Read every image once (filling the cache) and report the unreadable ones.

        With ``skip_bad`` the bad rows are dropped from this dataset and their errors returned (and
        logged, one line each); otherwise the first error is raised.
        """
        errors: list[CXRReadError] = []
        bad: list[int] = []
        for i in range(len(self)):
            try:
                self.prepared(i)
            except CXRReadError as err:
                if not skip_bad:
                    raise
                errors.append(err)
                bad.append(i)
                log.warning("unreadable image skipped: %s", err)
        if bad:
            self.frame = self.frame.drop(index=bad).reset_index(drop=True)
            self._refresh()
        return errors
