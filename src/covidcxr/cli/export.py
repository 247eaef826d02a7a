"""covidcxr export: ONNX export with a parity check, optionally static INT8."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from covidcxr.cli import add_trust_checkpoint, float_between, int_at_least


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "export",
        help="export a checkpoint to ONNX (preset in the metadata) and check parity on real images",
        description="Export to ONNX with a dynamic batch axis; the preprocessing preset, classes, threshold and "
        "temperature go into the metadata. The command then compares onnxruntime with PyTorch on real images "
        "(default: 16 images of the shared dev set) and fails (exit 1) when any probability differs by more "
        "than --atol.",
    )
    add_trust_checkpoint(e)
    e.add_argument("--model", required=True, metavar="CKPT",
                   help="covidcxr checkpoint, or 'reference' (the shipped reference classifier)")
    e.add_argument("--onnx", metavar="OUT.onnx", help="write an ONNX file (this or --monai-bundle is required)")
    e.add_argument("--monai-bundle", metavar="DIR",
                   help="write a MONAI bundle into DIR: configs/metadata.json (MONAI's schema), configs/inference.json "
                   "(the preset as MONAI transforms), models/model.ts (TorchScript), docs/README.md (model card); "
                   "checked with MONAI's ConfigParser against covidcxr on --parity-count images "
                   "(needs the extra: pip install 'covidcxr[monai]')")
    e.add_argument("--parity-images", nargs="+", metavar="PATH", help="files, folders or a manifest for the parity check")
    e.add_argument("--parity-count", type=int_at_least(1), default=None,
                   help="images used for the parity check (default: 16 for ONNX, 4 for a MONAI bundle)")
    e.add_argument("--atol", type=float, default=1e-4, help="largest allowed probability difference (default: 1e-4)")
    e.add_argument("--opset", type=int, default=18)
    e.add_argument("--no-plausibility", action="store_true",
                   help="do not write the plausibility check's lung U-Net ONNX export (by default it is written to "
                        "the covidcxr cache, $COVIDCXR_CACHE, so the torch-free ONNX paths can run the check)")
    e.add_argument("--exporter", choices=["auto", "dynamo", "torchscript"], default="auto",
                   help="torch.onnx exporter (auto: dynamo, then the legacy TorchScript one)")
    q = e.add_argument_group(
        "INT8", "--quantize int8 writes the fp32 model to OUT.fp32.onnx and a statically quantized model to OUT.onnx, "
        "calibrated on the train split of --calibrate; a parity gate on held-out splits (COVID-19 AUC change and "
        "label agreement vs fp32) runs at export, is stored in the metadata, and fails the export (exit 1, nothing "
        "at OUT) when missed")
    q.add_argument("--quantize", choices=["int8"], help="write a statically quantized model")
    q.add_argument("--calibrate", metavar="MANIFEST", help="split manifest: calibration on 'train', gate on --parity-splits")
    q.add_argument("--calibration-count", type=int_at_least(1), default=128, help="train images (default: 128)")
    q.add_argument("--calibration-method", choices=["minmax", "percentile", "entropy"], default="minmax")
    q.add_argument("--parity-splits", default="val,test", help="held-out splits for the gate (default: val,test)")
    q.add_argument("--max-auc-change", type=float_between(0, 1), default=0.01, help="default: 0.01")
    q.add_argument("--min-agreement", type=float_between(0, 1), default=0.98, help="label agreement (default: 0.98)")
    q.add_argument("--keep-fp32", default="auto", metavar="auto|N",
                   help="first N convolutions kept fp32; auto (default): as few as bring the calibration-set logit "
                        "error to <= 0.05 (MobileNetV2's high-gain first blocks need some, ResNets none)")
    e.set_defaults(func=cmd_export)



def cmd_export(args: argparse.Namespace) -> int:
    from covidcxr.cli import UserError
    from covidcxr.export import ExportError, export_onnx
    from covidcxr.predict import PredictorError

    if not args.onnx and not args.monai_bundle:
        raise UserError("give --onnx OUT.onnx and/or --monai-bundle DIR")
    if args.monai_bundle:
        _monai_bundle(args)
        if not args.onnx:
            return 0
    if args.quantize and not args.calibrate:
        raise UserError("--quantize int8 needs --calibrate MANIFEST (a split manifest; its train split calibrates)")
    if args.calibrate and not args.quantize:
        raise UserError("--calibrate is only used with --quantize int8")
    target = Path(args.onnx)
    fp32_out = target.with_name(target.stem + ".fp32.onnx") if args.quantize else target
    _refuse_writing_inputs(args, [target, fp32_out])
    try:
        report = export_onnx(
            args.model,
            fp32_out,
            parity_images=args.parity_images,
            parity_count=args.parity_count or 16,
            atol=args.atol,
            opset=args.opset,
            exporter=args.exporter,
        )
    except (ExportError, PredictorError) as err:
        raise UserError(str(err)) from None
    size_mb = fp32_out.stat().st_size / 1e6
    print(
        f"wrote {fp32_out} ({size_mb:.1f} MB, exporter {report.exporter}, opset {report.opset}, dynamic batch)\n"
        f"parity: max |p_onnx - p_torch| = {report.max_abs_diff:.2e} <= {report.atol:.0e} on "
        f"{report.parity_images} images from {report.parity_source}, batch sizes {report.batch_sizes}; "
        f"labels identical: {report.labels_equal}"
    )
    for f in report.failed_images:
        print(f"  skipped unreadable parity image: {f}", file=sys.stderr)
    _export_segmenters(args)
    if args.quantize:
        return _quantize(args, fp32_out, target)
    return 0


def _export_segmenters(args: argparse.Namespace) -> None:
    """The lung U-Net exports the ONNX model needs at inference (plausibility check, lung crop), written now."""
    from covidcxr.export import export_segmenters

    try:
        paths = export_segmenters(args.model, plausibility=not args.no_plausibility)
    except Exception as err:  # the ONNX model itself is fine: say what its inference will lack, in one line
        print(f"warning: the lung U-Net's ONNX export could not be written ({type(err).__name__}: {err}); the ONNX "
              "model's plausibility check then runs only the rules that need no mask", file=sys.stderr)
        return
    for p in paths:
        print(f"lung U-Net for the ONNX paths (plausibility check / lung crop): {p}")


def _refuse_writing_inputs(args: argparse.Namespace, outputs: list[Path]) -> None:
    """An export never writes over the model it exports (or its metadata file) or a file it reads."""
    from covidcxr.cli import UserError
    from covidcxr.outpaths import OverwriteError, refuse_overwrite
    from covidcxr.reference_models import ReferenceModelError, model_files

    try:
        inputs = [*model_files(args.model), args.calibrate, *(args.parity_images or [])]
    except ReferenceModelError as err:
        raise UserError(str(err)) from None
    try:
        refuse_overwrite(outputs, inputs, "covidcxr export")
    except OverwriteError as err:
        raise UserError(str(err)) from None


def _quantize(args: argparse.Namespace, fp32_out: Path, target: Path) -> int:
    from covidcxr.cli import UserError
    from covidcxr.predict import PredictorError
    from covidcxr.quantize import QuantizeError, quantize_int8

    keep = args.keep_fp32.strip().lower()
    if keep != "auto" and not keep.isdigit():
        raise UserError(f"--keep-fp32 must be 'auto' or a count of convolutions, not {args.keep_fp32!r}")
    try:
        rep = quantize_int8(
            fp32_out, target, args.calibrate, calibration_count=args.calibration_count,
            keep_fp32=keep if keep == "auto" else int(keep),
            parity_splits=[s.strip() for s in args.parity_splits.split(",") if s.strip()],
            max_auc_change=args.max_auc_change, min_agreement=args.min_agreement, method=args.calibration_method,
        )
    except (QuantizeError, PredictorError) as err:
        raise UserError(str(err)) from None
    g = rep.gate
    print(
        f"wrote {target} (INT8, {rep.size_int8_mb:.1f} MB vs {rep.size_fp32_mb:.1f} MB fp32; calibrated on "
        f"{rep.calibration_images} images of {rep.calibration_source}, {rep.method}; "
        f"{len(rep.fp32_nodes)} leading convolution(s) kept fp32)\n"
        f"parity gate PASSED on {g.images} images of {'+'.join(g.splits)}: COVID-19 AUC {g.auc_fp32:.4f} -> "
        f"{g.auc_int8:.4f} (change {g.auc_change:.4f} <= {g.max_auc_change}), labels agree {g.agreement:.1%} "
        f"(>= {g.min_agreement:.0%}), max |p_int8 - p_fp32| = {g.max_prob_diff:.3f}"
    )
    for f in rep.failed_calibration:
        print(f"  skipped unreadable calibration image: {f}", file=sys.stderr)
    return 0


def _monai_bundle(args: argparse.Namespace) -> None:
    from covidcxr.bundle import BundleError, export_bundle
    from covidcxr.cli import UserError
    from covidcxr.export import _pick, _shared_dev_images
    from covidcxr.predict import PredictorError, collect_inputs

    if args.quantize:
        raise UserError("--quantize applies to --onnx; a MONAI bundle holds the fp32 TorchScript model")
    src = args.parity_images or ([_shared_dev_images()] if _shared_dev_images() else [])
    count = args.parity_count or 4  # each image runs through MONAI's parser: fewer than for ONNX
    images = _pick(collect_inputs(src), count) if src else []
    try:
        rep = export_bundle(args.model, args.monai_bundle, parity_images=images, atol=args.atol)
    except (BundleError, PredictorError) as err:
        raise UserError(str(err)) from None
    except ImportError as err:
        raise UserError(f"--monai-bundle: {err}; install the extra: pip install 'covidcxr[monai]'") from None
    check = (f"parity with covidcxr: max |p_monai - p_covidcxr| = {rep.max_abs_diff:.2e} <= {args.atol:.0e} on "
             f"{rep.parity_images} images" if rep.parity_images else "no parity images found (pass --parity-images)")
    print(f"wrote MONAI bundle {rep.out_dir} (preset {rep.preset}; {', '.join(rep.files)})\n{check}\n"
          f"check it: python -m monai.bundle verify_metadata --meta_file {rep.out_dir}/configs/metadata.json "
          f"--filepath {rep.out_dir}/configs/meta_schema_20240725.json")
