"""covidcxr serve: the REST service and web page."""

from __future__ import annotations

import argparse
import sys

from covidcxr.cli import add_default_model, add_trust_checkpoint, float_between, int_at_least
from covidcxr.serve.config import ServeConfig  # no FastAPI: the defaults below are ServeConfig's (one source)

_DEFAULTS = ServeConfig()


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "serve",
        help="REST service and web page (FastAPI + uvicorn)",
        description="Serve POST /v1/predict (multipart field 'file'), GET /v1/model, GET /healthz, the OpenAPI "
        "document at /openapi.json (Swagger UI at /docs when no key is set) and a web page at /. Concurrent requests "
        "are decoded in --decode-workers threads and answered in micro-batches of up to --max-batch images formed "
        "within --max-wait-ms. Set COVIDCXR_API_KEY or --api-key-file to require an X-API-Key header on /v1/* and "
        "/openapi.json. Research use only.",
    )
    add_trust_checkpoint(s)
    add_default_model(s)
    s.add_argument("--backend", choices=["torch", "onnx"], default=_DEFAULTS.backend)
    s.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-upload-mb", type=float_between(0, low_open=True), default=_DEFAULTS.max_upload_mb,
                   help="larger uploads get 413 (default: %(default)s)")
    s.add_argument("--max-batch", type=int_at_least(1), default=_DEFAULTS.max_batch,
                   help="largest micro-batch; 1 turns batching off (default: %(default)s, measured)")
    s.add_argument("--max-wait-ms", type=float_between(0, 10000), default=_DEFAULTS.max_wait_ms,
                   help="longest wait for a batch to fill, from its oldest request (default: %(default)s, measured)")
    s.add_argument("--decode-workers", type=int_at_least(1), default=_DEFAULTS.decode_workers,
                   help="threads that decode and preprocess uploads when batching (default: %(default)s)")
    s.add_argument("--max-concurrency", type=int_at_least(1), default=_DEFAULTS.max_concurrency,
                   help="inferences running at once without batching (--max-batch 1) (default: %(default)s)")
    s.add_argument("--queue", type=int_at_least(0), default=_DEFAULTS.queue,
                   help="requests allowed to wait beyond the running batch (or slots); more get 503 "
                   "(default: %(default)s)")
    s.add_argument("--api-key-file", metavar="FILE", help="read the API key from FILE (first line) instead of "
                   "COVIDCXR_API_KEY")
    s.add_argument("--queue-timeout", type=float, default=_DEFAULTS.queue_timeout,
                   help="seconds a request may wait before 503 (default: %(default)s)")
    s.add_argument("--threads", type=int, default=_DEFAULTS.threads, help="intra-op threads per inference")
    s.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow this browser origin (repeatable); CORS is closed by default")
    s.add_argument("--severity", metavar="SEV_CKPT", help="severity checkpoint, or 'reference' (the shipped one)")
    s.add_argument("--always-severity", action="store_true")
    s.add_argument("--no-plausibility", action="store_true",
                   help="skip the check that each upload is a frontal chest X-ray (lung U-Net)")
    s.add_argument("--label-implausible", action="store_true",
                   help="give a disease label even to uploads flagged not_a_frontal_cxr")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(func=cmd_serve)



def serve_config(args: argparse.Namespace, api_key: str | None = None) -> ServeConfig:
    """The :class:`ServeConfig` of these options (``api_key``: read from --api-key-file; None: ServeConfig's rule)."""
    return ServeConfig(
        model=str(args.model) if args.model else None, backend=args.backend, threads=args.threads,
        severity=str(args.severity) if args.severity else None, always_severity=args.always_severity,
        plausibility=not args.no_plausibility, label_implausible=args.label_implausible,
        api_key=api_key, cors_origins=tuple(args.cors_origin or ()),
        max_upload_mb=args.max_upload_mb, max_concurrency=args.max_concurrency, queue=args.queue,
        queue_timeout=args.queue_timeout, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
        decode_workers=args.decode_workers,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from covidcxr.cli import UserError
    from covidcxr.predict import Predictor, PredictorError, SeverityScorer, SeverityUnavailable
    from covidcxr.reference_models import model_or_default
    from covidcxr.serve import create_app

    args.model = model_or_default(args.model)  # no --model: the reference classifier, said in one line

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
    app = create_app(serve_config(args, api_key), predictor=predictor)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}; anyone who can reach it can upload images "
              "(set COVIDCXR_API_KEY or --api-key-file, and put it behind TLS)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
