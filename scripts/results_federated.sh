#!/usr/bin/env bash
# Does federation buy generalisation here? (issue 20 §4) Sites = sources of the merged benchmark: actualmed,
# cohen, figure1, hannover, nih (non-IID by construction: nih has no COVID-19, hannover only COVID-19).
#
# For each setting (split: the patient-level split; holdout: actualmed held out, so test = actualmed and the
# sites are the other four), one recipe (RECIPE) and the same passes over the data (ROUNDS x LOCAL_EPOCHS):
#   central        all training rows pooled: covidcxr train, ROUNDS x LOCAL_EPOCHS epochs
#   local          each site alone (its own train/val rows): covidcxr train, same epochs; one row per site
#   fedavg fedprox fedbn
#                  covidcxr federated simulate --site-column source: ROUNDS rounds of LOCAL_EPOCHS local epochs
#   fedavg-robust  FedAvg with the group-robust recipe (ROBUST_RECIPE): group-balanced sampling and group DRO at
#                  each site (the source adversary is off at a one-source site: nothing to tell apart)
#   fedavg-dp      FedAvg with Flower's client-side fixed clipping (DP_CLIP) and noise (DP_NOISE); epsilon
#                  reported; in the DP_SETTINGS only (default: split)
#   central-robust (not in the default list) the robust recipe pooled, for reference
# Every model is then evaluated by covidcxr evaluate on the setting's pooled test split, with its COVID-19
# threshold chosen on the setting's pooled val split (--set-threshold, sensitivity 0.95: the same rule for
# every model; for a federated model this needs only the sites' val score counts), patient-bootstrap CIs.
# Paired bootstrap differences of each federated model to central (python -m covidcxr.evaluate.paired).
# scripts/results_federated_tables.py writes RUNS/federated_tables.md and, unless DOC is empty or SMOKE=1,
# fills the federated:begin/end block of docs/federated.md. Research use only: no clinical performance claim.
#
#   SMOKE=1 bash scripts/results_federated.sh                           # plumbing: 64 px, 1 round, 2 batches
#   NICENESS=0 bash scripts/results_federated.sh                        # the run in docs/federated.md (224 px, 3 rounds)
#   CONTINUE=1 bash scripts/results_federated.sh                        # pick up an interrupted run
#
# Environment: RUNS (default results-out/federated, ignored by git), SIZE (px; default 224), ROUNDS (default 3),
# LOCAL_EPOCHS (default 1), SETTINGS (default "split holdout"), STRATEGIES (what to run, default "central local
# fedavg fedprox fedbn fedavg-robust fedavg-dp"; the others get a "not run" row), LOCAL_SITES (default: every
# source with training rows), DP_SETTINGS (default split), DP_NOISE (1.0), DP_CLIP (1.0), PROX_MU (0.01), RECIPE
# (configs/transfer-mobilenet_v2.yaml), ROBUST_RECIPE (configs/robust-mobilenet_v2.yaml), BOOT (bootstrap
# replicates, default 1000), LIMIT (trainer.limit_train/val_batches, default all), JOBS (central and local
# trainings side by side, one torch thread each, default 2; the federated runs go one at a time: each runs one
# process per site), NICENESS (default 10), RUN_TIMEOUT (seconds per training, 0 = none), CONTINUE=1 (keep
# the data builds and every run whose status is ok; redo the rest), DOC (default docs/federated.md), BLOCK (its
# generated block's name, default federated: a second run gets a block of its own),
# COVIDCXR_SHARED (default ../shared), COVIDCXR_WEIGHTS_DIR (default $COVIDCXR_SHARED/weights).
set -uo pipefail
cd "$(dirname "$0")/.."
SHARED=${COVIDCXR_SHARED:-../shared}
export COVIDCXR_WEIGHTS_DIR=${COVIDCXR_WEIGHTS_DIR:-$SHARED/weights}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
RUNS=${RUNS:-results-out/federated}
SMOKE=${SMOKE:-0}
if [ "$SMOKE" = 1 ]; then
  SIZE=${SIZE:-64}; ROUNDS=${ROUNDS:-1}; LOCAL_EPOCHS=${LOCAL_EPOCHS:-1}; BOOT=${BOOT:-50}; LIMIT=${LIMIT:-2}
  DOC=${DOC:-}
else
  # the run in docs/federated.md: the recipe's 224 px, 3 rounds of 1 local epoch (= 3 epochs centralised: 1 head
  # warm-up + 2 fine-tuning, as in docs/results.md's main run); one fine-tuning epoch of the largest site (nih,
  # 469 images) took 37 s on one core of the idle 2-core machine (11 s at 128 px): about 45 min in all
  SIZE=${SIZE:-224}; ROUNDS=${ROUNDS:-3}; LOCAL_EPOCHS=${LOCAL_EPOCHS:-1}; BOOT=${BOOT:-1000}; LIMIT=${LIMIT:-}
  DOC=${DOC-docs/federated.md}
fi
SETTINGS=${SETTINGS:-split holdout}
ALL_IDS="central local fedavg fedprox fedbn fedavg-robust fedavg-dp central-robust"
STRATEGIES=" ${STRATEGIES:-central local fedavg fedprox fedbn fedavg-robust fedavg-dp} "
DP_SETTINGS=" ${DP_SETTINGS:-split} "
DP_NOISE=${DP_NOISE:-1.0}; DP_CLIP=${DP_CLIP:-1.0}; PROX_MU=${PROX_MU:-0.01}
RECIPE=${RECIPE:-configs/transfer-mobilenet_v2.yaml}
ROBUST_RECIPE=${ROBUST_RECIPE:-configs/robust-mobilenet_v2.yaml}
JOBS=${JOBS:-2}; RUN_TIMEOUT=${RUN_TIMEOUT:-0}; CONTINUE=${CONTINUE:-0}
TOTAL=$(( ROUNDS * LOCAL_EPOCHS ))   # centralised and local-only epochs: the same passes over the data
CX=".venv/bin/covidcxr"; PY=".venv/bin/python"
NICE="nice -n ${NICENESS:-10}"
TO=(); [ "$RUN_TIMEOUT" != 0 ] && TO=(timeout --signal=TERM --kill-after=60 "$RUN_TIMEOUT")
for s in $SETTINGS; do case "$s" in split|holdout) ;; *) echo "error: unknown setting $s (split, holdout)" >&2; exit 2;; esac; done
for m in $STRATEGIES; do
  case " $ALL_IDS " in *" $m "*) ;; *) echo "error: unknown id $m in STRATEGIES (known: $ALL_IDS)" >&2; exit 2;; esac
done
for r in "$RECIPE" "$ROBUST_RECIPE"; do [ -f "$r" ] || { echo "error: recipe $r not found" >&2; exit 2; }; done
mkdir -p "$RUNS"
CACHE=$(realpath -m "$RUNS/cache")   # absolute: the site processes read the recipe's cache_dir as given
# every training: SIZE px, one torch thread, the preprocessed-image cache, channels-last (as results_classification.sh)
SETS=(--set "data.size=$SIZE" --set trainer.accelerator=cpu --set trainer.num_threads=1 --set trainer.progress_bar=false
      --set "data.cache_dir=$CACHE" --set trainer.channels_last=true)
[ -n "$LIMIT" ] && SETS+=(--set "trainer.limit_train_batches=$LIMIT" --set "trainer.limit_val_batches=$LIMIT")
DATA=(--source "csv=$SHARED/data/covid-cxr-dev/metadata.csv" --source "nih=$SHARED/data/nih-cxr14-subset"
      --source "hannover=$SHARED/data/hannover-covid")

START=$(date +%s)
INVOCATION_START=$START
if [ "$CONTINUE" = 1 ] && [ -f "$RUNS/start_epoch" ]; then START=$(cat "$RUNS/start_epoch"); else echo "$START" > "$RUNS/start_epoch"; fi
[ "$CONTINUE" = 1 ] || { : > "$RUNS/status.tsv"; : > "$RUNS/timings.tsv"; : > "$RUNS/runs.tsv"; }
touch "$RUNS/status.tsv" "$RUNS/timings.tsv" "$RUNS/runs.tsv"
echo "covidcxr federated results: research use only, not a clinical performance claim."
echo "runs: $RUNS; ${SIZE} px, $ROUNDS round(s) x $LOCAL_EPOCHS local epoch(s) (= $TOTAL centralised epochs), settings: $SETTINGS; smoke=$SMOKE"
elapsed() { echo $(( $(date +%s) - START )); }
mark() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$RUNS/status.tsv"; }          # setting, id, ok | failed: ... | not run: ...
timing() { printf '%s\t%s\n' "$1" "$2" >> "$RUNS/timings.tsv"; }
# this invocation's own wall time, written once, also when it is interrupted (Ctrl-C, TERM, an error): a later
# CONTINUE=1 run then adds its own, and the run's minutes are the sum (pauses between invocations not counted)
invocation_timed() { [ -n "${TIMED:-}" ] && return 0; TIMED=1; timing "whole script" "$(( $(date +%s) - INVOCATION_START ))"; }
trap invocation_timed EXIT
done_ok() { [ "$CONTINUE" = 1 ] && grep -q "^$1	$2	ok$" "$RUNS/status.tsv"; }
pool() { while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done; }
cat > "$RUNS/run.json" <<EOF
{"started": "$(date -u -d "@$START" +'%Y-%m-%d %H:%M')", "size": $SIZE, "rounds": $ROUNDS, "local_epochs": $LOCAL_EPOCHS,
 "centralised_epochs": $TOTAL, "limit": "${LIMIT:-all}", "boot": $BOOT, "smoke": $SMOKE, "jobs": $JOBS,
 "recipe": "$RECIPE", "robust_recipe": "$ROBUST_RECIPE", "dp_noise": $DP_NOISE, "dp_clip": $DP_CLIP, "proximal_mu": $PROX_MU,
 "settings": "$SETTINGS", "strategies": "$(echo $STRATEGIES)"}
EOF

# run SETTING ID DIR -- COMMAND...: trains (COMMAND writes DIR/best.ckpt), then evaluates it on the setting's pooled
# test split with the threshold chosen on its pooled val split; records status, wall time and the run folder
run() {
  local s=$1 id=$2 dir=$3; shift 4
  local m="$RUNS/$s/manifest.csv" t0 wall
  done_ok "$s" "$id" && { echo "CONTINUE=1: $s/$id already done"; return 0; }
  t0=$(date +%s)
  if ! $NICE "${TO[@]}" "$@" > "$dir.log" 2>&1; then
    mark "$s" "$id" "failed: $(grep -v '^\s*$' "$dir.log" | tail -1 | cut -c1-200)"; echo "FAILED $s/$id (see $dir.log)"; return 0
  fi
  wall=$(( $(date +%s) - t0 ))
  printf '%s\t%s\t%s\t%s\n' "$s" "$id" "$dir" "$wall" >> "$RUNS/runs.tsv"
  timing "$s/$id: train" "$wall"
  t0=$(date +%s)
  if ! $NICE $CX evaluate --model "$dir/best.ckpt" --data "$m" --split test --set-threshold --out "$dir-report" \
       --n-boot "$BOOT" > "$dir.evaluate.log" 2>&1; then
    mark "$s" "$id" "failed (evaluate): $(grep -v '^\s*$' "$dir.evaluate.log" | tail -1 | cut -c1-200)"; return 0
  fi
  timing "$s/$id: evaluate" $(( $(date +%s) - t0 ))
  mark "$s" "$id" ok
  echo "done $s/$id: trained in $wall s ($(( $(elapsed) / 60 )) min so far)"
}
want() { case "$STRATEGIES" in *" $1 "*) return 0;; esac; return 1; }

for s in $SETTINGS; do
  S="$RUNS/$s"; mkdir -p "$S/sites"
  for id in $ALL_IDS; do   # every id gets a row; one left out says why
    [ "$id" = local ] && continue
    done_ok "$s" "$id" && continue   # CONTINUE=1: a finished run keeps its row
    want "$id" || { mark "$s" "$id" "not run: left out of STRATEGIES"; continue; }
    [ "$id" = fedavg-dp ] && case "$DP_SETTINGS" in *" $s "*) ;; *) mark "$s" "$id" "not run: one DP run (DP_SETTINGS=$(echo $DP_SETTINGS))";; esac
  done
  if [ ! -f "$S/manifest.csv" ] || [ "$CONTINUE" != 1 ]; then
    t0=$(elapsed); HOLD=(); [ "$s" = holdout ] && HOLD=(--holdout-source actualmed)
    $CX data build "${DATA[@]}" --out "$S" --seed 62 "${HOLD[@]}" > "$S.build.log" 2>&1 \
      || { echo "data build failed: $(tail -1 "$S.build.log")" >&2; exit 1; }
    timing "$s: data build" $(( $(elapsed) - t0 ))
  fi
  M="$S/manifest.csv"
  ALL_SITES=$($PY -c "import pandas as pd,sys; d=pd.read_csv(sys.argv[1]); print(' '.join(sorted(d.loc[d.split=='train','source'].astype(str).unique())))" "$M")
  SITES=${LOCAL_SITES:-$ALL_SITES}
  echo "$s: sites with training rows: $ALL_SITES (local-only runs: $SITES)"
  for site in $ALL_SITES; do
    case " $SITES " in *" $site "*) ;; *) done_ok "$s" "local-$site" || mark "$s" "local-$site" "not run: left out of LOCAL_SITES";; esac
  done

  # ---- centralised and local-only trainings, JOBS side by side
  want central && { pool; run "$s" central "$S/central" -- $CX train --config "$RECIPE" --data "$M" --out "$S/central" \
      --overwrite --max-epochs "$TOTAL" "${SETS[@]}" & }
  want central-robust && { pool; run "$s" central-robust "$S/central-robust" -- $CX train --config "$ROBUST_RECIPE" \
      --data "$M" --out "$S/central-robust" --overwrite --max-epochs "$TOTAL" "${SETS[@]}" & }
  for site in $SITES; do
    want local || { done_ok "$s" "local-$site" || mark "$s" "local-$site" "not run: left out of STRATEGIES"; continue; }
    # the site's own train/val rows, absolute image paths; its model is evaluated on the pooled test split
    $PY - "$M" "$site" "$S/sites/$site.csv" <<'EOF'
import os, sys
import pandas as pd
m, site, out = sys.argv[1:]
d = pd.read_csv(m, dtype=str, keep_default_na=False)
base = os.path.dirname(os.path.abspath(m))
for col in ("path", "mask_path"):
    if col in d.columns:
        d[col] = [p if not p or os.path.isabs(p) else os.path.join(base, p) for p in d[col]]
d[(d["source"] == site) & d["split"].isin(["train", "val"])].to_csv(out, index=False)
EOF
    pool; run "$s" "local-$site" "$S/local-$site" -- $CX train --config "$RECIPE" --data "$S/sites/$site.csv" \
      --out "$S/local-$site" --overwrite --max-epochs "$TOTAL" "${SETS[@]}" &
  done
  wait

  # ---- federated: one simulation at a time (each runs a server and one client process per site)
  for id in fedavg fedprox fedbn fedavg-robust fedavg-dp; do
    want "$id" || continue
    recipe=$RECIPE; extra=(--strategy "${id%%-*}")
    case "$id" in
      fedprox) extra+=(--proximal-mu "$PROX_MU");;
      fedavg-robust) recipe=$ROBUST_RECIPE;;
      fedavg-dp) case "$DP_SETTINGS" in *" $s "*) ;; *) continue;; esac
                 extra+=(--dp-noise "$DP_NOISE" --dp-clip "$DP_CLIP");;
    esac
    run "$s" "$id" "$S/$id" -- $CX federated simulate --config "$recipe" --data "$M" --site-column source \
      --rounds "$ROUNDS" --local-epochs "$LOCAL_EPOCHS" "${extra[@]}" --out "$S/$id" "${SETS[@]}"
  done

  # ---- paired bootstrap: each federated model minus central, on the same test images
  t0=$(elapsed)
  for id in fedavg fedprox fedbn fedavg-robust fedavg-dp; do
    [ -f "$S/$id-report/predictions.csv" ] && [ -f "$S/central-report/predictions.csv" ] || continue
    $NICE $PY -m covidcxr.evaluate.paired "$S/central-report" "$S/$id-report" --bootstrap "$BOOT" \
      --out "$S/$id-vs-central-paired.json" > "$S/$id-vs-central-paired.log" 2>&1 \
      || echo "paired $s/$id vs central failed: $(tail -1 "$S/$id-vs-central-paired.log")"
  done
  timing "$s: paired bootstrap vs central" $(( $(elapsed) - t0 ))
done

invocation_timed
$PY - "$RUNS/run.json" "$RUNS/timings.tsv" <<'EOF'
import datetime, json, sys
p, timings = sys.argv[1], sys.argv[2]; d = json.load(open(p))
secs = [int(line.rstrip("\n").split("\t")[1]) for line in open(timings) if line.startswith("whole script\t")]
d.update(finished=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
         minutes=int((sum(secs) + 30) // 60), invocations=len(secs))
json.dump(d, open(p, "w"), indent=2)
EOF
if [ -n "$DOC" ] && [ "$SMOKE" != 1 ]; then $PY scripts/results_federated_tables.py "$RUNS" --doc "$DOC" --block "${BLOCK:-federated}"
else $PY scripts/results_federated_tables.py "$RUNS"; fi
echo "total $(( $(elapsed) / 60 )) min; checkpoints and reports under $RUNS"
