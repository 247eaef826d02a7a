"""Tables for docs/results.md from the outputs of scripts/results_classification.sh.

    python scripts/results_tables.py RUNS [--doc docs/results.md]

Reads RUNS/{split,holdout}/<model>-report/metrics.json (covidcxr evaluate), <model>-paired.json
(covidcxr.evaluate.paired), <model>-audit/audit.json (covidcxr audit-model), RUNS/severity/*,
RUNS/loso/<source>/<model>-report/metrics.json (leave-one-source-out), RUNS/models.tsv and
RUNS/timings.tsv, and writes RUNS/results_tables.md. With --doc, the text
between the markers ``<!-- results:begin -->`` and ``<!-- results:end -->`` of that file is
replaced by the tables (the prose around the markers is written by hand from the figures).
Missing pieces are shown as "not run" or "failed" with the reason, never left out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/, also when loaded by file path
from docblock import replace_block  # noqa: E402

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
CLASSES = ["normal", "pneumonia", "COVID-19"]
SETTINGS = {"split": "Patient-level split (seed 62)", "holdout": "Source hold-out: trained without actualmed, tested on actualmed"}


def fig(d: dict | None, digits: int = 3) -> str:
    """``0.912 [0.850, 0.960]`` from {"value", "ci_low", "ci_high"} (or ci95 / ci lists)."""
    if not d or d.get("value") is None or (isinstance(d["value"], float) and math.isnan(d["value"])):
        return "n/a"
    lo, hi = d.get("ci_low"), d.get("ci_high")
    if lo is None and d.get("ci95"):
        lo, hi = d["ci95"]
    ci = f" [{lo:.{digits}f}, {hi:.{digits}f}]" if lo is not None and hi is not None and not math.isnan(lo) else ""
    return f"{d['value']:.{digits}f}{ci}"


def diff(row: dict | None, digits: int = 3) -> str:
    if not row or row.get("diff") is None:
        return "n/a"
    ci = f" [{row['ci_low']:+.{digits}f}, {row['ci_high']:+.{digits}f}]" if row.get("ci_low") is not None else ""
    star = " *" if row.get("ci_low") is not None and (row["ci_low"] > 0 or row["ci_high"] < 0) else ""
    return f"{row['diff']:+.{digits}f}{ci}{star}"


def load(p: Path) -> Any:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def read_tsv(p: Path, cols: list[str]) -> pd.DataFrame:
    if not p.is_file():
        return pd.DataFrame(columns=cols)
    return pd.read_csv(p, sep="\t", names=cols, dtype=str, keep_default_na=False)


def model_rows(runs: Path) -> list[dict[str, str]]:
    return read_tsv(runs / "models.tsv", ["id", "label", "config", "sets", "status"]).to_dict("records")


def status(runs: Path, setting: str, mid: str) -> str:
    """"ok", or why there is no result (not run: reason / failed: last log line)."""
    st = read_tsv(runs / "status.tsv", ["setting", "id", "status"])
    hit = st[(st["setting"] == setting) & (st["id"] == mid)]
    # a later CONTINUE=1 run that left this stage out appends "not run": it must not hide an earlier result
    ran = hit[~hit["status"].str.startswith("not run")]
    return (ran if len(ran) else hit)["status"].iloc[-1] if len(hit) else "not run"


def data_table(runs: Path) -> list[str]:
    out = []
    for setting, title in SETTINGS.items():
        m = runs / setting / "manifest.csv"
        if not m.is_file():
            out += [f"*{title}: manifest missing ({m}).*", ""]
            continue
        df = pd.read_csv(m, dtype=str, keep_default_na=False)
        df = df[df["split"].isin(["train", "val", "test"])]
        out += [f"**{title}** (`{m}`): {len(df)} images, {df['patient_id'].nunique()} patients.", ""]
        t = df.groupby(["source", "label", "split"]).size().unstack("split", fill_value=0)
        t = t.reindex(columns=["train", "val", "test"], fill_value=0)
        pats = df.groupby("split")["patient_id"].nunique()
        out += ["| source | class | train | val | test |", "|---|---|---|---|---|"]
        for (src, lab), r in t.iterrows():
            out.append(f"| {src} | {lab} | {r['train']} | {r['val']} | {r['test']} |")
        tot = t.sum()
        out.append(f"| **all** | | {tot['train']} ({pats.get('train', 0)} pat.) | {tot['val']} ({pats.get('val', 0)} pat.) "
                   f"| {tot['test']} ({pats.get('test', 0)} pat.) |")
        out.append("")
    return out


def _metrics(runs: Path, setting: str, mid: str) -> dict | None:
    m = load(runs / setting / f"{mid}-report" / "metrics.json")
    return m


def class_table(runs: Path, setting: str, models: list[dict]) -> list[str]:
    head = ["model", "accuracy", "macro sens.", *[f"sens. {c}" for c in CLASSES], *[f"PPV {c}" for c in CLASSES],
            "AUC COVID-19 vs rest"]
    if setting == "holdout":
        head += ["AUC COVID-19 vs normal"]
    head += ["decision (threshold from val)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    n_line = ""
    for mod in models:
        st = status(runs, setting, mod["id"])
        m = _metrics(runs, setting, mod["id"])
        if st != "ok" or m is None:
            lines.append(f"| {mod['label']} | " + " | ".join([st if st != "ok" else "no report"] + [""] * (len(head) - 2)) + " |")
            continue
        mm = m["metrics"]
        pc = mm["per_class"]
        cells = [mod["label"], fig(mm["accuracy"]), fig(mm.get("balanced_accuracy"))]
        cells += [fig(pc.get(c, {}).get("sensitivity")) for c in CLASSES]
        cells += [fig(pc.get(c, {}).get("ppv")) for c in CLASSES]
        cells.append(fig(pc.get("COVID-19", {}).get("auc")))
        if setting == "holdout":  # from the paired file (AUC restricted to COVID-19 vs normal), B = this model
            p = load(runs / setting / f"{mod['id']}-paired.json")
            a = p["metrics"]["auc"] if p else None
            cells.append(fig({"value": a["b"], "ci95": a.get("b_ci")}) if a else "n/a")
        thr = m.get("model", {}).get("threshold")
        cells.append(f"COVID-19 if p ≥ {thr:.3f}" if isinstance(thr, (int, float)) else "argmax")
        lines.append("| " + " | ".join(cells) + " |")
        if not n_line:
            cc = mm.get("class_counts", {})
            n_line = (f"Test images (patients): {mm['n_images']} ({mm['n_patients']}); per class "
                      + ", ".join(f"{c} {cc.get(c, 0)}" for c in CLASSES) + f". Manifest `{m['data']['manifest']}` "
                      f"(sha256 {m['data']['sha256'][:12]}). CIs: 95 %, {mm['bootstrap']['n_boot']} bootstrap "
                      "replicates over patients (covidcxr evaluate).")
    return lines + ["", n_line, ""]


def _label(models: list[dict], mid: str) -> str:
    return next((m["label"] for m in models if m["id"] == mid), mid)


def group_table(runs: Path, setting: str, models: list[dict]) -> list[str]:
    """Per model: COVID-19 AUC beside worst-group sensitivity and non-dominant-source specificity."""
    head = ["model", "AUC COVID-19 vs rest", "worst-group sensitivity (cell)", "non-dominant-source specificity",
            "dominant source per class (from)", "source-concentration warnings"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for mod in models:
        st = status(runs, setting, mod["id"])
        m = _metrics(runs, setting, mod["id"])
        if st != "ok" or m is None:
            lines.append(f"| {mod['label']} | " + " | ".join([st if st != "ok" else "no report"] + [""] * (len(head) - 2)) + " |")
            continue
        g = m.get("groups") or {}
        auc = fig(m["metrics"]["per_class"].get("COVID-19", {}).get("auc"))
        if not g.get("available"):
            lines.append(f"| {mod['label']} | {auc} | {g.get('note', 'not in this report')} | | | |")
            continue
        wg, nd = g["worst_group_sensitivity"], g.get("non_dominant_specificity") or {}
        cell = f" ({wg['cell']}, n={wg['n_images']})" if wg.get("cell") else ""
        ndn = f" (n={nd['n_images']})" if nd.get("value") is not None else ""
        dom = ", ".join(f"{c}: {s}" for c, s in (nd.get("dominant") or {}).items())
        src = str(nd.get("dominant_from", "")).split(" of ")[0]
        warn = "; ".join(w["text"].split(" — ")[0] for w in g.get("warnings", [])) or "none"
        lines.append(f"| {mod['label']} | {auc} | {fig(wg)}{cell} | {fig(nd)}{ndn} | {dom} ({src}) | {warn} |")
    return lines + ["", "Worst-group sensitivity: the lowest sensitivity over (source, class) cells of ≥ 5 test "
                    "images at the stored decision rule. Non-dominant-source specificity: the share of normal and "
                    "pneumonia test films from a source other than the one supplying most training films of that "
                    "class that are not labelled COVID-19. A warning marks a class whose test images come ≥ 90 % from "
                    "one source. 95 % CIs: patient bootstrap, patients resampled within their (source, class) cell "
                    "(covidcxr evaluate, metrics.json `groups`).", ""]


def loso_table(runs: Path, models: list[dict]) -> list[str]:
    """Leave-one-source-out: per held-out source and recipe, what the held-out images allow."""
    root = runs / "loso"
    st = read_tsv(runs / "status.tsv", ["setting", "id", "status"])
    st = st[st["setting"].str.startswith("loso/")]
    if st.empty:
        return ["*Leave-one-source-out: not run.*", ""]
    head = ["held-out source", "model", "test images (patients): per class", *[f"sens. {c}" for c in CLASSES],
            "AUC COVID-19 vs rest", "non-dominant-source specificity", "decision (threshold from val)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    n_boot = None
    for (setting, mid), rows in st.groupby(["setting", "id"], sort=True):
        src, stat = setting.split("/", 1)[1], rows["status"].iloc[-1]
        m = load(root / src / f"{mid}-report" / "metrics.json")
        if stat != "ok" or m is None:
            lines.append(f"| {src} | {_label(models, mid)} | " + " | ".join(
                [stat if stat != "ok" else "no report"] + [""] * (len(head) - 3)) + " |")
            continue
        mm = m["metrics"]
        cc = mm.get("class_counts", {})
        n_boot = mm["bootstrap"]["n_boot"]
        counts = f"{mm['n_images']} ({mm['n_patients']}): " + ", ".join(f"{c} {cc.get(c, 0)}" for c in CLASSES)
        sens = [fig(mm["per_class"][c]["sensitivity"]) if cc.get(c) else f"n/a (no {c})" for c in CLASSES]
        auc = mm["per_class"].get("COVID-19", {}).get("auc")
        auc_s = fig(auc) if auc and auc.get("value") is not None else "n/a (one class only)"
        nd = (m.get("groups") or {}).get("non_dominant_specificity") or {}
        nd_s = fig(nd) + (f" (n={nd['n_images']})" if nd.get("value") is not None else "")
        thr = m.get("model", {}).get("threshold")
        rule = f"COVID-19 if p ≥ {thr:.3f}" if isinstance(thr, (int, float)) else "argmax"
        lines.append(f"| {src} | {_label(models, mid)} | {counts} | " + " | ".join(sens) + f" | {auc_s} | {nd_s} | {rule} |")
    return lines + ["", "Each row: trained and validated without the held-out source (`covidcxr data build --holdout-source "
                    "SOURCE`, seed 62), evaluated on that source's images only (persons linked to it through a duplicate "
                    "image are left out of training and of the evaluation). Sensitivity at the decision rule stored in "
                    "the checkpoint; AUC only where the held-out source has COVID-19 and other images; non-dominant-source "
                    "specificity here = the held-out source's normal and pneumonia films not labelled COVID-19 (the "
                    "held-out source is never the training split's dominant source). 95 % CIs: "
                    f"{n_boot or '?'} patient-bootstrap replicates.", ""]


def loso_paired_table(runs: Path, models: list[dict]) -> list[str]:
    """Paired differences between LOSO recipes on each held-out source (RUNS/loso/<src>/<b>-vs-<a>-paired.json)."""
    files = sorted((runs / "loso").glob("*/*-vs-*-paired.json"))
    if not files:
        return []
    keys = [("auc", "Δ AUC COVID-19 vs rest"), ("worst_group_sensitivity", "Δ worst-group sensitivity"),
            ("non_dominant_specificity", "Δ non-dominant-source specificity"), ("macro_sensitivity", "Δ macro sensitivity")]
    lines = ["| held-out source | B − A | " + " | ".join(k[1] for k in keys) + " | replicates |",
             "|" + "---|" * (len(keys) + 3)]
    n_boot = "?"
    for f in files:
        p = load(f)
        if p is None:
            continue
        b, a = f.name[: -len("-paired.json")].split("-vs-", 1)
        n_boot = p["bootstrap"]["n_boot"]
        pm = p["metrics"]
        lines.append(f"| {f.parent.name} | {_label(models, b)} − {_label(models, a)} | "
                     + " | ".join(diff(pm.get(k)) for k, _ in keys) + f" | {n_boot} |")
    return lines + ["", "Paired patient bootstrap on the same held-out images (`python -m covidcxr.evaluate.paired`, "
                    f"{n_boot} replicates); n/a where the held-out source lacks what the figure needs. * = CI excludes 0.", ""]


def paired_table(runs: Path, setting: str, models: list[dict]) -> list[str]:
    what = "COVID-19 vs normal AUC" if setting == "holdout" else "COVID-19 vs rest AUC"
    lines = [f"| model | Δ {what} vs scratch | Δ accuracy | Δ macro sensitivity | replicates |", "|---|---|---|---|---|"]
    n_boot = "?"
    base = status(runs, setting, "scratch") if models and models[0]["id"] == "scratch" else "not run"
    if base != "ok":  # no baseline: one line instead of a table of rows without figures
        lines = [f"*No paired difference to the scratch baseline: it was {base}.*", ""]
    for mod in models[1:] if base == "ok" else []:  # the first model is the scratch baseline
        p = load(runs / setting / f"{mod['id']}-paired.json")
        if status(runs, setting, mod["id"]) != "ok" or p is None:
            lines.append(f"| {mod['label']} | {status(runs, setting, mod['id']) if p is None else 'n/a'} | | | |")
            continue
        pm = p["metrics"]
        n_boot = p["bootstrap"]["n_boot"]
        lines.append(f"| {mod['label']} | {diff(pm['auc'])} | {diff(pm['accuracy'])} | {diff(pm['macro_sensitivity'])} "
                     f"| {pm['auc']['n_replicates']} |")
    lines += [] if base != "ok" else ["", "Δ = model − scratch ResNet-18 on the same test images; 95 % CI from a paired patient "
              "bootstrap (both models scored on each resample; patients resampled within their class; "
              f"{n_boot} replicates; `python -m covidcxr.evaluate.paired`). * = CI excludes 0.", ""]
    for b, name in (("twice", "Twice transfer"), ("robust", "Group-robust recipe"),
                    ("robustlp", "Group-balanced linear probe")):
        p = load(runs / setting / f"{b}-vs-mnv2-paired.json")  # against once transfer, same test images
        if p is not None:
            pm = p["metrics"]
            extra = "".join(f", Δ {lab} {diff(pm[k])}" for k, lab in (
                ("worst_group_sensitivity", "worst-group sensitivity"),
                ("non_dominant_specificity", "non-dominant-source specificity")) if k in pm)
            lines += [f"{name} − once transfer (fine-tuned MobileNetV2), paired, same test images: Δ {what} "
                      f"{diff(pm['auc'])}, Δ accuracy {diff(pm['accuracy'])}, Δ macro sensitivity "
                      f"{diff(pm['macro_sensitivity'])}{extra} ({pm['auc']['n_replicates']} replicates).", ""]
    return lines


def audit_table(runs: Path, setting: str, models: list[dict]) -> list[str]:
    head = ["model", "lung area (share of input)", "Grad-CAM relevance in lungs", "ratio", "images below lung area",
            "COVID-19 AUC unmasked", "COVID-19 AUC lungs only", "Δ AUC (lungs only − unmasked)",
            "predictions changed by lungs-only", "border band blanked: predictions changed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    note = ""
    for mod in models:
        a = load(runs / setting / f"{mod['id']}-audit" / "audit.json")
        if a is None:
            st = status(runs, setting, mod["id"])
            lines.append(f"| {mod['label']} | " + ("not run" if st == "ok" else st) + " |" + " |" * (len(head) - 2))
            continue
        o = a["overall"]
        la, gl = o.get("lung_area"), o.get("gradcam_in_lungs")
        ratio = f"{gl / la:.2f}" if la and gl and la > 0 else "n/a"
        lm = a.get("metrics", {}).get("images_with_lung_mask", {})
        au0 = lm.get("original", {}).get("auc_covid", {})
        au1 = lm.get("lung_only", {}).get("auc_covid", {})
        dd = {"diff": au1.get("diff_vs_original"), "ci_low": (au1.get("diff_ci95") or [None])[0],
              "ci_high": (au1.get("diff_ci95") or [None, None])[1]}
        per = pd.DataFrame(a.get("per_image", []))
        changed = "n/a"
        if len(per) and "pred_lung_only" in per:
            w = per[per["pred_lung_only"] >= 0]
            changed = f"{(w['pred_lung_only'] != w['pred_original']).mean():.0%}" if len(w) else "n/a"
        pct = lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.0%}"  # noqa: E731
        lines.append("| " + " | ".join([
            mod["label"], pct(la), pct(gl), ratio, pct(o.get("gradcam_share_of_images_below_lung_area")),
            fig(au0), fig(au1), diff(dd), changed, pct(o.get("changed_by_border"))]) + " |")
        if not note:
            ms = a.get("mask_sources", {})
            note = (f"{o['n']} test images; lung masks: " + ", ".join(f"{k} {v}" for k, v in ms.items())
                    + f". AUC CIs: 95 %, {a['settings']['bootstrap']} patient-bootstrap replicates (covidcxr audit-model).")
    return lines + ["", note, ""]


def targets(runs: Path, models: list[dict]) -> list[str]:
    """The issue's targets against the best measured figure of each."""
    rows = []
    best_auc, best_id = None, None
    for mod in models:
        m = _metrics(runs, "split", mod["id"]) if status(runs, "split", mod["id"]) == "ok" else None
        if m:
            auc = m["metrics"]["per_class"]["COVID-19"]["auc"]
            if auc["value"] is not None and (best_auc is None or auc["value"] > best_auc["value"]):
                best_auc, best_id = auc, mod
    audited = [mod for mod in models if (runs / "split" / f"{mod['id']}-audit" / "audit.json").is_file()
               and status(runs, "split", mod["id"]) == "ok"]
    best_audited = max(audited, key=lambda mod: _metrics(runs, "split", mod["id"])["metrics"]["per_class"]["COVID-19"]
                       ["auc"]["value"] or 0, default=None)
    if best_id:
        m = _metrics(runs, "split", best_id["id"])["metrics"]
        rows.append(("patient split: COVID-19 AUC ≥ 0.97", f"{fig(best_auc)} ({best_id['label']})",
                     best_auc["value"] >= 0.97))
        ms = m.get("balanced_accuracy")
        rows.append(("patient split: 3-class macro sensitivity ≥ 0.85", f"{fig(ms)} ({best_id['label']})",
                     ms is not None and ms["value"] is not None and ms["value"] >= 0.85))
    if best_audited:  # the audit targets on the best model that was audited
        a = load(runs / "split" / f"{best_audited['id']}-audit" / "audit.json")
        o = a["overall"]
        r = o["gradcam_in_lungs"] / o["lung_area"] if o.get("lung_area") else float("nan")
        rows.append(("best model: in-lung relevance ≥ 1.3 × lung-area share",
                     f"{r:.2f} × (Grad-CAM {o['gradcam_in_lungs']:.0%} vs lungs {o['lung_area']:.0%}; "
                     f"{best_audited['label']})", r >= 1.3))
        lm = a["metrics"].get("images_with_lung_mask", {})
        au = lm.get("lung_only", {}).get("auc_covid", {})
        d = au.get("diff_vs_original")
        ci = au.get("diff_ci95")
        rows.append(("best model: masked-lung AUC within 0.05 of unmasked",
                     "n/a" if d is None else f"{au['value']:.3f} vs {lm['original']['auc_covid']['value']:.3f}: "
                     f"{d:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "") + f" ({best_audited['label']})",
                     d is not None and abs(d) <= 0.05))
    best_h = None
    for mod in models:
        p = load(runs / "holdout" / f"{mod['id']}-paired.json")
        if p and status(runs, "holdout", mod["id"]) == "ok":
            a = p["metrics"]["auc"]
            if a["b"] is not None and (best_h is None or a["b"] > best_h[0]["b"]):
                best_h = (a, mod)
    if best_h:
        a, mod = best_h
        rows.append(("actualmed hold-out: COVID-19 vs normal AUC ≥ 0.85",
                     f"{fig({'value': a['b'], 'ci95': a.get('b_ci')})} ({mod['label']})", a["b"] >= 0.85))
    wins = []
    for mod in models[1:]:
        p = load(runs / "split" / f"{mod['id']}-paired.json")
        if p and status(runs, "split", mod["id"]) == "ok" and p["metrics"]["auc"].get("ci_low") is not None:
            wins.append((mod["label"], p["metrics"]["auc"]))
    if wins:
        ok = [w for w in wins if w[1]["ci_low"] > 0]
        rows.append(("transfer beats scratch (paired CI of Δ AUC excludes 0, patient split)",
                     "; ".join(f"{lab}: {diff(r)}" for lab, r in wins), bool(ok)))
    rows += robust_targets(runs)
    if not rows:  # an empty table would read as "no targets"; say why there is nothing
        return ["*No target measured: no model of this run has the results a target needs (see the rows above).*", ""]
    lines = ["| target | measured (best model) | met |", "|---|---|---|"]
    lines += [f"| {t} | {v} | {'yes' if ok else '**no**'} |" for t, v, ok in rows]
    return lines + [""]


def robust_targets(runs: Path) -> list[tuple[str, str, bool]]:
    """Issue 18 §4's targets for each group-robust recipe (ids ``robust``, ``robustlp``), where its results exist."""
    rows = []

    def nds(m: dict | None) -> dict | None:
        return ((m or {}).get("groups") or {}).get("non_dominant_specificity")

    for rid, name in (("robust", "robust recipe"), ("robustlp", "group-balanced linear probe")):
        h = nds(_metrics(runs, "holdout", rid)) if status(runs, "holdout", rid) == "ok" else None
        if h and h.get("value") is not None:
            rows.append((f"{name}, no calibration: non-dominant-source specificity ≥ 0.5 (actualmed hold-out)",
                         f"{fig(h)} (n={h['n_images']})", h["value"] >= 0.5))
        loso = []
        for d in sorted((runs / "loso").glob(f"*/{rid}-report/metrics.json")):
            v = nds(load(d))
            if v and v.get("value") is not None and status(runs, f"loso/{d.parent.parent.name}", rid) == "ok":
                loso.append((d.parent.parent.name, v))
        if loso:
            rows.append((f"{name}, no calibration: non-dominant-source specificity ≥ 0.5 (each LOSO source)",
                         "; ".join(f"{src}: {fig(v)}" for src, v in loso), all(v["value"] >= 0.5 for _, v in loso)))
        p = load(runs / "split" / f"{rid}-vs-mnv2-paired.json")
        if p and p["metrics"]["auc"].get("diff") is not None:
            a = p["metrics"]["auc"]
            rows.append((f"{name}: patient-split COVID-19 AUC not below the transfer recipe's by more than 0.02",
                         f"Δ {diff(a)} ({rid} − fine-tuned MobileNetV2, paired)", a["diff"] >= -0.02))
    return rows


def severity_tables(runs: Path) -> list[str]:
    out = []
    ev = load(runs / "severity" / "eval_test" / "metrics.json")
    cv = load(runs / "severity" / "cv" / "cv.json")
    if ev is None and cv is None:
        return ["*Severity: not run.*", ""]
    if ev:
        sm = ev["scores"]["metrics"]
        base = ev.get("baseline_train_mean", {}).get("metrics", {})
        out += [f"Test patients of the merged patient-level split: {ev['scores']['n_images']} scored images, "
                f"{ev['scores']['n_patients']} patients (95 % patient-bootstrap CIs).", "",
                "| model | R² extent | R² opacity | MAE extent | MAE opacity | Pearson r extent |", "|---|---|---|---|---|---|",
                f"| scores, fine-tuned from the transfer classifier | {fig(sm['geographic_extent_r2'], 2)} | "
                f"{fig(sm['opacity_r2'], 2)} | {fig(sm['geographic_extent_mae'], 2)} | {fig(sm['opacity_mae'], 2)} | "
                f"{fig(sm['geographic_extent_pearson_r'], 2)} |"]
        if base:
            out.append(f"| baseline: training mean | {fig(base['geographic_extent_r2'], 2)} | {fig(base['opacity_r2'], 2)} | "
                       f"{fig(base['geographic_extent_mae'], 2)} | {fig(base['opacity_mae'], 2)} | n/a |")
        out.append("")
    if cv:
        s = cv["summary"]

        def c(meth: str, k: str) -> str:
            d = s.get(meth, {}).get(k)
            if not d or d.get("mean") is None or not math.isfinite(d["mean"]):
                return "n/a"
            lo, hi = d["ci95_corrected"]
            sd = f" ± {d['sd']:.2f}" if d.get("sd") is not None else ""
            return f"{d['mean']:.2f}{sd} [{lo:.2f}, {hi:.2f}]"
        out += [f"Monte-Carlo CV over patients: {cv['splits']} splits, {cv['n_images']} scored images, "
                f"{cv['n_patients']} patients, {cv['preset']}; mean ± SD over splits [Nadeau–Bengio corrected 95 % CI].", "",
                "| method | R² extent | R² opacity | MAE extent | MAE opacity |", "|---|---|---|---|---|"]
        for meth in cv["methods"]:
            out.append(f"| {meth} | {c(meth, 'geographic_extent_r2')} | {c(meth, 'opacity_r2')} | "
                       f"{c(meth, 'geographic_extent_mae')} | {c(meth, 'opacity_mae')} |")
        out.append("")
    return out


def timings(runs: Path) -> list[str]:
    t = read_tsv(runs / "timings.tsv", ["step", "seconds"])
    if t.empty:
        return []
    t["seconds"] = pd.to_numeric(t["seconds"], errors="coerce")
    lines = ["| step | wall time |", "|---|---|"]
    lines += [f"| {r.step} | {r.seconds / 60:.1f} min |" for r in t.itertuples()]
    return lines + [""]


def build(runs: Path) -> str:
    models = model_rows(runs)
    meta = load(runs / "run.json") or {}
    parts = [f"Generated by `scripts/results_tables.py {runs}` from the run of `bash scripts/results_classification.sh` "
             f"({meta.get('started', '?')} – {meta.get('finished', '?')} UTC, {meta.get('minutes', '?')} min wall time; "
             f"settings: {meta.get('settings', '?')}).", ""]
    parts += ["#### Recipes run", "", "| model | recipe | CPU-sized overrides (--set) |", "|---|---|---|"]
    parts += [f"| {m['label']} | `{m['config']}` | `{m['sets']}` |" for m in models] + [""]
    parts += ["#### Data", ""] + data_table(runs)
    for setting, title in SETTINGS.items():
        parts += [f"#### {title}", ""] + class_table(runs, setting, models)
        parts += [f"Per-group figures ({title.lower()}): does the model find the disease or the source?", ""]
        parts += group_table(runs, setting, models)
        parts += [f"Paired difference to the scratch baseline ({title.lower()}):", ""] + paired_table(runs, setting, models)
    parts += ["#### Leave-one-source-out", ""] + loso_table(runs, models) + loso_paired_table(runs, models)
    parts += ["#### Shortcut audit (patient-level split, test)", ""] + audit_table(runs, "split", models)
    parts += ["#### Targets", ""] + targets(runs, models)
    parts += ["#### Severity from the transfer classifier's body", ""] + severity_tables(runs)
    parts += ["#### Wall time", ""] + timings(runs)
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path)
    ap.add_argument("--doc", type=Path, help="markdown file whose results:begin/end block is replaced")
    a = ap.parse_args(argv)
    text = build(a.runs)
    (a.runs / "results_tables.md").write_text(text + "\n", encoding="utf-8")
    if a.doc:
        err = replace_block(a.doc, BEGIN, END, text)
        if err:
            print(err, file=sys.stderr)
            return 2
    print(f"tables: {a.runs / 'results_tables.md'}" + (f"; updated {a.doc}" if a.doc else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
