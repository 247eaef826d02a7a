"""Image fingerprints: SHA-1 of the bytes, a 64-bit perceptual hash, and a near-duplicate search
that scales to COVIDx size (hundreds of thousands of hashes) in little memory.

The search is a multi-index hash (Norouzi et al., "Fast search in Hamming space with multi-index
hashing", CVPR 2012): split the 64 bits into ``max_bits + 1`` chunks; by the pigeonhole principle two
hashes that differ in at most ``max_bits`` bits agree exactly on at least one chunk. So only hashes
that share a chunk value (a bucket) are compared, with ``np.bitwise_count`` on blocks of at most
``block x bucket`` pairs. A pair that shares several chunks is reported once, by its first shared chunk.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

#: Hamming distance (of 64 bits) at or below which two perceptual hashes count as the same image.
NEAR_DUPLICATE_BITS = 6
#: Rows compared at once inside one bucket: caps the temporary distance block at block x bucket bytes.
_BLOCK = 2048


def file_digest(path: str | os.PathLike) -> str:
    """SHA-1 of a file's bytes: finds byte-identical images under different names or patients."""
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def phash(path: str | os.PathLike) -> int:
    """64-bit perceptual hash (imagehash.phash) of the decoded image, as an int."""
    import imagehash
    from PIL import Image

    from covidcxr.io import read_image

    img = Image.fromarray(np.clip(read_image(path) * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    return int(str(imagehash.phash(img, hash_size=8)), 16)


def _chunks(n_chunks: int) -> list[tuple[int, int]]:
    """(shift, width) of ``n_chunks`` near-equal bit fields covering 64 bits."""
    widths = [64 // n_chunks + (1 if k < 64 % n_chunks else 0) for k in range(n_chunks)]
    shifts = np.cumsum([0] + widths[:-1]).tolist()
    return list(zip(shifts, widths))


def _pairs_in(idx: np.ndarray, h: np.ndarray, max_bits: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (a < b positions in ``idx``) of one bucket within ``max_bits``, compared block by block."""
    hb = h[idx]
    out_i, out_j, out_d = [], [], []
    for r in range(0, len(idx) - 1, block):
        rows = hb[r : r + block]
        d = np.bitwise_count(rows[:, None] ^ hb[None, r:])  # uint8, block x (bucket - r)
        ii, jj = np.nonzero(d <= max_bits)
        keep = jj > ii  # column jj is position r + jj; keep each unordered pair once, no self-pairs
        ii, jj = ii[keep], jj[keep]
        out_i.append(idx[r + ii])
        out_j.append(idx[r + jj])
        out_d.append(d[ii, jj])
    if not out_i:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.uint8)
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_d)


def near_pair_arrays(hashes: np.ndarray, max_bits: int = NEAR_DUPLICATE_BITS,
                     block: int = _BLOCK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs ``i < j`` whose 64-bit hashes differ in at most ``max_bits`` bits, as arrays
    ``(i, j, distance)`` sorted by ``(i, j)``. Memory stays O(N + block x largest bucket)."""
    h = np.ascontiguousarray(np.asarray(hashes).astype(np.uint64))
    n = len(h)
    if n < 2 or max_bits < 0:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.uint8)
    # Chunks narrower than 4 bits make buckets as large as the whole set: compare everything once then.
    chunks = _chunks(max_bits + 1) if max_bits + 1 <= 16 else [(0, 0)]
    found_i, found_j, found_d = [], [], []
    for k, (shift, width) in enumerate(chunks):
        key = (h >> np.uint64(shift)) & np.uint64((1 << width) - 1) if width else np.zeros(n, np.uint64)
        order = np.argsort(key, kind="stable")
        sk = key[order]
        cut = np.flatnonzero(sk[1:] != sk[:-1]) + 1
        starts, ends = np.r_[0, cut], np.r_[cut, n]
        for s, e in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
            i, j, d = _pairs_in(np.sort(order[s:e]), h, max_bits, block)
            if k and len(i):  # reported already if an earlier chunk also matches
                x = h[i] ^ h[j]
                seen = np.zeros(len(i), bool)
                for s2, w2 in chunks[:k]:
                    seen |= ((x >> np.uint64(s2)) & np.uint64((1 << w2) - 1)) == 0
                i, j, d = i[~seen], j[~seen], d[~seen]
            if len(i):
                found_i.append(i)
                found_j.append(j)
                found_d.append(d)
    if not found_i:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.uint8)
    i, j, d = np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_d)
    order = np.lexsort((j, i))
    return i[order].astype(np.int64), j[order].astype(np.int64), d[order]


def near_pairs(hashes: np.ndarray, max_bits: int = NEAR_DUPLICATE_BITS, chunk: int = _BLOCK) -> list[tuple[int, int, int]]:
    """All pairs (i < j) whose 64-bit hashes differ in at most ``max_bits`` bits, with the distance."""
    i, j, d = near_pair_arrays(hashes, max_bits, block=chunk)
    return list(zip(i.tolist(), j.tolist(), d.tolist()))


__all__ = ["NEAR_DUPLICATE_BITS", "file_digest", "phash", "near_pairs", "near_pair_arrays"]
