"""Lung-field histogram standardisation (issue 18 §2, ``data.hist_standardize: lung``).

The mapping is fitted on the pixels inside the lung mask only and applied to the whole film; the mask comes
from the segmenter the checkpoint records (as the lung crop's); an empty or tiny mask falls back to the
whole-film standardisation for that film, counted and logged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from covidcxr.preprocess import (NIH_CXR14_LUNG_TEMPLATE, NIH_CXR14_TEMPLATE, Preset, PresetError, get_preset,
                                 lung_hist_fallbacks, lung_lut, mask_box, match_histogram, standardized)
from covidcxr.train import ConfigError, load_config


def _film(seed: int, level: float = 0.3, shape: tuple[int, int] = (64, 64)) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic film (dark 'lungs' in a brighter body) and its lung mask."""
    rng = np.random.default_rng(seed)
    img = np.clip(rng.normal(0.75, 0.08, shape), 0, 1).astype(np.float32)
    mask = np.zeros(shape, bool)
    h, w = shape
    mask[h // 6 : 5 * h // 6, w // 8 : 7 * w // 16] = True
    mask[h // 6 : 5 * h // 6, 9 * w // 16 : 7 * w // 8] = True
    img[mask] = np.clip(rng.normal(level, 0.1, int(mask.sum())), 0, 1)
    return img, mask


def test_lung_mapping_is_fitted_on_in_mask_pixels_only() -> None:
    img, mask = _film(0)
    other = img.copy()
    other[~mask] = np.random.default_rng(9).uniform(0, 1, int((~mask).sum()))  # a different body, same lungs
    u8, u8o = ((np.clip(x * 255 + 0.5, 0, 255)).astype(np.uint8) for x in (img, other))
    assert np.array_equal(lung_lut(u8, mask, NIH_CXR14_LUNG_TEMPLATE), lung_lut(u8o, mask, NIH_CXR14_LUNG_TEMPLATE))
    plain = get_preset("imagenet@64")
    p = standardized(plain, "lung")
    assert p.hist_region == "lung" and p.needs_lung_mask and p.hist_template == NIH_CXR14_LUNG_TEMPLATE
    a, b = p.prepare(img, mask), p.prepare(other, mask)
    assert np.array_equal(a[mask], b[mask])  # the lungs come out the same, whatever lies outside them
    assert not np.array_equal(a[~mask], b[~mask])  # and the mapping is applied to the whole film
    film = standardized(plain, "film")  # the whole-film mode does depend on the outside pixels
    assert not np.array_equal(film.prepare(img)[mask], film.prepare(other)[mask])


def test_lung_mapping_brings_different_lungs_to_the_reference_quantiles() -> None:
    p = standardized(get_preset("imagenet@64"), "lung")
    qs = np.linspace(0.1, 0.9, 9)
    ref = np.interp(qs, np.linspace(0, 1, len(NIH_CXR14_LUNG_TEMPLATE)), NIH_CXR14_LUNG_TEMPLATE) / 255.0
    (dark, m1), (bright, m2) = _film(1, level=0.15), _film(2, level=0.55)
    assert abs(np.median(dark[m1]) - np.median(bright[m2])) > 0.3
    a, b = p.prepare(dark, m1), p.prepare(bright, m2)
    assert np.abs(np.quantile(a[m1], qs) - ref).max() < 0.04 and np.abs(np.quantile(b[m2], qs) - ref).max() < 0.04
    # beyond the lungs' 1st-99th percentile it goes on linearly: brighter body pixels are not all crushed to
    # the template's top value, as a plain in-mask quantile match (flat CDF above the lungs) would crush them
    u8 = np.clip(bright * 255 + 0.5, 0, 255).astype(np.uint8)
    lut = lung_lut(u8, m2, NIH_CXR14_LUNG_TEMPLATE).astype(int)
    hi = int(np.percentile(u8[m2], 99))
    assert np.all(np.diff(lut) >= 0) and len(np.unique(lut[hi + 1 :][lut[hi + 1 :] < 255])) > 3


def test_empty_or_tiny_mask_falls_back_to_the_whole_film_and_is_counted() -> None:
    img, _ = _film(3)
    p = standardized(get_preset("imagenet@64"), "lung")
    whole = match_histogram(np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8), NIH_CXR14_TEMPLATE) / np.float32(255)
    for mask in (np.zeros(img.shape, bool), np.pad(np.ones((5, 5), bool), ((0, 59), (0, 59)))):
        before = lung_hist_fallbacks()
        out = p.prepare(img, mask)
        assert lung_hist_fallbacks() == before + 1
        assert np.array_equal(out, whole.astype(np.float32))
        assert np.array_equal(out, standardized(get_preset("imagenet@64"), "film").prepare(img))


def test_no_mask_and_no_segmenter_is_one_line() -> None:
    p = standardized(get_preset("imagenet@64"), "lung")
    with pytest.raises(PresetError, match="standardises the histogram inside the lungs") as err:
        p.prepare(_film(4)[0])
    assert len(str(err.value).splitlines()) == 1
    with pytest.raises(PresetError, match="hist_region"):
        dataclasses.replace(get_preset("imagenet@64"), hist_region="lungs")


def test_combines_with_the_lung_crop() -> None:
    img, mask = _film(5, shape=(100, 90))
    crop = standardized(dataclasses.replace(get_preset("imagenet@64"), lung_crop=True), "lung")
    y0, y1, x0, x1 = mask_box(mask, crop.lung_margin)
    expected = standardized(get_preset("imagenet@64"), "lung").prepare(img[y0:y1, x0:x1], mask[y0:y1, x0:x1])
    assert np.array_equal(crop.prepare(img, mask), expected)
    assert np.array_equal(crop.prepare(img, lambda im: mask), expected)  # a mask function: segmented once, same


def test_preset_round_trips_and_old_dicts_stay_film() -> None:
    plain = get_preset("imagenet@64")
    p = standardized(plain, "lung")
    d = p.to_dict()
    assert d["hist_region"] == "lung" and Preset.from_dict(json.loads(json.dumps(d))) == p
    assert "hist_region" not in plain.to_dict()  # older fingerprints and stored presets unchanged
    assert Preset.from_dict(plain.to_dict()).hist_region == "film"
    assert standardized(p, "lung") == p and p.fingerprint() != standardized(plain, "film").fingerprint()


def test_config_accepts_lung_and_refuses_bad_values_in_one_line() -> None:
    assert load_config(None, ["data.hist_standardize=lung"])["data"]["hist_standardize"] == "lung"
    with pytest.raises(ConfigError, match="hist_standardize") as err:
        load_config(None, ["data.hist_standardize=lungs"])
    assert len(str(err.value).splitlines()) == 1


def test_dataset_reads_manifest_masks_and_logs_the_fallback_per_film(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    from covidcxr.data.dataset import CXRDataset

    rows = []
    for i, empty in enumerate((False, True)):
        img, mask = _film(10 + i)
        cv2.imwrite(str(tmp_path / f"f{i}.png"), (img * 255).astype(np.uint8))
        cv2.imwrite(str(tmp_path / f"m{i}.png"), (mask & (not empty)).astype(np.uint8) * 255)
        rows.append({"path": str(tmp_path / f"f{i}.png"), "mask_path": str(tmp_path / f"m{i}.png"), "label": "normal"})
    ds = CXRDataset(pd.DataFrame(rows), standardized(get_preset("imagenet@64"), "lung"))
    with caplog.at_level(logging.WARNING, logger="covidcxr.data.dataset"):
        before = lung_hist_fallbacks()
        assert all(ds[i]["image"].shape == (3, 64, 64) for i in range(2))
    assert lung_hist_fallbacks() == before + 1
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [rows[1]["path"]]


class _Masks:
    """A picklable stand-in segmenter: the same fixed mask for every film, with the record a MaskSpec has."""

    def __init__(self, mask: np.ndarray, name: str = "stand-in") -> None:
        self.mask, self.name = mask, name

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return cv2.resize(self.mask.astype(np.uint8), image.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0

    def record(self) -> dict[str, str]:
        return {"name": self.name, "sha256": "0" * 64}


def test_with_a_segmenter_the_dataset_standardises_with_its_mask_not_the_manifest_one(tmp_path: Path) -> None:
    """Training, the val threshold and prediction must fit the mapping on the same mask: inference has only the
    segmenter's, so a hand-drawn manifest mask (here a quarter of the film's lungs) is not used for it."""
    from covidcxr.data.dataset import CXRDataset

    img, mask = _film(20)
    drawn = np.zeros_like(mask)
    drawn[: mask.shape[0] // 2, : mask.shape[1] // 2] = mask[: mask.shape[0] // 2, : mask.shape[1] // 2]
    cv2.imwrite(str(tmp_path / "f.png"), (img * 255).astype(np.uint8))
    cv2.imwrite(str(tmp_path / "m.png"), drawn.astype(np.uint8) * 255)
    frame = pd.DataFrame([{"path": str(tmp_path / "f.png"), "mask_path": str(tmp_path / "m.png"), "label": "normal"}])
    plain = standardized(get_preset("imagenet@64"), "lung")
    seg = plain.with_masks(_Masks(mask))
    got = CXRDataset(frame, seg).prepared(0)
    film = cv2.imread(str(tmp_path / "f.png"), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255
    assert np.allclose(got, seg.prepare(film, None))  # the segmenter's mask, as predict would take it
    assert not np.allclose(got, seg.prepare(film, drawn))
    assert np.allclose(CXRDataset(frame, plain).prepared(0), plain.prepare(film, drawn))  # no segmenter: the manifest's


def test_the_image_cache_keeps_films_of_different_segmenters_apart(tmp_path: Path) -> None:
    from covidcxr.data.dataset import CXRDataset, cache_fingerprint

    img, mask = _film(21)
    cv2.imwrite(str(tmp_path / "f.png"), (img * 255).astype(np.uint8))
    frame = pd.DataFrame([{"path": str(tmp_path / "f.png"), "label": "normal"}])
    lung = standardized(get_preset("imagenet@64"), "lung")
    a, b = lung.with_masks(_Masks(mask, "seg-a")), lung.with_masks(_Masks(~mask, "seg-b"))
    assert cache_fingerprint(a) != cache_fingerprint(b)
    plain = get_preset("imagenet@64")  # no lung mask needed: the segmenter plays no part in its films
    assert cache_fingerprint(plain.with_masks(_Masks(mask, "seg-a"))) == cache_fingerprint(plain)
    first = CXRDataset(frame, a, cache_dir=tmp_path / "cache").prepared(0)
    second = CXRDataset(frame, b, cache_dir=tmp_path / "cache").prepared(0)
    assert not np.allclose(first, second)


# --------------------------------------------------------------------------- checkpoints, predict, training


def _save(path: Path, preset: Preset, training: dict | None = None) -> Path:
    torch = pytest.importorskip("torch")
    from covidcxr import models

    torch.manual_seed(0)
    models.save(path, models.build("resnet18", num_classes=3), arch="resnet18",
                classes=["normal", "pneumonia", "COVID-19"], preset=preset, training=training or {})
    return path


def test_a_checkpoint_whose_segmenter_is_missing_refuses_in_one_line(tmp_path: Path) -> None:
    from covidcxr.predict import Predictor, PredictorError
    from covidcxr.segment.maskspec import TRAINING_KEY

    ckpt = _save(tmp_path / "lung.ckpt", standardized(get_preset("imagenet", size=64), "lung"),
                 {TRAINING_KEY: {"name": str(tmp_path / "no-such-unet.pt"), "sha256": ""}})
    with pytest.raises(PredictorError, match="standardises the histogram inside the lungs") as err:
        Predictor.from_path(ckpt)
    assert len(str(err.value).splitlines()) == 1 and "no-such-unet" in str(err.value) and str(ckpt) in str(err.value)


def test_lung_checkpoint_round_trips_and_predict_applies_it(weights_dir: Path, dev_dir: Path, tmp_path: Path) -> None:
    from covidcxr import models
    from covidcxr.io import read_image
    from covidcxr.predict import Predictor
    from covidcxr.segment.maskspec import MaskSpec

    preset = standardized(get_preset("imagenet", size=64), "lung")
    ckpt = _save(tmp_path / "lung.ckpt", preset)
    assert models.load(ckpt).preset == preset
    image = next(p for p in sorted((dev_dir / "images").iterdir()) if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    predictor = Predictor.from_path(ckpt)
    assert predictor.mask_spec.name == "lung-unet-vgg11" and predictor.preset.masks == predictor.mask_spec
    img = read_image(image)
    mask = MaskSpec.for_model(None)(img)
    assert 0.05 < np.mean(mask) < 0.6  # a real lung field, not the fallback
    expected = preset.array(img, mask)
    assert np.array_equal(predictor.preprocess(img), expected)
    assert not np.allclose(expected, standardized(get_preset("imagenet", size=64), "film").array(img), atol=0.05)
    rec, = predictor.predict_paths([str(image)])
    assert rec["error"] is None, rec["error"]


def test_one_epoch_with_lung_standardisation_lung_crop_and_source_random(weights_dir: Path, dev_manifest: Path,
                                                                        tmp_path: Path) -> None:
    from covidcxr import models
    from covidcxr.predict import Predictor
    from covidcxr.segment.maskspec import TRAINING_KEY
    from covidcxr.train import fit

    frame = pd.read_csv(dev_manifest)
    small = frame[frame["split"].isin(["train", "val"])].groupby(["split", "label"]).head(2)
    manifest = tmp_path / "m.csv"
    small.to_csv(manifest, index=False)
    cfg = load_config(None, ["data.size=64", "data.batch_size=6", "data.num_workers=0", "trainer.accelerator=cpu",
                             "trainer.devices=1", "trainer.progress_bar=false", "trainer.num_threads=1",
                             "early_stopping.monitor=null", "model.weights=none", "model.arch=mobilenet_v2",
                             "trainer.max_epochs=1", "data.preset=cxnet-lungcrop", "data.hist_standardize=lung",
                             "data.augment=source-random"])
    run = fit(cfg, data=manifest, out=tmp_path / "run")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["training"][TRAINING_KEY]["name"] == "lung-unet-vgg11"
    lm = models.load(run / "best.ckpt")
    assert lm.preset.lung_crop and lm.preset.hist_region == "lung"
    assert lm.preset.hist_template == NIH_CXR14_LUNG_TEMPLATE  # inference standardises as training did
    rec, = Predictor.from_path(run / "best.ckpt").predict_paths([str(small["path"].iloc[0])])
    assert rec["error"] is None, rec["error"]
