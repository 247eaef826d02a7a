"""Shortcut audit on a tiny synthetic manifest: report files, lung shares, masking, text sensitivity."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from _explain_fixtures import CLASSES, make_dataset
from covidcxr import models
from covidcxr.explain.audit import _share, _variants, border_mask, detect_text
from covidcxr.preprocess import get_preset


def test_variants_and_shares():
    img = np.full((40, 40), 0.5, np.float32)
    lung = np.zeros((40, 40), bool)
    lung[10:30, 5:35] = True
    v = _variants(img, lung)
    assert v["lung_only"][0, 0] == 0 and v["lung_only"][20, 20] == 0.5
    assert v["border_blanked"][0, 20] == 0 and v["border_blanked"][20, 20] == 0.5
    assert v["top_left"][0, 0] == 0 and v["top_left"][39, 39] == 0.5 and v["bottom_right"][39, 39] == 0
    heat = np.where(lung, 1.0, -5.0)  # negative relevance outside is ignored
    assert _share(heat, lung) == 1.0
    assert np.isnan(_share(-np.ones((4, 4)), np.ones((4, 4), bool)))
    assert border_mask((40, 40)).mean() == pytest.approx(1 - 0.8 * 0.8)


def test_text_detector_finds_burned_in_label_not_lungs():
    from _explain_fixtures import synthetic_cxr

    from covidcxr.explain.render import to_model

    p = get_preset("chexnet", size=64)
    with_text, mask = synthetic_cxr(0, text=True)
    without, _ = synthetic_cxr(0, text=False)
    lung = to_model(mask.astype(np.float32), p, nearest=True) > 0.5
    found = detect_text(p.prepare(with_text.astype(np.float32) / 255), lung)
    assert found.any() and found[:8, :16].any()  # the label sits in the top-left corner
    assert not (found & lung).any()
    assert not detect_text(p.prepare(without.astype(np.float32) / 255), lung).any()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    manifest = make_dataset(root, n=9, with_masks=6)
    ckpt = root / "r18.ckpt"
    torch.manual_seed(0)
    models.save(ckpt, models.build("resnet18", num_classes=3), arch="resnet18", classes=CLASSES,
                preset=get_preset("chexnet", size=64))
    return root, manifest, ckpt


def test_audit_report_end_to_end(setup, tmp_path, capsys):
    from covidcxr.cli import main

    root, manifest, ckpt = setup
    # a missing image in the manifest is reported and skipped
    df = pd.read_csv(manifest)
    df.loc[len(df)] = {"patient_id": "px", "path": "images/missing.png", "label": "normal", "source": "a",
                       "split": "test", "mask_path": ""}
    df.to_csv(manifest, index=False)
    out = tmp_path / "audit"
    rc = main(["audit-model", "--model", str(ckpt), "--data", str(manifest), "--split", "all", "--out", str(out),
               "--bootstrap", "20", "--examples", "2", "--seg-model", "none"])
    captured = capsys.readouterr()
    assert rc == 1 and "missing.png" in captured.err  # the missing file fails the run, the rest is audited
    rep = json.loads((out / "audit.json").read_text())
    assert rep["overall"]["n"] == 9 and len(rep["per_image"]) == 9
    assert rep["mask_sources"] == {"manifest": 6, "none": 3} and rep["images_without_mask"] == 3
    for r in rep["per_image"]:
        assert set(r) >= {"gradcam_in_lungs", "lrp_in_lungs", "text_delta_border", "p_pred_lung_only",
                          "text_delta_detected"}
        # the fixture burns a label into every even-numbered image
        assert (r["text_detected_share"] > 0) == r["file"].endswith(("0.png", "2.png", "4.png", "6.png", "8.png"))
        if r["mask_source"] == "manifest":
            assert 0 < r["lung_area"] < 1
            assert 0 <= r["gradcam_in_lungs"] <= 1 or np.isnan(r["gradcam_in_lungs"])
        else:
            assert r["pred_lung_only"] == -1
    assert {g["label"] for g in rep["per_class"]} == set(CLASSES)
    assert {g["source"] for g in rep["per_source"]} == {"a", "b"}
    m = rep["metrics"]["images_with_lung_mask"]
    assert "ci95" in m["original"]["accuracy"] and "diff_ci95" in m["lung_only"]["accuracy"]
    md = (out / "audit.md").read_text()
    assert "Relevance inside the lungs" in md and "Text sensitivity" in md and "](examples/" in md
    for e in rep["examples"]:
        assert (out / e["overlay"]).is_file()
    assert len(pd.read_csv(out / "per_image.csv")) == 9


def test_audit_uses_segmenter_without_masks(setup, tmp_path):
    from covidcxr.explain.audit import audit_model
    from covidcxr.segment import train_segmenter

    root, manifest, ckpt = setup
    seg = train_segmenter(manifest, tmp_path / "seg", size=32, epochs=1, batch_size=4, base=4, depth=2, max_steps=1)
    rep = audit_model(ckpt, manifest, split="test", out=tmp_path / "a", seg_model=seg["checkpoint"],
                      methods=["gradcam"], bootstrap=0, examples=0)
    assert sum(rep["mask_sources"].values()) == rep["overall"]["n"]
    # test split: img00 and img03 have manifest masks, img06 has none -> segmenter
    assert rep["mask_sources"].get("manifest") == 2
    assert sum(v for k, v in rep["mask_sources"].items() if k.startswith("segmenter")) == 1


def test_audit_rejects_unknown_split(setup, tmp_path):
    from covidcxr.data import ManifestError
    from covidcxr.explain.audit import audit_model

    _, manifest, ckpt = setup
    with pytest.raises(ManifestError, match="no images in split"):
        audit_model(ckpt, manifest, split="holdout", out=tmp_path)
