"""The input plausibility check (issue 11 §6): rules on drawn masks, and the catch rate on generated
non-CXR images with the pretrained lung U-Net (target >= 95 %), real films passing."""

from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest

from covidcxr.segment.plausibility import FRONTAL, NOT_FRONTAL, assess, check_many, check_plausibility


def _lungs(h: int = 400, w: int = 400, shift: int = 0, scale: float = 1.0) -> np.ndarray:
    """Two lung-like polygons: narrow apex at the top, wide base at the bottom, side by side."""
    m = np.zeros((h, w), np.uint8)
    for side in (-1, 1):
        cx = w // 2 + side * int(0.22 * w) + shift
        top, bottom = int(0.18 * h), int(0.18 * h + scale * 0.6 * h)
        pts = np.array([[cx, top], [cx + side * int(0.14 * w * scale), bottom],
                        [cx - side * int(0.09 * w * scale), bottom]], np.int32)
        cv2.fillPoly(m, [pts], 1)
    return m.astype(bool)


def test_rules_on_drawn_masks():
    img = np.random.default_rng(0).random((400, 400)).astype(np.float32)
    ok = assess(_lungs(), img)
    assert ok.plausible and ok.verdict == FRONTAL and ok.flag is None and ok.rule is None
    assert ok.measurements["components"] == 2 and 0.1 < ok.measurements["fraction"] < 0.5
    one = np.zeros((400, 400), np.uint8)
    cv2.ellipse(one, (200, 200), (140, 120), 0, 0, 360, 1, -1)  # one wide region, no mediastinum
    assert assess(one.astype(bool), img).rule == "two_lungs"
    # one aerated lung beside a whited-out one (a tall region in one half) is still a frontal film
    half = _lungs().copy()
    half[:, 200:] = False
    v = assess(half, img)
    assert v.plausible and v.measurements["one_lung"]
    edge = np.zeros((400, 400), bool)
    edge[:, :] = _lungs()
    edge[:6, :] = edge[-6:, :] = edge[:, :6] = edge[:, -6:] = True  # a frame around the image
    assert assess(edge, img).rule == "border"
    assert assess(np.rot90(_lungs()), img).rule == "side_by_side"
    assert assess(_lungs(scale=0.15), img).rule == "lung_fraction"
    assert assess(np.ones((400, 400), bool), img).rule == "lung_fraction"
    lop = np.zeros((400, 400), np.uint8)
    cv2.ellipse(lop, (120, 200), (70, 110), 0, 0, 360, 1, -1)
    lop = lop.astype(bool)
    lop[150:170, 300:320] = True  # a speck as "the other lung"
    assert assess(lop, img).rule == "balance"
    off = np.zeros((400, 400), bool)
    off[170:, :] = _lungs()[:230]  # lungs pushed down, their bases cut by the image's lower edge
    assert assess(off, img).rule == "position"
    v = assess(_lungs(), np.zeros((400, 400), np.float32))
    assert v.rule == "uniform" and v.verdict == NOT_FRONTAL and v.flag == NOT_FRONTAL
    d = assess(_lungs(), np.random.default_rng(1).random((70, 4000)).astype(np.float32)).to_dict()
    assert d["rule"] == "aspect" and d["plausible"] is False and "4000x70" in d["reason"]
    assert set(d) == {"plausible", "verdict", "flag", "reason", "rule", "measurements", "segmenter"}


def test_module_imports_without_torch():
    code = "import sys, covidcxr.segment.plausibility; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture(scope="module")
def real_films(weights_dir, shared_dir):
    """One real frontal film per shared source that is at hand."""
    from covidcxr.io import read_image

    files = [shared_dir / "samples" / "nih-00000001_000.png"]
    dev = shared_dir / "covid-cxr-dev" / "images"
    if dev.is_dir():
        names = sorted(p.name for p in dev.iterdir())
        files += [dev / next(n for n in names if n.startswith(s)) for s in ("cohen_", "actualmed_", "figure1_")
                  if any(n.startswith(s) for n in names)]
    return [read_image(f) for f in files if f.is_file()]


def test_generated_non_cxr_images_are_caught(real_films):
    """Blank, noise, gradients, photo-like textures, a strip, lateral-like crops, rotated films: >= 95 % caught."""
    from covidcxr.segment.negatives import generated_set

    gen = generated_set(real_films[:2], seeds=1)
    kinds = {k for k, _ in gen}
    assert {"black", "uniform_noise", "gradient_h", "photo", "strip", "lateral_like", "rot90", "rot180"} <= kinds
    verdicts = check_many([im for _, im in gen])
    missed = [(k, v.measurements.get("fraction")) for (k, _), v in zip(gen, verdicts) if v.plausible]
    caught = 1 - len(missed) / len(gen)
    assert caught >= 0.95, f"caught {caught:.2f}; missed {missed}"
    for v in verdicts:
        assert v.reason and v.segmenter and (v.rule or v.plausible)


def test_real_films_pass(real_films):
    verdicts = check_many(real_films)
    assert [v.reason for v in verdicts if not v.plausible] == []
    assert all(v.segmenter.startswith("lung-unet-vgg11@256") for v in verdicts)
    # the second call is answered from the mask cache
    again = check_plausibility(real_films[0])
    assert again.plausible and again.measurements["fraction"] == verdicts[0].measurements["fraction"]
