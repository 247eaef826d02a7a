"""``covidcxr compare``: several checkpoints on one split, one table in the style of COVID-Net's.

Columns: parameters, MACs, CPU latency per image, accuracy, per-class sensitivity and PPV, and the
COVID-19 AUC, each metric with its patient-bootstrap 95% CI. Written as compare.md, compare.csv
and compare.json.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)


def count_macs(model: nn.Module, channels: int, size: int) -> int:
    """Multiply-accumulates of one forward pass on a 1 x C x size x size input (FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, channels, size, size)
    was_training = model.training
    model.eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        model(x)
    model.train(was_training)
    return int(fc.get_total_flops() // 2)


def cpu_latency_ms(model: nn.Module, channels: int, size: int, repeats: int = 5, warmup: int = 1) -> dict[str, Any]:
    """Median wall time of a batch-1 forward pass on the CPU, in milliseconds."""
    x = torch.rand(1, channels, size, size)
    model = model.to("cpu").eval()
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - t0) * 1000.0)
    return {"median_ms": statistics.median(times), "repeats": repeats, "threads": torch.get_num_threads()}


def _fmt(m: dict | None, d: int = 3) -> str:
    if not m or m.get("value") is None:
        return "n/a"
    if m.get("ci_low") is None:
        return f"{m['value']:.{d}f}"
    return f"{m['value']:.{d}f} [{m['ci_low']:.{d}f}, {m['ci_high']:.{d}f}]"


def compare(
    checkpoints: Sequence[str | Path],
    manifest: str | Path,
    split: str = "test",
    out: str | Path = "compare",
    *,
    n_boot: int = 1000,
    seed: int = 0,
    latency_repeats: int = 5,
    batch_size: int = 16,
    names: Sequence[str] | None = None,
    positive: str = "COVID-19",
) -> list[dict[str, Any]]:
    """Evaluate each checkpoint on ``split`` and write the comparison table; returns its rows."""
    from covidcxr.data import read_manifest
    from covidcxr.decision import DecisionRule
    from covidcxr.evaluate.core import label_indices, select_split, sha256_file
    from covidcxr.evaluate.inference import predict_frame
    from covidcxr.evaluate.metrics import compute_metrics
    from covidcxr.predict import Predictor

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    df = read_manifest(manifest)
    frame = select_split(df, split, manifest)
    rows: list[dict[str, Any]] = []
    class_sets = []
    for i, ck in enumerate(checkpoints):
        predictor = Predictor.from_path(ck)
        classes = list(predictor.classes)
        class_sets.append(classes)
        label_indices(frame, classes, manifest)
        pr = predict_frame(predictor, frame, batch_size=batch_size, progress=True)
        y = label_indices(pr.frame, classes)
        pos = positive if positive in classes else None
        rule = DecisionRule.from_predictor(predictor)  # the same rule evaluate, predict and serve use
        m = compute_metrics(y, pr.probs, pr.frame["patient_id"].astype(str), classes, positive=pos,
                            threshold=rule.threshold if rule.uses_threshold(classes) else None,
                            n_boot=n_boot, seed=seed, thresholds=())
        p = predictor.preset
        net = predictor.torch_model
        name = names[i] if names and i < len(names) else Path(ck).parent.name + "/" + Path(ck).name
        rows.append({
            "name": name,
            "checkpoint": str(ck),
            "arch": predictor.arch,
            "preset": p.name,
            "input_size": p.size,
            "params": int(sum(t.numel() for t in net.parameters())),
            "macs": count_macs(net, p.channels, p.size),
            "latency": cpu_latency_ms(net, p.channels, p.size, repeats=latency_repeats),
            "n_images": m["n_images"],
            "n_patients": m["n_patients"],
            "skipped": len(pr.failures),
            "accuracy": m["accuracy"],
            "sensitivity": {c: m["per_class"][c]["sensitivity"] for c in classes},
            "ppv": {c: m["per_class"][c]["ppv"] for c in classes},
            "auc": m["per_class"][pos]["auc"] if pos else None,
            "positive": pos,
            "classes": classes,
            "decision_rule": rule.to_dict(classes, split),
            "confusion_matrix": m["confusion_matrix"],
        })
    meta = {"manifest": str(manifest), "sha256": sha256_file(manifest), "split": split, "n_boot": n_boot,
            "bootstrap_unit": "patient"}
    _write(rows, meta, out)
    return rows


def _write(rows: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> None:
    import pandas as pd

    from covidcxr.evaluate.core import _jsonable

    classes: list[str] = []
    for r in rows:
        classes += [c for c in r["classes"] if c not in classes]
    flat, md = [], []
    head = ["model", "arch", "input", "params (M)", "MACs (G)", "CPU ms/img", "accuracy"]
    head += [f"sens. {c}" for c in classes] + [f"PPV {c}" for c in classes] + ["AUC COVID-19", "decision rule"]
    for r in rows:
        d = {"model": r["name"], "arch": r["arch"], "input_size": r["input_size"], "params": r["params"],
             "macs": r["macs"], "cpu_latency_ms": round(r["latency"]["median_ms"], 2),
             "threads": r["latency"]["threads"], "n_images": r["n_images"], "n_patients": r["n_patients"]}
        cells = [r["name"], r["arch"], str(r["input_size"]), f"{r['params'] / 1e6:.2f}", f"{r['macs'] / 1e9:.2f}",
                 f"{r['latency']['median_ms']:.1f}", _fmt(r["accuracy"])]
        for key in ("accuracy",):
            for part in ("value", "ci_low", "ci_high"):
                d[f"{key}_{part}"] = r[key][part]
        for kind in ("sensitivity", "ppv"):
            for c in classes:
                m = r[kind].get(c)
                cells.append(_fmt(m))
                for part in ("value", "ci_low", "ci_high"):
                    d[f"{kind}_{c}_{part}"] = m[part] if m else None
        cells.append(_fmt(r["auc"]))
        for part in ("value", "ci_low", "ci_high"):
            d[f"auc_covid_{part}"] = r["auc"][part] if r["auc"] else None
        rule = r["decision_rule"]
        d["decision_rule"], d["threshold"], d["threshold_chosen_on"] = rule["rule"], rule["threshold"], rule["chosen_on"]
        cells.append("argmax" if rule["rule"] == "argmax" else
                     f"p({rule['positive']}) >= {rule['threshold']:.4f} ({rule['chosen_on'] or 'origin unrecorded'}"
                     + ("; the evaluated split: optimistic" if rule["chosen_on"] == meta["split"] else "") + ")")
        flat.append(d)
        md.append(cells)
    pd.DataFrame(flat).to_csv(out / "compare.csv", index=False)
    n = rows[0] if rows else {"n_images": 0, "n_patients": 0}
    lines = [
        "# Model comparison",
        "",
        "> Research use only; not a clinical performance claim.",
        "",
        f"Data: `{meta['manifest']}` (sha256 {meta['sha256'][:12]}), split **{meta['split']}**: "
        f"{n['n_images']} images, {n['n_patients']} patients. Values are point estimates with 95% CIs from "
        f"{meta['n_boot']} bootstrap replicates over patients. MACs: one forward pass at the model's input size. "
        f"CPU ms/img: median batch-1 latency with {rows[0]['latency']['threads'] if rows else 1} thread(s). "
        "Decision rule: each checkpoint's stored operating point (COVID-19 if its probability reaches the "
        "threshold, else the most probable other class; the split it was chosen on in brackets), or argmax "
        "when none is stored -- the rule evaluate, explain, predict and serve use.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    lines += ["| " + " | ".join(c) + " |" for c in md]
    (out / "compare.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "compare.json").write_text(json.dumps(_jsonable({"meta": meta, "rows": rows}), indent=2),
                                      encoding="utf-8")
