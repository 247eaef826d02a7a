#!/usr/bin/env bash
# Reproduces the classification tables of docs/results.md on the shared dev set:
#   1. patient-level split (seed 62): ResNet-18 and COVID-Net CXR small, both from scratch at 224 px;
#   2. source hold-out: train/validate without actualmed, test on actualmed only.
# Each model is evaluated (report with patient-bootstrap CIs) and compared in one table per split.
#
#   bash scripts/results_classification.sh [DATA] [RUNS]
#     DATA  folder with metadata.csv (default ../shared/data/covid-cxr-dev)
#     RUNS  output folder, outside the repository (default ../runs/results, beside the checkout)
#   EPOCHS=12 JOBS=2 bash scripts/results_classification.sh    # JOBS: trainings run side by side
#
# Every training uses one torch thread (fastest on a shared 2-core machine); JOBS=2 runs two at once.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/covid-cxr-dev}
RUNS=${2:-../runs/results}
EPOCHS=${EPOCHS:-12}
JOBS=${JOBS:-2}
HOLDOUT=${HOLDOUT:-actualmed}
CX=".venv/bin/covidcxr"
NICE="nice -n ${NICENESS:-10}"
mkdir -p "$RUNS"
START=$(date +%s)
echo "covidcxr classification results: research use only, not a clinical performance claim."

$CX data build --source "csv=$DATA/metadata.csv" --out "$RUNS/split-seed62" --seed 62
$CX data build --source "csv=$DATA/metadata.csv" --out "$RUNS/holdout-$HOLDOUT" --seed 62 --holdout-source "$HOLDOUT"

train() {  # SPLIT ARCH
  local split=$1 arch=$2
  $NICE $CX train --config configs/scratch-cpu.yaml --data "$RUNS/$split/manifest.csv" --out "$RUNS/$split/$arch" --overwrite \
    --set "model.arch=$arch" --size 224 --max-epochs "$EPOCHS" --set "data.cache_dir=$RUNS/cache" \
    --set trainer.progress_bar=false > "$RUNS/$split/$arch.train.log" 2>&1
  echo "trained $split/$arch ($(( ($(date +%s) - START) / 60 )) min so far)"
}

for split in split-seed62 "holdout-$HOLDOUT"; do
  if [ "$JOBS" -ge 2 ]; then
    train "$split" resnet18 & train "$split" covidnet-cxr-small & wait
  else
    train "$split" resnet18; train "$split" covidnet-cxr-small
  fi
  for arch in resnet18 covidnet-cxr-small; do
    $NICE $CX evaluate --model "$RUNS/$split/$arch/best.ckpt" --data "$RUNS/$split/manifest.csv" --split test \
      --out "$RUNS/$split/$arch-report" > "$RUNS/$split/$arch.evaluate.log" 2>&1
  done
  $NICE $CX compare "$RUNS/$split/resnet18/best.ckpt" "$RUNS/$split/covidnet-cxr-small/best.ckpt" \
    --names "ResNet-18 (scratch, 224)" "COVID-Net CXR small (scratch, 224)" \
    --data "$RUNS/$split/manifest.csv" --split test --out "$RUNS/$split/compare" > /dev/null
  echo "== $split"; cat "$RUNS/$split/compare/compare.md"
done
echo "total $(( ($(date +%s) - START) / 60 )) min; checkpoints and reports under $RUNS"
