"""covidcxr.preprocess: presets do what their papers say, serialise, and augmentation is seeded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from covidcxr.preprocess import (
    AUGMENT_RECIPES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Augment,
    Preset,
    PresetError,
    crop_to_mask,
    get_preset,
)


def _image(h: int = 300, w: int = 240) -> np.ndarray:
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None]
    return np.repeat(y, w, axis=1)  # brightness = row position


def test_covidnet_crop_top_and_square():
    p = get_preset("covidnet")
    assert (p.size, p.channels, p.crop_top, p.center_square) == (480, 3, 0.08, True)
    img = _image(300, 240)
    out = p.prepare(img)
    assert out.shape == (480, 480)
    # top 8% (24 rows) removed, then a central 240-row square of the remaining 276: first row kept ~ row 42
    first_row = 24 + (276 - 240) // 2
    assert out[0].mean() == pytest.approx(img[first_row].mean(), abs=0.01)
    t = p.finalize(out)
    assert t.shape == (3, 480, 480) and 0.0 <= float(t.min()) and float(t.max()) <= 1.0


@pytest.mark.parametrize("name", ["deepcovid", "chexnet"])
def test_imagenet_presets(name):
    p = get_preset(name)
    t = p(np.full((256, 256), 0.5, np.float32))
    assert t.shape == (3, 224, 224)
    expect = [(0.5 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    np.testing.assert_allclose(t.mean((1, 2)).numpy(), expect, atol=1e-5)


def test_cxnet_clahe_changes_contrast():
    p = get_preset("cxnet")
    assert (p.size, p.clahe_clip, p.clahe_tiles) == (320, 2.0, 8)
    rng = np.random.default_rng(0)
    img = (0.4 + 0.05 * rng.random((400, 400))).astype(np.float32)  # low contrast
    out = p.prepare(img)
    assert out.shape == (320, 320)
    assert out.std() > img.std() * 1.5


def test_xrv_range_and_single_channel():
    p = get_preset("xrv")
    img = np.zeros((300, 300), np.float32)
    img[150:] = 1.0
    t = p(img)
    assert t.shape == (1, 224, 224)
    assert float(t.min()) == pytest.approx(-1024) and float(t.max()) == pytest.approx(1024)


def test_roundtrip_and_fingerprint():
    for name in ("covidnet", "deepcovid", "chexnet", "cxnet", "xrv"):
        p = get_preset(name)
        q = Preset.from_dict(p.to_dict())
        assert q == p and q.fingerprint() == p.fingerprint()
    assert get_preset("covidnet@224").fingerprint() != get_preset("covidnet").fingerprint()
    assert get_preset("covidnet@224").size == 224


def test_unknown_or_missing_preset_refused():
    with pytest.raises(PresetError, match="unknown"):
        get_preset("nope")
    with pytest.raises(PresetError, match="no preprocessing preset"):
        Preset.from_dict(None)
    with pytest.raises(PresetError, match="unknown fields"):
        Preset.from_dict({**get_preset("covidnet").to_dict(), "bogus": 1})


def test_denormalize_inverts_finalize():
    p = get_preset("deepcovid")
    img = p.prepare(_image())
    np.testing.assert_allclose(p.denormalize(p.finalize(img)), img, atol=1e-5)


def test_lung_crop_needs_mask_or_model():
    p = get_preset("cxnet-lungcrop")
    mask = np.zeros((300, 240), bool)
    mask[100:200, 50:150] = True
    out = p.prepare(_image(), mask)
    assert out.shape == (320, 320)
    cropped = crop_to_mask(_image(), mask, margin=0.0)
    assert cropped.shape == (100, 100)


def test_augment_seeded_and_epoch_dependent():
    aug = AUGMENT_RECIPES["covidnet"]
    assert isinstance(aug, Augment) and aug.rotation == 10.0 and aug.zoom == (0.85, 1.15)
    img = get_preset("covidnet@224").prepare(_image())
    a = aug(img, index=3, epoch=0)
    b = aug(img, index=3, epoch=0)
    c = aug(img, index=3, epoch=1)
    assert a.shape == (1, 224, 224)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    # the global RNG is untouched
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    aug(img, index=0)
    assert torch.equal(torch.rand(1), before)


def test_augment_params_within_recipe_and_geometry():
    aug = Augment(rotation=10, translate=0.1, zoom=(0.85, 1.15), brightness=(0.9, 1.1), seed=3)
    ps = [aug.params(i, 0, (200, 100)) for i in range(200)]
    assert all(-10 <= p["angle"] <= 10 and 0.85 <= p["scale"] <= 1.15 and 0.9 <= p["brightness"] <= 1.1 for p in ps)
    assert all(abs(p["tx"]) <= 10 and abs(p["ty"]) <= 20 for p in ps)
    assert 60 < sum(p["flip"] for p in ps) < 140
    # with geometry and brightness switched off, the flip is the only change
    flip_only = Augment(rotation=0, translate=0, zoom=(1, 1), brightness=(1, 1), seed=0)
    img = _image(64, 64) * np.linspace(0.2, 1, 64, dtype=np.float32)[None, :]
    for i in range(6):
        out = flip_only(img, index=i)[0].numpy()
        expect = img[:, ::-1] if flip_only.params(i, 0, img.shape)["flip"] else img
        np.testing.assert_allclose(out, expect, atol=1e-5)


def test_augment_matrix_matches_opencv_for_isotropic_draws():
    """The composed matrix is cv2.getRotationMatrix2D (+ shift) when zoom is isotropic and nothing else is on."""
    import cv2

    aug = AUGMENT_RECIPES["light"]
    assert (aug.zoom_xy, aug.ratio_resize, aug.vflip, aug.crop_scale) == (False, (0.0, 0.0), False, ())
    for i in range(5):
        p = aug.params(i, 0, (120, 90))
        m = cv2.getRotationMatrix2D(((90 - 1) / 2.0, (120 - 1) / 2.0), p["angle"], p["scale"])
        m[0, 2] += p["tx"]
        m[1, 2] += p["ty"]
        np.testing.assert_allclose(aug.matrix(p, (120, 90)), m, atol=1e-9)


def test_augment_vflip_and_keras_zoom():
    img = _image(64, 64)
    v = Augment(rotation=0, translate=0, zoom=(1, 1), hflip=False, brightness=(1, 1), vflip=True)
    flips = [v.params(i, 0, (64, 64))["vflip"] for i in range(40)]
    assert 5 < sum(flips) < 35
    i = flips.index(True)
    np.testing.assert_allclose(v(img, index=i)[0].numpy(), img[::-1], atol=1e-5)
    # Keras zoom 2.0 on both axes shows the content at half size: the centre stays, corners go black
    z = Augment(rotation=0, translate=0, zoom=(2.0, 2.0), hflip=False, brightness=(1, 1), zoom_xy=True)
    out = z(np.ones((64, 64), np.float32))[0].numpy()
    assert out[32, 32] == pytest.approx(1.0) and out[2, 2] == 0.0 and out[:, 32].sum() == pytest.approx(32, abs=1.5)


def test_channel_stack_finalize_paths_agree():
    p = get_preset("cxnet@64")
    prepared = p.prepare(_image())
    t = p.finalize(prepared)
    np.testing.assert_allclose(t.numpy(), p.finalize_array(prepared), atol=0)
    assert t.shape == (3, 64, 64) and float(t.min()) >= 0 and float(t.max()) <= 1
    # a gradient-tracking input still gets the stack (computed on a detached copy)
    g = torch.from_numpy(prepared).requires_grad_(True)
    np.testing.assert_allclose(p.finalize(g).numpy(), t.numpy(), atol=0)
