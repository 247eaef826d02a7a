"""The weights catalogue: lookup order, checksum refusal, missing files, provenance."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from covidcxr.models import catalog
from covidcxr.models.catalog import WeightsError


@pytest.fixture()
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty weights dir and an empty torch hub dir, so nothing real is found."""
    import torch.hub

    monkeypatch.setenv(catalog.ENV_DIR, str(tmp_path / "w"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    (tmp_path / "w").mkdir()
    return tmp_path / "w"


def test_every_entry_names_checksum_preset_and_licence() -> None:
    from covidcxr.preprocess import get_preset

    for e in catalog.CATALOG.values():
        assert len(e.sha256) == 64 and e.size > 0
        assert e.license and e.trained_on and e.source_url
        if e.kind == "classifier":
            get_preset(e.preset)  # the preset it needs exists


def test_missing_file_is_one_line(isolated: Path) -> None:
    with pytest.raises(WeightsError) as err:
        catalog.resolve("mobilenet_v2-imagenet")
    msg = str(err.value)
    assert "\n" not in msg and "mobilenet_v2-imagenet-features.pth" in msg and catalog.ENV_DIR in msg


def test_wrong_checksum_is_refused(isolated: Path) -> None:
    e = catalog.get_entry("mobilenet_v2-imagenet")
    (isolated / e.filename).write_bytes(b"\0" * e.size)  # right size, wrong bytes
    with pytest.raises(WeightsError, match="sha256"):
        catalog.resolve(e.name)


def test_truncated_file_is_refused(isolated: Path) -> None:
    e = catalog.get_entry("mobilenet_v2-imagenet")
    (isolated / e.filename).write_bytes(b"\0" * 100)
    with pytest.raises(WeightsError, match="truncated"):
        catalog.resolve(e.name)


def test_unknown_name() -> None:
    with pytest.raises(WeightsError, match="catalogue"):
        catalog.get_entry("resnet-imaginary")


def test_status_reports_missing(isolated: Path) -> None:
    rows = {r["name"]: r for r in catalog.status()}
    assert set(rows) == set(catalog.CATALOG)
    for name, r in rows.items():
        if catalog.is_shipped(catalog.get_entry(name)):  # the reference models travel inside the package
            assert r["status"] == "ok", r
        else:
            assert r["status"] == "missing" and r["path"] is None, r


def test_real_files_verify(weights_dir: Path) -> None:
    rows = {r["name"]: r for r in catalog.status()}
    from covidcxr.reference_models import REFERENCE_DIR

    for name, row in rows.items():
        assert row["status"] == "ok", row
        # downloaded weights are found in the weights folder; the shipped reference models inside the package
        home = REFERENCE_DIR if catalog.is_shipped(catalog.get_entry(name)) else weights_dir
        assert Path(row["path"]).parent.resolve() == Path(home).resolve()
    p = catalog.resolve("lung-unet-vgg11")
    assert p.name == "lung-unet-vgg11-fp16.pth"
    prov = catalog.provenance("lung-unet-vgg11")
    assert prov["sha256"] == catalog.get_entry("lung-unet-vgg11").sha256


def test_copied_real_file_found_in_second_dir(weights_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import os

    e = catalog.get_entry("mobilenet_v2-imagenet")
    other = tmp_path / "copy"
    other.mkdir()
    shutil.copy(weights_dir / e.filename, other / e.filename)
    monkeypatch.setenv(catalog.ENV_DIR, os.pathsep.join([str(tmp_path / "empty"), str(other)]))
    assert catalog.resolve(e.name) == other / e.filename
