"""Per-group figures (source x class table, worst-group sensitivity, non-dominant-source specificity,
source-concentration warnings): expectations computed independently of covidcxr.evaluate.groups."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covidcxr.evaluate.groups import (
    group_report,
    group_table,
    non_dominant_specificity,
    source_warnings,
    training_dominant_sources,
    worst_group_sensitivity,
)

CLASSES = ["normal", "pneumonia", "COVID-19"]
N, P, C = 0, 1, 2


def _frame(rows: list[tuple[str, int, int, int]]) -> pd.DataFrame:
    """(source, true, predicted, n images) -> one row per image, one patient per image."""
    out = []
    for src, t, p, n in rows:
        out += [{"source": src, "y": t, "pred": p} for _ in range(n)]
    df = pd.DataFrame(out)
    df["patient"] = [f"p{i}" for i in range(len(df))]
    return df


def test_group_table_matches_a_groupby_on_random_data() -> None:
    rng = np.random.default_rng(3)
    n = 300
    df = pd.DataFrame({"source": rng.choice(["nih", "cohen", "actualmed"], n), "y": rng.integers(0, 3, n),
                       "pred": rng.integers(0, 3, n), "patient": rng.integers(0, 120, n).astype(str)})
    rows = group_table(df["y"], df["pred"], df["source"], df["patient"], CLASSES, n_boot=200)
    expected = df.assign(hit=df["y"] == df["pred"]).groupby(["source", "y"]).agg(
        n=("hit", "size"), sens=("hit", "mean"), pats=("patient", "nunique"))
    assert len(rows) == len(expected)
    for r in rows:
        e = expected.loc[(r["source"], CLASSES.index(r["class"]))]
        assert r["n_images"] == e["n"] and r["n_patients"] == e["pats"]
        assert r["sensitivity"]["value"] == pytest.approx(e["sens"])
        assert r["n_correct"] == round(e["sens"] * e["n"])
        s = r["sensitivity"]
        assert 0 <= s["ci_low"] <= s["value"] <= s["ci_high"] <= 1
    # rows come sorted by source, then in class order
    assert [(r["source"], CLASSES.index(r["class"])) for r in rows] == sorted(
        (r["source"], CLASSES.index(r["class"])) for r in rows)


def test_every_replicate_holds_every_cell() -> None:
    """Stratified by cell: a 3-patient cell among 60 patients is in all replicates (unstratified: ~5 % miss it)."""
    y = [N] * 57 + [C] * 3
    src = ["nih"] * 57 + ["cohen"] * 3
    rows = group_table(y, [N] * 60, src, [f"p{i}" for i in range(60)], CLASSES, n_boot=500)
    assert all(r["sensitivity"]["n_replicates"] == 500 for r in rows)


def test_bootstrap_resamples_patients_not_images() -> None:
    """Patient A: 9 images all right; patient B: 1 image wrong. Resampling patients draws B twice in a
    quarter of the replicates (sensitivity 0); resampling images would keep the CI near 0.9."""
    y = [N] * 10
    pred = [N] * 9 + [C]
    pats = ["A"] * 9 + ["B"]
    rows = group_table(y, pred, ["nih"] * 10, pats, CLASSES, n_boot=400, seed=1)
    s = rows[0]["sensitivity"]
    assert s["value"] == pytest.approx(0.9) and s["n_patients"] == 2
    assert s["ci_low"] == 0.0 and s["ci_high"] == 1.0


def test_worst_group_names_the_lowest_cell_with_enough_images() -> None:
    df = _frame([("nih", N, N, 8), ("nih", N, C, 2),          # 0.8
                 ("actualmed", N, C, 4),                      # 0.0 but only 4 images: not eligible
                 ("cohen", C, C, 5), ("cohen", C, N, 5),      # 0.5 <- worst eligible
                 ("nih", P, P, 6)])                           # 1.0
    wg = worst_group_sensitivity(df["y"], df["pred"], df["source"], df["patient"], CLASSES, n_boot=300)
    assert (wg["source"], wg["class"], wg["cell"]) == ("cohen", "COVID-19", "COVID-19 from cohen")
    assert wg["value"] == pytest.approx(0.5) and wg["n_images"] == 10
    assert wg["n_eligible_cells"] == 3 and wg["n_cells"] == 4
    # the CI is that of the minimum over the eligible cells: never above the worst cell's own upper bound
    cell = next(r for r in group_table(df["y"], df["pred"], df["source"], df["patient"], CLASSES, n_boot=300)
                if r["source"] == "cohen")
    assert wg["ci_low"] <= 0.5 <= wg["ci_high"] <= cell["sensitivity"]["ci_high"] + 1e-12
    # with min_images 4 the actualmed cell competes and wins
    wg4 = worst_group_sensitivity(df["y"], df["pred"], df["source"], df["patient"], CLASSES, min_images=4, n_boot=0)
    assert wg4["cell"] == "normal from actualmed" and wg4["value"] == 0.0
    none = worst_group_sensitivity(df["y"], df["pred"], df["source"], df["patient"], CLASSES, min_images=50, n_boot=0)
    assert none["value"] is None and "50 or more" in none["note"]


def test_non_dominant_specificity_counts_films_not_called_covid() -> None:
    df = _frame([("nih", N, N, 15), ("nih", N, C, 5),                          # dominant for normal: excluded
                 ("actualmed", N, C, 4), ("actualmed", N, N, 2),               # 2 of 6 not COVID
                 ("nih", P, C, 10),                                            # dominant for pneumonia: excluded
                 ("cohen", P, N, 1), ("cohen", P, P, 1), ("cohen", P, C, 2),   # 2 of 4 not COVID
                 ("cohen", C, C, 9)])
    nd = non_dominant_specificity(df["y"], df["pred"], df["source"], df["patient"], CLASSES, n_boot=300)
    assert nd["value"] == pytest.approx(4 / 10) and nd["n_images"] == 10
    assert nd["dominant"] == {"normal": "nih", "pneumonia": "nih"}
    assert nd["per_class"]["normal"]["value"] == pytest.approx(2 / 6)
    assert nd["per_class"]["pneumonia"]["value"] == pytest.approx(2 / 4)
    assert nd["ci_low"] <= 0.4 <= nd["ci_high"]
    # a dominant source given from outside (the training split): actualmed dominant for normal
    nd2 = non_dominant_specificity(df["y"], df["pred"], df["source"], df["patient"], CLASSES, n_boot=0,
                                   dominant={"normal": "actualmed", "pneumonia": "nih"}, dominant_from="train")
    assert nd2["per_class"]["normal"]["value"] == pytest.approx(15 / 20)
    assert nd2["value"] == pytest.approx((15 + 2) / 24) and "from train" in nd2["definition"]
    # a class absent from the training data has no dominant source: all its films count
    nd3 = non_dominant_specificity(df["y"], df["pred"], df["source"], df["patient"], CLASSES, n_boot=0,
                                   dominant={"normal": "nih"})
    assert nd3["per_class"]["pneumonia"]["n_images"] == 14
    assert nd3["per_class"]["pneumonia"]["value"] == pytest.approx(2 / 14)


def test_a_source_shortcut_scores_zero() -> None:
    """'NIH or not': every non-NIH film is called COVID-19, every NIH film its true class."""
    rng = np.random.default_rng(0)
    src = rng.choice(["nih", "nih", "nih", "cohen", "actualmed"], 400)
    y = np.where(src == "nih", rng.integers(0, 2, 400), rng.choice([0, 1, 2, 2, 2], 400))
    pred = np.where(src == "nih", y, C)
    pats = np.arange(400).astype(str)
    r = group_report(y, pred, src, pats, CLASSES, n_boot=200)
    assert r["non_dominant_specificity"]["value"] == 0.0
    assert r["worst_group_sensitivity"]["value"] == 0.0
    cells = {(c["source"], c["class"]): c["sensitivity"]["value"] for c in r["table"]}
    assert cells[("nih", "normal")] == 1.0 and cells[("cohen", "COVID-19")] == 1.0
    assert cells[("cohen", "normal")] == 0.0


def test_source_warnings_at_90_percent_and_not_for_a_single_source() -> None:
    y = [N] * 20 + [C] * 10
    src = ["nih"] * 19 + ["cohen"] + ["cohen"] * 9 + ["actualmed"]
    w = source_warnings(y, src, CLASSES)
    assert [x["text"] for x in w] == [
        "class normal: 95 % from nih — sensitivity of normal may measure the source, not the disease",
        "class COVID-19: 90 % from cohen — sensitivity of COVID-19 may measure the source, not the disease"]
    assert w[0]["share"] == pytest.approx(0.95)
    # 8 of 10 COVID-19 from one source: no warning for that class
    assert [x["class"] for x in source_warnings(y, src[:20] + ["cohen"] * 8 + ["actualmed"] * 2, CLASSES)] == ["normal"]
    # one source for every class (a source hold-out): the source cannot separate the classes
    assert source_warnings(y, ["actualmed"] * 30, CLASSES) == []
    # 99.6 % is never printed as 100 %
    many = source_warnings([N] * 250, ["nih"] * 249 + ["cohen"], CLASSES)
    assert "99 % from nih" in many[0]["text"]


def test_no_source_column_gives_a_note_not_a_table() -> None:
    r = group_report([0, 1, 2], [0, 1, 2], None, ["a", "b", "c"], CLASSES, n_boot=10)
    assert r["available"] is False and "no 'source' column" in r["note"]
    r = group_report([0, 1, 2], [0, 1, 2], [None, float("nan"), ""], ["a", "b", "c"], CLASSES, n_boot=10)
    assert r["available"] is False


def test_training_dominant_sources_counts_the_train_split() -> None:
    m = pd.DataFrame({"split": ["train"] * 6 + ["test"] * 4,
                      "label": ["normal", "normal", "normal", "pneumonia", "COVID-19", "tuberculosis",
                                "normal", "normal", "normal", "normal"],
                      "source": ["nih", "nih", "cohen", "cohen", "hannover", "nih", "actualmed", "actualmed",
                                 "actualmed", "actualmed"]})
    dom, where = training_dominant_sources(m, CLASSES, "m.csv")
    assert dom == {"normal": "nih", "pneumonia": "cohen", "COVID-19": "hannover"}
    assert where == "the train split of m.csv"
    assert training_dominant_sources(m.drop(columns="source"), CLASSES)[0] is None
    assert training_dominant_sources(m[m["split"] == "test"], CLASSES)[0] is None


def test_evaluate_predictions_and_report_without_a_class(tmp_path: Path) -> None:
    """A held-out source without COVID-19 (NIH): no crash, COVID-19 AUC n/a, per-class figures computed."""
    from covidcxr.evaluate import evaluate_predictions, write_report

    rng = np.random.default_rng(5)
    n = 40
    frame = pd.DataFrame({"label": ["normal"] * 25 + ["pneumonia"] * 15, "patient_id": [f"p{i // 2}" for i in range(n)],
                          "source": "nih", "path": [f"{i}.png" for i in range(n)]})
    probs = rng.dirichlet([1, 1, 1], n)
    res = evaluate_predictions(frame, probs, CLASSES, threshold=0.4, n_boot=50,
                               dominant={"normal": "cohen", "pneumonia": "cohen"}, dominant_from="train")
    m = res["metrics"]
    assert m["per_class"]["COVID-19"]["auc"]["value"] is None
    called_covid = probs[:, 2] >= 0.4
    assert res["groups"]["non_dominant_specificity"]["value"] == pytest.approx(1 - called_covid.mean())
    assert res["groups"]["warnings"] == []  # one source
    meta = {"model": {"path": "m.ckpt", "arch": "resnet18", "preset": "x"},
            "data": {"manifest": "m.csv", "sha256": "0" * 64, "split": "test"}}
    res.update(meta)
    paths = write_report(json.loads(json.dumps(res, default=float)), np.array([0] * 25 + [1] * 15), probs, tmp_path)
    md = paths["md"].read_text()
    assert "Source x class" in md and "non-dominant-source specificity" in md
    # no source column: the table is replaced by one line
    res2 = {**evaluate_predictions(frame.drop(columns="source"), probs, CLASSES, n_boot=20), **meta}
    assert res2["groups"]["available"] is False
    md2 = write_report(json.loads(json.dumps(res2, default=float)), np.zeros(n, int), probs, tmp_path / "b")["md"]
    assert "no 'source' column" in md2.read_text()


# --------------------------------------------------------------------------- the CLI on real images


@pytest.fixture(scope="module")
def small_manifest(dev_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Up to 3 dev-set images per (source, class) as test rows, the rest as train rows (absolute paths)."""
    meta = pd.read_csv(dev_dir / "metadata.csv")
    df = pd.DataFrame({"patient_id": meta["patient_id"].astype(str), "label": meta["label"], "source": meta["source"],
                       "path": [str(dev_dir / "images" / f) for f in meta["filename"]]})
    first = df.drop_duplicates("patient_id").groupby(["source", "label"]).head(3)["patient_id"]
    df["split"] = np.where(df["patient_id"].isin(set(first)), "test", "train")
    out = tmp_path_factory.mktemp("groupset") / "manifest.csv"
    df.to_csv(out, index=False)
    return out


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from covidcxr import models
    from covidcxr.preprocess import get_preset

    torch.manual_seed(0)
    net = models.build("resnet18", num_classes=3)
    path = tmp_path_factory.mktemp("gckpt") / "r18.ckpt"
    models.save(path, net, arch="resnet18", classes=CLASSES, preset=get_preset(models.get_spec("resnet18").preset, size=64),
                training={"run_name": "tiny"})
    return path


def test_cli_evaluate_prints_and_writes_the_group_figures(tiny_ckpt: Path, small_manifest: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    from covidcxr.cli import main

    out = tmp_path / "rep"
    rc = main(["evaluate", "--model", str(tiny_ckpt), "--data", str(small_manifest), "--out", str(out), "--n-boot", "50"])
    printed = capsys.readouterr().out
    assert rc == 0
    res = json.loads((out / "metrics.json").read_text())
    g = res["groups"]
    preds = pd.read_csv(out / "predictions.csv")
    # every cell's sensitivity is the share of its rows in predictions.csv labelled their true class
    exp = preds.assign(hit=preds["pred"] == preds["label"]).groupby(["source", "label"])["hit"].agg(["mean", "size"])
    assert len(g["table"]) == len(exp)
    for c in g["table"]:
        assert c["sensitivity"]["value"] == pytest.approx(exp.loc[(c["source"], c["class"]), "mean"])
        assert c["n_images"] == exp.loc[(c["source"], c["class"]), "size"]
    # dominant sources counted on the manifest's train split
    m = pd.read_csv(small_manifest)
    train = m[m["split"] == "train"]
    for cls, src in g["non_dominant_specificity"]["dominant"].items():
        counts = train[train["label"] == cls]["source"].value_counts()
        assert counts[src] == counts.max()
    nd = preds[(preds["label"] != "COVID-19")
               & (preds["source"] != preds["label"].map(g["non_dominant_specificity"]["dominant"]))]
    assert g["non_dominant_specificity"]["value"] == pytest.approx((nd["pred"] != "COVID-19").mean())
    assert "worst-group sensitivity" in printed and "non-dominant-source specificity" in printed
    assert "source x class sensitivity:" in printed
    html = (out / "report.html").read_text()
    assert "Source x class" in html and "worst-group sensitivity" in html
    # without a source column the manifest is refused by read_manifest with one line (the library's
    # evaluate_predictions omits the table instead: test_evaluate_predictions_and_report_without_a_class)
    nosrc = tmp_path / "nosrc.csv"
    m.drop(columns="source").to_csv(nosrc, index=False)
    rc = main(["evaluate", "--model", str(tiny_ckpt), "--data", str(nosrc), "--out", str(tmp_path / "r2"),
               "--n-boot", "0"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "source" in err and str(nosrc) in err and "\n" not in err


def test_results_tables_writes_the_loso_and_group_tables(tmp_path: Path) -> None:
    """scripts/results_tables.py on two LOSO folds built from evaluate_predictions results: one without
    COVID-19 (nih), one with a class missing from training; absent classes give n/a, never a crash."""
    import importlib.util

    from covidcxr.evaluate import evaluate_predictions

    spec = importlib.util.spec_from_file_location("results_tables", Path(__file__).parents[1] / "scripts" / "results_tables.py")
    rt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rt)
    rng = np.random.default_rng(2)
    runs = tmp_path / "runs"
    folds = {"nih": ["normal"] * 12 + ["pneumonia"] * 8, "actualmed": ["normal"] * 8 + ["COVID-19"] * 12}
    expected_nd = {}
    for src, labels in folds.items():
        frame = pd.DataFrame({"label": labels, "patient_id": [f"{src}{i}" for i in range(len(labels))], "source": src,
                              "path": [f"{src}{i}.png" for i in range(len(labels))]})
        probs = rng.dirichlet([1, 1, 1], len(labels))
        res = evaluate_predictions(frame, probs, CLASSES, threshold=0.3, n_boot=20, dominant={"normal": "elsewhere"})
        res["model"] = {"threshold": 0.3}
        rep = runs / "loso" / src / "robust-report"
        rep.mkdir(parents=True)
        (rep / "metrics.json").write_text(json.dumps(res, default=float))
        neg = np.array([lab != "COVID-19" for lab in labels])
        expected_nd[src] = float((probs[neg, 2] < 0.3).mean())
    (runs / "status.tsv").write_text("loso/nih\trobust\tok\nloso/actualmed\trobust\tok\nloso/cohen\trobust\tfailed: boom\n")
    (runs / "models.tsv").write_text("robust\tMobileNetV2, group-robust\tconfigs/robust-mobilenet_v2.yaml\t\t\n")
    text = rt.build(runs)
    loso = text[text.index("#### Leave-one-source-out"):]
    row = {line.split(" | ")[0].strip("| "): line for line in loso.splitlines() if line.startswith("| ")}
    assert "n/a (no COVID-19)" in row["nih"] and "n/a (one class only)" in row["nih"]
    assert "n/a (no pneumonia)" in row["actualmed"] and "n/a (one class only)" not in row["actualmed"]
    assert f"{expected_nd['nih']:.3f}" in row["nih"].split(" | ")[-2]
    assert "failed: boom" in row["cohen"]
    # the §4 target row for the robust recipe lists each LOSO source's non-dominant-source specificity
    target = next(line for line in text.splitlines() if "each LOSO source" in line)
    assert f"nih: {expected_nd['nih']:.3f}" in target and f"actualmed: {expected_nd['actualmed']:.3f}" in target
    assert target.endswith("| yes |") == all(v >= 0.5 for v in expected_nd.values())
    # no scratch baseline in this run: one line says so, no rows of models without a paired figure
    assert "No paired difference to the scratch baseline: it was not run" in text and "| ok |" not in text
    # a run where nothing a target needs finished says so instead of an empty table
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "status.tsv").write_text("holdout\trobust\tnot run: stopped\n")
    (empty / "models.tsv").write_text("robust\tMobileNetV2, group-robust\tconfigs/robust-mobilenet_v2.yaml\t\t\n")
    assert "*No target measured" in rt.build(empty) and "*No target measured" not in text


def test_paired_bootstrap_adds_the_group_figures(tmp_path: Path) -> None:
    """Model A reads the source (non-NIH films called COVID-19), model B does not: the paired differences
    of worst-group sensitivity and non-dominant-source specificity are large and their CIs exclude 0."""
    from covidcxr.evaluate.paired import main as paired_main
    from covidcxr.evaluate.paired import paired_bootstrap

    rng = np.random.default_rng(4)
    n = 240
    src = rng.choice(["nih", "nih", "cohen", "actualmed"], n)
    label = np.where(src == "nih", rng.choice(["normal", "pneumonia"], n), rng.choice(["normal", "COVID-19"], n))
    base = pd.DataFrame({"path": [f"{i}.png" for i in range(n)], "patient_id": [f"p{i // 2}" for i in range(n)],
                         "label": label, "source": src})
    a = base.assign(pred=np.where(src == "nih", label, "COVID-19"), **{"prob_COVID-19": (src != "nih") * 0.9 + 0.05})
    flip = rng.random(n) < 0.1  # B: right 90 % of the time, wherever the film comes from
    b = base.assign(pred=np.where(flip, "pneumonia", label), **{"prob_COVID-19": np.where(label == "COVID-19", 0.8, 0.2)})
    res = paired_bootstrap(a, b, n_boot=300, dominant={"normal": "nih", "pneumonia": "nih"})
    nd, wg = res["metrics"]["non_dominant_specificity"], res["metrics"]["worst_group_sensitivity"]
    neg = (label != "COVID-19") & (src != "nih")
    assert nd["a"] == 0.0 and nd["b"] == pytest.approx((b["pred"][neg] != "COVID-19").mean())
    cells = b.assign(hit=b["pred"] == b["label"]).groupby(["source", "label"])["hit"].agg(["mean", "size"])
    assert wg["a"] == 0.0 and wg["b"] == pytest.approx(cells[cells["size"] >= 5]["mean"].min())
    assert nd["ci_low"] > 0 and wg["ci_low"] > 0
    # the command line reads the dominant sources from the metrics.json beside predictions.csv
    for name, f in (("A", a), ("B", b)):
        (tmp_path / name).mkdir()
        f.to_csv(tmp_path / name / "predictions.csv", index=False)
    (tmp_path / "A" / "metrics.json").write_text(json.dumps(
        {"groups": {"non_dominant_specificity": {"dominant": {"normal": "cohen", "pneumonia": "nih"}}}}))
    assert paired_main([str(tmp_path / "A"), str(tmp_path / "B"), "--bootstrap", "50", "--out", str(tmp_path / "p.json")]) == 0
    out = json.loads((tmp_path / "p.json").read_text())
    assert out["dominant"] == {"normal": "cohen", "pneumonia": "nih"}
    neg2 = (label == "normal") & (src != "cohen") | (label == "pneumonia") & (src != "nih")
    assert out["metrics"]["non_dominant_specificity"]["a"] == pytest.approx((a["pred"][neg2] != "COVID-19").mean())


def test_the_warning_reaches_the_report_and_the_printed_summary(tmp_path: Path) -> None:
    from covidcxr.evaluate import evaluate_predictions, write_report
    from covidcxr.evaluate.report import summary_lines

    labels = ["normal"] * 20 + ["COVID-19"] * 10
    src = ["nih"] * 19 + ["cohen"] * 11
    frame = pd.DataFrame({"label": labels, "source": src, "patient_id": [f"p{i}" for i in range(30)],
                          "path": [f"{i}.png" for i in range(30)]})
    probs = np.random.default_rng(1).dirichlet([1, 1, 1], 30)
    res = evaluate_predictions(frame, probs, CLASSES, n_boot=20)
    res.update({"model": {"path": "m.ckpt", "arch": "a", "preset": "p"},
                "data": {"manifest": "m.csv", "sha256": "0" * 64, "split": "test"}})
    res = json.loads(json.dumps(res, default=float))
    text = "class normal: 95 % from nih — sensitivity of normal may measure the source, not the disease"
    assert f"WARNING: {text}" in summary_lines(res)
    # normal: 19 of 20 from nih; COVID-19: 10 of 10 from cohen; the one cohen normal is no class of its own
    assert [line for line in summary_lines(res) if line.startswith("WARNING")] == [
        f"WARNING: {text}", "WARNING: class COVID-19: 100 % from cohen — sensitivity of COVID-19 may measure the "
        "source, not the disease"]
    paths = write_report(res, np.array([0] * 20 + [2] * 10), probs, tmp_path)
    assert text in paths["md"].read_text() and "95 % from nih" in paths["html"].read_text()
