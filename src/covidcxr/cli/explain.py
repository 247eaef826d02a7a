"""covidcxr explain / audit-model / segment train|predict."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from covidcxr.cli import add_default_model, add_trust_checkpoint, int_at_least

METHOD_NAMES = ("gradcam", "lrp", "occlusion", "ig")


def _methods(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    if names == ["all"]:
        return list(METHOD_NAMES)
    bad = [n for n in names if n not in METHOD_NAMES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad or value!r}; choose from {', '.join(METHOD_NAMES)} "
                                         "(comma-separated, or 'all')")
    return names


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain",
        help="heatmaps (Grad-CAM, LRP, occlusion, integrated gradients) and the randomisation sanity check",
        description="Per image: an overlay PNG (the plain image beside the heatmap over it, at the image's "
        "resolution or at least 1024 px on the long side, one colour bar with the raw range, the predicted class, "
        "probability and decision rule) and the raw heatmap as .npy at model size and at the original image size. "
        "Colours show heatmap / scale (0..1, or -1..1 for signed methods); the scale is each image's maximum, or "
        "with --heat-scale batch one value per method for all images, so they can be compared. With --sanity: "
        "cascading weight randomisation (Adebayo et al. 2018) with Spearman rank correlations; methods whose maps "
        "do not change are flagged. Research use only.",
    )
    add_trust_checkpoint(p)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    add_default_model(p, "covidcxr checkpoint")
    p.add_argument("--method", type=_methods, default=None, metavar="METHOD",
                   help="gradcam|lrp|occlusion|ig, a comma-separated list, or 'all' (default gradcam; "
                   "with --sanity default gradcam,lrp,ig)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--target", default=None, help="class to explain (default: each image's predicted class)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--heat-scale", type=_heat_scale, default="image", metavar="image|batch|NUMBER",
                   help="overlay colour scale: image (each heatmap / its own max, default), batch (one scale per "
                   "method across all images given), or a number in the method's raw units")
    p.add_argument("--lrp-composite", default="epsilon-plus-flat",
                   choices=["epsilon-plus-flat", "epsilon-gamma-box", "epsilon-alpha2-beta1-flat", "epsilon"])
    p.add_argument("--ig-steps", type=int, default=32, help="integration steps for ig (default 32)")
    p.add_argument("--seg-model", metavar="CKPT", help="lung segmenter for lung-crop presets (cxnet-lungcrop)")
    p.add_argument("--sanity", action="store_true", help="run the cascading randomisation sanity check instead")
    p.add_argument("--sanity-threshold", type=float, default=0.5,
                   help="flag a method whose mean rank correlation stays at least this after full randomisation, "
                   "or through half of the cascade steps (default 0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=cmd_explain)

    a = sub.add_parser(
        "audit-model",
        help="shortcut audit: relevance inside the lungs, lung-only accuracy/AUC, text sensitivity",
        description="For each image and per class and source: the fraction of positive Grad-CAM and LRP relevance "
        "inside the lung mask, accuracy and AUC with everything outside the lungs blanked vs unmasked, and the change "
        "in predicted probability when the borders/corners (where burned-in text sits) are blanked. Uses the "
        "manifest's mask_path where present and the lung segmenter otherwise (default: the pretrained "
        "lung-unet-vgg11; each record names the mask's source; masks cached by image hash).",
    )
    a.add_argument("--model", required=True, metavar="CKPT")
    a.add_argument("--data", required=True, metavar="MANIFEST")
    a.add_argument("--split", default="test", help="test|val|train|all (default test)")
    a.add_argument("--out", required=True, metavar="DIR")
    a.add_argument("--seg-model", metavar="SEGMENTER",
                   help="lung segmenter for images without mask_path: a catalogue name or segment-train checkpoint "
                   "(default: $COVIDCXR_LUNG_MODEL, else the pretrained lung-unet-vgg11); 'none' for no segmenter")
    a.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    a.add_argument("--methods", type=_methods, default=["gradcam", "lrp"], help="relevance methods (default gradcam,lrp)")
    a.add_argument("--batch-size", type=int, default=8)
    a.add_argument("--examples", type=int, default=6, help="example overlays in the report (default 6)")
    a.add_argument("--bootstrap", type=int, default=1000, help="patient bootstrap resamples for CIs (default 1000)")
    a.add_argument("--limit", type=int, default=None, help="audit at most this many images (for a quick look)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a.set_defaults(func=cmd_audit)

    s = sub.add_parser("segment", help="lung segmentation: predict masks (pretrained U-Net), train or fine-tune")
    ssub = s.add_subparsers(dest="segment_command", metavar="ACTION")
    t = ssub.add_parser(
        "train", help="train the lung U-Net on a manifest's mask_path images (patient-level split), or fine-tune "
        "the pretrained one (--init lung-unet-vgg11)",
        description="Trains on the manifest rows with a mask_path; with a split column, Dice on test is Dice on "
        "held-out patients. Without --init: a compact U-Net from scratch (per-image standardised input). With "
        "--init lung-unet-vgg11 (or a segmenter file): fine-tunes it at --size with the lung-unet preset, encoder "
        "frozen unless --train-encoder, BatchNorm statistics kept. Learning rate: 5 % warm-up, then cosine to 1 %; "
        "with --max-minutes it anneals within that budget and training stops when it is spent. Validation Dice "
        "picks the epoch kept. Writes RUN/segmenter.pt and RUN/metrics.json.")
    t.add_argument("--data", required=True, metavar="MANIFEST")
    t.add_argument("--out", required=True, metavar="RUN")
    t.add_argument("--init", default=None, metavar="SEGMENTER",
                   help="start from this segmenter (catalogue name, e.g. lung-unet-vgg11, or a file) and fine-tune")
    t.add_argument("--size", type=_unet_size, default=256, help="training resolution, a multiple of 16 (default 256)")
    t.add_argument("--epochs", type=int_at_least(1), default=40)
    t.add_argument("--batch-size", type=int_at_least(1), default=8)
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-3 from scratch, 1e-3 with --init)")
    t.add_argument("--base", type=int, default=16, help="U-Net width (channels of the first level; from scratch)")
    t.add_argument("--train-encoder", nargs="?", const="all", default="none", choices=("none", "deep", "all"),
                   help="with --init: also train the last VGG stage (deep) or the whole encoder (all, the bare "
                   "flag), at --encoder-lr-scale x --lr (default none)")
    t.add_argument("--encoder-lr-scale", type=float, default=0.1, help="encoder learning rate / --lr (default 0.1)")
    t.add_argument("--val-fraction", type=float, default=0.2, help="share of patients held out (default 0.2)")
    t.add_argument("--max-steps", type=int_at_least(1), default=None, help="stop after this many optimiser steps (smoke tests)")
    t.add_argument("--max-minutes", type=float, default=None,
                   help="wall-clock budget: the learning-rate schedule anneals within it, training stops when it is spent")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    t.set_defaults(func=cmd_segment_train)
    pr = ssub.add_parser("predict", help="write lung masks (PNG 0/255 at the image size) and overlays",
                         description="Per image: <stem>_mask.png (0/255, the image's size; two largest components, "
                         "holes filled) and <stem>_overlay.png (mask tinted and outlined on the image), plus "
                         "masks.csv with each mask's measurements and plausibility verdict. Unreadable files are "
                         "reported and skipped.")
    pr.add_argument("images", nargs="+", metavar="IMAGE")
    pr.add_argument("--model", default=None, metavar="SEGMENTER",
                    help="catalogue name (lung-unet-vgg11) or a segment-train checkpoint "
                    "(default: $COVIDCXR_LUNG_MODEL, else lung-unet-vgg11)")
    pr.add_argument("--out", required=True, metavar="DIR")
    pr.add_argument("--batch-size", type=int_at_least(1), default=4)
    pr.add_argument("--no-overlay", dest="overlay", action="store_false", help="write masks only")
    pr.add_argument("--overlay", dest="overlay", action="store_true", help=argparse.SUPPRESS)  # the old flag
    pr.add_argument("--backend", choices=["torch", "onnx", "auto"], default="auto",
                    help="inference engine: onnx = onnxruntime on an export cached under ~/.cache/covidcxr "
                    "(about 30%% less CPU at 512 px); auto (default) = onnx when onnxruntime is installed")
    pr.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    pr.set_defaults(func=cmd_segment_predict, overlay=True)
    s.set_defaults(func=lambda args: (s.print_help(), 2)[1])


def _unet_size(text: str) -> int:
    """The U-Net halves the input four times, so its side must be a positive multiple of 16."""
    try:
        size = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if size < 16 or size % 16:
        raise argparse.ArgumentTypeError(f"{size} must be a positive multiple of 16 (e.g. 64, 128, 256)")
    return size


def _threads(args: argparse.Namespace) -> None:
    """On a busy machine one thread per process is often faster than several."""
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(max(1, args.threads))


def _heat_scale(text: str) -> str | float:
    if text in ("image", "batch"):
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected image, batch or a positive number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text}: the scale must be positive")
    return value


def _err(command: str, path: str, reason: str) -> None:
    print(f"covidcxr {command}: {path}: {reason}", file=sys.stderr)


def cmd_explain(args: argparse.Namespace) -> int:
    import torch

    from covidcxr.cli import UserError
    from covidcxr.explain.methods import Context
    from covidcxr.explain.run import explain_files, iter_images, prepare_image
    from covidcxr.models import load

    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    _threads(args)
    from covidcxr.reference_models import model_or_default

    args.model = model_or_default(args.model)  # no --model: the reference classifier, said in one line
    loaded = load(args.model)
    if loaded.preset.needs_lung_mask:  # the segmenter its checkpoint records, or --seg-model given by hand
        from covidcxr.segment.maskspec import MaskSpec

        spec = MaskSpec(str(args.seg_model)) if args.seg_model else MaskSpec.for_model(loaded.training)
        loaded.preset = loaded.preset.with_masks(spec)
    if loaded.task != "classification":
        raise UserError(f"{args.model}: a {loaded.task} checkpoint; explain needs a classification checkpoint")
    if getattr(args, "target", None) is not None and args.target not in loaded.classes:
        raise UserError(f"--target {args.target!r} is not one of the classes of {args.model}: "
                        f"{', '.join(loaded.classes)}")
    files = iter_images(args.images)
    if not files:
        raise UserError("no image files given")
    ctx = Context(arch=loaded.arch, preset=loaded.preset, lrp_composite=args.lrp_composite, ig_steps=args.ig_steps)
    out = Path(args.out)
    if args.sanity:
        from covidcxr.explain.sanity import sanity_check, sanity_markdown
        from covidcxr.io import CXRReadError
        from covidcxr.preprocess import PresetError

        methods = args.method or ["gradcam", "lrp", "ig"]
        tensors, failed = [], []
        for f in files:
            try:
                tensors.append(prepare_image(f, loaded.preset).tensor)
            except (CXRReadError, PresetError) as err:
                failed.append(f)
                _err("explain", f, str(err).removeprefix(f"{f}: "))
        if not tensors:
            raise UserError("no readable images for the sanity check")
        torch.manual_seed(args.seed)
        results = sanity_check(loaded.model, torch.stack(tensors), methods, ctx=ctx,
                               threshold=args.sanity_threshold, seed=args.seed)
        out.mkdir(parents=True, exist_ok=True)
        md = sanity_markdown(results, title=f"Sanity check: {Path(args.model).name} ({loaded.arch})")
        (out / "sanity.md").write_text(md)
        (out / "sanity.json").write_text(json.dumps({"model": args.model, "arch": loaded.arch,
                                                     "images": [f for f in files if f not in failed],
                                                     "results": [r.to_dict() for r in results]}, indent=2))
        print(md)
        return 1 if failed else 0
    methods = args.method or ["gradcam"]
    from covidcxr.outpaths import OverwriteError, refuse_inside

    try:
        refuse_inside(out, args.images, "covidcxr explain", "its overlays would be read as X-rays by the next run")
        records, failures = explain_files(files, loaded, methods, out, batch_size=args.batch_size,
                                          target=args.target, ctx=ctx, heat_scale=args.heat_scale,
                                          on_error=lambda f, r: _err("explain", f, r))
    except OverwriteError as err:
        raise UserError(str(err)) from None
    n_img = len({r.file for r in records})
    print(f"explained {n_img} image(s) with {', '.join(methods)} -> {out} ({len(failures)} failed)")
    if records:
        print(f"decision rule: {records[0].decision_rule}")
    return 1 if failures else 0


def cmd_audit(args: argparse.Namespace) -> int:
    from covidcxr.explain.audit import audit_model

    _threads(args)
    report = audit_model(args.model, args.data, split=args.split, out=args.out, seg_model=args.seg_model,
                         progress=args.progress,
                         methods=args.methods, batch_size=args.batch_size, examples=args.examples,
                         bootstrap=args.bootstrap, limit=args.limit, seed=args.seed,
                         on_error=lambda f, r: _err("audit-model", f, r))
    print(report["headline"])
    print(f"report: {Path(args.out) / 'audit.md'}")
    return 1 if report["failures"] else 0


def cmd_segment_train(args: argparse.Namespace) -> int:
    from covidcxr.segment.training import SegmenterTrainConfig, train_segmenter

    _threads(args)
    config = SegmenterTrainConfig(init=args.init, size=args.size, base=args.base, train_encoder=args.train_encoder,
                                  encoder_lr_scale=args.encoder_lr_scale, epochs=args.epochs,
                                  batch_size=args.batch_size, lr=args.lr, max_steps=args.max_steps,
                                  max_minutes=args.max_minutes, val_fraction=args.val_fraction, seed=args.seed)
    res = train_segmenter(args.data, args.out, config, log_fn=lambda line: print(line, flush=True))
    print(json.dumps(res, indent=2))
    return 0


def cmd_segment_predict(args: argparse.Namespace) -> int:
    from covidcxr.explain.run import iter_images
    from covidcxr.segment import load_segmenter, predict_files

    _threads(args)
    seg = load_segmenter(args.model, backend=args.backend)
    written, failures = predict_files(iter_images(args.images), seg, args.out, batch_size=args.batch_size,
                                      overlay_images=args.overlay, on_error=lambda f, r: _err("segment predict", f, r))
    print(f"wrote {len(written)} mask(s){' and overlays' if args.overlay else ''} with {seg.id} to {args.out} "
          f"({len(failures)} failed; measurements and plausibility in masks.csv)")
    return 1 if failures else 0
