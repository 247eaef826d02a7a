"""covidcxr.io: every supported format reads to [0,1] float32, every bad input gets a clear CXRReadError."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import covidcxr.io as cio
from covidcxr.io import CXRReadError, decode, inspect, read_image
from test_data_factories import (
    dicom_dataset,
    gradient,
    write_dicom,
    write_jpeg,
    write_jpeg_dicom,
    write_png,
)


def _err(path) -> str:
    with pytest.raises(CXRReadError) as info:
        read_image(path)
    msg = str(info.value)
    assert msg.startswith(str(path)), msg  # the message names the file
    return msg


# --------------------------------------------------------------------------- good inputs


def test_png_8bit_gray_range(tmp_path):
    arr = gradient()
    img = read_image(write_png(tmp_path / "a.png", arr))
    assert img.dtype == np.float32 and img.shape == arr.shape
    np.testing.assert_allclose(img, arr / 255.0, atol=1e-6)


def test_png_16bit_keeps_precision(tmp_path):
    arr = gradient(dtype=np.uint16, maxval=65535)
    p = tmp_path / "a16.png"
    Image.fromarray(arr).save(p)
    img = read_image(p)
    np.testing.assert_allclose(img, arr / 65535.0, atol=1e-6)
    info = inspect(p)
    assert info.bit_depth == 16 and info.max_value == float(arr.max())


def test_rgb_and_rgba(tmp_path):
    g = gradient()
    rgb = np.stack([g, g, g], -1)
    np.testing.assert_allclose(read_image(write_png(tmp_path / "rgb.png", rgb)), g / 255.0, atol=1 / 255)
    alpha = np.full_like(g, 255)
    alpha[:10] = 0  # transparent rows composite to black
    rgba = np.dstack([rgb, alpha])
    img = read_image(write_png(tmp_path / "rgba.png", rgba, mode="RGBA"))
    assert np.all(img[:10] == 0)
    np.testing.assert_allclose(img[10:], g[10:] / 255.0, atol=1 / 255)


def test_jpeg(tmp_path):
    g = gradient()
    img = read_image(write_jpeg(tmp_path / "a.jpg", g, quality=95))
    assert np.abs(img - g / 255.0).mean() < 0.02


def test_format_from_content_not_extension(tmp_path):
    p = write_png(tmp_path / "really_png.jpg")
    assert inspect(p).format == "png"


def test_decode_bytes(tmp_path):
    data = write_png(tmp_path / "a.png").read_bytes()
    arr, info = decode(data, "upload.png")
    assert arr.shape == (96, 80) and info.format == "png"


def test_dicom_uses_bits_stored_range(tmp_path):
    px = gradient(dtype=np.uint16, maxval=4095)
    img = read_image(write_dicom(tmp_path / "a.dcm", dicom_dataset(px, bits_stored=12)))
    np.testing.assert_allclose(img, px / 4095.0, atol=1e-5)


def test_dicom_monochrome1_is_inverted(tmp_path):
    px = gradient(dtype=np.uint16, maxval=4095)
    m2 = read_image(write_dicom(tmp_path / "m2.dcm", dicom_dataset(px)))
    m1 = read_image(write_dicom(tmp_path / "m1.dcm", dicom_dataset(px, photometric="MONOCHROME1")))
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)


def test_dicom_rescale_slope_intercept(tmp_path):
    px = gradient(dtype=np.uint16, maxval=4095)
    plain = read_image(write_dicom(tmp_path / "p.dcm", dicom_dataset(px)))
    # a linear modality LUT maps the whole stored range linearly, so the normalised image is unchanged
    res = read_image(write_dicom(tmp_path / "r.dcm", dicom_dataset(px, RescaleSlope=2, RescaleIntercept=-1024)))
    np.testing.assert_allclose(res, plain, atol=1e-5)
    # a negative slope flips intensities
    neg = read_image(write_dicom(tmp_path / "n.dcm", dicom_dataset(px, RescaleSlope=-1, RescaleIntercept=4095)))
    np.testing.assert_allclose(neg, 1.0 - plain, atol=1e-5)
    assert inspect(tmp_path / "r.dcm").extra["rescale"] is True


def test_dicom_window_is_applied(tmp_path):
    px = gradient(dtype=np.uint16, maxval=4095)
    img = read_image(write_dicom(tmp_path / "w.dcm", dicom_dataset(px, WindowCenter=1024, WindowWidth=512)))
    # values below the window are black, above it white, and the window is stretched in between
    assert img[px < 700].max() == 0.0
    assert img[px > 1400].min() == 1.0
    mid = (px > 900) & (px < 1150)
    assert 0.0 < img[mid].mean() < 1.0
    assert inspect(tmp_path / "w.dcm").extra["voi"] is True


def test_dicom_no_patient_tags_in_info(tmp_path):
    p = write_dicom(tmp_path / "a.dcm", dicom_dataset())
    text = repr(inspect(p).to_dict())
    assert "SECRET" not in text and "Secret" not in text


def test_jpeg_compressed_dicom_decodes_via_pylibjpeg(tmp_path):
    from pydicom.pixels.decoders import JPEGBaseline8BitDecoder

    assert "pylibjpeg" in JPEGBaseline8BitDecoder.available_plugins
    g = gradient(128, 112)
    p = write_jpeg_dicom(tmp_path / "j.dcm", g)
    img = read_image(p)
    assert img.shape == g.shape
    assert np.abs(img - g / 255.0).mean() < 0.02
    assert "JPEG Baseline" in inspect(p).transfer_syntax


def test_shared_monochrome1_sample_is_inverse_of_monochrome2(samples_dir):
    m2 = read_image(samples_dir / "rsna-pneumonia-sample.dcm")
    m1 = read_image(samples_dir / "monochrome1-sample.dcm")
    assert m2.shape == (1024, 1024)
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)
    assert inspect(samples_dir / "monochrome1-sample.dcm").photometric == "MONOCHROME1"


def test_shared_png_and_jpeg_samples(samples_dir):
    for name in ("nih-00000001_000.png", "padchest-16747_3_1.jpg"):
        img = read_image(samples_dir / name)
        assert img.dtype == np.float32 and img.ndim == 2 and 0.0 <= img.min() < img.max() <= 1.0


# --------------------------------------------------------------------------- bad inputs


def test_non_image(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("this is not an image at all")
    assert "not a supported image" in _err(p)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    assert "empty" in _err(p)


def test_missing_file(tmp_path):
    assert "not found" in _err(tmp_path / "nope.png")


def test_truncated_png(tmp_path):
    data = write_png(tmp_path / "full.png", gradient(256, 256)).read_bytes()
    p = tmp_path / "trunc.png"
    p.write_bytes(data[: len(data) // 2])
    assert "truncated" in _err(p).lower()


def test_truncated_jpeg(tmp_path):
    data = write_jpeg(tmp_path / "full.jpg", gradient(256, 256)).read_bytes()
    p = tmp_path / "trunc.jpg"
    p.write_bytes(data[: len(data) // 2])
    assert "truncated" in _err(p).lower()


def test_truncated_dicom(tmp_path):
    data = write_dicom(tmp_path / "full.dcm", dicom_dataset()).read_bytes()
    p = tmp_path / "trunc.dcm"
    p.write_bytes(data[:200])  # cut inside the header
    assert "DICOM" in _err(p)
    p.write_bytes(data[:-3000])  # cut inside native pixel data
    assert "truncated DICOM pixel data" in _err(p)
    jpeg = write_jpeg_dicom(tmp_path / "j.dcm").read_bytes()
    p.write_bytes(jpeg[:-500])  # cut inside encapsulated JPEG fragments
    assert "truncated DICOM file" in _err(p)


def test_dicom_without_pixel_data(tmp_path):
    p = write_dicom(tmp_path / "nopix.dcm", dicom_dataset(with_pixels=False))
    assert "no pixel data" in _err(p)


def test_decompression_bomb(tmp_path, monkeypatch):
    # A PNG header claiming more pixels than MAX_PIXELS is refused before decoding.
    monkeypatch.setattr(cio, "MAX_PIXELS", 100 * 100)
    p = write_png(tmp_path / "big.png", gradient(200, 200))
    msg = _err(p)
    assert "decompression bomb" in msg and "10,000" in msg


def test_real_decompression_bomb_default_limit(tmp_path):
    # 9000 x 9000 = 81 MP > the default 64 MP limit; a 1-bit PNG keeps the file tiny.
    p = tmp_path / "bomb.png"
    Image.new("1", (9000, 9000)).save(p)
    assert p.stat().st_size < 200_000
    assert "decompression bomb" in _err(p)


def test_too_small(tmp_path):
    assert "too small" in _err(write_png(tmp_path / "tiny.png", gradient(32, 32)))


def test_multiframe_tiff(tmp_path):
    p = tmp_path / "stack.tif"
    frames = [Image.fromarray(gradient(seed=i)) for i in range(3)]
    frames[0].save(p, save_all=True, append_images=frames[1:])
    assert "multi-frame" in _err(p) and "3 frames" in _err(p)


def test_multiframe_dicom(tmp_path):
    p = write_dicom(tmp_path / "vol.dcm", dicom_dataset(frames=4))
    msg = _err(p)
    assert "multi-frame" in msg and "4 frames" in msg


def test_dicom_unsupported_photometric(tmp_path):
    p = write_dicom(tmp_path / "hsv.dcm", dicom_dataset(photometric="HSV"))
    assert "photometric" in _err(p)
    # a palette image without its palette says so, in one line
    p = write_dicom(tmp_path / "pal.dcm", dicom_dataset(photometric="PALETTE COLOR"))
    assert "palette" in _err(p).lower()


def test_dicom_missing_codec_names_transfer_syntax(tmp_path):
    import pydicom

    ds = pydicom.dcmread(write_jpeg_dicom(tmp_path / "j.dcm"))
    ds.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML  # a compressed syntax with no decoder installed
    p = tmp_path / "mpeg.dcm"
    ds.save_as(p)
    msg = _err(p)
    assert "no pixel data decoder" in msg and "MPEG2" in msg


def test_dicom_voi_lut_sequence(tmp_path):
    from pydicom.dataset import Dataset

    px = gradient(dtype=np.uint16, maxval=4095)
    ds = dicom_dataset(px)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]  # 4096 entries from stored value 0, 16-bit output
    item.LUTData = [4095 * 16 - v * 16 for v in range(4096)]  # an inverting 12 -> 16 bit LUT
    item["LUTData"].VR = "US"
    ds.VOILUTSequence = [item]
    img = read_image(write_dicom(tmp_path / "lut.dcm", ds))
    # the LUT's output range (16 bits) gives the scale, and the LUT's inversion shows through
    np.testing.assert_allclose(img, (4095 - px) * 16 / 65535.0, atol=1e-5)


def test_tiff_16bit(tmp_path):
    arr = gradient(dtype=np.uint16, maxval=65535)
    p = tmp_path / "a.tif"
    Image.fromarray(arr).save(p, format="TIFF")
    np.testing.assert_allclose(read_image(p), arr / 65535.0, atol=1e-6)
    assert inspect(p).format == "tiff"


def test_nan_or_infinite_pixels_are_a_read_error(tmp_path):
    for bad in (np.nan, np.inf):
        f = gradient(128, 128).astype(np.float32)
        f[10:20, 10:20] = bad
        p = tmp_path / f"f{bad}.tif"
        Image.fromarray(f, "F").save(p)
        assert "NaN or infinite pixel values" in _err(p)


def test_a_decoder_surprise_on_a_corrupt_file_is_a_read_error(tmp_path):
    # a TIFF whose image-size tags point past the end of the file: Pillow raises TypeError, not OSError
    good = tmp_path / "g.tif"
    Image.fromarray(gradient(128, 128)).save(good)
    data = bytearray(good.read_bytes())
    p = tmp_path / "bad.tif"
    p.write_bytes(bytes(data[:8]) + b"\x01\x00" + b"\x00\x01\x04\x00\x01\x00\x00\x00\xff\xff\xff\x7f" + b"\x00" * 8)
    msg = _err(p)
    assert "cannot decode" in msg or "corrupt" in msg
    # a DICOM whose transfer syntax UID is no transfer syntax: pydicom raises ValueError deep in its decoder
    q = write_dicom(tmp_path / "ts.dcm", dicom_dataset())
    ts = str(read_dicom_ts(q)).encode()
    q.write_bytes(q.read_bytes().replace(ts, b"1.2.840.10008.9.9.9"[: len(ts)].ljust(len(ts), b"9"), 1))
    assert str(read_dicom_ts(q)) != ts.decode()
    msg = _err(q)
    assert "cannot decode DICOM file" in msg or "transfer syntax" in msg.lower()


def read_dicom_ts(path):
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID


def test_a_file_too_large_for_one_image_is_refused_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(cio, "MAX_PIXELS", 100 * 100)
    p = tmp_path / "huge.png"
    with open(p, "wb") as fh:  # sparse: a PNG signature and then nothing, far past the limit
        fh.write(b"\x89PNG\r\n\x1a\n")
        fh.truncate(cio.max_file_bytes() + 1)
    monkeypatch.setattr(type(p), "read_bytes", lambda self: pytest.fail("read before its size was checked"))
    assert "refused unread" in _err(p)
