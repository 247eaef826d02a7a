"""covidcxr severity train | evaluate | cv."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from covidcxr.cli import int_at_least

DATA_HELP = ("labels: a covidcxr manifest (geographic_extent/opacity/severity_level columns), a COVIDxSev "
             ".txt file or a COVID-Net S score CSV like severity_annotations.csv")
WEIGHTS_HELP = ("initial weights of --arch when no --init is given: none (random), imagenet, a catalogue name "
                "(covidcxr weights list; found offline via COVIDCXR_WEIGHTS_DIR) or a file")
IMAGES_HELP = "image folder for a COVIDxSev file or score CSV (default: the label file's folder)"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("severity", help="COVID-19 severity: CXR-S levels, geographic extent and opacity scores")
    ssub = p.add_subparsers(dest="severity_command", metavar="ACTION")

    t = ssub.add_parser("train", help="train a severity model (level or scores) from a detector checkpoint")
    t.add_argument("--task", required=True, choices=["scores", "level"],
                   help="scores: geographic extent 0-8 and opacity 0-6; level: CXR-S level1/level2")
    t.add_argument("--data", required=True, help=DATA_HELP)
    t.add_argument("--out", required=True, help="run folder: best.ckpt, last.ckpt, train_summary.json")
    t.add_argument("--init", help="trained COVID detector checkpoint: backbone and preset kept, new 2-output head "
                                  "(default: --arch with --weights, random unless given)")
    t.add_argument("--max-epochs", type=int_at_least(1), default=10)
    t.add_argument("--arch", default="resnet18", help="architecture when no --init is given")
    t.add_argument("--weights", default="none", help=WEIGHTS_HELP)
    t.add_argument("--preset", help="preprocessing preset (default: the detector's, else the architecture's)")
    t.add_argument("--size", type=int_at_least(32), help="input size (e.g. 128 for a quick CPU run); keeps the preset otherwise")
    t.add_argument("--images", help=IMAGES_HELP)
    t.add_argument("--batch-size", type=int_at_least(1), default=16)
    t.add_argument("--lr", type=float, default=1e-3, help="head learning rate")
    t.add_argument("--backbone-lr-mult", type=float, default=0.1, help="backbone learning rate = lr x this")
    t.add_argument("--freeze-epochs", type=int, default=0, help="keep the backbone frozen for the first N epochs")
    t.add_argument("--augment", default="light", help="augmentation recipe: covidnet, light or none")
    t.add_argument("--level-source", default="auto", choices=["auto", "column", "proxy"],
                   help="level targets: severity_level column, or the PROXY geographic_extent >= threshold "
                        "(auto: the column if present)")
    t.add_argument("--level-threshold", type=float, default=4.0, help="PROXY threshold on geographic extent")
    t.add_argument("--val-fraction", type=float, default=0.15,
                   help="patients held out for validation when the data has no val split")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu", "auto"], help="Lightning accelerator")
    t.set_defaults(func=_guard(cmd_train))

    e = ssub.add_parser("evaluate", help="metrics of a severity checkpoint, with patient-bootstrap CIs")
    e.add_argument("--model", required=True, help="severity checkpoint (severity train's best.ckpt)")
    e.add_argument("--data", required=True, help=DATA_HELP)
    e.add_argument("--split", default="test", choices=["test", "val", "train", "all"])
    e.add_argument("--out", required=True, help="report folder: metrics.json and predictions.csv")
    e.add_argument("--images", help=IMAGES_HELP)
    e.add_argument("--bootstrap", type=int, default=1000, help="patient bootstrap resamples (0: no CIs)")
    e.add_argument("--level-source", choices=["auto", "column", "proxy"],
                   help="override the checkpoint's level target definition")
    e.add_argument("--level-threshold", type=float, help="override the PROXY threshold")
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(func=_guard(cmd_evaluate))

    c = ssub.add_parser("cv", help="Monte-Carlo cross-validation over patients of the score models")
    c.add_argument("--data", required=True, help=DATA_HELP)
    c.add_argument("--out", required=True, help="folder: cv.json, cv_splits.csv, cv_table.md")
    c.add_argument("--init", help="trained COVID detector checkpoint (frozen features and fine-tuning start)")
    c.add_argument("--arch", default="resnet18", help="architecture when no --init is given")
    c.add_argument("--weights", default="none", help=WEIGHTS_HELP)
    c.add_argument("--preset")
    c.add_argument("--size", type=int, default=128, help="input size (default 128, for CPU)")
    c.add_argument("--images", help=IMAGES_HELP)
    c.add_argument("--splits", type=int, default=5)
    c.add_argument("--test-fraction", type=float, default=0.2)
    c.add_argument("--methods", default="mean,ridge,finetune", help="comma list of mean, ridge, finetune")
    c.add_argument("--max-epochs", type=int, default=5, help="fine-tuning epochs per split")
    c.add_argument("--batch-size", type=int, default=16)
    c.add_argument("--lr", type=float, default=1e-3)
    c.add_argument("--freeze-epochs", type=int, default=0)
    c.add_argument("--augment", default="light")
    c.add_argument("--level-threshold", type=float, default=4.0)
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=_guard(cmd_cv))
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn SeverityError into the CLI's one-line UserError."""
    def run(args: argparse.Namespace) -> int:
        from covidcxr.cli import UserError
        from covidcxr.severity.labels import SeverityError

        try:
            return fn(args)
        except SeverityError as err:
            raise UserError(str(err)) from None

    return run


def _fmt(d: dict[str, Any]) -> str:
    v, (lo, hi) = d["value"], d["ci95"]
    if v is None or v != v:
        return "n/a"
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]" if lo == lo and hi == hi else f"{v:.3f}"


def cmd_train(args: argparse.Namespace) -> int:
    from covidcxr.severity.train import SeverityConfig, train_severity

    cfg = SeverityConfig(
        task=args.task, data=args.data, out=args.out, init=args.init, arch=args.arch, weights=args.weights,
        preset=args.preset,
        size=args.size, images=args.images, max_epochs=args.max_epochs, batch_size=args.batch_size, lr=args.lr,
        backbone_lr_mult=args.backbone_lr_mult, freeze_epochs=args.freeze_epochs, augment=args.augment,
        level_source=args.level_source, level_threshold=args.level_threshold, val_fraction=args.val_fraction,
        seed=args.seed, accelerator=args.accelerator,
    )
    ckpt = train_severity(cfg)
    summary = json.loads((ckpt.parent / "train_summary.json").read_text())
    print(f"wrote {ckpt} (best epoch {summary['best_epoch']}; {summary['n_train']} train / {summary['n_val']} val "
          f"images; targets {summary['targets']})")
    if summary["skipped_files"]:
        print(f"skipped {len(summary['skipped_files'])} unreadable file(s):", file=sys.stderr)
        for b in summary["skipped_files"]:
            print(f"  {b['error']}", file=sys.stderr)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from covidcxr.severity.evaluate import evaluate_severity

    rep = evaluate_severity(args.model, args.data, args.split, args.out, args.images, args.bootstrap, args.seed,
                            level_source=args.level_source, level_threshold=args.level_threshold)
    print(f"{rep['task']} on {rep['data']} split={rep['split']}: {rep['n_images']} images, "
          f"{rep['n_patients']} patients (95% CI: patient bootstrap)")
    block = rep.get("level") or rep.get("scores")
    for k, d in block["metrics"].items():
        print(f"  {k:32s} {_fmt(d)}")
    if "level" in rep:
        print(f"  confusion (rows true, cols pred {block['confusion_matrix']['rows_true_cols_pred']}): "
              f"{block['confusion_matrix']['counts']}")
    base = rep.get("baseline_train_mean") or rep.get("baseline_majority")
    if base:
        keys = [k for k in ("geographic_extent_mae", "opacity_mae", "accuracy") if k in base["metrics"]]
        name = "training mean" if "train_mean" in base else f"always {base['level']}"
        print(f"  baseline ({name}): " + ", ".join(f"{k} {_fmt(base['metrics'][k])}" for k in keys))
    if "level_proxy_from_scores" in rep:
        print(f"  PROXY level accuracy from the predicted extent: "
              f"{_fmt(rep['level_proxy_from_scores']['metrics']['accuracy'])}")
    if rep.get("note"):
        print(f"  note: {rep['note']}")
    print(f"wrote {args.out}/metrics.json and predictions.csv")
    for b in rep["skipped_files"]:
        print(f"skipped: {b['error']}", file=sys.stderr)
    return 0


def cmd_cv(args: argparse.Namespace) -> int:
    from covidcxr.severity.cv import CVConfig, cross_validate, markdown_table

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    config = CVConfig(init=args.init, arch=args.arch, weights=args.weights, preset=args.preset, size=args.size,
                      images=args.images, splits=args.splits, test_fraction=args.test_fraction, methods=methods,
                      max_epochs=args.max_epochs, batch_size=args.batch_size, lr=args.lr,
                      freeze_epochs=args.freeze_epochs, augment=args.augment, seed=args.seed,
                      level_threshold=args.level_threshold)
    rep = cross_validate(args.data, args.out, config)
    print(f"Monte-Carlo CV: {rep['splits']} patient splits of {rep['n_images']} scored images "
          f"({rep['n_patients']} patients), init: {rep['init']}")
    print(markdown_table(rep["summary"]), end="")
    print(f"wrote {args.out}/cv.json, cv_splits.csv, cv_table.md ({rep['seconds']:.0f} s)")
    return 0
