#!/usr/bin/env python
"""How close a re-run of scripts/train_reference.sh comes to the shipped reference models (issue 19 §1).

    RERUN=1 bash scripts/train_reference.sh          # trains into reference-rerun/, then runs this script
    python scripts/reference_rerun.py RUNS --doc docs/reproducibility.md
    python scripts/reference_rerun.py --shipped-settings   # shell assignments: the shipped run's settings

Builds the re-run's card figures with scripts/model_card.py's own code (the same reading of the same outputs),
then sets every figure that has a 95 % CI beside the shipped card's: both values, the difference, and whether
each value lies inside the other's CI. Also checks that the re-run drew the same split (the reference manifest's
sha256). Writes RUNS/rerun.json and RUNS/rerun.md and, with --doc, the rerun:begin/end block of that file.
Nothing is packed: the shipped models stay as they are. Research use only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docblock import replace_block  # noqa: E402
from model_card import classifier_card, severity_card, sha256  # noqa: E402

BEGIN, END = "<!-- rerun:begin -->", "<!-- rerun:end -->"


def interval(d: dict[str, Any]) -> tuple[float, float] | None:
    """A figure's 95 % CI, in either of the two shapes the cards store."""
    if "ci_low" in d and "ci_high" in d and d["ci_low"] is not None:
        return float(d["ci_low"]), float(d["ci_high"])
    ci = d.get("ci95")
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and None not in ci:
        return float(ci[0]), float(ci[1])
    return None


def figures_with_ci(node: Any, path: str = "") -> Iterator[tuple[str, float, tuple[float, float]]]:
    """(dotted name, value, CI) for every figure with a value and a CI, in the card's order."""
    if isinstance(node, dict):
        ci = interval(node)
        if ci is not None and isinstance(node.get("value"), (int, float)):
            yield path, float(node["value"]), ci
            return
        for k, v in node.items():
            yield from figures_with_ci(v, f"{path}.{k}" if path else str(k))


def compare(shipped: dict[str, Any], rerun: dict[str, Any]) -> list[dict[str, Any]]:
    new = {name: (v, ci) for name, v, ci in figures_with_ci(rerun)}
    rows = []
    for name, v0, ci0 in figures_with_ci(shipped):
        if name not in new:
            continue
        v1, ci1 = new[name]
        rows.append({"figure": name, "shipped": v0, "shipped_ci95": ci0, "rerun": v1, "rerun_ci95": ci1,
                     "difference": v1 - v0, "rerun_in_shipped_ci": ci0[0] <= v1 <= ci0[1],
                     "shipped_in_rerun_ci": ci1[0] <= v0 <= ci1[1]})
    return rows


def settings_of(t: dict[str, Any]) -> dict[str, Any]:
    """A run's settings as train_reference.sh names them, from the checkpoint's ``training`` record."""
    cfg = t.get("config") or {}
    trainer = cfg.get("trainer") or {}
    out = {"RECIPE": t.get("recipe_file"), "SEED": t.get("seed"), "EPOCHS": trainer.get("max_epochs"),
           "SIZE": (cfg.get("data") or {}).get("size"), "THREADS": trainer.get("num_threads")}
    if trainer.get("max_steps") not in (None, -1):
        out["MAX_STEPS"] = trainer["max_steps"]
    elif "stopped" in str(t.get("stopped", "")) and t.get("global_step"):
        out["MAX_STEPS"] = t["global_step"]  # stopped by hand: the step count it reached
    qat = t.get("qat")
    out["QAT"] = 1 if qat else 0  # a model trained before quantization-aware fine-tuning existed had none
    if qat:
        out.update({"QAT_EPOCHS": qat.get("epochs"), "QAT_LR": qat.get("lr"), "QAT_KEEP_FP32": qat.get("fp32_convs"),
                    "QAT_BOUNDARY_WEIGHT": qat.get("boundary_weight", 0.0)})
    return {k: v for k, v in out.items() if v is not None}


# where a run's files went, and how it was stopped (compared through MAX_STEPS above), not what it trained
NOT_COMPARED = {"data.cache_dir", "trainer.progress_bar", "trainer.max_steps"}


def flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_differences(shipped: dict[str, Any], rerun: dict[str, Any]) -> dict[str, Any]:
    """Every recipe setting (the full resolved config both checkpoints store) that the re-run changed: another
    recipe, batch limits, augmentation... so that "the same" is never said of a run that was not."""
    a, b = flat(shipped.get("config") or {}), flat(rerun.get("config") or {})
    out = {k: b.get(k) for k in sorted(set(a) | set(b)) if k not in NOT_COMPARED and a.get(k) != b.get(k)}
    if shipped.get("recipe") != rerun.get("recipe"):
        out["recipe"] = rerun.get("recipe")
    return out


def shipped_settings() -> dict[str, Any]:
    """The settings the shipped classifier was trained with, as its checkpoint records them."""
    from covidcxr.reference_models import CLASSIFIER, card, metadata

    out = {**settings_of(metadata(CLASSIFIER).get("training") or {}), "VERSION": card(CLASSIFIER).get("version")}
    return {k: v for k, v in out.items() if v is not None}


def render(rows: list[dict[str, Any]], runs: Path, same_split: bool, manifests: tuple[str, str],
           settings: dict[str, Any], differ: dict[str, Any], minutes: str) -> str:
    inside = sum(r["rerun_in_shipped_ci"] for r in rows)
    lines = [
        f"Generated by `scripts/reference_rerun.py {runs}` from `RERUN=1 bash scripts/train_reference.sh` "
        f"({dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; {minutes} min wall time on this project's "
        "2-core CPU). Research use only: not a clinical performance claim.",
        "",
        "Settings of the shipped run, read from its checkpoint: " + ", ".join(f"{k} {v}" for k, v in settings.items())
        + ". Re-run: " + ("the same." if not differ else "**differs**: " + ", ".join(
            f"{k} {v}" for k, v in differ.items()) + " (a plumbing run, not a reproducibility check)."),
        "",
        f"- Split: the reference manifest's sha256 is {'the same' if same_split else '**different**'} "
        f"(shipped {manifests[0][:12]}, re-run {manifests[1][:12]}).",
        f"- **{inside} of {len(rows)} figures of the re-run lie inside the shipped model's 95 % CI**; "
        f"{sum(r['shipped_in_rerun_ci'] for r in rows)} of {len(rows)} shipped figures lie inside the re-run's.",
        "",
        "| figure | shipped [95 % CI] | re-run [95 % CI] | re-run − shipped | re-run inside shipped CI |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        a, b = r["shipped_ci95"], r["rerun_ci95"]
        lines.append(f"| {r['figure']} | {r['shipped']:.3f} [{a[0]:.3f}, {a[1]:.3f}] | {r['rerun']:.3f} "
                     f"[{b[0]:.3f}, {b[1]:.3f}] | {r['difference']:+.3f} | {'yes' if r['rerun_in_shipped_ci'] else '**no**'} |")
    lines += ["", "CIs: patient bootstrap (the run's BOOT replicates, 1000 by default, as in the cards). The weights differ between runs: CPU "
              "thread scheduling is not bit-reproducible, so the figures are expected within the CIs, not equal."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", type=Path, nargs="?", help="the RUNS folder of RERUN=1 bash scripts/train_reference.sh")
    ap.add_argument("--doc", type=Path, help="markdown file whose rerun:begin/end block is replaced")
    ap.add_argument("--shipped-settings", action="store_true",
                    help="print the shipped run's settings as shell assignments (RECIPE=..., SEED=..., ...)")
    a = ap.parse_args()
    if a.shipped_settings:
        try:
            settings = shipped_settings()
        except (OSError, ValueError) as err:  # the shipped model or its metadata missing or unreadable
            sys.exit(f"reference_rerun: cannot read the shipped model's settings: {err}")
        for k, v in settings.items():
            print(f"{k}={v}")
        return 0
    if a.runs is None:
        ap.error("RUNS is required (unless --shipped-settings)")
    from covidcxr.reference_models import CLASSIFIER, SEVERITY, card, metadata

    settings = shipped_settings()
    shipped = {CLASSIFIER: card(CLASSIFIER), SEVERITY: card(SEVERITY)}
    rerun = {CLASSIFIER: classifier_card(a.runs, "rerun", settings.get("RECIPE", "?"), int(settings.get("SEED", 0)))}
    if (a.runs / "severity" / "best.ckpt").is_file():
        rerun[SEVERITY] = severity_card(a.runs, "rerun", int(settings.get("SEED", 0)))
    rows = []
    for name, c in rerun.items():
        for r in compare(shipped[name].get("figures") or {}, c.get("figures") or {}):
            rows.append({**r, "figure": f"{name}: {r['figure']}"})
    if not rows:
        sys.exit(f"reference_rerun: no figure with a CI in common between {a.runs} and the shipped cards")
    ship_sha = (metadata(CLASSIFIER).get("training") or {}).get("reference_manifest_sha256") or "?"
    new_sha = sha256(a.runs / "reference-manifest.csv")
    secs = a.runs / "seconds"
    minutes = (f"{sum(int(x) for x in secs.read_text().split() if x.isdigit()) / 60:.0f}" if secs.is_file() else "?")
    from covidcxr.models.checkpoint import read_bundle

    ran = read_bundle(a.runs / "run" / "best.ckpt").get("training") or {}
    used = settings_of(ran)
    differ = {k: v for k, v in used.items() if str(settings.get(k)) != str(v)}
    differ.update(config_differences(metadata(CLASSIFIER).get("training") or {}, ran))
    text = render(rows, a.runs, ship_sha == new_sha, (ship_sha, new_sha), settings, differ, minutes)
    (a.runs / "rerun.json").write_text(json.dumps({"same_split": ship_sha == new_sha, "settings": settings,
                                                   "settings_that_differ": differ,
                                                   "rows": rows}, indent=1))
    (a.runs / "rerun.md").write_text(text + "\n")
    print(text)
    if a.doc:
        err = replace_block(a.doc, BEGIN, END, text)
        if err:
            sys.exit(err)
        print(f"wrote the rerun block of {a.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
