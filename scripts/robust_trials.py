"""Validation trials that choose configs/robust-mobilenet_v2.yaml (issue 18 §2): each option of the robust recipe
trained briefly on the merged benchmark with actualmed held out, scored on the VALIDATION split only.

For each trial: ``covidcxr train`` (the transfer recipe plus the trial's ``--set`` overrides and the CPU
settings below), then the val images through ``best.ckpt`` at its stored rule (the COVID-19 threshold chosen on
val at sensitivity 0.95, else argmax), and per (source, class) cell the sensitivity (recall of the cell's class).
Worst-group sensitivity: the lowest over cells with >= 5 val images. Also val COVID-19 AUC and the val
specificity of normal/pneumonia films from non-NIH sources (there are only cohen pneumonias in val).
The test split and the actualmed hold-out are never read here. Research use only.

    COVIDCXR_WEIGHTS_DIR=../shared/weights .venv/bin/python scripts/robust_trials.py \\
        --data /tmp/h2/holdout/manifest.csv --runs /tmp/h2/trials [--trials baseline gb gb_dro ...] \\
        [--size 160] [--epochs 2] [--batches 14] [--jobs 2] [--nice 0] [--precision 32-true]

Writes RUNS/trials.json and prints a markdown table (docs/recipes.md, "robust recipe: how it was chosen").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
GROUPED = ["data.sampler=group_balanced", "loss.class_weights=null"]
TRIALS: dict[str, list[str]] = {
    "baseline": [],  # the transfer recipe as it is (balanced class weights, plain shuffle)
    "gb": GROUPED,
    "gb_dro": [*GROUPED, "loss.kind=group_dro", "loss.dro_eta=0.01"],
    "gb_adv": [*GROUPED, "adversary.kind=source", "adversary.weight=0.1"],
    "gb_dro_adv": [*GROUPED, "loss.kind=group_dro", "loss.dro_eta=0.01", "adversary.kind=source",
                   "adversary.weight=0.1"],
    "gb_aug": [*GROUPED, "data.augment=source-random"],
    "gb_dro_aug": [*GROUPED, "loss.kind=group_dro", "loss.dro_eta=0.01", "data.augment=source-random"],
    "gb_hist": [*GROUPED, "data.hist_standardize=film"],
    "gb_dro_adv_aug": [*GROUPED, "loss.kind=group_dro", "loss.dro_eta=0.01", "adversary.kind=source",
                       "adversary.weight=0.1", "data.augment=source-random"],
    "gb_dro_adv_hist": [*GROUPED, "loss.kind=group_dro", "loss.dro_eta=0.01", "adversary.kind=source",
                        "adversary.weight=0.1", "data.hist_standardize=film"],
    # linear probes (model.freeze_backbone: the body stays frozen for every epoch): the ImageNet
    # features kept as they are, the question issue 18 asks ("fine-tuning must not lose what the features hold")
    "gb_lp": [*GROUPED, "model.freeze_backbone=true", "optimizer.lr=3e-3"],
    "gb_dro_lp": [*GROUPED, "loss.kind=group_dro", "loss.dro_eta=0.01", "model.freeze_backbone=true",
                  "optimizer.lr=3e-3"],
    # the probe on lung-field standardised films (the mapping fitted inside the pretrained U-Net's lung mask)
    "gb_lp_lunghist": [*GROUPED, "model.freeze_backbone=true", "optimizer.lr=3e-3", "data.hist_standardize=lung"],
}


def common(args: argparse.Namespace) -> list[str]:
    # limit_train_batches: the same budget for every trial (a group-balanced epoch on the actualmed hold-out
    # build is 448 draws = 14 batches of 32; the plain shuffle would otherwise see 1086 images per epoch)
    return [f"data.size={args.size}", f"trainer.max_epochs={args.epochs}", f"data.cache_dir={args.runs / 'cache'}",
            f"trainer.precision={args.precision}", "trainer.channels_last=true", f"trainer.num_threads={args.threads}",
            "trainer.accelerator=cpu", "trainer.progress_bar=false", f"trainer.limit_train_batches={args.batches}"]


def val_scores(ckpt: Path, manifest: Path, cache_dir: Path | None = None) -> dict:
    """Per-cell val sensitivity at the checkpoint's stored rule, worst group, COVID-19 AUC.

    ``cache_dir``: read the prepared val images from the trials' cache (the same for every trial, and much
    cheaper than decoding the full-size films again on a busy machine)."""
    import pandas as pd
    import torch
    from sklearn.metrics import roc_auc_score

    from covidcxr.data import read_manifest
    from covidcxr.data.dataset import CXRDataset
    from covidcxr.decision import DecisionRule
    from covidcxr.models import load

    lm = load(ckpt)
    df = read_manifest(manifest)
    val = df[df["split"] == "val"].reset_index(drop=True)
    ds = CXRDataset(val, lm.preset, classes=lm.classes, cache_dir=cache_dir)
    probs = []
    with torch.no_grad():
        for batch in torch.utils.data.DataLoader(ds, batch_size=32):
            probs.append(torch.softmax(lm.model(batch["image"]).float(), 1).numpy())
    p = np.concatenate(probs)
    rule = DecisionRule.from_checkpoint(lm.threshold, lm.metrics)
    pred = rule.label_indices(p, lm.classes)
    y = ds.labels
    cells = {}
    for (src, lab), part in val.groupby(["source", "label"]):
        idx = part.index.to_numpy()
        c = lm.classes.index(lab)
        cells[f"{src}/{lab}"] = {"n": int(len(idx)), "sensitivity": float((pred[idx] == c).mean())}
    big = {k: v for k, v in cells.items() if v["n"] >= 5}
    worst = min(big, key=lambda k: big[k]["sensitivity"])
    cov = lm.classes.index("COVID-19")
    nd = val.index[(val["source"] != "nih") & (val["label"] != "COVID-19")].to_numpy()
    return {"cells": cells, "worst_group": worst, "worst_group_sensitivity": big[worst]["sensitivity"],
            "auc_covid": float(roc_auc_score(y == cov, p[:, cov])),
            "non_nih_non_covid_specificity": float((pred[nd] != cov).mean()) if len(nd) else None,
            "n_non_nih_non_covid": int(len(nd)), "threshold": lm.threshold}


def prefill(args: argparse.Namespace) -> None:
    """Decode and prepare the train and val images into the shared cache once (the trials then read it)."""
    from covidcxr.data import read_manifest
    from covidcxr.data.dataset import CXRDataset
    from covidcxr.preprocess import get_preset, standardized

    df = read_manifest(args.data)
    df = df[df["split"].isin(["train", "val"])]
    presets = [get_preset("imagenet", size=args.size)]
    if any("data.hist_standardize=film" in TRIALS[t] for t in args.trials):
        presets.append(standardized(presets[0], "film"))
    for preset in presets:
        ds = CXRDataset(df, preset, cache_dir=args.runs / "cache")
        with ThreadPoolExecutor(args.jobs) as pool:  # OpenCV decodes and resizes outside the GIL
            list(pool.map(ds.prepared, range(len(ds))))


def run_trial(name: str, args: argparse.Namespace) -> dict:
    out = args.runs / name
    cmd = [str(Path(sys.executable).with_name("covidcxr")), "train", "--config",
           str(REPO / "configs" / "transfer-mobilenet_v2.yaml"), "--data", str(args.data), "--out", str(out),
           "--overwrite"]
    sets = [*common(args), *TRIALS[name]]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.time()
    if not (args.reuse and (out / "summary.json").is_file()):
        with open(args.runs / f"{name}.log", "w") as log:
            rc = subprocess.call(["nice", "-n", str(args.nice), *cmd], stdout=log, stderr=subprocess.STDOUT)
        if rc:
            return {"trial": name, "error": f"train exit {rc}; see {args.runs / (name + '.log')}"}
    res = {"trial": name, "overrides": TRIALS[name], "train_s": round(time.time() - t0),
           "command": " ".join(cmd[1:]).replace(str(REPO) + "/", ""), **val_scores(out / "best.ckpt", args.data, args.runs / "cache")}
    print(f"{name}: worst {res['worst_group']} {res['worst_group_sensitivity']:.2f}, "
          f"AUC {res['auc_covid']:.3f} ({res['train_s']} s)", flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="the hold-out build's manifest.csv (actualmed held out)")
    ap.add_argument("--runs", type=Path, required=True)
    ap.add_argument("--trials", nargs="+", default=list(TRIALS), choices=list(TRIALS))
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--epochs", type=int, default=2, help="1 head warm-up + fine-tuning epochs")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--nice", type=int, default=10)
    ap.add_argument("--batches", type=int, default=14, help="training batches per epoch, the same for every trial")
    # bf16-mixed only where the CPU has bfloat16 instructions (avx512_bf16 / amx_bf16 in /proc/cpuinfo): on an
    # AVX2-only CPU it is emulated and far slower than fp32 (docs/benchmarks.md)
    ap.add_argument("--precision", default="32-true")
    ap.add_argument("--reuse", action="store_true", help="score an existing run instead of training it again")
    args = ap.parse_args(argv)
    args.runs.mkdir(parents=True, exist_ok=True)
    prefill(args)
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda n: run_trial(n, args), args.trials))
    path = args.runs / "trials.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    old.update({r["trial"]: r for r in results})
    path.write_text(json.dumps(old, indent=2))
    cells = sorted({c for r in old.values() for c, v in r.get("cells", {}).items() if v["n"] >= 5})
    print("| trial | overrides | " + " | ".join(cells) + " | worst-group sens. | val COVID-19 AUC | train s |")
    print("|---" * (len(cells) + 5) + "|")
    for r in old.values():
        if "error" in r:
            print(f"| {r['trial']} | {r['error']} |")
            continue
        cs = " | ".join(f"{r['cells'][c]['sensitivity']:.2f}" if c in r["cells"] else "-" for c in cells)
        print(f"| {r['trial']} | {' '.join(r['overrides']) or '(transfer recipe)'} | {cs} | "
              f"{r['worst_group_sensitivity']:.2f} ({r['worst_group']}) | {r['auc_covid']:.3f} | {r['train_s']} |")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
