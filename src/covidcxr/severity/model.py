"""Severity networks: a detector backbone with a new 2-output head, and the inference wrapper.

Both tasks use the registry's own builder with ``num_classes=2``: the level task's head gives two
logits (level1, level2), the scores task's head gives (geographic_extent, opacity) in score units.
So a severity checkpoint is an ordinary covidcxr checkpoint (``arch_kwargs={"num_classes": 2}``)
that :func:`covidcxr.models.load` rebuilds without any special case.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from covidcxr.preprocess import Preset, get_preset
from covidcxr.severity.labels import LEVELS, SCORE_MAX, SCORES, SeverityError

log = logging.getLogger(__name__)

TASKS = {"level": "severity-level", "scores": "severity-scores"}
CLASSES = {"level": LEVELS, "scores": SCORES}


def clamp_scores(x: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Clamp N x 2 (geographic_extent, opacity) predictions to 0-8 and 0-6."""
    hi = [SCORE_MAX[s] for s in SCORES]
    if isinstance(x, torch.Tensor):
        return torch.clamp(x, min=torch.zeros(2, dtype=x.dtype, device=x.device),
                           max=torch.tensor(hi, dtype=x.dtype, device=x.device))
    return np.clip(np.asarray(x, dtype=float), 0.0, np.asarray(hi))


def head_path(arch: str) -> str:
    from covidcxr.models import get_spec

    path = get_spec(arch).head
    if not path:
        raise SeverityError(f"model {arch!r} declares no classification head; cannot attach a severity head")
    return path


def replace_head(model: nn.Module, arch: str, n_out: int = 2) -> nn.Linear:
    """Swap the registry head (a Linear layer) for a fresh ``n_out`` Linear; returns the new head."""
    path = head_path(arch)
    old = model.get_submodule(path)
    if not isinstance(old, nn.Linear):
        raise SeverityError(f"model {arch!r}: head {path!r} is {type(old).__name__}, expected a Linear layer")
    new = nn.Linear(old.in_features, n_out)
    model.set_submodule(path, new)
    return new


def feature_extractor(model: nn.Module, arch: str) -> nn.Module:
    """The same network with its head replaced by Identity: outputs the penultimate features."""
    import copy

    m = copy.deepcopy(model)
    m.set_submodule(head_path(arch), nn.Identity())
    return m.eval()


@dataclass
class Initial:
    """A network ready for severity training, and where it came from."""

    model: nn.Module
    arch: str
    preset: Preset
    init: dict[str, Any] = field(default_factory=dict)


def initial_model(task: str, init: str | os.PathLike | None = None, arch: str = "resnet18",
                  size: int | None = None, preset: str | None = None, weights: str | None = None) -> Initial:
    """The detector from ``init`` (backbone and preset kept, new 2-output head), or, without a
    detector, ``arch`` from ``weights`` (none: random; imagenet, a catalogue name or a file) with the
    preset those weights need."""
    from covidcxr import models

    if task not in TASKS:
        raise SeverityError(f"unknown severity task {task!r}; use level or scores")
    if init and weights and str(weights) != "none":
        raise SeverityError("give a detector (--init) or initial weights (--weights), not both")
    if init:
        lm = models.load(init)
        if lm.task != "classification":
            log.warning("%s is a %s checkpoint, not a detector; using its backbone anyway", init, lm.task)
        model, arch = lm.model, lm.arch
        replace_head(model, arch, 2)
        p = get_preset(preset) if preset else lm.preset
        info = {"init": str(init), "init_arch": lm.arch, "init_classes": lm.classes, "init_task": lm.task,
                "init_metrics": lm.metrics, "init_preset": lm.preset.name}
    elif weights and str(weights) != "none":
        try:
            model = models.create(arch, num_classes=2, weights=str(weights))
        except (models.WeightsError, models.ModelError) as err:  # missing/wrong file: one line
            raise SeverityError(f"--weights {weights}: {err}") from None
        p = get_preset(preset or models.preset_for(arch, str(weights)))
        src = getattr(model, "covidcxr_init", {}) or {}
        info = {"init": f"{weights} weights, no detector (new 2-output head)", "init_arch": arch,
                "init_weights": str(weights), "init_source": src.get("source"), "init_sha256": src.get("sha256")}
    else:
        model = models.build(arch, num_classes=2)
        p = get_preset(preset or models.get_spec(arch).preset)
        info = {"init": "random (no detector checkpoint given; no ImageNet weights used)"}
    if size:
        p = p.with_size(int(size))
    model.train()
    return Initial(model=model, arch=arch, preset=p, init=info)


class SeverityModel:
    """Inference on a severity checkpoint; what ``covidcxr predict --severity CKPT`` calls.

    >>> sev = SeverityModel.from_path("run/best.ckpt")
    >>> sev.predict_arrays([image])   # HxW float in [0, 1] from covidcxr.io.read_image
    [{'task': 'severity-scores', 'geographic_extent': 3.1, 'opacity': 2.4, ...}]
    """

    def __init__(self, model: nn.Module, preset: Preset, task: str, classes: Sequence[str],
                 meta: dict[str, Any] | None = None, path: str | None = None):
        if task not in TASKS.values():
            raise SeverityError(f"{path or 'model'}: task {task!r} is not a severity task "
                                f"(expected {' or '.join(TASKS.values())})")
        self.model = model.eval()
        self.preset = preset
        self.task = task
        self.classes = list(classes)
        self.meta = dict(meta or {})
        self.path = path

    @classmethod
    def from_path(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "SeverityModel":
        """Load a ``severity-level`` or ``severity-scores`` checkpoint; CheckpointError/SeverityError if not one."""
        from covidcxr import models
        from covidcxr.models.checkpoint import CheckpointError
        from covidcxr.reference_models import ReferenceModelError, resolve_model

        try:  # "reference" here means the shipped reference *severity* model
            path = resolve_model(path, severity=True)
        except ReferenceModelError as err:
            raise CheckpointError(str(err)) from None
        lm = models.load(path, device=device)
        if lm.task not in TASKS.values():
            raise CheckpointError(f"{path}: a {lm.task!r} checkpoint, not a severity model "
                                  "(train one with `covidcxr severity train`)")
        return cls(lm.model, lm.preset, lm.task, lm.classes,
                   meta={"training": lm.training, "metrics": lm.metrics, "arch": lm.arch}, path=str(path))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def raw(self, batch: torch.Tensor) -> torch.Tensor:
        """Level probabilities (N x 2) or clamped scores (N x 2) for a preprocessed batch."""
        out = self.model(batch.to(self.device)).float().cpu()
        if self.task == TASKS["level"]:
            return torch.softmax(out, dim=1)
        return clamp_scores(out)

    def predict_tensor(self, batch: torch.Tensor) -> list[dict[str, Any]]:
        """One dict per image of a batch already preprocessed with ``self.preset``.

        level:  ``{"task": "severity-level", "level": "level2", "probabilities": {"level1": .., "level2": ..}}``
        scores: ``{"task": "severity-scores", "geographic_extent": x, "opacity": y,
                  "ranges": {"geographic_extent": [0, 8], "opacity": [0, 6]}}`` (clamped)
        """
        out = self.raw(batch)
        res = []
        for row in out.tolist():
            if self.task == TASKS["level"]:
                k = int(np.argmax(row))
                res.append({"task": self.task, "level": self.classes[k],
                            "probabilities": {c: float(v) for c, v in zip(self.classes, row)}})
            else:
                d: dict[str, Any] = {"task": self.task}
                d.update({c: float(v) for c, v in zip(self.classes, row)})
                d["ranges"] = {c: [0.0, SCORE_MAX[c]] for c in self.classes}
                res.append(d)
        return res

    def preprocess(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray | None] | None = None) -> torch.Tensor:
        masks = masks or [None] * len(images)
        return torch.stack([self.preset(img, m) for img, m in zip(images, masks)])

    def predict_arrays(self, images: Sequence[np.ndarray], batch_size: int = 16) -> list[dict[str, Any]]:
        """Predict from H x W [0, 1] arrays (as :func:`covidcxr.io.read_image` returns)."""
        res: list[dict[str, Any]] = []
        for i in range(0, len(images), batch_size):
            res.extend(self.predict_tensor(self.preprocess(images[i : i + batch_size])))
        return res

    def predict_paths(self, paths: Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
        """Predict from image files; an unreadable file gives ``{"path", "error"}`` and the rest go on."""
        from covidcxr.io import CXRReadError, read_image

        res: list[dict[str, Any]] = []
        for p in paths:
            try:
                d = self.predict_arrays([read_image(p)])[0]
            except CXRReadError as err:
                d = {"error": str(err)}
            res.append({"path": str(p), **d})
        return res
