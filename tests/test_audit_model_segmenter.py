"""audit-model's lung masks: the pretrained segmenter by default, which segmenter made each mask, the
mask cache (an image is never segmented twice), a named segmenter that fails is an error, a progress bar."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch

from _explain_fixtures import CLASSES, make_dataset
from covidcxr import models
from covidcxr.preprocess import get_preset


@pytest.fixture()
def setup(tmp_path, weights_dir, monkeypatch):
    monkeypatch.setenv("COVIDCXR_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("COVIDCXR_LUNG_MODEL", raising=False)
    root = tmp_path / "data"
    manifest = make_dataset(root, n=6, with_masks=3)
    df = pd.read_csv(manifest)
    df["split"] = "test"
    # the same picture under a second name: its mask must come from the cache, not a second run
    shutil.copy(root / "images" / "img04.png", root / "images" / "img04_copy.png")
    df.loc[len(df)] = {**df.iloc[4].to_dict(), "path": "images/img04_copy.png", "patient_id": "p4"}
    df.to_csv(manifest, index=False)
    ckpt = tmp_path / "r18.ckpt"
    torch.manual_seed(0)
    models.save(ckpt, models.build("resnet18", num_classes=3), arch="resnet18", classes=CLASSES,
                preset=get_preset("chexnet", size=64))
    return manifest, ckpt


def test_audit_uses_pretrained_segmenter_by_default_and_caches(setup, tmp_path, capsys):
    from covidcxr.cli import main

    manifest, ckpt = setup
    out = tmp_path / "a1"
    rc = main(["audit-model", "--model", str(ckpt), "--data", str(manifest), "--split", "test", "--out", str(out),
               "--methods", "gradcam", "--bootstrap", "0", "--examples", "0"])
    err = capsys.readouterr().err
    assert rc == 0
    assert "audit-model" in err and "img" in err  # the tqdm progress bar on stderr
    rep = json.loads((out / "audit.json").read_text())
    assert rep["segmenter"]["segmenter"] == "lung-unet-vgg11" and "(default)" in rep["segmenter"]["note"]
    per = {r["file"].rsplit("/", 1)[-1]: r["mask_source"] for r in rep["per_image"]}
    assert per["img00.png"] == "manifest"
    assert per["img04.png"].startswith("segmenter lung-unet-vgg11@512")
    assert per["img04_copy.png"] == per["img04.png"]
    # images 3, 4, 5 and the copy of 4 had no manifest mask: three distinct pictures were segmented
    assert rep["segmenter"]["images_segmented"] == 3
    assert "lung-unet-vgg11" in (out / "audit.md").read_text()
    # a second audit finds every mask in the on-disk cache
    rc = main(["audit-model", "--model", str(ckpt), "--data", str(manifest), "--split", "test", "--out",
               str(tmp_path / "a2"), "--methods", "gradcam", "--bootstrap", "0", "--examples", "0", "--no-progress"])
    assert rc == 0 and "audit-model:" not in capsys.readouterr().err
    rep2 = json.loads((tmp_path / "a2" / "audit.json").read_text())
    assert rep2["segmenter"]["images_segmented"] == 0
    assert [r["lung_area"] for r in rep2["per_image"]] == [r["lung_area"] for r in rep["per_image"]]


def test_audit_named_segmenter_missing_is_an_error(setup, tmp_path, capsys):
    from covidcxr.cli import main

    manifest, ckpt = setup
    rc = main(["audit-model", "--model", str(ckpt), "--data", str(manifest), "--out", str(tmp_path / "o"),
               "--seg-model", str(tmp_path / "nope.pt"), "--bootstrap", "0"])
    err = capsys.readouterr().err
    assert rc != 0 and "nope.pt" in err and "Traceback" not in err
