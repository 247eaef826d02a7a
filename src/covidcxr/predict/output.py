"""``predict --out`` that never loses a file: a temporary file renamed into place, no output that is
also an input, ``--resume``, and an interrupted run that leaves a valid file and says how far it got.

* Records go to a temporary file beside ``--out``; only a finished run (or an interrupted one that
  loses nothing, see :meth:`SafeRecordWriter.finish`) renames it onto ``--out``. The output file is
  therefore never truncated before the run has produced its replacement.
* An output path that is one of the inputs (a manifest CSV, an image) is refused before anything is read.
* ``--resume`` keeps every successful record of an existing ``--out``, skips those inputs and appends the
  rest (failed inputs are tried again). Inputs are compared by resolved path, and a file written by
  another model (its records' ``model.sha256``) is refused: one output never mixes two models.
"""

from __future__ import annotations

import csv
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

from covidcxr.outpaths import same_file
from covidcxr.predict.writers import RecordWriter, output_format


class OutputError(ValueError):
    """``--out`` cannot be used as given (it is an input, or a file --resume cannot continue)."""


def check_output_path(out: str | os.PathLike, inputs: Iterable[str | os.PathLike],
                      files: Iterable[str | os.PathLike] = ()) -> None:
    """Refuse an output path that is also an input: a manifest or image given, or an image found in a folder."""
    o = Path(out)
    for src in [*inputs, *files]:
        s = Path(src)
        if s.is_dir():
            continue
        if same_file(o, s):
            raise OutputError(f"--out {out} is also an input ({src}); writing it would destroy the input. "
                              "Choose another output file")


def resolved(path: str | os.PathLike) -> str:
    """The path ``--resume`` compares: absolute, symlinks resolved (a folder given as ``scans/`` and as
    ``/data/scans/`` is one folder)."""
    return os.path.realpath(os.fspath(path))


def _check_model(out: str | os.PathLike, found: str | None, model_sha256: str | None, where: str) -> None:
    if model_sha256 is None or found == model_sha256:
        return
    if not found:
        raise OutputError(f"--resume: {out} {where} does not name the model that wrote it (written by an older "
                          "covidcxr); it cannot be continued with this model. Choose another --out")
    raise OutputError(f"--resume: {out} was written by another model (sha256 {found[:12]}, this one is "
                      f"{model_sha256[:12]}); one output file never mixes two models. Choose another --out")


def leftovers(out: str | os.PathLike) -> list[Path]:
    """Records of interrupted runs on ``out``: the temporary file a killed run (SIGTERM, SIGKILL, power loss)
    left beside it, and ``<out>.partial<suffix>`` of a run interrupted without ``--resume``; oldest first.
    Only this output's names count (``.preds.<8 random>.partial.jsonl``, as :class:`SafeRecordWriter` makes
    them, not ``preds.site2``'s), and a file a running writer still holds locked is left alone."""
    o = Path(out)
    own = re.compile(rf"\.{re.escape(o.stem)}\.[a-z0-9_]{{8}}\.partial{re.escape(o.suffix)}")
    found = [f for f in o.parent.iterdir() if own.fullmatch(f.name)] if o.parent.is_dir() else []
    found.append(o.with_name(f"{o.stem}.partial{o.suffix}"))
    return sorted((f for f in found if f.is_file() and f.stat().st_size > 0 and not _locked(f)),
                  key=lambda f: f.stat().st_mtime)


def _locked(path: Path) -> bool:
    """Whether a running :class:`SafeRecordWriter` holds ``path`` (its flock): that run is not interrupted."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock to ask
        return False
    try:
        with open(path, "rb") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    except OSError:
        return True
    return False


def read_done(out: str | os.PathLike, classes: Sequence[str], model_sha256: str | None = None,
              interrupted: Sequence[Path] = ()) -> tuple[list[dict[str, Any]], set[str]]:
    """The successful records of an earlier ``--out`` (for ``--resume``) and their resolved input paths, with
    those of the ``interrupted`` runs' files on it (:func:`leftovers`), each input once (``--out`` first).

    A JSON-lines file may end in a partial line (a run killed mid-write): it is ignored.
    A CSV written for other classes cannot be continued and is an :class:`OutputError`; so is a file
    any of whose records was made by a model other than ``model_sha256`` (when given).
    """
    keep: list[dict[str, Any]] = []
    done: set[str] = set()
    for f in [Path(out), *interrupted]:
        if not f.is_file() or f.stat().st_size == 0:
            continue
        for rec in _records(f, out, classes, model_sha256):
            key = resolved(rec["path"])
            if key not in done:
                done.add(key)
                keep.append(rec)
    return keep, done


def _records(p: Path, out: str | os.PathLike, classes: Sequence[str], model_sha256: str | None
             ) -> list[dict[str, Any]]:
    name = str(out) if p == Path(out) else f"{out} (interrupted run: {p.name})"
    try:
        if output_format(str(out)) == "csv":
            with open(p, newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh)
                want = {f"p_{c}" for c in classes}
                if reader.fieldnames is None or "path" not in reader.fieldnames or not want <= set(reader.fieldnames):
                    raise OutputError(f"--resume: {name} was not written by covidcxr predict for this model's "
                                      f"classes ({', '.join(classes)}); choose another --out")
                all_rows = [r for r in reader if r.get("path")]
            for n, r in enumerate(all_rows, 2):
                _check_model(name, r.get("model_sha256"), model_sha256, f"row {n}")
            return [r for r in all_rows if not r.get("error")]
        keep = []
        with open(p, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a hard kill
                if not isinstance(rec, dict) or "path" not in rec:
                    raise OutputError(f"--resume: {name} line {n} is not a covidcxr predict record; "
                                      "choose another --out")
                model = rec.get("model") if isinstance(rec.get("model"), dict) else {}
                _check_model(name, model.get("sha256"), model_sha256, f"line {n}")
                if not rec.get("error"):
                    keep.append(rec)
        return keep
    except UnicodeDecodeError:
        raise OutputError(f"--resume: {name} is not UTF-8 text (re-saved by another program?); it cannot be "
                          "continued. Choose another --out") from None


class SafeRecordWriter(RecordWriter):
    """A :class:`RecordWriter` on a temporary file beside ``out``, renamed into place by :meth:`finish`."""

    def __init__(self, out: str, classes: Sequence[str], carried: Sequence[dict[str, Any]] = (),
                 consumed: Sequence[Path] = ()):
        self.consumed = list(consumed)  # interrupted runs' files whose records ``carried`` holds
        self.final = Path(out)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.existed = self.final.exists()
        # the temporary name keeps the real suffix, which picks the format (CSV or JSON lines)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.final.stem}.", suffix=f".partial{self.final.suffix}",
                                   dir=self.final.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        super().__init__(tmp, classes)
        try:  # held while this run writes, so --resume of another process never takes (or deletes) its file
            import fcntl

            fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (ImportError, OSError, AttributeError):
            pass
        self.carried = len(carried)
        self.written = 0
        for rec in carried:
            self._write_carried(rec)

    def _write_carried(self, rec: dict[str, Any]) -> None:
        if self.csv is not None:  # CSV rows come back as the strings they were written as
            self.csv.writerow(rec)
            self.fh.flush()
        else:
            super().write(rec)

    def write(self, rec: dict[str, Any]) -> None:
        super().write(rec)
        self.written += 1

    @property
    def records(self) -> int:
        return self.carried + self.written

    def finish(self, complete: bool) -> Path:
        """Close, then move the records into place; returns where they are.

        A complete run replaces ``out``. An interrupted one replaces it only when nothing is lost
        (``out`` did not exist, or ``--resume`` carried its records over); otherwise its records are
        kept beside it as ``<out>.partial<suffix>`` and ``out`` is left untouched.
        """
        self.close()
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(self.tmp, 0o666 & ~mask)  # mkstemp made it 0600; the output gets ordinary permissions
        if complete or not self.existed or self.carried:
            os.replace(self.tmp, self.final)
            for f in self.consumed:  # their records are in ``out`` now
                if f != self.tmp:
                    f.unlink(missing_ok=True)
            return self.final
        keep = self.final.with_name(f"{self.final.stem}.partial{self.final.suffix}")
        os.replace(self.tmp, keep)
        return keep

    def discard(self) -> None:
        self.close()
        self.tmp.unlink(missing_ok=True)
