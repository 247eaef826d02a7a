"""Link patients across (and within) sources through duplicate images.

When one picture appears under two patient ids (byte-identical, or re-encoded/rescaled so that the
perceptual hashes are within a few bits), the two ids are the same person: Cohen re-published
Hannover images under its own patient numbers, Figure1 re-used Cohen cases, and so on. The ids are
joined by union-find into one **person**, and the manifest's ``patient_id`` becomes that person's id,
so that both the split and every patient-level bootstrap (``covidcxr evaluate``) group the images
of one person together. The id a source wrote is kept in ``source_patient_id``.

A person's id is the first of its source ids in sorted order (``cohen-118`` for a Hannover patient
whose pictures are also cohen-118's), so an unlinked patient keeps its own id.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import numpy as np
import pandas as pd

from covidcxr.data.duplicates import ImageFeatures, duplicate_pairs
from covidcxr.data.hashing import NEAR_DUPLICATE_BITS


class UnionFind:
    """Union-find over hashable ids; the representative of a set is its smallest member."""

    def __init__(self, items: Iterable[str] = ()):
        self.parent: dict[str, str] = {x: x for x in items}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:  # path compression
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            lo, hi = (ra, rb) if ra < rb else (rb, ra)
            self.parent[hi] = lo


def link_patients(df: pd.DataFrame, feats: ImageFeatures | None = None, dedupe: bool = True,
                  max_bits: int = NEAR_DUPLICATE_BITS) -> tuple[pd.DataFrame, dict[str, int], list[dict]]:
    """Drop byte-identical copies and join patients that share a picture.

    ``df`` has one row per image with the source's ``patient_id``; ``feats`` holds its fingerprints
    (:func:`covidcxr.data.duplicates.image_features`, rows aligned). With ``dedupe`` the first of
    byte-identical files is kept and the others dropped; verified near and transformed duplicates
    (:func:`covidcxr.data.duplicates.duplicate_pairs`) are kept and linked.

    Returns ``(frame, dropped, links)``:
    - ``frame``: ``patient_id`` is the linked person, ``source_patient_id`` the source's id, and
      ``duplicate_of`` lists ('|'-separated) the paths of the images that link this row to another
      source patient id (empty when it links nobody);
    - ``dropped``: counts for the build summary;
    - ``links``: one record per linking image pair (``patients``, ``paths``, ``kind``, ``score``).
    """
    df = df.reset_index(drop=True).copy()
    if "source_patient_id" not in df.columns:
        df["source_patient_id"] = df["patient_id"].astype(str)
    src = df["source_patient_id"].astype(str).to_numpy()
    paths = df["path"].astype(str).to_numpy()
    links: list[dict] = []
    dropped: dict[str, int] = {}
    keep = np.ones(len(df), bool)
    digests = feats.digests if feats is not None else None
    if digests is not None and len(digests) != len(df):
        raise ValueError(f"{len(digests)} fingerprints for {len(df)} rows")
    if digests is not None:
        known = np.array([d is not None for d in digests])
        codes = pd.Series([d if d is not None else f"row{i}" for i, d in enumerate(digests)])
        first = pd.Series(np.arange(len(df))).groupby(codes.to_numpy()).transform("first").to_numpy()
        for i in np.flatnonzero((first != np.arange(len(df))) & known).tolist():
            f = int(first[i])
            if dedupe:
                keep[i] = False
            if src[i] != src[f]:
                links.append({"patients": [src[f], src[i]], "paths": [paths[f], paths[i]],
                              "kind": "identical", "score": 0, "rows": (f, -1 if dedupe else i)})
        if (~keep).any():
            dropped["byte-identical duplicate image"] = int((~keep).sum())
    if feats is not None and feats.hashes is not None:
        pairs = duplicate_pairs(feats, max_bits, skip=set(np.flatnonzero(~keep).tolist()))
        for a, b, kind, score in pairs:
            if src[a] != src[b]:
                links.append({"patients": [src[a], src[b]], "paths": [paths[a], paths[b]],
                              "kind": kind, "score": int(score), "rows": (a, b)})
        if pairs:
            dropped["near-duplicate pairs kept in one split"] = len(pairs)
    uf = UnionFind(sorted(set(src)))
    partners: dict[int, set[str]] = defaultdict(set)
    for ln in links:
        uf.union(*ln["patients"])
        a, b = ln.pop("rows")
        partners[a].add(ln["paths"][1])
        if b >= 0:
            partners[b].add(ln["paths"][0])
    df["patient_id"] = [uf.find(s) for s in src]
    df["duplicate_of"] = ["|".join(sorted(partners[k])) if k in partners else np.nan for k in range(len(df))]
    for ln in links:
        ln["person"] = uf.find(ln["patients"][0])
    return df[keep].reset_index(drop=True), dropped, links


def linked_persons(links: list[dict]) -> list[dict]:
    """Group link records by person: ``[{person, patients, images: [[path, path, kind, score], ...]}]``
    (score: phash bits for ``near``, RANSAC inliers for ``transformed``, 0 for ``identical``)."""
    by: dict[str, dict] = {}
    for ln in links:
        p = by.setdefault(ln["person"], {"person": ln["person"], "patients": set(), "images": []})
        p["patients"].update(ln["patients"])
        p["images"].append([*ln["paths"], ln["kind"], ln["score"]])
    return [{**v, "patients": sorted(v["patients"])} for _, v in sorted(by.items())]


__all__ = ["UnionFind", "link_patients", "linked_persons"]
