"""Fine-tuning recipe of `segment train --init`: which layers learn, the learning-rate schedule, and the
wall-clock budget that anneals the schedule instead of cutting it off."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from _explain_fixtures import make_dataset
from covidcxr.segment import train_segmenter
from covidcxr.segment.training import lr_factor


def test_lr_factor_warms_up_then_anneals_to_the_floor():
    ps = np.linspace(0, 1, 201)
    f = np.array([lr_factor(p) for p in ps])
    assert f[0] < 0.05 and f.max() == pytest.approx(1.0, abs=0.01)
    peak = int(f.argmax())
    assert ps[peak] == pytest.approx(0.05, abs=0.01)
    assert np.all(np.diff(f[:peak + 1]) >= 0) and np.all(np.diff(f[peak:]) <= 1e-12)
    assert f[-1] == pytest.approx(0.01) and lr_factor(3.0) == pytest.approx(0.01)


def test_unknown_train_encoder_is_refused_before_any_loading(tmp_path):
    with pytest.raises(ValueError, match="train_encoder must be one of"):
        train_segmenter(tmp_path / "missing.csv", tmp_path / "run", init="lung-unet-vgg11", train_encoder="half")


def test_time_budget_stops_after_one_step_with_the_schedule_spent(tmp_path):
    manifest = make_dataset(tmp_path, n=9)
    res = train_segmenter(manifest, tmp_path / "run", size=32, epochs=50, batch_size=1, base=4, depth=2,
                          max_minutes=1e-6)
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["training"]["steps"] == 1 and len(m["history"]) == 1
    assert "spent" in m["training"]["stopped"]
    assert m["history"][0]["lr"] == pytest.approx(2e-3 * 0.01)  # annealed to the floor, not cut at the peak
    assert "test" in res


def test_finetune_deep_trains_decoder_and_last_vgg_stage_only(weights_dir, tmp_path):
    from covidcxr.segment import load_segmenter

    manifest = make_dataset(tmp_path, n=9)
    start = load_segmenter("lung-unet-vgg11", size=32).model.state_dict()
    res = train_segmenter(manifest, tmp_path / "run", init="lung-unet-vgg11", size=32, epochs=1, batch_size=2,
                          max_steps=2, train_encoder="deep")
    bundle = torch.load(res["checkpoint"], map_location="cpu", weights_only=False)
    after = bundle["state_dict"]
    assert bundle["training"]["train_encoder"] == "deep" and bundle["training"]["best_epoch"] == 1

    def moved(key: str) -> bool:  # beyond float16 rounding of the saved copy
        return not torch.allclose(after[key].float(), start[key].half().float())

    assert not moved("conv1.weight") and not moved("conv4s.weight")  # frozen encoder
    assert moved("conv5s.weight") and moved("dec1.conv2.weight") and moved("out.weight")
    assert not moved("dec1.bn1.running_mean") and not moved("dec1.bn1.running_var")  # statistics kept
    assert load_segmenter(res["checkpoint"]).size == 32
