"""covidcxr models list."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="the model registry")
    msub = p.add_subparsers(dest="models_command", metavar="ACTION")
    ls = msub.add_parser("list", help="one row per model: name, paper, input size, preset, params, MACs")
    ls.add_argument("--json", action="store_true", help="print a JSON list of objects")
    ls.set_defaults(func=cmd_list)


def cmd_list(args: argparse.Namespace) -> int:
    from covidcxr.models.summary import model_table

    rows = model_table()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    cols = ["name", "paper", "input_size", "preset", "params", "macs"]
    head = ["name", "paper", "input", "preset", "params (M)", "MACs (G)"]
    cells = [
        [r["name"], r["paper"], str(r["input_size"]), r["preset"], f"{r['params'] / 1e6:.2f}", f"{r['macs'] / 1e9:.2f}"]
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))
    del cols
    return 0
