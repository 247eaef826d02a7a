"""Map heatmaps between model and original image geometry, and draw overlays (matplotlib Agg)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

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


#: Overlays are drawn at the original image's resolution, upsampled to at least this long side ...
MIN_LONG_SIDE = 1024
#: ... and downsampled to at most this one (a 4000 px radiograph would make a 25 MB PNG).
MAX_LONG_SIDE = 2048


def heat_scale(heats: Sequence[np.ndarray], signed: bool) -> float:
    """One scale for several heatmaps of one method (``--heat-scale batch``): max, or max |value| if signed."""
    vals = [float(np.nanmax(np.abs(h) if signed else h)) for h in heats if np.size(h)]
    return max([v for v in vals if np.isfinite(v)] or [0.0])


def normalise(heat: np.ndarray, signed: bool, scale: float | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """The documented display scale: ``heat / scale``, clipped to [0, 1] (or [-1, 1] when ``signed``).

    ``scale`` defaults to this heatmap's own maximum (max |value| when signed), so 1 is the strongest
    evidence in this image; pass one shared value (see :func:`heat_scale`) to compare images. The raw
    range is returned so every overlay can state it.
    """
    h = np.nan_to_num(np.asarray(heat, dtype=np.float32))
    own = float(np.abs(h).max() if signed else h.max()) if h.size else 0.0
    scope = "image" if scale is None else "shared"
    s = float(scale) if scale is not None and scale > 0 else (own if own > 0 else 1.0)
    lo = -1.0 if signed else 0.0
    norm = np.clip(h / s, lo, 1.0)
    info = {"raw_min": float(h.min()) if h.size else 0.0, "raw_max": float(h.max()) if h.size else 0.0,
            "scale": s, "scope": scope, "signed": bool(signed)}
    return norm, info


def _display_size(shape: tuple[int, int]) -> tuple[int, int]:
    h, w = shape
    long = max(h, w)
    target = min(max(long, MIN_LONG_SIDE), max(MAX_LONG_SIDE, MIN_LONG_SIDE))
    f = target / float(long)
    return max(1, int(round(h * f))), max(1, int(round(w * f)))


def save_overlay(path: str | os.PathLike, image: np.ndarray, heat: np.ndarray, *, title: str, signed: bool,
                 colorbar_label: str = "relevance", contour: np.ndarray | None = None,
                 scale: float | None = None) -> dict[str, Any]:
    """PNG: the plain ``image`` and ``heat`` over it, side by side, with one colour bar; returns the scale used.

    Both panels are drawn pixel for pixel at the image's resolution (long side at least
    :data:`MIN_LONG_SIDE`, at most :data:`MAX_LONG_SIDE`). The colour bar shows the normalised scale
    of :func:`normalise` (0..1, or -1..1 for signed methods such as LRP and IG) and states the raw range.
    ``heat`` is resized to ``image``'s shape when they differ; ``contour`` outlines a mask.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3:  # C x H x W (a denormalised model input): show its first channel
        image = image[0] if image.shape[0] in (1, 3) else image[..., 0]
    dh, dw = _display_size(image.shape[:2])
    interp = cv2.INTER_AREA if dh < image.shape[0] else cv2.INTER_CUBIC
    shown = np.clip(cv2.resize(image, (dw, dh), interpolation=interp), 0, 1)
    norm, info = normalise(heat, signed, scale)
    norm = cv2.resize(norm.astype(np.float32), (dw, dh), interpolation=cv2.INTER_LINEAR)
    if signed:
        cmap, vmin = plt.get_cmap("bwr"), -1.0
        rgba = cmap((norm + 1) / 2)
        rgba[..., 3] = 0.65 * np.sqrt(np.abs(norm))
    else:
        cmap, vmin = plt.get_cmap("turbo"), 0.0
        rgba = cmap(norm)
        rgba[..., 3] = 0.6 * np.sqrt(np.clip(norm, 0, 1))  # weak evidence barely tints the image

    head, bar, gap = 64, 110, 8  # pixels: title band, colour bar column, gap between panels
    W, H = 2 * dw + gap + bar, dh + head
    fig = plt.figure(figsize=(W / 100, H / 100), dpi=100)
    try:
        axes = []
        for k in range(2):
            ax = fig.add_axes([(k * (dw + gap)) / W, 0, dw / W, dh / H])
            ax.imshow(shown, cmap="gray", vmin=0, vmax=1, interpolation="none")
            ax.axis("off")
            axes.append(ax)
        axes[1].imshow(rgba, interpolation="none")
        if contour is not None and np.any(contour):
            c = cv2.resize(np.asarray(contour, dtype=np.float32), (dw, dh), interpolation=cv2.INTER_NEAREST)
            axes[1].contour(c, levels=[0.5], colors="lime", linewidths=1.0)
        cax = fig.add_axes([(2 * dw + gap + 18) / W, 0.1 * dh / H, 22 / W, 0.8 * dh / H])
        sm = plt.cm.ScalarMappable(cmap=cmap, norm=matplotlib.colors.Normalize(vmin=vmin, vmax=1.0))
        cb = fig.colorbar(sm, cax=cax)
        scope = "this image's max" if info["scope"] == "image" else "shared scale"
        cb.set_label(f"{colorbar_label}, / {info['scale']:.3g} ({scope})", fontsize=9)
        cb.ax.tick_params(labelsize=8)
        raw = f"raw range {info['raw_min']:.3g} .. {info['raw_max']:.3g}"
        fig.text(0.005, 1 - 6 / H, f"{title}\n{raw}; 1 = {info['scale']:.3g} ({scope})", va="top", ha="left",
                 fontsize=10)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return info
