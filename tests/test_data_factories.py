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


def distinct_image(seed: int, h: int = 96, w: int = 96) -> np.ndarray:
    """A uint8 image whose perceptual hash differs from every other seed's (random low-frequency blobs)."""
    import cv2

    rng = np.random.default_rng(10_000 + seed)
    small = rng.random((6, 6)).astype(np.float32)
    big = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    big = (big - big.min()) / (np.ptp(big) + 1e-6)
    return (big * 255).astype(np.uint8)


def make_cohen(root: Path) -> Path:
    """A cohen-layout folder: metadata.csv (its real columns) + images/, with rows an adapter must drop."""
    import pandas as pd

    (root / "images").mkdir(parents=True)
    rows = [
        # patientid, finding, view, modality, filename
        ("1", "COVID-19", "PA", "X-ray", "c1.png"),
        ("1", "COVID-19, ARDS", "AP Supine", "X-ray", "c1b.png"),
        ("2", "Pneumonia/Viral/COVID-19", "AP", "X-ray", "c2.jpg"),
        ("3", "SARS", "PA", "X-ray", "s3.png"),
        ("4", "Streptococcus", "AP erect", "X-ray", "s4.png"),
        ("5", "No Finding", "PA", "X-ray", "n5.png"),
        ("6", "Pneumonia/Bacterial/Klebsiella", "PA", "X-ray", "k6.png"),
        ("7", "COVID-19", "L", "X-ray", "lat7.png"),  # lateral: dropped
        ("8", "COVID-19", "Axial", "CT", "ct8.png"),  # CT: dropped
        ("9", "", "PA", "X-ray", "e9.png"),  # empty finding: dropped
        ("10", "ARDS", "PA", "X-ray", "a10.png"),  # ARDS without COVID: dropped
        ("11", "Pneumonia/Lipoid", "PA", "X-ray", "l11.png"),  # lipoid: dropped
        ("12", "COVID-19", "PA", "X-ray", "missing.png"),  # file missing: dropped
    ]
    recs = []
    for i, (pid, finding, view, modality, fn) in enumerate(rows):
        recs.append({"patientid": pid, "offset": "", "sex": "F", "age": 50, "finding": finding, "view": view,
                     "modality": modality, "folder": "images", "filename": fn, "url": "", "license": ""})
        if fn != "missing.png":
            img = Image.fromarray(distinct_image(i))
            img.save(root / "images" / fn, format="JPEG" if fn.endswith(".jpg") else "PNG")
    pd.DataFrame(recs).to_csv(root / "metadata.csv", index=False)
    return root


def make_rsna(root: Path) -> Path:
    """An RSNA-challenge-layout folder with small generated DICOMs."""
    import pandas as pd

    (root / "stage_2_train_images").mkdir(parents=True)
    pats = [("p-normal", "Normal", 0, "PA"), ("p-opac", "Lung Opacity", 1, "AP"),
            ("p-notnormal", "No Lung Opacity / Not Normal", 0, "PA"), ("p-lateral", "Normal", 0, "LL"),
            ("p-normal2", "Normal", 0, "AP")]
    labels, info = [], []
    for i, (pid, cls, tgt, view) in enumerate(pats):
        boxes = 2 if tgt else 1  # opacity patients have one row per box
        for _ in range(boxes):
            labels.append({"patientId": pid, "x": 10 if tgt else "", "y": 10 if tgt else "", "width": 20 if tgt else "",
                           "height": 20 if tgt else "", "Target": tgt})
            info.append({"patientId": pid, "class": cls})
        ds = dicom_dataset(distinct_image(i, 80, 80).astype(np.uint16), bits_stored=8, ViewPosition=view)
        write_dicom(root / "stage_2_train_images" / f"{pid}.dcm", ds)
    pd.DataFrame(labels).to_csv(root / "stage_2_train_labels.csv", index=False)
    pd.DataFrame(info).to_csv(root / "stage_2_detailed_class_info.csv", index=False)
    return root


def make_radiography_db(root: Path) -> Path:
    """COVID-19 Radiography Database layout (v4+: <class>/images + <class>/masks; old: images directly)."""
    top = root / "COVID-19_Radiography_Dataset"
    k = 0
    for cls, n, nested in (("COVID", 3, True), ("Normal", 2, True), ("Lung_Opacity", 2, True), ("Viral Pneumonia", 2, False)):
        img_dir = top / cls / "images" if nested else top / cls
        img_dir.mkdir(parents=True)
        for j in range(n):
            write_png(img_dir / f"{cls}-{j + 1}.png", distinct_image(100 + k))
            k += 1
        if nested:
            (top / cls / "masks").mkdir()
            write_png(top / cls / "masks" / f"{cls}-1.png", distinct_image(999))
    (top / "README.md.txt").write_text("readme")
    return root


def make_folder(root: Path, per_class: int = 2) -> Path:
    k = 0
    for cls in ("normal", "pneumonia", "COVID-19", "other"):
        (root / cls).mkdir(parents=True)
        for j in range(per_class):
            write_png(root / cls / f"{cls}{j}.png", distinct_image(200 + k))
            k += 1
    return root


def make_manifest_set(root: Path, n_patients: int = 30, images_per_patient: int = 2, seed: int = 0):
    """A generated csv source (images/ + metadata.csv) with several images per patient; returns the CSV path."""
    import pandas as pd

    (root / "images").mkdir(parents=True)
    labels = ["COVID-19", "pneumonia", "normal"]
    rng = np.random.default_rng(seed)
    rows, k = [], 0
    for p in range(n_patients):
        lab = labels[0] if p % 5 < 3 else labels[1 + p % 2]
        for j in range(images_per_patient):
            fn = f"p{p}_{j}.png"
            write_png(root / "images" / fn, distinct_image(1000 + k))
            k += 1
            score = float(rng.integers(0, 8)) if lab == "COVID-19" and j == 0 else ""
            rows.append({"filename": fn, "patient_id": f"gen-{p}", "label": lab, "source": f"site{p % 3}",
                         "view": "PA", "geographic_extent_mean": score, "opacity_mean": score, "mask": ""})
    pd.DataFrame(rows).to_csv(root / "metadata.csv", index=False)
    return root / "metadata.csv"


def tiny_classifier_and_scans(root: Path, n: int = 5, scans: str = "") -> tuple[Path, list[Path]]:
    """An untrained 3-class ResNet-18 checkpoint at 64 px and ``n`` noise PNGs (in ``root/scans``): enough for the
    CLI's input and output handling, which does not care what the model says."""
    import torch

    from covidcxr import models
    from covidcxr.preprocess import get_preset

    torch.manual_seed(0)
    ckpt = root / "m.ckpt"
    models.save(ckpt, models.build("resnet18", num_classes=3), arch="resnet18",
                classes=["normal", "pneumonia", "COVID-19"], preset=get_preset("deepcovid", size=64))
    rng = np.random.default_rng(0)
    folder = root / scans
    folder.mkdir(parents=True, exist_ok=True)
    imgs = []
    for i in range(n):
        p = folder / f"img{i}.png"
        Image.fromarray((rng.random((96, 80)) * 255).astype(np.uint8)).save(p)
        imgs.append(p)
    return ckpt, imgs
