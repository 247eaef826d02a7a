"""Issue 11 §5: the newcomer path — shared folder resolution, offline demo, install stamp."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _make(*args: str, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("COVIDCXR_SHARED", "SHARED", "DATA", "MAKEFLAGS")}
    e.update(env or {})
    return subprocess.run(["make", "--no-print-directory", *args], cwd=cwd, env=e, capture_output=True, text=True,
                          timeout=60)


def _demo_line(out: str) -> str:
    return next(ln for ln in out.splitlines() if "scripts/demo.sh" in ln)


@needs_make
@pytest.mark.parametrize("given", ["{root}", "{root}/data"])
def test_make_demo_follows_covidcxr_shared(tmp_path: Path, given: str) -> None:
    """COVIDCXR_SHARED names the shared folder; a path to its data/ folder means the same."""
    root = tmp_path / "elsewhere" / "shared"
    (root / "data" / "covid-cxr-dev").mkdir(parents=True)
    (root / "weights").mkdir()
    r = _make("-n", "demo", env={"COVIDCXR_SHARED": given.format(root=root)})
    line = _demo_line(r.stdout)
    assert f'COVIDCXR_SHARED="{root}"' in line and f'"{root}/data/covid-cxr-dev"' in line, line


@needs_make
def test_make_demo_defaults_to_shared_beside_the_checkout() -> None:
    line = _demo_line(_make("-n", "demo").stdout)
    assert 'COVIDCXR_SHARED="../shared"' in line and '"../shared/data/covid-cxr-dev"' in line, line


def test_demo_offline_without_data_is_one_line(tmp_path: Path) -> None:
    """No shared folder and no network: one line naming what is missing and COVIDCXR_SHARED, no git error."""
    fake = tmp_path / "bin"
    fake.mkdir()
    git = fake / "git"  # behaves like git with no network
    git.write_text("#!/bin/sh\necho \"fatal: unable to access 'https://github.com/x/': Could not resolve host: "
                   "github.com\" >&2\nexit 128\n")
    git.chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", COVIDCXR_SHARED=str(tmp_path / "nowhere"))
    r = subprocess.run(["bash", "scripts/demo.sh", "", str(tmp_path / "out")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1, r.stderr
    assert "COVIDCXR_SHARED" in err[0] and str(tmp_path / "nowhere") in err[0] and "DATA=" in err[0]
    assert "Could not resolve host" not in r.stderr + r.stdout


@needs_make
def test_install_stamp_follows_content_not_file_time(tmp_path: Path) -> None:
    """A fresh clone (new file times) beside a current venv is up to date; a dependency edit is not."""
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    venv = tmp_path / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").symlink_to(shutil.which("python3") or "/usr/bin/python3")
    stamp = next(ln.split()[1] for ln in _make("-n", "-p", "install", cwd=tmp_path).stdout.splitlines()
                 if ln.startswith("STAMP :="))
    (tmp_path / stamp).touch()
    os.utime(tmp_path / "pyproject.toml")  # the clone's checkout time: newer than the stamp
    assert _make("-q", "install", cwd=tmp_path).returncode == 0  # nothing to do: pip is not re-run
    with open(tmp_path / "pyproject.toml", "a") as fh:
        fh.write("\n# a new dependency\n")
    assert _make("-q", "install", cwd=tmp_path).returncode != 0  # content changed: install runs


def test_shared_module_accepts_both_meanings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from covidcxr import shared

    root = tmp_path / "s"
    (root / "data" / "covid-cxr-dev").mkdir(parents=True)
    for given in (root, root / "data"):
        monkeypatch.setenv("COVIDCXR_SHARED", str(given))
        assert shared.shared_folder() == root and shared.data_dir() == root / "data"
    monkeypatch.delenv("COVIDCXR_WEIGHTS_DIR", raising=False)
    assert shared.weights_dir() == root / "weights"
    assert "COVIDCXR_SHARED" in shared.missing_message()
