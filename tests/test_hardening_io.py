"""Issue 11 §1: a deflated DICOM that declares 15000 x 15000 pixels is refused from its header.

The file is ~0.4 MB on disk but inflates to 450 MB. The reader must refuse it before inflating or
decoding any pixel data: memory growth under 100 MB and an answer in well under 0.3 s, for a file
read, for in-memory bytes and for a service upload. Each measurement runs in a fresh subprocess so
that tracemalloc and the RSS high-water mark see only this read.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest

import covidcxr.io as cio
from covidcxr.io import CXRReadError, read_image

REPO = Path(__file__).resolve().parents[1]


def deflated_bomb(rows: int = 15000, cols: int = 15000) -> bytes:
    """A Deflated Explicit VR Little Endian CR image of zeros: tiny compressed, rows*cols*2 bytes inflated."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "CR"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    nbytes = rows * cols * 2
    # the pixel data element written by hand, so the 450 MB of zeros are streamed into zlib, never held
    header = body.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, nbytes)
    comp = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts, zeros, left = [comp.compress(header)], bytes(1 << 22), nbytes
    while left:
        n = min(left, len(zeros))
        parts.append(comp.compress(zeros[:n]))
        left -= n
    parts.append(comp.flush())
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    return out.getvalue() + b"".join(parts)


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("bomb") / "bomb.dcm"
    p.write_bytes(deflated_bomb())
    assert p.stat().st_size < 1_000_000
    return p


_MEASURE = textwrap.dedent(
    """
    import json, resource, sys, time, tracemalloc
    path, mode = sys.argv[1], sys.argv[2]
    import numpy, pydicom, pydicom.pixels, zlib
    import covidcxr.io as cio
    data = open(path, "rb").read()
    call = None
    if mode == "path":
        call = lambda: cio.read_image(path)
    elif mode == "bytes":
        call = lambda: cio.decode(data, "upload.dcm")
    else:
        import torch
        from fastapi.testclient import TestClient
        from covidcxr import models
        from covidcxr.preprocess import get_preset
        from covidcxr.serve import create_app
        ckpt = sys.argv[3]
        models.save(ckpt, models.build("resnet18", num_classes=3), arch="resnet18",
                    classes=["normal", "pneumonia", "COVID-19"], preset=get_preset("deepcovid", size=64))
        client = TestClient(create_app(ckpt, api_key="", max_upload_mb=2.0)).__enter__()
        # warm the upload path with a small refused DICOM (no inference runs, so no high-water mark is set)
        small = open(sys.argv[4], "rb").read()
        assert client.post("/v1/predict", files={"file": ("s.dcm", small)}).status_code == 422
        def call():
            r = client.post("/v1/predict", files={"file": ("bomb.dcm", data, "application/dicom")})
            raise RuntimeError(json.dumps({"status": r.status_code, "detail": r.json().get("detail")}))
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    t, cpu = time.perf_counter(), time.process_time()
    out = {}
    try:
        call()
        out["error"] = None
    except cio.CXRReadError as err:
        out["error"] = str(err)
    except RuntimeError as err:
        out.update(json.loads(str(err)))
    out["seconds"] = time.perf_counter() - t
    out["cpu_seconds"] = time.process_time() - cpu  # every thread of this process (the service's too)
    out["traced_peak_mb"] = tracemalloc.get_traced_memory()[1] / 1e6
    out["rss_growth_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - r0) / 1024
    print(json.dumps(out))
    """
)


def _measure(*args: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *args], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_cheap(res: dict) -> None:
    # measured: ~0.003 s and ~2 MB on this machine; the old reader took 5.5 s and 900 MB. The time bound is on
    # the CPU time the refusal took, not the wall clock: on 2 loaded cores (CI, pytest -n 2) the scheduler
    # can hold this process off the CPU for longer than the bound, which says nothing about the reader.
    assert res["traced_peak_mb"] < 100, res
    assert res["rss_growth_mb"] < 100, res
    assert res["cpu_seconds"] < 0.3, res


@pytest.mark.parametrize("mode", ["path", "bytes"])
def test_deflated_bomb_refused_from_header(bomb: Path, mode: str) -> None:
    res = _measure(str(bomb), mode)
    msg = res["error"]
    assert msg and "15000x15000" in msg and "64,000,000" in msg
    assert "128" not in msg  # one limit, in one message
    _assert_cheap(res)


def test_deflated_bomb_upload_gets_422_before_pixels(bomb: Path, tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    from test_data_factories import dicom_dataset, write_dicom

    small = write_dicom(tmp_path / "small.dcm", dicom_dataset(np.zeros((20, 20), np.uint16)))
    res = _measure(str(bomb), "service", str(tmp_path / "m.ckpt"), str(small))
    assert res["status"] == 422 and "15000x15000" in res["detail"] and "64,000,000" in res["detail"], res
    _assert_cheap(res)


def test_deflated_dicom_still_reads(tmp_path: Path) -> None:
    """The header-first path must not break ordinary deflated files: a 300x200 image round-trips."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian
    from test_data_factories import dicom_dataset, gradient

    px = gradient(300, 200, np.uint16, 4095)
    ds = dicom_dataset(px, bits_stored=12)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    p = tmp_path / "dfl.dcm"
    ds.save_as(p, enforce_file_format=True)
    img = read_image(p)
    np.testing.assert_allclose(img, px / 4095.0, atol=1e-6)
    assert cio.inspect(p).transfer_syntax == "Deflated Explicit VR Little Endian"


def test_deflated_header_larger_than_cap_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A deflated stream whose 'header' never ends (a huge private element) stops at the header cap."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian
    from test_data_factories import dicom_dataset, gradient

    ds = dicom_dataset(gradient(100, 100, np.uint16, 4095))
    ds.add_new(0x00091010, "OB", bytes(3 << 20))  # 3 MB of zeros before the pixel data
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    p = tmp_path / "fat.dcm"
    ds.save_as(p, enforce_file_format=True)
    assert read_image(p).shape == (100, 100)  # under the cap: fine
    monkeypatch.setattr(cio, "MAX_DICOM_HEADER_BYTES", 1 << 20)
    with pytest.raises(CXRReadError, match="header is larger than"):
        read_image(p)


def test_png_bomb_states_one_limit(tmp_path: Path) -> None:
    """PIL's own message names its error limit (2x ours); ours names one limit only."""
    import zlib as z

    w = h = 12000  # 144 M pixels, 1-bit: a small file
    raw = b"".join(b"\x00" + bytes((w + 7) // 8) for _ in range(h))

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", z.crc32(t + d) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
    png += chunk(b"IDAT", z.compress(raw, 9)) + chunk(b"IEND", b"")
    p = tmp_path / "bomb.png"
    p.write_bytes(png)
    with pytest.raises(CXRReadError) as info:
        read_image(p)
    msg = str(info.value)
    assert "64,000,000" in msg and "144,000,000" in msg and "128" not in msg.replace("144,000,000", "")
