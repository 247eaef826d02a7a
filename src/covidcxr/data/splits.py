"""Merge sources into one manifest and split it by patient (stratified, deterministic, leak-free)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from covidcxr.data.labels import CLASSES
from covidcxr.data.manifest import ManifestError, write_manifest
from covidcxr.data.sources import load_source

log = logging.getLogger(__name__)

#: Stratification priority: a patient with any COVID-19 image is a COVID-19 patient, etc.
_PRIORITY = {"COVID-19": 0, "pneumonia": 1, "normal": 2}


def file_digest(path: str | os.PathLike) -> str:
    """SHA-1 of a file's bytes: finds byte-identical images under different names or patients."""
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _groups(patients: pd.Series, links: Iterable[tuple[str, str]]) -> pd.Series:
    """Split groups: patients joined (union-find) when they share an identical or near-identical
    image, so one X-ray can never sit on both sides of a split."""
    parent: dict[str, str] = {p: p for p in patients.unique()}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in links:
        parent.setdefault(a, a)
        parent.setdefault(b, b)
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return patients.map(find)


def split_by_group(groups: pd.Series, labels: pd.Series, fractions: dict[str, float], seed: int) -> pd.Series:
    """Assign each group to a split so that every label stratum gets ``fractions`` of its images.

    Groups are shuffled with ``seed`` (after sorting, so the result never depends on row order) and
    each goes to the split furthest below its target; the result is deterministic for a seed.
    """
    rng = np.random.default_rng(seed)
    names = [k for k, v in fractions.items() if v > 0]
    frac = np.array([fractions[k] for k in names], dtype=float)
    frac = frac / frac.sum()
    size = groups.value_counts()
    strat = labels.map(lambda lab: _PRIORITY.get(lab, 3)).groupby(groups).min()
    out: dict[str, str] = {}
    for _, members in strat.groupby(strat):
        ids = np.array(sorted(members.index))
        rng.shuffle(ids)
        total = float(size[ids].sum())
        have = np.zeros(len(names))
        for g in ids:
            deficit = frac * total - have
            k = int(np.argmax(deficit))
            out[g] = names[k]
            have[k] += size[g]
    return groups.map(out)


def _summary(df: pd.DataFrame, dropped: dict[str, dict[str, int]]) -> dict:
    counts = df.groupby(["split", "label", "source"]).size()
    return {
        "images": int(len(df)),
        "patients": int(df["patient_id"].nunique()),
        "by_split": {s: int(n) for s, n in df["split"].value_counts().items()},
        "by_label": {s: int(n) for s, n in df["label"].value_counts().items()},
        "by_split_label": {f"{s}/{lab}": int(n) for (s, lab), n in df.groupby(["split", "label"]).size().items()},
        "by_split_label_source": {"/".join(k): int(n) for k, n in counts.items()},
        "patients_by_split": {s: int(n) for s, n in df.groupby("split")["patient_id"].nunique().items()},
        "dropped": dropped,
    }


def _summary_md(s: dict) -> str:
    lines = ["# Dataset build summary", "", f"{s['images']} images from {s['patients']} patients.", "",
             "| split | " + " | ".join(CLASSES) + " | images | patients |", "|---|" + "---|" * (len(CLASSES) + 2)]
    for split in ("train", "val", "test"):
        if split not in s["by_split"]:
            continue
        cells = [str(s["by_split_label"].get(f"{split}/{c}", 0)) for c in CLASSES]
        lines.append(f"| {split} | " + " | ".join(cells) + f" | {s['by_split'][split]} | {s['patients_by_split'][split]} |")
    lines += ["", "## Dropped", ""]
    for src, reasons in s["dropped"].items():
        text = ", ".join(f"{r}: {n}" for r, n in reasons.items()) or "nothing"
        lines.append(f"- {src}: {text}")
    return "\n".join(lines) + "\n"


def build_manifest(
    sources: Iterable[tuple[str, str]],
    out: str | os.PathLike,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    holdout_source: str | None = None,
    dedupe: bool = True,
    near_duplicates: bool = True,
    **kw: object,
) -> pd.DataFrame:
    """Merge ``sources`` (``(kind, path)`` pairs, see :data:`covidcxr.data.sources.ADAPTERS`) into
    ``out/manifest.csv`` split by patient into train/val/test, plus ``summary.json``/``summary.md``.

    ``val_fraction`` and ``test_fraction`` are fractions of all images, per label; val comes from the
    non-test patients. With ``holdout_source`` every image of that source is test and the others are
    split into train/val only (same train:val ratio). With ``dedupe``, byte-identical images are
    kept once and the patients that share them are kept in one split. With ``near_duplicates``, every
    image is also decoded once (unreadable ones are dropped and listed in the summary) and patients
    whose images have near-identical perceptual hashes (see :mod:`covidcxr.data.audit`) are kept in
    one split too, so ``covidcxr data audit`` passes. Extra ``kw`` go to the adapters.
    """
    if not 0 <= test_fraction < 1 or not 0 <= val_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(f"bad split fractions val={val_fraction} test={test_fraction}")
    sources = list(sources)
    if not sources:
        raise ManifestError("no sources given")
    frames, dropped = [], {}
    for kind, path in sources:
        df, why = load_source(kind, path, **kw)
        frames.append(df)
        dropped[f"{kind}={path}"] = why
    df = pd.concat(frames, ignore_index=True)
    if df.empty:
        raise ManifestError(f"no usable images in {[p for _, p in sources]}")
    before = len(df)
    df = df.drop_duplicates(subset=["path"]).reset_index(drop=True)
    if len(df) < before:
        dropped["merge"] = {"same file listed twice": before - len(df)}
    df["patient_id"] = df["patient_id"].astype(str)
    links: list[tuple[str, str]] = []
    digests = None
    if dedupe:
        digests = df["path"].map(file_digest)
        for _, pats in df.groupby(digests)["patient_id"]:
            ps = sorted(set(pats))
            links += [(ps[0], o) for o in ps[1:]]
        dup = digests.duplicated()
        if dup.any():
            dropped.setdefault("merge", {})["byte-identical duplicate image"] = int(dup.sum())
        df, digests = df[~dup].reset_index(drop=True), digests[~dup].reset_index(drop=True)
    near: list[tuple[int, int]] = []
    if near_duplicates:
        from covidcxr.data.audit import NEAR_DUPLICATE_BITS, near_pairs, phash
        from covidcxr.io import CXRReadError

        hashes, bad = np.zeros(len(df), dtype=np.uint64), []
        for i, p in enumerate(df["path"]):
            try:
                hashes[i] = phash(p)
            except CXRReadError as err:
                bad.append(i)
                log.warning("dropping unreadable image: %s", err)
        if bad:
            dropped.setdefault("merge", {})["unreadable image"] = len(bad)
            dropped.setdefault("unreadable", {})
            for i in bad:
                dropped["unreadable"][str(df.at[i, "path"])] = 1
            keep = np.setdiff1d(np.arange(len(df)), bad)
            df, hashes = df.iloc[keep].reset_index(drop=True), hashes[keep]
            digests = digests.iloc[keep].reset_index(drop=True) if digests is not None else None
        near = [(i, j) for i, j, _ in near_pairs(hashes, NEAR_DUPLICATE_BITS)]
        pid = df["patient_id"].tolist()
        links += [(pid[i], pid[j]) for i, j in near]
        if near:
            dropped.setdefault("merge", {})["near-duplicate pairs kept in one split"] = len(near)
    groups = _groups(df["patient_id"], links)

    if holdout_source is not None:
        if holdout_source not in set(df["source"]):
            raise ManifestError(f"holdout source {holdout_source!r} not among the sources {sorted(set(df['source']))}")
        held_groups = set(groups[df["source"] == holdout_source])
        is_test = groups.isin(held_groups)
        split = pd.Series("test", index=df.index)
        train_frac = 1 - val_fraction - test_fraction
        rest = ~is_test
        split[rest] = split_by_group(groups[rest], df.loc[rest, "label"],
                                     {"train": train_frac, "val": val_fraction}, seed)
        other = sorted(set(df.loc[is_test, "source"]) - {holdout_source})
        if other:
            log.warning("holdout: images of %s share patients/images with %s and go to test too", other, holdout_source)
    else:
        split = split_by_group(groups, df["label"], {"train": 1 - val_fraction - test_fraction,
                                                      "val": val_fraction, "test": test_fraction}, seed)
    df["split"] = split.values
    df = df.sort_values(["split", "source", "patient_id", "path"], key=lambda s: s.map(
        {"train": 0, "val": 1, "test": 2}) if s.name == "split" else s).reset_index(drop=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(df, out / "manifest.csv")
    summary = _summary(df, dropped)
    summary.update({"seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction,
                    "holdout_source": holdout_source, "sources": [f"{k}={p}" for k, p in sources]})
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(_summary_md(summary))
    log.info("wrote %s: %s", out / "manifest.csv", summary["by_split"])
    return df


def parse_source_spec(spec: str) -> tuple[str, str]:
    """``kind=PATH`` -> (kind, PATH)."""
    kind, sep, path = spec.partition("=")
    if not sep or not kind or not path:
        raise ManifestError(f"bad --source {spec!r}; expected KIND=PATH, e.g. csv=metadata.csv or cohen=DIR")
    return kind.strip(), path.strip()


__all__ = ["build_manifest", "split_by_group", "parse_source_spec", "file_digest"]
