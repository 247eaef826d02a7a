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


def test_predictor_of_a_lungcrop_checkpoint_segments_by_itself(lungcrop_ckpt: Path, dev_dir: Path) -> None:
    from covidcxr.predict import Predictor

    image = next(p for p in sorted((dev_dir / "images").iterdir()) if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    predictor = Predictor.from_path(lungcrop_ckpt)
    # the segmenter travels with the model (a picklable spec on its preset), not as a process-wide hook
    assert not hasattr(preprocess, "LUNG_SEGMENTER") and predictor.preset.masks == predictor.mask_spec
    assert predictor.mask_spec.name == "lung-unet-vgg11" and len(predictor.mask_spec.sha256) == 64
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
    import json

    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["failures"] == []  # not one image failed (before: every one did)
    assert metrics["metrics"]["n_images"] == len(small)  # and every image of the manifest was scored


def test_a_lungcrop_model_refuses_another_segmenter_than_its_own(lungcrop_ckpt: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The checkpoint records the segmenter of its training crops; inference uses that one or refuses in one
    line. $COVIDCXR_LUNG_MODEL no longer decides silently."""
    from covidcxr.models.checkpoint import read_bundle
    from covidcxr.predict import Predictor, PredictorError
    from covidcxr.segment.maskspec import TRAINING_KEY

    monkeypatch.setenv("COVIDCXR_LUNG_MODEL", str(tmp_path / "some-other-unet.pt"))  # ignored at inference
    assert Predictor.from_path(lungcrop_ckpt).mask_spec.name == "lung-unet-vgg11"
    bundle = read_bundle(lungcrop_ckpt)
    bundle["training"] = {**bundle.get("training", {}), TRAINING_KEY: {"name": "lung-unet-vgg11", "sha256": "0" * 64}}
    other = tmp_path / "other.ckpt"
    torch.save(bundle, other)
    with pytest.raises(PredictorError, match="refusing to crop with another segmenter") as err:
        Predictor.from_path(other)
    assert len(str(err.value).splitlines()) == 1 and str(other) in str(err.value)
