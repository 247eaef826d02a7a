"""Map heatmaps between model and original image geometry, and draw overlays (matplotlib Agg)."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from covidcxr.preprocess import Preset


def crop_box(preset: Preset, shape: tuple[int, int], mask: np.ndarray | None = None) -> tuple[int, int, int, int]:
    """The region ``(y0, y1, x0, x1)`` of an ``shape`` image that ``preset.prepare`` resizes to the model input.

    Mirrors the geometry of :meth:`Preset.prepare`: lung crop, top crop, central square.
    """
    h, w = shape
    y0, y1, x0, x1 = 0, h, 0, w
    if preset.lung_crop and mask is not None:
        m = np.asarray(mask)
        if m.shape != (h, w):
            m = cv2.resize(m.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
        ys, xs = np.nonzero(m > 0)
        if len(ys) >= 16:  # same rule as preprocess.crop_to_mask
            dy, dx = int(preset.lung_margin * h), int(preset.lung_margin * w)
            y0, y1 = max(0, ys.min() - dy), min(h, ys.max() + 1 + dy)
            x0, x1 = max(0, xs.min() - dx), min(w, xs.max() + 1 + dx)
    if preset.crop_top > 0:
        y0 += int(round((y1 - y0) * preset.crop_top))
    if preset.center_square:
        ch, cw = y1 - y0, x1 - x0
        s = min(ch, cw)
        y0, x0 = y0 + (ch - s) // 2, x0 + (cw - s) // 2
        y1, x1 = y0 + s, x0 + s
    return int(y0), int(y1), int(x0), int(x1)


def to_original(heat: np.ndarray, preset: Preset, shape: tuple[int, int], mask: np.ndarray | None = None) -> np.ndarray:
    """Resize a model-size heatmap back onto the original image; regions the preset cropped away are 0."""
    y0, y1, x0, x1 = crop_box(preset, shape, mask)
    out = np.zeros(shape, np.float32)
    out[y0:y1, x0:x1] = cv2.resize(heat.astype(np.float32), (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
    return out


def to_model(image: np.ndarray, preset: Preset, mask: np.ndarray | None = None, nearest: bool = False) -> np.ndarray:
    """Apply the preset's geometry only (no CLAHE, no scaling) to an original-size array, e.g. a lung mask."""
    y0, y1, x0, x1 = crop_box(preset, image.shape[:2], mask)
    crop = np.ascontiguousarray(image[y0:y1, x0:x1]).astype(np.float32)
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA
    return cv2.resize(crop, (preset.size, preset.size), interpolation=interp)


def save_overlay(path: str | os.PathLike, image: np.ndarray, heat: np.ndarray, *, title: str, signed: bool,
                 colorbar_label: str = "relevance", contour: np.ndarray | None = None) -> None:
    """PNG of ``heat`` over the [0,1] grayscale ``image`` with a colour bar; ``contour`` outlines a mask."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 4.0), dpi=100)
    try:
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        if signed:
            lim = float(np.nanmax(np.abs(heat))) or 1.0
            im = ax.imshow(heat, cmap="bwr", vmin=-lim, vmax=lim, alpha=0.55)
        else:
            hi = float(np.nanmax(heat)) or 1.0
            im = ax.imshow(heat, cmap="jet", vmin=0, vmax=hi, alpha=0.45)
        if contour is not None and np.any(contour):
            ax.contour(contour.astype(float), levels=[0.5], colors="lime", linewidths=0.8)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
        cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        cb.set_label(colorbar_label, fontsize=7)
        cb.ax.tick_params(labelsize=6)
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
