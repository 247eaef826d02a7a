"""Read chest X-rays from PNG, JPEG, TIFF or DICOM into one float32 grayscale array.

Every reader returns a 2-D ``float32`` array in **[0, 1]**, where 0 is the darkest
displayed value (air) and 1 the brightest (bone), whatever the bit depth or the
DICOM photometric interpretation. Every failure raises :class:`CXRReadError`,
whose message names the file and the reason.

Patient-identifying DICOM tags are never read into the returned metadata, so they
cannot reach logs or outputs.
"""

from __future__ import annotations

import errno
import hashlib
import io as _io
import logging
import os
import re
import struct
import sys
import tempfile
import threading
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: Largest image we decode, in pixels. Real CXRs are at most ~4k x 4k (16 MP);
#: anything much larger is treated as a decompression bomb.
MAX_PIXELS = 64_000_000
#: Smallest side accepted: below this an image cannot be a usable CXR.
MIN_SIDE = 64

#: largest share of unreadable images a check or calibration over a set accepts (ONNX parity, INT8 calibration
#: and gate, quantization-aware fine-tuning): above it the step is refused, since what decoded says little of the rest
MAX_UNREADABLE_SHARE = 0.02
DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
SUPPORTED_SUFFIXES = DICOM_SUFFIXES | IMAGE_SUFFIXES


class CXRReadError(Exception):
    """An input could not be read as a chest X-ray. ``str(err)`` is '<path>: <reason>'."""

    def __init__(self, path: str | os.PathLike | None, reason: str):
        self.path = str(path) if path is not None else "<bytes>"
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass
class ImageInfo:
    """What :func:`inspect` reports. Holds no patient-identifying data."""

    path: str
    format: str
    width: int
    height: int
    bit_depth: int
    photometric: str
    min_value: float
    max_value: float
    frames: int = 1
    transfer_syntax: str | None = None
    modality: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- sniffing


def _sniff(data: bytes) -> str:
    """Name the container format from magic bytes, not the file extension."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8"):
        return "jpeg"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if data.startswith(b"BM"):
        return "bmp"
    return "unknown"


def _limit_message(width: int, height: int, frames: int = 1) -> str:
    """The one message for an image over the pixel limit, whatever the format."""
    size = f"{width}x{height}" + (f"x{frames} frames" if frames > 1 else "")
    return (
        f"image is {size} = {width * height * frames:,} pixels, above the limit of {MAX_PIXELS:,} pixels "
        "(possible decompression bomb; refused before decoding; covidcxr.io.MAX_PIXELS sets the limit)"
    )


def _check_shape(path: str | None, height: int, width: int, frames: int = 1) -> None:
    if height * width * max(frames, 1) > MAX_PIXELS:
        raise CXRReadError(path, _limit_message(width, height, max(frames, 1)))
    if min(height, width) < MIN_SIDE:
        raise CXRReadError(
            path, f"image is {width}x{height}, too small to be a chest X-ray (minimum side {MIN_SIDE} px)"
        )


# --------------------------------------------------------------------------- raster images


def _read_raster(data: bytes, path: str | None) -> tuple[np.ndarray, ImageInfo]:
    from PIL import Image, ImageFile

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            # Pillow's notes on a damaged header (skipped TIFF tags, corrupt EXIF) are not ours to print: a file
            # that then fails is one CXRReadError line, one that decodes is fine
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(_io.BytesIO(data))
            fmt = (img.format or "unknown").lower()
            width, height = img.size
            _check_shape(path, height, width)
            frames = getattr(img, "n_frames", 1)
            if frames > 1:
                raise CXRReadError(path, f"multi-frame image with {frames} frames; expected a single 2-D X-ray")
            img.load()
    except CXRReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        # PIL's own text names its error limit (twice ours): state ours only, with the real size
        m = re.search(r"\((\d+) pixels\)", str(err))
        count = f"{int(m.group(1)):,} pixels, " if m else ""
        raise CXRReadError(path, f"image is {count}above the limit of {MAX_PIXELS:,} pixels (possible decompression "
                                 "bomb; refused before decoding; covidcxr.io.MAX_PIXELS sets the limit)") from None
    except (OSError, SyntaxError, ValueError) as err:
        reason = str(err) or type(err).__name__
        if "truncated" in reason.lower() or "broken data stream" in reason.lower():
            raise CXRReadError(path, f"truncated or corrupt {_sniff(data).upper()} file ({reason})") from None
        raise CXRReadError(path, f"cannot decode image ({reason})") from None

    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img, dtype=np.uint16).astype(np.float32)
        bits, scale = 16, 65535.0
    elif mode == "I":
        arr = np.asarray(img, dtype=np.int32).astype(np.float32)
        bits = 16 if arr.max(initial=0) <= 65535 else 32
        scale = 65535.0 if bits == 16 else float(max(arr.max(initial=1), 1))
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise CXRReadError(path, "image has NaN or infinite pixel values")
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo if hi > lo else 1.0)
        bits, scale = 32, 1.0
    else:
        if mode in ("RGBA", "LA", "PA"):
            # Composite on black: transparent pixels carry no X-ray signal.
            bg = Image.new("RGBA", img.size, (0, 0, 0, 255))
            img = Image.alpha_composite(bg, img.convert("RGBA"))
        if mode == "1":
            img = img.convert("L")
        arr = np.asarray(img.convert("L"), dtype=np.float32)
        bits, scale = 8, 255.0
    if arr.ndim != 2:
        raise CXRReadError(path, f"expected a 2-D image, got shape {arr.shape}")
    # report stored values (0..255, 0..65535), as for DICOM, not the normalised ones
    raw_min, raw_max = float(arr.min()), float(arr.max())
    arr = np.clip(arr / scale, 0.0, 1.0).astype(np.float32, copy=False)
    info = ImageInfo(
        path=str(path),
        format=fmt,
        width=width,
        height=height,
        bit_depth=bits,
        photometric=mode,
        min_value=raw_min,
        max_value=raw_max,
    )
    return arr, info


# --------------------------------------------------------------------------- DICOM
#
# A DICOM file is read in two passes: the header first (no pixel data, and for the deflated
# transfer syntax only as much of the zlib stream as the header needs), then, once Rows x Columns
# x frames is within MAX_PIXELS, the whole file. A 400 KB deflated upload that declares
# 15000 x 15000 pixels is therefore refused after inflating a few kilobytes, not 450 MB.

_PIXEL_TAGS = {0x7FE00010, 0x7FE00009, 0x7FE00008}
#: Most bytes of a deflated data set inflated while looking for the pixel data element.
MAX_DICOM_HEADER_BYTES = 16 << 20
#: pydicom plugins tried in this order; python-gdcm comes last, called directly (it also reads
#: 12-bit JPEG, which pydicom's own gdcm plugin refuses).
_PLUGIN_ORDER = ("pylibjpeg", "pillow", "pyjpegls", "pydicom")

_capture = threading.local()
_stderr_lock = threading.Lock()


class _PydicomLogRouter(logging.Handler):
    """pydicom's own log lines: kept with the read that caused them, never printed on their own.

    pydicom logs decoder tracebacks at ERROR level before raising; we report the failure ourselves
    in one line, so its records are collected (and shown at DEBUG level via ``covidcxr.io``).
    """

    def emit(self, record: logging.LogRecord) -> None:
        notes = getattr(_capture, "notes", None)
        msg = record.getMessage().splitlines()[0] if record.getMessage() else ""
        if notes is not None:
            notes.append(msg)
        logging.getLogger("covidcxr.io").debug("pydicom: %s", msg)


def _route_pydicom_logs() -> None:
    log = logging.getLogger("pydicom")
    if not any(isinstance(h, _PydicomLogRouter) for h in log.handlers):
        log.addHandler(_PydicomLogRouter())
        log.propagate = False


@contextmanager
def _pydicom_quiet() -> Iterator[list[str]]:
    """Collect pydicom's warnings and log lines for this read instead of printing them."""
    _route_pydicom_logs()
    notes: list[str] = []
    previous = getattr(_capture, "notes", None)
    _capture.notes = notes
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield notes
    finally:
        _capture.notes = previous
        notes.extend(str(w.message) for w in caught)


@contextmanager
def _stderr_captured() -> Iterator[Any]:
    """Send file descriptor 2 to a temporary file: GDCM's C++ libraries print there directly."""
    with _stderr_lock, tempfile.TemporaryFile() as tmp:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield tmp
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _header_int(ds: Any, keyword: str, default: int, path: str | None) -> int:
    """An integer header value; a malformed one (badVR.dcm's NumberOfFrames '1A') is a one-line error."""
    try:
        value = ds.get(keyword, default)
    except Exception as err:  # pydicom converts values lazily and may raise here
        raise CXRReadError(path, f"malformed DICOM header value {keyword} ({_one_line(err)})") from None
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise CXRReadError(
            path, f"malformed DICOM header value {keyword}={str(value)!r} (expected an integer)"
        ) from None


def _inflate(body: bytes, limit: int, what: str, path: str | None) -> tuple[bytes, bool]:
    """Inflate a raw deflate stream to at most ``limit`` bytes; return (data, complete)."""
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = d.decompress(body, limit)
    except zlib.error as err:
        raise CXRReadError(path, f"corrupt deflated DICOM data set ({err})") from None
    complete = d.eof or not d.unconsumed_tail
    if not complete and what:
        raise CXRReadError(path, f"deflated DICOM {what} inflates to more than {limit:,} bytes; refused")
    return out, complete


def _deflated_header(body: bytes, path: str | None) -> Any:
    """Parse a deflated data set up to its pixel data, inflating only what the header needs."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset

    reached = []

    def at_pixels(tag: Any, vr: Any, length: int) -> bool:
        if tag in _PIXEL_TAGS:
            reached.append(tag)
            return True
        return False

    size = 64 << 10
    while True:
        buf, complete = _inflate(body, size, "", path)
        reached.clear()
        ds = read_dataset(DicomBytesIO(buf), False, True, stop_when=at_pixels)
        if reached or complete:
            return ds
        if size >= MAX_DICOM_HEADER_BYTES:
            raise CXRReadError(
                path, f"deflated DICOM header is larger than {MAX_DICOM_HEADER_BYTES:,} bytes; refused"
            )
        size *= 4


def _read_dicom_dataset(data: bytes, path: str | None) -> tuple[Any, Any, bool]:
    """Return (header, full_reader, forced): the header without pixel data, and a callable that
    reads the whole data set once the header's size has been checked."""
    import pydicom
    from pydicom.dataset import FileDataset
    from pydicom.errors import InvalidDicomError
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble

    forced = data[128:132] != b"DICM"
    try:
        fp = DicomBytesIO(data)
        preamble = read_preamble(fp, forced)
        meta = _read_file_meta_info(fp)
        start = fp.tell()
        ts = meta.get("TransferSyntaxUID")
        if ts == pydicom.uid.DeflatedExplicitVRLittleEndian:
            header = _deflated_header(data[start:], path)

            def full() -> Any:
                # bounded by the checked header: header bytes + the pixel bytes it declares + slack
                limit = MAX_DICOM_HEADER_BYTES + 4 * MAX_PIXELS * 3 + (16 << 20)
                body, _ = _inflate(data[start:], limit, "data set", path)
                ds = FileDataset(path or "<bytes>", read_dataset(DicomBytesIO(body), False, True),
                                 preamble, meta, False, True)
                ds.set_original_encoding(False, True, ds._character_set)
                return ds

            return header, full, forced
        header = pydicom.dcmread(_io.BytesIO(data), stop_before_pixels=True, force=forced)
    except CXRReadError:
        raise
    except InvalidDicomError as err:
        raise CXRReadError(path, f"not a valid DICOM file ({_one_line(err)})") from None
    except Exception as err:  # pydicom raises many types on truncated or malformed headers
        raise CXRReadError(path, f"corrupt or truncated DICOM header ({type(err).__name__}: {_one_line(err)})") from None
    return header, (lambda: pydicom.dcmread(_io.BytesIO(data), force=forced)), forced


def _codestream_size(ds: Any, ts: Any) -> tuple[int, int] | None:
    """Width and height declared inside the first compressed frame (JPEG, JPEG-LS, JPEG 2000)."""
    from pydicom.encaps import generate_frames

    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    except Exception:
        return None
    head = bytes(frame[:65536])
    if head[:4] == b"\xff\x4f\xff\x51" and len(head) >= 24:  # J2K: SOC then SIZ
        xs, ys, xo, yo = struct.unpack(">IIII", head[8:24])
        return xs - xo, ys - yo
    if head[:2] == b"\xff\xd8":  # JPEG / JPEG-LS: walk markers to the SOF
        off = 2
        while off + 9 <= len(head) and head[off] == 0xFF:
            marker = head[off + 1]
            if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7):
                h, w = struct.unpack(">HH", head[off + 5 : off + 9])
                return w, h
            off += 2 + struct.unpack(">H", head[off + 2 : off + 4])[0]
    return None


def _decode_with_gdcm(data: bytes, path: str | None) -> tuple[np.ndarray, str]:
    """Decode with python-gdcm directly; returns (pixels, photometric). Raises RuntimeError."""
    try:
        import gdcm  # type: ignore[import-not-found]
    except ImportError:
        raise RuntimeError("python-gdcm is not installed") from None
    gdcm.Trace.WarningOff()
    gdcm.Trace.ErrorOff()
    with tempfile.NamedTemporaryFile(suffix=".dcm") as f:
        f.write(data)
        f.flush()
        with _stderr_captured() as err:
            reader = gdcm.ImageReader()
            reader.SetFileName(f.name)
            ok = reader.Read()
            image = reader.GetImage() if ok else None
            buf = image.GetBuffer() if image is not None else None
            err.seek(0)
            said = err.read().decode("utf-8", "replace")
    if not ok or not buf:
        raise RuntimeError("decode failed" + (f" ({_one_line(said, 120)})" if said.strip() else ""))
    dims = list(image.GetDimensions())
    pf = image.GetPixelFormat()
    dtypes = {"UINT8": "u1", "INT8": "i1", "UINT16": "<u2", "INT16": "<i2", "UINT32": "<u4", "INT32": "<i4",
              "FLOAT32": "<f4", "FLOAT64": "<f8"}
    scalar = pf.GetScalarTypeAsString()
    if scalar not in dtypes:
        raise RuntimeError(f"unsupported GDCM pixel type {scalar}")
    spp = pf.GetSamplesPerPixel()
    raw = buf.encode("utf-8", "surrogateescape")  # SWIG hands the bytes over as a str
    cols, rows = dims[0], dims[1]
    arr = np.frombuffer(raw, dtype=dtypes[scalar])
    if arr.size != rows * cols * spp:
        raise RuntimeError(f"decoded {arr.size} samples, expected {rows * cols * spp}")
    if spp == 1:
        arr = arr.reshape(rows, cols)
    elif image.GetPlanarConfiguration() == 1:
        arr = arr.reshape(spp, rows, cols).transpose(1, 2, 0)
    else:
        arr = arr.reshape(rows, cols, spp)
    photometric = image.GetPhotometricInterpretation().GetString().strip().rstrip("\x00")
    if photometric.startswith("YBR"):
        from pydicom.pixels import convert_color_space

        arr = convert_color_space(arr, photometric, "RGB")
        photometric = "RGB"
    return arr, photometric


#: said when no pixel-data plugin can decode a compressed transfer syntax
_CODEC_HINT = (
    "install the pixel-data plugins: pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg python-gdcm "
    "(covidcxr's default install includes them)"
)


def _decode_pixels(ds: Any, data: bytes, ts: Any, path: str | None) -> tuple[np.ndarray, str, str]:
    """Return (pixels, photometric after decoding, decoder). A failure names every decoder tried."""
    from pydicom.pixels import get_decoder

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise CXRReadError(
            path,
            f"no pixel data decoder exists for transfer syntax {getattr(ts, 'name', ts)} (covidcxr reads "
            "uncompressed, deflated, RLE, JPEG, JPEG-LS and JPEG 2000 DICOM)",
        ) from None
    if decoder.is_native:
        try:
            arr, meta = decoder.as_array(ds, as_rgb=True)
        except Exception as err:
            if "less than expected" in str(err) or "insufficient" in str(err).lower():
                raise CXRReadError(path, f"truncated DICOM pixel data ({_one_line(err)})") from None
            raise CXRReadError(path, f"cannot read DICOM pixel data ({type(err).__name__}: {_one_line(err)})") from None
        return arr, str(meta.get("photometric_interpretation", photometric)), "pydicom"
    failures: list[str] = []
    plugins = [p for p in _PLUGIN_ORDER if p in decoder.available_plugins]
    for plugin in plugins:
        try:
            arr, meta = decoder.as_array(ds, as_rgb=True, decoding_plugin=plugin)
            return arr, str(meta.get("photometric_interpretation", photometric)), plugin
        except Exception as err:
            # pydicom: "Unable to decode as exceptions were raised by all available plugins:\n  name: why"
            msg = str(err).split("plugins:", 1)[-1].strip()
            if msg.startswith(f"{plugin}: "):
                msg = msg[len(plugin) + 2 :]
            failures.append(f"{plugin}: {_one_line(msg or type(err).__name__, 160)}")
    try:
        arr, pi = _decode_with_gdcm(data, path)
        return arr, pi, "gdcm"
    except RuntimeError as err:
        failures.append(f"gdcm: {_one_line(err, 160)}")
    hint = f"; missing codec: {_CODEC_HINT}" if not plugins else ""
    raise CXRReadError(
        path,
        f"decode failed for {getattr(ts, 'name', ts)} pixel data; every decoder failed: "
        + "; ".join(failures) + hint,
    )


def _to_gray(pixels: np.ndarray, photometric: str, ds: Any, path: str | None) -> tuple[np.ndarray, str] | None:
    """Colour to [0, 1] grayscale with PIL's "L" weights, as a colour PNG is read. None if monochrome."""
    if photometric.startswith("MONOCHROME"):
        return None
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        try:
            rgb = apply_color_lut(pixels, ds)
        except Exception as err:
            raise CXRReadError(path, f"PALETTE COLOR image without a usable palette ({_one_line(err)})") from None
        bits = 16 if rgb.dtype.itemsize > 1 else 8
        desc = ds.get("RedPaletteColorLookupTableDescriptor")
        if desc is not None and len(desc) == 3 and int(desc[2]) in (8, 16):
            bits = int(desc[2])
        note = "palette colour converted to grayscale"
    elif photometric == "RGB" and pixels.ndim == 3 and pixels.shape[-1] == 3:
        rgb = pixels
        bits = _header_int(ds, "BitsStored", 8 * pixels.dtype.itemsize, path)
        note = "RGB converted to grayscale"
    else:
        raise CXRReadError(path, f"unsupported photometric interpretation {photometric!r} for a CXR")
    rgb = rgb.astype(np.float64)
    gray = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    return np.clip(gray / float(2**bits - 1), 0.0, 1.0).astype(np.float32), note


def _read_dicom(data: bytes, path: str | None) -> tuple[np.ndarray, ImageInfo]:
    import pydicom

    with _pydicom_quiet() as notes:
        header, read_full, forced = _read_dicom_dataset(data, path)
        eof = [n for n in notes if "end of file" in n.lower() or "expected" in n.lower() and "bytes" in n.lower()]
        if forced and "Rows" not in header and "SOPClassUID" not in header:
            raise CXRReadError(path, "not a DICOM image (no 'DICM' prefix, and read without file meta it holds "
                                     "no SOP class, Rows or pixel data)")
        if "Rows" not in header or "Columns" not in header:
            if eof:
                raise CXRReadError(path, f"truncated DICOM file ({_one_line(eof[0])})")
            raise CXRReadError(path, "DICOM file has no image: no Rows/Columns or pixel data (a non-image object "
                                     "such as a report or plan, a file cut short, or a misdeclared transfer syntax)")
        rows = _header_int(header, "Rows", 0, path)
        cols = _header_int(header, "Columns", 0, path)
        frames = _header_int(header, "NumberOfFrames", 1, path) or 1
        spp = _header_int(header, "SamplesPerPixel", 1, path) or 1
        if rows <= 0 or cols <= 0:
            raise CXRReadError(path, "DICOM header has no usable Rows/Columns (not an image, or a file cut short)")
        # the pixel limit comes before anything else: nothing is decoded or inflated above it
        _check_shape(path, rows, cols, frames)
        if frames > 1:
            raise CXRReadError(path, f"multi-frame DICOM with {frames} frames (a 3-D volume or a cine); expected one 2-D X-ray")
        if spp not in (1, 3):
            raise CXRReadError(path, f"DICOM SamplesPerPixel is {spp}; expected 1 (grayscale) or 3 (colour)")

        try:
            ds = read_full()
        except CXRReadError:
            raise
        except Exception as err:
            raise CXRReadError(path, f"corrupt or truncated DICOM file ({type(err).__name__}: {_one_line(err)})") from None
        if not any(t in ds for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            if eof or any("end of file" in n.lower() for n in notes):
                raise CXRReadError(path, "truncated DICOM file (pixel data missing: the file is cut short)")
            raise CXRReadError(path, "DICOM file has no pixel data (a header-only object, or a file cut short)")
        ts = ds.file_meta.get("TransferSyntaxUID") if getattr(ds, "file_meta", None) is not None else None
        if ts is None:
            # no file meta (pydicom read it with force=True): name the encoding it was read with
            implicit, little = ds.original_encoding
            ts = pydicom.uid.ImplicitVRLittleEndian if implicit else (
                pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian)
            ds.file_meta = getattr(ds, "file_meta", None) or pydicom.dataset.FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ts
        ts = pydicom.uid.UID(str(ts))
        ts_name = ts.name if ts.is_valid else str(ts)
        if ts.is_compressed and "PixelData" in ds:
            declared = _codestream_size(ds, ts)
            if declared and declared[0] * declared[1] > MAX_PIXELS:
                raise CXRReadError(
                    path,
                    f"compressed pixel data declares {declared[0]}x{declared[1]} pixels (the header says "
                    f"{cols}x{rows}), above the limit of {MAX_PIXELS:,}; refused before decoding (corrupt, or a "
                    "decompression bomb)",
                )
        pixels, photometric, decoder = _decode_pixels(ds, data, ts, path)

    bits_stored = _header_int(ds, "BitsStored", _header_int(ds, "BitsAllocated", 8, path), path) or 8
    original_pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    gray = _to_gray(pixels, photometric, ds, path)
    if gray is not None:
        arr, note = gray
        has_voi = False
    else:
        if pixels.ndim != 2:
            raise CXRReadError(path, f"DICOM pixel array has shape {pixels.shape}; expected one 2-D image")
        arr, has_voi = _mono_to_unit(pixels, ds, bits_stored, path)
        if photometric == "MONOCHROME1":
            arr = 1.0 - arr
        note = None
    arr = arr.astype(np.float32, copy=False)
    extra: dict[str, Any] = {
        "view_position": str(ds.get("ViewPosition", "")) or None,
        "rescale": "RescaleSlope" in ds,
        "voi": has_voi,
        "decoder": decoder,
    }
    if note:
        extra["colour"] = note
    if forced:
        extra["file_meta"] = "missing (read with force=True)"
    info = ImageInfo(
        path=str(path),
        format="dicom",
        width=cols,
        height=rows,
        bit_depth=bits_stored,
        photometric=original_pi,
        min_value=float(pixels.min()),
        max_value=float(pixels.max()),
        frames=frames,
        transfer_syntax=ts_name,
        modality=str(ds.get("Modality", "")) or None,
        extra=extra,
    )
    return arr, info


def _mono_to_unit(pixels: np.ndarray, ds: Any, bits_stored: int, path: str | None) -> tuple[np.ndarray, bool]:
    """Modality LUT, then the VOI LUT or window if present, then scale to [0, 1]."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            modality = apply_modality_lut(pixels, ds)
            arr = modality.astype(np.float32)
            has_voi = "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)
            if has_voi:
                # a LUT is indexed by integer values: feeding it floats gives wrong results (pydicom warns)
                voi_in = np.rint(modality).astype(np.int64) if "VOILUTSequence" in ds else arr
                arr = apply_voi_lut(voi_in, ds, prefer_lut=True).astype(np.float32)
                lo, hi = _voi_range(ds, arr)
            else:
                # BitsStored bounds the stored values; after a modality LUT, use the data's own span.
                slope = float(ds.get("RescaleSlope", 1) or 1)
                intercept = float(ds.get("RescaleIntercept", 0) or 0)
                signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
                smin = -(2 ** (bits_stored - 1)) if signed else 0
                smax = 2 ** (bits_stored - 1) - 1 if signed else 2**bits_stored - 1
                a, b = smin * slope + intercept, smax * slope + intercept
                lo, hi = (min(a, b), max(a, b))
                dmin, dmax = float(arr.min()), float(arr.max())
                # Many files store far fewer bits of signal than BitsStored admits; stretch only when
                # the data use less than 1/16 of the nominal range, so ordinary files keep their contrast.
                if (dmax - dmin) < (hi - lo) / 16:
                    lo, hi = dmin, dmax
    except CXRReadError:
        raise
    except (TypeError, ValueError, IndexError, KeyError, AttributeError) as err:
        raise CXRReadError(path, f"malformed DICOM LUT or rescale values ({type(err).__name__}: {_one_line(err)})") from None
    span = hi - lo if hi > lo else 1.0
    return np.clip((arr - lo) / span, 0.0, 1.0), has_voi


def _voi_range(ds: Any, arr: np.ndarray) -> tuple[float, float]:
    """Output range of the VOI transform: the LUT's bit range, or the window's own bounds."""
    if "VOILUTSequence" in ds:
        desc = ds.VOILUTSequence[0].get("LUTDescriptor", None)
        if desc is not None:
            return 0.0, float(2 ** int(desc[2]) - 1)
    return float(arr.min()), float(arr.max())


# --------------------------------------------------------------------------- public API


def max_file_bytes() -> int:
    """The largest image file read: an uncompressed MAX_PIXELS image at 64 bits per pixel (a float64 TIFF,
    16-bit RGBA), plus a header."""
    return 8 * MAX_PIXELS + MAX_DICOM_HEADER_BYTES


def _load_bytes(path: str | os.PathLike) -> bytes:
    p = Path(path)
    if not p.exists():
        raise CXRReadError(path, "file not found")
    if p.is_dir():
        raise CXRReadError(path, "is a directory, not an image file")
    try:
        size = p.stat().st_size
        limit = max_file_bytes()
        if size > limit:  # checked before reading: a huge file never reaches memory
            raise CXRReadError(path, f"file is {size:,} bytes, above the limit of {limit:,} for one image (8 bytes "
                                     "for each of covidcxr.io.MAX_PIXELS pixels plus a header); refused unread")
        data = p.read_bytes()
    except OSError as err:
        raise CXRReadError(path, f"cannot read file ({err.strerror or err})") from None
    if not data:
        raise CXRReadError(path, "file is empty (0 bytes)")
    return data


def decode(data: bytes, path: str | os.PathLike | None = None) -> tuple[np.ndarray, ImageInfo]:
    """Decode in-memory bytes (an upload, say). Format comes from the content, never the name."""
    if not data:
        raise CXRReadError(path, "file is empty (0 bytes)")
    kind = _sniff(data)
    name = str(path) if path else None
    if kind == "dicom":
        reader = _read_dicom
    elif kind in ("png", "jpeg", "tiff", "bmp"):
        reader = _read_raster
    elif path is not None and Path(str(path)).suffix.lower() in DICOM_SUFFIXES:
        reader = _read_dicom  # DICOM without the 128-byte preamble is still legal; try it before giving up
    else:
        raise CXRReadError(path, "not a supported image (expected PNG, JPEG, TIFF or DICOM content)")
    try:
        arr, info = reader(data, name)
    except (CXRReadError, MemoryError, KeyboardInterrupt, ImportError):
        raise
    except Exception as err:  # noqa: BLE001  a decoder's own surprise on a corrupt file is still a bad file
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EACCES, errno.EMFILE, errno.ENFILE):
            raise  # this machine's fault (no space, permissions, file handles), not the file's
        raise CXRReadError(path, f"cannot decode {'DICOM' if reader is _read_dicom else kind.upper()} file "
                                 f"({type(err).__name__}: {str(err)[:200] or 'no detail'})") from None
    if not np.isfinite(arr).all():  # a float TIFF or DICOM with NaN/Inf pixels would give NaN probabilities
        raise CXRReadError(path, "image has NaN or infinite pixel values")
    return arr, info


def read_image_with_info(path: str | os.PathLike) -> tuple[np.ndarray, ImageInfo]:
    """Read a file; return the [0, 1] float32 array and what :func:`inspect` reports."""
    return decode(_load_bytes(path), path)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a CXR file as a 2-D float32 array in [0, 1] (0 = black). Raises CXRReadError."""
    return read_image_with_info(path)[0]


def inspect(path: str | os.PathLike) -> ImageInfo:
    """Describe a file: format, size, bit depth, photometric interpretation, stored value range."""
    return read_image_with_info(path)[1]


def is_supported(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in SUPPORTED_SUFFIXES


# Hashing a 46 MB weights file costs ~0.1 s: remember digests by (path, size, mtime) within a process.
_SHA256: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 hex digest of a file's bytes (weights, checkpoints, manifests), cached per process."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA256:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        _SHA256[key] = h.hexdigest()
    return _SHA256[key]
