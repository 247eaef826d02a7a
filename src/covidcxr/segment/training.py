"""Training a lung segmenter on manifest masks: from scratch, or fine-tuned from the pretrained U-Net.

    covidcxr segment train --data MANIFEST --out RUN                               # compact U-Net
    covidcxr segment train --data MANIFEST --out RUN --init lung-unet-vgg11 --size 256  # fine-tune

Training uses the manifest rows with a ``mask_path`` (PNG, 0/255, at the image's size). With a
``split`` column, train/val/test follow it (patient-level), so Dice on ``test`` is Dice on held-out
patients; without one, a seeded patient-level split is drawn. Fine-tuning starts from the
pretrained weights at the pretrained preset (``lung-unet``, here at ``--size``), by default with
the VGG encoder and every BatchNorm frozen: the decoder learns the reference masks' outline
convention while the features learnt on 704 images from two hospitals stay as they were.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from covidcxr.segment.inference import FORMAT, LungSegmenter, _standardize, load_segmenter
from covidcxr.segment.masks import dice, read_mask
from covidcxr.segment.model import UNet, lung_logit

log = logging.getLogger(__name__)


def _mask_rows(manifest: str | os.PathLike):
    from covidcxr.data import ManifestError, read_manifest

    df = read_manifest(manifest)
    if "mask_path" not in df.columns or df["mask_path"].isna().all():
        raise ManifestError(f"{manifest}: no rows with a mask_path; lung-segmentation training needs masks")
    return df[df["mask_path"].notna() & (df["mask_path"].astype(str).str.strip() != "")].reset_index(drop=True)


def _split_rows(df, val_fraction: float, seed: int) -> dict[str, list[int]]:
    if "split" in df.columns and df["split"].notna().all() and {"train"} <= set(df["split"]):
        groups = {s: df.index[df["split"] == s].tolist() for s in ("train", "val", "test")}
        if groups["val"]:
            return groups
        # no masks in val: carve validation patients out of train
        df = df.loc[groups["train"]]
        test = groups["test"]
    else:
        test = []
    patients = sorted(df["patient_id"].unique())
    rng = np.random.default_rng(seed)
    rng.shuffle(patients)
    n_val = max(1, int(round(len(patients) * val_fraction))) if len(patients) > 1 else 0
    val_p = set(patients[:n_val])
    return {"train": df.index[~df["patient_id"].isin(val_p)].tolist(),
            "val": df.index[df["patient_id"].isin(val_p)].tolist(), "test": test}


def _load_pairs(df, idx: list[int], size: int, to_input: Callable[[np.ndarray], np.ndarray]):
    """Network inputs and masks at ``size``, plus the originals (for Dice at full resolution)."""
    from covidcxr.io import read_image

    xs, ys, full = [], [], []
    for i in idx:
        img = read_image(df.at[i, "path"])
        m = read_mask(df.at[i, "mask_path"], img.shape)
        xs.append(to_input(img))
        ys.append(cv2.resize(m.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA))
        full.append((img, m))
    if not xs:
        return np.zeros((0, 1, size, size), np.float32), np.zeros((0, 1, size, size), np.float32), full
    return np.stack(xs)[:, None].astype(np.float32), np.stack(ys)[:, None], full


def _augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, jitter: float = 0.4) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random affine for image and mask, plus contrast/brightness jitter on the image."""
    b = x.shape[0]
    ang = (torch.rand(b, generator=gen) - 0.5) * 2 * np.deg2rad(10)
    scale = 1 + (torch.rand(b, generator=gen) - 0.5) * 0.2
    shift = (torch.rand(b, 2, generator=gen) - 0.5) * 0.1
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    y = F.grid_sample(y, grid, padding_mode="zeros", align_corners=False)
    gain = 1 + (torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * jitter
    bias = (torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * jitter
    return x * gain + bias, y


def _loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits)
    inter = (p * y).sum((1, 2, 3))
    soft_dice = 1 - (2 * inter + 1) / (p.sum((1, 2, 3)) + y.sum((1, 2, 3)) + 1)
    return F.binary_cross_entropy_with_logits(logits, y) + soft_dice.mean()


def evaluate_dice(seg: LungSegmenter, pairs: list[tuple[np.ndarray, np.ndarray]], batch_size: int = 4) -> list[float]:
    """Dice of post-processed predictions against the masks, at each image's original size."""
    out: list[float] = []
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s : s + batch_size]
        preds = seg.predict([im for im, _ in chunk])
        out += [dice(p, m) for p, (_, m) in zip(preds, chunk)]
    return out


def summarize_dice(d: Sequence[float], patients: Sequence[str] | None = None, seed: int = 0, n: int = 1000) -> dict:
    """Mean/median/min Dice with a 95 % CI from ``n`` bootstrap resamples of *patients* (images of one
    patient are resampled together), or of images when no patient ids are given."""
    if not len(d):
        return {"n": 0}
    a = np.asarray(d, float)
    ids = np.asarray(patients if patients is not None else np.arange(len(a)))
    groups = [np.nonzero(ids == u)[0] for u in np.unique(ids)]
    rng = np.random.default_rng(seed)
    boots = [a[np.concatenate([groups[i] for i in rng.integers(0, len(groups), len(groups))])].mean()
             for _ in range(n)]
    return {"n": int(len(a)), "patients": int(len(groups)), "mean": float(a.mean()), "median": float(np.median(a)),
            "min": float(a.min()), "ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
            "ci_method": "bootstrap over patients" if patients is not None else "bootstrap over images"}


_summary = summarize_dice  # the old private name


def _freeze_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)


def train_segmenter(
    manifest: str | os.PathLike,
    out: str | os.PathLike,
    *,
    init: str | None = None,
    size: int = 256,
    epochs: int = 40,
    batch_size: int = 8,
    lr: float | None = None,
    base: int = 16,
    depth: int = 4,
    freeze_encoder: bool = True,
    val_fraction: float = 0.2,
    max_steps: int | None = None,
    max_minutes: float | None = None,
    seed: int = 0,
    log_fn: Callable[[str], None] | None = None,
) -> dict:
    """Train (``init=None``) or fine-tune (``init``: a segmenter name or file) on the manifest's masks.

    Keeps the best-validation-Dice weights in ``out/segmenter.pt``; returns the metrics written to
    ``out/metrics.json`` (Dice per split at original resolution, patient-bootstrap 95 % CI).
    ``max_minutes`` stops after the first epoch that ends past that wall-clock budget.
    """
    from covidcxr.data import ManifestError
    from covidcxr.models.checkpoint import atomic_torch_save

    say = log_fn or log.info
    torch.manual_seed(seed)
    if init:
        start = load_segmenter(init, size=size)
        if start.preset is None:
            raise ManifestError(f"--init {init}: only a preset-based segmenter (e.g. lung-unet-vgg11) can be fine-tuned")
        model = copy.deepcopy(start.model).float()
        preset = start.preset
        size = preset.size
        arch, kwargs = "lung-unet-vgg11", {}
        lr = lr or 3e-4

        def to_input(img: np.ndarray) -> np.ndarray:
            return preset.array(img)[0]
    else:
        if size % 2**depth:
            raise ValueError(f"--size {size} must be a multiple of {2**depth}")
        model, preset, arch, kwargs = UNet(base=base, depth=depth), None, "unet", {"base": base, "depth": depth}
        lr = lr or 2e-3

        def to_input(img: np.ndarray) -> np.ndarray:
            return _standardize(img, size)

    df = _mask_rows(manifest)
    groups = _split_rows(df, val_fraction, seed)
    if not groups["train"]:
        raise ManifestError(f"{manifest}: no training images with masks")
    t_load = time.time()
    xtr, ytr, _ = _load_pairs(df, groups["train"], size, to_input)
    val_pairs = _load_pairs(df, groups["val"], size, to_input)[2] if groups["val"] else []
    say(f"segment: {len(xtr)} training / {len(val_pairs)} validation images at {size} px "
        f"({time.time() - t_load:.0f}s to load){'; init ' + init if init else ''}")
    xtr_t, ytr_t = torch.from_numpy(xtr), torch.from_numpy(ytr)
    frozen = []
    if init and freeze_encoder:
        for p in model.encoder_parameters():
            p.requires_grad_(False)
        frozen = ["encoder", "batchnorm"]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    steps_per_epoch = max(1, int(np.ceil(len(xtr) / batch_size)))
    total = min(epochs * steps_per_epoch, max_steps or 10**9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    jitter = 0.2 if init else 0.4  # the pretrained input is [-0.5, 0.5], not standardised
    best, best_state, history, step, t0 = -1.0, None, [], 0, time.time()
    stopped = ""
    while step < total:
        model.train()
        if frozen:
            _freeze_bn(model)
        perm = torch.randperm(len(xtr_t), generator=gen)
        losses = []
        for s in range(0, len(perm), batch_size):
            if step >= total:
                break
            idx = perm[s : s + batch_size]
            x, y = _augment(xtr_t[idx], ytr_t[idx], gen, jitter)
            loss = _loss(lung_logit(model, x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            step += 1
        model.eval()
        seg = LungSegmenter(model, size, preset=preset)
        vd = float(np.mean(evaluate_dice(seg, val_pairs))) if val_pairs else float("nan")
        epoch = len(history) + 1
        history.append({"epoch": epoch, "step": step, "loss": float(np.mean(losses)), "val_dice": vd,
                        "seconds": round(time.time() - t0, 1)})
        say(f"segment epoch {epoch} step {step}/{total} loss {np.mean(losses):.4f} val Dice {vd:.4f} "
            f"({time.time() - t0:.0f}s)")
        score = vd if np.isfinite(vd) else -float(np.mean(losses))
        if score > best:
            best, best_state = score, {k: v.detach().clone() for k, v in model.state_dict().items()}
        if max_minutes and time.time() - t0 > 60 * max_minutes and step < total:
            stopped = f"stopped after epoch {epoch}: --max-minutes {max_minutes} reached"
            say(f"segment: {stopped}")
            break
    model.load_state_dict(best_state)
    seg = LungSegmenter(model.eval(), size, preset=preset)
    metrics = {"split_source": "manifest split" if groups["test"] else f"seeded patient split (seed {seed})"}
    # Dice on the training images costs a full inference pass; the large fine-tuned U-Net skips it
    for name in ("train", "val", "test") if arch == "unet" else ("val", "test"):
        if groups[name]:
            pairs = val_pairs if name == "val" else _load_pairs(df, groups[name], size, to_input)[2]
            metrics[name] = summarize_dice(evaluate_dice(seg, pairs), df.loc[groups[name], "patient_id"].tolist(), seed)
    state = model.state_dict()
    if arch == "lung-unet-vgg11":  # like the pretrained file: float16 on disk, float32 in use (half the size)
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    init_info = None
    if init:
        from covidcxr.models import catalog

        init_info = catalog.provenance(init) if catalog.is_catalogued(init) else {"file": str(init)}
    bundle = {
        "format": FORMAT, "format_version": 2, "arch": arch, "kwargs": kwargs, "size": size,
        "preset": preset.to_dict() if preset is not None else None, "init": init_info,
        "state_dict": state, "metrics": metrics, "history": history,
        "training": {"manifest": str(manifest), "epochs": epochs, "steps": step, "batch_size": batch_size,
                     "lr": lr, "seed": seed, "frozen": frozen, "stopped": stopped,
                     "seconds": round(time.time() - t0, 1),
                     "patients": {k: sorted(df.loc[v, "patient_id"].astype(str).unique().tolist())
                                  for k, v in groups.items()}},
    }
    atomic_torch_save(bundle, outdir / "segmenter.pt")
    (outdir / "metrics.json").write_text(json.dumps({"metrics": metrics, "history": history, "init": init_info,
                                                     "training": {k: v for k, v in bundle["training"].items()
                                                                  if k != "patients"}}, indent=2))
    return {"checkpoint": str(outdir / "segmenter.pt"), **metrics}
