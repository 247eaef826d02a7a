"""Self-contained checkpoints: weights plus everything inference needs.

A checkpoint is a dict saved with ``torch.save``::

    format          "covidcxr-checkpoint"
    format_version  1
    arch            registry name, e.g. "resnet18"
    arch_kwargs     keyword arguments for the builder (num_classes, ...)
    task            "classification" | "severity-level" | "severity-scores"
    classes         output names, in logit order
    preset          Preset.to_dict() -- required; loading refuses a missing or unknown preset
    state_dict      model weights
    training        summary filled in by training: manifest hash, split, epochs, seed, ...
    metrics         validation / test figures known at save time
    threshold       operating threshold for the positive class (COVID-19), or None for argmax
    temperature     calibration temperature (1.0 = none)
    logit_bias      optional, one float per class: probabilities are softmax(logits / temperature + logit_bias)
                    (bias-corrected temperature scaling, written by ``covidcxr site calibrate --bias``);
                    absent = softmax(logits / temperature)
    init            how the weights were initialised (source, kept neurons), from covidcxr.models.create
    covidcxr_version

A Lightning checkpoint written by ``covidcxr train`` carries the same dict under the
key ``"covidcxr"``, so :func:`load` accepts both.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from covidcxr.preprocess import Preset, PresetError

FORMAT = "covidcxr-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or lacks what inference needs."""


@dataclass
class LoadedModel:
    model: nn.Module
    preset: Preset
    classes: list[str]
    arch: str
    task: str = "classification"
    threshold: float | None = None
    temperature: float = 1.0
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    #: per-class logit bias applied after the temperature (site calibrate --bias), None = none
    logit_bias: list[float] | None = None


def _version() -> str:
    from covidcxr import __version__

    return __version__


def make_bundle(
    model: nn.Module,
    *,
    arch: str | None = None,
    classes: list[str],
    preset: Preset | dict,
    arch_kwargs: dict[str, Any] | None = None,
    task: str = "classification",
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    threshold: float | None = None,
    temperature: float = 1.0,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint dict. ``arch`` / ``arch_kwargs`` default to what :func:`covidcxr.models.build`
    recorded on the model (e.g. ``in_chans=1`` after torchxrayvision weights)."""
    preset_d = preset.to_dict() if isinstance(preset, Preset) else Preset.from_dict(preset).to_dict()
    arch = arch or getattr(model, "covidcxr_arch", None)
    if not arch:
        raise CheckpointError("make_bundle: arch not given and the model was not built by covidcxr.models")
    recorded = getattr(model, "covidcxr_arch_kwargs", None) if getattr(model, "covidcxr_arch", None) == arch else None
    kw = {**(recorded or {}), **(arch_kwargs or {})}
    if "num_classes" not in (arch_kwargs or {}):
        # the head actually on the model wins over what build() recorded (heads get swapped)
        from covidcxr.models.registry import get_head

        try:
            kw["num_classes"] = get_head(model, arch).out_features
        except Exception:  # a model outside the registry layout: trust the class names
            kw.setdefault("num_classes", len(classes))
    if kw["num_classes"] != len(classes):
        raise CheckpointError(f"make_bundle: {len(classes)} class names for a model with {kw['num_classes']} outputs")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "arch_kwargs": kw,
        "task": task,
        "classes": list(classes),
        "preset": preset_d,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "training": dict(training or {}),
        "metrics": dict(metrics or {}),
        "threshold": threshold,
        "temperature": float(temperature),
        "extra": dict(extra or {}),
        "init": dict(getattr(model, "covidcxr_init", None) or {}),
        "covidcxr_version": _version(),
    }


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """Write to a temporary file in the same folder, then rename: a killed run never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        # mkstemp creates 0600: without this, evaluate --calibrate/--set-threshold or export would make a
        # shared checkpoint unreadable to everyone but its writer
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save(path: str | os.PathLike, model: nn.Module, **kwargs: Any) -> dict[str, Any]:
    """Save a self-contained checkpoint; see :func:`make_bundle` for the keyword arguments."""
    bundle = make_bundle(model, **kwargs)
    atomic_torch_save(bundle, path)
    return bundle


def read_bundle(path: str | os.PathLike) -> dict[str, Any]:
    from covidcxr.reference_models import ReferenceModelError, resolve_model

    try:  # "reference" / "reference-severity": the shipped models (H5)
        path = resolve_model(path)
    except ReferenceModelError as err:
        raise CheckpointError(str(err)) from None
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if p.suffix.lower() == ".safetensors":  # fp16 weights + JSON metadata (covidcxr.models.reference)
        from covidcxr.models.reference import read_safetensors_bundle

        return read_safetensors_bundle(p)
    from covidcxr.safeload import load_or_raise

    obj = load_or_raise(path, CheckpointError)
    if isinstance(obj, dict) and "covidcxr" in obj:  # Lightning checkpoint written by covidcxr train
        obj = obj["covidcxr"]
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a covidcxr checkpoint (no architecture/classes/preset); "
            "a bare state_dict can be loaded with covidcxr.models.create(name, weights=PATH)"
        )
    return obj


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a checkpoint: the model in eval mode, its preset, classes and metadata."""
    from covidcxr.models import build

    b = read_bundle(path)
    for key in ("arch", "classes", "state_dict"):
        if key not in b:
            raise CheckpointError(f"{path}: checkpoint lacks {key!r}")
    try:
        preset = Preset.from_dict(b.get("preset"))
    except PresetError as err:
        raise CheckpointError(f"{path}: {err}") from None
    from covidcxr.decision import logit_bias_of

    try:
        logit_bias = logit_bias_of(b.get("logit_bias"), len(b["classes"]), str(path))
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    try:
        model = build(b["arch"], **b.get("arch_kwargs", {}))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot build architecture {b['arch']!r} ({err})") from None
    try:
        missing, unexpected = model.load_state_dict(b["state_dict"], strict=False)
    except RuntimeError as err:  # shape mismatches raise even with strict=False
        shapes = [ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln][:3]
        raise CheckpointError(f"{path}: weights do not match architecture {b['arch']!r}: {shapes}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match architecture {b['arch']!r}: missing {list(missing)[:10]}, "
            f"unexpected {list(unexpected)[:10]}"
        )
    model.eval().to(device)
    model.covidcxr_init = dict(b.get("init") or {})
    return LoadedModel(
        model=model,
        preset=preset,
        classes=list(b["classes"]),
        arch=b["arch"],
        task=b.get("task", "classification"),
        threshold=b.get("threshold"),
        temperature=float(b.get("temperature", 1.0) or 1.0),
        training=b.get("training", {}),
        metrics=b.get("metrics", {}),
        meta={k: v for k, v in b.items() if k not in ("state_dict",)},
        path=str(path),
        logit_bias=logit_bias,
    )
