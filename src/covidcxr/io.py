"""Read chest X-rays from PNG, JPEG, TIFF or DICOM into one float32 grayscale array.

Every reader returns a 2-D ``float32`` array in **[0, 1]**, where 0 is the darkest
displayed value (air) and 1 the brightest (bone), whatever the bit depth or the
DICOM photometric interpretation. Every failure raises :class:`CXRReadError`,
whose message names the file and the reason.

Patient-identifying DICOM tags are never read into the returned metadata, so they
cannot reach logs or outputs.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: Largest image we decode, in pixels. Real CXRs are at most ~4k x 4k (16 MP);
#: anything much larger is treated as a decompression bomb.
MAX_PIXELS = 64_000_000
#: Smallest side accepted: below this an image cannot be a usable CXR.
MIN_SIDE = 64

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


def _check_shape(path: str | None, height: int, width: int) -> None:
    if height * width > MAX_PIXELS:
        raise CXRReadError(
            path,
            f"image is {width}x{height} = {width * height:,} pixels, above the limit of "
            f"{MAX_PIXELS:,} (possible decompression bomb); covidcxr.io.MAX_PIXELS sets it",
        )
    if min(height, width) < MIN_SIDE:
        raise CXRReadError(
            path, f"image is {width}x{height}, too small to be a chest X-ray (minimum side {MIN_SIDE} px)"
        )


# --------------------------------------------------------------------------- raster images


def _read_raster(data: bytes, path: str | None) -> tuple[np.ndarray, ImageInfo]:
    from PIL import Image, ImageFile

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    import io as _io

    try:
        with warnings.catch_warnings():
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
        raise CXRReadError(
            path,
            f"refused as a possible decompression bomb: above the limit of {MAX_PIXELS:,} pixels "
            f"(covidcxr.io.MAX_PIXELS) [{err}]",
        ) from None
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

_CODEC_HINT = (
    "install the pixel-data plugins: pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg "
    "(covidcxr's default install includes them)"
)


def _read_dicom(data: bytes, path: str | None) -> tuple[np.ndarray, ImageInfo]:
    import io as _io

    import pydicom
    from pydicom.errors import InvalidDicomError

    import logging

    # pydicom reports a file cut short as a warning (and a log line); turn it into one clear error.
    pd_log = logging.getLogger("pydicom")
    old_level = pd_log.level
    pd_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(_io.BytesIO(data), force=False)
    except InvalidDicomError as err:
        raise CXRReadError(path, f"not a valid DICOM file ({err})") from None
    except Exception as err:  # pydicom raises many types on truncated headers
        raise CXRReadError(path, f"corrupt or truncated DICOM header ({type(err).__name__}: {err})") from None
    finally:
        pd_log.setLevel(old_level)
    eof = [str(w.message) for w in caught if "end of file" in str(w.message).lower()]
    if eof:
        raise CXRReadError(path, f"truncated DICOM file ({eof[0]})")

    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise CXRReadError(path, "DICOM file has no pixel data (a header-only object, or a file cut short)")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise CXRReadError(path, f"multi-frame DICOM with {frames} frames (a 3-D volume); expected one 2-D X-ray")
    _check_shape(path, rows, cols)
    tsuid = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    ts_name = getattr(tsuid, "name", str(tsuid)) if tsuid is not None else None
    try:
        pixels = ds.pixel_array
    except (NotImplementedError, RuntimeError) as err:
        raise CXRReadError(
            path, f"cannot decode compressed pixel data (transfer syntax {ts_name}): missing codec; {_CODEC_HINT} [{err}]"
        ) from None
    except Exception as err:
        if "less than expected" in str(err):
            raise CXRReadError(path, f"truncated DICOM pixel data ({err})") from None
        raise CXRReadError(path, f"cannot decode DICOM pixel data ({type(err).__name__}: {err})") from None
    if pixels.ndim != 2:
        raise CXRReadError(path, f"DICOM pixel array has shape {pixels.shape}; expected one 2-D grayscale image")

    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    modality = apply_modality_lut(pixels, ds)
    arr = modality.astype(np.float32)
    has_voi = "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)
    bits_stored = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)) or 8)
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
    span = hi - lo if hi > lo else 1.0
    arr = np.clip((arr - lo) / span, 0.0, 1.0)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "MONOCHROME1":
        arr = 1.0 - arr
    elif photometric not in ("MONOCHROME2",):
        raise CXRReadError(path, f"unsupported photometric interpretation {photometric!r} for a CXR")
    arr = arr.astype(np.float32, copy=False)
    info = ImageInfo(
        path=str(path),
        format="dicom",
        width=cols,
        height=rows,
        bit_depth=bits_stored,
        photometric=photometric,
        min_value=float(pixels.min()),
        max_value=float(pixels.max()),
        frames=frames,
        transfer_syntax=ts_name,
        modality=str(ds.get("Modality", "")) or None,
        extra={
            "view_position": str(ds.get("ViewPosition", "")) or None,
            "rescale": "RescaleSlope" in ds,
            "voi": has_voi,
        },
    )
    return arr, info


def _voi_range(ds: Any, arr: np.ndarray) -> tuple[float, float]:
    """Output range of the VOI transform: the LUT's bit range, or the window's own bounds."""
    if "VOILUTSequence" in ds:
        desc = ds.VOILUTSequence[0].get("LUTDescriptor", None)
        if desc is not None:
            return 0.0, float(2 ** int(desc[2]) - 1)
    return float(arr.min()), float(arr.max())


# --------------------------------------------------------------------------- public API


def _load_bytes(path: str | os.PathLike) -> bytes:
    p = Path(path)
    if not p.exists():
        raise CXRReadError(path, "file not found")
    if p.is_dir():
        raise CXRReadError(path, "is a directory, not an image file")
    try:
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
    if kind == "dicom":
        return _read_dicom(data, str(path) if path else None)
    if kind in ("png", "jpeg", "tiff", "bmp"):
        return _read_raster(data, str(path) if path else None)
    # DICOM without the 128-byte preamble is still legal; try it before giving up.
    if path is not None and Path(str(path)).suffix.lower() in DICOM_SUFFIXES:
        return _read_dicom(data, str(path))
    raise CXRReadError(path, "not a supported image (expected PNG, JPEG, TIFF or DICOM content)")


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
