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

    ``fraction``: lung share of the image; ``components``: connected parts; ``split_x``: the
    deepest point of the column profile between the lungs (the mediastinum); ``gap_x``/``gap_y``:
    depth of the column/row profile's central valley (0 empty, 1 none); ``left_fraction`` /
    ``right_fraction``: lung left and right of ``split_x`` (image left = patient's right on a PA
    film); ``balance``: smaller / larger of the two; ``cx``/``cy``: centroid of all lung pixels;
    ``bbox``: [y0, y1, x0, x1] in shares; ``border``: share of a 2 % frame along the image's
    edge covered by the mask; ``side_by_side``: the column valley is deeper than the
    row valley (lungs left and right of each other); ``apex_base_ratio``: lung width (pixels per
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
        return {**out, "balance": 0.0, "border": 0.0, "cx": float("nan"), "cy": float("nan"), "bbox": None, "split_x": float("nan"),
                "gap_x": 1.0, "gap_y": 1.0, "side_by_side": False, "apex_base_ratio": float("nan"),
                "left_fraction": 0.0, "right_fraction": 0.0}
    ys, xs = np.nonzero(m)
    out["cx"], out["cy"] = float(xs.mean() / w), float(ys.mean() / h)
    # lungs sit inside the thorax: a mask running along the image's edge is rarely a lung
    b = max(1, int(0.02 * min(h, w)))
    frame = np.concatenate([m[:b].ravel(), m[-b:].ravel(), m[:, :b].ravel(), m[:, -b:].ravel()])
    out["border"] = float(frame.mean())
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    out["bbox"] = [y0 / h, y1 / h, x0 / w, x1 / w]
    # apices are narrow, bases wide: lung width 15 % below the top of the lung box against 20 % above its bottom
    rows = m[y0:y1].sum(1).astype(float)
    top, bottom = rows[int(0.15 * (y1 - y0))], rows[min(len(rows) - 1, int(0.80 * (y1 - y0)))]
    out["apex_base_ratio"] = float(top / bottom) if bottom > 0 else float("inf")
    # Two lungs side by side leave a valley in the column profile (the mediastinum) and none in the
    # row profile; a film on its side swaps the two. Profiles, not connected components, so that a
    # mask whose lungs touch (below the heart, at a coarse size) still counts as two lungs.
    colp, rowp = _smooth(m.sum(0), w), _smooth(m.sum(1), h)
    sx, gap_x = _valley(colp, x0, x1)
    sy, gap_y = _valley(rowp, y0, y1)
    out["split_x"], out["gap_x"], out["gap_y"] = sx / w, gap_x, gap_y
    out["side_by_side"] = bool(gap_x < gap_y)
    left, right = float(m[:, :sx].sum()) / (h * w), float(m[:, sx:].sum()) / (h * w)
    out["left_fraction"], out["right_fraction"] = left, right
    out["balance"] = float(min(left, right) / max(left, right)) if max(left, right) > 0 else 0.0
    return out


def _smooth(profile: np.ndarray, n: int) -> np.ndarray:
    k = max(1, n // 50)
    return np.convolve(profile.astype(float), np.ones(k) / k, mode="same")


def _valley(profile: np.ndarray, lo: int, hi: int) -> tuple[int, float]:
    """Deepest point of ``profile`` in the middle half of [lo, hi) and its depth relative to the
    smaller of the two peaks either side (0: an empty gap, 1: no valley at all)."""
    a, b = lo + (hi - lo) // 4, lo + 3 * (hi - lo) // 4
    if b <= a:
        return (lo + hi) // 2, 1.0
    i = a + int(np.argmin(profile[a:b]))
    peak = min(profile[lo : i + 1].max(), profile[i:hi].max())
    return i, float(profile[i] / peak) if peak > 0 else 1.0


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
