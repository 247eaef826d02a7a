"""Mask post-processing, measurements, Dice and overlays (NumPy + OpenCV only, no torch)."""

from __future__ import annotations

import os

import cv2
import numpy as np


def postprocess(prob: np.ndarray, threshold: float = 0.5, keep: int = 2, min_share: float = 0.01) -> np.ndarray:
    """Threshold, keep the ``keep`` largest components (each >= ``min_share`` of the image), fill holes.

    Two components because a frontal chest film shows two lungs; holes are filled because a
    radiologist's lung outline includes opacities inside it (the network may leave them out).
    """
    m = (np.asarray(prob) >= threshold).astype(np.uint8)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    if n > 1:
        areas = stats[1:, cv2.CC_STAT_AREA]
        order = np.argsort(areas)[::-1][:keep] + 1
        m = np.isin(lab, [k for k in order if stats[k, cv2.CC_STAT_AREA] >= min_share * m.size]).astype(np.uint8)
    return fill_holes(m)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Flood the background from the border; what stays unreached is a hole and joins the mask."""
    m = np.asarray(mask).astype(np.uint8)
    h, w = m.shape
    flood = np.pad(m, 1).copy()
    cv2.floodFill(flood, np.zeros((h + 4, w + 4), np.uint8), (0, 0), 1)
    holes = flood[1:-1, 1:-1] == 0
    return m.astype(bool) | holes


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    denom = p.sum() + t.sum()
    return 1.0 if denom == 0 else float(2.0 * (p & t).sum() / denom)


def dilate(mask: np.ndarray, share: float = 0.03) -> np.ndarray:
    """Dilate a boolean mask by ``share`` of its longer side (COVID-CXNet widens the lung box)."""
    r = max(1, int(round(share * max(mask.shape))))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    return cv2.dilate(np.asarray(mask).astype(np.uint8), kernel).astype(bool)


def read_mask(path: str | os.PathLike, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A lung mask file (PNG 0/255) as bool, resized (nearest) to ``shape`` if given."""
    from covidcxr.io import read_image

    m = read_image(path) > 0.5
    if shape is not None and m.shape != tuple(shape):
        m = cv2.resize(m.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST).astype(bool)
    return m


def measure(mask: np.ndarray) -> dict:
    """Geometry of a lung mask, in shares of the image so that sizes compare across resolutions.

    ``fraction``: lung share of the image; ``components``: connected parts; ``left``/``right``:
    the two largest parts ordered by x (image left = patient's right on a PA film);
    ``balance``: smaller / larger area of the two; ``cx``/``cy``: centroid of all lung pixels;
    ``bbox``: [y0, y1, x0, x1] in shares; ``side_by_side``: the two parts lie left and right of
    each other (|dx| > |dy| between their centroids); ``apex_base_ratio``: lung width (pixels per
    row) 15 % below the top of the lung box over that 20 % above its bottom (apices are narrow).
    """
    m = np.asarray(mask).astype(np.uint8)
    h, w = m.shape
    out: dict = {"height": int(h), "width": int(w), "aspect": float(h / w) if w else float("nan"),
                 "fraction": float(m.mean()) if m.size else 0.0}
    n, _, stats, cents = cv2.connectedComponentsWithStats(m, connectivity=8)
    comps = sorted(range(1, n), key=lambda k: -stats[k, cv2.CC_STAT_AREA])
    out["components"] = len(comps)
    if not comps:
        return {**out, "balance": 0.0, "cx": float("nan"), "cy": float("nan"), "bbox": None,
                "side_by_side": False, "apex_base_ratio": float("nan"), "left_fraction": 0.0, "right_fraction": 0.0}
    ys, xs = np.nonzero(m)
    out["cx"], out["cy"] = float(xs.mean() / w), float(ys.mean() / h)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    out["bbox"] = [y0 / h, y1 / h, x0 / w, x1 / w]
    # apices are narrow, bases wide: lung width 15 % below the top of the lung box against 20 % above its bottom
    rows = m[y0:y1].sum(1).astype(float)
    top, bottom = rows[int(0.15 * (y1 - y0))], rows[min(len(rows) - 1, int(0.80 * (y1 - y0)))]
    out["apex_base_ratio"] = float(top / bottom) if bottom > 0 else float("inf")
    two = comps[:2]
    a = [float(stats[k, cv2.CC_STAT_AREA]) / (h * w) for k in two]
    if len(two) == 2:
        (xa, ya), (xb, yb) = cents[two[0]], cents[two[1]]
        out["side_by_side"] = bool(abs(xa - xb) / w > abs(ya - yb) / h)
        left, right = (0, 1) if xa <= xb else (1, 0)
        out["left_fraction"], out["right_fraction"] = a[left], a[right]
        out["balance"] = float(min(a) / max(a))
    else:
        on_left = cents[two[0]][0] / w < 0.5
        out["side_by_side"] = False
        out["left_fraction"], out["right_fraction"] = (a[0], 0.0) if on_left else (0.0, a[0])
        out["balance"] = 0.0
    return out


def overlay(image: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = (0, 255, 0),
            alpha: float = 0.25) -> np.ndarray:
    """BGR uint8: the grey image with the mask tinted and outlined (for a human to check)."""
    g = np.clip(np.asarray(image, np.float32) * 255 + 0.5, 0, 255).astype(np.uint8)
    rgb = cv2.cvtColor(g, cv2.COLOR_GRAY2BGR)
    m = np.asarray(mask).astype(bool)
    if m.shape != g.shape:
        m = cv2.resize(m.astype(np.uint8), (g.shape[1], g.shape[0]), interpolation=cv2.INTER_NEAREST).astype(bool)
    tint = rgb.copy()
    tint[m] = color
    rgb = cv2.addWeighted(rgb, 1 - alpha, tint, alpha, 0)
    contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(rgb, contours, -1, color, max(1, max(g.shape) // 256))
    return rgb
