#!/usr/bin/env python
"""Model cards for the reference models, from the outputs of scripts/train_reference.sh (never typed by hand).

    python scripts/model_card.py RUNS --version 1.0.0 --recipe configs/transfer-mobilenet_v2.yaml --seed 0 --pack

Reads RUNS/run/best.ckpt, RUNS/eval-test/metrics.json (patient split, per source), RUNS/eval-actualmed/
metrics.json (the Actualmed hold-out), RUNS/onnx/model.int8.onnx (the INT8 parity gate), RUNS/audit/audit.json
(shortcut audit), RUNS/severity/best.ckpt and RUNS/severity-eval/metrics.json. Leave-one-source-out figures of the
reference recipe come from --loso (results-out/run3/loso by default; 'not measured' where absent). Writes
RUNS/cards.json and docs/model-card.md (--doc), and with --pack stores both models, each with its card, in
covidcxr/models/reference/.

    python scripts/model_card.py RUNS --refresh     # the run's outputs are gone: keep the shipped models and
                                                    # their stored figures, re-read INT8 / audit / LOSO only
The card follows Mitchell et al., "Model Cards for Model Reporting" (FAT* 2019). Research use only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["normal", "pneumonia", "COVID-19"]
SITE_STEPS = (
    "Before any use at a hospital: (1) `covidcxr site check --model reference --out site/ LOCAL_FILMS/` compares the "
    "hospital's films with the training sources (no labels needed) and says whether they look like the training "
    "data; (2) `covidcxr site calibrate --model reference --data LOCAL_MANIFEST.csv --out site.ckpt` refits the "
    "temperature and the COVID-19 threshold on the hospital's own labelled cases (with conformal prediction sets) "
    "and reports before/after figures cross-fitted by patient. Use the site checkpoint, never the reference as is.")


def ci(m: dict[str, Any] | None, digits: int = 3) -> str:
    """'0.912 [0.871, 0.948]' from a metrics dict with value/ci_low/ci_high."""
    if not isinstance(m, dict) or m.get("value") is None:
        return "n/a"
    v = f"{m['value']:.{digits}f}"
    if m.get("ci_low") is None or m.get("ci_high") is None:
        return v
    return f"{v} [{m['ci_low']:.{digits}f}, {m['ci_high']:.{digits}f}]"


def load_json(p: Path) -> dict[str, Any] | None:
    return json.loads(p.read_text()) if p.is_file() else None


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return "unknown"


# --------------------------------------------------------------------------- tables
def data_table(ref: pd.DataFrame, hold: pd.DataFrame) -> dict[str, Any]:
    """Images by source x class x split (train / val / test of the patient split, and the Actualmed hold-out)."""
    rows = []
    frames = [(s, ref[ref.split == s]) for s in ("train", "val", "test")] + [("actualmed hold-out", hold)]
    for source in sorted(set(ref.source) | set(hold.source)):
        for cls in CLASSES:
            counts = [int(((f.source == source) & (f.label == cls)).sum()) for _, f in frames]
            if any(counts):
                rows.append([source, cls, *counts])
    rows.append(["all", "all", *[len(f) for _, f in frames]])
    return {"caption": "Images by source, class and split (persons with an Actualmed image are never in train/val; "
                       "the Actualmed hold-out also holds the 'test' Actualmed images of the patient split)",
            "columns": ["source", "class", "train", "val", "test (patient split)", "actualmed hold-out"], "rows": rows}


def headline(name: str, m: dict[str, Any]) -> list[str]:
    met = m["metrics"]
    pc = met["per_class"]["COVID-19"]
    cal = m.get("calibration") or {}
    ece = (cal.get("after") or cal.get("before") or {}).get("ece")
    return [name, f"{met['n_images']} / {met['n_patients']}", ci(pc.get("auc")), ci(pc.get("sensitivity")),
            ci(pc.get("specificity")), ci(met.get("balanced_accuracy")), "n/a" if ece is None else f"{ece:.3f}"]


def per_source_table(m: dict[str, Any], setting: str) -> list[list[Any]]:
    rows = []
    for source, s in sorted((m.get("by_source") or {}).items()):
        pc = (s.get("per_class") or {}).get("COVID-19") or {}
        counts = ", ".join(f"{k} {v}" for k, v in (s.get("class_counts") or {}).items() if v)
        rows.append([setting, source, f"{s['n_images']} / {s['n_patients']}", counts, ci(s.get("accuracy")),
                     ci(pc.get("sensitivity")), ci(pc.get("auc"))])
    return rows


def int8_summary(runs: Path) -> tuple[str, dict[str, Any] | None]:
    onnx_file = runs / "onnx" / "model.int8.onnx"
    if not onnx_file.is_file():
        status = ((runs / "int8.status").read_text().strip().splitlines() or ["not run"])[-1] \
            if (runs / "int8.status").is_file() else "not run"  # the export's one-line error
        return f"INT8 export did not pass: {status}", None
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(onnx_file), load_external_data=False).metadata_props}
    gate = json.loads(meta.get("covidcxr.parity_gate", "null")) or {}
    quant = json.loads(meta.get("covidcxr.quantization", "null")) or {}
    text = (f"Static INT8 (onnxruntime QDQ, {quant.get('method', '?')} calibration on "
            f"{quant.get('calibration_images', '?')} train images; {len(quant.get('fp32_nodes') or [])} leading "
            f"convolution(s) kept fp32) against fp32 on {gate.get('images')} images of "
            f"{'+'.join(gate.get('splits') or [])}: COVID-19 AUC {gate.get('auc_fp32', float('nan')):.4f} (fp32) vs "
            f"{gate.get('auc_int8', float('nan')):.4f} (INT8), change {gate.get('auc_change', float('nan')):.4f} "
            f"(gate <= {gate.get('max_auc_change')}); labels agree {gate.get('agreement', float('nan')):.1%} "
            f"(gate >= {gate.get('min_agreement', 0):.0%}); largest probability difference "
            f"{gate.get('max_prob_diff', float('nan')):.3f}. This measures agreement with fp32, not accuracy.")
    return text, gate


def qat_summary(training: dict[str, Any]) -> str:
    """What quantization-aware fine-tuning (covidcxr qat) did before the INT8 export, from the checkpoint."""
    q = training.get("qat")
    if not q:
        return "No quantization-aware fine-tuning. "
    b, a = q.get("before") or {}, q.get("after") or {}
    return (f"Quantization-aware fine-tuning first (`covidcxr qat`: BatchNorm folded, {q.get('epochs')} epochs at "
            f"lr {q.get('lr')} on the {q.get('train_images')} train images, simulated INT8 logits pulled towards the "
            f"fp32 ones and those towards the trained model's; first {q.get('fp32_convs', 0)} convolutions left fp32; on those train images the "
            f"simulated INT8 logit error went from "
            f"{b.get('int8_simulated_logit_error')} to {a.get('int8_simulated_logit_error')} and the fp32 COVID-19 "
            f"labels agree with the trained model's on {a.get('fp32_label_agreement', float('nan')):.1%}; the "
            "threshold and temperature were then chosen again on val). ")


def audit_summary(runs: Path) -> tuple[list[str], dict[str, Any] | None]:
    """Card items (each starts with 'Shortcut audit') and figures from RUNS/audit/audit.json (covidcxr audit-model)."""
    a = load_json(runs / "audit" / "audit.json")
    if not a:
        return ["Shortcut audit: not measured for this version (RUNS/audit/audit.json missing: stopped for CPU "
                "time, or failed; see audit.log in the run folder)."], None
    ov = a.get("overall") or {}
    n = ov.get("n") or len(a.get("per_image") or [])
    seg = (a.get("segmenter") or {}).get("id") or "the manifest's masks"
    met = a.get("metrics") or {}
    figs: dict[str, Any] = {"images": n, "split": a.get("split"), "manifest": a.get("manifest"),
                            "methods": a.get("methods"), "lung_area": ov.get("lung_area"),
                            "relevance_in_lungs": {m: ov.get(f"{m}_in_lungs") for m in a.get("methods") or []},
                            "border_changes_prediction": ov.get("changed_by_border"),
                            "abs_delta_p_border": ov.get("abs_text_delta_border")}
    items = [f"Shortcut audit (`covidcxr audit-model --methods gradcam`, {n} images drawn at random (seed "
             f"{(a.get('settings') or {}).get('seed', '?')}) from the {a.get('split')} split of the patient split; lung "
             f"masks: {seg}): {a.get('headline', '')}"]
    def v95(d: dict[str, Any] | None, lo_hi: str = "ci95", value: str = "value") -> str:
        if not isinstance(d, dict) or d.get(value) is None:
            return "n/a"
        lo, hi = (d.get(lo_hi) or [None, None])[:2]
        return f"{d[value]:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None else "")

    masked = met.get("images_with_lung_mask") or {}
    rows = []
    for key, label in (("accuracy", "accuracy"), ("auc_covid", "COVID-19 AUC")):
        orig, lung = (masked.get("original") or {}).get(key), (masked.get("lung_only") or {}).get(key)
        if orig and lung:
            figs[key] = {"unmasked": orig, "lungs_only": lung}
            rows.append(f"{label} {v95(orig)} unmasked vs {v95(lung)} lungs only (difference "
                        f"{v95(lung, 'diff_ci95', 'diff_vs_original')})")
    if rows:
        items.append("Shortcut audit, lungs-only predictions (everything outside the lung mask blanked; 95% patient-"
                     "bootstrap CIs, difference paired): " + "; ".join(rows) + ".")
    area, inside = ov.get("lung_area"), ov.get("gradcam_in_lungs")
    border = ov.get("changed_by_border")
    if area is not None and inside is not None and border is not None:
        # what the figures say, decided by them: relevance at or below the lungs' share of the image (x1.1), or a
        # tenth of the predictions changed by blanking the border band, reads as evidence taken outside the lungs
        outside = inside <= 1.1 * area or border >= 0.1
        items.append(f"Shortcut audit, reading: Grad-CAM puts {inside:.0%} of its relevance inside lungs covering "
                     f"{area:.0%} of the image and blanking the border band changes {border:.0%} of the predictions: "
                     + ("the model draws much of its evidence from outside the lungs (borders, text, body outline), "
                        "consistent with the source-class confounding above." if outside else
                        "no sign that the model relies on evidence outside the lungs on these images."))
    return items, figs


def _rel(p: Path | None) -> str:
    """A path as the repository sees it (no machine-specific prefix in the shipped card)."""
    if p is None:
        return "LOSO folder"
    try:
        return str(Path(p).resolve().relative_to(REPO))
    except ValueError:
        return str(p)


def loso_summary(loso: Path | None, model_id: str) -> tuple[list[str], list[list[Any]], dict[str, Any]]:
    """Leave-one-source-out of the reference recipe, from LOSO/<source>/<model_id>-report/metrics.json."""
    sources = ("actualmed", "cohen", "figure1", "hannover", "nih")
    rows, figs = [], {}
    for src in sources:
        m = load_json(loso / src / f"{model_id}-report" / "metrics.json") if loso else None
        if m is None:
            rows.append([src, "not measured", "", "", "", "", ""])
            continue
        mm = m["metrics"]
        pc = mm["per_class"].get("COVID-19") or {}
        cc = mm.get("class_counts") or {}
        t = (m.get("model") or {}).get("training") or {}
        nrm = mm["per_class"].get("normal") or {}
        nds = (m.get("groups") or {}).get("non_dominant_specificity") or {}
        figs[src] = {"n_images": mm["n_images"], "n_patients": mm["n_patients"], "class_counts": cc,
                     "covid_sensitivity": pc.get("sensitivity"), "covid_auc": pc.get("auc"),
                     "normal_sensitivity": nrm.get("sensitivity"), "non_dominant_specificity": nds or None,
                     "preset": t.get("preset"), "epochs_trained": (t.get("epoch") or 0) + 1 if "epoch" in t else None}
        rows.append([src, f"{mm['n_images']} / {mm['n_patients']}", ", ".join(f"{k} {v}" for k, v in cc.items() if v),
                     ci(pc.get("sensitivity")) if cc.get("COVID-19") else "n/a (no COVID-19)",
                     ci(pc.get("auc")) if (pc.get("auc") or {}).get("value") is not None else "n/a (one class only)",
                     ci(nrm.get("sensitivity")) if cc.get("normal") else "n/a (no normal)",
                     ci(nds) if nds.get("value") is not None else "n/a"])
    done = [r for r in rows if r[1] != "not measured"]
    if not done:
        return [f"Leave-one-source-out: not measured for the reference recipe (no {_rel(loso)}/<source>/"
                f"{model_id}-report/metrics.json)."], [], {}
    presets = sorted({str(f.get("preset")) for f in figs.values()})
    items = [f"Leave-one-source-out: the reference recipe (`{model_id}`, transfer MobileNetV2) retrained with each "
             f"source held out (`covidcxr data build --holdout-source`, seed 62; preset {', '.join(presets)}, i.e. the "
             f"reduced settings of that run, not the shipped model itself) and evaluated on the held-out source only; "
             f"measured for {len(done)} of {len(sources)} sources ({_rel(loso)}), the rest say 'not measured'."]
    return items, rows, figs


def stored_loso(recipe: str) -> tuple[list[str], list[list[Any]], dict[str, Any]]:
    """The shipped card's leave-one-source-out part, for a new card when the LOSO run's outputs are gone.

    Those figures belong to the recipe (retrained per held-out source), not to the shipped weights, so a new model of
    the same recipe may carry them, saying where they come from."""
    from covidcxr.reference_models import CLASSIFIER, card, metadata

    try:
        old = card(CLASSIFIER)
        old_recipe = (metadata(CLASSIFIER).get("training") or {}).get("recipe_file")
    except Exception:  # nothing installed yet
        return [], [], {}
    if Path(str(old_recipe)).name != Path(recipe).name:  # another recipe's figures say nothing about this one
        return [], [], {}
    items = [i for sec in old.get("sections") or [] for i in sec.get("items") or []
             if str(i).startswith("Leave-one-source-out") and "not measured for" not in str(i)]
    rows = [r for sec in old.get("sections") or [] for t in sec.get("tables") or []
            if t.get("caption") == LOSO_CAPTION for r in t.get("rows") or []]
    if not items or not rows:
        return [], [], {}
    if "Carried over" in items[0]:
        return items[:1], rows, dict((old.get("figures") or {}).get("loso") or {})
    items = [items[0] + f" Carried over from the card of {CLASSIFIER} {old.get('version')} (the run's outputs are "
             "gone; the figures are the recipe's, measured once, and did not depend on the shipped weights)."]
    return items, rows, dict((old.get("figures") or {}).get("loso") or {})


def loso_table(rows: list[list[Any]]) -> dict[str, Any]:
    return {"caption": LOSO_CAPTION, "columns": ["held-out source", "images / patients", "classes",
                                                 "COVID-19 sensitivity", "COVID-19 AUC", "normal sensitivity",
                                                 "non-dominant-source specificity"], "rows": rows}


LOSO_CAPTION = "Leave-one-source-out, reference recipe (95% patient-bootstrap CIs)"


def refresh_classifier_card(stored: dict[str, Any], runs: Path, loso: Path | None, loso_model: str) -> dict[str, Any]:
    """The stored card with its INT8, shortcut-audit and leave-one-source-out parts re-read from measured files.

    For when the training run's outputs are gone (the weights are not re-made): every other figure is the stored
    one, written by an earlier run of this script. Items are matched by the prefixes these helpers write.
    """
    import copy

    card = copy.deepcopy(stored)
    int8_text, gate = int8_summary(runs)
    audit_items, audit_figs = audit_summary(runs)
    loso_items, loso_rows, loso_figs = loso_summary(loso, loso_model)
    card.setdefault("figures", {}).update({"int8_gate": gate, "audit": audit_figs, "loso": loso_figs})
    generated = ("INT8 parity:", "Shortcut audit", "The shortcut audit", "The audit ran on", "Grad-CAM relevance",
                 "Leave-one-source-out")
    for sec in card.get("sections") or []:
        items = [i for i in sec.get("items") or [] if not str(i).startswith(generated)]
        if sec.get("title") == "Evaluation data":
            items += loso_items
        if sec.get("title") == "Quantitative analyses":
            items += [f"INT8 parity: {int8_text}", *audit_items]
            tables = [t for t in sec.get("tables") or [] if t.get("caption") != LOSO_CAPTION]
            sec["tables"] = tables + ([loso_table(loso_rows)] if loso_rows else [])
        if "items" in sec or items:
            sec["items"] = items
    return card


def severity_rows(m: dict[str, Any]) -> list[list[Any]]:
    """target, MAE, Pearson r, R^2, MAE of the train mean (metrics as {value, ci95})."""
    def f(d: dict[str, Any] | None) -> str:
        if not isinstance(d, dict) or d.get("value") is None:
            return "n/a"
        lo, hi = (d.get("ci95") or [None, None])[:2]
        return f"{d['value']:.2f}" + (f" [{lo:.2f}, {hi:.2f}]" if lo is not None else "")

    met = (m.get("scores") or {}).get("metrics") or {}
    base = ((m.get("baseline_train_mean") or {}).get("metrics")) or {}
    return [[t, f(met.get(f"{t}_mae")), f(met.get(f"{t}_pearson_r")), f(met.get(f"{t}_r2")), f(base.get(f"{t}_mae"))]
            for t in ("geographic_extent", "opacity") if f"{t}_mae" in met]


# --------------------------------------------------------------------------- cards
def classifier_card(runs: Path, version: str, recipe: str, seed: int, loso: Path | None = None,
                    loso_model: str = "mnv2") -> dict[str, Any]:
    from covidcxr.models.checkpoint import read_bundle
    from covidcxr.reference_models import LICENSE, RESEARCH_ONLY

    b = read_bundle(runs / "run" / "best.ckpt")
    t = b.get("training") or {}
    test = load_json(runs / "eval-test" / "metrics.json")
    hold = load_json(runs / "eval-actualmed" / "metrics.json")
    if test is None or hold is None:
        sys.exit(f"model_card: {runs}/eval-test or eval-actualmed missing: run scripts/train_reference.sh first")
    ref = pd.read_csv(runs / "reference-manifest.csv")
    held = pd.read_csv(runs / "actualmed-holdout.csv")
    int8_text, gate = int8_summary(runs)
    w = t.get("weights") or {}
    cal = test.get("calibration") or {}
    worst = (test.get("groups") or {}).get("worst_group_sensitivity") or {}
    seconds = "?"
    if (runs / "seconds").is_file():  # one line per stage run (all, then post when resumed)
        seconds = str(sum(int(x) for x in (runs / "seconds").read_text().split() if x.isdigit()))
    figures = {
        "test": {"covid_auc": test["metrics"]["per_class"]["COVID-19"]["auc"],
                 "balanced_accuracy": test["metrics"]["balanced_accuracy"],
                 "ece_before": (cal.get("before") or {}).get("ece"), "ece_after": (cal.get("after") or {}).get("ece")},
        "actualmed": {"covid_auc": hold["metrics"]["per_class"]["COVID-19"]["auc"],
                      "covid_sensitivity": hold["metrics"]["per_class"]["COVID-19"]["sensitivity"],
                      "normal_sensitivity": hold["metrics"]["per_class"]["normal"]["sensitivity"]},
        "int8_gate": gate,
    }
    audit_items, figures["audit"] = audit_summary(runs)
    loso_items, loso_rows, figures["loso"] = loso_summary(loso, loso_model)
    if not loso_rows:
        kept = stored_loso(recipe)
        if kept[1]:
            loso_items, loso_rows, figures["loso"] = kept
    header = ["setting", "images / patients", "COVID-19 AUC", "COVID-19 sensitivity", "COVID-19 specificity",
              "balanced accuracy", "ECE"]
    sections = [
        {"title": "Model details", "items": [
            f"covidcxr-reference {version}: MobileNetV2 ({b['arch']}), ImageNet-initialised ({t.get('weights_init')}, "
            f"sha256 {str(w.get('sha256'))[:16]}…), fine-tuned by recipe `{recipe}` (seed {seed}), "
            + (f"{((t.get('config') or {}).get('trainer') or {}).get('max_epochs', '?')} epochs at {b['preset']['size']} px "
             f"(best by validation COVID-19 AUC: epoch {t.get('epoch', '?')}, counted from 0)." if not t.get("stopped")
             else f"at {b['preset']['size']} px: {t['stopped']} (stopped for CPU time on the shared machine; the first "
             "epoch trains the head alone on the frozen ImageNet body, the second fine-tunes the whole network)."),
            f"Input: one frontal chest X-ray, preprocessing preset `{b['preset']['name']}` "
            f"({b['preset'].get('description', '')}). Output: probabilities for {', '.join(b['classes'])}.",
            f"Decision rule: COVID-19 when p(COVID-19) >= {b.get('threshold'):.4f} (chosen on the validation split for "
            f"sensitivity >= 0.95), else the most probable other class. Temperature {b.get('temperature', 1.0):.3f} "
            "(fitted on the validation split).",
            f"Provenance: training manifest sha256 {t.get('manifest_sha256')}; covidcxr {b.get('covidcxr_version')} "
            f"(git {git_commit()}); torch {t.get('torch')}; trained by scripts/train_reference.sh in {seconds} s of a "
            "shared 2-core CPU.",
            f"Stored as float16 safetensors + JSON (no pickle), restored to float32 on load. Licence: {LICENSE}.",
        ]},
        {"title": "Intended use", "items": [
            f"{RESEARCH_ONLY}: a reference point for research on COVID-19 chest X-ray classifiers, for testing "
            "covidcxr's tools (predict, serve, DICOM node, explain) and as a starting point for fine-tuning.",
            "Out of scope: diagnosis, triage, screening of patients, or any clinical decision. Not a medical device; "
            "no clinical performance is claimed.",
            SITE_STEPS,
        ]},
        {"title": "Factors", "paragraphs": [
            "The public sources differ in hospital, device, export pipeline and in which classes they hold: NIH "
            "supplies nearly all normal and pneumonia images, Cohen/Hannover/Figure1 nearly all COVID-19 images. "
            "Source is therefore confounded with class, and the figures are reported per source and on a hospital "
            "(Actualmed) whose images never entered training."]},
        {"title": "Metrics", "paragraphs": [
            f"COVID-19 one-vs-rest AUC, sensitivity and specificity at the stored threshold, balanced accuracy, and the "
            f"expected calibration error (ECE, {(cal.get('before') or {}).get('n_bins', 15)} bins). 95% intervals: "
            f"{test['metrics']['bootstrap']['n_boot']} bootstrap replicates over patients, stratified by class "
            "(Clopper-Pearson where every replicate agrees)."]},
        {"title": "Training data", "paragraphs": [
            "The merged benchmark of scripts/results_classification.sh: covid-cxr-dev (Cohen, Figure1, Actualmed "
            "subsets), the NIH ChestX-ray14 subset and Hannover, built with `covidcxr data build --seed 62`, split by "
            "linked person (patients sharing an image across sources are one person). Every person with an Actualmed "
            "image was then removed from train and val."], "tables": [data_table(ref, held)]},
        {"title": "Evaluation data", "items": [
            f"Patient split: the test split ({test['metrics']['n_images']} images, {test['metrics']['n_patients']} "
            "patients), no patient of which is in train or val.",
            f"Actualmed hold-out: all {hold['metrics']['n_images']} Actualmed images ({hold['metrics']['n_patients']} "
            "patients; COVID-19 and normal only), a hospital the model never saw.",
            *loso_items,
        ]},
        {"title": "Quantitative analyses", "tables": [
            {"caption": "Headline figures (95% patient-bootstrap CIs)", "columns": header,
             "rows": [headline("patient split, test", test), headline("Actualmed hold-out (new hospital)", hold)]},
            {"caption": "Per source (patient split test, then the Actualmed hold-out)",
             "columns": ["setting", "source", "images / patients", "classes", "accuracy", "COVID-19 sensitivity",
                         "COVID-19 AUC"],
             "rows": per_source_table(test, "test") + per_source_table(hold, "hold-out")},
            *([loso_table(loso_rows)] if loso_rows else []),
        ], "items": [
            f"Worst (source, class) group sensitivity on the test split: {ci(worst)} ({worst.get('cell', '?')}).",
            f"Calibration: ECE {(cal.get('before') or {}).get('ece', float('nan')):.3f} before and "
            f"{(cal.get('after') or {}).get('ece', float('nan')):.3f} after temperature scaling "
            f"(T = {cal.get('temperature_fitted', float('nan')):.3f}, fitted on val) on the test split.",
            f"INT8 parity: {qat_summary(t)}{int8_text}",
            *audit_items,
        ]},
        {"title": "Ethical considerations", "items": [
            "Patients: public, de-identified research images; no new patient data were collected.",
            "Shortcuts: with source confounded with class, a high AUC on the patient split can come from recognising "
            "the source (text, borders, exposure) rather than disease; the hold-out and per-source rows show how much "
            "of it survives at a new hospital.",
            "Licence: training images include CC BY-NC-SA sources (Figure1, Cohen images), so the weights are released "
            "non-commercially under the same terms.",
        ]},
        {"title": "Caveats and recommendations", "items": [
            "Small data: a few hundred patients, mostly from early-2020 public collections; the CIs are wide.",
            "The new-hospital figures above (Actualmed) are the ones to expect elsewhere, not the patient-split ones.",
            SITE_STEPS,
            "Re-running scripts/train_reference.sh with the same seed on the same data gives the same split and "
            "manifest sha256; the weights differ in the last digits (CPU thread scheduling is not bit-reproducible), "
            "so the test figures are expected within the CIs above, not identical. `RERUN=1 bash "
            "scripts/train_reference.sh` checks it and sets the figures side by side (docs/reproducibility.md).",
        ]},
    ]
    return {"name": "covidcxr-reference", "version": version, "license": LICENSE,
            "trained_on": "merged public benchmark (Cohen, Figure1, NIH ChestX-ray14 subset, Hannover); Actualmed "
                          "held out", "data_source": "../shared/data (covid-cxr-dev, nih-cxr14-subset, hannover-covid)",
            "intended_use": RESEARCH_ONLY, "figures": figures,
            "summary": (f"3-class chest X-ray classifier (normal / pneumonia / COVID-19). Patient-split test COVID-19 "
                        f"AUC {ci(figures['test']['covid_auc'])}; Actualmed hold-out (new hospital) COVID-19 AUC "
                        f"{ci(figures['actualmed']['covid_auc'])}. {RESEARCH_ONLY}."),
            "sections": sections}


def severity_card(runs: Path, version: str, seed: int) -> dict[str, Any]:
    from covidcxr.models.checkpoint import read_bundle
    from covidcxr.reference_models import LICENSE, RESEARCH_ONLY

    b = read_bundle(runs / "severity" / "best.ckpt")
    t = b.get("training") or {}
    m = load_json(runs / "severity-eval" / "metrics.json") or {}
    rows = severity_rows(m)
    ref = pd.read_csv(runs / "reference-manifest.csv")
    scored = ref[ref.get("geographic_extent").notna()] if "geographic_extent" in ref else ref.iloc[:0]
    counts = [[s, int((scored.split == s).sum()), int(scored[scored.split == s].patient_id.nunique())]
              for s in ("train", "val", "test")]
    sections = [
        {"title": "Model details", "items": [
            f"covidcxr-reference-severity {version}: the reference classifier's MobileNetV2 body with a new 2-output "
            f"regression head (geographic extent 0-8, opacity 0-6), fine-tuned by `covidcxr severity train --task "
            f"scores --init` (seed {seed}); preset `{b['preset']['name']}`.",
            f"Provenance: training manifest sha256 {t.get('manifest_sha256') or sha256(runs / 'reference-manifest.csv')}; "
            f"covidcxr {b.get('covidcxr_version')} (git {git_commit()}). Licence: {LICENSE}.",
        ]},
        {"title": "Intended use", "items": [
            f"{RESEARCH_ONLY}: `--severity reference` scores images the classifier calls COVID-19, for research on "
            "severity scoring. Out of scope: any clinical grading.", SITE_STEPS]},
        {"title": "Factors", "paragraphs": ["Scores exist only for COVID-19 images of the Cohen collection "
                                            "(COVID-Net S annotations), so the model has seen one kind of source."]},
        {"title": "Metrics", "paragraphs": ["Mean absolute error and correlation with the annotators' mean scores; "
                                            "95% patient-bootstrap intervals."]},
        {"title": "Training data", "tables": [{"caption": "Images with severity scores", "columns":
                                               ["split", "images", "patients"], "rows": counts}]},
        {"title": "Evaluation data", "paragraphs": ["The test split of the patient split (images with scores)."]},
        {"title": "Quantitative analyses", "tables": [{"caption": "Test split (95% patient-bootstrap CIs)", "columns":
                                                       ["target", "MAE", "Pearson r", "R^2",
                                                        "MAE of the train mean"], "rows": rows}],
         "paragraphs": [] if rows else ["No severity evaluation found."]},
        {"title": "Ethical considerations", "items": ["As for the classifier: public de-identified images; "
                                                      "non-commercial licence."]},
        {"title": "Caveats and recommendations", "items": [
            "Very few scored patients: treat the figures as a smoke test of the pipeline, not a validated score.",
            SITE_STEPS]},
    ]
    return {"name": "covidcxr-reference-severity", "version": version, "license": LICENSE,
            "trained_on": "COVID-19 images with COVID-Net S scores in the merged benchmark's train split",
            "intended_use": RESEARCH_ONLY, "figures": {"test": m.get("scores")},
            "summary": f"Geographic extent and opacity scores for COVID-19 chest X-rays. {RESEARCH_ONLY}.",
            "sections": sections}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", type=Path)
    ap.add_argument("--version", help="release number (required unless --refresh)")
    ap.add_argument("--recipe", help="recipe file trained (required unless --refresh)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pack", action=argparse.BooleanOptionalAction, default=False,
                    help="store both models with their cards in covidcxr/models/reference/")
    ap.add_argument("--doc", type=Path, default=REPO / "docs" / "model-card.md")
    ap.add_argument("--loso", type=Path, default=REPO / "results-out" / "run3" / "loso",
                    help="leave-one-source-out folder of scripts/results_classification.sh (LOSO/<source>/"
                         "<model>-report/metrics.json); sources without one say 'not measured'")
    ap.add_argument("--loso-model", default="mnv2", help="the reference recipe's model id there (default: mnv2)")
    ap.add_argument("--refresh", action="store_true",
                    help="keep the shipped models and their stored figures; re-read only the INT8 parity "
                         "(RUNS/onnx/model.int8.onnx or RUNS/int8.status), the shortcut audit (RUNS/audit/audit.json) "
                         "and leave-one-source-out (--loso) into the stored cards (JSON sidecars, MANIFEST.json "
                         "sha256) and the doc")
    a = ap.parse_args()
    from covidcxr.reference_models import CLASSIFIER, SEVERITY, card, render_card

    if a.refresh:
        from covidcxr.models import reference

        new = refresh_classifier_card(card(CLASSIFIER), a.runs, a.loso, a.loso_model)
        reference.update_card(CLASSIFIER, new)
        cards = {CLASSIFIER: new, SEVERITY: card(SEVERITY)}
        a.pack, has_sev = False, True
        print(f"refreshed the stored card of {CLASSIFIER} (INT8, shortcut audit, leave-one-source-out); "
              f"MANIFEST.json rewritten")
    else:
        if not a.version or not a.recipe:
            ap.error("--version and --recipe are required (unless --refresh)")
        cards = {CLASSIFIER: classifier_card(a.runs, a.version, a.recipe, a.seed, a.loso, a.loso_model)}
        has_sev = (a.runs / "severity" / "best.ckpt").is_file()
        if has_sev:
            cards[SEVERITY] = severity_card(a.runs, a.version, a.seed)
        else:
            print(f"model_card: no {a.runs}/severity/best.ckpt: the severity card and model are left as they are")
    (a.runs / "cards.json").write_text(json.dumps(cards, indent=1, default=str))
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    doc = [
        "# Model cards: the shipped reference models",
        "",
        f"<!-- generated by scripts/model_card.py from {a.runs}{' (--refresh)' if a.refresh else ''} on {started}; "
        "do not edit by hand: re-run `bash scripts/train_reference.sh` -->",
        "",
        "Research use only; not for diagnosis; not a medical device. Each card is also stored as JSON inside the "
        "model file and printed by `covidcxr models show covidcxr-reference` (`covidcxr-reference-severity`). "
        "Every figure below was written by `scripts/model_card.py` from the evaluation outputs of "
        "`bash scripts/train_reference.sh` (leave-one-source-out: of `scripts/results_classification.sh`); none is "
        "typed by hand.",
        "",
    ]
    for c in cards.values():
        doc.append(render_card(c))
    a.doc.parent.mkdir(parents=True, exist_ok=True)
    a.doc.write_text("\n".join(doc))
    print(f"wrote {a.doc} and {a.runs / 'cards.json'}")
    if a.pack:
        from covidcxr.models import reference

        manifest_sha = sha256(a.runs / "reference-manifest.csv")
        prov = {"recipe_file": a.recipe, "seed": a.seed, "trained_by": "scripts/train_reference.sh",
                "git_commit": git_commit(), "reference_manifest_sha256": manifest_sha}
        reference.pack(a.runs / "run" / "best.ckpt", "covidcxr-reference", version=a.version,
                       card=cards["covidcxr-reference"], provenance=prov)
        if not has_sev:
            return 0
        sev_t = (__import__("covidcxr.models.checkpoint", fromlist=["read_bundle"])
                 .read_bundle(a.runs / "severity" / "best.ckpt").get("training") or {})
        rows = reference.pack(
            a.runs / "severity" / "best.ckpt", "covidcxr-reference-severity", version=a.version,
            card=cards["covidcxr-reference-severity"],
            provenance={**prov, "manifest_sha256": sev_t.get("manifest_sha256") or manifest_sha,
                        "recipe": sev_t.get("recipe") or "covidcxr severity train --task scores --init <reference>",
                        "weights_init": f"covidcxr-reference {a.version} (the reference classifier's body)"})
        total = sum(p.stat().st_size for p in reference.rm.REFERENCE_DIR.iterdir() if p.is_file())
        print(f"packed {', '.join(rows)} into {reference.rm.REFERENCE_DIR} ({total / 1e6:.1f} MB together)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
