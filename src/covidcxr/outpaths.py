"""No command overwrites its own input: one check for every command that writes files.

A command names the files it will write (or the folder it writes into) and the files it reads; an output that
is one of the inputs (same path, a symlink or a hard link to it) is refused before anything is written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable


class OverwriteError(ValueError):
    """An output path is also an input of the same command."""


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file: equal once resolved, or the same inode (hard link)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def refuse_overwrite(outputs: Iterable[str | os.PathLike], inputs: Iterable[str | os.PathLike | None],
                     command: str) -> None:
    """Raise :class:`OverwriteError` when any of ``outputs`` is one of the (file) ``inputs``."""
    ins = [Path(i) for i in inputs if i is not None and not Path(i).is_dir()]
    for o in outputs:
        for i in ins:
            if same_file(o, i):
                raise OverwriteError(f"{o}: {command} would write over its input {i}; choose another output")


def refuse_inputs_in(folder: str | os.PathLike, inputs: Iterable[str | os.PathLike], command: str,
                     why: str) -> None:
    """Raise :class:`OverwriteError` when an input file lies directly in the output ``folder``."""
    if not Path(folder).is_dir():
        return
    for i in inputs:
        if Path(i).is_file() and same_file(Path(i).parent, folder):
            raise OverwriteError(f"{folder}: {command} writes into a folder that holds its input {i} ({why}); "
                                 "choose another output folder")


def refuse_inside(folder: str | os.PathLike, searched: Iterable[str | os.PathLike], command: str, why: str) -> None:
    """Raise :class:`OverwriteError` when the output ``folder`` is, or lies under, a folder the command searches
    for inputs (recursively): what it writes there would be read as input by its next run."""
    out = Path(os.path.realpath(folder))
    for d in searched:
        if Path(d).is_dir():
            top = Path(os.path.realpath(d))
            if out == top or top in out.parents:
                raise OverwriteError(f"{folder}: {command} writes inside {d}, a folder it searches for inputs "
                                     f"({why}); choose a folder outside it")
