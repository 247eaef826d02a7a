"""The input plausibility check (issue 11 §6): rules on drawn masks, and the catch rate on generated
non-CXR images with the pretrained lung U-Net (target >= 95 %), real films passing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


def test_intensity_rules_on_a_real_film(samples_dir):
    """Up from down and upright from on-its-side by where the film is bright; an upright frontal film's
    own pattern waives the mask-shape rules (a whited-out or merged lung) but not the size rules."""
    from covidcxr.io import read_image
    from covidcxr.segment.plausibility import intensity_signature

    film = read_image(samples_dir / "nih-00000001_000.png")
    h, w = film.shape
    lungs = cv2.resize(_lungs().astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
    sig = intensity_signature(film, lungs)
    assert sig["bottom_minus_top"] > 0.5 and sig["below_minus_above"] > 0.3 and sig["frontal_signature"]
    assert sig["on_its_side"] < 0
    v = assess(lungs, film)
    assert v.plausible and "shape_rule_waived" not in v.measurements
    # the same film and mask turned upside down: the shape rules pass a mirrored mask, the intensity does not
    v = assess(lungs[::-1], np.ascontiguousarray(film[::-1]))
    assert v.rule == "upside_down" and not v.plausible and "upside down" in v.reason
    turned = np.ascontiguousarray(np.rot90(film))
    assert intensity_signature(turned)["on_its_side"] > intensity_signature(film)["on_its_side"] + 2
    # one wide region (lungs merged by the segmenter) on this upright film: waived, and the reason says so
    one = np.zeros((h, w), np.uint8)
    cv2.ellipse(one, (w // 2, int(0.45 * h)), (int(0.35 * w), int(0.3 * h)), 0, 0, 360, 1, -1)
    v = assess(one.astype(bool), film)
    assert v.plausible and v.measurements["shape_rule_waived"] == "two_lungs" and "unusual" in v.reason
    noise = np.random.default_rng(0).random((h, w)).astype(np.float32)
    assert assess(one.astype(bool), noise).rule == "two_lungs"  # no frontal pattern, no waiver
    assert assess(_lungs(scale=0.15), film).rule == "lung_fraction"  # size rules are never waived


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


# --------------------------------------------------------------------------- the ONNX predictors (issue 11 §7)

_ONNX_PREDICT = (
    "import sys\n"
    "from covidcxr.cli import main\n"
    "rc = main(['predict', *sys.argv[1:], '-q', '--workers', '0', '--threads', '1'])\n"
    "print('TORCH', 'torch' in sys.modules, 'RC', rc, file=sys.stderr)\n"
)


@pytest.fixture(scope="module")
def onnx_case(tmp_path_factory, weights_dir, samples_dir):
    """A tiny random ONNX classifier, a lung U-Net export in its own cache folder, and three inputs."""
    import os

    import torch

    from covidcxr import models
    from covidcxr.export import export_onnx
    from covidcxr.preprocess import get_preset
    from covidcxr.segment.loading import PRETRAINED_SHA256, cache_dir, onnx_file
    from covidcxr.segment.negatives import synthetic

    d = tmp_path_factory.mktemp("onnx_gate")
    torch.manual_seed(0)
    ckpt = d / "tiny.ckpt"
    models.save(ckpt, models.build("resnet18", num_classes=3), arch="resnet18",
                classes=["normal", "pneumonia", "COVID-19"], preset=get_preset("deepcovid", size=64), threshold=0.5)
    film = samples_dir / "nih-00000001_000.png"
    export_onnx(ckpt, d / "tiny.onnx", parity_images=[film], parity_count=1)
    noise = d / "noise.png"
    cv2.imwrite(str(noise), (synthetic("uniform_noise", 0) * 255).astype(np.uint8))
    black = d / "black.png"
    cv2.imwrite(str(black), np.zeros((300, 300), np.uint8))
    cache = d / "cache"
    old = os.environ.get("COVIDCXR_CACHE")
    os.environ["COVIDCXR_CACHE"] = str(cache)
    try:
        have = onnx_file(PRETRAINED_SHA256, 256).name
        mine = Path(old or Path.home() / ".cache" / "covidcxr") / "segment" / have
        if mine.is_file():  # the user's export, linked: writing it again costs a torch load and an export
            (cache / "segment").mkdir(parents=True)
            (cache / "segment" / have).symlink_to(mine)
        else:
            from covidcxr.segment.loading import export_onnx as export_unet

            export_unet(size=256)
        assert onnx_file(PRETRAINED_SHA256, 256).is_file() and cache_dir() == cache
    finally:
        if old is None:
            os.environ.pop("COVIDCXR_CACHE", None)
        else:
            os.environ["COVIDCXR_CACHE"] = old
    return {"model": d / "tiny.onnx", "inputs": [film, noise, black], "cache": cache, "empty": d / "empty"}


def _run_onnx_predict(case: dict, cache: Path) -> tuple[list[dict], str]:
    import json
    import os

    res = subprocess.run([sys.executable, "-c", _ONNX_PREDICT, *map(str, case["inputs"]), "--model",
                          str(case["model"])], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "COVIDCXR_CACHE": str(cache)})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "TORCH False RC 0" in res.stderr, res.stderr[-2000:]
    return [json.loads(line) for line in res.stdout.splitlines() if line.strip()], res.stderr


def test_onnx_predictor_records_carry_lung_rule_verdicts(onnx_case):
    """With the U-Net's ONNX export at hand, the ONNX predictor runs the lung rules, torch-free."""
    recs, _ = _run_onnx_predict(onnx_case, onnx_case["cache"])
    by = {Path(r["path"]).name: r for r in recs}
    film, noise, black = (by[p.name] for p in onnx_case["inputs"])
    assert film["plausibility"]["verdict"] == FRONTAL and film["plausibility"]["plausible"] is True
    assert film["flag"] is None and film["label"] in ("normal", "pneumonia", "COVID-19")
    # noise passes the mask-free rules; only the U-Net's mask can fail it
    assert noise["plausibility"]["rule"] == "lung_fraction" and noise["flag"] == NOT_FRONTAL
    assert noise["label"] == NOT_FRONTAL
    assert black["plausibility"]["rule"] == "uniform" and black["label"] == NOT_FRONTAL


def test_onnx_predictor_without_unet_export_says_what_to_run(onnx_case):
    """No export: the torch-free rules still run, the lung rules are 'unchecked', and one warning says what to run."""
    recs, err = _run_onnx_predict(onnx_case, onnx_case["empty"])
    by = {Path(r["path"]).name: r for r in recs}
    film, noise, black = (by[p.name] for p in onnx_case["inputs"])
    for r in (film, noise):
        assert r["plausibility"]["verdict"] == "unchecked" and r["plausibility"]["plausible"] is None
        assert "export_onnx(size=256)" in r["plausibility"]["reason"] and r["flag"] is None
    assert black["plausibility"]["rule"] == "uniform" and black["label"] == NOT_FRONTAL
    assert err.count("export_onnx(size=256)") == 1, err[-2000:]


def test_unet_session_reuses_its_optimised_graph(onnx_case, samples_dir, tmp_path, monkeypatch):
    """The ONNX U-Net's optimised graph is kept beside the export (0.25 s less per process), gives the same
    mask, and a damaged copy is rebuilt rather than fatal."""
    from covidcxr.io import read_image
    from covidcxr.segment import loading as inf

    name = inf.onnx_file(inf.PRETRAINED_SHA256, 256).name
    (tmp_path / "segment").mkdir()
    (tmp_path / "segment" / name).symlink_to((onnx_case["cache"] / "segment" / name).resolve())
    monkeypatch.setenv("COVIDCXR_CACHE", str(tmp_path))
    film = read_image(samples_dir / "nih-00000001_000.png")

    def load():
        return inf.load_segmenter(inf.PRETRAINED, size=256, backend="onnx", torch_free=True)

    first = load()
    opt = list((tmp_path / "segment").glob("*.opt-*.onnx"))
    assert len(opt) == 1 and first.session._model_path == str(tmp_path / "segment" / name)
    second = load()
    assert second.session._model_path == str(opt[0])
    reference = first(film)
    assert reference.any() and np.array_equal(second(film), reference)
    opt[0].write_bytes(b"not an onnx graph")
    third = load()
    assert third.session._model_path == str(tmp_path / "segment" / name) and np.array_equal(third(film), reference)
    assert opt[0].stat().st_size > 1000  # written again
