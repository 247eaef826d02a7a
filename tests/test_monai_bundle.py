"""`covidcxr export --monai-bundle`: MONAI's own checks pass offline, MONAI's ConfigParser runs the bundle to
the same probabilities as `covidcxr predict`, and presets MONAI transforms cannot express are refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("monai", reason="the monai extra is not installed (pip install 'covidcxr[monai]')")
from covidcxr import reference_models as rm  # noqa: E402

needs_reference = pytest.mark.skipif(not rm.weights_file("reference").is_file(), reason="no reference weights")


def _images(dev_dir: Path, samples_dir: Path) -> list[str]:
    # dev-set JPEGs of different sizes (non-integer INTER_AREA scales), NIH's 8-bit PNG and a PadChest JPEG
    dev = sorted((dev_dir / "images").iterdir())
    return [str(dev[0]), str(dev[len(dev) // 2]), str(samples_dir / "nih-00000001_000.png"),
            str(samples_dir / "padchest-16747_3_1.jpg")]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    if not rm.weights_file("reference").is_file():
        pytest.skip("no reference weights")
    from covidcxr.bundle import export_bundle

    out = tmp_path_factory.mktemp("bundle") / "covidcxr_reference"
    export_bundle("reference", out)  # parity is checked below against `covidcxr predict` itself
    return out


def _monai(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "no_proxy": "*", "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    return subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=600)


@needs_reference
def test_layout_and_metadata_names_image_and_pred(bundle):
    for f in ("configs/metadata.json", "configs/inference.json", "models/model.ts", "docs/README.md"):
        assert (bundle / f).is_file(), f
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    fmt = meta["network_data_format"]
    assert list(fmt["inputs"]) == ["image"] and list(fmt["outputs"]) == ["pred"]
    assert fmt["outputs"]["pred"]["channel_def"] == {"0": "normal", "1": "pneumonia", "2": "COVID-19"}
    readme = (bundle / "docs/README.md").read_text()
    assert "Intended use" in readme and "research use only" in readme


@needs_reference
def test_verify_metadata_passes_offline_with_the_shipped_schema(bundle):
    from covidcxr.bundle import SCHEMA_FILE

    # the proxy variables point nowhere: a download attempt would fail the command
    r = _monai(["verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", str(SCHEMA_FILE)], bundle)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "metadata is verified with no error" in r.stdout + r.stderr


@needs_reference
def test_verify_metadata_rejects_a_broken_file(bundle, tmp_path):
    from covidcxr.bundle import SCHEMA_FILE

    meta = json.loads((bundle / "configs/metadata.json").read_text())
    del meta["network_data_format"]
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    r = _monai(["verify_metadata", "--meta_file", str(tmp_path / "metadata.json"), "--filepath", str(SCHEMA_FILE)],
               tmp_path)
    assert r.returncode != 0 and "network_data_format" in r.stdout + r.stderr


@needs_reference
def test_verify_net_in_out_passes(bundle):
    r = _monai(["verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json", "--config_file",
                "configs/inference.json", "--bundle_root", str(bundle), "--device", "cpu"], bundle)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "data shape of network is verified with no error" in r.stdout + r.stderr


@needs_reference
def test_monai_config_parser_gives_covidcxr_predicts_probabilities(bundle, dev_dir, samples_dir, tmp_path):
    from covidcxr.bundle import bundle_probabilities
    from covidcxr.cli import main

    images = _images(dev_dir, samples_dir)
    out = tmp_path / "p.jsonl"
    assert main(["predict", *images, "--model", "reference", "--no-plausibility", "-q", "--out", str(out)]) == 0
    recs = {r["path"]: r for r in map(json.loads, out.read_text().splitlines())}
    want = np.array([[recs[f]["probabilities"][c] for c in ("normal", "pneumonia", "COVID-19")] for f in images])
    got = bundle_probabilities(bundle, images)  # monai.bundle.ConfigParser on configs/inference.json
    assert got.shape == want.shape
    assert np.max(np.abs(got - want)) <= 1e-4


@pytest.mark.parametrize("preset,words", [("cxnet", "channel stack"), ("cxnet-lungcrop", "lung segmenter")])
def test_presets_monai_cannot_express_are_refused_in_one_line(tmp_path, capsys, preset, words):
    from covidcxr import models
    from covidcxr.cli import main
    from covidcxr.preprocess import get_preset

    ckpt = tmp_path / "m.ckpt"
    models.save(ckpt, models.build("resnet18", num_classes=3), classes=["normal", "pneumonia", "COVID-19"],
                preset=get_preset(preset))
    assert main(["export", "--model", str(ckpt), "--monai-bundle", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err and preset in err
    assert not (tmp_path / "b").exists()


def test_clahe_step_is_named():
    from covidcxr.bundle import BundleError, preprocessing
    from covidcxr.preprocess import Preset

    with pytest.raises(BundleError, match="CLAHE"):
        preprocessing(Preset("imagenet", size=64, clahe_clip=2.0))
