"""Lung segmentation: a compact U-Net, its training on manifest masks, mask prediction, and the
lung-crop hook for the ``cxnet-lungcrop`` preset (COVID-CXNet: segment, dilate, crop to the
lung bounding box, resize).

    covidcxr segment train --data MANIFEST --out RUN        # RUN/segmenter.pt, RUN/metrics.json
    covidcxr segment predict IMAGE... --model CKPT --out DIR

Training uses the manifest rows with a ``mask_path`` (PNG, 0/255, at the image's size). With a
``split`` column, train/val/test follow it (patient-level), so Dice on ``test`` is Dice on held-out
patients; without one, a seeded patient-level split is drawn. ``use_model(CKPT)`` installs the
model as :data:`covidcxr.preprocess.LUNG_SEGMENTER`; setting ``COVIDCXR_LUNG_MODEL=CKPT`` does the
same when this module is imported (the preset imports it on demand).
"""

from __future__ import annotations

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

from covidcxr.models.checkpoint import CheckpointError

log = logging.getLogger(__name__)

FORMAT = "covidcxr-segmenter"


class SegmenterError(CheckpointError):
    """A segmentation checkpoint is missing or unusable (a CheckpointError, so the CLI prints one line)."""


# --------------------------------------------------------------------------- model


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net (Ronneberger et al. 2015), ``depth`` poolings, width doubling from ``base``; 1-channel in, logits out."""

    def __init__(self, base: int = 16, depth: int = 4, in_channels: int = 1):
        super().__init__()
        widths = [base * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList([_block(in_channels, widths[0])] +
                                  [_block(widths[i], widths[i + 1]) for i in range(depth)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(depth))])
        self.dec = nn.ModuleList([_block(widths[i] * 2, widths[i]) for i in reversed(range(depth))])
        self.head = nn.Conv2d(widths[0], 1, 1)
        self.depth = depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for up, dec in zip(self.up, self.dec):
            x = up(x)
            x = dec(torch.cat([skips.pop(), x], dim=1))
        return self.head(x)


def _standardize(img: np.ndarray, size: int) -> np.ndarray:
    """Resize to ``size`` x ``size`` and standardise per image (robust to source brightness)."""
    small = cv2.resize(img.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    return (small - small.mean()) / (small.std() + 1e-6)


def postprocess(prob: np.ndarray, threshold: float = 0.5, keep: int = 2, min_share: float = 0.01) -> np.ndarray:
    """Threshold, keep the ``keep`` largest components (each >= ``min_share`` of the image), fill holes."""
    m = (prob >= threshold).astype(np.uint8)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    if n > 1:
        areas = stats[1:, cv2.CC_STAT_AREA]
        order = np.argsort(areas)[::-1][:keep] + 1
        m = np.isin(lab, [k for k in order if stats[k, cv2.CC_STAT_AREA] >= min_share * m.size]).astype(np.uint8)
    # fill holes: flood the background from the border, what stays unreached is a hole
    h, w = m.shape
    flood = np.pad(m, 1).copy()
    cv2.floodFill(flood, np.zeros((h + 4, w + 4), np.uint8), (0, 0), 1)
    holes = flood[1:-1, 1:-1] == 0
    return (m.astype(bool) | holes)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    denom = p.sum() + t.sum()
    return 1.0 if denom == 0 else float(2.0 * (p & t).sum() / denom)


# --------------------------------------------------------------------------- predictor


class LungSegmenter:
    """A trained U-Net with its input size; predicts boolean lung masks at each image's own size."""

    def __init__(self, model: UNet, size: int, path: str | None = None, meta: dict | None = None):
        self.model = model.eval()
        self.size = int(size)
        self.path = path
        self.meta = meta or {}

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LungSegmenter":
        p = Path(path)
        if not p.is_file():
            raise SegmenterError(f"{path}: segmentation checkpoint not found")
        try:
            b = torch.load(p, map_location="cpu", weights_only=False)
        except Exception as err:
            raise SegmenterError(f"{path}: cannot read segmentation checkpoint ({type(err).__name__}: {err})") from None
        if not isinstance(b, dict) or b.get("format") != FORMAT:
            raise SegmenterError(f"{path}: not a covidcxr lung-segmentation checkpoint (write one with "
                                 "`covidcxr segment train`)")
        model = UNet(**b.get("kwargs", {}))
        model.load_state_dict(b["state_dict"])
        return cls(model, b["size"], str(path), {k: v for k, v in b.items() if k != "state_dict"})

    @torch.no_grad()
    def probabilities(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Lung probability maps, each at its image's size."""
        if not len(images):
            return []
        x = torch.from_numpy(np.stack([_standardize(im, self.size) for im in images])[:, None])
        prob = torch.sigmoid(self.model(x))[:, 0].numpy()
        return [cv2.resize(p, (im.shape[1], im.shape[0]), interpolation=cv2.INTER_LINEAR)
                for p, im in zip(prob, images)]

    def predict(self, images: Sequence[np.ndarray], threshold: float = 0.5) -> list[np.ndarray]:
        return [postprocess(p, threshold) for p in self.probabilities(images)]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return self.predict([image])[0]


def dilate(mask: np.ndarray, share: float = 0.03) -> np.ndarray:
    """Dilate a boolean mask by ``share`` of its longer side (COVID-CXNet widens the lung box)."""
    r = max(1, int(round(share * max(mask.shape))))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    return cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)


def use_model(path: str | os.PathLike | None, dilation: float = 0.03) -> LungSegmenter | None:
    """Install the segmenter as ``covidcxr.preprocess.LUNG_SEGMENTER`` (``None`` uninstalls it).

    The hook returns the *dilated* mask, so ``cxnet-lungcrop`` crops to the dilated lung box.
    """
    from covidcxr import preprocess

    if path is None:
        preprocess.LUNG_SEGMENTER = None
        return None
    seg = LungSegmenter.load(path)

    def hook(image: np.ndarray) -> np.ndarray:
        return dilate(seg(image), dilation)

    hook.segmenter = seg  # type: ignore[attr-defined]
    preprocess.LUNG_SEGMENTER = hook
    return seg


# --------------------------------------------------------------------------- data


def _mask_rows(manifest: str | os.PathLike):
    from covidcxr.data import ManifestError, read_manifest

    df = read_manifest(manifest)
    if "mask_path" not in df.columns or df["mask_path"].isna().all():
        raise ManifestError(f"{manifest}: no rows with a mask_path; lung-segmentation training needs masks")
    return df[df["mask_path"].notna()].reset_index(drop=True)


def read_mask(path: str | os.PathLike, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A lung mask file (PNG 0/255) as bool, resized (nearest) to ``shape`` if given."""
    from covidcxr.io import read_image

    m = read_image(path) > 0.5
    if shape is not None and m.shape != tuple(shape):
        m = cv2.resize(m.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST).astype(bool)
    return m


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


def _load_pairs(df, idx: list[int], size: int) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """Standardised images and masks at ``size``, plus the originals (for Dice at full resolution)."""
    from covidcxr.io import read_image

    xs, ys, full = [], [], []
    for i in idx:
        img = read_image(df.at[i, "path"])
        m = read_mask(df.at[i, "mask_path"], img.shape)
        xs.append(_standardize(img, size))
        ys.append(cv2.resize(m.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA))
        full.append((img, m))
    return np.stack(xs)[:, None], np.stack(ys)[:, None], full


def _augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
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
    gain = 1 + (torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 0.4
    bias = (torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 0.4
    return x * gain + bias, y


def _loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits)
    inter = (p * y).sum((1, 2, 3))
    soft_dice = 1 - (2 * inter + 1) / (p.sum((1, 2, 3)) + y.sum((1, 2, 3)) + 1)
    return F.binary_cross_entropy_with_logits(logits, y) + soft_dice.mean()


def evaluate_dice(seg: LungSegmenter, pairs: list[tuple[np.ndarray, np.ndarray]], batch_size: int = 8) -> list[float]:
    """Dice of post-processed predictions against the masks, at each image's original size."""
    out: list[float] = []
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s : s + batch_size]
        preds = seg.predict([im for im, _ in chunk])
        out += [dice(p, m) for p, (_, m) in zip(preds, chunk)]
    return out


def _summary(d: list[float], patients: Sequence[str] | None = None, seed: int = 0) -> dict:
    """Mean/median/min Dice with a 95 % CI from 1000 bootstrap resamples of *patients* (images of one
    patient are resampled together), or of images when no patient ids are given."""
    if not d:
        return {"n": 0}
    a = np.asarray(d)
    ids = np.asarray(patients if patients is not None else np.arange(len(a)))
    groups = [np.nonzero(ids == u)[0] for u in np.unique(ids)]
    rng = np.random.default_rng(seed)
    boots = [a[np.concatenate([groups[i] for i in rng.integers(0, len(groups), len(groups))])].mean()
             for _ in range(1000)]
    return {"n": int(len(a)), "mean": float(a.mean()), "median": float(np.median(a)), "min": float(a.min()),
            "ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
            "ci_method": "bootstrap over patients" if patients is not None else "bootstrap over images"}


def train_segmenter(
    manifest: str | os.PathLike,
    out: str | os.PathLike,
    *,
    size: int = 256,
    epochs: int = 40,
    batch_size: int = 8,
    lr: float = 2e-3,
    base: int = 16,
    depth: int = 4,
    val_fraction: float = 0.2,
    max_steps: int | None = None,
    seed: int = 0,
    log_fn: Callable[[str], None] | None = None,
) -> dict:
    """Train the U-Net on the manifest's masks; keep the best-validation-Dice weights in ``out/segmenter.pt``.

    Returns the metrics written to ``out/metrics.json`` (Dice per split at original resolution,
    with a bootstrap 95% CI over images).
    """
    from covidcxr.models.checkpoint import atomic_torch_save

    say = log_fn or log.info
    if size % 2**depth:
        raise ValueError(f"--size {size} must be a multiple of {2**depth}")
    torch.manual_seed(seed)
    df = _mask_rows(manifest)
    groups = _split_rows(df, val_fraction, seed)
    if not groups["train"]:
        from covidcxr.data import ManifestError

        raise ManifestError(f"{manifest}: no training images with masks")
    xtr, ytr, _ = _load_pairs(df, groups["train"], size)
    val_pairs = _load_pairs(df, groups["val"], size)[2] if groups["val"] else []
    xtr_t, ytr_t = torch.from_numpy(xtr), torch.from_numpy(ytr)
    model = UNet(base=base, depth=depth)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = max(1, int(np.ceil(len(xtr) / batch_size)))
    total = min(epochs * steps_per_epoch, max_steps or 10**9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    kwargs = {"base": base, "depth": depth}
    best, best_state, history, step, t0 = -1.0, None, [], 0, time.time()
    while step < total:
        model.train()
        perm = torch.randperm(len(xtr_t), generator=gen)
        losses = []
        for s in range(0, len(perm), batch_size):
            if step >= total:
                break
            idx = perm[s : s + batch_size]
            x, y = _augment(xtr_t[idx], ytr_t[idx], gen)
            loss = _loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            step += 1
        model.eval()
        seg = LungSegmenter(model, size)
        vd = float(np.mean(evaluate_dice(seg, val_pairs, batch_size))) if val_pairs else float("nan")
        epoch = len(history) + 1
        history.append({"epoch": epoch, "step": step, "loss": float(np.mean(losses)), "val_dice": vd})
        say(f"segment epoch {epoch} step {step}/{total} loss {np.mean(losses):.4f} val Dice {vd:.4f} "
            f"({time.time() - t0:.0f}s)")
        score = vd if np.isfinite(vd) else -float(np.mean(losses))
        if score > best:
            best, best_state = score, {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    seg = LungSegmenter(model.eval(), size)
    metrics = {"split_source": "manifest split" if groups["test"] else f"seeded patient split (seed {seed})"}
    for name in ("train", "val", "test"):
        if groups[name]:
            pairs = val_pairs if name == "val" else _load_pairs(df, groups[name], size)[2]
            metrics[name] = _summary(evaluate_dice(seg, pairs, batch_size),
                                     df.loc[groups[name], "patient_id"].tolist(), seed)
            metrics[name]["patients"] = int(df.loc[groups[name], "patient_id"].nunique())
    bundle = {
        "format": FORMAT, "format_version": 1, "arch": "unet", "kwargs": kwargs, "size": size,
        "state_dict": model.state_dict(), "metrics": metrics, "history": history,
        "training": {"manifest": str(manifest), "epochs": epochs, "steps": step, "batch_size": batch_size,
                     "lr": lr, "seed": seed, "seconds": round(time.time() - t0, 1),
                     "patients": {k: sorted(df.loc[v, "patient_id"].unique().tolist()) for k, v in groups.items()}},
    }
    atomic_torch_save(bundle, outdir / "segmenter.pt")
    (outdir / "metrics.json").write_text(json.dumps({"metrics": metrics, "history": history,
                                                     "training": {k: v for k, v in bundle["training"].items()
                                                                  if k != "patients"}}, indent=2))
    return {"checkpoint": str(outdir / "segmenter.pt"), **metrics}


def predict_masks(images: Sequence[np.ndarray], model: str | os.PathLike | LungSegmenter,
                  batch_size: int = 8) -> list[np.ndarray]:
    """Boolean lung masks for [0,1] grayscale arrays (each at its own size)."""
    seg = model if isinstance(model, LungSegmenter) else LungSegmenter.load(model)
    out: list[np.ndarray] = []
    for s in range(0, len(images), batch_size):
        out += seg.predict(images[s : s + batch_size])
    return out


def predict_files(paths: Sequence[str], model: str | os.PathLike | LungSegmenter, out: str | os.PathLike, *,
                  batch_size: int = 8, overlay: bool = False,
                  on_error: Callable[[str, str], None] | None = None) -> tuple[list[str], list[tuple[str, str]]]:
    """Write ``<stem>_mask.png`` (0/255, image size) per readable image; return written files and failures."""
    from covidcxr.io import CXRReadError, read_image

    seg = model if isinstance(model, LungSegmenter) else LungSegmenter.load(model)
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    failures: list[tuple[str, str]] = []
    for s in range(0, len(paths), batch_size):
        imgs, names = [], []
        for p in paths[s : s + batch_size]:
            try:
                imgs.append(read_image(p))
                names.append(p)
            except CXRReadError as err:
                reason = str(err).removeprefix(f"{p}: ")
                failures.append((str(p), reason))
                if on_error:
                    on_error(str(p), reason)
        for p, img, m in zip(names, imgs, seg.predict(imgs)):
            dest = outdir / f"{Path(p).stem}_mask.png"
            cv2.imwrite(str(dest), (m * 255).astype(np.uint8))
            written.append(str(dest))
            if overlay:
                rgb = cv2.cvtColor((img * 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
                contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
                cv2.drawContours(rgb, contours, -1, (0, 255, 0), max(1, img.shape[0] // 256))
                cv2.imwrite(str(outdir / f"{Path(p).stem}_outline.png"), rgb)
    return written, failures


# Importing this module installs a configured default segmenter (see the module docstring).
if os.environ.get("COVIDCXR_LUNG_MODEL"):
    try:
        use_model(os.environ["COVIDCXR_LUNG_MODEL"])
    except SegmenterError as _err:  # keep import working; the preset then reports the missing segmenter
        log.warning("COVIDCXR_LUNG_MODEL: %s", _err)
