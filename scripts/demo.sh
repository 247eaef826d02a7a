#!/usr/bin/env bash
# End-to-end demo on real chest X-rays: build + audit the merged benchmark, train a pretrained
# MobileNetV2 for a few minutes, evaluate (test COVID-19 AUC with its CI), severity, heatmaps,
# predict (torch and ONNX) and export. Called by `make demo [DATA=...] [DEMO_OUT=...]`.
#
# Data: with the shared folder present, the merged COVIDx-style benchmark (covid-cxr-dev + the NIH
# ChestX-ray14 subset + Hannover) is built; DATA=<another folder with metadata.csv, or one sub-folder per
# class>, or DEMO_MERGE=0, uses that dataset alone. Without either, the public Cohen, Figure1 and Actualmed repositories
# are fetched with git (network needed) and used in their own layouts.
# Weights: the ImageNet MobileNetV2 from $COVIDCXR_WEIGHTS_DIR (default <shared>/weights), checked by
# its sha256; without it the demo says so in one line and trains a ResNet-18 from scratch.
# DEMO_EPOCHS (default 3: one head warm-up epoch, two fine-tuning epochs) and DEMO_SIZE (default 224 px,
# the recipe's size) keep the training to a few CPU minutes (channels-last tensors: MobileNetV2's depthwise
# convolutions are several times faster so on this CPU; DEMO_THREADS torch threads, default 2).
set -euo pipefail
# shared folder (E): $COVIDCXR_SHARED (the folder holding data/ and weights/; a path to its data/ works too), else ../shared
SHARED=${COVIDCXR_SHARED:-../shared}; if [ ! -d "$SHARED/data" ] && { [ "$(basename "$SHARED")" = data ] || [ -d "$SHARED/covid-cxr-dev" ]; }; then SHARED=$(dirname "$SHARED"); fi
DATA=${1:-}
OUT=${2:-demo-out}
CX=".venv/bin/covidcxr"
PY=".venv/bin/python"
EPOCHS=${DEMO_EPOCHS:-3}
SIZE=${DEMO_SIZE:-224}
THREADS=${DEMO_THREADS:-2}
export COVIDCXR_WEIGHTS_DIR=${COVIDCXR_WEIGHTS_DIR:-$SHARED/weights}
mkdir -p "$OUT"
START=$(date +%s)
echo "covidcxr demo: research use only, not for clinical use."

# ---------------------------------------------------------------- 0. the shipped reference model, before any training
# `covidcxr predict` without --model uses the reference classifier packed in the package and says so in one line
REF_INPUTS=()
for f in "$SHARED/data/samples/nih-00000001_000.png" "$SHARED/data/samples/padchest-16747_3_1.jpg"; do
  [ -f "$f" ] && REF_INPUTS+=("$f")
done
[ ${#REF_INPUTS[@]} -gt 0 ] || [ -z "$DATA" ] || mapfile -t REF_INPUTS < <(find "$DATA" -type f \( -iname '*.png' -o -iname '*.jpg' \) 2>/dev/null | sort | head -2)
if [ ${#REF_INPUTS[@]} -gt 0 ]; then
  echo "== predicting ${#REF_INPUTS[@]} image(s) with the shipped reference model (no training needed)"
  $CX predict "${REF_INPUTS[@]}" --severity reference --always-severity --out "$OUT/predictions-reference.jsonl" -q \
    || echo "(prediction with the reference model failed: see above)"
  echo "   -> $OUT/predictions-reference.jsonl after $(( $(date +%s) - START )) s; now training our own model"
fi

# ---------------------------------------------------------------- 1. dataset
DEV="$SHARED/data/covid-cxr-dev"
same_as_dev() { [ -z "$DATA" ] || { [ -d "$DATA" ] && [ -d "$DEV" ] && [ "$(realpath "$DATA")" = "$(realpath "$DEV")" ]; }; }
# `make demo` passes the dev set as DATA: with DEMO_MERGE=1 (default) it is merged with NIH and Hannover
if [ "${DEMO_MERGE:-1}" = 1 ] && same_as_dev && [ -f "$DEV/metadata.csv" ]; then
  SOURCES=(--source "csv=$DEV/metadata.csv")
  for kind in nih=nih-cxr14-subset hannover=hannover-covid; do
    [ -d "$SHARED/data/${kind#*=}" ] && SOURCES+=(--source "${kind%%=*}=$SHARED/data/${kind#*=}")
  done
  echo "== merged benchmark from $SHARED/data: ${SOURCES[*]}"
elif [ -n "$DATA" ] && [ -f "$DATA/metadata.csv" ]; then
  echo "== using dataset $DATA (metadata.csv)"
  SOURCES=(--source "csv=$DATA/metadata.csv")
elif [ -n "$DATA" ] && [ -d "$DATA" ]; then
  echo "== using dataset folder $DATA (one sub-folder per class)"
  SOURCES=(--source "folder=$DATA")
else
  # offline (E): one line saying what is missing and how to point at it, never git's own network error
  missing="covidcxr demo: no data: ${DATA:-$DEV} not found; set COVIDCXR_SHARED to the shared folder that holds data/ and weights/ (now: $SHARED), or run make demo DATA=<a folder with metadata.csv or one sub-folder per class>"
  repos=(ieee8023/covid-chestxray-dataset agchung/Figure1-COVID-chestxray-dataset agchung/Actualmed-COVID-chestxray-dataset)
  if ! timeout 30 git ls-remote --quiet "https://github.com/${repos[0]}" HEAD >/dev/null 2>&1; then
    echo "$missing; github.com is unreachable, so the public repositories cannot be fetched instead" >&2
    exit 2
  fi
  echo "== ${DATA:-$DEV} not found: fetching the public Cohen, Figure1 and Actualmed repositories with git into $OUT/sources"
  mkdir -p "$OUT/sources"
  for repo in "${repos[@]}"; do
    dir="$OUT/sources/$(basename "$repo")"
    [ -d "$dir" ] || git clone --quiet --depth 1 "https://github.com/$repo" "$dir" 2>/dev/null \
      || { echo "$missing; fetching $repo with git failed" >&2; exit 2; }
  done
  SOURCES=(--source "cohen=$OUT/sources/covid-chestxray-dataset"
           --source "figure1=$OUT/sources/Figure1-COVID-chestxray-dataset"
           --source "actualmed=$OUT/sources/Actualmed-COVID-chestxray-dataset")
fi
$CX data build "${SOURCES[@]}" --out "$OUT/data" --seed 62
$CX data audit "$OUT/data/manifest.csv" || echo "(audit reported leakage: see $OUT/data)"

# ---------------------------------------------------------------- 2. train + evaluate
# The transfer recipe as written (configs/transfer-mobilenet_v2.yaml) with CPU-sized overrides on the
# command line: DEMO_SIZE px, DEMO_EPOCHS epochs, DEMO_THREADS threads, channels-last. The COVID-19 threshold is chosen on val
# at the end of training and stored in best.ckpt.
CPU=(--set "data.size=$SIZE" --set "trainer.max_epochs=$EPOCHS" --set "trainer.num_threads=$THREADS"
     --set trainer.accelerator=cpu --set "data.cache_dir=$OUT/cache" --set trainer.channels_last=true)
if $PY -c "from covidcxr.models import catalog; catalog.resolve('mobilenet_v2-imagenet')" 2>/dev/null \
   && [ -f configs/transfer-mobilenet_v2.yaml ]; then
  echo "== training MobileNetV2 from ImageNet weights ($COVIDCXR_WEIGHTS_DIR), $EPOCHS epochs at $SIZE px"
  $CX train --config configs/transfer-mobilenet_v2.yaml --data "$OUT/data/manifest.csv" --out "$OUT/run" --overwrite "${CPU[@]}"
  MODEL="MobileNetV2, ImageNet-pretrained"
else
  echo "no pretrained MobileNetV2 weights in $COVIDCXR_WEIGHTS_DIR (see docs/models.md): training a ResNet-18 from scratch, which stays near chance"
  $CX train --config configs/dev-resnet18.yaml --data "$OUT/data/manifest.csv" --out "$OUT/run" --overwrite \
    --weights none "${CPU[@]}"
  MODEL="ResNet-18 from scratch"
fi
$CX evaluate --model "$OUT/run/best.ckpt" --data "$OUT/data/manifest.csv" --split test --out "$OUT/report"

# ---------------------------------------------------------------- 3. severity (COVID-19-positive images with scores)
if $CX severity train --task scores --data "$OUT/data/manifest.csv" --out "$OUT/severity" \
     --init "$OUT/run/best.ckpt" --max-epochs "$EPOCHS" --size "$SIZE"; then
  $CX severity evaluate --model "$OUT/severity/best.ckpt" --data "$OUT/data/manifest.csv" --split test --out "$OUT/severity-report"
  SEVERITY=(--severity "$OUT/severity/best.ckpt")   # shown when p(COVID-19) passes the threshold
else
  echo "(no severity scores in this dataset: skipping the severity step)"
  SEVERITY=()
fi

# ---------------------------------------------------------------- 4. explain, predict, export
mapfile -t EXAMPLES < <($PY - "$OUT/data/manifest.csv" <<'PY'
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
echo "== demo finished in $(( ($(date +%s) - START) / 60 )) min"
$PY - "$OUT/report/metrics.json" "$MODEL" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); m = r["metrics"]; a = m["per_class"]["COVID-19"]["auc"]
ci = f" [{a['ci_low']:.3f}, {a['ci_high']:.3f}]" if a.get("ci_low") is not None else ""
print(f"{sys.argv[2]}: test COVID-19 AUC {a['value']:.3f}{ci} (95% CI, patient bootstrap; "
      f"{m['n_images']} test images from {m['n_patients']} patients of {r['data']['manifest']})")
PY
echo "evaluation report: $OUT/report/report.html (metrics.json, predictions.csv)"
echo "dataset + audit:   $OUT/data"
echo "severity report:   $OUT/severity-report"
echo "heatmaps:          $OUT/explain"
echo "predictions:       $OUT/predictions.jsonl (torch), $OUT/predictions-onnx.jsonl (onnx)"
echo "serve it:          .venv/bin/covidcxr serve --model $OUT/run/best.ckpt --host 127.0.0.1 --port 8000"
