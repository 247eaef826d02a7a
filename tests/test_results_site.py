"""scripts/results_site.py: the local manifest, the leak check on the parent, and the doc block."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest
import torch

from covidcxr.models.checkpoint import FORMAT


def _script():
    spec = importlib.util.spec_from_file_location("results_site", Path(__file__).parents[1] / "scripts" / "results_site.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _manifest(path: Path, rows: list[tuple[str, str, str, str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["path", "label", "patient_id", "source", "split"]).to_csv(path, index=False)
    return path


def test_local_manifest_takes_the_held_out_source_only_with_absolute_paths(tmp_path: Path) -> None:
    rs = _script()
    runs = tmp_path / "runs"
    _manifest(runs / "holdout" / "manifest.csv", [
        ("img/a1.png", "normal", "p1", "actualmed", "test"), ("img/a2.png", "COVID-19", "p2", "actualmed", "test"),
        ("img/c1.png", "COVID-19", "p2", "cohen", "test"),  # a linked image of another source: not local
        ("img/n1.png", "normal", "p3", "nih", "train")])
    rows = rs.local_manifest(runs, runs / "site" / "actualmed.csv")
    written = pd.read_csv(runs / "site" / "actualmed.csv", dtype=str)
    assert list(rows["patient_id"]) == ["p1", "p2"] and list(written.columns) == ["path", "label", "patient_id", "source"]
    assert all(Path(p).is_absolute() and Path(p).parent == (runs / "holdout" / "img").resolve() for p in written["path"])


def test_a_parent_that_trained_on_the_local_films_is_counted(tmp_path: Path) -> None:
    rs = _script()
    local = pd.DataFrame({"path": [str(tmp_path / "a1.png"), str(tmp_path / "a2.png")]})
    clean = _manifest(tmp_path / "clean.csv", [(str(tmp_path / "x.png"), "normal", "q", "nih", "train"),
                                               (str(tmp_path / "a1.png"), "normal", "p1", "actualmed", "test")])
    leaky = _manifest(tmp_path / "leaky.csv", [("a1.png", "normal", "p1", "actualmed", "val"),  # relative path
                                               ("a2.png", "COVID-19", "p2", "actualmed", "train")])
    counts = {}
    for name, man in (("clean", clean), ("leaky", leaky)):
        ck = tmp_path / f"{name}.ckpt"
        torch.save({"format": FORMAT, "training": {"manifest": str(man)}}, ck)
        counts[name] = rs.actualmed_in_training(ck, local)
    assert counts == {"clean": 0, "leaky": 2}


def test_fill_replaces_only_the_site_block(tmp_path: Path) -> None:
    rs = _script()
    doc = tmp_path / "results.md"
    doc.write_text(f"before\n{rs.BEGIN}\nold\n{rs.END}\nafter\n")
    rs.fill(doc, "new table\n")
    assert doc.read_text() == f"before\n{rs.BEGIN}\nnew table\n{rs.END}\nafter\n"
    doc.write_text("no markers\n")
    with pytest.raises(SystemExit, match="no .* block to replace"):
        rs.fill(doc, "x\n")
