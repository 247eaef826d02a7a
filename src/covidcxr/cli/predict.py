"""covidcxr predict: batch prediction over files, folders and manifests (local or Ray engine)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from covidcxr.cli import add_default_model, add_trust_checkpoint, int_at_least

EXIT_SOME_FAILED = 2


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="batch prediction over files, folders and manifests (JSONL/CSV)",
        description="Predict every image in PATH... (PNG/JPEG/TIFF/DICOM files, folders searched recursively, "
        "or manifest CSVs). One record per input; unreadable inputs become records with an 'error' field. "
        "Exit status 0 when every input was predicted, 2 when some failed. Research use only.",
    )
    add_trust_checkpoint(p)
    p.add_argument("paths", nargs="+", metavar="PATH", help="image file, folder or manifest CSV")
    add_default_model(p, "covidcxr checkpoint, exported ONNX file")
    p.add_argument("--backend", choices=["torch", "onnx"], default=None,
                   help="inference engine (default: onnx for *.onnx files, torch otherwise)")
    p.add_argument("--out", metavar="FILE", help="write records to FILE.jsonl or FILE.csv (default: JSON lines on "
                   "stdout). Written to a temporary file and renamed into place; an input (manifest, image) is "
                   "refused as FILE")
    p.add_argument("--resume", action="store_true",
                   help="keep the successful records already in --out, skip those inputs and append the rest")
    p.add_argument("--batch-size", type=int_at_least(1), default=16)
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="DataLoader worker processes that decode and preprocess (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads for inference")
    p.add_argument("--device", default="cpu", help="torch device for the torch backend (default: cpu)")
    p.add_argument("--heatmap", metavar="DIR", help="write a Grad-CAM overlay PNG per image into DIR (torch backend)")
    p.add_argument("--severity", metavar="SEV_CKPT", help="severity checkpoint, or 'reference' (the shipped reference "
                   "severity model); scores images predicted COVID-19")
    p.add_argument("--always-severity", action="store_true",
                   help="score severity for every image, not only those above the COVID-19 threshold")
    p.add_argument("--dicom-out", metavar="DIR", help="for each DICOM input, write a DICOM SR and a secondary capture "
                   "with the heatmap into DIR, as `covidcxr dicom listen` sends them (covidcxr.dicom)")
    p.add_argument("--no-plausibility", action="store_true",
                   help="skip the check that each input is a frontal chest X-ray (lung U-Net); records say 'unchecked'")
    p.add_argument("--label-implausible", action="store_true",
                   help="give a disease label even to inputs flagged not_a_frontal_cxr (default: they are labelled "
                   "not_a_frontal_cxr)")
    r = p.add_argument_group("distributed", "--engine ray runs the same pipeline on Ray Data: CPU tasks decode, an "
                             "actor pool (--workers actors, --threads each) predicts, and --out is a FOLDER of "
                             "part-NNNNN.jsonl/.parquet shards, one record per input; --resume skips inputs that "
                             "have a successful record and retries failed ones (needs the extra: pip install "
                             "'covidcxr[ray]')")
    r.add_argument("--engine", choices=["local", "ray"], default="local", help="default: local (one process)")
    r.add_argument("--address", metavar="auto|ray://HOST:PORT", help="Ray cluster to join (default: a local one)")
    r.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl", help="shard format with --engine ray")
    r.add_argument("--shard-size", type=int_at_least(1), default=1000, help="records per shard (default: 1000)")
    r.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per predictor actor (default: 0)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)



def _config(args: argparse.Namespace) -> Any:
    """The :class:`~covidcxr.predict.pipeline.PipelineConfig` of these options (both engines use it)."""
    from covidcxr.predict.pipeline import PipelineConfig

    return PipelineConfig(
        model=args.model, backend=args.backend, device=args.device, threads=args.threads,
        plausibility=not args.no_plausibility, label_implausible=args.label_implausible,
        severity=args.severity, always_severity=args.always_severity, heatmaps=bool(args.heatmap),
    )


def cmd_predict(args: argparse.Namespace) -> int:
    from covidcxr.cli import UserError
    from covidcxr.reference_models import model_or_default

    args.model = model_or_default(args.model)  # no --model: the reference classifier, said in one line

    if getattr(args, "engine", "local") == "ray":
        return _predict_ray(args)
    from covidcxr.predict import PredictorError, RecordWriter, Summary, collect_inputs, strip_transient
    from covidcxr.predict.pipeline import Pipeline, run_paths

    try:
        pipe = Pipeline(_config(args))
    except PredictorError as err:
        raise UserError(str(err)) from None
    predictor = pipe.predictor
    files = collect_inputs(args.paths)
    if not files:
        raise UserError(f"no images found in {' '.join(args.paths)} (looked for PNG, JPEG, TIFF, BMP and DICOM files)")
    from covidcxr.predict.output import (OutputError, SafeRecordWriter, check_output_path, leftovers, read_done,
                                         resolved)

    carried: list = []
    consumed: list = []
    try:
        if args.resume and not args.out:
            raise OutputError("--resume needs --out (the file to continue)")
        if args.out:
            if Path(args.out).is_dir():
                raise OutputError(f"--out {args.out} is a folder; give the records' file (preds.jsonl or preds.csv)")
            check_output_path(args.out, args.paths, files)
        if args.heatmap and pipe.heatmapper is not None:
            from covidcxr.outpaths import OverwriteError, refuse_inside

            try:
                refuse_inside(args.heatmap, args.paths, "covidcxr predict --heatmap",
                              "its overlays would be read as X-rays by the next run")
            except OverwriteError as err:
                raise OutputError(str(err)) from None
        interrupted = leftovers(args.out) if args.out else []
        if args.resume:
            consumed = interrupted
            carried, done = read_done(args.out, predictor.classes, predictor.sha256, interrupted)
            total_inputs = len(files)
            files = [f for f in files if resolved(f) not in done]
            print(f"--resume: {len(carried)} of {total_inputs} inputs already have a record in {args.out}"
                  + (f" or {len(consumed)} interrupted run(s) on it" if consumed else "")
                  + f"; {len(files)} to go", file=sys.stderr)
        elif interrupted:
            print(f"note: an interrupted run on {args.out} left records in {interrupted[-1]}; "
                  "--resume would continue it", file=sys.stderr)
    except OutputError as err:
        raise UserError(str(err)) from None

    heatmap_dir = None
    if args.heatmap:
        if pipe.heatmapper is None:
            print(f"note: --heatmap skipped: {pipe.heatmap_note}", file=sys.stderr)
        else:
            heatmap_dir = Path(args.heatmap)
            heatmap_dir.mkdir(parents=True, exist_ok=True)
    dicom_out = None
    if args.dicom_out:  # SR + secondary capture per DICOM input (F: covidcxr.dicom)
        from covidcxr.cli.dicom import dicom_writer

        dicom_out = dicom_writer(args.dicom_out, predictor)
    writer = (SafeRecordWriter(args.out, predictor.classes, carried, consumed) if args.out
              else RecordWriter(None, predictor.classes))
    summary = Summary()
    complete = False
    try:
        for rec in run_paths(pipe, files, batch_size=args.batch_size, num_workers=args.workers,
                             progress=not args.quiet):
            if heatmap_dir is not None and not rec.get("error"):
                _write_heatmap(pipe, rec, heatmap_dir)
            if dicom_out is not None:
                dicom_out.write(rec)
            writer.write(strip_transient(rec))
            summary.add(rec)
        complete = True
    except KeyboardInterrupt:
        pass  # the records so far are kept: see below
    finally:
        where = writer.finish(complete) if args.out else writer.close()
    if not complete:
        print(f"interrupted after {summary.total} of {len(files)} inputs"
              + (f": {where} holds {writer.records} complete records; run the same command with --resume to "
                 "continue" if args.out else ""), file=sys.stderr)
        return 130
    for line in summary.lines() + [n for n in pipe.notes() if not n.startswith("note: heatmaps skipped")] + (
            [dicom_out.summary()] if dicom_out is not None else []):
        print(line, file=sys.stderr)
    if args.out:
        print(f"wrote {summary.total} records to {args.out}"
              + (f" (after the {len(carried)} kept by --resume)" if carried else ""), file=sys.stderr)
    return EXIT_SOME_FAILED if summary.failures else 0


def _write_heatmap(pipe: Any, rec: dict[str, Any], out_dir: Path) -> None:
    """The overlay PNG of a record the pipeline computed a map for (an output: it only renders the record)."""
    if rec.get("heat") is None:
        rec["heatmap"] = None
        if rec.get("heatmap_error") is None and rec.get("label") != "not_a_frontal_cxr":
            rec["heatmap_error"] = "no map was computed for this input"
        return
    try:
        rec["heatmap"] = str(pipe.heatmapper.write_overlay(rec, out_dir))
    except Exception as err:  # a heatmap failure must not lose the prediction
        rec["heatmap"] = None
        rec["heatmap_error"] = f"{type(err).__name__}: {err}"


def _predict_ray(args: argparse.Namespace) -> int:
    from covidcxr.cli import UserError
    from covidcxr.predict import PredictorError, collect_inputs

    if not args.out:
        raise UserError("--engine ray needs --out FOLDER (the result shards go there)")
    unsupported = [o for o, v in (("--heatmap", args.heatmap), ("--dicom-out", args.dicom_out)) if v]
    if unsupported:
        raise UserError(f"--engine ray writes record shards only; {', '.join(unsupported)} needs the local engine")
    files = collect_inputs(args.paths)
    if not files:
        raise UserError(f"no images found in {' '.join(args.paths)} (looked for PNG, JPEG, TIFF, BMP and DICOM files)")
    if any(Path(f).resolve() == Path(args.out).resolve() for f in args.paths):
        raise UserError(f"--out {args.out} is also an input; choose another folder")
    from covidcxr.predict.distributed import RayConfig, RayEngineError, predict_ray, read_records, shutdown

    config = RayConfig(address=args.address, workers=max(1, args.workers), threads=args.threads or 1,
                       num_gpus=args.gpus_per_worker, batch_size=args.batch_size, fmt=args.format,
                       shard_size=args.shard_size, resume=args.resume, pipeline=_config(args))
    try:
        run = predict_ray(args.paths, args.model, args.out, config, files=files)
    except (RayEngineError, PredictorError) as err:
        raise UserError(str(err)) from None
    finally:
        shutdown()
    failed = sum(1 for r in read_records(args.out) if r.get("error"))
    print(f"ray: {run.total} inputs, {run.skipped_done} already had records, {run.written} predicted now "
          f"({run.failed} failed) in {run.seconds:.1f} s with {run.workers} workers; {len(run.shards)} new shards in "
          f"{args.out}" + (f"; {run.duplicates_dropped} duplicate records from retried blocks dropped"
                           if run.duplicates_dropped else ""), file=sys.stderr)
    return EXIT_SOME_FAILED if failed else 0
