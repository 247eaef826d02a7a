"""The ``covidcxr`` command line: parses arguments and calls the library.

Each area registers its sub-commands from its own module; heavy imports happen
inside the command functions so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules that define register(subparsers). Order sets the order in --help.
_AREAS = ["data", "models", "weights", "train", "explain", "severity", "site", "predict", "export", "serve", "dicom", "federated"]


class UserError(Exception):
    """An error caused by the user's input: printed as one line, no traceback."""


def add_trust_checkpoint(parser: argparse.ArgumentParser) -> None:
    """``--trust-checkpoint`` for every command that loads model files (one definition, one meaning)."""
    parser.add_argument(
        "--trust-checkpoint", action="store_true",
        help="also load model files that hold pickled Python objects (loading them can run code: only for files "
             "you trust); by default only weights and plain data are read and such a file is refused")


def add_default_model(parser: argparse.ArgumentParser, what: str = "covidcxr checkpoint, ONNX file") -> None:
    """``--model`` for the commands that fall back to the shipped reference classifier (one wording everywhere)."""
    parser.add_argument(
        "--model", default=None, metavar="CKPT_OR_ONNX" if "ONNX" in what else "CKPT",
        help=f"{what}, or 'reference' (default: the shipped reference classifier, announced in one line)")


def int_at_least(low: int):
    """An argparse type: an integer >= ``low`` (0 epochs or batch size 0 otherwise fail deep inside)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below the minimum {low}")
        return value

    parse.__name__ = f"int>={low}"
    return parse


def float_between(low: float, high: float = float("inf"), *, low_open: bool = False):
    """An argparse type: a number in [low, high] (or (low, high] with ``low_open``).

    A threshold of 1.5 or an upload limit of 0 would otherwise be accepted and silently misbehave.
    """

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value != value:  # nan compares false with every bound
            raise argparse.ArgumentTypeError(f"{text!r} is not a number")
        if value > high or value < low or (low_open and value == low):
            if high == float("inf"):
                raise argparse.ArgumentTypeError(f"{text} must be above {low:g}" if low_open else f"{text} is below {low:g}")
            raise argparse.ArgumentTypeError(f"{text} is outside [{low:g}, {high:g}]")
        return value

    parse.__name__ = "number"
    return parse


def _known_errors() -> tuple[type[BaseException], ...]:
    from covidcxr.io import CXRReadError
    from covidcxr.models.checkpoint import CheckpointError
    from covidcxr.preprocess import PresetError

    errs: list[type[BaseException]] = [UserError, CXRReadError, CheckpointError, PresetError, FileNotFoundError]
    try:
        from covidcxr.data.manifest import ManifestError

        errs.append(ManifestError)
    except ImportError:
        pass
    try:
        from covidcxr.models.registry import ModelError  # unknown model name, bad model argument
        from covidcxr.models.weights import WeightsError

        errs.extend([WeightsError, ModelError])
    except ImportError:
        pass
    return tuple(errs)


def build_parser() -> argparse.ArgumentParser:
    from covidcxr import __version__

    parser = argparse.ArgumentParser(
        prog="covidcxr",
        description="COVID-19 chest X-ray screening and severity toolkit. For research use only; not for clinical use.",
    )
    parser.add_argument("--version", action="version", version=f"covidcxr {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for area in _AREAS:
        try:
            mod = importlib.import_module(f"covidcxr.cli.{area}")
        except ModuleNotFoundError as err:
            if err.name == f"covidcxr.cli.{area}":
                continue
            raise
        mod.register(sub)
    return parser


#: third-party log lines that say nothing about this run (shown with --verbose)
_NOISE_PREFIXES = ("💡 Tip", "GPU available", "TPU available", "HPU available", "IPU available")
#: third-party warnings that are noise on a fresh, correct run (a regex on the message)
_NOISE_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning calling a deprecated torch API
    r"Checkpoint directory .* exists and is not empty",  # our run folder holds config.yaml; train refuses reuse
    r"The number of training batches .* is smaller than the logging interval",
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_NOISE_PREFIXES)


def setup_logging(verbose: bool = False) -> None:
    """One handler, on the root logger: every INFO line once, without Lightning's tips.

    Lightning gives its loggers their own handler when it is imported before logging is configured,
    which printed each of its lines twice (its format and ours); those handlers are removed here.
    """
    import warnings

    root = logging.getLogger()
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    names = {"lightning", "lightning.pytorch", "pytorch_lightning", "lightning_fabric"}
    names |= {n for n in logging.Logger.manager.loggerDict if n.split(".")[0] in names}
    for name in names:
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            lg.removeHandler(h)
        lg.propagate = True
    # lightning/__init__.py adds its own console handler whenever it is imported (later, inside a command):
    # refuse it, so its lines go through the root handler once, with our format and filter
    logging.getLogger("lightning").addHandler = lambda handler: None  # type: ignore[method-assign]
    if not verbose:
        for h in root.handlers:
            if not any(isinstance(f, _DropNoise) for f in h.filters):
                h.addFilter(_DropNoise())
        for pattern in _NOISE_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    import os

    from covidcxr.safeload import TRUST_ENV

    trust_before = os.environ.get(TRUST_ENV)
    if getattr(args, "trust_checkpoint", False):  # an env var, so Ray and worker processes inherit the choice
        os.environ[TRUST_ENV] = "1"
    try:
        rc = args.func(args)
    except _known_errors() as err:
        print(f"covidcxr {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if trust_before is None:
            os.environ.pop(TRUST_ENV, None)
        else:
            os.environ[TRUST_ENV] = trust_before
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
