"""Find the same picture under two names: byte-identical, re-encoded, or cropped/rotated/rescaled.

Three kinds of duplicate, each found without comparing every pair of images:
- ``identical``: same SHA-1 of the file bytes.
- ``near``: 64-bit perceptual hashes within ``max_bits`` (multi-index search,
  :func:`covidcxr.data.hashing.near_pair_arrays`), then **verified** by local features: on chest
  X-rays the global phash of two different patients can be within 6 bits (NIH normals against Cohen
  figures did so 37 times on the merged benchmark), so a hash match alone is not proof.
- ``transformed``: the same picture straightened, cropped and rescaled (Cohen re-published Hannover
  films this way; their phashes differ by 8-26 bits). ORB keypoints (``_N_FEATURES`` per image, at
  256 px after CLAHE) are bucketed by random 16-bit subsets of their 256-bit descriptors (LSH);
  image pairs whose descriptors share buckets often are candidates.

Every candidate is verified by matching the two images' ORB descriptors and fitting an affine map
with RANSAC: a pair is a duplicate when at least ``MIN_INLIERS`` matches agree with one map that is
close to a similarity, and the agreeing keypoints cover at least ``MIN_SPREAD`` of the frame. The
thresholds were set on the merged benchmark (``docs/data.md``): the 53 known Hannover/Cohen pairs
had 24-71 inliers covering 0.045-0.33 of the frame (0.040 for one phash match); the different NIH
films that share burned-in text reached 16-21 inliers but covered at most 0.036, or were not a
similarity.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from covidcxr.data.hashing import NEAR_DUPLICATE_BITS, file_digest, near_pair_arrays

log = logging.getLogger(__name__)

_N_FEATURES = 100
_SIDE = 256
_LSH_TABLES = 16
_LSH_BITS = 16
_MAX_BUCKET = 8  # larger buckets hold generic texture, not one picture's keypoints
#: Descriptor collisions (summed over the LSH tables) that make an image pair a candidate.
MIN_VOTES = 6
#: RANSAC inliers of an affine map that make a candidate pair a duplicate ...
MIN_INLIERS = 16
#: ... when they also cover this share of the frame (phash candidates: ``MIN_SPREAD_NEAR``).
MIN_SPREAD = 0.04
MIN_SPREAD_NEAR = 0.02


@dataclass
class ImageFeatures:
    """Per-image fingerprints, aligned with a frame's rows (``None``/empty where not computed)."""

    digests: list[str | None]
    hashes: np.ndarray | None = None  # uint64 phash per row
    descriptors: list[np.ndarray] | None = None  # ORB descriptors (k x 32 uint8) per row
    keypoints: list[np.ndarray] | None = None  # k x 2 float32 positions per row
    unreadable: list[tuple[int, str]] = field(default_factory=list)


def _orb(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import cv2

    s = _SIDE / max(img.shape)
    small = cv2.resize(img, (max(1, round(img.shape[1] * s)), max(1, round(img.shape[0] * s))), interpolation=cv2.INTER_AREA)
    u8 = cv2.createCLAHE(2.0, (8, 8)).apply(np.clip(small * 255.0 + 0.5, 0, 255).astype(np.uint8))
    kp, d = cv2.ORB_create(nfeatures=_N_FEATURES, fastThreshold=10).detectAndCompute(u8, None)
    if d is None:
        return np.zeros((0, 32), np.uint8), np.zeros((0, 2), np.float32)
    return d, np.array([k.pt for k in kp], np.float32).reshape(-1, 2)


def image_features(paths: list[str], perceptual: bool = True, local: bool = True) -> ImageFeatures:
    """Decode each image once: SHA-1, and with ``perceptual`` its phash, and with ``local`` its ORB
    keypoints. Unreadable files are listed as ``(row, message)`` in ``unreadable``."""
    import imagehash
    from PIL import Image

    from covidcxr.io import CXRReadError, read_image

    n = len(paths)
    feats = ImageFeatures(digests=[None] * n, hashes=np.zeros(n, np.uint64) if perceptual else None,
                          descriptors=[np.zeros((0, 32), np.uint8)] * n if perceptual and local else None,
                          keypoints=[np.zeros((0, 2), np.float32)] * n if perceptual and local else None)
    for i, p in enumerate(paths):
        try:
            feats.digests[i] = file_digest(p)
            if not perceptual:
                continue
            img = read_image(p)
            u8 = Image.fromarray(np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
            feats.hashes[i] = int(str(imagehash.phash(u8, hash_size=8)), 16)
            if local:
                feats.descriptors[i], feats.keypoints[i] = _orb(img)
        except CXRReadError as err:
            feats.unreadable.append((i, str(err)))
        except OSError as err:
            feats.unreadable.append((i, f"{p}: {err.strerror or err}"))
    return feats


def _lsh_candidates(descriptors: list[np.ndarray], min_votes: int, seed: int = 0) -> np.ndarray:
    """Image pairs (a < b) whose ORB descriptors collide in the LSH tables at least ``min_votes`` times."""
    sizes = [len(d) for d in descriptors]
    if sum(sizes) == 0:
        return np.zeros((0, 2), np.int64)
    owner = np.repeat(np.arange(len(descriptors)), sizes)
    packed = np.concatenate([d for d in descriptors if len(d)])  # M x 32 bytes; never unpacked (8x the memory)
    rng = np.random.default_rng(seed)
    n = np.int64(len(descriptors))
    codes = []
    for _ in range(_LSH_TABLES):
        key = np.zeros(len(packed), np.int64)
        for k, b in enumerate(rng.choice(packed.shape[1] * 8, _LSH_BITS, replace=False).tolist()):
            key |= ((packed[:, b >> 3] >> (7 - (b & 7))) & 1).astype(np.int64) << k  # bit b as np.unpackbits numbers it
        order = np.argsort(key, kind="stable")
        sk, so = key[order], owner[order]
        # bucket sizes, to skip generic buckets
        cut = np.flatnonzero(sk[1:] != sk[:-1]) + 1
        size = np.diff(np.r_[0, cut, len(sk)])
        small = np.repeat(size <= _MAX_BUCKET, size)
        for k in range(1, _MAX_BUCKET):  # every pair in a bucket sits k places apart in sorted order
            same = (sk[k:] == sk[:-k]) & small[k:]
            a, b = so[:-k][same], so[k:][same]
            keep = a != b
            a, b = a[keep], b[keep]
            if len(a):
                codes.append(np.minimum(a, b) * n + np.maximum(a, b))
            if not same.any():
                break
    if not codes:
        return np.zeros((0, 2), np.int64)
    u, c = np.unique(np.concatenate(codes), return_counts=True)
    u = u[c >= min_votes]
    return np.stack([u // n, u % n], axis=1)


def verify_pair(d1: np.ndarray, k1: np.ndarray, d2: np.ndarray, k2: np.ndarray) -> tuple[int, float]:
    """Match two images' ORB keypoints and fit one affine map with RANSAC: ``(inliers, spread)``.

    ``spread`` is the smaller of the two convex-hull areas of the inliers (as a share of the
    256-px frame), or 0 when the map is not close to a similarity (singular values differ by more
    than 20 %, or a scale outside 0.5-2): burned-in text such as "PORTABLE" gives a dozen consistent
    matches between different NIH films, but in one small patch.
    """
    import cv2

    if len(d1) < 4 or len(d2) < 4:
        return 0, 0.0
    matches = [m for m in cv2.BFMatcher(cv2.NORM_HAMMING, crossCheck=True).match(d1, d2) if m.distance <= 64]
    if len(matches) < 4:
        return 0, 0.0
    a = k1[[m.queryIdx for m in matches]]
    b = k2[[m.trainIdx for m in matches]]
    m, mask = cv2.estimateAffine2D(a, b, ransacReprojThreshold=6.0)
    if mask is None or m is None:
        return 0, 0.0
    inl = mask.ravel().astype(bool)
    sv = np.linalg.svd(m[:, :2], compute_uv=False)
    if inl.sum() < 3 or sv[1] < 0.8 * sv[0] or not 0.5 <= sv[0] <= 2.0:
        return int(inl.sum()), 0.0
    area = min(cv2.contourArea(cv2.convexHull(p[inl].astype(np.float32))) for p in (a, b))
    return int(inl.sum()), float(area) / (_SIDE * _SIDE)


def duplicate_pairs(feats: ImageFeatures, max_bits: int = NEAR_DUPLICATE_BITS, skip: set[int] | None = None,
                    min_inliers: int = MIN_INLIERS) -> list[tuple[int, int, str, int]]:
    """Verified duplicate pairs ``(i, j, kind, score)`` with ``i < j``, excluding byte-identical ones
    (``kind`` ``near``: score = phash bits; ``transformed``: score = RANSAC inliers). Rows in ``skip``
    (unreadable, or dropped copies) take no part. Without local features, phash pairs are accepted
    unverified."""
    if feats.hashes is None:
        return []
    n = len(feats.hashes)
    rows = np.array([i for i in range(n) if not skip or i not in skip], dtype=np.int64)
    a, b, bits = near_pair_arrays(feats.hashes[rows], max_bits)
    near = {(int(rows[i]), int(rows[j])): int(d) for i, j, d in zip(a, b, bits)}
    if feats.descriptors is None:
        return [(i, j, "near", d) for (i, j), d in sorted(near.items())]
    desc = [feats.descriptors[i] if (not skip or i not in skip) else np.zeros((0, 32), np.uint8) for i in range(n)]
    cands = set(near) | {(int(i), int(j)) for i, j in _lsh_candidates(desc, MIN_VOTES)}
    out = []
    rejected = 0
    for i, j in sorted(cands):
        if feats.digests[i] is not None and feats.digests[i] == feats.digests[j]:
            continue
        inl, spread = verify_pair(feats.descriptors[i], feats.keypoints[i], feats.descriptors[j], feats.keypoints[j])
        fewest = min(len(feats.descriptors[i]), len(feats.descriptors[j]))
        if (i, j) in near:
            # a small or flat image has few keypoints: half of them agreeing is enough with a hash match,
            # and with under 8 keypoints (blank, synthetic) there is nothing to verify: trust the hash
            ok = fewest < 8 or (inl >= min(min_inliers, max(4, fewest // 2)) and spread >= MIN_SPREAD_NEAR)
        else:
            ok = inl >= min_inliers and spread >= MIN_SPREAD
        if ok:
            out.append((i, j, "near", near[(i, j)]) if (i, j) in near else (i, j, "transformed", inl))
        elif (i, j) in near:
            rejected += 1
    if rejected:
        log.info("%d phash near-duplicate candidate pair(s) rejected: their local features do not match", rejected)
    return out


__all__ = ["ImageFeatures", "image_features", "duplicate_pairs", "verify_pair", "MIN_INLIERS", "MIN_VOTES"]
