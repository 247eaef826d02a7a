"""Small generated inputs for reader and data tests (never real patient data). Holds no tests."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def gradient(h: int = 96, w: int = 80, dtype=np.uint8, maxval: int = 255, seed: int = 0) -> np.ndarray:
    """A smooth gradient with a little noise: compresses well and has a known value range."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, h)[:, None]
    x = np.linspace(0, 1, w)[None, :]
    img = 0.6 * y + 0.4 * x + rng.normal(0, 0.01, (h, w))
    return np.clip(img * maxval, 0, maxval).astype(dtype)


def write_png(path: Path, arr: np.ndarray | None = None, mode: str | None = None) -> Path:
    arr = gradient() if arr is None else arr
    (Image.fromarray(arr, mode=mode) if mode else Image.fromarray(arr)).save(path, format="PNG")
    return path


def write_jpeg(path: Path, arr: np.ndarray | None = None, quality: int = 90) -> Path:
    Image.fromarray(gradient() if arr is None else arr).save(path, format="JPEG", quality=quality)
    return path


def dicom_dataset(pixels: np.ndarray | None = None, photometric: str = "MONOCHROME2", bits_stored: int = 12,
                  frames: int = 1, with_pixels: bool = True, **tags: object):
    """An uncompressed CR DICOM (explicit VR little endian) with made-up identifiers."""
    from pydicom.dataset import FileMetaDataset, Dataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR image storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = "Test^Secret"
    ds.PatientID = "SECRET-ID-123"
    ds.Modality = "CR"
    ds.ViewPosition = "PA"
    if pixels is None:
        pixels = gradient(96, 80, np.uint16, 2**bits_stored - 1)
    if frames > 1:
        pixels = np.stack([pixels] * frames)
        ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    for k, v in tags.items():
        setattr(ds, k, v)
    if with_pixels:
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    return ds


def write_dicom(path: Path, ds) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def write_jpeg_dicom(path: Path, arr: np.ndarray | None = None) -> Path:
    """An 8-bit JPEG Baseline (1.2.840.10008.1.2.4.50) DICOM, encapsulated from PIL's JPEG bytes."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    arr = gradient(128, 112) if arr is None else arr
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    ds = dicom_dataset(arr.astype(np.uint16), bits_stored=8)
    ds.BitsAllocated = 8
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True)
    return path
