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
#      the scratch baseline and twice vs once transfer (python -m covidcxr.evaluate.paired), covidcxr
#      audit-model (Grad-CAM relevance inside the lungs, lungs-only AUC) on the patient split;
#   4. severity scores fine-tuned from the MobileNetV2 transfer classifier's body: test split and
#      Monte-Carlo CV over patients;
#   5. leave-one-source-out (stage loso): for each source of LOSO_SOURCES a data build with that source
#      held out (--holdout-source), the LOSO_RECIPES trained on the other sources, each evaluated on the
#      held-out source's images only (RUNS/loso/<source>/manifest-eval.csv), and (stage paired) every other
#      LOSO recipe against the first one on the same held-out images (paired bootstrap);
#   6. scripts/results_tables.py writes RUNS/results_tables.md and fills the results:begin/end block
#      of docs/results.md.
#
#   NICENESS=0 bash scripts/results_classification.sh    # full run (45 min on the otherwise idle 2-core machine)
#   SMOKE=1 bash scripts/results_classification.sh       # plumbing check: 1 epoch, 64 px, few batches
#   MODELS="scratch mnv2" JOBS=1 bash scripts/results_classification.sh
#   STAGES=loso LOSO_SOURCES=actualmed LOSO_RECIPES=probe SIZE=64 EPOCHS=1 bash scripts/results_classification.sh
#
# Environment: MODELS (ids to run; the others are listed as "not run: $NOT_RUN_REASON"), RUNS (output folder, default results-out/, ignored by git), EPOCHS, SIZE, JOBS (trainings
# side by side, one torch thread each), BOOT (bootstrap replicates), SEV_EPOCHS, SEV_SPLITS, NICENESS,
# COVIDCXR_SHARED (default ../shared), COVIDCXR_WEIGHTS_DIR (default $COVIDCXR_SHARED/weights),
# DOC (markdown file to update; empty: do not touch docs; SMOKE runs never touch docs), ONLY_MASKS=1 (stop
# after the data builds and the lung masks, e.g. to fill the mask cache RUNS/masks ahead of a run),
# RECIPES (same as MODELS), PRECISION (e.g. bf16-mixed: --set trainer.precision=... for every training; empty:
# the recipe's own), STAGES (default "split holdout audit severity paired loso": split / holdout = the two
# settings' trainings, audit and severity chain on split, paired = the paired bootstraps, loso = the
# leave-one-source-out runs; the tables are always written), LOSO_SOURCES (default "actualmed cohen figure1
# hannover nih"), LOSO_RECIPES (default "mnv2 robust robustlp"; the lung-crop recipe is not run there).
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
[ -n "${RECIPES:-}" ] && MODELS=${MODELS:-$RECIPES}
STAGES=" ${STAGES:-split holdout audit severity paired loso} "
has() { case "$STAGES" in *" $1 "*) return 0;; esac; return 1; }
for st in $STAGES; do
  case "$st" in split|holdout|audit|severity|paired|loso) ;; *) echo "error: unknown stage $st (known: split holdout audit severity paired loso)" >&2; exit 2;; esac
done
LOSO_SOURCES=${LOSO_SOURCES:-actualmed cohen figure1 hannover nih}
LOSO_RECIPES=${LOSO_RECIPES:-mnv2 robust robustlp}
if [ "$SMOKE" = 1 ]; then
  MODELS=${MODELS:-scratch probe mnv2 effl0 twice}   # lungcrop would segment the whole test split: MODELS=... to add it
  EPOCHS=${EPOCHS:-1}; SIZE=${SIZE:-64}; BOOT=${BOOT_SMOKE:-50}; SEV_EPOCHS=${SEV_EPOCHS:-1}; SEV_SPLITS=${SEV_SPLITS:-2}
  LIMIT=(--set trainer.limit_train_batches=2 --set trainer.limit_val_batches=2); AUDIT_LIMIT=(--limit 8)
  DOC=${DOC:-}
else
  MODELS=${MODELS:-scratch probe mnv2 effl0 lungcrop twice robust robustlp}
  # the run in docs/results.md: 45 min on the idle 2-core machine (224 px, the recipes' size; 3 epochs =
  # 1 head warm-up + 2 fine-tuning, where the MobileNetV2 recipe's val AUC had levelled off in docs/training.md)
  EPOCHS=${EPOCHS:-3}; SIZE=${SIZE:-224}; SEV_EPOCHS=${SEV_EPOCHS:-4}; SEV_SPLITS=${SEV_SPLITS:-5}
  LIMIT=(); AUDIT_LIMIT=(); DOC=${DOC-docs/results.md}
fi
CX=".venv/bin/covidcxr"
PY=".venv/bin/python"
NICE="nice -n ${NICENESS:-10}"
DATA=(--source "csv=$SHARED/data/covid-cxr-dev/metadata.csv" --source "nih=$SHARED/data/nih-cxr14-subset"
      --source "hannover=$SHARED/data/hannover-covid")
mkdir -p "$RUNS"
START=$(date +%s)
INVOCATION_START=$START
if [ "${CONTINUE:-0}" = 1 ] && [ -f "$RUNS/start_epoch" ]; then START=$(cat "$RUNS/start_epoch"); else echo "$START" > "$RUNS/start_epoch"; fi
STARTED=$(date -u -d "@$START" +"%Y-%m-%d %H:%M")
# CONTINUE=1 picks up an interrupted run in RUNS: keeps its data, masks, status and timings, and never
# retrains a model whose train log exists (one still training in the other run is waited for).
CONTINUE=${CONTINUE:-0}
[ "$CONTINUE" = 1 ] || { : > "$RUNS/status.tsv"; : > "$RUNS/timings.tsv"; }
: > "$RUNS/models.tsv"
echo "covidcxr results: research use only, not a clinical performance claim."
echo "weights: $COVIDCXR_WEIGHTS_DIR; runs: $RUNS; epochs $EPOCHS, ${SIZE} px, $JOBS jobs, smoke=$SMOKE, stages:$STAGES"
[ -d "$COVIDCXR_WEIGHTS_DIR" ] || echo "warning: $COVIDCXR_WEIGHTS_DIR not found: the transfer recipes will fail (no ImageNet weights)"

elapsed() { echo $(( $(date +%s) - START )); }
timing() { printf '%s\t%s\n' "$1" "$2" >> "$RUNS/timings.tsv"; }
# this invocation's own wall time, written once, also when it is interrupted (Ctrl-C, TERM, an error): a later
# CONTINUE=1 run adds its own, and run.json's minutes are the sum (the pause between invocations is not run time)
invocation_timed() { [ -n "${TIMED:-}" ] && return 0; TIMED=1; timing "whole script" "$(( $(date +%s) - INVOCATION_START ))"; }
trap invocation_timed EXIT
mark() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$RUNS/status.tsv"; }
pool() { while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done; }

# ------------------------------------------------------------------ models: recipe + CPU-sized overrides
# Every training: one torch thread, SIZE px, EPOCHS epochs, the preprocessed-image cache, no progress bar,
# channels-last tensors (on this CPU 1.7-4x the training img/s of MobileNetV2 / EfficientNet-Lite0 at 160-224 px:
# their depthwise convolutions are slow in the default layout; same arithmetic, same results up to rounding).
COMMON="trainer.num_threads=1 data.size=$SIZE trainer.max_epochs=$EPOCHS data.cache_dir=$RUNS/cache trainer.progress_bar=false trainer.accelerator=cpu trainer.channels_last=true"
[ -n "${PRECISION:-}" ] && COMMON="$COMMON trainer.precision=$PRECISION"   # bf16-mixed: issue 18 §5
declare -A LABEL CONFIG SETS NOTREADY
LABEL[scratch]="ResNet-18, scratch (baseline)"; CONFIG[scratch]=configs/scratch-cpu.yaml; SETS[scratch]="model.arch=resnet18"
LABEL[probe]="MobileNetV2, linear probe";        CONFIG[probe]=configs/linear-probe-mobilenet_v2.yaml; SETS[probe]=""
LABEL[mnv2]="MobileNetV2, fine-tuned";           CONFIG[mnv2]=configs/transfer-mobilenet_v2.yaml; SETS[mnv2]=""
LABEL[effl0]="EfficientNet-Lite0, fine-tuned";   CONFIG[effl0]=configs/transfer-efficientnet_lite0.yaml; SETS[effl0]=""
LABEL[lungcrop]="MobileNetV2, CXNet-style lung crop"; CONFIG[lungcrop]=configs/transfer-cxnet-lungcrop.yaml; SETS[lungcrop]=""
LABEL[twice]="MobileNetV2, twice transfer (ImageNet → NIH → 3 classes)"; CONFIG[twice]=configs/twice-transfer-mobilenet_v2.yaml; SETS[twice]=""
LABEL[robust]="MobileNetV2, group-robust"; CONFIG[robust]=configs/robust-mobilenet_v2.yaml; SETS[robust]=""
LABEL[robustlp]="MobileNetV2, group-balanced linear probe"; CONFIG[robustlp]=configs/robust-probe-mobilenet_v2.yaml; SETS[robustlp]=""
ALL_IDS="scratch probe mnv2 effl0 lungcrop twice robust robustlp"
for m in $MODELS $(has loso && echo "$LOSO_RECIPES"); do
  [ -n "${LABEL[$m]:-}" ] || { echo "error: unknown model id $m (known: ${!LABEL[*]})" >&2; exit 2; }
done
LOSO_ONLY=$(for m in $LOSO_RECIPES; do case " $MODELS " in *" $m "*) ;; *) printf '%s ' "$m";; esac; done)
for m in $ALL_IDS; do   # every model gets a row; one left out says why
  case " $MODELS $(has loso && echo "$LOSO_ONLY") " in
    *" $m "*) [ -f "${CONFIG[$m]}" ] || NOTREADY[$m]="not run: recipe ${CONFIG[$m]} not in this checkout" ;;
    *) NOTREADY[$m]="not run: ${NOT_RUN_REASON:-left out of MODELS for this run}" ;;
  esac
  printf '%s\t%s\t%s\t%s\t%s\n' "$m" "${LABEL[$m]}" "${CONFIG[$m]}" "${SETS[$m]} $COMMON" "${NOTREADY[$m]:-}" >> "$RUNS/models.tsv"
  if [ -n "${NOTREADY[$m]:-}" ]; then mark split "$m" "${NOTREADY[$m]}"; mark holdout "$m" "${NOTREADY[$m]}"; fi
done
for m in $LOSO_ONLY; do   # run in the LOSO stage only
  [ -n "${NOTREADY[$m]:-}" ] || { mark split "$m" "not run: ${NOT_RUN_REASON:-left out of MODELS}"; mark holdout "$m" "not run: ${NOT_RUN_REASON:-left out of MODELS}"; }
done
MODELS=$(for m in $MODELS; do [ -n "${NOTREADY[$m]:-}" ] || printf '%s ' "$m"; done)
HOLDOUT_MODELS=${HOLDOUT_MODELS:-$MODELS}   # a subset may run in the hold-out setting
AUDIT_MODELS=${AUDIT_MODELS:-$MODELS}
for m in $MODELS; do
  case " $HOLDOUT_MODELS " in *" $m "*) ;; *) mark holdout "$m" "not run: ${NOT_RUN_REASON:-left out of HOLDOUT_MODELS}";; esac
  for s in split holdout; do has "$s" || mark "$s" "$m" "not run: stage $s left out of STAGES"; done
done

# ------------------------------------------------------------------ 1. data
t0=$(elapsed)
MASK_PID=
if ! has split && ! has holdout; then
  echo "stages split and holdout not in STAGES: no patient-split or actualmed hold-out data, masks or trainings"
elif [ "$CONTINUE" = 1 ] && [ -f "$RUNS/split/manifest.csv" ] && [ -f "$RUNS/holdout/manifest.csv" ]; then
  echo "CONTINUE=1: keeping the data builds in $RUNS"
else
$CX data build "${DATA[@]}" --out "$RUNS/split" --seed 62 > "$RUNS/split.build.log" 2>&1 || { tail -3 "$RUNS/split.build.log"; exit 1; }
$CX data build "${DATA[@]}" --out "$RUNS/holdout" --seed 62 --holdout-source actualmed > "$RUNS/holdout.build.log" 2>&1 \
  || { tail -3 "$RUNS/holdout.build.log"; exit 1; }
timing "data build (both settings)" $(( $(elapsed) - t0 ))
fi
has split || has holdout && echo "data built ($(elapsed) s)"

# ------------------------------------------------------------------ 1b. lung masks
# The pretrained lung U-Net (catalogue lung-unet-vgg11, onnxruntime: the same masks as torch at half the
# CPU time) segments every image that has no manifest mask, once, into RUNS/masks/<px>/<shard>/ (kept
# between runs): the test images of both settings at MASK_TEST_SIZE px (default: the network's 512; the
# audit measures relevance inside these) and, when the lung-crop recipe runs, the train/val images at
# MASK_TRAIN_SIZE px (default 256: 4x cheaper; on NIH samples its masks agree with 512 px at Dice
# 0.90-0.93, plenty for the lung-crop recipe's bounding box).
# manifest-lungs.csv = manifest.csv with those masks in mask_path; every step below reads it, so the
# lung-crop recipe and the audit use one mask per image instead of segmenting again in each process.
masks_step() {  # runs in the background beside the first trainings (one pool slot)
  local t0; t0=$(elapsed)
  rm -f "$RUNS"/masks/*/todo-*.txt   # a stale list of an earlier run must not be segmented again
  $PY - "$RUNS/split/manifest.csv" "$RUNS/holdout/manifest.csv" "$RUNS/masks" "$MASK_JOBS" "$MASK_LIMIT" "$MASK_TRAIN_SIZE" "$MASK_TEST_SIZE" "$NEED_TRAIN_MASKS" <<'PY'
import sys
from pathlib import Path
import pandas as pd
split, hold, masks, jobs, limit, train_px, test_px = sys.argv[1:3] + [Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])] + sys.argv[6:8]
need_train = sys.argv[8] == "1"  # train/val masks only for the lung-crop recipe
m = pd.read_csv(split, dtype=str, keep_default_na=False)
h = pd.read_csv(hold, dtype=str, keep_default_na=False)
test = set(m.loc[m["split"] == "test", "path"]) | set(h.loc[h["split"] == "test", "path"])
stem = lambda p: Path(p).stem  # noqa: E731
passes = [(test_px, m[m["path"].isin(test)])] + ([(train_px, m[~m["path"].isin(test)])] if need_train else [])
for px, rows in passes:
    done = {p.name[: -len("_mask.png")] for p in masks.glob(f"{px}/*/*_mask.png")}
    todo = rows[(rows["mask_path"] == "") & ~rows["path"].map(stem).isin(done)]
    if limit:  # smoke run: a few test images only
        todo = todo.head(limit) if px == test_px else todo.head(0)
    for k in range(jobs):
        (masks / px / str(k)).mkdir(parents=True, exist_ok=True)
        (masks / px / f"todo-{k}.txt").write_text("".join(p + "\n" for p in todo["path"].iloc[k::jobs]))
    print(f"lung masks at {px} px: {len(todo)} image(s) to segment, {len(done)} cached in {masks / px}")
PY
  for px in "$MASK_TEST_SIZE" "$MASK_TRAIN_SIZE"; do
    for k in $(seq 0 $(( MASK_JOBS - 1 ))); do
      [ -s "$RUNS/masks/$px/todo-$k.txt" ] || continue
      $NICE $PY - "$RUNS/masks/$px/todo-$k.txt" "$RUNS/masks/$px/$k" "$px" > "$RUNS/masks/$px/segment-$k.log" 2>&1 <<'PY' &
import sys, torch
from covidcxr.segment import load_segmenter, predict_files
torch.set_num_threads(1)
paths = [p for p in open(sys.argv[1]).read().splitlines() if p]
seg = load_segmenter(None, size=int(sys.argv[3]), backend="onnx")  # the default: lung-unet-vgg11
written, failed = predict_files(paths, seg, sys.argv[2], overlay_images=False)
print(f"{seg.id}: wrote {len(written)} mask(s), {len(failed)} failed", *(f"{p}: {r}" for p, r in failed), sep="\n")
PY
    done
    wait
  done
  for s in split holdout; do
    $PY - "$RUNS/$s/manifest.csv" "$RUNS/masks" "$RUNS/$s/manifest-lungs.csv" "$MASK_TRAIN_SIZE" "$MASK_TEST_SIZE" <<'PY'
import sys
from pathlib import Path
import pandas as pd
man, masks, out, train_px, test_px = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
m = pd.read_csv(man, dtype=str, keep_default_na=False)
found = {}
for px in sorted({train_px, test_px, "512"}, key=int):  # the finest mask of an image wins
    found.update({p.name[: -len("_mask.png")]: str(p.resolve()) for p in masks.glob(f"{px}/*/*_mask.png")})
empty = m["mask_path"] == ""
m.loc[empty, "mask_path"] = m.loc[empty, "path"].map(lambda p: found.get(Path(p).stem, ""))
m.to_csv(out, index=False)
test = m["split"] == "test"
print(f"{out}: {(~empty).sum()} manifest masks, {(m.loc[empty, 'mask_path'] != '').sum()} from the U-Net, "
      f"{(m['mask_path'] == '').sum()} without ({(m.loc[test, 'mask_path'] == '').sum()} of {test.sum()} test images)")
PY
  done
  timing "lung masks (pretrained U-Net, onnxruntime, $MASK_JOBS process(es))" $(( $(elapsed) - t0 ))
}
MASK_LIMIT=0; [ "$SMOKE" = 1 ] && MASK_LIMIT=8
MASK_TRAIN_SIZE=${MASK_TRAIN_SIZE:-256}
MASK_TEST_SIZE=${MASK_TEST_SIZE:-512}
MASK_JOBS=${MASK_JOBS:-1}
NEED_TRAIN_MASKS=0; case " $MODELS " in *" lungcrop "*) NEED_TRAIN_MASKS=1;; esac
if [ "${ONLY_MASKS:-0}" = 1 ]; then MASK_JOBS=$JOBS; masks_step; echo "masks done in $(elapsed) s (ONLY_MASKS=1: stopping here)"; exit 0; fi
# The masks serve only the audit and the lung-crop recipe: a run with neither skips them (no waiting on them below).
NEED_MASKS=0; { has audit || [ "$NEED_TRAIN_MASKS" = 1 ]; } && { has split || has holdout; } && NEED_MASKS=1
if [ "$NEED_MASKS" = 0 ]; then
  :   # no masks: the LOSO stage does not run the lung-crop recipe or the audit
elif [ "$CONTINUE" = 1 ] && pgrep -f "$RUNS/masks/" > /dev/null; then
  echo "CONTINUE=1: the other run is still segmenting; waiting for its manifest-lungs.csv before the audit"; MASK_PID=
else
  pool; masks_step & MASK_PID=$!
fi

# ------------------------------------------------------------------ 2. train + evaluate (+ audit, severity)
# The shortcut audit of a patient-split model runs right after its evaluation, and the severity model right
# after the MobileNetV2 classifier it starts from, in the same pool slot: no slot idles at the end waiting
# for a last long step (functions are defined before the jobs fork, which copies them).
audit() {  # ID
  local m=$1 t1; t1=$(elapsed)
  $NICE $CX audit-model --model "$RUNS/split/$m/best.ckpt" --data "$RUNS/split/manifest-lungs.csv" --split test \
    --methods gradcam --bootstrap "$BOOT" --threads 1 --seg-model none "${AUDIT_LIMIT[@]}" --out "$RUNS/split/$m-audit" \
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
train_eval() {  # SETTING ID
  local s=$1 m=$2 out="$RUNS/$1/$2" t1 sets=() data="$RUNS/$1/manifest.csv" edata
  [ "$m" = lungcrop ] && data="$RUNS/$s/manifest-lungs.csv"   # the U-Net masks of step 1b
  edata=$data; [ -f "$RUNS/$s/manifest-eval.csv" ] && edata="$RUNS/$s/manifest-eval.csv"   # LOSO: held-out source only
  t1=$(elapsed)
  for kv in ${SETS[$m]} $COMMON; do sets+=(--set "$kv"); done
  if ! $NICE $CX train --config "${CONFIG[$m]}" --data "$data" --out "$out" --overwrite \
       "${sets[@]}" "${LIMIT[@]}" > "$out.train.log" 2>&1; then
    mark "$s" "$m" "failed: $(grep -v '^\s*$' "$out.train.log" | tail -1 | cut -c1-200)"
    echo "FAILED $s/$m (see $out.train.log)"; return
  fi
  if ! $NICE $CX evaluate --model "$out/best.ckpt" --data "$edata" --split test --out "$out-report" \
       --n-boot "$BOOT" > "$out.evaluate.log" 2>&1; then
    mark "$s" "$m" "failed (evaluate): $(tail -1 "$out.evaluate.log" | cut -c1-200)"; return
  fi
  mark "$s" "$m" ok
  timing "$s/$m: train ${EPOCHS} epochs + evaluate" $(( $(elapsed) - t1 ))
  echo "done $s/$m in $(( $(elapsed) - t1 )) s ($(( $(elapsed) / 60 )) min so far)"
  [ "$s" = split ] || return 0
  case " $AUDIT_MODELS " in   # masks not ready yet: the audit runs after the trainings instead
    *" $m "*) has audit && [ -f "$RUNS/split/manifest-lungs.csv" ] && audit "$m" ;;
  esac
  [ "$m" = mnv2 ] && has severity && severity
  return 0
}
models_of() { has "$1" || return 0; if [ "$1" = holdout ]; then echo "$HOLDOUT_MODELS"; else echo "$MODELS"; fi; }
# Longest first (longest-processing-time order over the JOBS slots): split/mnv2 carries its audit and the
# severity runs; ResNet-18 from scratch costs ~3x a MobileNetV2 epoch, twice transfer adds its NIH stage;
# the lung-crop recipe waits for the masks of step 1b, the linear probe (no backward through the body) is cheap.
ORDER=()
for sm in split/mnv2 holdout/scratch split/scratch holdout/twice split/twice split/robust holdout/robust holdout/effl0 \
          split/effl0 holdout/mnv2 holdout/lungcrop split/lungcrop holdout/probe split/probe holdout/robustlp \
          split/robustlp; do
  case " $(models_of "${sm%/*}") " in *" ${sm#*/} "*) ORDER+=("$sm") ;; esac
done

# ------------------------------------------------------------------ 2b. leave-one-source-out: data (trainings join the pool)
# One data build per held-out source (seed 62, --holdout-source: every person with an image of that source
# goes to test, train/val come from the other sources). manifest-eval.csv drops the test rows of *other*
# sources (images of persons linked to the held-out source), so the evaluation scores the held-out source only.
if has loso; then
  t0=$(elapsed)
  for src in $LOSO_SOURCES; do
    d="$RUNS/loso/$src"; mkdir -p "$d"
    if ! { [ "$CONTINUE" = 1 ] && [ -f "$d/manifest-eval.csv" ]; }; then
      if ! $CX data build "${DATA[@]}" --out "$d" --seed 62 --holdout-source "$src" > "$d.build.log" 2>&1; then
        for m in $LOSO_RECIPES; do mark "loso/$src" "$m" "failed (data build): $(tail -1 "$d.build.log" | cut -c1-200)"; done
        echo "LOSO $src: data build failed (see $d.build.log)"; continue
      fi
      $PY - "$d/manifest.csv" "$d/manifest-eval.csv" "$src" <<'PY'
import sys
import pandas as pd
man, out, src = sys.argv[1:4]
m = pd.read_csv(man, dtype=str, keep_default_na=False)
other = (m["split"] == "test") & (m["source"] != src)
m[~other].to_csv(out, index=False)  # same folder as manifest.csv: relative paths stay valid
test = m[(m["split"] == "test") & ~other]
print(f"LOSO {src}: {len(test)} held-out test images ({test['patient_id'].nunique()} patients; "
      + ", ".join(f"{k} {v}" for k, v in test["label"].value_counts().sort_index().items())
      + f"), {int(other.sum())} linked images of other sources left out of the evaluation, "
      + f"{int((m['split'] == 'train').sum())} train / {int((m['split'] == 'val').sum())} val images")
PY
    fi
    for m in $LOSO_RECIPES; do
      if [ -n "${NOTREADY[$m]:-}" ]; then mark "loso/$src" "$m" "${NOTREADY[$m]}"; continue; fi
      if [ "$m" = lungcrop ]; then mark "loso/$src" "$m" "not run: the lung-crop recipe needs masks the LOSO stage does not make"; continue; fi
      ORDER+=("loso/$src/$m")
    done
  done
  timing "LOSO data builds ($(echo $LOSO_SOURCES | wc -w) sources)" $(( $(elapsed) - t0 ))
fi
STARTED_ELSEWHERE=()
for sm in "${ORDER[@]}"; do   # the lung-crop recipe waits for the masks of step 1b
  s=${sm%/*}; m=${sm##*/}
  if [ "$CONTINUE" = 1 ] && [ -f "$RUNS/$s/$m.train.log" ]; then STARTED_ELSEWHERE+=("$sm"); continue; fi
  [ "$m" = lungcrop ] && [ -n "$MASK_PID" ] && { wait "$MASK_PID" 2>/dev/null || true; }
  pool; train_eval "$s" "$m" &
done
wait
for sm in "${STARTED_ELSEWHERE[@]}"; do   # CONTINUE=1: results of trainings the interrupted run had started
  until grep -q "^${sm%/*}	${sm##*/}	" "$RUNS/status.tsv"; do sleep 20; done
done
if [ "$NEED_MASKS" = 1 ]; then until [ -f "$RUNS/split/manifest-lungs.csv" ]; do sleep 20; done; fi

# ------------------------------------------------------------------ 3. paired differences (+ audits and severity not yet run)
t0=$(elapsed)
for s in split holdout; do
  has paired && has "$s" || continue
  neg=(); [ "$s" = holdout ] && neg=(--negatives normal)   # actualmed: COVID-19 vs normal, one hospital
  for m in $(models_of $s); do
    [ -f "$RUNS/$s/$m-report/predictions.csv" ] && [ -f "$RUNS/$s/scratch-report/predictions.csv" ] || continue
    $PY -m covidcxr.evaluate.paired "$RUNS/$s/scratch-report" "$RUNS/$s/$m-report" "${neg[@]}" --bootstrap "$BOOT" \
      --out "$RUNS/$s/$m-paired.json" > "$RUNS/$s/$m-paired.log" 2>&1 || echo "paired $s/$m failed: $(tail -1 "$RUNS/$s/$m-paired.log")"
  done
  # twice transfer and the group-robust recipes against once transfer (the fine-tuned MobileNetV2), same test images
  for b in twice robust robustlp; do
    [ -f "$RUNS/$s/$b-report/predictions.csv" ] && [ -f "$RUNS/$s/mnv2-report/predictions.csv" ] || continue
    $PY -m covidcxr.evaluate.paired "$RUNS/$s/mnv2-report" "$RUNS/$s/$b-report" "${neg[@]}" --bootstrap "$BOOT" \
      --out "$RUNS/$s/$b-vs-mnv2-paired.json" > "$RUNS/$s/$b-vs-mnv2-paired.log" 2>&1 \
      || echo "paired $s/$b vs mnv2 failed: $(tail -1 "$RUNS/$s/$b-vs-mnv2-paired.log")"
  done
done
# LOSO: every other LOSO recipe against the first one (default: robust vs mnv2), on each held-out source
LOSO_BASE=${LOSO_RECIPES%% *}
if has paired && has loso; then
  for src in $LOSO_SOURCES; do
    d="$RUNS/loso/$src"
    for b in ${LOSO_RECIPES#"$LOSO_BASE"}; do
      [ -f "$d/$b-report/predictions.csv" ] && [ -f "$d/$LOSO_BASE-report/predictions.csv" ] || continue
      $PY -m covidcxr.evaluate.paired "$d/$LOSO_BASE-report" "$d/$b-report" --bootstrap "$BOOT" \
        --out "$d/$b-vs-$LOSO_BASE-paired.json" > "$d/$b-vs-$LOSO_BASE-paired.log" 2>&1 \
        || echo "paired loso/$src/$b vs $LOSO_BASE failed: $(tail -1 "$d/$b-vs-$LOSO_BASE-paired.log")"
    done
  done
fi
has paired && timing "paired bootstrap (all models, all settings)" $(( $(elapsed) - t0 ))

# what the training jobs did not chain (e.g. CONTINUE=1 of a run whose trainings were done elsewhere)
has split && has severity && [ ! -f "$RUNS/severity/cv.log" ] && { pool; severity & }
has split && has audit && for m in $AUDIT_MODELS; do
  [ -f "$RUNS/split/$m/best.ckpt" ] && grep -q "^split	$m	ok" "$RUNS/status.tsv" || continue
  [ -f "$RUNS/split/$m-audit.log" ] && continue
  pool; audit "$m" &
done
wait

# ------------------------------------------------------------------ 4. tables
invocation_timed
MIN=$($PY - "$RUNS/run.json" "$STARTED" "$RUNS/timings.tsv" "epochs $EPOCHS, ${SIZE} px, $JOBS jobs, bootstrap $BOOT, smoke $SMOKE, precision ${PRECISION:-as in the recipes}, stages:$STAGES" <<'PY'
import json, sys, datetime
secs = [int(line.rstrip("\n").split("\t")[1]) for line in open(sys.argv[3]) if line.startswith("whole script\t")]
minutes = int((sum(secs) + 30) // 60)
json.dump({"started": sys.argv[2], "finished": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
           "minutes": minutes, "invocations": len(secs), "settings": sys.argv[4]}, open(sys.argv[1], "w"), indent=2)
print(minutes)
PY
)
if [ -n "$DOC" ]; then $PY scripts/results_tables.py "$RUNS" --doc "$DOC"; else $PY scripts/results_tables.py "$RUNS"; fi
echo "total $MIN min; checkpoints, reports and audits under $RUNS"
