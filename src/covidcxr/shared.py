"""Where the shared folder is: real chest X-rays (``data/``) and pretrained weights (``weights/``).

``COVIDCXR_SHARED`` names the shared folder, the one that holds ``data/`` and ``weights/``. For
compatibility a path to its ``data/`` folder is accepted too (older docs and the test suite used
that meaning). Without the variable, ``../shared`` beside the checkout is used (the current
directory's parent first, then the source tree's). The Makefile and ``scripts/demo.sh`` follow the
same rule.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "COVIDCXR_SHARED"


def _normalise(p: Path) -> Path:
    """A path to the shared folder, given either the folder or its ``data/`` sub-folder."""
    if (p / "data").is_dir() or (p / "weights").is_dir():
        return p
    if p.name == "data" or (p / "covid-cxr-dev").is_dir():
        return p.parent
    return p


def shared_folder() -> Path:
    """The shared folder (it may not exist: callers say so, naming this path and ``COVIDCXR_SHARED``)."""
    env = os.environ.get(ENV)
    if env:
        return _normalise(Path(env).expanduser())
    here = Path(__file__).resolve()
    candidates = [Path.cwd().parent / "shared"]
    if len(here.parents) > 3:
        candidates.append(here.parents[3] / "shared")  # src/covidcxr/shared.py -> <checkout>/../shared
    for c in candidates:
        if c.is_dir():
            return c
    return candidates[-1]


def data_dir() -> Path:
    """``<shared>/data``: the real data sets (covid-cxr-dev, samples, ...)."""
    return shared_folder() / "data"


def weights_dir() -> Path:
    """``$COVIDCXR_WEIGHTS_DIR``, else ``<shared>/weights``."""
    env = os.environ.get("COVIDCXR_WEIGHTS_DIR")
    return Path(env).expanduser() if env else shared_folder() / "weights"


def missing_message(what: str = "the shared data") -> str:
    """One line for a missing shared folder: what is missing and how to point at it."""
    return (f"{what} not found at {data_dir()}: set COVIDCXR_SHARED to the shared folder that holds data/ and "
            "weights/ (or place it as ../shared beside the checkout)")
