"""Generated images that are not frontal chest X-rays, to measure the plausibility check's catch rate.

Kinds: blank (black, white, grey), noise (uniform, Gaussian, salt-and-pepper), gradients (horizontal,
vertical, radial), photo-like textures (smooth 1/f noise with shapes), a strip (4000 x 70 style),
and, made from a real frontal film: a lateral-like crop (one lung side), and the film turned by
90, 180 and 270 degrees. All are H x W float32 in [0, 1], seeded.
"""

from __future__ import annotations

import cv2
import numpy as np


def _one_over_f(rng: np.random.Generator, h: int, w: int, beta: float = 2.0) -> np.ndarray:
    """Noise with a 1/f^beta power spectrum: the statistics of natural photographs."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0
    spec = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f ** (beta / 2)
    img = np.fft.irfft2(spec, s=(h, w))
    return ((img - img.min()) / (np.ptp(img) + 1e-9)).astype(np.float32)


def _photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    img = _one_over_f(rng, h, w)
    for _ in range(int(rng.integers(3, 8))):  # objects: filled ellipses and rectangles of random grey
        c = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        ax = (int(rng.integers(w // 20, w // 4)), int(rng.integers(h // 20, h // 4)))
        if rng.random() < 0.5:
            cv2.ellipse(img, c, ax, float(rng.uniform(0, 180)), 0, 360, float(rng.random()), -1)
        else:
            cv2.rectangle(img, c, (c[0] + ax[0], c[1] + ax[1]), float(rng.random()), -1)
    return np.clip(cv2.GaussianBlur(img, (0, 0), 1.5), 0, 1)


def synthetic(kind: str, seed: int = 0, size: tuple[int, int] = (512, 512)) -> np.ndarray:
    """One generated non-CXR image of ``kind`` (see :data:`SYNTHETIC_KINDS`)."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "black":
        return np.zeros(size, np.float32)
    if kind == "white":
        return np.ones(size, np.float32)
    if kind == "grey":
        return np.full(size, float(rng.uniform(0.2, 0.8)), np.float32)
    if kind == "uniform_noise":
        return rng.random(size, dtype=np.float32)
    if kind == "gaussian_noise":
        return np.clip(rng.normal(0.5, 0.2, size), 0, 1).astype(np.float32)
    if kind == "salt_pepper":
        return (rng.random(size) < 0.5).astype(np.float32)
    if kind == "gradient_h":
        return np.broadcast_to(xx / (w - 1), size).astype(np.float32)
    if kind == "gradient_v":
        return (yy / (h - 1)).astype(np.float32)
    if kind == "gradient_radial":
        r = np.hypot(yy - h * rng.uniform(0.3, 0.7), xx - w * rng.uniform(0.3, 0.7))
        return (1 - r / r.max()).astype(np.float32)
    if kind == "photo":
        return _photo(rng, h, w)
    if kind == "texture":
        return _one_over_f(rng, h, w, beta=float(rng.uniform(1.0, 3.0)))
    if kind == "strip":
        return rng.random((70, 4000), dtype=np.float32)
    raise ValueError(f"unknown synthetic kind {kind!r}; known: {', '.join(SYNTHETIC_KINDS)}")


SYNTHETIC_KINDS = ("black", "white", "grey", "uniform_noise", "gaussian_noise", "salt_pepper", "gradient_h",
                   "gradient_v", "gradient_radial", "photo", "texture", "strip")
FROM_CXR_KINDS = ("lateral_like", "rot90", "rot180", "rot270")


def from_cxr(image: np.ndarray, kind: str, seed: int = 0) -> np.ndarray:
    """A non-frontal image made from a real frontal film."""
    img = np.ascontiguousarray(image, dtype=np.float32)
    h, w = img.shape
    if kind == "lateral_like":  # one side of the chest, stretched back to the film's width
        rng = np.random.default_rng(seed)
        half = img[:, : w // 2] if rng.random() < 0.5 else img[:, w // 2 :]
        return cv2.resize(half, (w, h), interpolation=cv2.INTER_LINEAR)
    if kind in ("rot90", "rot180", "rot270"):
        return np.ascontiguousarray(np.rot90(img, {"rot90": 1, "rot180": 2, "rot270": 3}[kind]))
    raise ValueError(f"unknown kind {kind!r}; known: {', '.join(FROM_CXR_KINDS)}")


def generated_set(cxrs: list[np.ndarray] = (), seeds: int = 2) -> list[tuple[str, np.ndarray]]:
    """``(kind, image)`` pairs: every synthetic kind ``seeds`` times, every from-CXR kind per film."""
    out = [(k, synthetic(k, s)) for k in SYNTHETIC_KINDS for s in range(seeds)]
    out += [(k, from_cxr(c, k, i)) for i, c in enumerate(cxrs) for k in FROM_CXR_KINDS]
    return out
