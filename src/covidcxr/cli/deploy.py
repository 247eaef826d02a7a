"""covidcxr predict | export | serve."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from covidcxr.cli import float_between, int_at_least

EXIT_SOME_FAILED = 2


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="batch prediction over files, folders and manifests (JSONL/CSV)",
        description="Predict every image in PATH... (PNG/JPEG/TIFF/DICOM files, folders searched recursively, "
        "or manifest CSVs). One record per input; unreadable inputs become records with an 'error' field. "
        "Exit status 0 when every input was predicted, 2 when some failed. Research use only.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="image file, folder or manifest CSV")
    p.add_argument("--model", required=True, metavar="CKPT_OR_ONNX", help="covidcxr checkpoint or exported ONNX file")
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
    p.add_argument("--severity", metavar="SEV_CKPT", help="severity checkpoint; scores images predicted COVID-19")
    p.add_argument("--always-severity", action="store_true",
                   help="score severity for every image, not only those above the COVID-19 threshold")
    p.add_argument("--dicom-out", metavar="DIR", help="for each DICOM input, write a DICOM SR and a secondary capture "
                   "with the heatmap into DIR, as `covidcxr dicom listen` sends them (covidcxr.dicom)")
    p.add_argument("--no-plausibility", action="store_true",
                   help="skip the check that each input is a frontal chest X-ray (lung U-Net); records say 'unchecked'")
    p.add_argument("--label-implausible", action="store_true",
                   help="give a disease label even to inputs flagged not_a_frontal_cxr (default: they are labelled "
                   "not_a_frontal_cxr)")
    r = p.add_argument_group("distributed", "--engine ray runs the same predictor on Ray Data: CPU tasks decode, an "
                             "actor pool (--workers actors, --threads each) predicts, and --out is a FOLDER of "
                             "part-NNNNN.jsonl/.parquet shards, one record per input; --resume skips inputs that "
                             "have a record (needs the extra: pip install 'covidcxr[ray]')")
    r.add_argument("--engine", choices=["local", "ray"], default="local", help="default: local (one process)")
    r.add_argument("--address", metavar="auto|ray://HOST:PORT", help="Ray cluster to join (default: a local one)")
    r.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl", help="shard format with --engine ray")
    r.add_argument("--shard-size", type=int_at_least(1), default=1000, help="records per shard (default: 1000)")
    r.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per predictor actor (default: 0)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)

    e = sub.add_parser(
        "export",
        help="export a checkpoint to ONNX (preset in the metadata) and check parity on real images",
        description="Export to ONNX with a dynamic batch axis; the preprocessing preset, classes, threshold and "
        "temperature go into the metadata. The command then compares onnxruntime with PyTorch on real images "
        "(default: 16 images of the shared dev set) and fails (exit 1) when any probability differs by more "
        "than --atol.",
    )
    e.add_argument("--model", required=True, metavar="CKPT")
    e.add_argument("--onnx", required=True, metavar="OUT.onnx")
    e.add_argument("--parity-images", nargs="+", metavar="PATH", help="files, folders or a manifest for the parity check")
    e.add_argument("--parity-count", type=int, default=16, help="images used for the parity check (default: 16)")
    e.add_argument("--atol", type=float, default=1e-4, help="largest allowed probability difference (default: 1e-4)")
    e.add_argument("--opset", type=int, default=18)
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

    s = sub.add_parser(
        "serve",
        help="REST service and web page (FastAPI + uvicorn)",
        description="Serve POST /v1/predict (multipart field 'file'), GET /v1/model, GET /healthz, the OpenAPI "
        "document at /openapi.json (Swagger UI at /docs when no key is set) and a web page at /. Concurrent requests "
        "are decoded in --decode-workers threads and answered in micro-batches of up to --max-batch images formed "
        "within --max-wait-ms. Set COVIDCXR_API_KEY or --api-key-file to require an X-API-Key header on /v1/* and "
        "/openapi.json. Research use only.",
    )
    s.add_argument("--model", required=True, metavar="CKPT_OR_ONNX")
    s.add_argument("--backend", choices=["torch", "onnx"], default=None)
    s.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-upload-mb", type=float_between(0, low_open=True), default=20.0, help="larger uploads get 413 (default: 20)")
    s.add_argument("--max-batch", type=int_at_least(1), default=8,
                   help="largest micro-batch; 1 turns batching off (default: %(default)s, measured)")
    s.add_argument("--max-wait-ms", type=float_between(0, 10000), default=10.0,
                   help="longest wait for a batch to fill, from its oldest request (default: %(default)s, measured)")
    s.add_argument("--decode-workers", type=int_at_least(1), default=2,
                   help="threads that decode and preprocess uploads when batching (default: %(default)s)")
    s.add_argument("--max-concurrency", type=int_at_least(1), default=2,
                   help="inferences running at once without batching (--max-batch 1) (default: 2)")
    s.add_argument("--queue", type=int_at_least(0), default=8,
                   help="requests allowed to wait beyond the running batch (or slots); more get 503 (default: 8)")
    s.add_argument("--api-key-file", metavar="FILE", help="read the API key from FILE (first line) instead of "
                   "COVIDCXR_API_KEY")
    s.add_argument("--queue-timeout", type=float, default=30.0, help="seconds a request may wait before 503")
    s.add_argument("--threads", type=int, default=None, help="intra-op threads per inference")
    s.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow this browser origin (repeatable); CORS is closed by default")
    s.add_argument("--severity", metavar="SEV_CKPT", help="severity checkpoint")
    s.add_argument("--always-severity", action="store_true")
    s.add_argument("--no-plausibility", action="store_true",
                   help="skip the check that each upload is a frontal chest X-ray (lung U-Net)")
    s.add_argument("--label-implausible", action="store_true",
                   help="give a disease label even to uploads flagged not_a_frontal_cxr")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(func=cmd_serve)


# --------------------------------------------------------------------------- predict


def cmd_predict(args: argparse.Namespace) -> int:
    from covidcxr.cli import UserError

    if getattr(args, "engine", "local") == "ray":
        return _predict_ray(args)
    from covidcxr.predict import Predictor, PredictorError, RecordWriter, Summary, collect_inputs, strip_transient

    try:
        predictor = Predictor.from_path(args.model, backend=args.backend, device=args.device, threads=args.threads)
        predictor.require_classifier("--severity")
    except PredictorError as err:
        raise UserError(str(err)) from None
    if args.threads and predictor.backend_name == "torch":  # ONNX sessions take threads at load; no torch import
        from covidcxr.predict.backend_torch import set_threads

        set_threads(args.threads)
    files = collect_inputs(args.paths)
    if not files:
        raise UserError(f"no images found in {' '.join(args.paths)} (looked for PNG, JPEG, TIFF, BMP and DICOM files)")
    from covidcxr.predict.output import OutputError, SafeRecordWriter, check_output_path, read_done

    carried: list = []
    try:
        if args.resume and not args.out:
            raise OutputError("--resume needs --out (the file to continue)")
        if args.out:
            check_output_path(args.out, args.paths, files)
        if args.resume:
            carried, done = read_done(args.out, predictor.classes)
            total_inputs = len(files)
            files = [f for f in files if f not in done]
            print(f"--resume: {len(carried)} of {total_inputs} inputs already have a record in {args.out}; "
                  f"{len(files)} to go", file=sys.stderr)
    except OutputError as err:
        raise UserError(str(err)) from None

    extras = _Extras.build(args, predictor)
    from covidcxr.predict.plausible import PlausibilityGate

    gate = PlausibilityGate.for_predictor(predictor, enabled=not args.no_plausibility,
                                          label_implausible=args.label_implausible)
    dicom_out = None
    if args.dicom_out:  # SR + secondary capture per DICOM input (F: covidcxr.dicom)
        from covidcxr.cli.dicom import dicom_writer

        dicom_out = dicom_writer(args.dicom_out, predictor)
    writer = SafeRecordWriter(args.out, predictor.classes, carried) if args.out else RecordWriter(None, predictor.classes)
    summary = Summary()
    complete = False
    try:
        for rec in predictor.predict_paths(
            args.paths,
            files=files,
            batch_size=args.batch_size,
            num_workers=args.workers,
            progress=not args.quiet,
            with_tensors=extras.needs_tensors,
            extra_presets={**extras.presets, **gate.extra_presets()},
        ):
            gate.apply(rec)  # before extras: an implausible input gets no severity score
            extras.apply(rec)
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
    for line in summary.lines() + extras.notes + gate.notes() + ([dicom_out.summary()] if dicom_out is not None else []):
        print(line, file=sys.stderr)
    if args.out:
        print(f"wrote {summary.total} records to {args.out}"
              + (f" (after the {len(carried)} kept by --resume)" if carried else ""), file=sys.stderr)
    return EXIT_SOME_FAILED if summary.failures else 0


class _Extras:
    """Optional per-record work: Grad-CAM overlays and severity. Degrades with a note, never fails the run."""

    def __init__(self, threshold: float | None) -> None:
        self.threshold = threshold
        self.heatmap_dir: Path | None = None
        self.heatmapper = None
        self.severity = None
        self.always_severity = False
        self.notes: list[str] = []

    @property
    def needs_tensors(self) -> bool:
        return self.heatmapper is not None

    @property
    def presets(self) -> dict[str, Any]:
        out = {"severity": self.severity.preset} if self.severity is not None else {}
        if self.heatmapper is not None:
            out["display"] = self.heatmapper.display_preset()
        return out

    @classmethod
    def build(cls, args: argparse.Namespace, predictor: Any) -> "_Extras":
        from covidcxr.cli import UserError
        from covidcxr.predict import HeatmapUnavailable, Heatmapper, SeverityScorer, SeverityUnavailable

        ex = cls(predictor.threshold)
        if args.heatmap:
            try:
                ex.heatmapper = Heatmapper.for_predictor(predictor)
                ex.heatmap_dir = Path(args.heatmap)
                ex.heatmap_dir.mkdir(parents=True, exist_ok=True)
            except HeatmapUnavailable as err:
                msg = f"note: --heatmap skipped: {err}"
                print(msg, file=sys.stderr)
                ex.notes.append(msg)
        if args.severity:
            try:
                ex.severity = SeverityScorer.from_path(args.severity, device=args.device)
            except SeverityUnavailable as err:
                raise UserError(str(err)) from None
            except Exception as err:  # SeverityError / CheckpointError name the file already
                raise UserError(f"--severity {args.severity}: {err}") from None
            ex.always_severity = args.always_severity
        return ex

    def apply(self, rec: dict[str, Any]) -> None:
        if rec.get("error") or rec.get("label") == "not_a_frontal_cxr":
            return
        if self.severity is not None:
            wanted = self.severity.should_score(rec, self.threshold, always=self.always_severity)
            rec["severity"] = self.severity.score_tensor(rec["tensors"]["severity"]) if wanted else None
        if self.heatmapper is not None and rec.get("tensor") is not None:
            try:
                rec["heatmap"] = str(self.heatmapper.write_overlay(rec, self.heatmap_dir))
            except Exception as err:  # a heatmap failure must not lose the prediction
                rec["heatmap"] = None
                rec["heatmap_error"] = f"{type(err).__name__}: {err}"


def _predict_ray(args: argparse.Namespace) -> int:
    from covidcxr.cli import UserError
    from covidcxr.predict import PredictorError, collect_inputs

    if not args.out:
        raise UserError("--engine ray needs --out FOLDER (the result shards go there)")
    unsupported = [o for o, v in (("--heatmap", args.heatmap), ("--severity", args.severity),
                                  ("--dicom-out", args.dicom_out)) if v]
    if unsupported:
        raise UserError(f"--engine ray predicts labels only; {', '.join(unsupported)} needs the local engine")
    files = collect_inputs(args.paths)
    if not files:
        raise UserError(f"no images found in {' '.join(args.paths)} (looked for PNG, JPEG, TIFF, BMP and DICOM files)")
    if any(Path(f).resolve() == Path(args.out).resolve() for f in args.paths):
        raise UserError(f"--out {args.out} is also an input; choose another folder")
    from covidcxr.predict.distributed import RayEngineError, predict_ray, read_records, shutdown

    try:
        run = predict_ray(
            args.paths, args.model, args.out, backend=args.backend, address=args.address, workers=max(1, args.workers),
            batch_size=args.batch_size, threads=args.threads or 1, fmt=args.format, shard_size=args.shard_size,
            num_gpus=args.gpus_per_worker, files=files, resume=args.resume,
        )
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


# --------------------------------------------------------------------------- export


def cmd_export(args: argparse.Namespace) -> int:
    from covidcxr.cli import UserError
    from covidcxr.export import ExportError, export_onnx
    from covidcxr.predict import PredictorError

    if args.quantize and not args.calibrate:
        raise UserError("--quantize int8 needs --calibrate MANIFEST (a split manifest; its train split calibrates)")
    if args.calibrate and not args.quantize:
        raise UserError("--calibrate is only used with --quantize int8")
    target = Path(args.onnx)
    fp32_out = target.with_name(target.stem + ".fp32.onnx") if args.quantize else target
    try:
        report = export_onnx(
            args.model,
            fp32_out,
            parity_images=args.parity_images,
            parity_count=args.parity_count,
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
    if args.quantize:
        return _quantize(args, fp32_out, target)
    return 0


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


# --------------------------------------------------------------------------- serve


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from covidcxr.cli import UserError
    from covidcxr.predict import Predictor, PredictorError, SeverityScorer, SeverityUnavailable
    from covidcxr.serve import create_app

    api_key = None
    if args.api_key_file:
        from covidcxr.serve import read_api_key_file

        try:
            api_key = read_api_key_file(args.api_key_file)
        except ValueError as err:
            raise UserError(str(err)) from None
    # load both models here so that a bad file is one line before the server starts, not a traceback
    try:
        predictor = Predictor.from_path(args.model, backend=args.backend, threads=args.threads)
        predictor.require_classifier("--severity")
    except PredictorError as err:
        raise UserError(str(err)) from None
    if args.severity:
        try:
            SeverityScorer.from_path(args.severity)
        except SeverityUnavailable as err:
            raise UserError(str(err)) from None
        except Exception as err:  # SeverityError / CheckpointError name the file already
            raise UserError(f"--severity {args.severity}: {err}") from None
    app = create_app(
        args.model,
        backend=args.backend,
        max_upload_mb=args.max_upload_mb,
        max_concurrency=args.max_concurrency,
        queue=args.queue,
        queue_timeout=args.queue_timeout,
        threads=args.threads,
        cors_origins=args.cors_origin,
        severity_path=args.severity,
        always_severity=args.always_severity,
        predictor=predictor,
        plausibility=not args.no_plausibility,
        label_implausible=args.label_implausible,
        api_key=api_key,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        decode_workers=args.decode_workers,
    )
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}; anyone who can reach it can upload images "
              "(set COVIDCXR_API_KEY or --api-key-file, and put it behind TLS)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
