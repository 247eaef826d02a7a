#!/usr/bin/env bash
# Re-trains the two reference models shipped in covidcxr/models/reference/ and writes their model cards:
#
#   1. the merged benchmark (covid-cxr-dev + NIH ChestX-ray14 subset + Hannover; seed 62), split by linked
#      person as in scripts/results_classification.sh; every person with an Actualmed image is then taken
#      out of train/val, so Actualmed (one hospital the model never sees) is a true hold-out;
#   2. the reference classifier: RECIPE (default: the transfer recipe, the best measured; see below) on
#      that train split, best epoch and COVID-19 threshold chosen on val, temperature fitted on val;
#      2b. (QAT=1; off by default, as for the shipped 1.0.0) quantization-aware fine-tuning on the train split
#      (`covidcxr qat`), meant to let its INT8 export pass the parity gate (measured: not reliably, see
#      docs/deployment.md); threshold and temperature are then chosen again on val (step 3);
#   3. evaluation with patient-bootstrap CIs: the patient split's test split (per source) and the Actualmed
#      hold-out; ONNX export and the INT8 parity gate; the shortcut audit (Grad-CAM inside the lungs) on
#      AUDIT_LIMIT test images;
#   4. the reference severity model (geographic extent, opacity) fine-tuned from the classifier, evaluated
#      on the test split;
#   5. scripts/model_card.py: the cards (figures read from the outputs above, never typed), docs/model-card.md,
#      and the fp16 weights packed into the package (<= 12 MB together).
#
#   bash scripts/train_reference.sh                 # the real run (~20-30 min of this 2-core CPU)
#   SMOKE=1 bash scripts/train_reference.sh         # plumbing check: 64 px, 1 epoch, few batches; packs nothing
#   STAGE=post bash scripts/train_reference.sh      # steps 3-5 on an existing RUNS/run/best.ckpt
#   STAGE=card bash scripts/train_reference.sh      # only step 5, on an existing RUNS folder
#   RERUN=1 bash scripts/train_reference.sh         # reproducibility: the shipped run's settings (from its
#                                   # checkpoint) into reference-rerun/, then scripts/reference_rerun.py sets the
#                                   # figures beside the shipped cards' (docs/reproducibility.md); packs nothing
#   .venv/bin/python scripts/model_card.py RUNS --refresh  # run outputs gone: keep the shipped models and their
#                                   # stored figures; re-read INT8 (RUNS/onnx, RUNS/int8.status), the audit
#                                   # (RUNS/audit) and leave-one-source-out (results-out/run3/loso)
#
# Environment: RUNS (default reference-out/), RECIPE, SEED (0), EPOCHS (3), SIZE (224), THREADS (2), BOOT (1000),
# SEV_EPOCHS (4), AUDIT_LIMIT (60), QAT (0), QAT_EPOCHS (3), QAT_LR (2e-5), QAT_KEEP_FP32 (4), QAT_BOUNDARY_WEIGHT (0), MAX_STEPS (stop after that many optimiser steps; the shipped 1.0.0 run was
# stopped by hand after its second epoch, i.e. EPOCHS=3 MAX_STEPS=56, for CPU time), VERSION (the release number written into the model), PRECISION (e.g.
# bf16-mixed, when the trainer supports it), COVIDCXR_SHARED (../shared), COVIDCXR_WEIGHTS_DIR (<shared>/weights).
# Research use only: nothing here is a clinical performance claim.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${COVIDCXR_SHARED:-../shared}
export COVIDCXR_WEIGHTS_DIR=${COVIDCXR_WEIGHTS_DIR:-$SHARED/weights}
RUNS_GIVEN=${RUNS:-}
RUNS=${RUNS:-reference-out}
SMOKE=${SMOKE:-0}
STAGE=${STAGE:-all}
CX=".venv/bin/covidcxr"
PY=".venv/bin/python"
RERUN=${RERUN:-0}
if [ "$RERUN" = 1 ]; then
  # reproducibility check: the shipped run's own settings (read from its checkpoint) unless given, its own folder,
  # and at the end a comparison with the shipped cards instead of new cards; nothing is packed
  RUNS=${RUNS_GIVEN:-reference-rerun}
  SHIPPED=$($PY scripts/reference_rerun.py --shipped-settings) \
    || { echo "error: cannot read the shipped model's settings (scripts/reference_rerun.py --shipped-settings)" >&2; exit 2; }
  [ -n "$SHIPPED" ] || { echo "error: the shipped model records no training settings" >&2; exit 2; }
  # a smoke run keeps its own small settings (it checks the plumbing, and the comparison says it differs)
  SMOKE_OWN=" EPOCHS SIZE MAX_STEPS "
  while IFS='=' read -r k v; do
    if [ "$SMOKE" = 1 ] && [[ "$SMOKE_OWN" == *" $k "* ]]; then continue; fi
    if [ -z "${!k:-}" ]; then printf -v "$k" '%s' "$v"; fi
  done <<< "$SHIPPED"
fi
# the best recipe at the time: transfer. The group-robust recipes lost COVID-19 AUC on the patient split and
# missed the new-hospital targets as well (docs/results.md, docs/recipes.md), so they are not the reference's
RECIPE=${RECIPE:-configs/transfer-mobilenet_v2.yaml}
SEED=${SEED:-0}
VERSION=${VERSION:-1.0.0}
if [ "$SMOKE" = 1 ]; then
  EPOCHS=${EPOCHS:-1}; SIZE=${SIZE:-64}; BOOT=${BOOT:-50}; SEV_EPOCHS=${SEV_EPOCHS:-1}; AUDIT_LIMIT=${AUDIT_LIMIT:-4}
  LIMIT=(--set trainer.limit_train_batches=2 --set trainer.limit_val_batches=2)
else
  EPOCHS=${EPOCHS:-3}; SIZE=${SIZE:-224}; BOOT=${BOOT:-1000}; SEV_EPOCHS=${SEV_EPOCHS:-4}; AUDIT_LIMIT=${AUDIT_LIMIT:-60}
  LIMIT=()
fi
THREADS=${THREADS:-2}
# quantization-aware fine-tuning (step 2b): off unless QAT=1 (it did not make the INT8 gate pass reliably); SMOKE: 1 epoch
QAT=${QAT:-0}
if [ "$SMOKE" = 1 ]; then QAT_EPOCHS=${QAT_EPOCHS:-1}; else QAT_EPOCHS=${QAT_EPOCHS:-3}; fi
QAT_LR=${QAT_LR:-2e-5}
# the first convolutions left fp32, in the fine-tuning and in the INT8 export alike (without QAT: the export's auto)
QAT_KEEP_FP32=${QAT_KEEP_FP32:-4}
QAT_BOUNDARY_WEIGHT=${QAT_BOUNDARY_WEIGHT:-0}
KEEP_FP32=auto; [ "$QAT" = 1 ] && KEEP_FP32=$QAT_KEEP_FP32
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
mkdir -p "$RUNS"
START=$(date +%s)
echo "covidcxr reference models: research use only, not a clinical performance claim."
echo "recipe $RECIPE, seed $SEED, $EPOCHS epochs at $SIZE px, $THREADS threads; runs in $RUNS; smoke=$SMOKE"
step() { echo "== [$(( ($(date +%s) - START) / 60 )) min] $*"; }

if [ "$STAGE" = all ]; then
  # ---------------------------------------------------------------- 1. data
  step "data build (merged benchmark, seed 62)"
  $CX data build --source "csv=$SHARED/data/covid-cxr-dev/metadata.csv" --source "nih=$SHARED/data/nih-cxr14-subset" \
    --source "hannover=$SHARED/data/hannover-covid" --out "$RUNS/data" --seed 62 > "$RUNS/data.build.log" 2>&1 \
    || { tail -3 "$RUNS/data.build.log"; exit 1; }
  # every person with an Actualmed image leaves train/val (linked persons stay whole): the hold-out manifest holds
  # all their images as 'test'; the training manifest keeps the patient split's test split as it is
  $PY - "$RUNS/data/manifest.csv" "$RUNS/reference-manifest.csv" "$RUNS/actualmed-holdout.csv" <<'PY'
import sys
from pathlib import Path
import pandas as pd
src, train_out, hold_out = map(Path, sys.argv[1:])
m = pd.read_csv(src)
m["path"] = [p if Path(p).is_absolute() else str((src.parent / p).resolve()) for p in m["path"]]
held = set(m.loc[m["source"] == "actualmed", "patient_id"])
is_held = m["patient_id"].isin(held)
ref = m[~(is_held & m["split"].isin(["train", "val"]))]
ref.to_csv(train_out, index=False)
hold = m[is_held].assign(split="test")
hold.to_csv(hold_out, index=False)
print(f"reference manifest: {len(ref)} images ({(ref.split == 'train').sum()} train, {(ref.split == 'val').sum()} val, "
      f"{(ref.split == 'test').sum()} test); actualmed hold-out: {len(hold)} images of {len(held)} persons "
      f"({int((is_held & m.split.isin(['train', 'val'])).sum())} moved out of train/val)")
PY

  # ---------------------------------------------------------------- 2. classifier
  step "train the reference classifier ($RECIPE)"
  rm -f "$RUNS/run/trained.ckpt"  # an earlier run's pre-QAT model must not be fine-tuned in place of this one
  SETS=(--set "seed=$SEED" --set "data.size=$SIZE" --set "trainer.max_epochs=$EPOCHS" --set "trainer.num_threads=$THREADS"
        --set trainer.accelerator=cpu --set "data.cache_dir=$RUNS/cache" --set trainer.channels_last=true
        --set trainer.progress_bar=false)
  [ -n "${PRECISION:-}" ] && SETS+=(--set "trainer.precision=$PRECISION")
  [ -n "${MAX_STEPS:-}" ] && SETS+=(--set "trainer.max_steps=$MAX_STEPS")   # stop early, schedule of EPOCHS kept
  $CX train --config "$RECIPE" --data "$RUNS/reference-manifest.csv" --out "$RUNS/run" --overwrite "${SETS[@]}" "${LIMIT[@]}" \
    > "$RUNS/train.log" 2>&1 || { tail -5 "$RUNS/train.log"; exit 1; }
  cp "$RECIPE" "$RUNS/recipe.yaml"
fi

if [ "$STAGE" = all ] || [ "$STAGE" = post ]; then
  # a training stopped by hand (or by MAX_STEPS) leaves Lightning's best.ckpt: make it the slim covidcxr checkpoint
  # and add the training-feature summary that `covidcxr site check` needs, as covidcxr train does at its end
  slim() {
  $PY - "$1" "$RUNS/reference-manifest.csv" <<'PY'
import sys
from pathlib import Path
import pandas as pd
from covidcxr.models.checkpoint import atomic_torch_save, load, read_bundle
from covidcxr.models.features import SUMMARY_KEY, summarise_frames
ckpt, man = Path(sys.argv[1]), Path(sys.argv[2])
b = read_bundle(ckpt)
if SUMMARY_KEY in b:
    sys.exit(0)
lm = load(ckpt)
m = pd.read_csv(man)
b[SUMMARY_KEY] = summarise_frames(lm.model, lm.preset, m[m.split == "train"], m[m.split == "val"])
t = b.setdefault("training", {})
max_epochs = ((t.get("config") or {}).get("trainer") or {}).get("max_epochs")
t["stopped"] = (f"training stopped after epoch {t.get('epoch')} (counted from 0) of max_epochs {max_epochs}; "
                "best.ckpt is the best epoch by validation COVID-19 AUC so far")
atomic_torch_save(b, ckpt)
print(f"{ckpt}: slim covidcxr checkpoint with the training-feature summary ({t['stopped']})")
PY
  }
  SEV_INIT="$RUNS/run/best.ckpt"
  if [ "$QAT" = 1 ]; then
    # ------------------------------------------------------------ 2b. quantization-aware fine-tuning
    # so that the INT8 export agrees with fp32 (the parity gate below): the trained model is kept as trained.ckpt
    # (a STAGE=post run starts again from it) and the fine-tuned one becomes best.ckpt; the severity model starts
    # from the trained one (folded BatchNorm would only be re-learnt by its training)
    if [ ! -f "$RUNS/run/trained.ckpt" ]; then slim "$RUNS/run/best.ckpt"; mv "$RUNS/run/best.ckpt" "$RUNS/run/trained.ckpt"; fi
    step "quantization-aware fine-tuning ($QAT_EPOCHS epochs, lr $QAT_LR, first $QAT_KEEP_FP32 convolutions fp32; covidcxr qat)"
    # a best.ckpt already fine-tuned from this trained.ckpt with these settings is kept (a resumed STAGE=post run)
    if [ -f "$RUNS/run/best.ckpt" ] && $PY - "$RUNS/run/best.ckpt" "$RUNS/run/trained.ckpt" "$QAT_EPOCHS" "$QAT_LR" \
         "$QAT_KEEP_FP32" "$SEED" "$QAT_BOUNDARY_WEIGHT" <<'PY'
import sys
from covidcxr.models.checkpoint import read_bundle
from covidcxr.models.reference import file_sha256
best, trained, epochs, lr, keep, seed, bw = sys.argv[1:]
q = (read_bundle(best).get("training") or {}).get("qat") or {}
same = (q.get("from_sha256") == file_sha256(trained) and q.get("epochs") == int(epochs) and q.get("lr") == float(lr)
        and q.get("fp32_convs") == int(keep) and q.get("seed") == int(seed)
        and float(q.get("boundary_weight", 0.0)) == float(bw))
sys.exit(0 if same else 1)
PY
    then
      echo "$RUNS/run/best.ckpt: already fine-tuned from trained.ckpt with these settings; kept"
    else
      $CX qat --model "$RUNS/run/trained.ckpt" --data "$RUNS/reference-manifest.csv" --out "$RUNS/run/best.ckpt" \
        --epochs "$QAT_EPOCHS" --lr "$QAT_LR" --keep-fp32 "$QAT_KEEP_FP32" --boundary-weight "$QAT_BOUNDARY_WEIGHT" \
        --seed "$SEED" --threads "$THREADS" \
        --cache-dir "$RUNS/cache" > "$RUNS/qat.log" 2>&1 || { tail -3 "$RUNS/qat.log"; exit 1; }
      tail -2 "$RUNS/qat.log"
    fi
    SEV_INIT="$RUNS/run/trained.ckpt"
  fi
  slim "$RUNS/run/best.ckpt"
  # ---------------------------------------------------------------- 3. evaluation
  # first (it rewrites best.ckpt): temperature fitted on val, then the COVID-19 threshold chosen again on val at
  # that temperature (sensitivity >= 0.95), so predict/serve use both; then the patient split's test split
  step "evaluate: temperature + threshold on val, patient-split test (per source)"
  $CX evaluate --model "$RUNS/run/best.ckpt" --data "$RUNS/reference-manifest.csv" --split test --calibrate --set-threshold \
    --out "$RUNS/eval-test" --n-boot "$BOOT" > "$RUNS/eval-test.log" 2>&1 || { tail -3 "$RUNS/eval-test.log"; exit 1; }
  # the rest reads the final best.ckpt and is independent: side by side, one thread each (a loaded shared machine)
  export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
  step "side by side: Actualmed hold-out, INT8 export + parity gate, shortcut audit ($AUDIT_LIMIT test images), severity"
  ( $CX evaluate --model "$RUNS/run/best.ckpt" --data "$RUNS/actualmed-holdout.csv" --split test \
      --out "$RUNS/eval-actualmed" --n-boot "$BOOT" > "$RUNS/eval-actualmed.log" 2>&1 \
      || echo "actualmed evaluation failed: see $RUNS/eval-actualmed.log" ) &
  ( if $CX export --model "$RUNS/run/best.ckpt" --onnx "$RUNS/onnx/model.int8.onnx" --quantize int8 \
         --calibration-method percentile --keep-fp32 "$KEEP_FP32" --calibrate "$RUNS/reference-manifest.csv" --parity-images "$RUNS/reference-manifest.csv" --parity-count 16 \
         > "$RUNS/int8.log" 2>&1; then echo ok > "$RUNS/int8.status"; else tail -2 "$RUNS/int8.log" > "$RUNS/int8.status"; fi ) &
  ( $CX audit-model --model "$RUNS/run/best.ckpt" --data "$RUNS/reference-manifest.csv" --split test --methods gradcam \
      --limit "$AUDIT_LIMIT" --bootstrap "$BOOT" --no-progress --threads 1 --out "$RUNS/audit" > "$RUNS/audit.log" 2>&1 \
      || echo "shortcut audit failed: see $RUNS/audit.log" ) &
  # ---------------------------------------------------------------- 4. severity
  SEV_LIMIT=(); [ "$SMOKE" = 1 ] && SEV_LIMIT=(--size "$SIZE")
  ( $CX severity train --task scores --data "$RUNS/reference-manifest.csv" --init "$SEV_INIT" --out "$RUNS/severity" \
      --max-epochs "$SEV_EPOCHS" --seed "$SEED" --accelerator cpu "${SEV_LIMIT[@]}" > "$RUNS/severity.log" 2>&1 \
    && $CX severity evaluate --model "$RUNS/severity/best.ckpt" --data "$RUNS/reference-manifest.csv" --split test \
      --out "$RUNS/severity-eval" --bootstrap "$BOOT" > "$RUNS/severity-eval.log" 2>&1 \
    || echo "severity failed: see $RUNS/severity.log / severity-eval.log" ) &
  wait
  [ -f "$RUNS/eval-actualmed/metrics.json" ] && [ -f "$RUNS/severity/best.ckpt" ] || { echo "a required step failed"; exit 1; }
  echo $(( $(date +%s) - START )) >> "$RUNS/seconds"
fi

# ---------------------------------------------------------------- 5. cards + packing
if [ "$RERUN" = 1 ]; then
  step "compare with the shipped models (nothing packed)"
  $PY scripts/reference_rerun.py "$RUNS" $( [ "$SMOKE" = 1 ] || echo "--doc docs/reproducibility.md" )
  step "done"
  exit 0
fi
step "model cards and packing"
PACK=(--pack); [ "$SMOKE" = 1 ] && PACK=(--no-pack)
$PY scripts/model_card.py "$RUNS" --version "$VERSION" --recipe "$RECIPE" --seed "$SEED" "${PACK[@]}" \
  $( [ "$SMOKE" = 1 ] && echo "--doc $RUNS/model-card.md" )
step "done"
