"""Training: recipes (YAML in ``configs/``), the LightningModule, fit and resume.

    >>> from covidcxr.train import load_config, fit
    >>> cfg = load_config("configs/deepcovid-resnet18.yaml", ["model.weights=none", "trainer.max_epochs=2"])
    >>> fit(cfg, data="data/manifest.csv", out="runs/r18")      # -> runs/r18/best.ckpt, last.ckpt

Transfer recipes (``configs/transfer-*.yaml``) warm up the head on a frozen pretrained body
(``model.warmup_epochs``) and fine-tune with a lower body learning rate (``optimizer.body_lr_mult``);
``model.freeze_backbone`` is a linear probe; ``stages:`` chains trainings (twice transfer).

``CXRClassifier`` and ``fit`` import Lightning lazily so that ``import covidcxr.train`` stays light.
"""

from __future__ import annotations

from typing import Any

from covidcxr.train.config import DEFAULTS, VAL_METRICS, ConfigError, apply_overrides, load_config, validate

#: A training config is a validated nested dict (see covidcxr.train.config.DEFAULTS).
TrainConfig = dict

__all__ = ["DEFAULTS", "VAL_METRICS", "ConfigError", "TrainConfig", "apply_overrides", "load_config", "validate",
           "fit", "CXRClassifier", "AtomicCheckpointIO"]


def __getattr__(name: str) -> Any:
    if name in ("fit", "fit_one", "AtomicCheckpointIO", "build_trainer", "prepare"):
        from covidcxr.train import runner as _runner

        return getattr(_runner, name)
    if name == "CXRClassifier":
        from covidcxr.train.module import CXRClassifier

        return CXRClassifier
    raise AttributeError(f"module 'covidcxr.train' has no attribute {name!r}")
