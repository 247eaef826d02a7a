#!/usr/bin/env bash
# Does federation buy generalisation here? Sites = sources of the merged benchmark (actualmed, cohen, figure1,
# hannover, nih: non-IID by construction, nih has no COVID-19 and hannover only COVID-19).
#
# For each setting (split: the patient-level split; holdout: actualmed held out, test = actualmed only), with
# one recipe (RECIPE, default configs/transfer-mobilenet_v2.yaml) and the same passes over the data:
#   central    all training rows pooled: covidcxr train, ROUNDS x EPOCHS epochs
#   local-SITE each site alone (its train/val rows): covidcxr train, ROUNDS x EPOCHS epochs
#   fedavg, fedprox, fedbn: covidcxr federated simulate --site-column source, ROUNDS rounds of EPOCHS local epochs
#   fedavg-dp  FedAvg with Flower's client-side fixed clipping (DP_CLIP) and noise (DP_NOISE): epsilon reported
# each evaluated with covidcxr evaluate on the setting's test split (patient-bootstrap CIs: COVID-19 AUC, macro
# sensitivity, worst-group sensitivity, non-dominant-source specificity), plus wall time and bytes per round.
# Writes RUNS/federated_table.md (and .json). Research use only: nothing here is a clinical performance claim.
#
#   SIZE=64 ROUNDS=1 EPOCHS=1 LIMIT=2 BOOT=50 bash scripts/results_federated.sh    # plumbing check (minutes)
#   SIZE=224 ROUNDS=5 EPOCHS=1 bash scripts/results_federated.sh                   # the comparison
#
# Environment: RUNS (default results-federated/), SIZE (px, default 224), ROUNDS (default 5), EPOCHS (local epochs
# per round, default 1), LIMIT (trainer.limit_train_batches, empty: all), BOOT (bootstrap replicates, default
# 1000), SETTINGS (default "split holdout"), MODELS (default "central local fedavg fedprox fedbn fedavg-dp"),
# DP_NOISE (default 1.0), DP_CLIP (default 1.0), PROX_MU (default 0.01), RECIPE, COVIDCXR_SHARED (../shared),
# LOCAL_SITES (the local-only sites to train, default every site with training rows), APPEND=1 (add to RUNS/runs.tsv
# instead of starting it afresh, e.g. to redo one failed run; the table keeps the last row of each setting/model).
set -uo pipefail
cd "$(dirname "$0")/.."
SHARED=${COVIDCXR_SHARED:-../shared}
export COVIDCXR_WEIGHTS_DIR=${COVIDCXR_WEIGHTS_DIR:-$SHARED/weights}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
RUNS=${RUNS:-results-federated}
SIZE=${SIZE:-224}; ROUNDS=${ROUNDS:-5}; EPOCHS=${EPOCHS:-1}; BOOT=${BOOT:-1000}; LIMIT=${LIMIT:-}
SETTINGS=${SETTINGS:-split holdout}
MODELS=" ${MODELS:-central local fedavg fedprox fedbn fedavg-dp} "
DP_NOISE=${DP_NOISE:-1.0}; DP_CLIP=${DP_CLIP:-1.0}; PROX_MU=${PROX_MU:-0.01}
RECIPE=${RECIPE:-configs/transfer-mobilenet_v2.yaml}
CX=".venv/bin/covidcxr"; PY=".venv/bin/python"
SETS=(--set "data.size=$SIZE" --set trainer.accelerator=cpu --set trainer.num_threads=1 --set trainer.progress_bar=false)
[ -n "$LIMIT" ] && SETS+=(--set "trainer.limit_train_batches=$LIMIT" --set "trainer.limit_val_batches=$LIMIT")
DATA=(--source "csv=$SHARED/data/covid-cxr-dev/metadata.csv" --source "nih=$SHARED/data/nih-cxr14-subset"
      --source "hannover=$SHARED/data/hannover-covid")
want() { case "$MODELS" in *" $1 "*) return 0;; esac; return 1; }
mkdir -p "$RUNS"
[ "${APPEND:-0}" = 1 ] || : > "$RUNS/runs.tsv"   # setting, model, run folder, wall seconds, status

run() {  # run SETTING MODEL DIR -- command...: times it, records it, evaluates DIR/best.ckpt on the test split
  local setting=$1 model=$2 dir=$3; shift 4
  local t0=$(date +%s)
  echo "== $setting/$model"
  if "$@" > "$dir.log" 2>&1; then
    local wall=$(( $(date +%s) - t0 ))
    if $CX evaluate --model "$dir/best.ckpt" --data "$RUNS/$setting/manifest.csv" --split test --out "$dir-report" \
        --n-boot "$BOOT" > "$dir.evaluate.log" 2>&1; then
      printf '%s\t%s\t%s\t%s\tok\n' "$setting" "$model" "$dir" "$wall" >> "$RUNS/runs.tsv"
    else
      printf '%s\t%s\t%s\t%s\tevaluate failed: %s\n' "$setting" "$model" "$dir" "$wall" "$(tail -1 "$dir.evaluate.log" | cut -c1-160)" >> "$RUNS/runs.tsv"
    fi
  else
    printf '%s\t%s\t%s\t%s\tfailed: %s\n' "$setting" "$model" "$dir" "$(( $(date +%s) - t0 ))" "$(tail -1 "$dir.log" | cut -c1-160)" >> "$RUNS/runs.tsv"
    echo "   failed: see $dir.log"
  fi
}

for setting in $SETTINGS; do
  case "$setting" in
    split) HOLD=();; holdout) HOLD=(--holdout-source actualmed);;
    *) echo "error: unknown setting $setting (split, holdout)" >&2; exit 2;;
  esac
  S="$RUNS/$setting"; mkdir -p "$S"
  if [ ! -f "$S/manifest.csv" ]; then
    $CX data build "${DATA[@]}" --out "$S" --seed 62 "${HOLD[@]}" > "$S.build.log" 2>&1 \
      || { echo "data build failed: $(tail -1 "$S.build.log")"; exit 1; }
  fi
  M="$S/manifest.csv"
  TOTAL=$(( ROUNDS * EPOCHS ))
  want central && run "$setting" central "$S/central" -- \
    $CX train --config "$RECIPE" --data "$M" --out "$S/central" --overwrite --max-epochs "$TOTAL" "${SETS[@]}"
  if want local; then
    # each site's own train/val rows (absolute paths), trained alone; evaluated on the pooled test split
    for site in ${LOCAL_SITES:-$($PY -c "import pandas as pd,sys; d=pd.read_csv(sys.argv[1]); print(' '.join(sorted(d.loc[d.split=='train','source'].astype(str).unique())))" "$M")}; do
      mkdir -p "$S/local-$site"
      $PY - "$M" "$site" "$S/local-$site/manifest.csv" <<'EOF'
import os, sys
import pandas as pd
m, site, out = sys.argv[1:]
d = pd.read_csv(m)
base = os.path.dirname(os.path.abspath(m))
d["path"] = [p if os.path.isabs(p) else os.path.join(base, p) for p in d["path"]]
d[(d["source"].astype(str) == site) & d["split"].isin(["train", "val"])].to_csv(out, index=False)
EOF
      run "$setting" "local-$site" "$S/local-$site/run" -- \
        $CX train --config "$RECIPE" --data "$S/local-$site/manifest.csv" --out "$S/local-$site/run" --overwrite \
          --max-epochs "$TOTAL" "${SETS[@]}"
    done
  fi
  for strat in fedavg fedprox fedbn; do
    want "$strat" && run "$setting" "$strat" "$S/$strat" -- \
      $CX federated simulate --config "$RECIPE" --data "$M" --site-column source --rounds "$ROUNDS" \
        --local-epochs "$EPOCHS" --strategy "$strat" --proximal-mu "$PROX_MU" --out "$S/$strat" "${SETS[@]}"
  done
  want fedavg-dp && run "$setting" fedavg-dp "$S/fedavg-dp" -- \
    $CX federated simulate --config "$RECIPE" --data "$M" --site-column source --rounds "$ROUNDS" \
      --local-epochs "$EPOCHS" --strategy fedavg --dp-noise "$DP_NOISE" --dp-clip "$DP_CLIP" --out "$S/fedavg-dp" "${SETS[@]}"
done

$PY - "$RUNS" "SIZE=$SIZE ROUNDS=$ROUNDS EPOCHS=$EPOCHS LIMIT=${LIMIT:-none} BOOT=$BOOT RECIPE=$RECIPE" <<'EOF'
import json, sys
from pathlib import Path

runs, knobs = Path(sys.argv[1]), sys.argv[2]

def find(obj, key):
    """The first value under ``key`` anywhere in a nested metrics.json (its layout belongs to covidcxr evaluate)."""
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        for v in obj.values():
            r = find(v, key)
            if r is not None:
                return r
    return None

def fig(f):
    if isinstance(f, dict):
        v, lo, hi = f.get("value"), f.get("ci_low"), f.get("ci_high")
        if v is None:
            return "n/a"
        return f"{v:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "")
    return "n/a" if f is None else (f"{f:.3f}" if isinstance(f, float) else str(f))

last = {}
for line in (runs / "runs.tsv").read_text().splitlines():  # a redone run replaces the earlier row
    last[tuple(line.split("\t")[:2])] = line
rows, out = [], []
for line in last.values():
    setting, model, d, wall, status = line.split("\t")[:5]
    row = {"setting": setting, "model": model, "wall_s": int(wall), "status": status}
    mj = Path(d + "-report") / "metrics.json"
    if status == "ok" and mj.is_file():
        m = json.loads(mj.read_text())
        covid = (find(m, "per_class") or {}).get("COVID-19", {})
        row.update(auc=fig(covid.get("auc")), macro_sens=fig(find(m, "balanced_accuracy")),
                   worst_group_sens=fig(find(m, "worst_group_sensitivity")),
                   non_dominant_spec=fig(find(m, "non_dominant_specificity")))
    h = Path(d) / "history.json"
    if h.is_file():
        fed = json.loads(h.read_text())
        log = fed.get("rounds_log") or []
        if log:
            row["MB_per_round"] = f"{sum(r.get('bytes_sent', 0) + r.get('bytes_received', 0) for r in log) / len(log) / 1e6:.1f}"
            row["s_per_round"] = f"{sum(r.get('wall_s', 0) for r in log) / len(log):.1f}"
        dp = fed.get("dp") or {}
        if "epsilon" in dp:
            row["dp"] = f"eps {dp['epsilon']:.2f} at delta {dp['delta']:g} per site (z={dp['noise_multiplier']}, C={dp['clipping_norm']})"
    rows.append(row)
cols = ["setting", "model", "auc", "macro_sens", "worst_group_sens", "non_dominant_spec", "wall_s", "s_per_round",
        "MB_per_round", "dp", "status"]
out.append(f"Federated comparison ({knobs}); test split of each setting, 95% patient-bootstrap CIs. "
           "Research use only: not a clinical performance claim.\n")
out.append("| " + " | ".join(cols) + " |")
out.append("|" + "---|" * len(cols))
for r in rows:
    out.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
(runs / "federated_table.md").write_text("\n".join(out) + "\n")
(runs / "federated_table.json").write_text(json.dumps(rows, indent=2))
print("\n".join(out))
EOF
