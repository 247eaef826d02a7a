"""New-hospital results (issue 18 §4): the actualmed hold-out model before and after `covidcxr site calibrate`.

    python scripts/results_site.py RUNS [--models robust mnv2 | ID=CKPT ...] [--doc docs/results.md] [--coverage 0.9]
                                        [--folds 5] [--bootstrap 1000] [--reuse] [--jobs 1]

RUNS is the folder of scripts/results_classification.sh (stage holdout): RUNS/holdout/manifest.csv put every
actualmed person in test and trained RUNS/holdout/ID/best.ckpt without actualmed. For each model id this
1. writes the local manifest RUNS/site/actualmed.csv: the actualmed test rows (absolute paths, patient ids);
2. runs `covidcxr site check` on those films (no labels) -> RUNS/site/ID-check/site_check.json;
3. runs `covidcxr site calibrate` on them, without and with --adapt-bn, each without and with --bias
   (bias-corrected temperature scaling: per-class logit biases fitted with the temperature)
   -> RUNS/site/ID-site[-adabn][-bias].ckpt.
   The command cross-fits by patient (k folds, StratifiedGroupKFold on patient_id: calibration and scoring
   never share a patient) and records, in the checkpoint, the before/after figures and the paired,
   patient-level bootstrap of after - before (covidcxr.evaluate.paired) computed from the out-of-fold
   predictions;
4. reads those records back and writes the tables (RUNS/site/results_site.md, and the site:begin/end block of
   --doc when given). Nothing is typed by hand. Research use only: not a clinical performance claim.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/, also when loaded by file path
from docblock import replace_block  # noqa: E402

BEGIN, END = "<!-- site:begin -->", "<!-- site:end -->"
SOURCE = "actualmed"
#: (--adapt-bn, --bias) of each site calibrate run, in table order
VARIANTS = ((False, False), (True, False), (False, True), (True, True))


def site_ckpt(site: Path, m: str, adabn: bool, bias: bool) -> Path:
    return site / f"{m}-site{'-adabn' if adabn else ''}{'-bias' if bias else ''}.ckpt"


def _bias(info: dict[str, Any]) -> str:
    b = info.get("logit_bias")
    if b is None:
        return "no"
    return "yes (" + ", ".join(f"{c} {v:+.2f}" for c, v in zip(info["conformal"]["classes"], b)) + ")"


def local_manifest(runs: Path, out: Path) -> pd.DataFrame:
    """The hold-out's actualmed test rows as a site manifest (path,label,patient_id,source), absolute paths."""
    man = runs / "holdout" / "manifest.csv"
    if not man.is_file():
        raise SystemExit(f"error: {man}: not found (run scripts/results_classification.sh with stage holdout)")
    m = pd.read_csv(man, dtype=str, keep_default_na=False)
    rows = m[(m["split"] == "test") & (m["source"] == SOURCE)].copy()
    if rows.empty:
        raise SystemExit(f"error: {man}: no {SOURCE} test rows")
    rows["path"] = [str(p if Path(p).is_absolute() else (man.parent / p).resolve()) for p in rows["path"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    rows[["path", "label", "patient_id", "source"]].to_csv(out, index=False)
    return rows


def actualmed_in_training(ckpt: Path, rows: pd.DataFrame) -> int:
    """How many of the local films the checkpoint's recorded training manifest put in train or val (0 when
    the checkpoint records no manifest that can be read)."""
    from covidcxr.models.checkpoint import read_bundle

    training = read_bundle(ckpt).get("training") or {}
    man = training.get("manifest") or training.get("data")
    if not isinstance(man, str) or not Path(man).is_file():
        print(f"note: {ckpt} records no readable training manifest; its training data is not checked")
        return 0
    m = pd.read_csv(man, dtype=str, keep_default_na=False)
    seen = m.loc[m["split"].isin(["train", "val"]), "path"]
    seen = {str(p if Path(p).is_absolute() else (Path(man).parent / p).resolve()) for p in seen}
    return int(rows["path"].isin(seen).sum())


def run(cmd: list[str], log: Path) -> None:
    print("$", " ".join(cmd), flush=True)
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise SystemExit(f"error: {' '.join(cmd[:3])} failed (exit {r.returncode}; {log}): {tail[0]}")


def site_info(ckpt: Path) -> dict[str, Any]:
    from covidcxr.models.checkpoint import read_bundle
    from covidcxr.site.sets import SITE_KEY

    return read_bundle(ckpt)[SITE_KEY]


def _f(v: Any, d: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{d}f}"


def _ci(row: dict[str, Any], key: str) -> str:
    ci = row.get(key)
    return f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""


def parent_rows(parents: dict[str, Path], ids: list[str], rows: pd.DataFrame) -> list[str]:
    """Which checkpoint each row is: path, sha256, recipe, size, epochs, training manifest, local films seen."""
    from covidcxr.models.checkpoint import read_bundle
    from covidcxr.io import file_sha256

    out = ["| model | checkpoint (sha256) | recipe | input px | trained | training manifest | local films in its "
           "train/val |", "|---|---|---|---|---|---|---|"]
    for m in ids:
        b = read_bundle(parents[m])
        t = b.get("training") or {}
        px = ((b.get("preset") or {}).get("size") if isinstance(b.get("preset"), dict) else None) or "?"
        out.append(f"| {m} | `{parents[m]}` ({file_sha256(parents[m])[:12]}) | {t.get('recipe', '?')} | {px} | "
                   f"{t.get('stopped') or ('epoch ' + str(t.get('epoch')))} | `{t.get('manifest', '?')}` | "
                   f"{actualmed_in_training(parents[m], rows)} |")
    return out + [""]


def render(runs: Path, ids: list[str], rows: pd.DataFrame, coverage: float, parents: dict[str, Path]) -> str:
    from covidcxr.evaluate.paired import format_diff

    counts = ", ".join(f"{k} {v}" for k, v in rows["label"].value_counts().sort_index().items())
    out = [f"Local cases: the {len(rows)} actualmed films of the hold-out's test split ({counts}; "
           f"{rows['patient_id'].nunique()} patients), `{runs.name}/site/actualmed.csv`. Parent models, each "
           "trained and validated without these films (research use only):", ""]
    out += parent_rows(parents, ids, rows)
    out += ["**`site check` (no labels).**", "",
            "| model | films | fit no training source | beyond pooled training q95 | median distance (× training median) "
            "| predicted labels | verdict |", "|---|---|---|---|---|---|---|"]
    for m in ids:
        r = json.loads((runs / "site" / f"{m}-check" / "site_check.json").read_text())
        mix = ", ".join(f"{k} {v}" for k, v in r["predicted_label_mix"].items())
        out.append(f"| {m} | {r['n_images']} | {r['fraction_fitting_no_source']:.0%} | "
                   f"{r['fraction_beyond_training_q95']:.0%} | {_f(r['median_distance_in_training_medians'], 2)} | "
                   f"{mix} | {r['verdict']} |")
    out += ["", f"**`site calibrate`, cross-fitted by patient inside actualmed** (coverage {coverage}; "
            "before = the checkpoint as trained, its own temperature and threshold; after = out-of-fold, each fold "
            "scored by what was fitted on the other folds' patients). Differences: after − before, paired "
            "patient bootstrap, 95 % CI.", "",
            "| model | AdaBN | bias (logit bias per class) | folds | temperature parent → site | COVID-19 threshold parent → site | macro "
            "sensitivity before → after | difference [95 % CI] | per-class sensitivity before → after | COVID-19 AUC "
            "before → after | AUC difference [95 % CI] |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    sets = []
    for m in ids:
        for adabn, bias in VARIANTS:
            ck = site_ckpt(runs / "site", m, adabn, bias)
            if not ck.is_file():
                continue
            info = site_info(ck)
            mt = info["metrics"]
            b, a, pb = mt["before"], mt["after"], (mt.get("paired_bootstrap") or {}).get("metrics", {})
            per = "; ".join(f"{c} {_f(b['sensitivity'][c], 2)} → {_f(a['sensitivity'][c], 2)}"
                            for c in b["sensitivity"] if b["sensitivity"][c] is not None)
            ms, au = pb.get("macro_sensitivity", {}), pb.get("auc", {})
            par = info["parent"]
            out.append(f"| {m} | {'yes' if adabn else 'no'} | {_bias(info)} | {mt['folds']} | {_f(par.get('temperature'))} → "
                       f"{_f(info.get('temperature'))} | {_f(par.get('threshold'))} → {_f(info.get('threshold'))} | "
                       f"{_f(b['macro_sensitivity'])}"
                       f"{_ci(ms, 'a_ci')} → {_f(a['macro_sensitivity'])}{_ci(ms, 'b_ci')} | "
                       f"{format_diff(ms) if ms else 'n/a'} | {per} | {_f(b.get('covid_auc'))} → "
                       f"{_f(a.get('covid_auc'))} | {format_diff(au) if au else 'n/a'} |")
            conf = info["conformal"]
            cov = "; ".join(f"{c} {_f(v, 2)} (n={int((rows['label'] == c).sum())})"
                            for c, v in a["set_coverage"].items() if v is not None)
            sets.append(f"| {m} | {'yes' if adabn else 'no'} | {'yes' if bias else 'no'} | {cov} | {a['mean_set_size']:.2f} | "
                        f"{a['fraction_uncertain']:.0%} | {', '.join(conf.get('always_in') or []) or 'none'} | "
                        + "; ".join(f"{c} {n}" for c, n in conf["n"].items()) + " |")
    out += ["", f"**Conformal prediction sets** (class-conditional split-conformal, crepes; nominal coverage "
            f"{coverage}). Coverage and set size are out-of-fold (each fold's sets fitted on the other folds, so "
            "about 4/5 of a class's films calibrate them); 'always in' and the calibration counts are those of "
            "the final site checkpoint, fitted on all the local films. A class with fewer films than "
            "the coverage needs is always in the set.", "",
            "| model | AdaBN | bias | per-class coverage, out-of-fold (films) | mean set size | 'uncertain: refer' | "
            "always in the set (final checkpoint) | calibration films per class (final) |",
            "|---|---|---|---|---|---|---|---|"] + sets
    return "\n".join(out) + "\n"


def fill(doc: Path, block: str) -> None:
    err = replace_block(doc, BEGIN, END, block)
    if err:
        raise SystemExit(err)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", type=Path)
    ap.add_argument("--models", nargs="+", default=["robust", "mnv2"],
                    help="hold-out model ids (RUNS/holdout/ID/best.ckpt), or ID=PATH for any checkpoint trained "
                         "and validated without actualmed")
    ap.add_argument("--doc", type=Path, default=None, help="markdown file whose site:begin/end block is filled")
    ap.add_argument("--coverage", type=float, default=0.9)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--reuse", action="store_true", help="keep site reports/checkpoints that already exist")
    ap.add_argument("--jobs", type=int, default=1, help="site commands run side by side")
    a = ap.parse_args(argv)
    cx = str(Path(sys.executable).with_name("covidcxr"))
    site = a.runs / "site"
    rows = local_manifest(a.runs, site / "actualmed.csv")
    # ID (RUNS/holdout/ID/best.ckpt) or ID=PATH: any checkpoint trained and validated without actualmed
    parents = {m.split("=", 1)[0]: Path(m.split("=", 1)[1]) if "=" in m else a.runs / "holdout" / m / "best.ckpt"
               for m in a.models}
    ids = [m for m, p in parents.items() if p.is_file()]
    for m in sorted(set(parents) - set(ids)):
        print(f"{m}: no {parents[m]}; left out")
    if not ids:
        raise SystemExit("error: no hold-out model to calibrate")
    leaks = {m: n for m in ids if (n := actualmed_in_training(parents[m], rows))}
    if leaks:  # a parent that learnt from these films would make the "new hospital" figures meaningless
        raise SystemExit(f"error: {', '.join(f'{m} trained on {n} of the local films' for m, n in leaks.items())}")
    todo: list[tuple[list[str], Path]] = []
    for m in ids:
        ckpt = str(parents[m])
        if not (a.reuse and (site / f"{m}-check" / "site_check.json").is_file()):
            todo.append(([cx, "site", "check", str(site / "actualmed.csv"), "--model", ckpt, "--out",
                          str(site / f"{m}-check")], site / f"{m}-check.log"))
        for adabn, bias in VARIANTS:
            out = site_ckpt(site, m, adabn, bias)
            if a.reuse and out.is_file():
                continue
            out.unlink(missing_ok=True)
            todo.append(([cx, "site", "calibrate", "--model", ckpt, "--data", str(site / "actualmed.csv"), "--out",
                          str(out), "--site", SOURCE, "--coverage", str(a.coverage), "--folds", str(a.folds),
                          "--bootstrap", str(a.bootstrap)] + (["--adapt-bn"] if adabn else [])
                         + (["--bias"] if bias else []), out.with_suffix(".log")))
    # the commands are independent (each reads the parent checkpoint, writes its own output): side by side
    with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        list(pool.map(lambda t: run(*t), todo))
    block = render(a.runs, ids, rows, a.coverage, parents)
    (site / "results_site.md").write_text(block)
    if a.doc:
        fill(a.doc, block)
    print(block)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
