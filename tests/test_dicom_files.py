"""Issue 11 §11: DICOM files someone else wrote — the whole pydicom test-file folder.

pydicom ships 176 files covering every transfer syntax plus broken files on purpose. Every one of
them goes through ``covidcxr inspect`` and :func:`covidcxr.io.read_image`: no traceback, no pydicom
log line on the terminal, and every refusal is one line with a reason. Each file's outcome is pinned in
``tests/pydicom_test_files.json`` (decodes to [rows, columns], or refused with the start of its reason):
a file that starts or stops decoding, or is refused for another reason, fails its test.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import covidcxr.io as cio
from covidcxr.io import CXRReadError, read_image

pydicom = pytest.importorskip("pydicom")
REPO = Path(__file__).resolve().parents[1]
TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
FILES = sorted(p for p in TEST_FILES.rglob("*") if p.is_file()) if TEST_FILES.is_dir() else []

needs_files = pytest.mark.skipif(not FILES, reason=f"pydicom's test files not found at {TEST_FILES}")
EXPECTED: dict[str, dict] = json.loads((Path(__file__).with_name("pydicom_test_files.json")).read_text())["files"]


def _expected(path: Path) -> dict:
    rel = str(path.relative_to(TEST_FILES))
    if rel not in EXPECTED:
        pytest.fail(f"{rel}: no pinned outcome in tests/pydicom_test_files.json (a new pydicom test file?)")
    return EXPECTED[rel]


@needs_files
def test_every_file_has_a_pinned_outcome() -> None:
    """The table and pydicom's folder list the same files (a pydicom upgrade shows up here, by name)."""
    on_disk = {str(p.relative_to(TEST_FILES)) for p in FILES}
    assert on_disk - EXPECTED.keys() == set(), "files without a pinned outcome"
    assert EXPECTED.keys() - on_disk == set(), "pinned files pydicom no longer ships"


@needs_files
def test_cli_inspect_whole_folder_no_traceback_every_refusal_has_reason() -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run([sys.executable, "-c", "import sys; from covidcxr.cli import main; sys.exit(main())",
                           "inspect", *map(str, FILES)],
                          capture_output=True, text=True, env=env, timeout=300)
    err = proc.stderr
    assert "Traceback" not in err and "Traceback" not in proc.stdout
    assert "pydicom" not in err.replace(str(TEST_FILES.parent.parent), "")  # no pydicom log lines or warnings
    lines = [ln for ln in err.splitlines() if ln.strip()]
    summary = [ln for ln in lines if "file(s) unreadable" in ln]
    refusals = [ln for ln in lines if ln not in summary]
    ok = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(ok) + len(refusals) == len(FILES), (len(ok), len(refusals), len(FILES))
    for ln in refusals:  # "error: <path>: <reason>", one line each, naming the file
        m = re.match(r"error: (.+?): (.{10,})$", ln)
        assert m and Path(m.group(1)).name in {p.name for p in FILES}, ln
    # the same files are read and refused as pinned for read_image, with the same reasons
    refused = {}
    for ln in refusals:
        path, reason = re.match(r"error: (.+?): (.{10,})$", ln).groups()  # type: ignore[union-attr]
        refused[str(Path(path).relative_to(TEST_FILES))] = reason
    for rel, exp in EXPECTED.items():
        if "refused" in exp:
            assert rel in refused and refused[rel].startswith(exp["refused"]), (rel, refused.get(rel), exp)
        else:
            assert rel not in refused, (rel, refused[rel])
            rows, cols = exp["decodes"]
            assert any(ln.startswith(f"{TEST_FILES / rel}: DICOM {cols}x{rows},") for ln in ok), rel


@needs_files
@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(TEST_FILES)) for p in FILES])
def test_read_image_each_file(path: Path, capfd: pytest.CaptureFixture) -> None:
    exp = _expected(path)
    if "refused" in exp:
        with pytest.raises(CXRReadError) as info:
            read_image(path)
        err = info.value
        assert err.reason.startswith(exp["refused"]), (err.reason, exp["refused"])
        assert len(str(err).splitlines()) == 1 and path.name in str(err), str(err)
    else:
        img = read_image(path)
        assert img.shape == tuple(exp["decodes"]) and img.dtype == np.float32
        assert np.isfinite(img).all() and 0 <= img.min() < img.max() <= 1  # in range, and not a blank
    out, err_text = capfd.readouterr()
    assert out == "" and err_text == "", (out, err_text)  # nothing printed: not pydicom, not GDCM


def _tf(name: str) -> Path:
    p = TEST_FILES / name
    if not p.is_file():
        pytest.skip(f"{name} not in pydicom's test files")
    return p


def test_colour_secondary_capture_is_grayscale_like_a_png(tmp_path: Path) -> None:
    """An RGB DICOM reads to the same grayscale as the same picture saved as an RGB PNG."""
    from test_data_factories import dicom_dataset

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (96, 80, 3), dtype=np.uint8)
    png = tmp_path / "c.png"
    Image.fromarray(rgb, "RGB").save(png)
    ds = dicom_dataset(np.zeros((96, 80), np.uint16), photometric="RGB", bits_stored=8)
    ds.BitsAllocated, ds.SamplesPerPixel, ds.PlanarConfiguration = 8, 3, 0
    ds.PixelData = rgb.tobytes()
    dcm = tmp_path / "c.dcm"
    ds.save_as(dcm, enforce_file_format=True)
    a, b = read_image(dcm), read_image(png)
    assert a.shape == b.shape == (96, 80)
    np.testing.assert_allclose(a, b, atol=1.0 / 255 + 1e-6)
    assert cio.inspect(dcm).extra["colour"].startswith("RGB converted")


@needs_files
def test_ybr_files_become_grayscale() -> None:
    for name in ("SC_ybr_full_422_uncompressed.dcm", "SC_rgb_dcmtk_+eb+cy+n1.dcm", "examples_palette.dcm"):
        img = read_image(_tf(name))
        assert img.ndim == 2 and 0 <= img.min() < img.max() <= 1
    # the same picture, RGB vs YBR_FULL JPEG: the grayscale versions agree to within JPEG loss
    a = read_image(_tf("SC_rgb_dcmtk_+eb+cr.dcm"))
    b = read_image(_tf("SC_rgb_dcmtk_+eb+cy+n1.dcm"))
    assert np.abs(a - b).mean() < 0.02


@needs_files
def test_malformed_header_value_is_one_line() -> None:
    with pytest.raises(CXRReadError) as info:
        read_image(_tf("badVR.dcm"))
    assert "NumberOfFrames='1A'" in str(info.value) and "\n" not in str(info.value)


@needs_files
def test_12bit_jpeg_falls_back_to_gdcm(capfd: pytest.CaptureFixture) -> None:
    """JPEG-lossy.dcm defeats pylibjpeg and Pillow; python-gdcm reads it, to the same pixels as the
    corrected copy JPGExtended.dcm, and GDCM's console chatter is not printed."""
    pytest.importorskip("gdcm")
    arr, info = cio.read_image_with_info(_tf("JPEG-lossy.dcm"))
    assert info.extra["decoder"] == "gdcm"
    # lossy JPEG: two decoders' IDCTs may differ by one stored value (1/4095)
    np.testing.assert_allclose(arr, read_image(_tf("JPGExtended.dcm")), atol=1.5 / 4095)
    assert capfd.readouterr() == ("", "")


def test_decode_failure_says_so_and_names_each_decoder(tmp_path: Path) -> None:
    from test_data_factories import write_jpeg_dicom

    p = write_jpeg_dicom(tmp_path / "j.dcm")
    ds = pydicom.dcmread(p)
    frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
    sos = frame.index(b"\xff\xda")
    broken = frame[: sos + 14] + bytes(range(256)) * 4  # scan data replaced by junk, no EOI
    ds.PixelData = pydicom.encaps.encapsulate([broken])
    ds.save_as(p)
    with pytest.raises(CXRReadError) as info:
        read_image(p)
    msg = str(info.value)
    assert "decode failed" in msg and "JPEG Baseline" in msg and "\n" not in msg
    assert "missing codec" not in msg
    for name in ("pylibjpeg", "pillow"):
        assert f"{name}:" in msg


def test_compressed_dicom_without_any_decoder_names_the_missing_codecs(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """On an install without the pixel-data plugins (and without python-gdcm) a JPEG DICOM is refused in
    one line that says a codec is missing and how to install it, not with a traceback."""
    from test_data_factories import write_jpeg_dicom

    p = write_jpeg_dicom(tmp_path / "j.dcm")
    monkeypatch.setattr(cio, "_PLUGIN_ORDER", ())  # as if pylibjpeg / pillow / pyjpegls were absent

    def no_gdcm(data: bytes, path: str | None) -> None:
        raise RuntimeError("python-gdcm is not installed")

    monkeypatch.setattr(cio, "_decode_with_gdcm", no_gdcm)
    with pytest.raises(CXRReadError) as info:
        read_image(p)
    msg = str(info.value)
    assert str(p) in msg and "\n" not in msg
    assert "decode failed" in msg and "JPEG Baseline" in msg
    assert "missing codec" in msg and "pip install pylibjpeg" in msg and "gdcm: python-gdcm is not installed" in msg


@pytest.mark.parametrize("encoding", ["implicit", "explicit-little", "explicit-big"])
def test_dataset_without_file_meta_reads_with_force(tmp_path: Path, encoding: str) -> None:
    """A data set written without preamble or file meta (as some PACS exports are) still reads."""
    from test_data_factories import dicom_dataset, gradient

    px = gradient(96, 80, np.uint16, 4095)
    ds = dicom_dataset(px)
    del ds.file_meta
    if encoding == "explicit-big":  # pydicom writes OW bytes as given: swap them ourselves
        ds.PixelData = px.astype(">u2").tobytes()
    buf = io.BytesIO()
    implicit = encoding == "implicit"
    little = encoding != "explicit-big"
    ds.save_as(buf, implicit_vr=implicit, little_endian=little, enforce_file_format=False)
    p = tmp_path / "nometa.dcm"
    p.write_bytes(buf.getvalue())
    assert p.read_bytes()[128:132] != b"DICM"
    img, info = cio.read_image_with_info(p)
    np.testing.assert_allclose(img, px / 4095.0, atol=1e-6)
    assert "force" in info.extra["file_meta"]


def test_text_with_dicom_suffix_is_refused_with_reason(tmp_path: Path) -> None:
    p = tmp_path / "notes.dcm"
    p.write_text("this is not a DICOM file at all, just some words " * 5)
    with pytest.raises(CXRReadError) as info:
        read_image(p)
    assert "DICOM" in str(info.value)
