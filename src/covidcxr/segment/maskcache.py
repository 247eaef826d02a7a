"""The mask cache: low-resolution lung maps by (segmenter id, image pixel hash), so that an audit or a
training run never segments the same image twice.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from covidcxr.segment.segmenter import LungSegmenter


def image_hash(image: np.ndarray) -> str:
    """sha256 of the image's pixels (as 8-bit) and shape: the same picture from two files hashes alike."""
    a = np.asarray(image)
    u8 = np.clip(a * 255.0 + 0.5, 0, 255).astype(np.uint8) if a.dtype.kind == "f" else a.astype(np.uint8)
    h = hashlib.sha256(str(u8.shape).encode())
    h.update(np.ascontiguousarray(u8).tobytes())
    return h.hexdigest()


class MaskCache:
    """Low-resolution lung maps by (segmenter id, image hash): in memory (LRU) and, with ``folder``, on disk.

    Entries are what :meth:`LungSegmenter.low_res` returns (S x S at the segmenter's resolution, float16), never
    full-size masks: memory per entry is bounded by the segmenter's size, not the image's (issue 21 §2.7). On
    disk they are 16-bit PNGs under ``lowres/`` (older full-size mask PNGs beside it are not read).
    """

    def __init__(self, folder: str | os.PathLike | None = None, max_items: int = 512):
        self.folder = Path(folder) if folder else None
        self.max_items = max_items
        self._mem: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self.hits = self.misses = 0

    def _file(self, seg_id: str, key: str) -> Path | None:
        if self.folder is None:
            return None
        safe = hashlib.sha256(seg_id.encode()).hexdigest()[:16]
        return self.folder / safe / "lowres" / key[:2] / f"{key}.png"

    def get(self, seg_id: str, key: str) -> np.ndarray | None:
        m = self._mem.get((seg_id, key))
        if m is None:
            f = self._file(seg_id, key)
            if f is not None and f.is_file():
                raw = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
                m = (raw.astype(np.float32) / 65535.0).astype(np.float16) if raw is not None else None
        if m is None:
            self.misses += 1
            return None
        self.hits += 1
        self._remember(seg_id, key, m)
        return m.copy()

    def put(self, seg_id: str, key: str, mask: np.ndarray) -> None:
        self._remember(seg_id, key, mask)
        f = self._file(seg_id, key)
        if f is not None:
            f.parent.mkdir(parents=True, exist_ok=True)
            tmp = f.with_suffix(f".{os.getpid()}.tmp.png")
            cv2.imwrite(str(tmp), np.round(np.clip(np.asarray(mask, np.float32), 0, 1) * 65535).astype(np.uint16))
            os.replace(tmp, f)

    def _remember(self, seg_id: str, key: str, mask: np.ndarray) -> None:
        self._mem[(seg_id, key)] = np.asarray(mask, np.float16)
        self._mem.move_to_end((seg_id, key))
        while len(self._mem) > self.max_items:
            self._mem.popitem(last=False)


class CachedSegmenter:
    """``(image) -> mask`` through a :class:`MaskCache`; ``segment_many`` batches the misses."""

    def __init__(self, segmenter: LungSegmenter, cache: MaskCache | None = None):
        self.segmenter = segmenter
        self.cache = cache or MaskCache()
        self.calls = 0  # images actually segmented

    @property
    def id(self) -> str:
        return self.segmenter.id

    def segment_many(self, images: Sequence[np.ndarray], batch_size: int = 4) -> list[np.ndarray]:
        keys = [image_hash(im) for im in images]
        found: dict[str, np.ndarray] = {}  # low-resolution maps; a mask is made at each image's size below
        for k in dict.fromkeys(keys):
            m = self.cache.get(self.id, k)
            if m is not None:
                found[k] = m
        todo = [keys.index(k) for k in dict.fromkeys(keys) if k not in found]  # one image per distinct hash
        for s in range(0, len(todo), batch_size):
            chunk = todo[s : s + batch_size]
            for i, m in zip(chunk, self.segmenter.low_res([images[i] for i in chunk]), strict=True):
                self.cache.put(self.id, keys[i], m)
                found[keys[i]] = m
            self.calls += len(chunk)
        return [self.segmenter.mask_from_low_res(found[k], np.shape(im)[:2]) for k, im in zip(keys, images)]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return self.segment_many([image])[0]

