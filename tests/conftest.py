"""Shared test fixtures. Real data comes from ../shared/data and tests skip clearly without it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# COVIDCXR_SHARED names the shared folder (holding data/ and weights/); a path to its data/ works too.
SHARED = Path(os.environ.get("COVIDCXR_SHARED", REPO.parent / "shared"))
SHARED = SHARED / "data" if (SHARED / "data").is_dir() or not (
    SHARED.name == "data" or (SHARED / "covid-cxr-dev").is_dir()) else SHARED
DEV = SHARED / "covid-cxr-dev"

# Keep every test single-threaded per worker: pytest-xdist runs two workers on two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared data not found at {SHARED} (set COVIDCXR_SHARED to the shared folder holding data/ "
                    "and weights/, or place it as ../shared beside the repo)")
    return SHARED


@pytest.fixture(scope="session")
def dev_dir(shared_dir: Path) -> Path:
    if not (DEV / "metadata.csv").is_file():
        pytest.skip(f"dev set not found at {DEV}")
    return DEV


@pytest.fixture(scope="session")
def samples_dir(shared_dir: Path) -> Path:
    d = shared_dir / "samples"
    if not d.is_dir():
        pytest.skip(f"sample files not found at {d}")
    return d


@pytest.fixture(scope="session")
def dev_manifest(dev_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared dev set built into a split manifest once per session (seed 62)."""
    from covidcxr.data import build_manifest

    out = tmp_path_factory.mktemp("devset")
    build_manifest(sources=[("csv", str(dev_dir / "metadata.csv"))], out=out, seed=62)
    return out / "manifest.csv"


WEIGHTS = Path(os.environ.get("COVIDCXR_WEIGHTS_DIR", SHARED.parent / "weights"))
# Every test sees the same weights (or none): set once here, not by whichever test ran first, so that
# a test's outcome (the plausibility gate uses the lung U-Net) never depends on the order of the run.
if (WEIGHTS / "README.md").is_file():
    os.environ.setdefault("COVIDCXR_WEIGHTS_DIR", str(WEIGHTS))


@pytest.fixture(scope="session")
def weights_dir() -> Path:
    """../shared/weights, exported as COVIDCXR_WEIGHTS_DIR for the code under test."""
    if not (WEIGHTS / "README.md").is_file():
        pytest.skip(f"pretrained weights not found at {WEIGHTS} (set COVIDCXR_WEIGHTS_DIR)")
    os.environ["COVIDCXR_WEIGHTS_DIR"] = str(WEIGHTS)
    return WEIGHTS
