"""Reading torch files without running pickled code: ``weights_only=True`` everywhere, an explicit opt-in for more.

A ``.ckpt``/``.pt`` file is a pickle; ``torch.load(weights_only=False)`` runs whatever it names, so a model file
from elsewhere could execute code. Every loader of the project goes through :func:`torch_load`, which unpickles
only tensors and plain data (dicts, lists, numbers, strings). A file that needs more is refused with one line
naming the file and the first object it wanted, unless the user trusts it explicitly: ``--trust-checkpoint`` on
the CLI, which sets :data:`TRUST_ENV` for this process and the workers it starts (Ray, worker processes), or
``trust=True`` from Python. Files the project writes load without it (tests/test_hardening_silent.py).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: set to "1" by ``--trust-checkpoint``: files that need more than weights_only=True are then unpickled
TRUST_ENV = "COVIDCXR_TRUST_CHECKPOINT"


class UnsafeFileError(ValueError):
    """The file holds pickled Python objects beyond tensors and plain data, and it is not trusted."""


def trusted() -> bool:
    """Whether the user passed ``--trust-checkpoint`` (or set :data:`TRUST_ENV`) for this process."""
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes")


def _what(err: BaseException) -> str:
    """The object the restricted unpickler refused, from torch's long message (one short phrase)."""
    text = str(err)
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if m:
        return f"it needs {m.group(1)}"
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(err).__name__)
    return first[:160]


def _broken(err: BaseException) -> str:
    """The restricted unpickler's own reason (e.g. 'Unsupported operand 103'), without torch's long preamble."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if ln.endswith("WeightsUnpickler error:") and i + 1 < len(lines):
            return lines[i + 1][:160]
    return (lines[0] if lines else type(err).__name__)[:160]


def torch_load(path: str | os.PathLike, *, trust: bool | None = None) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``; a file that needs more raises
    :class:`UnsafeFileError`, or, when trusted (``trust``, else :func:`trusted`), is loaded in full with a warning.
    """
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):  # not a refused object: a broken file, the caller's error
            raise pickle.UnpicklingError(f"not a readable torch file ({_broken(err)})") from None
        why = _what(err)
        if trust if trust is not None else trusted():
            log.warning("%s: holds pickled Python objects (%s); loading it in full as trusted (--trust-checkpoint)",
                        path, why)
            return torch.load(path, map_location="cpu", weights_only=False)
        raise UnsafeFileError(
            f"{Path(path)}: refused: the file holds pickled Python objects, not only weights ({why}); "
            "loading it could run code: pass --trust-checkpoint only if you trust where it came from"
        ) from None


def load_or_raise(path: str | os.PathLike, error: type[Exception], what: str = "checkpoint") -> Any:
    """:func:`torch_load`, with every failure as one ``error`` line naming the file: refused pickled objects
    (the :class:`UnsafeFileError` message), or a file torch cannot read ("PATH: cannot read WHAT (...)")."""
    try:
        return torch_load(path)  # weights_only=True unless the user passed --trust-checkpoint
    except UnsafeFileError as err:
        raise error(str(err)) from None
    except Exception as err:
        raise error(f"{path}: cannot read {what} ({type(err).__name__}: {err})") from None
