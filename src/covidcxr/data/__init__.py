"""Datasets for covidcxr: manifests, source adapters, patient-level splits, audit, Dataset/DataModule.

``CXRDataModule`` (which imports Lightning) and the audit load lazily, so ``import covidcxr.data``
stays fast.
"""

from __future__ import annotations

from typing import Any

from covidcxr.data.cache import PreparedCache
from covidcxr.data.dataset import CXRDataset
from covidcxr.data.labels import CLASSES, map_finding, normalize_label
from covidcxr.data.manifest import (
    ManifestError,
    keep_labels,
    read_covidx_labels,
    read_manifest,
    write_covidx_labels,
    write_manifest,
)
from covidcxr.data.sampling import RebalancingSampler, WeightedSampler, class_weights, rebalancing_sampler
from covidcxr.data.sources import ADAPTERS, load_source
from covidcxr.data.splits import build_manifest

__all__ = [
    "CLASSES", "ManifestError", "read_manifest", "write_manifest", "read_covidx_labels", "write_covidx_labels",
    "build_manifest", "load_source", "ADAPTERS", "map_finding", "normalize_label", "CXRDataset", "CXRDataModule",
    "DataConfig",
    "rebalancing_sampler", "RebalancingSampler", "WeightedSampler", "class_weights", "PreparedCache",
    "audit_manifest", "keep_labels",
]


def __getattr__(name: str) -> Any:
    if name in ("CXRDataModule", "DataConfig"):
        from covidcxr.data import datamodule

        return getattr(datamodule, name)
    if name == "audit_manifest":
        from covidcxr.data.audit import audit_manifest

        return audit_manifest
    raise AttributeError(f"module 'covidcxr.data' has no attribute {name!r}")
