"""scripts/results_federated_tables.py: rows for every expected model, the targets as stated, the doc block."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd

CLASSES = ["normal", "pneumonia", "COVID-19"]


def _script():
    spec = importlib.util.spec_from_file_location(
        "results_federated_tables", Path(__file__).parents[1] / "scripts" / "results_federated_tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _report(runs: Path, mid: str, quality: float, seed: int) -> float:
    """An evaluate metrics.json for model ``mid`` whose COVID-19 scores separate the classes by ``quality``;
    returns its COVID-19 AUC."""
    from covidcxr.evaluate import evaluate_predictions

    rng = np.random.default_rng(seed)
    labels = ["normal"] * 10 + ["pneumonia"] * 10 + ["COVID-19"] * 10
    frame = pd.DataFrame({"label": labels, "patient_id": [f"p{i}" for i in range(30)], "path": [f"{i}.png" for i in range(30)],
                          "source": ["nih"] * 20 + ["cohen"] * 10})
    covid = np.array([lab == "COVID-19" for lab in labels]) * quality + rng.random(30)
    probs = np.stack([np.ones(30), np.ones(30), 1 + 2 * covid], 1)
    probs = probs / probs.sum(1, keepdims=True)
    res = evaluate_predictions(frame, probs, CLASSES, n_boot=20)
    rep = runs / "split" / f"{mid}-report"
    rep.mkdir(parents=True)
    (rep / "metrics.json").write_text(json.dumps(res, default=float))
    return res["metrics"]["per_class"]["COVID-19"]["auc"]["value"]


def _runs(tmp_path: Path, quality: dict[str, float]) -> tuple[Path, dict[str, float]]:
    runs = tmp_path / "runs"
    (runs / "split").mkdir(parents=True)
    pd.DataFrame({"patient_id": ["a", "b", "c"], "path": ["1", "2", "3"], "label": ["normal", "COVID-19", "COVID-19"],
                  "source": ["nih", "cohen", "hannover"], "split": ["train", "train", "train"]}
                 ).to_csv(runs / "split" / "manifest.csv", index=False)
    aucs = {mid: _report(runs, mid, q, i) for i, (mid, q) in enumerate(quality.items())}
    (runs / "status.tsv").write_text("".join(f"split\t{m}\tok\n" for m in quality)
                                     + "split\tlocal-hannover\tfailed: no val rows\n")
    (runs / "run.json").write_text(json.dumps({"size": 64, "rounds": 3, "local_epochs": 1, "settings": "split"}))
    fed = runs / "split" / "fedavg"
    fed.mkdir()
    (fed / "history.json").write_text(json.dumps({"rounds_log": [
        {"wall_s": 60, "bytes_sent": 45.4e6, "bytes_received": 45.4e6},
        {"wall_s": 80, "bytes_sent": 45.4e6, "bytes_received": 45.4e6}]}))
    return runs, aucs


def test_every_expected_model_has_a_row_and_missing_ones_say_why(tmp_path: Path) -> None:
    rt = _script()
    runs, aucs = _runs(tmp_path, {"central": 1.0, "local-nih": 0.2, "local-cohen": 0.3, "fedavg": 1.0})
    text = rt.build(runs)
    split = text[text.index("#### Patient-level split"):text.index("#### Source hold-out")]
    rows = {line.split(" | ")[0].strip("| "): line for line in split.splitlines() if line.startswith("| ")}
    assert f"{aucs['fedavg']:.3f}" in rows["FedAvg"] and "70 s / 45.4 / 45.4" in rows["FedAvg"]
    assert "failed: no val rows" in rows["local only: hannover"]  # a failed site keeps its reason
    assert "not run (the run stopped before it)" in rows["FedBN"]  # an interrupted run: the rest say so
    assert "not run (left out of SETTINGS)" in text[text.index("#### Source hold-out"):]
    # target 2 undecided while a local-only model has no result
    assert "local-only model on the pooled test split (COVID-19 AUC): undecided" in text


def test_targets_are_met_or_missed_from_the_figures(tmp_path: Path) -> None:
    rt = _script()
    runs, aucs = _runs(tmp_path, {"central": 1.5, "local-nih": 0.0, "local-cohen": 0.1, "local-hannover": 0.0,
                                  "fedavg": 1.5, "fedbn": 0.0})
    (runs / "status.tsv").write_text("".join(f"split\t{m}\tok\n" for m in aucs))
    text = rt.build(runs)
    t1 = next(line for line in text.splitlines() if line.startswith("1. "))
    assert ("**FedAvg or FedBN within 0.02 COVID-19 AUC of centralised (patient split): met**" in t1) == (
        max(aucs["fedavg"], aucs["fedbn"]) >= aucs["central"] - 0.02)
    t2 = next(line for line in text.splitlines() if line.startswith("2. "))
    fed = min(aucs["fedavg"], aucs["fedbn"])
    loc = max(v for k, v in aucs.items() if k.startswith("local-"))
    assert (": met**" in t2) == (fed > loc) and (": missed**" in t2) == (fed <= loc)


def test_doc_block_is_replaced_and_a_doc_without_markers_is_one_line(tmp_path: Path, capsys) -> None:
    rt = _script()
    runs, _ = _runs(tmp_path, {"central": 1.0})
    doc = tmp_path / "federated.md"
    doc.write_text(f"intro\n{rt.BEGIN}\nOLD-BLOCK\n{rt.END}\noutro\n")
    assert rt.main([str(runs), "--doc", str(doc)]) == 0
    body = doc.read_text()
    assert body.startswith("intro\n") and body.endswith("outro\n") and "OLD-BLOCK" not in body and "#### Targets" in body
    bad = tmp_path / "plain.md"
    bad.write_text("no markers\n")
    assert rt.main([str(runs), "--doc", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(bad) in err and "\n" not in err


def test_a_named_block_is_filled_and_the_default_block_beside_it_is_kept(tmp_path: Path) -> None:
    rt = _script()
    runs, _ = _runs(tmp_path, {"central": 1.0})
    doc = tmp_path / "federated.md"
    doc.write_text(f"{rt.BEGIN}\nFIRST-RUN\n{rt.END}\n<!-- longer:begin -->\nOLD\n<!-- longer:end -->\n")
    assert rt.main([str(runs), "--doc", str(doc), "--block", "longer"]) == 0
    body = doc.read_text()
    assert "FIRST-RUN" in body and "OLD" not in body
    assert "#### Targets" in body.split("<!-- longer:begin -->")[1]
