"""On-disk cache of prepared images, so epochs after the first never decode JPEG or DICOM again.

Each entry is the output of ``preset.prepare`` stored as a uint8 ``.npy`` (quantised to 1/255, the
precision of the 8-bit sources) under ``<cache_dir>/<preset fingerprint>/<key[:2]>/<key>.npy``.
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
    """uint8 ``.npy`` store keyed by file identity + preset fingerprint."""

    def __init__(self, cache_dir: str | os.PathLike, fingerprint: str):
        self.root = Path(cache_dir) / fingerprint
        self.root.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def key(self, path: str | os.PathLike, mask_path: str | os.PathLike | None = None) -> str:
        return hashlib.sha1(f"{_stamp(path)}#{_stamp(mask_path)}".encode()).hexdigest()

    def _file(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npy"

    def get(self, key: str) -> np.ndarray | None:
        f = self._file(key)
        try:
            arr = np.load(f, allow_pickle=False)
        except (FileNotFoundError, ValueError, OSError, EOFError):
            self.misses += 1
            return None
        self.hits += 1
        return arr.astype(np.float32) * np.float32(1.0 / 255.0)

    def put(self, key: str, image: np.ndarray) -> np.ndarray:
        """Store ``image`` and return it as it will come back from :meth:`get` (quantised), so the
        first epoch sees exactly what later, cached epochs see."""
        f = self._file(key)
        f.parent.mkdir(parents=True, exist_ok=True)
        u8 = np.clip(np.asarray(image, dtype=np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        fd, tmp = tempfile.mkstemp(dir=f.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, u8, allow_pickle=False)
            os.replace(tmp, f)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return u8.astype(np.float32) * np.float32(1.0 / 255.0)

    def __contains__(self, key: str) -> bool:
        return self._file(key).is_file()
