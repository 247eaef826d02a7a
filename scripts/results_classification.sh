#!/usr/bin/env bash
# Reproduces the classification, audit and severity tables of docs/results.md on the merged
# COVIDx-style benchmark (covid-cxr-dev + NIH ChestX-ray14 subset + Hannover), in one run:
#
#   1. two data builds (seed 62): the patient-level split, and the source hold-out (train/validate
#      without actualmed, test on actualmed only);
#   2. six models in each: scratch ResNet-18 (baseline), MobileNetV2 linear probe, MobileNetV2
#      fine-tuned, EfficientNet-Lite0 fine-tuned, the CXNet-style lung-crop MobileNetV2 and twice
#      transfer (ImageNet -> NIH multi-label -> 3 classes); each recipe is run as written in configs/,
#      with CPU-sized overrides passed on the command line with --set (listed in results.md);
#   3. covidcxr evaluate on the test split (patient-bootstrap CIs), the paired bootstrap difference to
#      the scratch baseline (python -m covidcxr.evaluate.paired), covidcxr audit-model (Grad-CAM
#      relevance inside the lungs, lungs-only AUC) on the patient split;
#   4. severity scores fine-tuned from the MobileNetV2 transfer classifier's body: test split and
#      Monte-Carlo CV over patients;
#   5. scripts/results_tables.py writes RUNS/results_tables.md and fills the results:begin/end block
#      of docs/results.md.
#
#   bash scripts/results_classification.sh               # full run (about an hour on the 2-core machine)
#   SMOKE=1 bash scripts/results_classification.sh       # plumbing check: 1 epoch, 64 px, few batches
#   MODELS="scratch mnv2" JOBS=1 bash scripts/results_classification.sh
#
# Environment: RUNS (output folder, default results-out/, ignored by git), EPOCHS, SIZE, JOBS (trainings
# side by side, one torch thread each), BOOT (bootstrap replicates), SEV_EPOCHS, SEV_SPLITS, NICENESS,
# COVIDCXR_SHARED (default ../shared), COVIDCXR_WEIGHTS_DIR (default $COVIDCXR_SHARED/weights),
# DOC (markdown file to update; empty: do not touch docs; SMOKE runs never touch docs).
# Research use only: nothing here is a clinical performance claim.
set -uo pipefail
cd "$(dirname "$0")/.."
SHARED=${COVIDCXR_SHARED:-../shared}
export COVIDCXR_WEIGHTS_DIR=${COVIDCXR_WEIGHTS_DIR:-$SHARED/weights}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
RUNS=${RUNS:-results-out}
SMOKE=${SMOKE:-0}
JOBS=${JOBS:-2}
BOOT=${BOOT:-1000}
MODELS=${MODELS:-scratch probe mnv2 effl0 lungcrop twice}
if [ "$SMOKE" = 1 ]; then
  EPOCHS=${EPOCHS:-1}; SIZE=${SIZE:-64}; BOOT=${BOOT_SMOKE:-50}; SEV_EPOCHS=${SEV_EPOCHS:-1}; SEV_SPLITS=${SEV_SPLITS:-2}
  LIMIT=(--set trainer.limit_train_batches=2 --set trainer.limit_val_batches=2); AUDIT_LIMIT=(--limit 8)
  DOC=${DOC:-}
else
  EPOCHS=${EPOCHS:-6}; SIZE=${SIZE:-160}; SEV_EPOCHS=${SEV_EPOCHS:-6}; SEV_SPLITS=${SEV_SPLITS:-5}
  LIMIT=(); AUDIT_LIMIT=(); DOC=${DOC-docs/results.md}
fi
CX=".venv/bin/covidcxr"
PY=".venv/bin/python"
NICE="nice -n ${NICENESS:-10}"
DATA=(--source "csv=$SHARED/data/covid-cxr-dev/metadata.csv" --source "nih=$SHARED/data/nih-cxr14-subset"
      --source "hannover=$SHARED/data/hannover-covid")
mkdir -p "$RUNS"
START=$(date +%s)
STARTED=$(date -u +"%Y-%m-%d %H:%M")
: > "$RUNS/status.tsv"; : > "$RUNS/timings.tsv"; : > "$RUNS/models.tsv"
echo "covidcxr results: research use only, not a clinical performance claim."
echo "weights: $COVIDCXR_WEIGHTS_DIR; runs: $RUNS; epochs $EPOCHS, ${SIZE} px, $JOBS jobs, smoke=$SMOKE"
[ -d "$COVIDCXR_WEIGHTS_DIR" ] || echo "warning: $COVIDCXR_WEIGHTS_DIR not found: the transfer recipes will fail (no ImageNet weights)"

elapsed() { echo $(( $(date +%s) - START )); }
timing() { printf '%s\t%s\n' "$1" "$2" >> "$RUNS/timings.tsv"; }
mark() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$RUNS/status.tsv"; }
pool() { while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done; }

# ------------------------------------------------------------------ models: recipe + CPU-sized overrides
# Every training: one torch thread, SIZE px, EPOCHS epochs, the preprocessed-image cache, no progress bar.
COMMON="trainer.num_threads=1 data.size=$SIZE trainer.max_epochs=$EPOCHS data.cache_dir=$RUNS/cache trainer.progress_bar=false trainer.accelerator=cpu"
declare -A LABEL CONFIG SETS NOTREADY
LABEL[scratch]="ResNet-18, scratch (baseline)"; CONFIG[scratch]=configs/scratch-cpu.yaml; SETS[scratch]="model.arch=resnet18"
LABEL[probe]="MobileNetV2, linear probe";        CONFIG[probe]=configs/linear-probe-mobilenet_v2.yaml; SETS[probe]=""
LABEL[mnv2]="MobileNetV2, fine-tuned";           CONFIG[mnv2]=configs/transfer-mobilenet_v2.yaml; SETS[mnv2]=""
LABEL[effl0]="EfficientNet-Lite0, fine-tuned";   CONFIG[effl0]=configs/transfer-efficientnet_lite0.yaml; SETS[effl0]=""
LABEL[lungcrop]="MobileNetV2, CXNet-style lung crop"; CONFIG[lungcrop]=configs/cxnet-lungcrop-mobilenet_v2.yaml; SETS[lungcrop]=""
LABEL[twice]="MobileNetV2, twice transfer (ImageNet → NIH → 3 classes)"; CONFIG[twice]=configs/twice-transfer-mobilenet_v2.yaml; SETS[twice]=""
for m in $MODELS; do
  [ -n "${LABEL[$m]:-}" ] || { echo "error: unknown model id $m (known: ${!LABEL[*]})" >&2; exit 2; }
  if [ ! -f "${CONFIG[$m]}" ]; then NOTREADY[$m]="not run: recipe ${CONFIG[$m]} not in this checkout"; fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$m" "${LABEL[$m]}" "${CONFIG[$m]}" "${SETS[$m]} $COMMON" "${NOTREADY[$m]:-}" >> "$RUNS/models.tsv"
done

# ------------------------------------------------------------------ 1. data
t0=$(elapsed)
$CX data build "${DATA[@]}" --out "$RUNS/split" --seed 62 > "$RUNS/split.build.log" 2>&1 || { tail -3 "$RUNS/split.build.log"; exit 1; }
$CX data build "${DATA[@]}" --out "$RUNS/holdout" --seed 62 --holdout-source actualmed > "$RUNS/holdout.build.log" 2>&1 \
  || { tail -3 "$RUNS/holdout.build.log"; exit 1; }
timing "data build (both settings)" $(( $(elapsed) - t0 ))
echo "data built ($(elapsed) s)"

# ------------------------------------------------------------------ 2. train + evaluate
train_eval() {  # SETTING ID
  local s=$1 m=$2 out="$RUNS/$1/$2" t1 sets=()
  t1=$(elapsed)
  for kv in ${SETS[$m]} $COMMON; do sets+=(--set "$kv"); done
  if ! $NICE $CX train --config "${CONFIG[$m]}" --data "$RUNS/$s/manifest.csv" --out "$out" --overwrite \
       "${sets[@]}" "${LIMIT[@]}" > "$out.train.log" 2>&1; then
    mark "$s" "$m" "failed: $(grep -v '^\s*$' "$out.train.log" | tail -1 | cut -c1-200)"
    echo "FAILED $s/$m (see $out.train.log)"; return
  fi
  if ! $NICE $CX evaluate --model "$out/best.ckpt" --data "$RUNS/$s/manifest.csv" --split test --out "$out-report" \
       --n-boot "$BOOT" > "$out.evaluate.log" 2>&1; then
    mark "$s" "$m" "failed (evaluate): $(tail -1 "$out.evaluate.log" | cut -c1-200)"; return
  fi
  mark "$s" "$m" ok
  timing "$s/$m: train ${EPOCHS} epochs + evaluate" $(( $(elapsed) - t1 ))
  echo "done $s/$m in $(( $(elapsed) - t1 )) s ($(( $(elapsed) / 60 )) min so far)"
}
for s in split holdout; do
  mkdir -p "$RUNS/$s"
  for m in $MODELS; do
    if [ -n "${NOTREADY[$m]:-}" ]; then mark "$s" "$m" "${NOTREADY[$m]}"; continue; fi
    pool; train_eval "$s" "$m" &
  done
done
wait

# ------------------------------------------------------------------ 3. paired differences + shortcut audit
t0=$(elapsed)
for s in split holdout; do
  neg=(); [ "$s" = holdout ] && neg=(--negatives normal)   # actualmed: COVID-19 vs normal, one hospital
  for m in $MODELS; do
    [ -f "$RUNS/$s/$m-report/predictions.csv" ] && [ -f "$RUNS/$s/scratch-report/predictions.csv" ] || continue
    $PY -m covidcxr.evaluate.paired "$RUNS/$s/scratch-report" "$RUNS/$s/$m-report" "${neg[@]}" --bootstrap "$BOOT" \
      --out "$RUNS/$s/$m-paired.json" > "$RUNS/$s/$m-paired.log" 2>&1 || echo "paired $s/$m failed: $(tail -1 "$RUNS/$s/$m-paired.log")"
  done
done
timing "paired bootstrap (all models, both settings)" $(( $(elapsed) - t0 ))

audit() {  # ID
  local m=$1 t1; t1=$(elapsed)
  $NICE $CX audit-model --model "$RUNS/split/$m/best.ckpt" --data "$RUNS/split/manifest.csv" --split test \
    --methods gradcam --bootstrap "$BOOT" --threads 1 "${AUDIT_LIMIT[@]}" --out "$RUNS/split/$m-audit" \
    > "$RUNS/split/$m-audit.log" 2>&1 || echo "audit $m failed: $(tail -1 "$RUNS/split/$m-audit.log")"
  timing "split/$m: audit-model (Grad-CAM)" $(( $(elapsed) - t1 ))
}
severity() {
  local det="$RUNS/split/mnv2/best.ckpt" o="$RUNS/severity" t1
  [ -f "$det" ] || { echo "severity skipped: no $det"; return; }
  mkdir -p "$o"; t1=$(elapsed)
  $NICE $CX severity train --task scores --data "$RUNS/split/manifest.csv" --init "$det" --out "$o/run" \
      --size "$SIZE" --max-epochs "$SEV_EPOCHS" > "$o/train.log" 2>&1 \
    && $NICE $CX severity evaluate --model "$o/run/best.ckpt" --data "$RUNS/split/manifest.csv" --split test \
      --out "$o/eval_test" --bootstrap "$BOOT" > "$o/evaluate.log" 2>&1 || echo "severity train/evaluate failed: see $o"
  timing "severity: train scores ${SEV_EPOCHS} epochs + evaluate" $(( $(elapsed) - t1 )); t1=$(elapsed)
  $NICE $CX severity cv --data "$RUNS/split/manifest.csv" --init "$det" --out "$o/cv" --methods mean,ridge,finetune \
    --splits "$SEV_SPLITS" --size "$SIZE" --max-epochs "$SEV_EPOCHS" > "$o/cv.log" 2>&1 || echo "severity cv failed: see $o/cv.log"
  timing "severity: Monte-Carlo CV, $SEV_SPLITS splits" $(( $(elapsed) - t1 ))
}
pool; severity &
for m in $MODELS; do
  [ -f "$RUNS/split/$m/best.ckpt" ] && grep -q "^split	$m	ok" "$RUNS/status.tsv" || continue
  pool; audit "$m" &
done
wait

# ------------------------------------------------------------------ 4. tables
MIN=$(( ($(elapsed) + 30) / 60 ))
$PY - "$RUNS/run.json" "$STARTED" "$MIN" "epochs $EPOCHS, ${SIZE} px, $JOBS jobs, bootstrap $BOOT, smoke $SMOKE" <<'PY'
import json, sys, datetime
json.dump({"started": sys.argv[2], "finished": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
           "minutes": int(sys.argv[3]), "settings": sys.argv[4]}, open(sys.argv[1], "w"), indent=2)
PY
timing "whole script" "$(elapsed)"
if [ -n "$DOC" ]; then $PY scripts/results_tables.py "$RUNS" --doc "$DOC"; else $PY scripts/results_tables.py "$RUNS"; fi
echo "total $MIN min; checkpoints, reports and audits under $RUNS"
