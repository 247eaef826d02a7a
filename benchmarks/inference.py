"""CPU inference throughput: PyTorch eager versus onnxruntime, batch 1 and 16.

For each model (random weights: speed does not depend on their values) the script saves a covidcxr
checkpoint, exports it with ``covidcxr.export.export_onnx`` (which runs the parity check on real
dev-set images), and times the model forward pass on preprocessed input at the model's native size,
through the same ``Predictor`` the CLI and the service use (so softmax/temperature are included).
Eager and onnxruntime are timed in alternating rounds so that both see the same background load;
each figure is the best round (least disturbed), with the median round alongside.

    .venv/bin/python benchmarks/inference.py [--models resnet18 densenet121 covidnet-cxr-small]
        [--batch-sizes 1 16] [--threads 2] [--rounds 5] [--round-seconds 1.0]

Prints a table and writes benchmarks/results/inference.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = ["resnet18", "densenet121", "covidnet-cxr-small"]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _round(fn, batch: torch.Tensor, seconds: float, min_iters: int = 3) -> float:
    """Images per second over one round of at least ``seconds`` and ``min_iters`` calls."""
    n, t0 = 0, time.perf_counter()
    while True:
        fn(batch)
        n += 1
        dt = time.perf_counter() - t0
        if dt >= seconds and n >= min_iters:
            return n * batch.shape[0] / dt


def bench_model(name: str, batch_sizes: list[int], threads: int, rounds: int, seconds: float,
                workdir: Path, opt_level: str) -> list[dict]:
    from covidcxr import models
    from covidcxr.export import export_onnx
    from covidcxr.predict import Predictor
    from covidcxr.preprocess import get_preset

    spec = models.get_spec(name)
    torch.manual_seed(0)
    ckpt = workdir / f"{name}.ckpt"
    models.save(ckpt, models.build(name, num_classes=3), arch=name, classes=["normal", "pneumonia", "COVID-19"],
                preset=get_preset(spec.preset).with_size(spec.input_size))
    onnx_path = workdir / f"{name}.onnx"
    t0 = time.perf_counter()
    report = export_onnx(ckpt, onnx_path, parity_count=8)
    export_s = time.perf_counter() - t0
    eager = Predictor.from_path(ckpt, backend="torch")
    ort_p = Predictor.from_path(onnx_path, backend="onnx", threads=threads)
    if opt_level != "all":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        }[opt_level]
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        ort_p.backend.session = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])

    rows = []
    size, ch = eager.preset.size, eager.preset.channels
    for bs in batch_sizes:
        x = torch.randn(bs, ch, size, size)
        for fn in (eager.probabilities, ort_p.probabilities):  # warm-up (allocators, oneDNN/ORT kernels)
            for _ in range(2):
                fn(x)
        res: dict[str, list[float]] = {"eager": [], "onnxruntime": []}
        for _ in range(rounds):
            res["eager"].append(_round(eager.probabilities, x, seconds))
            res["onnxruntime"].append(_round(ort_p.probabilities, x, seconds))
        row = {
            "model": name, "input": f"{ch}x{size}x{size}", "batch": bs,
            "eager_img_s": max(res["eager"]), "ort_img_s": max(res["onnxruntime"]),
            "eager_img_s_median": statistics.median(res["eager"]),
            "ort_img_s_median": statistics.median(res["onnxruntime"]),
            "rounds": {k: [round(v, 2) for v in vals] for k, vals in res.items()},
            "export_s": round(export_s, 1), "exporter": report.exporter, "parity_max_abs_diff": report.max_abs_diff,
        }
        row["speedup"] = row["ort_img_s"] / row["eager_img_s"]
        row["speedup_median"] = row["ort_img_s_median"] / row["eager_img_s_median"]
        rows.append(row)
        print(f"  {name:20s} batch {bs:3d}: eager {row['eager_img_s']:8.1f} img/s   onnxruntime "
              f"{row['ort_img_s']:8.1f} img/s   x{row['speedup']:.2f} (median rounds x{row['speedup_median']:.2f})",
              flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=None, help=f"default: those of {DEFAULT_MODELS} registered")
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch and ORT intra-op threads")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--round-seconds", type=float, default=1.0)
    ap.add_argument("--ort-opt-level", choices=["disable", "basic", "extended", "all"], default="all")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "inference.json")
    args = ap.parse_args(argv)

    from covidcxr import models

    names = args.models or [m for m in DEFAULT_MODELS if m in models.list_models()]
    missing = [m for m in (args.models or DEFAULT_MODELS) if m not in models.list_models()]
    torch.set_num_threads(args.threads)
    import onnxruntime

    load0 = os.getloadavg()
    print(f"CPU: {_cpu_name()}, {os.cpu_count()} logical cores; threads {args.threads}; load {load0[0]:.2f}; "
          f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}", flush=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            rows += bench_model(name, args.batch_sizes, args.threads, args.rounds, args.round_seconds, Path(tmp),
                                args.ort_opt_level)
    load1 = os.getloadavg()

    print()
    print("| model | input | batch | eager img/s | onnxruntime img/s | speed-up (best round) | speed-up (median) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['input']} | {r['batch']} | {r['eager_img_s']:.1f} | {r['ort_img_s']:.1f} | "
              f"{r['speedup']:.2f}x | {r['speedup_median']:.2f}x |")
    if missing:
        print(f"not registered, skipped: {', '.join(missing)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": "python benchmarks/inference.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu": _cpu_name(), "logical_cores": os.cpu_count(), "threads": args.threads,
        "ort_opt_level": args.ort_opt_level, "loadavg_start": load0, "loadavg_end": load1,
        "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows, "skipped": missing,
    }, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
