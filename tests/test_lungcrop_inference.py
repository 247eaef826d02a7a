"""A lung-crop (COVID-CXNet-style) checkpoint predicts and evaluates without a mask in hand.

Training reads lung masks from the manifest or the default segmenter; inference gets only the image.
The predictor must therefore install the default lung segmenter itself: before this, every test image of
the results run's lung-crop model failed with "no mask provider is installed" and `evaluate` stopped.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

torch = pytest.importorskip("torch")

from covidcxr import preprocess  # noqa: E402
from covidcxr.cli import main  # noqa: E402


@pytest.fixture
def lungcrop_ckpt(weights_dir: Path, tmp_path: Path) -> Path:
    from covidcxr import models

    ckpt = tmp_path / "lungcrop.ckpt"
    torch.manual_seed(0)
    models.save(ckpt, models.build("resnet18", num_classes=3), arch="resnet18",
                classes=["normal", "pneumonia", "COVID-19"], preset=preprocess.get_preset("cxnet-lungcrop", size=64))
    return ckpt


@pytest.fixture(autouse=True)
def no_provider_before_and_after():
    """Each test starts as a fresh process does: no lung-mask provider installed."""
    saved = preprocess.LUNG_SEGMENTER
    preprocess.LUNG_SEGMENTER = None
    yield
    preprocess.LUNG_SEGMENTER = saved


def test_predictor_of_a_lungcrop_checkpoint_segments_by_itself(lungcrop_ckpt: Path, dev_dir: Path) -> None:
    from covidcxr.predict import Predictor

    image = next(p for p in sorted((dev_dir / "images").iterdir()) if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    predictor = Predictor.from_path(lungcrop_ckpt)
    assert preprocess.LUNG_SEGMENTER is not None and "lung-unet-vgg11" in preprocess.LUNG_SEGMENTER.id
    rec, = predictor.predict_paths([str(image)])
    assert rec["error"] is None, rec["error"]
    assert abs(sum(rec["probabilities"].values()) - 1) < 1e-5


def test_evaluate_a_lungcrop_checkpoint(lungcrop_ckpt: Path, dev_manifest: Path, tmp_path: Path) -> None:
    frame = pd.read_csv(dev_manifest)
    small = frame[frame["split"] == "test"].groupby("label").head(3)  # a few images per class: it segments each
    manifest = tmp_path / "m.csv"
    small.to_csv(manifest, index=False)
    rc = main(["evaluate", "--model", str(lungcrop_ckpt), "--data", str(manifest), "--split", "test",
               "--out", str(tmp_path / "report")])
    assert rc == 0
    assert (tmp_path / "report" / "metrics.json").is_file()
