"""SR + secondary capture for an analysed instance, and the writer behind ``covidcxr predict --dicom-out DIR``."""

from __future__ import annotations
from covidcxr.predict.inputs import _looks_like_dicom  # one DICM-preamble check, shared with the input collector

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from covidcxr.dicom.analysis import Analysis, Engine
from covidcxr.dicom.common import instance_key, quiet_dicom_libraries, safe_reason
from covidcxr.dicom.sc import build_sc
from covidcxr.dicom.sr import build_sr


@dataclass
class Results:
    sr: Dataset
    sc: Dataset

    def items(self) -> list[tuple[str, Dataset]]:
        return [("sr", self.sr), ("sc", self.sc)]


def build_results(header: Dataset, analysis: Analysis, engine: Engine) -> Results:
    quiet_dicom_libraries()  # highdicom warns quoting the patient name
    return Results(sr=build_sr(header, analysis, engine), sc=build_sc(header, analysis, engine))


def to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary name in the same folder and rename: a crash leaves no half-written result."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_header(data: bytes) -> Dataset:
    """The header of a DICOM instance (no pixel data), as pydicom reads it."""
    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=False)


class DicomResultWriter:
    """``predict --dicom-out DIR``: for each predicted DICOM input, ``DIR/<stem>-<hash>.sr.dcm`` and ``.sc.dcm``.

    ``write(rec)`` takes a record of :meth:`Predictor.predict_paths` and reuses its label and
    probabilities (so the SR says what the JSONL says); it re-reads the file for the header and the
    overlay. It adds ``dicom_sr``/``dicom_sc`` (paths) or ``dicom_note`` (why not) to the record. An error
    record of a DICOM file that decodes here (the model failed, e.g. a non-finite output) gets a "not
    assessed: software failure" SR, as the node sends; one whose file does not decode gets a note.
    """

    def __init__(self, out_dir: str | os.PathLike, engine: Engine) -> None:
        quiet_dicom_libraries()
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.engine = engine
        self.written = 0
        self.skipped = 0

    def write(self, rec: dict[str, Any]) -> None:
        from covidcxr.io import CXRReadError, decode

        path = Path(rec["path"])
        if rec.get("error") and not _looks_like_dicom(path):
            return  # a failed non-DICOM input: the record says why; no study to put a result in
        try:
            data = path.read_bytes()
            if len(data) < 132 or data[128:132] != b"DICM":
                rec["dicom_note"] = "not a DICOM input: no SR written (results go into the study of a DICOM source)"
                self.skipped += 1
                return
            header = read_header(data)
            try:
                image, _ = decode(data, path)
            except CXRReadError as err:
                if rec.get("error"):  # unreadable input: the record says why; no result without an image
                    rec["dicom_note"] = f"no SR written: {err.reason}"
                    self.skipped += 1
                    return
                raise
            clean = {k: v for k, v in rec.items() if k not in ("tensor", "tensors")}
            analysis = self.engine.analyze(image, header, rec=clean)
            results = build_results(header, analysis, self.engine)
        except Exception as err:  # one input without an SR must not stop the batch
            rec["dicom_note"] = f"no SR written: {err.reason if isinstance(err, CXRReadError) else safe_reason(err)}"
            self.skipped += 1
            return
        digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
        stem = f"{path.stem}-{digest}"
        for kind, ds in results.items():
            target = self.out / f"{stem}.{kind}.dcm"
            if target.resolve() == path.resolve():  # never overwrite an input
                raise ValueError(f"{target}: refusing to overwrite an input file")
            write_atomic(target, to_bytes(ds))
            rec[f"dicom_{kind}"] = str(target)
        rec["dicom_key"] = instance_key(str(header.SOPInstanceUID))
        self.written += 1

    def summary(self) -> str:
        return f"--dicom-out: wrote SR + secondary capture for {self.written} DICOM inputs into {self.out}" + (
            f" ({self.skipped} inputs without: see each record's dicom_note)" if self.skipped else "")
