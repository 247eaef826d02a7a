"""covidcxr dicom listen | status | echo | send."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from covidcxr.cli import add_default_model, add_trust_checkpoint, float_between, int_at_least


def register(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser(
        "dicom",
        help="DICOM node: receive CXRs from a PACS, send SR + secondary capture results back",
        description="A DICOM node (pynetdicom) for a PACS. Research use only; not for diagnosis.",
    )
    dsub = d.add_subparsers(dest="dicom_command", metavar="SUBCOMMAND")
    d.set_defaults(func=lambda args: (d.print_help(), 2)[1])

    lis = dsub.add_parser(
        "listen",
        help="listen for C-STORE of CR/DX/secondary-capture CXRs; C-STORE results to --forward",
        description="Answer C-ECHO and C-STORE (CR, DX for presentation/processing, secondary capture; every "
        "transfer syntax this installation decodes, compressed ones included). Each new image is predicted with "
        "the checkpoint's operating point (plus severity with --severity and the plausibility check); a highdicom "
        "SR and a secondary capture with the heatmap go to --forward, in the image's study, in new series. "
        "Results are kept in --store until the destination accepts them; duplicates (same SOP Instance UID) are "
        "answered but not processed again. Ctrl-C / SIGTERM drains in-flight work. Logs carry instance keys "
        "(hashes), never UIDs or patient attributes.",
    )
    add_trust_checkpoint(lis)
    add_default_model(lis)
    lis.add_argument("--backend", choices=["torch", "onnx"], default=None)
    lis.add_argument("--ae-title", default="COVIDCXR", help="this node's AE title (default: %(default)s)")
    lis.add_argument("--host", default="0.0.0.0", help="bind address (default: %(default)s)")
    lis.add_argument("--port", type=_port, default=11112, help="DICOM port; 0 picks a free one (default: %(default)s)")
    lis.add_argument("--forward", required=True, metavar="AE@HOST:PORT",
                     help="destination for the results (the PACS), e.g. ORTHANC@127.0.0.1:4242")
    lis.add_argument("--allow", action="append", default=[], metavar="AE[@HOST]",
                     help="a peer allowed to send (repeatable; AE '*' = any title). Default: only the --forward "
                     "AE title from the --forward host")
    lis.add_argument("--allow-any", action="store_true", help="accept associations from any peer")
    lis.add_argument("--severity", metavar="SEV_CKPT",
                     help="severity checkpoint, or 'reference' (the shipped one); scores images above the threshold")
    lis.add_argument("--always-severity", action="store_true", help="score severity for every image")
    lis.add_argument("--no-plausibility", action="store_true",
                     help="skip the input plausibility check (lung U-Net): every image gets a disease label")
    lis.add_argument("--label-implausible", action="store_true",
                     help="an image that fails the plausibility check keeps its disease label (still flagged in the SR)")
    lis.add_argument("--store", default="covidcxr-dicom-store", metavar="DIR",
                     help="where received images and unsent results wait (default: ./%(default)s)")
    lis.add_argument("--keep-sent", action="store_true", help="keep delivered results in STORE/sent/")
    lis.add_argument("--workers", type=int_at_least(1), default=1, help="analysis threads (default: 1)")
    lis.add_argument("--threads", type=int_at_least(1), default=None, help="intra-op threads for inference")
    lis.add_argument("--max-pending", type=int_at_least(1), default=500,
                     help="images waiting for analysis or delivery before new ones get 'out of resources' "
                     "(0xA700) (default: %(default)s)")
    lis.add_argument("--retry-max-s", type=float_between(0, low_open=True), default=60.0,
                     help="longest wait between delivery attempts while the destination is down (default: 60)")
    lis.add_argument("--max-attempts", type=int_at_least(1), default=5,
                     help="failure statuses from --forward for one result before it goes to STORE/dead-letter/ "
                     "(default: %(default)s); an unreachable destination is retried without limit")
    lis.add_argument("--max-associations", type=int_at_least(1), default=8)
    lis.set_defaults(func=cmd_listen)

    st = dsub.add_parser("status", help="what a node's store holds: waiting, delivered, dead letters with reasons",
                         description="Counts of STORE/incoming (acknowledged, not yet analysed), outbox (built, not "
                         "yet accepted by the destination), sent (with --keep-sent) and dead-letter, and one line "
                         "per dead letter with its reason. Reads the folder only; works while the node runs.")
    st.add_argument("--store", default="covidcxr-dicom-store", metavar="DIR",
                    help="the node's --store folder (default: ./%(default)s)")
    st.set_defaults(func=cmd_status)

    echo = dsub.add_parser("echo", help="C-ECHO a DICOM node (check that it is reachable)")
    echo.add_argument("peer", metavar="AE@HOST:PORT")
    echo.add_argument("--ae-title", default="COVIDCXR-SCU", help="calling AE title (default: %(default)s)")
    echo.set_defaults(func=cmd_echo)

    send = dsub.add_parser("send", help="C-STORE DICOM files to a node (e.g. to test `dicom listen`)")
    send.add_argument("peer", metavar="AE@HOST:PORT")
    send.add_argument("files", nargs="+", metavar="FILE")
    send.add_argument("--ae-title", default="COVIDCXR-SCU", help="calling AE title (default: %(default)s)")
    send.set_defaults(func=cmd_send)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is outside 0-65535")
    return value


def dicom_writer(out_dir: str, predictor: object):
    """The ``predict --dicom-out`` writer: SR + secondary capture per DICOM input (record's own label/severity)."""
    from covidcxr.dicom.analysis import Engine
    from covidcxr.dicom.results import DicomResultWriter

    # the records carry predict's own plausibility verdict and severity: the engine does not redo them
    return DicomResultWriter(out_dir, Engine(predictor, plausibility=False))  # type: ignore[arg-type]


def _peer(text: str):
    from covidcxr.cli import UserError
    from covidcxr.dicom.common import DicomNodeError, parse_peer

    try:
        return parse_peer(text)
    except DicomNodeError as err:
        raise UserError(str(err)) from None


def cmd_listen(args: argparse.Namespace) -> int:
    import signal
    import threading

    from covidcxr.cli import UserError
    from covidcxr.dicom.common import AllowRule, DicomNodeError, check_ae_title
    from covidcxr.dicom.node import DicomNode, NodeConfig
    from covidcxr.predict import PredictorError, SeverityUnavailable
    from covidcxr.reference_models import model_or_default

    args.model = model_or_default(args.model)  # no --model: the reference classifier, said in one line
    try:
        config = NodeConfig(
            model=args.model, destination=_peer(args.forward), ae_title=check_ae_title(args.ae_title),
            host=args.host, port=args.port, store=args.store, severity=args.severity,
            always_severity=args.always_severity, backend=args.backend, threads=args.threads,
            plausibility=not args.no_plausibility, label_implausible=args.label_implausible,
            allow=[AllowRule.parse(a) for a in args.allow], allow_any=args.allow_any, workers=args.workers,
            max_pending=args.max_pending, retry_max_s=args.retry_max_s, keep_sent=args.keep_sent,
            max_associations=args.max_associations, max_attempts=args.max_attempts,
        )
        node = DicomNode(config)
    except (DicomNodeError, PredictorError, SeverityUnavailable) as err:
        raise UserError(str(err)) from None
    if args.threads and node.engine.predictor.backend_name == "torch":
        # only a torch model needs torch's thread count (ONNX sessions got it at load); set before the port opens
        from covidcxr.predict.backend_torch import set_threads

        set_threads(args.threads)
    stop = threading.Event()
    signals = 0

    def on_signal(signum: int, frame: object) -> None:
        nonlocal signals
        signals += 1
        if signals > 1:  # a second Ctrl-C: leave now; acknowledged work is on disk for the next start
            print("covidcxr dicom: stopping without draining", file=sys.stderr, flush=True)
            raise SystemExit(130)
        print(f"covidcxr dicom: {signal.Signals(signum).name}: draining in-flight work (again to stop at once)",
              file=sys.stderr, flush=True)
        stop.set()

    # the handlers go in before the port opens: a SIGTERM as soon as the node answers must drain, not kill
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            node.start()
        except DicomNodeError as err:
            raise UserError(str(err)) from None
        print(f"covidcxr dicom: {config.ae_title} listening on {config.host}:{node.port}, results to "
              f"{config.destination}, store {Path(config.store).resolve()}. Research use only. Ctrl-C stops "
              "(after in-flight work).", file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            pass
        left = node.stop()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    print(f"covidcxr dicom: stopped; {node.stats.analysed} images analysed, {node.sender.sent} results sent"
          + (f", {left} results wait in {Path(config.store) / 'outbox'} for the next start" if left else ""),
          file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from covidcxr.cli import UserError
    from covidcxr.dicom.store import ResultStore, age_text

    root = Path(args.store)
    if not (root / "incoming").is_dir() or not (root / "outbox").is_dir():
        raise UserError(f"{root}: not a covidcxr DICOM node store (no incoming/ and outbox/ folders)")
    store = ResultStore(root, read_only=True)
    counts = store.summary()
    print(f"{root}: {counts['incoming']} incoming (not yet analysed), {counts['outbox']} in the outbox (not yet "
          f"delivered), {counts['sent']} kept in sent/, {counts['dead_letter']} dead letters")
    for d in store.dead_letters():
        print(f"dead letter {d.key} ({age_text(d.when)}; {', '.join(d.files) or 'no files'}): {d.reason}")
    return 0


def cmd_echo(args: argparse.Namespace) -> int:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    peer = _peer(args.peer)
    ae = AE(ae_title=args.ae_title)
    ae.add_requested_context(Verification)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        print(f"covidcxr dicom echo: no association with {peer} (not listening, or it refused "
              f"calling AE {args.ae_title!r})", file=sys.stderr)
        return 1
    status = assoc.send_c_echo()
    assoc.release()
    code = int(status.Status) if "Status" in status else None
    print(f"C-ECHO {peer}: " + ("success" if code == 0 else f"status {code}"))
    return 0 if code == 0 else 1


def cmd_send(args: argparse.Namespace) -> int:
    import pydicom
    from pynetdicom import AE

    from covidcxr.cli import UserError
    from covidcxr.dicom.common import quiet_dicom_libraries
    from covidcxr.dicom.sender import describe_status, is_stored

    quiet_dicom_libraries()
    peer = _peer(args.peer)
    headers = []
    for f in args.files:
        try:
            headers.append((f, pydicom.dcmread(f, stop_before_pixels=True)))
        except Exception as err:
            raise UserError(f"{f}: not a readable DICOM file ({type(err).__name__})") from None
    ae = AE(ae_title=args.ae_title)
    # one presentation context per (SOP class, transfer syntax): the acceptor picks one syntax per context
    for sop, ts in sorted({(str(h.SOPClassUID), str(h.file_meta.TransferSyntaxUID)) for _, h in headers}):
        ae.add_requested_context(sop, ts)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        raise UserError(f"no association with {peer} (not listening, or it refused calling AE {args.ae_title!r})")
    failed = 0
    try:
        for f, _ in headers:
            try:
                status = assoc.send_c_store(Path(f))
            except (ValueError, AttributeError) as err:  # no accepted context for this file's class/syntax
                failed += 1
                print(f"{f}: not sent ({str(err).splitlines()[0]})")
                continue
            code = int(status.Status) if "Status" in status else None
            comment = str(status.get("ErrorComment", "") or "")
            ok = is_stored(code)  # the sender's rule: success, or success with a warning (0x0001, 0x0107, ...)
            failed += not ok
            print(f"{f}: " + ("stored" if code == 0 else f"stored, warning {describe_status(code)} {comment}".rstrip()
                              if ok else f"status {describe_status(code)} {comment}".rstrip()))
    finally:
        assoc.release()
    return 0 if not failed else 2
