"""The pretrained lung U-Net (../shared/weights/lung-unet-vgg11-fp16.pth): strict loading, its mask on
one shared image, `segment predict --model lung-unet-vgg11`, and the ONNX backend agreeing with torch."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
import torch

from covidcxr.segment import LungUNetVGG11, SegmenterError, load_pretrained_file, load_segmenter, measure
from covidcxr.segment.model import load_state_strict

NIH = "nih-00000001_000.png"


@pytest.fixture(scope="module")
def weights(weights_dir):
    return weights_dir / "lung-unet-vgg11-fp16.pth"


@pytest.fixture(scope="module")
def nih_image(samples_dir):
    from covidcxr.io import read_image

    return read_image(samples_dir / NIH)


def test_loads_strictly_in_float32(weights):
    net = load_pretrained_file(weights)
    on_disk = torch.load(weights, map_location="cpu", weights_only=True)
    assert set(net.state_dict()) == set(on_disk)  # strict: not a key more or less
    assert {v.dtype for v in on_disk.values() if v.is_floating_point()} == {torch.float16}
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert net(torch.zeros(1, 1, 64, 64)).shape == (1, 2, 64, 64)
    broken = dict(on_disk)
    broken.pop("dec1.conv2.weight")
    with pytest.raises(SegmenterError, match="do not fit"):
        load_state_strict(LungUNetVGG11(), broken, "x.pth")


def test_catalogue_name_and_path_give_the_same_segmenter(weights):
    by_name = load_segmenter("lung-unet-vgg11")
    by_path = load_segmenter(str(weights))
    assert by_name.preset.name == "lung-unet" and by_name.size == 512 and by_path.size == 512
    assert by_name.digest == by_path.digest  # the catalogue's sha256 is the file's
    assert "lung-unet-vgg11@512" in by_name.id


def test_pinned_mask_on_a_shared_nih_image(weights, nih_image):
    """NIH 00000001_000 (a normal PA film): two lungs covering ~31 % of the image, similar in size."""
    mask = load_segmenter("lung-unet-vgg11")(nih_image)
    m = measure(mask)
    assert mask.shape == nih_image.shape
    assert m["components"] == 2
    assert m["fraction"] == pytest.approx(0.31, abs=0.03)
    assert m["balance"] > 0.6 and m["side_by_side"]
    # the image's left half holds the patient's right lung: one component on each side
    assert m["left_fraction"] > 0.1 and m["right_fraction"] > 0.1


def test_segment_predict_cli_writes_masks_overlays_and_table(weights, samples_dir, tmp_path, capsys):
    import cv2

    from covidcxr.cli import main

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    rc = main(["segment", "predict", str(samples_dir / NIH), str(bad), "--model", "lung-unet-vgg11",
               "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert rc == 1 and "bad.png" in err and "wrote 1 mask(s) and overlays" in out
    stem = NIH[:-4]
    m = cv2.imread(str(tmp_path / "out" / f"{stem}_mask.png"), cv2.IMREAD_UNCHANGED)
    assert m.shape == (512, 512) and set(np.unique(m)) == {0, 255}
    assert cv2.imread(str(tmp_path / "out" / f"{stem}_overlay.png")).shape == (512, 512, 3)
    rows = list(csv.DictReader(open(tmp_path / "out" / "masks.csv")))
    assert len(rows) == 1 and rows[0]["plausible"] == "True" and rows[0]["segmenter"].startswith("lung-unet-vgg11@512")


def test_onnx_backend_matches_torch(weights, nih_image, samples_dir, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("COVIDCXR_CACHE", str(tmp_path))
    a = load_segmenter("lung-unet-vgg11", size=256)(nih_image)
    b = load_segmenter("lung-unet-vgg11", size=256, backend="onnx")(nih_image)
    assert list((tmp_path / "segment").glob("*.onnx"))
    inter = (a & b).sum()
    assert 2 * inter / (a.sum() + b.sum()) > 0.995
    # once exported, the plausibility check runs in a process that never imports torch
    import subprocess
    import sys

    code = ("import sys, numpy as np; from covidcxr.segment.plausibility import check_plausibility; "
            "from covidcxr.io import read_image; "
            f"v = check_plausibility(read_image({str(samples_dir / NIH)!r}), "
            "backend='onnx'); assert v.plausible, v.reason; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "COVIDCXR_CACHE": str(tmp_path)})


def test_pretrained_sha_matches_the_catalogue():
    from covidcxr.models import catalog
    from covidcxr.segment.loading import PRETRAINED, PRETRAINED_SHA256

    assert catalog.get_entry(PRETRAINED).sha256 == PRETRAINED_SHA256
