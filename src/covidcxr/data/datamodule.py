"""Lightning DataModule over a split manifest, with balancing samplers that work under DDP."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Sequence

import lightning as L
import pandas as pd
import torch
from torch.utils.data import DataLoader

from covidcxr.data.dataset import CXRDataset
from covidcxr.data.labels import CLASSES
from covidcxr.data.manifest import ManifestError, keep_labels, read_manifest
import numpy as np

from covidcxr.data.sampling import (GroupBalancedSampler, ShuffleSampler, WeightedSampler, class_weights,
                                    merge_small_groups, rebalancing_sampler)
from covidcxr.overrides import with_overrides
from covidcxr.preprocess import Augment, Preset, get_preset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataConfig:
    """How :class:`CXRDataModule` loads a manifest (``covidcxr train`` builds it from a recipe's ``data`` section)."""

    # batches: size, decode worker processes, pinned memory for a GPU
    batch_size: int = 8
    num_workers: int = 0
    pin_memory: bool = False
    # images: augmentation of the training split only (an Augment or a recipe name); a folder caching prepared images
    augment: Augment | str | None = None
    cache_dir: str | os.PathLike | None = None
    # sampling of the training split: None (shuffle), "rebalance" (minority_fraction of every batch from the rarest
    # label, or minority_label), "weighted" (balanced class weights) or "group_balanced" (every (source, class) cell
    # equally often, within group_max_repeat and group_min_size: covidcxr.data.sampling.GroupBalancedSampler); seed
    sampler: Literal["rebalance", "weighted", "group_balanced"] | None = None
    minority_fraction: float = 0.5
    minority_label: str | None = None
    group_max_repeat: float = 4.0
    group_min_size: int = 5
    seed: int = 0
    # rows: the split names; labels to keep (a list, or a function frame -> boolean mask); class names (index =
    # position) or a mapping {label: index} to merge classes
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    label_filter: Sequence[str] | Callable[[pd.DataFrame], pd.Series] | None = None
    classes: Sequence[str] | Mapping[str, int] = tuple(CLASSES)


class CXRDataModule(L.LightningDataModule):
    """Train/val/test loaders from one manifest (``split`` column) and one preprocessing preset.

    ``config``: a :class:`DataConfig` (batching, sampling, augmentation, which rows); keyword ``overrides`` replace
    its fields (``CXRDataModule(manifest, preset, batch_size=4, sampler="rebalance")``). Each sampler is sharded
    per rank under DDP and re-seeded per epoch. Batches carry ``source`` and ``group`` indices, numbered by
    :attr:`sources` (all splits').
    """

    def __init__(self, manifest: str | os.PathLike | pd.DataFrame, preset: str | Preset | dict = "covidnet",
                 config: DataConfig | None = None, **overrides: Any):
        super().__init__()
        c = with_overrides(DataConfig, config, overrides, where="CXRDataModule")
        if c.sampler not in (None, "rebalance", "weighted", "group_balanced"):
            raise ValueError(f"sampler must be None, 'rebalance', 'weighted' or 'group_balanced', not {c.sampler!r}")
        self.config = c
        self.group_max_repeat, self.group_min_size = float(c.group_max_repeat), int(c.group_min_size)
        self.manifest = manifest
        self.preset = get_preset(preset)
        self.batch_size, self.num_workers = int(c.batch_size), int(c.num_workers)
        self.augment, self.cache_dir = c.augment, c.cache_dir
        self.sampler, self.minority_fraction, self.seed = c.sampler, c.minority_fraction, int(c.seed)
        self.splits = {"train": c.train_split, "val": c.val_split, "test": c.test_split}
        self.label_filter, self.classes, self.pin_memory = c.label_filter, c.classes, c.pin_memory
        self.minority_label = c.minority_label
        self.datasets: dict[str, CXRDataset] = {}
        self.frame: pd.DataFrame | None = None
        self.sources: list[str] = []

    # ------------------------------------------------------------------ setup
    def _load(self) -> pd.DataFrame:
        if isinstance(self.manifest, pd.DataFrame):
            df = self.manifest.copy()
        else:
            df = read_manifest(self.manifest, require_split=True)
        if "split" not in df.columns:
            raise ManifestError("manifest frame has no 'split' column")
        if callable(self.label_filter):
            keep = self.label_filter(df)
            if (~keep).any():
                log.warning("label_filter left out %d of %d row(s)", int((~keep).sum()), len(df))
            df = df[keep]
        elif self.label_filter is not None:  # logs the labels it leaves out, with counts
            df, _ = keep_labels(df, list(self.label_filter))
        return df

    def setup(self, stage: str | None = None) -> None:
        if self.frame is None:
            self.frame = self._load()
            # one source numbering for every split, so a group index means the same cell in train and val
            col = self.frame["source"] if "source" in self.frame.columns else pd.Series(dtype=str)
            self.sources = sorted({str(v) for v in col.dropna() if str(v).strip()})
        for role, split in self.splits.items():
            if role in self.datasets:
                continue
            part = self.frame[self.frame["split"] == split]
            if part.empty:
                continue
            self.datasets[role] = CXRDataset(part, self.preset, augment=self.augment if role == "train" else None,
                                             cache_dir=self.cache_dir, classes=self.classes,
                                             sources=self.sources)

    def dataset(self, role: str) -> CXRDataset:
        if role not in self.datasets:
            self.setup()
        if role not in self.datasets:
            where = self.manifest if not isinstance(self.manifest, pd.DataFrame) else "the manifest frame"
            raise ManifestError(f"{where}: no images in split {self.splits.get(role, role)!r}")
        return self.datasets[role]

    # ------------------------------------------------------------------ loaders
    def _loader(self, ds: CXRDataset, sampler: torch.utils.data.Sampler | None) -> DataLoader:
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler, shuffle=False,
                          num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=False,  # workers restart per epoch, so they pick up set_epoch
                          drop_last=False)

    def train_sampler(self) -> torch.utils.data.Sampler:
        ds = self.dataset("train")
        if self.sampler == "rebalance":
            minority = None
            if self.minority_label is not None:
                if self.minority_label not in ds.class_to_index:
                    raise ManifestError(f"minority_label {self.minority_label!r} is not one of {list(ds.class_to_index)}")
                minority = ds.class_to_index[self.minority_label]
            return rebalancing_sampler(ds.labels, self.batch_size, self.minority_fraction, seed=self.seed, dataset=ds,
                                       minority_class=minority)
        if self.sampler == "weighted":
            return WeightedSampler(ds.labels, seed=self.seed, dataset=ds)
        if self.sampler == "group_balanced":
            if (ds.groups < 0).all():
                raise ManifestError("group_balanced sampling needs a 'source' column and labels in the train split")
            cells = merge_small_groups(ds.groups, ds.labels, self.group_min_size)
            return GroupBalancedSampler(cells, seed=self.seed, max_repeat=self.group_max_repeat, dataset=ds)
        return ShuffleSampler(len(ds), seed=self.seed, dataset=ds)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("train"), self.train_sampler())

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("val"), None)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"), None)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    # ------------------------------------------------------------------ helpers
    @property
    def num_classes(self) -> int:
        return len(set(self.dataset("train").class_to_index.values()))

    def group_names(self) -> list[str]:
        """``"source/class"`` per group index (what batches' ``group`` numbers)."""
        return self.dataset("train").group_names()

    def group_counts(self) -> np.ndarray:
        """Training images per group index (0 for a cell the train split lacks)."""
        ds = self.dataset("train")
        g = ds.groups[ds.groups >= 0]
        return np.bincount(g, minlength=len(ds.group_names()))

    def class_weights(self) -> torch.Tensor:
        """Balanced class weights of the training split, for a weighted loss."""
        return class_weights(self.dataset("train").labels, self.num_classes)
