"""covidcxr weights list."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("weights", help="the pretrained weights catalogue")
    wsub = p.add_subparsers(dest="weights_command", metavar="ACTION")
    ls = wsub.add_parser(
        "list",
        help="every named weight source: what it is, and whether and where its file was found and verified",
        description="One row per weight source. Catalogue files are searched in the folders of "
        "COVIDCXR_WEIGHTS_DIR (os.pathsep-separated), then in <torch hub dir>/covidcxr/, and checked "
        "against their size and sha256 ('ok'); a file that fails the check is shown as 'bad' with the "
        "reason and is never used. The download sources (torchvision / timm / torchxrayvision) are listed "
        "with the architectures that take them; they need a network on first use.",
    )
    ls.add_argument("--json", action="store_true", help="print a JSON list of objects")
    ls.add_argument("--no-verify", action="store_true", help="do not hash the files (only say whether found)")
    ls.set_defaults(func=cmd_list)
    p.set_defaults(func=lambda _a: (p.print_help(), 2)[1])


def _archs(names: list[str]) -> str:
    return ", ".join(names) if len(names) <= 3 else f"{len(names)} ({', '.join(names[:2])}, ...)"


def _short(status: str) -> str:
    if status.startswith("available offline"):
        return "partly offline"
    return status.split(":")[0]


def cmd_list(args: argparse.Namespace) -> int:
    from covidcxr.models.catalog import ENV_DIR, weights_dirs
    from covidcxr.models.weights import download_sources, source_status

    rows = source_status(verify_files=not args.no_verify)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    head = ["name", "kind", "architectures", "preset", "status", "where"]
    cells = [[r["name"], r["kind"], _archs(r["architectures"]), r["preset"] or "-", _short(r["status"]),
              str(Path(r["path"]).resolve()) if r["path"] else "-"] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip())
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)).rstrip())
    for r in rows:
        if r["status"] != _short(r["status"]):
            print(f"{r['name']}: {r['status']}")
    dirs = ", ".join(str(d) for d in weights_dirs())
    print(f"searched: {dirs} ({ENV_DIR}, then the download folder)")
    print(f"download sources ({len(download_sources())}) need a network on first use; "
          "use a catalogue name or PATH offline")
    return 0
