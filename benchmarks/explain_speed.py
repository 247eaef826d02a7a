"""CPU seconds per image for each explanation method.

For each model (random weights: the cost does not depend on their values) and method, the
script explains a batch of random images at the model's native input size and reports
seconds per image: the best of ``--rounds`` runs after one warm-up run (best = least
disturbed by other load on a shared machine). Method settings are the CLI defaults:
Grad-CAM; LRP EpsilonPlusFlat with the model's canonizers; occlusion with a 1/8-side patch
and 1/16-side stride; integrated gradients with 32 steps.

    .venv/bin/python benchmarks/explain_speed.py [--models resnet18 densenet121] [--methods gradcam lrp ...]
        [--batch 4] [--threads 1] [--rounds 2] [--size N]

Prints a table and writes benchmarks/results/explain_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "densenet121", "covidnet-cxr-small"])
    ap.add_argument("--methods", nargs="+", default=["gradcam", "lrp", "occlusion", "ig"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--size", type=int, default=None, help="input size (default: each model's native size)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "explain_speed.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO / "src"))
    from covidcxr import models
    from covidcxr.explain import Context, explain
    from covidcxr.preprocess import get_preset

    rows = []
    for name in args.models:
        spec = models.get_spec(name)
        size = args.size or spec.input_size
        torch.manual_seed(0)
        net = models.build(name).eval()
        preset = get_preset(spec.preset, size=size)
        x = torch.randn(args.batch, preset.channels, size, size)
        ctx = Context(arch=name, preset=preset)
        for method in args.methods:
            best = float("inf")
            for _ in range(args.rounds + 1):
                t0 = time.perf_counter()
                explain(net, x, method, target=torch.zeros(args.batch, dtype=torch.long), ctx=ctx)
                best = min(best, time.perf_counter() - t0)
            rows.append({"model": name, "size": size, "method": method, "seconds_per_image": best / args.batch})
            print(f"{name:22s} {size:4d}px  {method:10s} {best / args.batch:8.3f} s/image", flush=True)
    result = {
        "command": "python benchmarks/explain_speed.py " + " ".join(sys.argv[1:]),
        "threads": args.threads, "batch": args.batch, "rounds": args.rounds,
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(), "torch": torch.__version__, "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
