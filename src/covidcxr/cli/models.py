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
    show = msub.add_parser(
        "show",
        help="one model's paper, input size, preset, layer paths and weight sources",
        description="Print one registry entry. With --weights, the preprocessing preset those weights need "
        "(xrv for torchxrayvision weights, a checkpoint's own preset for a covidcxr checkpoint).",
    )
    show.add_argument("name", help="registry name, e.g. covidnet-cxr-2 (see `covidcxr models list`), a shipped reference "
                      "model (covidcxr-reference, covidcxr-reference-severity: prints its model card), or a "
                      "checkpoint (RUN/best.ckpt): its architecture, classes, preset, threshold and initial weights "
                      "(source, sha256, provenance)")
    show.add_argument("--weights", default="none",
                      help="none, imagenet, a catalogue name (covidcxr weights list), xrv-nih, xrv-all or a local file")
    show.add_argument("--json", action="store_true", help="print a JSON object")
    show.set_defaults(func=cmd_show)
    p.set_defaults(func=lambda _a: (p.print_help(), 2)[1])


def _fmt(v: float | None, scale: float) -> str:
    return "-" if v is None else f"{v / scale:.2f}"


def cmd_list(args: argparse.Namespace) -> int:
    from covidcxr.models.summary import model_table

    rows = model_table(live=args.live)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    head = ["name", "paper", "input", "preset", "params (M)", "MACs (G)", "published (M / G)", "CAM layer", "weights"]
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
            r["cam_layer"] or "-",
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


def checkpoint_card(path: str) -> dict:
    """What a checkpoint says about itself: no weights."""
    from covidcxr.models.checkpoint import read_bundle

    b = read_bundle(path)
    t = b.get("training") or {}
    init = dict(b.get("init") or {})
    return {
        "checkpoint": str(path),
        "arch": b.get("arch"),
        "task": b.get("task"),
        "classes": b.get("classes"),
        "preset": (b.get("preset") or {}).get("name"),
        "threshold": b.get("threshold"),
        "operating_point": (b.get("metrics") or {}).get("operating_point", {}).get("note"),
        "temperature": b.get("temperature"),
        "logit_bias": b.get("logit_bias"),
        "weights_init": init.get("weights", "unknown"),
        "weights_source": init.get("source"),
        "weights_sha256": init.get("sha256"),
        "weights_provenance": init.get("catalog"),
        "kept_neurons": init.get("kept_neurons") or None,
        "recipe": t.get("recipe"),
        "epoch": t.get("epoch"),
        "manifest_sha256": t.get("manifest_sha256"),
        "val_metrics": (b.get("metrics") or {}).get("val"),
        "covidcxr_version": b.get("covidcxr_version"),
    }


def cmd_show(args: argparse.Namespace) -> int:
    from pathlib import Path

    from covidcxr.models import preset_for
    from covidcxr.models.summary import model_table

    from covidcxr import reference_models as rm

    if rm.is_reference(args.name):  # a shipped reference model: its model card
        meta = rm.metadata(args.name)
        card = rm.card(args.name)
        if args.json:
            print(json.dumps({**card, "checkpoint": checkpoint_card(rm.resolve_model(args.name))}, indent=2, default=str))
            return 0
        if not card.get("sections"):
            card = {**card, "summary": card.get("intended_use", "no model card stored")}
        print(rm.render_card({"name": rm.canonical(args.name), "version": rm.version(args.name), **card}), end="")
        print(f"weights: {rm.resolve_model(args.name)} ({meta.get('stored_as', '')}); licence: "
              f"{card.get('license', rm.LICENSE)}")
        return 0
    if Path(args.name).is_file():
        card = checkpoint_card(args.name)
        if args.json:
            print(json.dumps(card, indent=2, default=str))
            return 0
        width = max(map(len, card))
        for k, v in card.items():
            if isinstance(v, dict):
                v = ", ".join(f"{a}={b:.4g}" if isinstance(b, float) else f"{a}={b}" for a, b in v.items())
            elif isinstance(v, list):
                v = ", ".join(map(str, v))
            print(f"{k.ljust(width)}  {v}")
        return 0

    row = next((r for r in model_table() if r["name"] == args.name), None)
    if row is None:
        from covidcxr.models import get_spec

        get_spec(args.name)  # raises UnknownModelError with the known names
    row = {**row, "weights_given": args.weights, "preset_for_weights": preset_for(args.name, args.weights)}
    if args.json:
        print(json.dumps(row, indent=2))
        return 0
    width = max(map(len, row))
    for k, v in row.items():
        if k in ("params", "published_params") and v:
            v = f"{v / 1e6:.2f} M"
        elif k in ("macs", "published_macs") and v:
            v = f"{v / 1e9:.2f} G"
        elif isinstance(v, list):
            v = ", ".join(map(str, v))
        print(f"{k.ljust(width)}  {v}")
    return 0
