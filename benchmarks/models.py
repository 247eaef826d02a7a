"""CPU training cost of every registry model at its native input size.

For each model (random weights: speed does not depend on their values) the script times one
training step (forward, cross-entropy, backward, SGD step) on a random batch at the model's
native size, and reports images per second: the best of ``--rounds`` steps after one warm-up
step (best = least disturbed by other load on the machine). Parameters and MACs come from
``covidcxr.models.summary`` (counted with torch.utils.flop_counter).

    .venv/bin/python benchmarks/models.py [--models resnet18 ...] [--batch 4] [--threads 1] [--rounds 3]

Prints a table and writes benchmarks/results/models.json.
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


def train_rate(name: str, batch: int, rounds: int) -> float:
    from covidcxr import models

    spec = models.get_spec(name)
    torch.manual_seed(0)
    net = models.build(name).train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, spec.input_size, spec.input_size)
    y = torch.randint(0, 3, (batch,))
    best = float("inf")
    for i in range(rounds + 1):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        dt = time.perf_counter() - t0
        if i:  # the first step warms up allocators and kernels
            best = min(best, dt)
    return batch / best


def main(argv: list[str] | None = None) -> int:
    from covidcxr import models
    from covidcxr.models.summary import model_table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=models.list_models())
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "models.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    table = {r["name"]: r for r in model_table()}
    rows = []
    print(f"{'model':20s} {'input':>5s} {'params M':>9s} {'GMACs':>7s} {'train img/s':>11s}")
    for name in args.models:
        r = table[name]
        rate = train_rate(name, args.batch, args.rounds)
        rows.append(
            {
                "name": name,
                "input_size": r["input_size"],
                "params": r["params"],
                "macs": r["macs"],
                "train_images_per_s": round(rate, 3),
            }
        )
        print(
            f"{name:20s} {r['input_size']:5d} {r['params'] / 1e6:9.2f} {r['macs'] / 1e9:7.2f} {rate:11.2f}", flush=True
        )
    result = {
        "benchmark": "models: CPU training step at the native input size",
        "command": " ".join([os.path.relpath(sys.executable, REPO), "benchmarks/models.py", *(argv or sys.argv[1:])]),
        "batch": args.batch,
        "threads": args.threads,
        "rounds": args.rounds,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
