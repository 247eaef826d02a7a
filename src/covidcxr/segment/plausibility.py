"""Is this a frontal chest X-ray? A check on the lungs that a segmenter finds in it.

A frontal (PA/AP) chest film shows two lungs, side by side, of similar size, near the middle of the
image, covering a plausible share of it, wider at the bases than at the apices; the film itself has
a chest-like aspect, is not uniform, is brighter at the bottom (abdomen, diaphragm) than at the top
(neck), and is more nearly mirror-symmetric left-right than top-bottom. A blank picture, noise, a
gradient, a photograph, a lateral view, a strip, or a film upside down or on its side breaks at
least one of these. A film whose intensity pattern is clearly that of an upright frontal film
passes even when the lung mask's shape is odd (a whited-out or merged lung: severe disease is what
the classifier must still read).

    >>> from covidcxr.segment.plausibility import check_plausibility
    >>> v = check_plausibility(image)          # image: H x W float in [0, 1]
    >>> v.plausible, v.verdict, v.reason       # (False, 'not_a_frontal_cxr', 'lungs cover 0.4% ...')
    >>> v.to_dict()                            # JSON-ready, with measurements and the segmenter id

The rules run on the mask alone (:func:`assess`), so a caller that already has a mask pays
nothing more; :func:`check_plausibility` segments first (pretrained ``lung-unet-vgg11`` at
:data:`SIZE` px, masks cached by image hash in the segmenter that :func:`check_segmenter` returns: keep it
and pass it in to check many images with one load). The thresholds (:data:`LIMITS`) and the measured
false-flag and catch rates are in ``docs/explain.md``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import cv2
import numpy as np

from covidcxr.segment.masks import measure

FRONTAL = "frontal_cxr"
NOT_FRONTAL = "not_a_frontal_cxr"

#: input size of the segmenter used by the check: 256 px costs a fifth of 512 and keeps the geometry
SIZE = 256

#: rule thresholds (shares of the image unless said otherwise)
LIMITS: dict[str, Any] = {
    "aspect": (1 / 2.5, 2.5),  # height / width of the image
    "min_std": 0.02,  # intensity standard deviation of a non-uniform picture ([0, 1] scale)
    "fraction": (0.04, 0.70),  # share of the image covered by lung
    "gap": 0.85,  # lung columns at the mediastinum / at the smaller lung's widest (1: no gap)
    "one_lung_width": 0.6,  # a single lung region at most this wide (and as tall as wide) may stand alone
    "border": 0.35,  # share of the image's edge (2 % frame) inside the mask
    "balance": 0.05,  # smaller lung area / larger lung area (a whited-out lung leaves little of one side)
    "cx": (0.2, 0.8),  # centroid of the lung pixels, x
    "cy": (0.15, 0.80),  # centroid of the lung pixels, y
    "apex_base_ratio": 5.0,  # lung width near the top / near the bottom of the lung box (real films reach 4)
    # intensity cues (z-scores of the film at 256 x 256; see intensity_signature), set on the 1280 real images of
    # the shared data and 120 turned copies of 60 of them (docs/explain.md):
    "upside_down": (-0.15, 0.3),  # bottom band - top band below this, and band below the lungs - band above them
    # not above this: the bright abdomen and diaphragm sit above the lungs, the dark neck below them
    "on_its_side": 1.6,  # (top-bottom - left-right mirror symmetry) + (horizontal - vertical bright midline)
    "frontal_signature": (0.3, 0.3, 0.5),  # left-right symmetry minus top-bottom, midline brightness, bottom - top:
    # all at least these: the film's own pattern is that of an upright frontal film, so an odd lung mask (a
    # whited-out lung, both lungs merged) fails none of the shape rules side_by_side|two_lungs|balance|orientation
}


@dataclass
class Plausibility:
    """Verdict of the check. ``rule`` names the first failed rule (None when plausible)."""

    plausible: bool
    verdict: str
    reason: str
    rule: str | None
    measurements: dict = field(default_factory=dict)
    segmenter: str | None = None

    @property
    def flag(self) -> str | None:
        """``not_a_frontal_cxr`` when implausible, else None (the field prediction records carry)."""
        return None if self.plausible else NOT_FRONTAL

    def to_dict(self) -> dict:
        """``{"plausible", "verdict", "flag", "reason", "rule", "measurements", "segmenter"}``."""
        return {**asdict(self), "flag": self.flag}


def _fail(rule: str, reason: str, m: dict, seg: str | None) -> Plausibility:
    return Plausibility(False, NOT_FRONTAL, reason, rule, m, seg)


def image_stats(image: np.ndarray) -> dict:
    a = np.asarray(image, np.float32)
    h, w = a.shape[:2]
    return {"height": int(h), "width": int(w), "aspect": float(h / w) if w else float("inf"),
            "intensity_std": float(a.std()) if a.size else 0.0}


def precheck(image: np.ndarray) -> Plausibility | None:
    """The rules that need no mask (aspect, uniform image); ``None`` when they pass."""
    s = image_stats(image)
    lo, hi = LIMITS["aspect"]
    if not lo <= s["aspect"] <= hi:
        return _fail("aspect", f"image is {s['width']}x{s['height']} px (height/width {s['aspect']:.2f}); a chest "
                     f"film's lies between {lo:.2f} and {hi:.2f}", s, None)
    if s["intensity_std"] < LIMITS["min_std"]:
        return _fail("uniform", f"image is nearly uniform (intensity std {s['intensity_std']:.3f} < "
                     f"{LIMITS['min_std']})", s, None)
    return None


def _z(a: np.ndarray, side: int) -> np.ndarray:
    small = cv2.resize(np.asarray(a, np.float32), (side, side), interpolation=cv2.INTER_AREA)
    return (small - small.mean()) / (small.std() + 1e-6)


def _corr(u: np.ndarray, v: np.ndarray) -> float:
    return float(np.corrcoef(u.ravel(), v.ravel())[0, 1]) if u.std() > 1e-6 and v.std() > 1e-6 else 0.0


def intensity_signature(image: np.ndarray, mask: np.ndarray | None = None) -> dict:
    """Where the film is bright, which tells up from down and a film turned on its side.

    On the film squashed to 256 x 256 and standardised (z-scores): ``bottom_minus_top``: mean of the
    bottom 15 % of rows minus the top 15 % (abdomen and diaphragm below, neck and air above:
    positive on upright films); ``below_minus_above``: the band (10 % of the height) below the lung
    box minus the band above it, over the lung box's columns (NaN without a mask or room for a band);
    at 64 x 64, lightly blurred: ``symmetry_lr`` / ``symmetry_tb``: correlation of the film with its
    left-right / top-bottom mirror image; ``midline_v`` / ``midline_h``: brightness of the central
    vertical / horizontal band (spine, mediastinum) over the bands either side of it.
    """
    z = _z(image, 256)
    q = int(0.15 * 256)
    out = {"bottom_minus_top": float(z[-q:].mean() - z[:q].mean()), "below_minus_above": float("nan")}
    if mask is not None and np.any(mask):
        m = cv2.resize(np.asarray(mask, np.uint8), (256, 256), interpolation=cv2.INTER_NEAREST)
        ys, xs = np.nonzero(m)
        if len(ys):
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            band = int(0.1 * 256)
            above, below = z[max(0, y0 - band) : y0, x0:x1], z[y1 : y1 + band, x0:x1]
            if above.size and below.size:
                out["below_minus_above"] = float(below.mean() - above.mean())
    s = cv2.GaussianBlur(cv2.resize(z, (64, 64), interpolation=cv2.INTER_AREA), (0, 0), 1.0)
    s = (s - s.mean()) / (s.std() + 1e-6)
    out["symmetry_lr"], out["symmetry_tb"] = _corr(s, s[:, ::-1]), _corr(s, s[::-1])
    mid, mid_t = s[16:48], s[:, 16:48]
    out["midline_v"] = float(mid[:, 29:35].mean() - 0.5 * (mid[:, 13:22].mean() + mid[:, 42:51].mean()))
    out["midline_h"] = float(mid_t[29:35].mean() - 0.5 * (mid_t[13:22].mean() + mid_t[42:51].mean()))
    out["on_its_side"] = (out["symmetry_tb"] - out["symmetry_lr"]) + (out["midline_h"] - out["midline_v"])
    lr, mv, bt = LIMITS["frontal_signature"]
    out["frontal_signature"] = bool(out["symmetry_lr"] - out["symmetry_tb"] >= lr and out["midline_v"] >= mv
                                    and out["bottom_minus_top"] >= bt)
    return out


def assess(mask: np.ndarray, image: np.ndarray | None = None, segmenter: str | None = None) -> Plausibility:
    """Apply the rules to a lung mask (and the image's aspect/intensity when given)."""
    stats = image_stats(image) if image is not None else {}
    if image is not None:
        pre = precheck(image)
        if pre is not None:
            pre.segmenter = segmenter
            return pre
    m = {**stats, **measure(mask)}
    f_lo, f_hi = LIMITS["fraction"]
    if m["fraction"] < f_lo:
        return _fail("lung_fraction", f"lungs cover {100 * m['fraction']:.1f}% of the image (expected "
                     f"{100 * f_lo:.0f}-{100 * f_hi:.0f}%)", m, segmenter)
    if m["fraction"] > f_hi:
        return _fail("lung_fraction", f"lung-like region covers {100 * m['fraction']:.0f}% of the image (expected "
                     f"{100 * f_lo:.0f}-{100 * f_hi:.0f}%)", m, segmenter)
    if m["border"] > LIMITS["border"]:
        return _fail("border", f"{100 * m['border']:.0f}% of the image's edge lies inside the lung-like region "
                     f"(lungs sit inside the thorax; at most {100 * LIMITS['border']:.0f}%)", m, segmenter)
    if image is not None:  # up from down and upright from on-its-side, by where the film is bright
        m.update(intensity_signature(image, mask))
        bt, ba = LIMITS["upside_down"]
        if m["bottom_minus_top"] < bt and not m["below_minus_above"] >= ba:
            return _fail("upside_down", "the film is darker at the bottom than at the top, and below the lungs than "
                         "above them (abdomen and diaphragm belong below the lungs): film upside down or turned?", m, segmenter)
        if m["on_its_side"] > LIMITS["on_its_side"]:
            return _fail("on_its_side", "the film is more symmetric top-to-bottom than left-to-right, with a "
                         "horizontal bright midline: film turned on its side?", m, segmenter)
    shape_fail = _shape_rules(m)
    if shape_fail is not None:
        if not m.get("frontal_signature"):
            return _fail(*shape_fail, m, segmenter)
        m["shape_rule_waived"] = shape_fail[0]
    (x_lo, x_hi), (y_lo, y_hi) = LIMITS["cx"], LIMITS["cy"]
    if not (x_lo <= m["cx"] <= x_hi and y_lo <= m["cy"] <= y_hi):
        return _fail("position", f"lungs centred at ({m['cx']:.2f}, {m['cy']:.2f}) of the width/height, expected "
                     f"x {x_lo}-{x_hi}, y {y_lo}-{y_hi}", m, segmenter)
    if shape_fail is not None:
        return Plausibility(True, FRONTAL, f"an upright frontal film by its intensity pattern (mirror-symmetric, "
                            f"bright midline, brighter below); the lung mask's shape is unusual ({shape_fail[0]}: "
                            f"a whited-out or merged lung?)", None, m, segmenter)
    return Plausibility(True, FRONTAL, "two lungs of plausible size and place", None, m, segmenter)


def _shape_rules(m: dict) -> tuple[str, str] | None:
    """The first failed rule on the lung mask's shape, as (rule, reason); None when all pass."""
    y0, y1, x0, x1 = m["bbox"]
    # one aerated lung beside a whited-out one (effusion, collapse) is still a frontal film: a single
    # tall region in one half of the image passes the two-lung rules
    one_sided = (x1 - x0) <= LIMITS["one_lung_width"] and (y1 - y0) >= (x1 - x0)
    m["one_lung"] = bool(m["gap_x"] > LIMITS["gap"] and one_sided)
    if m["gap_y"] <= LIMITS["gap"] and m["gap_y"] < m["gap_x"]:
        return "side_by_side", "the lung-like regions lie above each other, not side by side (film turned on its side?)"
    if m["gap_x"] > LIMITS["gap"] and not one_sided:
        return "two_lungs", "one lung-like region without a gap for the mediastinum; a frontal film shows two lungs"
    if m["balance"] < LIMITS["balance"] and not m["one_lung"]:
        return "balance", (f"the smaller lung is {100 * m['balance']:.0f}% of the larger (expected at least "
                           f"{100 * LIMITS['balance']:.0f}%)")
    if m["apex_base_ratio"] > LIMITS["apex_base_ratio"]:
        return "orientation", (f"lungs are {m['apex_base_ratio']:.1f}x as wide near the top as near the bottom "
                               "(film upside down?)")
    return None


def check_segmenter(segmenter: Any = None, backend: str = "auto", torch_free: bool = False) -> Any:
    """The segmenter the check runs, behind a mask cache (a :class:`~covidcxr.segment.maskcache.CachedSegmenter`).

    ``segmenter``: a CachedSegmenter (returned as it is), a LungSegmenter, a name or path (loaded), or ``None``:
    the pretrained ``lung-unet-vgg11`` at :data:`SIZE` px. A name or ``None`` loads the weights on every call:
    whoever checks many images keeps the result and passes it back in (the plausibility gate holds its own).
    """
    from covidcxr.segment.loading import PRETRAINED, load_segmenter
    from covidcxr.segment.maskcache import CachedSegmenter

    if isinstance(segmenter, CachedSegmenter):
        return segmenter
    if segmenter is None or isinstance(segmenter, (str, os.PathLike)):
        segmenter = load_segmenter(segmenter or PRETRAINED, size=SIZE if segmenter in (None, PRETRAINED) else None,
                                   backend=backend, torch_free=torch_free)
    return CachedSegmenter(segmenter)


def check_plausibility(image: np.ndarray, segmenter: Any = None, mask: np.ndarray | None = None,
                       backend: str = "auto", torch_free: bool = False) -> Plausibility:
    """Verdict for one H x W [0,1] image. ``segmenter``: a name/path, a LungSegmenter, a
    CachedSegmenter, or ``None`` (pretrained ``lung-unet-vgg11`` at :data:`SIZE` px); see :func:`check_segmenter`
    (a name or ``None`` loads the U-Net on every call).
    ``mask``: skip segmenting and judge this mask. ``backend``: "auto" runs onnxruntime when it is
    installed (20-30 % less CPU than torch, benchmarks/segment_speed.py), torch-free once the export
    exists (:func:`covidcxr.segment.loading.export_onnx`). ``torch_free=True``: never import torch
    (an image that needs the U-Net raises :class:`~covidcxr.segment.loading.NoTorchFreeSegmenter`
    when its export is missing)."""
    return check_many([image], segmenter, [mask] if mask is not None else None, backend=backend,
                      torch_free=torch_free)[0]


def check_many(images: Sequence[np.ndarray], segmenter: Any = None, masks: Sequence[np.ndarray] | None = None,
               batch_size: int = 4, backend: str = "auto", torch_free: bool = False) -> list[Plausibility]:
    """:func:`check_plausibility` for several images; images failing the mask-free rules are not segmented."""
    out: list[Plausibility | None] = [precheck(np.asarray(im)) for im in images]
    if masks is not None:
        return [o or assess(mk, im) for o, im, mk in zip(out, images, masks)]
    todo = [i for i, o in enumerate(out) if o is None]
    if todo:
        seg = check_segmenter(segmenter, backend, torch_free)
        found = seg.segment_many([images[i] for i in todo], batch_size=batch_size)
        for i, mk in zip(todo, found):
            out[i] = assess(mk, images[i], seg.id)
    for o in out:
        if o is not None and o.segmenter is None and o.rule in ("aspect", "uniform"):
            o.segmenter = "not run (rejected before segmentation)"
    return out  # type: ignore[return-value]
