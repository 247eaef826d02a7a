"""On-disk cache of prepared images, so epochs after the first never decode JPEG or DICOM again.

Each entry is the output of ``preset.prepare`` quantised to uint8 (1/255, the precision of the 8-bit
sources) and stored raw, after an 8-byte ``height, width`` header, under
``<cache_dir>/<preset fingerprint>/<key[:2]>/<key>.u8``: reading one back is a single ``read`` and
``np.frombuffer`` (``np.load``'s header parsing alone cost more than the rest of a cached item).
The key hashes the absolute path, file size and modification time (and the mask's), so an edited
file or a changed preset never returns a stale image. Writes are atomic (temp file + rename), so
several workers or ranks can fill one cache at once.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np


def _stamp(path: str | os.PathLike | None) -> str:
    if path is None:
        return "-"
    st = os.stat(path)
    return f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"


class PreparedCache:
    """Raw uint8 image store keyed by file identity + preset fingerprint."""

    def __init__(self, cache_dir: str | os.PathLike, fingerprint: str):
        self.root = Path(cache_dir) / fingerprint
        self.root.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def key(self, path: str | os.PathLike, mask_path: str | os.PathLike | None = None) -> str:
        return hashlib.sha1(f"{_stamp(path)}#{_stamp(mask_path)}".encode()).hexdigest()

    def _file(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.u8"

    def get(self, key: str) -> np.ndarray | None:
        try:
            with open(self._file(key), "rb") as fh:
                data = fh.read()
            h, w = (int(v) for v in np.frombuffer(data, dtype="<u4", count=2))
            if len(data) != 8 + h * w:
                raise ValueError("incomplete cache entry")
        except (FileNotFoundError, ValueError, OSError):
            self.misses += 1
            return None
        self.hits += 1
        return np.frombuffer(data, dtype=np.uint8, offset=8).reshape(h, w).astype(np.float32) * np.float32(1.0 / 255.0)

    def put(self, key: str, image: np.ndarray) -> np.ndarray:
        """Store ``image`` and return it as it will come back from :meth:`get` (quantised), so the
        first epoch sees exactly what later, cached epochs see."""
        f = self._file(key)
        f.parent.mkdir(parents=True, exist_ok=True)
        u8 = np.clip(np.asarray(image, dtype=np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        if u8.ndim != 2:
            raise ValueError(f"cache stores 2-D images, got shape {u8.shape}")
        fd, tmp = tempfile.mkstemp(dir=f.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(np.asarray(u8.shape, dtype="<u4").tobytes())
                fh.write(np.ascontiguousarray(u8).tobytes())
            os.replace(tmp, f)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return u8.astype(np.float32) * np.float32(1.0 / 255.0)

    def __contains__(self, key: str) -> bool:
        return self._file(key).is_file()
