"""Explain image files in batches: overlays (.png) and heatmaps (.npy, model and original size)."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from covidcxr.decision import DecisionRule
from covidcxr.explain.methods import SIGNED, Context, explain, get_method
from covidcxr.explain.render import heat_scale as shared_scale, save_overlay, to_original

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """One image read and preprocessed, with what is needed to map heatmaps back."""

    path: str
    tensor: torch.Tensor
    shape: tuple[int, int]
    mask: np.ndarray | None = None  # lung mask used by a lung-crop preset
    image: np.ndarray | None = None  # the original [0, 1] image, for overlays at its resolution


@dataclass
class ExplainRecord:
    file: str
    method: str
    predicted: str
    probability: float
    target: str
    target_probability: float
    overlay: str
    heatmap: str
    heatmap_original: str
    seconds: float
    probabilities: dict[str, float] = field(default_factory=dict)
    #: the rule that made ``predicted``: the checkpoint's operating point, as predict and serve use it
    decision_rule: str = ""
    threshold: float | None = None
    #: the overlay's colour scale: raw heatmap range, the value drawn as 1, and "image" or "shared"
    heat_scale: dict = field(default_factory=dict)


def prepare_image(path: str | os.PathLike, preset, mask: np.ndarray | None = None) -> Prepared:
    """Read and preprocess one file. Raises CXRReadError / PresetError naming the file."""
    from covidcxr.io import read_image
    from covidcxr.preprocess import PresetError

    img = read_image(path)
    if preset.needs_lung_mask and mask is None:
        masks = preset.masks
        if masks is None:  # a preset without its model's segmenter: the pretrained U-Net, as older checkpoints
            from covidcxr.segment.maskspec import MaskSpec

            masks = MaskSpec.for_model(None)
        mask = np.asarray(masks(img)).astype(bool)
    return Prepared(str(path), preset(img, mask), img.shape, mask, img)


def probabilities(model: torch.nn.Module, x: torch.Tensor, temperature: float = 1.0,
                  logit_bias: Sequence[float] | None = None) -> torch.Tensor:
    """softmax(logits / T + bias), as predict gives (covidcxr.decision.softmax_with_temperature)."""
    with torch.no_grad():
        z = model(x) / float(temperature or 1.0)
        return torch.softmax(z + torch.as_tensor(logit_bias, dtype=z.dtype) if logit_bias is not None else z, dim=1)


def _short(name: str, n: int = 48) -> str:
    return name if len(name) <= n else name[: n // 2 - 1] + "..." + name[-(n // 2 - 2):]


def _unique_stem(path: str, used: set[str]) -> str:
    stem = Path(path).stem or "image"
    name, i = stem, 1
    while name in used:
        i += 1
        name = f"{stem}-{i}"
    used.add(name)
    return name


def explain_files(
    paths: Sequence[str | os.PathLike],
    loaded,
    methods: Sequence[str],
    out: str | os.PathLike,
    *,
    batch_size: int = 8,
    target: str | None = None,
    ctx: Context | None = None,
    on_error=None,
    heat_scale: str | float = "image",
) -> tuple[list[ExplainRecord], list[tuple[str, str]]]:
    """Explain every readable file; return the records and ``(file, reason)`` for those that failed.

    ``loaded`` is a :class:`covidcxr.models.LoadedModel`. ``target`` names a class to explain
    (default: each image's predicted class). Overlays show the original image beside the heatmap at
    the image's resolution. ``heat_scale``: "image" normalises each heatmap by its own maximum;
    "batch" uses one scale per method across all the images of this call (so they can be compared);
    a number fixes that scale (raw units of the method).
    """
    from covidcxr.io import CXRReadError
    from covidcxr.preprocess import PresetError

    from covidcxr.outpaths import refuse_inputs_in

    out = Path(out)
    # overlays are named after their inputs (a.png -> a_gradcam.png): in the inputs' own folder one could write
    # over another input, and the next run would read the overlays as X-rays
    refuse_inputs_in(out, paths, "covidcxr explain", "an overlay could replace an input and be read as one next time")
    out.mkdir(parents=True, exist_ok=True)
    model, preset, classes = loaded.model.eval(), loaded.preset, list(loaded.classes)
    ctx = ctx or Context(arch=loaded.arch, preset=preset)
    for m in methods:
        get_method(m)
    if target is not None and target not in classes:
        raise ValueError(f"--target {target!r} is not one of the model's classes {classes}")
    records: list[ExplainRecord] = []
    failures: list[tuple[str, str]] = []
    used: set[str] = set()
    rule = DecisionRule.from_predictor(loaded)
    rule_text = rule.describe(classes)
    thr = rule.threshold if rule.uses_threshold(classes) else None
    if not (heat_scale in ("image", "batch") or isinstance(heat_scale, (int, float))):
        raise ValueError(f"heat_scale must be 'image', 'batch' or a number, not {heat_scale!r}")
    pending: list[tuple[ExplainRecord, str]] = []  # batch scale: overlays drawn once every heatmap is known

    def fail(path: str, reason: str) -> None:
        failures.append((path, reason))
        if on_error:
            on_error(path, reason)

    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        items: list[Prepared] = []
        for p in chunk:
            try:
                items.append(prepare_image(p, preset))
            except (CXRReadError, PresetError) as err:
                msg = str(err)
                fail(str(p), msg.split(": ", 1)[1] if msg.startswith(str(p)) else msg)
        if not items:
            continue
        x = torch.stack([it.tensor for it in items])
        probs = probabilities(model, x, loaded.temperature, loaded.logit_bias)
        pred = torch.as_tensor(rule.label_indices(probs.numpy(), classes), dtype=torch.long)
        tgt = torch.full_like(pred, classes.index(target)) if target is not None else pred
        stems = [_unique_stem(it.path, used) for it in items]
        for method in methods:
            t0 = time.perf_counter()
            heat = explain(model, x, method, target=tgt, ctx=ctx).cpu().numpy().astype(np.float32)
            per_image = (time.perf_counter() - t0) / len(items)
            for i, it in enumerate(items):
                stem = f"{stems[i]}_{method}"
                h = heat[i]
                np.save(out / f"{stem}.npy", h)
                np.save(out / f"{stem}_original.npy", to_original(h, preset, it.shape, it.mask))
                p_pred, p_tgt = float(probs[i, pred[i]]), float(probs[i, tgt[i]])
                rule_short = "argmax" if thr is None else f"{rule.positive} if p >= {thr:.3f}"
                title = (f"{_short(Path(it.path).name)}\n{method}: evidence for {classes[int(tgt[i])]} "
                         f"| predicted {classes[int(pred[i])]} (p={p_pred:.2f}; rule: {rule_short})")
                rec = ExplainRecord(
                    file=it.path, method=method, predicted=classes[int(pred[i])], probability=p_pred,
                    target=classes[int(tgt[i])], target_probability=p_tgt, overlay=str(out / f"{stem}.png"),
                    heatmap=str(out / f"{stem}.npy"), heatmap_original=str(out / f"{stem}_original.npy"),
                    seconds=per_image, probabilities={c: float(probs[i, k]) for k, c in enumerate(classes)},
                    decision_rule=rule_text, threshold=thr,
                )
                records.append(rec)
                if heat_scale == "batch":
                    pending.append((rec, title))
                else:
                    fixed = float(heat_scale) if heat_scale != "image" else None
                    rec.heat_scale = save_overlay(rec.overlay, it.image, np.load(rec.heatmap_original), title=title,
                                                  signed=method in SIGNED, scale=fixed)
    if pending:
        _render_shared(pending)
    summary = {
        "model": getattr(loaded, "path", None), "arch": loaded.arch, "preset": preset.name, "methods": list(methods),
        "decision_rule": rule.to_dict(classes),
        "heat_scale": {"mode": heat_scale, "note": HEAT_SCALE_NOTE},
        "records": [asdict(r) for r in records], "failures": [{"file": f, "reason": r} for f, r in failures],
        "note": "Research use only; heatmaps show what the model used, not where disease is.",
    }
    (out / "explain.json").write_text(json.dumps(summary, indent=2))
    return records, failures


HEAT_SCALE_NOTE = (
    "overlays: the plain image (left) and the heatmap over it (right) at the image's resolution; colours show "
    "heatmap / scale, clipped to 0..1 (-1..1 for signed methods: red for, blue against), where the scale is the "
    "image's own maximum (|max| if signed) or, with --heat-scale batch or a number, one value shared by every "
    "image of a method; each overlay states its raw range"
)


def _render_shared(pending: list[tuple[ExplainRecord, str]]) -> None:
    """Draw overlays with one scale per method: the largest heatmap value of that method in the batch."""
    from covidcxr.io import read_image

    by_method: dict[str, list[tuple[ExplainRecord, str]]] = {}
    for rec, title in pending:
        by_method.setdefault(rec.method, []).append((rec, title))
    scales = {m: shared_scale([np.load(r.heatmap_original) for r, _ in group], m in SIGNED)
              for m, group in by_method.items()}
    images: dict[str, np.ndarray] = {}
    for rec, title in pending:  # records come image by image, so one image is read once
        if rec.file not in images:
            images.clear()
            images[rec.file] = read_image(rec.file)
        rec.heat_scale = save_overlay(rec.overlay, images[rec.file], np.load(rec.heatmap_original), title=title,
                                      signed=rec.method in SIGNED, scale=scales[rec.method] or None)
        rec.heat_scale["scope"] = "batch"


def iter_images(items: Iterable[str]) -> list[str]:
    """Expand folders into their supported image files; keep files as given (bad ones fail later, by name)."""
    from covidcxr.io import is_supported

    files: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            files += sorted(str(f) for f in p.rglob("*") if f.is_file() and is_supported(f))
        else:
            files.append(str(p))
    return files
