"""Audit a split manifest for leakage and confounding.

Reports (JSON + Markdown): class x source x split counts; patients in more than one split; exact
(byte-identical) and near-duplicate (perceptual hash) images across splits; and how well the
source alone predicts the label, with a confounding warning. ``leak`` is true when any patient or
image crosses splits.
"""

from __future__ import annotations

import json
import logging
import os
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidcxr.data.duplicates import ImageFeatures, duplicate_pairs, image_features
from covidcxr.data.hashing import NEAR_DUPLICATE_BITS, file_digest, near_pair_arrays, near_pairs, phash  # noqa: F401
from covidcxr.data.labels import CLASSES
from covidcxr.data.manifest import read_manifest

log = logging.getLogger(__name__)

#: Source-only accuracy above the majority-class rate by this much triggers the confounding warning.
CONFOUNDING_MARGIN = 0.10
#: ... or the source ranks one class against the rest with at least this AUC.
CONFOUNDING_AUC = 0.70


def _source_predictability(df: pd.DataFrame) -> dict[str, Any]:
    """Accuracy of guessing the label from the source alone vs. always guessing the majority class.

    ``in_sample`` fits and scores on all rows; ``train_to_test`` fits the source -> majority-label rule
    on train and scores it on test (what a shortcut-learning model could exploit there).
    """
    labels = df["label"].astype(str)
    majority = labels.value_counts(normalize=True).iloc[0]
    rule = labels.groupby(df["source"]).agg(lambda s: s.value_counts().index[0])
    in_sample = float((df["source"].map(rule) == labels).mean())
    ct = pd.crosstab(df["source"], labels)
    chi2 = 0.0
    if ct.shape[0] > 1 and ct.shape[1] > 1:
        from scipy.stats import chi2_contingency

        chi2 = float(chi2_contingency(ct)[0])
    k = min(ct.shape) - 1
    cramers_v = float(np.sqrt(chi2 / (len(df) * k))) if k > 0 else 0.0
    res: dict[str, Any] = {
        "source_only_accuracy": in_sample,
        "majority_class_rate": float(majority),
        "cramers_v": cramers_v,
        "rule": {str(s): str(lab) for s, lab in rule.items()},
        "label_by_source": {str(s): {str(c): int(n) for c, n in row.items() if n} for s, row in ct.iterrows()},
    }
    if "split" in df.columns and {"train", "test"} <= set(df["split"]):
        tr, te = df[df["split"] == "train"], df[df["split"] == "test"]
        tr_rule = tr["label"].astype(str).groupby(tr["source"]).agg(lambda s: s.value_counts().index[0])
        glob = tr["label"].astype(str).value_counts().index[0]
        pred = te["source"].map(tr_rule).fillna(glob)
        res["train_to_test_accuracy"] = float((pred == te["label"].astype(str)).mean())
        res["test_majority_rate"] = float((te["label"].astype(str) == glob).mean())
    # One class vs rest: how well P(class | source) ranks that class's images (AUC 0.5 = no information).
    from sklearn.metrics import roc_auc_score

    per_class = {}
    rate = pd.crosstab(df["source"], labels, normalize="index")
    for c in sorted(set(labels)):
        y = (labels == c).to_numpy()
        if 0 < y.sum() < len(y) and len(rate) > 1:
            per_class[c] = float(roc_auc_score(y, df["source"].map(rate[c]).to_numpy()))
    res["per_class_source_auc"] = per_class
    worst = max(per_class.items(), key=lambda kv: kv[1], default=(None, 0.5))
    res["confounded"] = bool(in_sample >= majority + CONFOUNDING_MARGIN or cramers_v >= 0.3
                             or worst[1] >= CONFOUNDING_AUC)
    res["most_confounded_class"] = worst[0]
    return res


def _blank(v: object) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v)) or str(v).strip() == ""


def _linked_report(df: pd.DataFrame) -> dict[str, Any] | None:
    """Persons that join several source patient ids (``data build`` links them through duplicate images)."""
    if "source_patient_id" not in df.columns:
        return None
    pid, spid = df["patient_id"].astype(str), df["source_patient_id"].astype(str)
    n_ids = spid.groupby(pid).nunique()
    linked = n_ids[n_ids > 1]
    dup = df["duplicate_of"] if "duplicate_of" in df.columns else pd.Series(np.nan, index=df.index)
    persons = []
    rows_of = df[pid.isin(set(linked.index))].groupby(pid)
    for person in sorted(linked.index):
        rows = rows_of.get_group(person)
        # the images of the joined ids (not the person's own id) that are copies of another id's image
        via = [{"path": str(r["path"]), "duplicate_of": str(dup[k]).split("|"), "source_patient_id": str(spid[k])}
               for k, r in rows.iterrows() if not _blank(dup[k]) and spid[k] != person]
        via = via or [{"path": str(r["path"]), "duplicate_of": str(dup[k]).split("|"), "source_patient_id": str(spid[k])}
                      for k, r in rows.iterrows() if not _blank(dup[k])]
        persons.append({"person": person, "patients": sorted(set(spid[rows.index])),
                        "splits": sorted(set(rows["split"].astype(str))), "images": int(len(rows)), "via": via})
    return {"persons": len(persons), "source_patients": int(linked.sum()),
            "linking_images": sum(len(p["via"]) for p in persons), "by_person": persons}


def audit_manifest(manifest: str | os.PathLike | pd.DataFrame, out_dir: str | os.PathLike | None = None,
                   near_bits: int = NEAR_DUPLICATE_BITS, perceptual: bool = True,
                   digests: list[str | None] | None = None, hashes: np.ndarray | None = None) -> dict[str, Any]:
    """Audit ``manifest``; write ``audit.json`` and ``audit.md`` to ``out_dir`` (default: beside it).

    ``digests`` (SHA-1 per row) and ``hashes`` (64-bit phash per row) skip reading the files, for a
    caller that has them already (benchmarks, tests). Sections: counts; patients across splits;
    exact and near duplicates across splits, and duplicates under two person ids within one split;
    linked persons (from ``source_patient_id``); invented patient ids; source-label confounding.
    """
    if isinstance(manifest, pd.DataFrame):
        df, where = manifest.reset_index(drop=True).copy(), None
    else:
        df, where = read_manifest(manifest, require_split=True, check_leakage=False).reset_index(drop=True), Path(manifest)
    if "split" not in df.columns:
        df["split"] = "train"
    df["patient_id"] = df["patient_id"].astype(str)
    report: dict[str, Any] = {"manifest": str(where) if where else None, "images": len(df),
                              "patients": int(df["patient_id"].nunique())}
    counts = df.groupby(["label", "source", "split"]).size()
    report["counts"] = [{"label": lab, "source": s, "split": sp, "images": int(n)} for (lab, s, sp), n in counts.items()]

    # patients across splits
    splits = sorted(set(df["split"].dropna()), key=lambda s: ["train", "val", "test"].index(s) if s in ("train", "val", "test") else 9)
    pats = {s: set(df.loc[df["split"] == s, "patient_id"]) for s in splits}
    overlap = {f"{a}/{b}": sorted(pats[a] & pats[b]) for a, b in combinations(splits, 2)}
    report["patient_overlap"] = {k: {"count": len(v), "examples": v[:10]} for k, v in overlap.items()}

    # exact and near duplicates
    unreadable: list[str] = []
    if digests is None or (perceptual and hashes is None):
        # the same verified duplicate search as `data build`: phash candidates and ORB/RANSAC checks
        feats = image_features(df["path"].astype(str).tolist(), perceptual=perceptual and hashes is None)
        unreadable += [msg for _, msg in feats.unreadable]
        bad = {i for i, _ in feats.unreadable}
        if digests is not None:
            feats.digests = list(digests)
        if hashes is not None:
            feats.hashes = np.asarray(hashes, dtype=np.uint64)
    else:  # precomputed fingerprints (benchmarks): phash pairs count unverified
        feats = ImageFeatures(digests=list(digests), hashes=np.asarray(hashes, dtype=np.uint64) if perceptual else None)
        bad = {i for i, d in enumerate(digests) if d is None}
    digests = feats.digests
    df["_digest"] = list(digests)
    split_arr = df["split"].astype(str).to_numpy()
    pid_arr = df["patient_id"].to_numpy()
    exact_cross, exact_within, unlinked = [], 0, []
    known = df.dropna(subset=["_digest"])
    for _, grp in known[known["_digest"].duplicated(keep=False)].groupby("_digest"):  # only shared digests
        if grp["split"].nunique() > 1:
            exact_cross.append({"paths": grp["path"].tolist(), "splits": grp["split"].tolist(),
                                "patients": grp["patient_id"].tolist()})
        else:
            exact_within += len(grp) - 1
            if grp["patient_id"].nunique() > 1:
                unlinked.append({"paths": grp["path"].tolist()[:2], "patients": grp["patient_id"].tolist()[:2],
                                 "split": str(grp["split"].iloc[0]), "kind": "identical", "score": 0})
    report["exact_duplicates"] = {"across_splits": len(exact_cross), "within_split": exact_within,
                                  "examples": exact_cross[:20]}
    if perceptual:
        near_cross, near_within = [], 0
        for i, j, kind, score in duplicate_pairs(feats, near_bits, skip=bad):
            pair = {"paths": [df.at[i, "path"], df.at[j, "path"]], "patients": [pid_arr[i], pid_arr[j]],
                    "kind": kind, "score": int(score)}
            if split_arr[i] != split_arr[j]:
                near_cross.append({**pair, "splits": [split_arr[i], split_arr[j]]})
            else:
                near_within += 1
                if pid_arr[i] != pid_arr[j]:
                    unlinked.append({**pair, "split": split_arr[i]})
        report["near_duplicates"] = {"max_hamming_bits": near_bits, "across_splits": len(near_cross),
                                     "within_split_pairs": near_within,
                                     "verified": feats.descriptors is not None,
                                     "examples": sorted(near_cross, key=lambda r: (r["kind"], r["score"]))[:20]}
    # Same picture under two person ids in one split: no split leak, but the patient bootstrap counts
    # one person twice. Manifests from `data build` link these, so this flags hand-made manifests.
    report["unlinked_duplicates"] = {"pairs": len(unlinked), "examples": unlinked[:20]}
    report["linked"] = _linked_report(df)
    invented = {}
    if "patient_id_from" in df.columns:
        how = df["patient_id_from"].astype(str)
        invented = {str(k): int(v) for k, v in how[how.isin(["filename", "image"])].value_counts().items()}
    report["patient_ids_invented"] = {"images": int(sum(invented.values())), "by_method": invented}
    report["unreadable"] = unreadable
    report["source_predicts_label"] = _source_predictability(df)
    n_patient = sum(v["count"] for v in report["patient_overlap"].values())
    n_near = report.get("near_duplicates", {}).get("across_splits", 0)
    report["leak"] = bool(n_patient or report["exact_duplicates"]["across_splits"] or n_near)
    report["patient_leakage_checked"] = not invented
    warnings = []
    if invented:
        warnings.append(f"patient ids were INVENTED for {sum(invented.values())} of {len(df)} image(s) "
                        f"({', '.join(f'{n} from the {k}' for k, n in invented.items())}): images of one patient may "
                        "sit in two splits without any id showing it, so patient leakage was NOT checked for them")
    if n_patient:
        warnings.append(f"{n_patient} patient(s) appear in more than one split")
    if report["exact_duplicates"]["across_splits"]:
        warnings.append(f"{report['exact_duplicates']['across_splits']} byte-identical image(s) cross splits")
    if n_near:
        warnings.append(f"{n_near} near-duplicate image pair(s) (phash <= {near_bits} bits) cross splits")
    if unlinked:
        warnings.append(f"{len(unlinked)} duplicate image pair(s) within one split carry two different patient ids: "
                        "the patient bootstrap counts one person twice (rebuild with `covidcxr data build` to link them)")
    if unreadable:
        warnings.append(f"{len(unreadable)} unreadable file(s)")
    sp = report["source_predicts_label"]
    if sp["confounded"]:
        warnings.append(
            f"CONFOUNDING: the source alone predicts the label (accuracy {sp['source_only_accuracy']:.2f} vs majority "
            f"class {sp['majority_class_rate']:.2f}; Cramer's V {sp['cramers_v']:.2f}; "
            + ", ".join(f"{c} AUC {a:.2f}" for c, a in sp["per_class_source_auc"].items())
            + "); a model can learn the source instead of the disease: report per-source results and a source holdout")
    report["warnings"] = warnings
    if out_dir is not None or where is not None:
        out = Path(out_dir) if out_dir is not None else where.parent
        out.mkdir(parents=True, exist_ok=True)
        (out / "audit.json").write_text(json.dumps(report, indent=2, default=str))
        (out / "audit.md").write_text(audit_markdown(report))
        report["written"] = [str(out / "audit.json"), str(out / "audit.md")]
    return report


def audit_markdown(r: dict[str, Any]) -> str:
    """Human-readable audit report."""
    lines = ["# Dataset audit", "", f"Manifest: `{r['manifest']}`  ", f"{r['images']} images, {r['patients']} patients.", ""]
    if r["leak"]:
        result = "**Result: LEAKAGE FOUND**"
    elif not r.get("patient_leakage_checked", True):
        n = r["patient_ids_invented"]["images"]
        result = (f"**Result: no image leaks across splits; patient leaks NOT checked: the patient ids of {n} "
                  "image(s) were invented.**")
    else:
        result = "**Result: no patient or image leaks across splits.**"
    lines += [result, ""]
    if r["warnings"]:
        lines += ["## Warnings", ""] + [f"- {w}" for w in r["warnings"]] + [""]
    counts = pd.DataFrame(r["counts"])
    lines += ["## Images by class, source and split", ""]
    if not counts.empty:
        tab = counts.pivot_table(index=["source", "label"], columns="split", values="images", aggfunc="sum", fill_value=0)
        cols = [c for c in ("train", "val", "test") if c in tab.columns] + [c for c in tab.columns if c not in ("train", "val", "test")]
        lines += ["| source | label | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
        order = {c: i for i, c in enumerate(CLASSES)}
        for (src, lab), row in sorted(tab.iterrows(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 9))):
            lines.append(f"| {src} | {lab} | " + " | ".join(str(int(row[c])) for c in cols) + " |")
    lines += ["", "## Patient overlap between splits", ""]
    for k, v in r["patient_overlap"].items():
        ex = f" (e.g. {', '.join(v['examples'][:5])})" if v["count"] else ""
        lines.append(f"- {k}: {v['count']}{ex}")
    e = r["exact_duplicates"]
    lines += ["", "## Duplicate images", "", f"- byte-identical across splits: {e['across_splits']} (within a split: {e['within_split']})"]
    if "near_duplicates" in r:
        n = r["near_duplicates"]
        how = ("verified by matching keypoints" if n.get("verified", True) else "phash only, unverified")
        lines.append(f"- near-duplicates across splits (phash Hamming <= {n['max_hamming_bits']} of 64 bits, or cropped/"
                     f"rotated copies; {how}): {n['across_splits']} (pairs within a split: {n['within_split_pairs']})")
        for ex in n["examples"][:10]:
            what = f"{ex['score']} bits" if ex["kind"] == "near" else f"{ex['kind']}, {ex['score']} matching keypoints"
            lines.append(f"  - {what}: `{ex['paths'][0]}` ({ex['splits'][0]}) ~ `{ex['paths'][1]}` ({ex['splits'][1]})")
    for ex in e["examples"][:10]:
        lines.append(f"  - identical: " + ", ".join(f"`{p}` ({s})" for p, s in zip(ex["paths"], ex["splits"])))
    if r.get("unlinked_duplicates", {}).get("pairs"):
        lines.append(f"- duplicate pairs within one split under two patient ids: {r['unlinked_duplicates']['pairs']}")
        for ex in r["unlinked_duplicates"]["examples"][:5]:
            lines.append(f"  - {ex['patients'][0]} `{ex['paths'][0]}` ~ {ex['patients'][1]} `{ex['paths'][1]}` ({ex['split']})")
    lk = r.get("linked")
    lines += ["", "## Patients linked across sources", ""]
    if lk is None:
        lines.append("- no `source_patient_id` column: this manifest carries no linking information")
    else:
        lines.append(f"- {lk['source_patients']} source patient ids are linked into {lk['persons']} persons "
                     f"through {lk['linking_images']} image(s) that are copies of another id's image")
        for p in lk["by_person"][:15]:
            via = "; ".join(f"`{Path(v['path']).name}` = `{Path(v['duplicate_of'][0]).name}`" for v in p["via"][:2])
            more = f" (+{len(p['via']) - 2} more)" if len(p["via"]) > 2 else ""
            lines.append(f"  - {p['person']} ({', '.join(p['patients'])}; {p['images']} images in {'/'.join(p['splits'])}): "
                         f"{via}{more}")
        if lk["persons"] > 15:
            lines.append(f"  - ... {lk['persons'] - 15} more in audit.json")
    inv = r.get("patient_ids_invented", {"images": 0})
    if inv["images"]:
        lines += ["", "## Invented patient ids", "",
                  f"- {inv['images']} image(s) have patient ids that the source did not give ("
                  + ", ".join(f"{n} from the {k}" for k, n in inv["by_method"].items()) + "). "
                  "A patient with several images may cross splits unseen: patient leakage is not checked for them."]
    sp = r["source_predicts_label"]
    lines += ["", "## Does the source predict the label?", "",
              f"- accuracy of guessing the label from the source alone: {sp['source_only_accuracy']:.3f} "
              f"(always guessing the majority class: {sp['majority_class_rate']:.3f}); Cramer's V {sp['cramers_v']:.3f}"]
    if "train_to_test_accuracy" in sp:
        lines.append(f"- rule fitted on train, scored on test: {sp['train_to_test_accuracy']:.3f} "
                     f"(majority class on test: {sp['test_majority_rate']:.3f})")
    if sp.get("per_class_source_auc"):
        lines.append("- one class vs rest, AUC of ranking by the class's rate in the image's source: "
                     + ", ".join(f"{c} {a:.3f}" for c, a in sp["per_class_source_auc"].items()))
    lines.append(f"- confounded: {'YES' if sp['confounded'] else 'no'}")
    if r["unreadable"]:
        lines += ["", "## Unreadable files", ""] + [f"- {u}" for u in r["unreadable"]]
    return "\n".join(lines) + "\n"
