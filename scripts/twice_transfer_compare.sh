#!/usr/bin/env bash
# Twice transfer (Bassi & Attux) against once transfer on validation COVID-19 AUC over the first epochs,
# where the paper saw its gain, over several seeds, with the spread.
#
#   once : configs/transfer-mobilenet_v2.yaml        ImageNet MobileNetV2 -> COVID (3 classes)
#   twice: configs/twice-transfer-mobilenet_v2.yaml  ImageNet -> ChestX-ray14 findings (NIH train images)
#                                                    -> COVID with output neuron keeping
# Both arms use the same recipe for the COVID stage (warm-up, learning rates, epochs, seed), early stopping
# off so that every epoch is logged; best.ckpt is still chosen by val AUC. Only validation figures are read:
# the test split is not looked at.
#
#   MANIFEST=OUT/manifest.csv bash scripts/twice_transfer_compare.sh
#   env: OUT (runs/twice-compare)  EPOCHS (3)  SEEDS ("0 1 2")  SIZE (224; e.g. 160 to halve the CPU time)
#        CACHE (OUT/cache)  THREADS (1)  COVIDCXR_SHARED / COVIDCXR_WEIGHTS_DIR (../shared, ../shared/weights)
# Without MANIFEST the merged benchmark is built into OUT/data from the shared folder (seed 62).
# Writes OUT/twice_transfer.json and OUT/twice_transfer.md (per-epoch mean +- sd and the paired difference),
# for the COVID-19 AUC and for the mean of the three one-vs-rest AUCs (where the kept pneumonia and normal
# neurons act). SUMMARY_ONLY=1 re-reads finished runs in OUT without training.
# Cost: per seed, EPOCHS epochs of the COVID task twice plus EPOCHS epochs of the NIH stage (about half the
# images). Time it: the script prints the minutes it took.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${COVIDCXR_SHARED:-../shared}
export COVIDCXR_WEIGHTS_DIR=${COVIDCXR_WEIGHTS_DIR:-$SHARED/weights}
OUT=${OUT:-runs/twice-compare}
EPOCHS=${EPOCHS:-3}
SEEDS=${SEEDS:-0 1 2}
SIZE=${SIZE:-224}
THREADS=${THREADS:-1}
CACHE=${CACHE:-$OUT/cache}
CX=${CX:-.venv/bin/covidcxr}
PY=${PY:-.venv/bin/python}
START=$(date +%s)
mkdir -p "$OUT"

if [ -z "${MANIFEST:-}" ]; then
  MANIFEST=$OUT/data/manifest.csv
  if [ ! -f "$MANIFEST" ]; then
    for d in "$SHARED/data/covid-cxr-dev" "$SHARED/data/nih-cxr14-subset" "$SHARED/data/hannover-covid"; do
      [ -d "$d" ] || { echo "missing $d: set COVIDCXR_SHARED or MANIFEST" >&2; exit 2; }
    done
    $CX data build --source "csv=$SHARED/data/covid-cxr-dev/metadata.csv" --source "nih=$SHARED/data/nih-cxr14-subset" \
      --source "hannover=$SHARED/data/hannover-covid" --out "$OUT/data" --seed 62
  fi
fi
$CX weights list --no-verify

COMMON=(--data "$MANIFEST" --max-epochs "$EPOCHS" --size "$SIZE" --overwrite
        --set early_stopping.monitor=null --set "data.cache_dir=$CACHE" --set "trainer.num_threads=$THREADS"
        --set trainer.progress_bar=false)
[ -n "${SUMMARY_ONLY:-}" ] && SEEDS_TRAIN="" || SEEDS_TRAIN=$SEEDS   # SUMMARY_ONLY=1: re-read finished runs
for seed in $SEEDS_TRAIN; do
  for arm in once twice; do
    cfg=configs/transfer-mobilenet_v2.yaml
    [ "$arm" = twice ] && cfg=configs/twice-transfer-mobilenet_v2.yaml
    t0=$(date +%s)
    $CX train --config "$cfg" --out "$OUT/$arm-seed$seed" --seed "$seed" "${COMMON[@]}" > "$OUT/$arm-seed$seed.log" 2>&1 \
      || { echo "training $arm seed $seed failed: see $OUT/$arm-seed$seed.log" >&2; exit 1; }
    echo "trained $arm seed $seed in $(( ($(date +%s) - t0) / 60 )) min"
  done
done

$PY - "$OUT" "$SEEDS" "$EPOCHS" <<'EOF'
import json, sys
from pathlib import Path

import numpy as np
import pandas as pd

out, seeds, epochs = Path(sys.argv[1]), [int(s) for s in sys.argv[2].split()], int(sys.argv[3])


def val_auc(run: Path, metric: str) -> list[float]:
    m = pd.read_csv(sorted((run / "logs").glob("version_*/metrics.csv"))[-1])
    cols = ["val_auc_covid", "val_auc_normal", "val_auc_pneumonia"] if metric == "mean3" else [metric]
    v = m.dropna(subset=cols).groupby("epoch")[cols].last().mean(axis=1)
    return [float(v.get(e, np.nan)) for e in range(epochs)]


summary = {"seeds": seeds, "epochs": epochs, "split": "val (manifest val split)", "metrics": {}}
lines = []
for metric, title in (("val_auc_covid", "COVID-19 AUC (one-vs-rest)"),
                      ("mean3", "mean of the three one-vs-rest AUCs (normal, pneumonia, COVID-19)")):
    res = {arm: {s: val_auc(out / f"{arm}-seed{s}", metric) for s in seeds} for arm in ("once", "twice")}
    rows = []
    for e in range(epochs):
        a = np.array([res["once"][s][e] for s in seeds])
        b = np.array([res["twice"][s][e] for s in seeds])
        d = b - a
        sd = lambda x: float(x.std(ddof=1)) if len(x) > 1 else 0.0  # noqa: E731
        rows.append({"epoch": e + 1, "once_mean": a.mean(), "once_sd": sd(a), "twice_mean": b.mean(), "twice_sd": sd(b),
                     "diff_mean": d.mean(), "diff_sd": sd(d), "diff_min": d.min(), "diff_max": d.max(),
                     "twice_better_seeds": int((d > 0).sum())})
    summary["metrics"][metric] = {"per_seed": res, "per_epoch": rows}
    lines += [f"Validation {title} per epoch, {len(seeds)} seeds (mean ± sd over seeds; difference twice − once, "
              "paired by seed, with its range):", "",
              "| epoch | once transfer | twice transfer | twice − once | range | seeds twice better |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['epoch']} | {r['once_mean']:.3f} ± {r['once_sd']:.3f} | {r['twice_mean']:.3f} ± "
                     f"{r['twice_sd']:.3f} | {r['diff_mean']:+.3f} ± {r['diff_sd']:.3f} | "
                     f"[{r['diff_min']:+.3f}, {r['diff_max']:+.3f}] | {r['twice_better_seeds']}/{len(seeds)} |")
    lines.append("")
(out / "twice_transfer.json").write_text(json.dumps(summary, indent=2))
(out / "twice_transfer.md").write_text("\n".join(lines))
print("\n".join(lines))
EOF
echo "written $OUT/twice_transfer.md and .json in $(( ($(date +%s) - START) / 60 )) min"
