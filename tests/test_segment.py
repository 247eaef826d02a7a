"""Lung segmentation (from-scratch U-Net): shapes, a few training steps, mask prediction, the lung-crop hook,
the mask cache, and the preprocess -> segment import cycle being gone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from _explain_fixtures import make_dataset, synthetic_cxr
from covidcxr import preprocess
from covidcxr.segment import (
    UNet,
    dice,
    dilate,
    postprocess,
    predict_files,
    predict_masks,
    train_segmenter,
)


def test_unet_output_shape():
    net = UNet(base=4, depth=3)
    assert net(torch.zeros(2, 1, 64, 64)).shape == (2, 1, 64, 64)


def test_dice_and_postprocess():
    a = np.zeros((20, 20), bool)
    a[2:8, 2:8] = True
    assert dice(a, a) == 1.0
    assert dice(a, ~a) == 0.0
    prob = np.zeros((40, 40), np.float32)
    prob[5:20, 5:15] = 0.9
    prob[10:12, 8:10] = 0.1  # a hole: filled
    prob[5:20, 25:35] = 0.9
    prob[38, 38] = 0.9  # a speck: dropped
    m = postprocess(prob)
    assert m[11, 9] and not m[38, 38] and m[6, 30]
    assert dilate(a, 0.1).sum() > a.sum()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    manifest = make_dataset(root, n=9)
    res = train_segmenter(manifest, root / "run", size=32, epochs=5, batch_size=2, base=4, depth=2, max_steps=3)
    return root, manifest, res


def test_train_writes_checkpoint_and_metrics(trained):
    root, _, res = trained
    ckpt = Path(res["checkpoint"])
    assert ckpt.is_file()
    metrics = json.loads((root / "run" / "metrics.json").read_text())
    # the synthetic manifest has train/val/test splits, each with masks: all three are scored
    for split in ("train", "val", "test"):
        assert metrics["metrics"][split]["n"] == 3
        assert 0.0 <= metrics["metrics"][split]["mean"] <= 1.0
    assert metrics["training"]["steps"] == 3


def test_predict_writes_masks_and_reports_bad_files(trained, tmp_path):
    root, _, res = trained
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    files = [str(root / "images" / "img00.png"), str(bad), str(root / "images" / "img01.png")]
    written, failures = predict_files(files, res["checkpoint"], tmp_path / "out")
    assert len(written) == 2 and [f for f, _ in failures] == [str(bad)]
    import cv2

    m = cv2.imread(written[0], cv2.IMREAD_UNCHANGED)
    assert m.shape == (96, 80) and set(np.unique(m)) <= {0, 255}
    ov = cv2.imread(str(tmp_path / "out" / "img00_overlay.png"))
    assert ov.shape == (96, 80, 3)
    img = synthetic_cxr(0)[0].astype(np.float32) / 255
    (mask,) = predict_masks([img], res["checkpoint"])
    assert mask.shape == img.shape and mask.dtype == bool


def test_a_mask_spec_drives_the_lungcrop_preset(trained):
    """A lung-crop preset carries its segmenter (a picklable MaskSpec), not a process-wide hook (issue 21 §1)."""
    import pickle

    from covidcxr.segment.maskspec import MaskSpec, provider

    _, _, res = trained
    spec = MaskSpec(str(res["checkpoint"]))
    preset = pickle.loads(pickle.dumps(preprocess.get_preset("cxnet-lungcrop", size=32).with_masks(spec)))
    img = synthetic_cxr(3)[0].astype(np.float32) / 255
    out = preset(img)
    assert out.shape == (3, 32, 32)
    assert provider(spec).segmenter.size == 32  # type: ignore[attr-defined]
    # the same crop as the segmenter's own mask passed by hand
    assert np.allclose(out.numpy(), preprocess.get_preset("cxnet-lungcrop", size=32)(img, provider(spec)(img)).numpy())
    assert not hasattr(preprocess, "LUNG_SEGMENTER")


def test_lungcrop_crops_to_dilated_box():
    """With a known mask, the hook's dilation widens the crop (COVID-CXNet: segment, dilate, crop)."""
    img, mask = synthetic_cxr(1)
    m = mask > 0
    p = preprocess.get_preset("cxnet-lungcrop", size=32)
    from covidcxr.explain.render import crop_box

    y0, y1, x0, x1 = crop_box(p, m.shape, m)
    dy0, dy1, dx0, dx1 = crop_box(p, m.shape, dilate(m, 0.05))
    assert dy0 <= y0 and dy1 >= y1 and dx0 <= x0 and dx1 >= x1 and (dy1 - dy0) > (y1 - y0)


def test_explain_with_lungcrop_preset_maps_back_to_original(trained, tmp_path):
    """explain --seg-model on a cxnet-lungcrop checkpoint: the crop box is undone in *_original.npy."""
    from _explain_fixtures import CLASSES

    from covidcxr import models
    from covidcxr.cli import main

    root, _, res = trained
    ckpt = tmp_path / "dn.ckpt"
    torch.manual_seed(0)
    models.save(ckpt, models.build("resnet18", num_classes=3), arch="resnet18", classes=CLASSES,
                preset=preprocess.get_preset("cxnet-lungcrop", size=64))
    rc = main(["explain", str(root / "images" / "img04.png"), "--model", str(ckpt), "--seg-model",
               res["checkpoint"], "--out", str(tmp_path / "out")])
    assert rc == 0
    full = np.load(tmp_path / "out" / "img04_gradcam_original.npy")
    assert full.shape == (96, 80)
    assert np.load(tmp_path / "out" / "img04_gradcam.npy").shape == (64, 64)


def test_cli_segment_train_size_must_be_a_multiple_of_16(tmp_path, capsys):
    """--size 7 ended in a ValueError traceback from train_segmenter."""
    from covidcxr.cli import main

    for bad in ("7", "0", "x"):
        with pytest.raises(SystemExit) as exc:
            main(["segment", "train", "--data", str(tmp_path / "m.csv"), "--out", str(tmp_path / "o"), "--size", bad])
        assert exc.value.code == 2
        assert "argument --size:" in capsys.readouterr().err


def test_cli_segment_train_rejects_zero_epochs_or_batch(tmp_path, capsys):
    """--epochs 0 (OneCycleLR ValueError) and --batch-size 0 (ZeroDivisionError) were tracebacks."""
    from covidcxr.cli import main

    for opt in ("--epochs", "--batch-size", "--max-steps"):
        with pytest.raises(SystemExit) as exc:
            main(["segment", "train", "--data", str(tmp_path / "m.csv"), "--out", str(tmp_path / "o"), opt, "0"])
        assert exc.value.code == 2
        assert f"argument {opt}: 0 is below the minimum 1" in capsys.readouterr().err


def test_preprocess_does_not_import_the_segmenter():
    """The cycle preprocess -> segment -> data -> preprocess is gone: preprocessing gets masks from outside."""
    import subprocess
    import sys

    code = ("import sys, covidcxr.preprocess, covidcxr.data; "
            "bad = [m for m in sys.modules if m.startswith('covidcxr.segment')]; assert not bad, bad; "
            "import covidcxr.segment.plausibility, covidcxr.segment.masks; "
            "assert 'torch' not in sys.modules or 'covidcxr.data' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    torch_free = ("import sys, covidcxr.segment.plausibility, covidcxr.segment.masks, covidcxr.segment.loading, covidcxr.segment.maskcache, covidcxr.segment.lungcrop, covidcxr.segment.writer; "
                  "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", torch_free], check=True)


def test_lungcrop_takes_a_provider_and_refuses_without_one():
    img, mask = synthetic_cxr(2)
    img = img.astype(np.float32) / 255
    p = preprocess.get_preset("cxnet-lungcrop", size=32)
    calls = []

    def provider(image):
        calls.append(image.shape)
        return mask > 0

    assert p.prepare(img, provider).shape == (32, 32) and calls == [img.shape]
    with pytest.raises(preprocess.PresetError, match="has no lung segmenter"):
        p.prepare(img)
    assert p.with_masks(provider).prepare(img).shape == (32, 32) and len(calls) == 2


def test_mask_cache_segments_each_image_once(trained, tmp_path):
    from covidcxr.segment import CachedSegmenter, MaskCache, load_segmenter

    _, _, res = trained
    seg = load_segmenter(res["checkpoint"])
    cached = CachedSegmenter(seg, MaskCache(tmp_path / "masks"))
    a = synthetic_cxr(0)[0].astype(np.float32) / 255
    b = synthetic_cxr(1)[0].astype(np.float32) / 255
    first = cached.segment_many([a, b, a.copy()])
    assert cached.calls == 2  # the copy of `a` has the same pixels: segmented once
    again = cached.segment_many([b, a])
    assert cached.calls == 2 and np.array_equal(again[1], first[0])
    # a fresh process-level cache on the same folder reads the PNGs back
    other = CachedSegmenter(seg, MaskCache(tmp_path / "masks"))
    other(a)
    assert other.calls == 0 and other.cache.hits == 1


def test_segment_predict_cli_rejects_unknown_model(tmp_path, capsys):
    from covidcxr.cli import main

    img = tmp_path / "a.png"
    import cv2

    cv2.imwrite(str(img), synthetic_cxr(0)[0])
    rc = main(["segment", "predict", str(img), "--model", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc != 0 and "nope.pt" in err and "Traceback" not in err


def _segment_imports() -> dict[str, set[str]]:
    """Which covidcxr.segment modules each one imports, at module level or inside a function."""
    import ast

    pkg = Path(__file__).resolve().parents[1] / "src" / "covidcxr" / "segment"
    names = {p.stem for p in pkg.glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for name in names:
        deps = set()
        for node in ast.walk(ast.parse((pkg / f"{name}.py").read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            deps |= {m.split(".")[2] for m in mods if m.startswith("covidcxr.segment.")}
        graph[name] = deps & names
    return graph


def test_segment_modules_import_no_circle():
    """Issue 21 §1: plausibility <-> inference imported each other; now every import goes one way."""
    graph = _segment_imports()
    assert {"segmenter", "loading", "maskcache", "lungcrop", "writer", "plausibility"} <= set(graph)
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            assert state.get(dep) != 1, f"import circle: {' -> '.join(path + [node, dep])}"
            if dep not in state:
                visit(dep, path + [node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert "plausibility" in graph["writer"] and "writer" not in graph["plausibility"]


def test_no_process_global_segmenter_memo(trained, tmp_path):
    """Issue 21 §1: load_segmenter loads each time (no hidden _LOADED), and each plausibility gate holds its own
    segmenter and mask cache (no hidden _CACHED): a gate that failed to load tries again on the next image."""
    from covidcxr.predict.gate import PlausibilityGate
    from covidcxr.segment import load_segmenter

    _, _, res = trained
    assert load_segmenter(res["checkpoint"]) is not load_segmenter(res["checkpoint"])
    a = synthetic_cxr(0)[0].astype(np.float32) / 255
    missing = tmp_path / "later.pt"
    gate = PlausibilityGate(segmenter=str(missing))
    assert gate.check(a)["verdict"] == "unchecked" and gate.failures == 1
    missing.write_bytes(Path(res["checkpoint"]).read_bytes())
    assert gate.check(a)["verdict"] in ("frontal_cxr", "not_a_frontal_cxr") and gate.failures == 1
    other = PlausibilityGate(segmenter=str(missing))
    other.check(a)
    assert other.checker() is not gate.checker() and gate.checker().calls == 1 and other.checker().calls == 1
    gate.check(a)
    assert gate.checker().calls == 1  # answered from the gate's own mask cache


def test_train_segmenter_takes_a_config(trained, tmp_path):
    """SegmenterTrainConfig (what `covidcxr segment train` builds) and keyword overrides of it; a misspelt
    setting is a TypeError, not silently ignored."""
    from covidcxr.segment.training import SegmenterTrainConfig

    _, manifest, _ = trained
    config = SegmenterTrainConfig(size=32, epochs=5, batch_size=2, base=4, depth=2, max_steps=3)
    res = train_segmenter(manifest, tmp_path / "run", config, max_steps=2, seed=1)
    training = json.loads((tmp_path / "run" / "metrics.json").read_text())["training"]
    assert training["steps"] == 2 and training["seed"] == 1 and training["batch_size"] == 2
    assert Path(res["checkpoint"]).is_file() and config.max_steps == 3
    with pytest.raises(TypeError, match="epoch"):
        train_segmenter(manifest, tmp_path / "other", epoch=3)
    assert not (tmp_path / "other").exists()
