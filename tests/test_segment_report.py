"""scripts/segment_report.py's dice step: patient-bootstrap Dice per segmenter, and a re-run of one
segmenter keeps the other segmenters' rows (the docs' Dice table is assembled over several runs)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd

from _explain_fixtures import make_dataset
from covidcxr.segment import train_segmenter

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "segment_report.py"


def _script():
    spec = importlib.util.spec_from_file_location("segment_report", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dice_step_keeps_rows_of_segmenters_not_rerun(tmp_path):
    manifest = make_dataset(tmp_path / "data", n=9)
    ckpt = train_segmenter(manifest, tmp_path / "seg", size=32, epochs=1, batch_size=4, base=4, depth=2,
                           max_steps=1)["checkpoint"]
    out = tmp_path / "report"
    out.mkdir()
    pd.DataFrame([{"segmenter": "pretrained", "path": "x.png", "patient_id": "p", "dice": 0.5},
                  {"segmenter": "scratch", "path": "old.png", "patient_id": "p", "dice": 0.1}]).to_csv(
        out / "dice.csv", index=False)
    (out / "dice.json").write_text(json.dumps({"pretrained": {"mean": 0.5}}))
    assert _script().main(["--manifest", str(manifest), "--scratch", ckpt, "--out", str(out),
                           "--steps", "dice", "--segmenters", "scratch"]) == 0
    rows = pd.read_csv(out / "dice.csv")
    n_test = int((pd.read_csv(manifest)["split"] == "test").sum())
    assert (rows["segmenter"] == "pretrained").sum() == 1  # kept
    assert "old.png" not in set(rows["path"]) and (rows["segmenter"] == "scratch").sum() == n_test  # replaced
    d = json.loads((out / "dice.json").read_text())
    assert d["pretrained"] == {"mean": 0.5} and d["scratch"]["n"] == n_test
    assert d["scratch"]["ci_method"] == "bootstrap over patients" and 0 <= d["scratch"]["mean"] <= 1
