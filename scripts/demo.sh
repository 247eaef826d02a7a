#!/usr/bin/env bash
# End-to-end demo on real chest X-rays: build + audit a dataset, train briefly, evaluate,
# explain, predict and export. Called by `make demo DATA=... DEMO_OUT=...`.
#
# DATA: a folder with metadata.csv in the shared dev-set layout, or a folder with one
# sub-folder per class. When it does not exist, the public Cohen, Figure1 and Actualmed
# repositories are fetched with git (network needed) and used in their own layouts.
set -euo pipefail
DATA=${1:-../shared/data/covid-cxr-dev}
OUT=${2:-demo-out}
CX=".venv/bin/covidcxr"
EPOCHS=${DEMO_EPOCHS:-3}
mkdir -p "$OUT"
echo "covidcxr demo: research use only, not for clinical use."

# ---------------------------------------------------------------- 1. dataset
if [ -f "$DATA/metadata.csv" ]; then
  echo "== using dataset $DATA (metadata.csv)"
  SOURCES=(--source "csv=$DATA/metadata.csv")
elif [ -d "$DATA" ]; then
  echo "== using dataset folder $DATA (one sub-folder per class)"
  SOURCES=(--source "folder=$DATA")
else
  echo "== $DATA not found: fetching the public Cohen, Figure1 and Actualmed repositories with git into $OUT/sources"
  mkdir -p "$OUT/sources"
  for repo in ieee8023/covid-chestxray-dataset agchung/Figure1-COVID-chestxray-dataset agchung/Actualmed-COVID-chestxray-dataset; do
    dir="$OUT/sources/$(basename "$repo")"
    [ -d "$dir" ] || git clone --depth 1 "https://github.com/$repo" "$dir"
  done
  SOURCES=(--source "cohen=$OUT/sources/covid-chestxray-dataset"
           --source "figure1=$OUT/sources/Figure1-COVID-chestxray-dataset"
           --source "actualmed=$OUT/sources/Actualmed-COVID-chestxray-dataset")
fi
$CX data build "${SOURCES[@]}" --out "$OUT/data" --seed 62
$CX data audit "$OUT/data/manifest.csv" || echo "(audit reported leakage: see $OUT/data)"

# ---------------------------------------------------------------- 2. train + evaluate
# A few-minute ResNet-18 from scratch at 128 px (configs/dev-resnet18.yaml): it shows the pipeline,
# not a useful model. docs/results.md has the paper recipes and what they reach here.
$CX train --config configs/dev-resnet18.yaml --data "$OUT/data/manifest.csv" --out "$OUT/run" --overwrite \
  --weights none --max-epochs "$EPOCHS" --set data.cache_dir="$OUT/cache"
# --set-threshold: the COVID-19 operating point (sensitivity 0.95) is chosen on val and stored in the checkpoint
$CX evaluate --model "$OUT/run/best.ckpt" --data "$OUT/data/manifest.csv" --split test --out "$OUT/report" --set-threshold

# ---------------------------------------------------------------- 3. severity (COVID-19-positive images with scores)
if $CX severity train --task scores --data "$OUT/data/manifest.csv" --out "$OUT/severity" \
     --init "$OUT/run/best.ckpt" --max-epochs "$EPOCHS" --size 128; then
  $CX severity evaluate --model "$OUT/severity/best.ckpt" --data "$OUT/data/manifest.csv" --split test --out "$OUT/severity-report"
  SEVERITY=(--severity "$OUT/severity/best.ckpt")   # shown when p(COVID-19) passes the threshold
else
  echo "(no severity scores in this dataset: skipping the severity step)"
  SEVERITY=()
fi

# ---------------------------------------------------------------- 4. explain, predict, export
mapfile -t EXAMPLES < <(.venv/bin/python - "$OUT/data/manifest.csv" <<'PY'
import sys, pandas as pd
from pathlib import Path
m = pd.read_csv(sys.argv[1]); t = m[m.split == "test"]
for _, r in t.groupby("label").head(1).iterrows():
    p = Path(r.path); print(p if p.is_absolute() else Path(sys.argv[1]).parent / p)
PY
)
$CX explain "${EXAMPLES[@]}" --model "$OUT/run/best.ckpt" --method gradcam --out "$OUT/explain"
$CX predict "${EXAMPLES[@]}" --model "$OUT/run/best.ckpt" "${SEVERITY[@]}" --out "$OUT/predictions.jsonl"
$CX export --model "$OUT/run/best.ckpt" --onnx "$OUT/model.onnx"
$CX predict "${EXAMPLES[@]}" --model "$OUT/model.onnx" --backend onnx --out "$OUT/predictions-onnx.jsonl"

echo
echo "== demo finished"
echo "dataset + audit:   $OUT/data"
echo "evaluation report: $OUT/report"
echo "severity report:   $OUT/severity-report"
echo "heatmaps:          $OUT/explain"
echo "predictions:       $OUT/predictions.jsonl (torch), $OUT/predictions-onnx.jsonl (onnx)"
echo "serve it:          .venv/bin/covidcxr serve --model $OUT/run/best.ckpt --host 127.0.0.1 --port 8000"
