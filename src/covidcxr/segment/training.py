"""Training a lung segmenter on manifest masks: from scratch, or fine-tuned from the pretrained U-Net.

    covidcxr segment train --data MANIFEST --out RUN                               # compact U-Net
    covidcxr segment train --data MANIFEST --out RUN --init lung-unet-vgg11 --size 256  # fine-tune

Training uses the manifest rows with a ``mask_path`` (PNG, 0/255, at the image's size). With a
``split`` column, train/val/test follow it (patient-level), so Dice on ``test`` is Dice on held-out
patients; without one, a seeded patient-level split is drawn. Fine-tuning starts from the
pretrained weights at the pretrained preset (``lung-unet``, here at ``--size``), by default with
the VGG encoder frozen and every BatchNorm's running statistics kept (batches of 4 cannot estimate
them): the decoder learns the reference masks' outline convention while the features learnt on 704
images from two hospitals stay as they were. ``train_encoder="deep"`` also trains the last VGG stage
(``conv5``, ``conv5s``: 16 x 16 at 256 px, a few % of the step's cost), ``"all"`` every encoder
layer, both at ``encoder_lr_scale`` times the learning rate.

The learning rate warms up over the first 5 % of training and then follows a cosine down to 1 % of
its peak. With ``max_minutes``, training progress is the larger of steps done / steps planned and
minutes spent / ``max_minutes``: on a loaded machine the schedule still anneals completely within
the budget (training then stops mid-epoch when the budget is spent), instead of being cut off at
its peak. Validation Dice after every epoch picks the weights kept.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from covidcxr.overrides import with_overrides
from covidcxr.segment.loading import FORMAT, load_segmenter
from covidcxr.segment.masks import dice, read_mask
from covidcxr.segment.model import UNet, lung_logit
from covidcxr.segment.segmenter import LungSegmenter, _standardize

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


def _augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, jitter: float = 0.4,
             gamma: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random affine for image and mask (rotation +-10 deg, scale +-12 %, shift +-6 %: the dev
    films are cropped and framed in many ways), plus contrast/brightness jitter on the image and, for
    inputs in [-0.5, 0.5] (the pretrained preset), a random gamma in [1 - gamma, 1 + gamma] (exposure).
    No flips: the heart makes a chest film left/right asymmetric."""
    b = x.shape[0]
    ang = (torch.rand(b, generator=gen) - 0.5) * 2 * np.deg2rad(10)
    scale = 1 + (torch.rand(b, generator=gen) - 0.5) * 0.24
    shift = (torch.rand(b, 2, generator=gen) - 0.5) * 0.12
    if gamma:
        g = 1 + (torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 2 * gamma
        x = (x + 0.5).clamp(0, 1) ** g - 0.5
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
    """Keep every BatchNorm's running statistics (eval mode); its affine weights may still learn."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()


#: encoder layers trained by ``train_encoder`` (the pretrained U-Net's VGG-11 stages)
ENCODER_TRAINED = {"none": (), "deep": ("conv5", "conv5s"), "all": None}


def lr_factor(progress: float, warmup: float = 0.05, floor: float = 0.01) -> float:
    """Learning-rate multiplier at ``progress`` in [0, 1]: linear warm-up, then cosine to ``floor``."""
    p = min(max(progress, 0.0), 1.0)
    warm = min(1.0, (p + 1e-9) / warmup) if warmup > 0 else 1.0
    return warm * (floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * p)))


@dataclass(frozen=True)
class SegmenterTrainConfig:
    """How ``covidcxr segment train`` trains; :func:`train_segmenter` takes one (or keyword overrides)."""

    # start: None trains the compact U-Net from scratch (``base`` channels, ``depth`` levels; ``size`` a multiple
    # of 2**depth); a segmenter name or file fine-tunes it at its own preset (``size`` overrides the preset's)
    init: str | None = None
    size: int = 256
    base: int = 16
    depth: int = 4
    # fine-tuning only: which encoder layers learn (ENCODER_TRAINED: "none", "deep", "all"; None follows
    # freeze_encoder, the old spelling), at encoder_lr_scale x lr
    freeze_encoder: bool = True
    train_encoder: str | None = None
    encoder_lr_scale: float = 0.1
    # schedule: lr None is 1e-3 (fine-tune) or 2e-3 (scratch), warmed up then cosine; training stops after
    # epochs, max_steps or max_minutes (the schedule anneals within max_minutes), whichever comes first
    epochs: int = 40
    batch_size: int = 8
    lr: float | None = None
    max_steps: int | None = None
    max_minutes: float | None = None
    # data: the validation share of patients when the manifest has no split column; the seed of that split,
    # of the weights and of the augmentation
    val_fraction: float = 0.2
    seed: int = 0


def train_segmenter(manifest: str | os.PathLike, out: str | os.PathLike, config: SegmenterTrainConfig | None = None,
                    *, log_fn: Callable[[str], None] | None = None, **overrides: Any) -> dict:
    """Train (``init=None``) or fine-tune (``init``: a segmenter name or file) on the manifest's masks.

    ``config``: a :class:`SegmenterTrainConfig`; keyword ``overrides`` replace its fields
    (``train_segmenter(m, out, epochs=3)``). Keeps the best-validation-Dice weights in ``out/segmenter.pt``;
    returns the metrics written to ``out/metrics.json`` (Dice per split at original resolution,
    patient-bootstrap 95 % CI). See the module docstring for the schedule and ``max_minutes``.
    """
    c = with_overrides(SegmenterTrainConfig, config, overrides, where="train_segmenter")
    init, size, epochs, batch_size, lr, seed = c.init, c.size, c.epochs, c.batch_size, c.lr, c.seed
    base, depth, max_steps, max_minutes = c.base, c.depth, c.max_steps, c.max_minutes
    encoder_lr_scale = c.encoder_lr_scale
    from covidcxr.data import ManifestError
    from covidcxr.models.checkpoint import atomic_torch_save

    say = log_fn or log.info
    trained_enc = (c.train_encoder or ("none" if c.freeze_encoder else "all")) if init else "none"
    if trained_enc not in ENCODER_TRAINED:
        raise ValueError(f"train_encoder must be one of {', '.join(ENCODER_TRAINED)}, not {trained_enc!r}")
    torch.manual_seed(seed)
    if init:
        start = load_segmenter(init, size=size)
        if start.preset is None:
            raise ManifestError(f"--init {init}: only a preset-based segmenter (e.g. lung-unet-vgg11) can be fine-tuned")
        model = copy.deepcopy(start.model).float()
        preset = start.preset
        size = preset.size
        arch, kwargs = "lung-unet-vgg11", {}
        lr = lr or 1e-3

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
    groups = _split_rows(df, c.val_fraction, seed)
    if not groups["train"]:
        raise ManifestError(f"{manifest}: no training images with masks")
    t_load = time.time()
    xtr, ytr, _ = _load_pairs(df, groups["train"], size, to_input)
    val_pairs = _load_pairs(df, groups["val"], size, to_input)[2] if groups["val"] else []
    say(f"segment: {len(xtr)} training / {len(val_pairs)} validation images at {size} px "
        f"({time.time() - t_load:.0f}s to load){'; init ' + init if init else ''}")
    xtr_t, ytr_t = torch.from_numpy(xtr), torch.from_numpy(ytr)
    frozen: list[str] = []
    groups_lr = [{"params": [p for p in model.parameters()], "lr": lr}]
    if init:
        enc_names = {n for n, _ in model.named_parameters() if n.split(".")[0] in model.ENCODER}
        layers = ENCODER_TRAINED[trained_enc]
        enc_train = {n for n in enc_names if layers is None or n.split(".")[0] in layers}
        named = dict(model.named_parameters())
        for n in enc_names - enc_train:
            named[n].requires_grad_(False)
        frozen = ["batchnorm statistics"] + ([] if trained_enc == "all" else
                                             [f"encoder except {', '.join(layers)}" if layers else "encoder"])
        groups_lr = [{"params": [p for n, p in named.items() if n not in enc_names], "lr": lr}]
        if enc_train:
            groups_lr.append({"params": [named[n] for n in sorted(enc_train)], "lr": lr * encoder_lr_scale})
    for g in groups_lr:
        g["peak_lr"] = g["lr"]
    opt = torch.optim.AdamW(groups_lr, lr=lr, weight_decay=1e-4)
    steps_per_epoch = max(1, int(np.ceil(len(xtr) / batch_size)))
    total = min(epochs * steps_per_epoch, max_steps or 10**9)
    budget = 60 * max_minutes if max_minutes else None
    gen = torch.Generator().manual_seed(seed)
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    jitter = 0.2 if init else 0.4  # the pretrained input is [-0.5, 0.5], not standardised
    gamma = 0.3 if init else 0.0
    # channels-last convolutions are 15-30 % faster on CPU (measured on the VGG U-Net at 128-256 px)
    model = model.to(memory_format=torch.channels_last)
    best, best_state, best_epoch, history, step, t0 = -1.0, None, 0, [], 0, time.time()
    stopped = ""

    def progress() -> float:
        p = step / total
        return max(p, (time.time() - t0) / budget) if budget else p

    while step < total and not stopped:
        model.train()
        if init:
            _freeze_bn(model)
        perm = torch.randperm(len(xtr_t), generator=gen)
        losses, t_ep = [], time.time()
        for s in range(0, len(perm), batch_size):
            prog = progress()
            if step >= total or (step and prog >= 1.0):  # the first step always runs
                break
            for g in opt.param_groups:
                g["lr"] = g["peak_lr"] * lr_factor(prog)
            idx = perm[s : s + batch_size]
            x, y = _augment(xtr_t[idx], ytr_t[idx], gen, jitter, gamma)
            loss = _loss(lung_logit(model, x.contiguous(memory_format=torch.channels_last)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
        if budget and step < total and progress() >= 1.0:
            stopped = f"stopped at step {step} of {total}: --max-minutes {max_minutes} spent (schedule annealed)"
        if not losses:
            break
        model.eval()
        seg = LungSegmenter(model, size, preset=preset)
        vd = float(np.mean(evaluate_dice(seg, val_pairs))) if val_pairs else float("nan")
        epoch = len(history) + 1
        history.append({"epoch": epoch, "step": step, "loss": float(np.mean(losses)), "val_dice": vd,
                        "lr": float(opt.param_groups[0]["lr"]),
                        "s_per_step": round((time.time() - t_ep) / len(losses), 2),
                        "seconds": round(time.time() - t0, 1)})
        say(f"segment epoch {epoch} step {step}/{total} loss {np.mean(losses):.4f} val Dice {vd:.4f} "
            f"lr {opt.param_groups[0]['lr']:.2e} ({time.time() - t0:.0f}s)")
        score = vd if np.isfinite(vd) else -float(np.mean(losses))
        if score > best:
            best, best_epoch = score, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if stopped:
            say(f"segment: {stopped}")
    model = model.to(memory_format=torch.contiguous_format)
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
                     "lr": lr, "seed": seed, "frozen": frozen, "train_encoder": trained_enc,
                     "encoder_lr_scale": encoder_lr_scale if trained_enc != "none" else None,
                     "schedule": "5 % warm-up, cosine to 1 %" + (f" within {max_minutes} min" if budget else ""),
                     "best_epoch": best_epoch, "stopped": stopped,
                     "seconds": round(time.time() - t0, 1),
                     "patients": {k: sorted(df.loc[v, "patient_id"].astype(str).unique().tolist())
                                  for k, v in groups.items()}},
    }
    atomic_torch_save(bundle, outdir / "segmenter.pt")
    (outdir / "metrics.json").write_text(json.dumps({"metrics": metrics, "history": history, "init": init_info,
                                                     "training": {k: v for k, v in bundle["training"].items()
                                                                  if k != "patients"}}, indent=2))
    return {"checkpoint": str(outdir / "segmenter.pt"), **metrics}
