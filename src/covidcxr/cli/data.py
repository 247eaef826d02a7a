"""covidcxr data build | data audit, and covidcxr inspect."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="build, split and audit datasets")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])

    b = dsub.add_parser(
        "build",
        help="merge sources into OUT/manifest.csv, split by patient",
        description="Merge public datasets (in their own layouts) into one manifest and split it by patient "
        "into train/val/test, stratified by label and deterministic for --seed. Source kinds: cohen, figure1, "
        "actualmed, rsna, nih, hannover, radiography-db, folder, csv, covidx. Patients that share a picture "
        "(identical, re-encoded, or cropped/rotated) are linked into one person (patient_id; the source's id "
        "stays in source_patient_id), so a person never spans two splits.",
    )
    b.add_argument("--source", action="append", required=True, metavar="KIND=PATH",
                   help="a source, repeatable: csv=metadata.csv (csv:NAME=FILE names it; with several CSVs each one's patient ids are prefixed with its NAME, else its file stem), cohen=DIR, figure1=DIR, actualmed=DIR, rsna=DIR, "
                   "nih=DIR (ChestX-ray14), hannover=DIR, radiography-db=DIR, folder=DIR, covidx=LABELS.txt")
    b.add_argument("--out", required=True, help="output folder (manifest.csv, summary.json, summary.md)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--val-fraction", type=float, default=0.1, help="fraction of images for val (default 0.1)")
    b.add_argument("--test-fraction", type=float, default=0.2, help="fraction of images for test (default 0.2)")
    b.add_argument("--holdout-source", metavar="NAME",
                   help="put every image of this source in test and train/validate on the others")
    b.add_argument("--column", action="append", default=[], metavar="FIELD=CSVCOL",
                   help="csv source column mapping, e.g. --column path=file --column label=diagnosis")
    b.add_argument("--image-dir", help="csv/covidx sources: folder the file names are relative to")
    b.add_argument("--strict-labels", action="store_true",
                   help="cohen: only the original COVIDx notebook findings (drops Varicella, Influenza, ...)")
    b.add_argument("--patient-id-from", choices=["filename", "image"],
                   help="csv source without a patient id column (or with empty cells): invent ids from the file "
                   "name (up to a '__') or one per image. Without this flag a missing patient id is an error; "
                   "with it, `data audit` reports the ids as invented")
    b.add_argument("--keep-other-findings", action="store_true",
                   help="nih: keep images whose findings are neither 'No Finding' nor include Pneumonia, with label "
                   "'other' (training ignores them; the raw findings are in the 'findings' column)")
    b.add_argument("--no-near-dedupe", action="store_true",
                   help="skip decoding every image for perceptual-hash grouping (faster on huge sources)")
    b.set_defaults(func=cmd_build)

    a = dsub.add_parser("audit", help="leakage, duplicates and confounding report; exit 1 on leakage",
                        description="Write audit.json and audit.md (beside the manifest or in --out) and print "
                        "the Markdown. Exit status 1 when a patient or an image crosses splits.")
    a.add_argument("manifest")
    a.add_argument("--out", help="folder for audit.json / audit.md (default: the manifest's folder)")
    a.add_argument("--near-bits", type=int, default=None, help="perceptual-hash Hamming threshold (default 6 of 64)")
    a.add_argument("--no-perceptual", action="store_true", help="skip near-duplicate detection")
    a.add_argument("--json", action="store_true", help="print the JSON report instead of Markdown")
    a.set_defaults(func=cmd_audit)

    i = sub.add_parser("inspect", help="describe image files: format, size, bit depth, photometric, value range",
                       description="Describe each file. Unreadable files get one line each on stderr and the exit "
                       "status is 1.")
    i.add_argument("files", nargs="+", metavar="FILE")
    i.add_argument("--json", action="store_true", help="one JSON object per line")
    i.set_defaults(func=cmd_inspect)


def cmd_build(args: argparse.Namespace) -> int:
    from pathlib import Path

    from covidcxr.cli import UserError
    from covidcxr.data.splits import build_manifest, parse_source_spec

    sources = [parse_source_spec(s) for s in args.source]
    kw: dict = {}
    if args.column:
        try:
            kw["column_map"] = dict(c.split("=", 1) for c in args.column)
        except ValueError:
            raise UserError(f"bad --column {args.column}; expected FIELD=CSVCOL") from None
    if args.image_dir:
        kw["image_dir"] = args.image_dir
    if args.strict_labels:
        kw["strict_labels"] = True
    if args.patient_id_from:
        kw["patient_id_from"] = args.patient_id_from
    if args.keep_other_findings:
        kw["keep_other_findings"] = True
    try:
        build_manifest(sources, args.out, seed=args.seed, val_fraction=args.val_fraction,
                       test_fraction=args.test_fraction, holdout_source=args.holdout_source,
                       near_duplicates=not args.no_near_dedupe, **kw)
    except ValueError as err:
        if type(err) is ValueError:
            raise UserError(str(err)) from None
        raise
    out = Path(args.out)
    print((out / "summary.md").read_text(), end="")
    print(f"wrote {out / 'manifest.csv'}, {out / 'summary.json'}, {out / 'summary.md'}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from covidcxr.data.audit import NEAR_DUPLICATE_BITS, audit_manifest, audit_markdown

    report = audit_manifest(args.manifest, out_dir=args.out,
                            near_bits=args.near_bits if args.near_bits is not None else NEAR_DUPLICATE_BITS,
                            perceptual=not args.no_perceptual)
    print(json.dumps(report, indent=2, default=str) if args.json else audit_markdown(report), end="\n" if args.json else "")
    if not args.json:
        print("wrote " + ", ".join(report.get("written", [])))
    if report["leak"]:
        print("covidcxr data audit: LEAKAGE: " + "; ".join(w for w in report["warnings"] if "split" in w), file=sys.stderr)
        return 1
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from covidcxr.io import CXRReadError, inspect

    failed = 0
    for f in args.files:
        try:
            info = inspect(f)
        except CXRReadError as err:
            failed += 1
            print(f"error: {err}", file=sys.stderr)
            continue
        if args.json:
            print(json.dumps(info.to_dict(), default=str))
            continue
        extra = []
        if info.transfer_syntax:
            extra.append(f"transfer syntax {info.transfer_syntax}")
        if info.modality:
            extra.append(f"modality {info.modality}")
        view = info.extra.get("view_position") if info.extra else None
        if view:
            extra.append(f"view {view}")
        print(f"{f}: {info.format.upper()} {info.width}x{info.height}, {info.bit_depth}-bit, {info.photometric}, "
              f"stored values {info.min_value:g}..{info.max_value:g}" + (f", {', '.join(extra)}" if extra else ""))
    if failed:
        print(f"{failed} of {len(args.files)} file(s) unreadable", file=sys.stderr)
    return 1 if failed else 0
