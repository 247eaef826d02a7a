"""Tables for docs/federated.md from the outputs of scripts/results_federated.sh (issue 20 §4).

    python scripts/results_federated_tables.py RUNS [--doc docs/federated.md]

Reads RUNS/run.json, RUNS/status.tsv, RUNS/runs.tsv, RUNS/timings.tsv, RUNS/{split,holdout}/manifest.csv,
<id>-report/metrics.json (covidcxr evaluate), <id>/history.json (covidcxr federated: rounds, bytes, DP) and
<id>-vs-central-paired.json (python -m covidcxr.evaluate.paired), and writes RUNS/federated_tables.md. With
--doc, the text between ``<!-- federated:begin -->`` and ``<!-- federated:end -->`` of that file is replaced.
Every expected row is shown: a model without a result says "not run" or "failed" with the reason. The
targets are stated as met, missed or undecided, from the figures in the tables.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/, also when loaded by file path
from docblock import replace_block  # noqa: E402

BEGIN, END = "<!-- federated:begin -->", "<!-- federated:end -->"  # the default block (--block federated)

SETTINGS = {"split": "Patient-level split (seed 62): pooled test split of all five sources",
            "holdout": "Source hold-out: trained without actualmed (four sites), tested on actualmed"}
FEDERATED = ["fedavg", "fedprox", "fedbn", "fedavg-robust", "fedavg-dp"]
LABELS = {"central": "centralised (pooled)", "central-robust": "centralised, group-robust recipe",
          "fedavg": "FedAvg", "fedprox": "FedProx", "fedbn": "FedBN", "fedavg-robust": "FedAvg, group-robust recipe",
          "fedavg-dp": "FedAvg + DP"}
MARGIN = 0.02  # issue 20: FedAvg or FedBN within 0.02 COVID-19 AUC of centralised


def load(p: Path) -> Any:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_tsv(p: Path, cols: list[str]) -> pd.DataFrame:
    if not p.is_file() or p.stat().st_size == 0:
        return pd.DataFrame(columns=cols)
    return pd.read_csv(p, sep="\t", names=cols, dtype=str, keep_default_na=False, quoting=3)


def fig(d: dict | None, digits: int = 3) -> str:
    """``0.912 [0.850, 0.960]`` from {"value", "ci_low", "ci_high"}."""
    if not d or d.get("value") is None or (isinstance(d["value"], float) and math.isnan(d["value"])):
        return "n/a"
    lo, hi = d.get("ci_low"), d.get("ci_high")
    ok = lo is not None and hi is not None and not (math.isnan(lo) or math.isnan(hi))
    return f"{d['value']:.{digits}f}" + (f" [{lo:.{digits}f}, {hi:.{digits}f}]" if ok else "")


def diff(row: dict | None, digits: int = 3) -> str:
    if not row or row.get("diff") is None or (isinstance(row["diff"], float) and math.isnan(row["diff"])):
        return "n/a"
    lo, hi = row.get("ci_low"), row.get("ci_high")
    if lo is None or hi is None:
        return f"{row['diff']:+.{digits}f}"
    star = " *" if lo > 0 or hi < 0 else ""
    return f"{row['diff']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]{star}"


def label(mid: str) -> str:
    return LABELS.get(mid, f"local only: {mid[len('local-'):]}" if mid.startswith("local-") else mid)


class Runs:
    """The outputs of one results_federated.sh run folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.meta = load(root / "run.json") or {}
        self.status_tsv = read_tsv(root / "status.tsv", ["setting", "id", "status"])
        self.runs_tsv = read_tsv(root / "runs.tsv", ["setting", "id", "dir", "wall_s"])

    def status(self, setting: str, mid: str) -> str:
        hit = self.status_tsv[(self.status_tsv["setting"] == setting) & (self.status_tsv["id"] == mid)]
        return hit["status"].iloc[-1] if len(hit) else "not run (the run stopped before it)"

    def wall(self, setting: str, mid: str) -> float | None:
        hit = self.runs_tsv[(self.runs_tsv["setting"] == setting) & (self.runs_tsv["id"] == mid)]
        return float(hit["wall_s"].iloc[-1]) if len(hit) else None

    def metrics(self, setting: str, mid: str) -> dict | None:
        return load(self.root / setting / f"{mid}-report" / "metrics.json") if self.status(setting, mid) == "ok" else None

    def history(self, setting: str, mid: str) -> dict | None:
        return load(self.root / setting / mid / "history.json")

    def paired(self, setting: str, mid: str) -> dict | None:
        return load(self.root / setting / f"{mid}-vs-central-paired.json")

    def manifest(self, setting: str) -> pd.DataFrame | None:
        p = self.root / setting / "manifest.csv"
        return pd.read_csv(p, dtype=str, keep_default_na=False) if p.is_file() else None

    def sites(self, setting: str) -> list[str]:
        """The local-only rows expected: sources with training rows (or whatever status.tsv lists)."""
        df = self.manifest(setting)
        found = set(self.status_tsv.loc[(self.status_tsv["setting"] == setting)
                                        & self.status_tsv["id"].str.startswith("local-"), "id"].str[len("local-"):])
        if df is not None:
            found |= set(df.loc[df["split"] == "train", "source"])
        return sorted(found)

    def ids(self, setting: str) -> list[str]:
        extra = ["central-robust"] if (self.status_tsv["id"] == "central-robust").any() else []
        return ["central", *extra, *[f"local-{s}" for s in self.sites(setting)], *FEDERATED]


def auc_of(m: dict | None) -> float | None:
    v = ((((m or {}).get("metrics") or {}).get("per_class") or {}).get("COVID-19") or {}).get("auc") or {}
    x = v.get("value")
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def data_table(r: Runs, setting: str) -> list[str]:
    df = r.manifest(setting)
    if df is None:
        return [f"*manifest missing ({r.root / setting / 'manifest.csv'}): not run.*", ""]
    df = df[df["split"].isin(["train", "val", "test"])]
    t = df.groupby(["source", "split"]).size().unstack("split", fill_value=0).reindex(columns=["train", "val", "test"],
                                                                                      fill_value=0)
    lab = df[df["split"] == "train"].groupby("source")["label"].apply(
        lambda s: ", ".join(f"{k} {v}" for k, v in s.value_counts().sort_index().items()))
    lines = ["| site (source) | train | val | test | train classes |", "|---|---|---|---|---|"]
    for src, row in t.iterrows():
        lines.append(f"| {src} | {row['train']} | {row['val']} | {row['test']} | {lab.get(src, '')} |")
    tot = t.sum()
    lines.append(f"| **all** | {tot['train']} | {tot['val']} | {tot['test']} | |")
    return lines + [""]


def results_table(r: Runs, setting: str) -> list[str]:
    head = ["model", "COVID-19 AUC (vs rest)", "macro sensitivity", "worst-group sensitivity (cell)",
            "non-dominant-source specificity", "train wall time", "per round: wall / MB out / MB back"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for mid in r.ids(setting):
        st = r.status(setting, mid)
        m = r.metrics(setting, mid)
        if m is None:
            why = st if st != "ok" else "no report"
            lines.append(f"| {label(mid)} | {why} |" + " |" * (len(head) - 2))
            continue
        mm, g = m["metrics"], m.get("groups") or {}
        wg = g.get("worst_group_sensitivity") or {}
        nd = g.get("non_dominant_specificity") or {}
        cell = f" ({wg['cell']}, n={wg['n_images']})" if wg.get("cell") else ""
        ndn = f" (n={nd['n_images']})" if nd.get("value") is not None and nd.get("n_images") is not None else ""
        w = r.wall(setting, mid)
        per_round = ""
        h = r.history(setting, mid) if mid in FEDERATED else None
        log = (h or {}).get("rounds_log") or []
        if log:
            n = len(log)
            per_round = (f"{sum(x.get('wall_s', 0) for x in log) / n:.0f} s / "
                         f"{sum(x.get('bytes_sent', 0) for x in log) / n / 1e6:.1f} / "
                         f"{sum(x.get('bytes_received', 0) for x in log) / n / 1e6:.1f}")
        lines.append(f"| {label(mid)} | {fig(mm['per_class'].get('COVID-19', {}).get('auc'))} | "
                     f"{fig(mm.get('balanced_accuracy'))} | {fig(wg)}{cell} | {fig(nd)}{ndn} | "
                     f"{f'{w / 60:.1f} min' if w is not None else ''} | {per_round} |")
    return lines + [""]


def paired_table(r: Runs, setting: str) -> list[str]:
    keys = [("auc", "Δ COVID-19 AUC"), ("macro_sensitivity", "Δ macro sensitivity"),
            ("worst_group_sensitivity", "Δ worst-group sensitivity"),
            ("non_dominant_specificity", "Δ non-dominant-source specificity")]
    rows, n_boot = [], "?"
    for mid in FEDERATED:
        p = r.paired(setting, mid)
        if p is None or r.status(setting, mid) != "ok":
            continue
        n_boot = p.get("bootstrap", {}).get("n_boot", n_boot)
        rows.append(f"| {label(mid)} − centralised | " + " | ".join(diff(p["metrics"].get(k)) for k, _ in keys) + " |")
    if not rows:
        return ["*No paired difference to centralised: it needs both reports.*", ""]
    return (["| B − A | " + " | ".join(k[1] for k in keys) + " |", "|" + "---|" * (len(keys) + 1)] + rows
            + ["", f"Paired patient bootstrap on the same test images ({n_boot} replicates, "
               "`python -m covidcxr.evaluate.paired`); * = 95 % CI excludes 0.", ""])


def privacy(r: Runs) -> list[str]:
    out = []
    for setting in SETTINGS:
        h = r.history(setting, "fedavg-dp")
        dp = (h or {}).get("dp") or {}
        if r.status(setting, "fedavg-dp") != "ok" or "epsilon" not in dp:
            continue
        auc, base = auc_of(r.metrics(setting, "fedavg-dp")), auc_of(r.metrics(setting, "fedavg"))
        cost = (f"; its COVID-19 AUC {auc:.3f} against FedAvg's {base:.3f} without DP"
                if auc is not None and base is not None else "")
        out.append(f"- {setting}: **epsilon {dp['epsilon']:.2f} at delta {dp['delta']:g}**, client-level (one site), "
                   f"over {dp.get('releases', '?')} round(s), noise multiplier z = {dp.get('noise_multiplier')}, "
                   f"clipping norm C = {dp.get('clipping_norm')} ({dp.get('accountant', 'RDP')}, no sampling "
                   f"amplification){cost}.")
    return out or ["- no DP run finished."]


def targets(r: Runs) -> list[str]:
    s = "split"
    out = []
    c = auc_of(r.metrics(s, "central"))
    cand = {mid: auc_of(r.metrics(s, mid)) for mid in ("fedavg", "fedbn")}
    got = {k: v for k, v in cand.items() if v is not None}
    if c is None or not got:
        missing = "centralised" if c is None else " and ".join(label(k) for k in cand)
        out.append(f"1. **FedAvg or FedBN within {MARGIN} COVID-19 AUC of centralised (patient split): undecided** "
                   f"— no result for {missing}.")
    else:
        parts = []
        for mid, v in got.items():
            p = (r.paired(s, mid) or {}).get("metrics", {}).get("auc")
            parts.append(f"{label(mid)} {v:.3f} ({v - c:+.3f}" + (f", paired CI {diff(p).split(' ', 1)[1]}" if p and
                                                                   p.get("ci_low") is not None else "") + ")")
        met = any(v >= c - MARGIN for v in got.values())
        out.append(f"1. **FedAvg or FedBN within {MARGIN} COVID-19 AUC of centralised (patient split): "
                   f"{'met' if met else 'missed'}** (point estimates) — centralised {c:.3f}; " + "; ".join(parts) + ".")
    for n, setting in ((2, "split"), (None, "holdout")):
        fed = {mid: auc_of(r.metrics(setting, mid)) for mid in FEDERATED if mid != "fedavg-dp"
               and r.status(setting, mid) == "ok"}
        loc = {mid: auc_of(r.metrics(setting, mid)) for mid in r.ids(setting) if mid.startswith("local-")}
        head = (f"{n}. **Every federated model better than every local-only model on the pooled test split"
                if n else "- Beyond the target, the same comparison on the actualmed hold-out")
        fed_ok = {k: v for k, v in fed.items() if v is not None}
        loc_ok = {k: v for k, v in loc.items() if v is not None}
        if not fed_ok or not loc_ok or len(loc_ok) < len(loc):
            missing = [label(k) for k, v in loc.items() if v is None]
            out.append(f"{head} (COVID-19 AUC): undecided" + ("**" if n else "") + " — "
                       + (f"no result for {', '.join(missing)}" if missing else "no federated or local-only result")
                       + ".")
            continue
        worst_f = min(fed_ok, key=fed_ok.get)
        best_l = max(loc_ok, key=loc_ok.get)
        met = fed_ok[worst_f] > loc_ok[best_l]
        beaten = [f"{label(f)} (not above {', '.join(l[len('local-'):] for l in loc_ok if loc_ok[l] >= fed_ok[f])})"
                  for f in fed_ok if fed_ok[f] <= loc_ok[best_l]]
        out.append(f"{head} (COVID-19 AUC): {'met' if met else 'missed'}" + ("**" if n else "")
                   + f" (point estimates) — lowest federated: {label(worst_f)} {fed_ok[worst_f]:.3f}; highest local-only: "
                   f"{label(best_l)} {loc_ok[best_l]:.3f}"
                   + (f"; short of it: {'; '.join(beaten)}" if beaten else "") + ".")
    dp = auc_of(r.metrics(s, "fedavg-dp"))
    if dp is not None:
        out.append(f"- The DP run (FedAvg + DP, COVID-19 AUC {dp:.3f}) is kept out of target 2: its noise is a "
                   "privacy choice, reported above with its epsilon.")
    return out + ["", "Point estimates decide the targets, as the issue states them; the CIs above and the paired "
                  "differences say how much of each gap is noise."]


def timings(r: Runs) -> list[str]:
    t = read_tsv(r.root / "timings.tsv", ["step", "seconds"])
    if t.empty:
        return ["*no timings recorded.*", ""]
    t["seconds"] = pd.to_numeric(t["seconds"], errors="coerce")
    return ["| step | wall time |", "|---|---|"] + [f"| {x.step} | {x.seconds / 60:.1f} min |" for x in t.itertuples()] + [""]


def build(root: Path) -> str:
    r = Runs(root)
    m = r.meta
    knobs = (f"{m.get('size', '?')} px, {m.get('rounds', '?')} round(s) x {m.get('local_epochs', '?')} local epoch(s) = "
             f"{m.get('centralised_epochs', '?')} centralised / local-only epochs, batches per epoch: {m.get('limit', '?')}, "
             f"recipe `{m.get('recipe', '?')}` (group-robust: `{m.get('robust_recipe', '?')}`), FedProx mu "
             f"{m.get('proximal_mu', '?')}, DP z = {m.get('dp_noise', '?')}, C = {m.get('dp_clip', '?')}, "
             f"{m.get('boot', '?')} bootstrap replicates, {m.get('jobs', '?')} centralised/local trainings side by side")
    calls = int(m.get("invocations") or 1)
    over = f" over {calls} invocations (CONTINUE=1; pauses between them not counted)" if calls > 1 else ""
    smoke = "; SMOKE: plumbing only, the figures mean nothing" if str(m.get("smoke")) == "1" else ""
    parts = [f"Generated by `scripts/results_federated_tables.py {root}` from the run of "
             f"`bash scripts/results_federated.sh` ({m.get('started', '?')} – {m.get('finished', 'unfinished')} UTC, "
             f"{m.get('minutes', '?')} min wall time{over}{smoke}).",
             "", f"Settings: {knobs}. Research use only: not a clinical performance claim.", "",
             "Every model is evaluated by `covidcxr evaluate` on the setting's pooled test split, at a COVID-19 "
             "threshold chosen on the setting's pooled val split for sensitivity 0.95 (`--set-threshold`: the same "
             "rule for every model; for a federated model it needs only the sites' val score counts). 95 % CIs: "
             "patient bootstrap. Worst-group sensitivity: lowest sensitivity over (source, class) cells of ≥ 5 test "
             "images. Non-dominant-source specificity: normal and pneumonia test films from a source other than the "
             "one supplying most pooled training films of that class, not called COVID-19. Per round (federated): "
             "mean wall time of a round, and the weights the coordinator sent to / received from all sites together.",
             ""]
    for setting, title in SETTINGS.items():
        if setting not in str(m.get("settings", "split holdout")).split():
            parts += [f"#### {title}", "", "*not run (left out of SETTINGS).*", ""]
            continue
        parts += [f"#### {title}", "", "Sites:", ""] + data_table(r, setting)
        parts += results_table(r, setting)
        parts += [f"Federated minus centralised ({setting}):", ""] + paired_table(r, setting)
    parts += ["#### Privacy cost of the DP run", ""] + privacy(r) + [""]
    parts += ["#### Targets (issue 20)", ""] + targets(r) + [""]
    parts += ["#### Wall time", ""] + timings(r)
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, help="the RUNS folder of scripts/results_federated.sh")
    ap.add_argument("--doc", type=Path, help="markdown file whose federated:begin/end block is replaced")
    ap.add_argument("--block", default="federated",
                    help="the block's name: NAME:begin / NAME:end markers (default federated; a second run, e.g. "
                         "more rounds at a smaller size, gets its own block beside the first)")
    a = ap.parse_args(argv)
    if not (a.runs / "status.tsv").is_file():
        print(f"error: {a.runs}: no status.tsv (not a results_federated.sh run folder)", file=sys.stderr)
        return 2
    text = build(a.runs)
    (a.runs / "federated_tables.md").write_text(text + "\n", encoding="utf-8")
    if a.doc:
        err = replace_block(a.doc, f"<!-- {a.block}:begin -->", f"<!-- {a.block}:end -->", text)
        if err:
            print(err, file=sys.stderr)
            return 2
    print(f"tables: {a.runs / 'federated_tables.md'}" + (f"; updated {a.doc}" if a.doc else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
