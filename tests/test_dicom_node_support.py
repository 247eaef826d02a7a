"""Helpers shared by the DICOM node tests (no tests here): a tiny classifier, images wrapped as DICOM, an SCU."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CLASSES = ["normal", "pneumonia", "COVID-19"]
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
#: made-up identifying values: a test checks that none of them reaches a log
PHI = {"PatientName": "Doe^Jane", "PatientID": "PID-SECRET-4711", "PatientBirthDate": "19610203",
       "AccessionNumber": "ACC-SECRET-99"}


def make_classifier(path: Path, threshold: float | None = 0.4, seed: int = 0) -> Path:
    """A resnet18 at 64 px with random weights: fast on 2 cores, real code paths."""
    import torch

    from covidcxr import models
    from covidcxr.preprocess import get_preset

    torch.manual_seed(seed)
    models.save(path, models.build("resnet18", num_classes=3), arch="resnet18", classes=CLASSES,
                preset=get_preset("deepcovid", size=64), threshold=threshold, temperature=1.5,
                training={"run_name": "tiny-dicom-test"}, metrics={"note": "random weights"})
    return path


def wrap_image(pixels: np.ndarray, sop_class: str = SECONDARY_CAPTURE, modality: str = "CR",
               study_uid: str | None = None, **attrs: object) -> Dataset:
    """A 2-D uint8/uint16 array as a single-frame MONOCHROME2 DICOM (explicit VR little endian)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientName = "Test^Wrapped"
    ds.PatientID = "TEST-0001"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "20260101", "120000", "1", "", ""
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.ConversionType = "WSD"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    bits = 16 if pixels.dtype == np.uint16 else 8
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


def wrap_file(path: Path, **attrs: object) -> Dataset:
    """A PNG/JPEG from the shared data as a secondary-capture DICOM, pixel values unchanged (8-bit gray)."""
    from PIL import Image

    arr = np.asarray(Image.open(path).convert("L"), dtype=np.uint8)
    return wrap_image(arr, **attrs)


def to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def renamed(data: bytes, **attrs: object) -> Dataset:
    """A copy of a DICOM file with a new SOP Instance UID (and other attributes changed)."""
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


class Scu:
    """A pynetdicom SCU for the node under test: echo, store files or raw datasets."""

    def __init__(self, port: int, called: str = "COVIDCXR", calling: str = "TESTSCU",
                 syntaxes: tuple[str, ...] = (ExplicitVRLittleEndian, "1.2.840.10008.1.2.4.50")) -> None:
        from pynetdicom import AE
        from pynetdicom.sop_class import Verification

        from covidcxr.dicom.common import ACCEPTED_SOP_CLASSES

        self.port, self.called = port, called
        self.ae = AE(ae_title=calling)
        self.ae.add_requested_context(Verification)
        for sop in ACCEPTED_SOP_CLASSES:  # one context per transfer syntax: the acceptor picks one per context
            for ts in syntaxes:
                self.ae.add_requested_context(sop, ts)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 120

    def associate(self):
        return self.ae.associate("127.0.0.1", self.port, ae_title=self.called)

    def echo(self) -> int | None:
        assoc = self.associate()
        if not assoc.is_established:
            return None
        try:
            st = assoc.send_c_echo()
            return int(st.Status) if "Status" in st else None
        finally:
            assoc.release()

    def store(self, *items: Path | Dataset) -> list[tuple[int | None, str]]:
        """C-STORE each item (a file path is sent as its bytes, unparsed) on one association."""
        from pynetdicom import _config

        assoc = self.associate()
        assert assoc.is_established, "association refused"
        out = []
        old, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True  # files go unparsed
        try:
            for it in items:
                st = assoc.send_c_store(it)
                out.append((int(st.Status) if "Status" in st else None, str(st.get("ErrorComment", ""))))
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = old
            assoc.release()
        return out
