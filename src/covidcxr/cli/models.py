"""covidcxr models list."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="the model registry")
    msub = p.add_subparsers(dest="models_command", metavar="ACTION")
    ls = msub.add_parser(
        "list",
        help="one row per model: name, paper, input size, preset, params, MACs",
        description="One row per registered model. Parameters and MACs (multiply-accumulates of one "
        "forward pass at the native input size, 3 outputs) are counted with torch.utils.flop_counter; "
        "'published' gives the paper's figures where it reports them.",
    )
    ls.add_argument("--json", action="store_true", help="print a JSON list of objects")
    ls.add_argument(
        "--live", action="store_true", help="count parameters and MACs now instead of using the stored table"
    )
    ls.set_defaults(func=cmd_list)
    p.set_defaults(func=lambda _a: (p.print_help(), 2)[1])


def _fmt(v: float | None, scale: float) -> str:
    return "-" if v is None else f"{v / scale:.2f}"


def cmd_list(args: argparse.Namespace) -> int:
    from covidcxr.models.summary import model_table

    rows = model_table(live=args.live)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    head = ["name", "paper", "input", "preset", "params (M)", "MACs (G)", "published (M / G)", "weights"]
    cells = [
        [
            r["name"],
            r["paper"],
            str(r["input_size"]),
            r["preset"],
            _fmt(r["params"], 1e6),
            _fmt(r["macs"], 1e9),
            "-"
            if r["published_params"] is None
            else f"{_fmt(r['published_params'], 1e6)} / {_fmt(r['published_macs'], 1e9)}",
            ",".join(w for w in r["weights"] if w not in ("none", "PATH")) or "-",
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip())
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)).rstrip())
    print("MACs at the native input size; every model also accepts weights=none or a local file.")
    return 0
