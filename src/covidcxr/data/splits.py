"""Merge sources into one manifest and split it by patient (stratified, deterministic, leak-free)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from covidcxr.data.duplicates import ImageFeatures, image_features
from covidcxr.data.hashing import NEAR_DUPLICATE_BITS, file_digest
from covidcxr.data.labels import CLASSES
from covidcxr.data.linking import link_patients, linked_persons
from covidcxr.data.manifest import ManifestError, write_manifest
from covidcxr.data.sources import csv_aliases, load_source, prefix_patients

log = logging.getLogger(__name__)

#: Stratification priority: a patient with any COVID-19 image is a COVID-19 patient, etc.
_PRIORITY = {"COVID-19": 0, "pneumonia": 1, "normal": 2}


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
    src_pat = "source_patient_id" if "source_patient_id" in df.columns else "patient_id"
    return {
        "images": int(len(df)),
        "patients": int(df["patient_id"].nunique()),
        "source_patients": int(df[src_pat].nunique()),
        "by_split": {s: int(n) for s, n in df["split"].value_counts().items()},
        "by_label": {s: int(n) for s, n in df["label"].value_counts().items()},
        "by_split_label": {f"{s}/{lab}": int(n) for (s, lab), n in df.groupby(["split", "label"]).size().items()},
        "by_split_label_source": {"/".join(k): int(n) for k, n in counts.items()},
        "patients_by_split": {s: int(n) for s, n in df.groupby("split")["patient_id"].nunique().items()},
        "dropped": dropped,
    }


def _summary_md(s: dict) -> str:
    splits = [x for x in ("train", "val", "test") if x in s["by_split"]]
    labels = CLASSES + sorted(set(s["by_label"]) - set(CLASSES))
    lines = ["# Dataset build summary", "",
             f"{s['images']} images from {s['patients']} patients (persons; {s.get('source_patients', s['patients'])} "
             "patient ids as the sources wrote them).", "",
             "| split | " + " | ".join(labels) + " | images | patients |", "|---|" + "---|" * (len(labels) + 2)]
    for split in splits:
        cells = [str(s["by_split_label"].get(f"{split}/{c}", 0)) for c in labels]
        lines.append(f"| {split} | " + " | ".join(cells) + f" | {s['by_split'][split]} | {s['patients_by_split'][split]} |")
    lines += ["", "Images by class, source and split:", "",
              "| label | source | " + " | ".join(splits) + " | all |", "|---|---|" + "---|" * (len(splits) + 1)]
    cell = s["by_split_label_source"]
    sources = sorted({k.split("/", 2)[2] for k in cell})
    for lab in labels:
        for src in sources:
            n = [cell.get(f"{sp}/{lab}/{src}", 0) for sp in splits]
            if sum(n):
                lines.append(f"| {lab} | {src} | " + " | ".join(map(str, n)) + f" | {sum(n)} |")
    if s.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in s["notes"]]
    link = s.get("linked")
    if link is not None:
        lines += ["", "## Patients linked through duplicate images", "",
                  f"{link['source_patients']} source patient ids were linked into {link['persons']} persons through "
                  f"{link['linking_image_pairs']} image pair(s); every image of a person is in one split."]
        for p in link["by_person"][:20]:
            a, b, kind, bits = p["images"][0]
            more = f" (+{len(p['images']) - 1} more pair(s))" if len(p["images"]) > 1 else ""
            how = {"identical": "identical", "near": f"phash {bits} bits", "transformed": f"{bits} matching keypoints"}
            lines.append(f"- {p['person']}: {', '.join(p['patients'])}, e.g. `{Path(a).name}` ~ `{Path(b).name}` "
                         f"({how.get(kind, kind)}){more}")
        if len(link["by_person"]) > 20:
            lines.append(f"- ... {len(link['by_person']) - 20} more in summary.json")
    lines += ["", "## Dropped", ""]
    for src, reasons in s["dropped"].items():
        if src == "unreadable":
            continue
        text = ", ".join(f"{r}: {n}" for r, n in reasons.items()) or "nothing"
        lines.append(f"- {src}: {text}")
    if s.get("seconds"):
        t = s["seconds"]
        lines += ["", f"Built in {t['total']:.1f} s (reading sources {t['load']:.1f} s, hashing images {t['hash']:.1f} s)."]
    return "\n".join(lines) + "\n"


def load_sources(sources: Iterable[tuple[str, str]], **kw: object) -> tuple[pd.DataFrame, dict, list[str]]:
    """Run every adapter and merge: ``(frame, dropped per source, notes)``. A file listed twice is
    kept once. ``source_patient_id`` keeps each source's own patient id."""
    sources = list(sources)
    if not sources:
        raise ManifestError("no sources given")
    frames, dropped, notes = [], {}, []
    for (kind, path), alias in zip(sources, csv_aliases(sources), strict=True):
        if alias is None:
            df, why = load_source(kind.partition(":")[0], path, **kw)
        else:  # several CSV sources: each one's patient "1" is its own person (issue 21 §2.10)
            df, why = load_source("csv", path, **{**kw, "source_name": alias})
            df = prefix_patients(df, alias)
        notes += [f"{kind}={path}: {n}" for n in df.attrs.get("notes", [])]
        df.attrs = {}
        frames.append(df)
        dropped[f"{kind}={path}"] = why
    df = pd.concat([f for f in frames if len(f)] or frames[:1], ignore_index=True)
    if df.empty:
        raise ManifestError(f"no usable images in {[p for _, p in sources]}")
    before = len(df)
    df = df.drop_duplicates(subset=["path"]).reset_index(drop=True)
    if len(df) < before:
        dropped["merge"] = {"same file listed twice": before - len(df)}
    df["patient_id"] = df["patient_id"].astype(str)
    df["source_patient_id"] = df["patient_id"]
    if "patient_id_from" not in df.columns:
        df["patient_id_from"] = "source"
    df["patient_id_from"] = df["patient_id_from"].fillna("source")
    return df, dropped, notes


def assign_splits(df: pd.DataFrame, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2,
                  holdout_source: str | None = None) -> pd.Series:
    """Split by ``patient_id`` (linked persons): stratified train/val/test, or with ``holdout_source``
    every person with an image from that source in test and the rest in train/val."""
    groups = df["patient_id"].astype(str)
    if holdout_source is None:
        return split_by_group(groups, df["label"], {"train": 1 - val_fraction - test_fraction,
                                                    "val": val_fraction, "test": test_fraction}, seed)
    if holdout_source not in set(df["source"]):
        raise ManifestError(f"holdout source {holdout_source!r} not among the sources {sorted(set(df['source']))}")
    is_test = groups.isin(set(groups[df["source"] == holdout_source]))
    split = pd.Series("test", index=df.index, dtype=object)
    rest = ~is_test
    split[rest] = split_by_group(groups[rest], df.loc[rest, "label"],
                                 {"train": 1 - val_fraction - test_fraction, "val": val_fraction}, seed)
    other = sorted(set(df.loc[is_test, "source"]) - {holdout_source})
    if other:
        log.warning("holdout: images of %s share patients/images with %s and go to test too", other, holdout_source)
    return split


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
    kept once. With ``near_duplicates``, every image is also decoded once (unreadable ones are
    dropped and listed in the summary) for its perceptual hash. Patients that share an identical or
    near-identical picture are linked into one person (:mod:`covidcxr.data.linking`): ``patient_id``
    is the person and ``source_patient_id`` the source's id, so the split and the patient bootstrap
    keep a person together and ``covidcxr data audit`` passes. Extra ``kw`` go to the adapters.
    """
    if not 0 <= test_fraction < 1 or not 0 <= val_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(f"bad split fractions val={val_fraction} test={test_fraction}")
    sources = list(sources)
    _refuse_writing_sources(sources, Path(out))
    t0 = time.perf_counter()
    df, dropped, notes = load_sources(sources, **kw)
    t_load = time.perf_counter()
    feats = image_features(df["path"].astype(str).tolist(), perceptual=near_duplicates) if dedupe or near_duplicates else None
    bad = feats.unreadable if feats is not None else []
    if bad:
        dropped.setdefault("merge", {})["unreadable image"] = len(bad)
        dropped["unreadable"] = {df.at[i, "path"]: 1 for i, _ in bad}
        for _, msg in bad:
            log.warning("dropping unreadable image: %s", msg)
        keep = np.setdiff1d(np.arange(len(df)), [i for i, _ in bad])
        df = df.iloc[keep].reset_index(drop=True)
        feats = ImageFeatures(
            digests=[feats.digests[i] for i in keep], hashes=feats.hashes[keep] if feats.hashes is not None else None,
            descriptors=[feats.descriptors[i] for i in keep] if feats.descriptors is not None else None,
            keypoints=[feats.keypoints[i] for i in keep] if feats.keypoints is not None else None)
    t_hash = time.perf_counter()
    if feats is not None:
        df["sha1"] = feats.digests
        if feats.hashes is not None:
            df["phash"] = [f"{int(h):016x}" for h in feats.hashes]
    df, why, links = link_patients(df, feats, dedupe=dedupe, max_bits=NEAR_DUPLICATE_BITS)
    for k, v in why.items():
        dropped.setdefault("merge", {})[k] = v
    df["split"] = assign_splits(df, seed, val_fraction, test_fraction, holdout_source).values
    df = df.sort_values(["split", "source", "patient_id", "path"], key=lambda s: s.map(
        {"train": 0, "val": 1, "test": 2}) if s.name == "split" else s).reset_index(drop=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(df, out / "manifest.csv")
    summary = _summary(df, dropped)
    persons = linked_persons(links)
    summary.update({
        "seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction,
        "holdout_source": holdout_source, "sources": [f"{k}={p}" for k, p in sources], "notes": notes,
        "linked": {"persons": len(persons), "source_patients": sum(len(p["patients"]) for p in persons),
                   "linking_image_pairs": len(links), "by_person": persons},
        "patient_ids_invented": int(df["patient_id_from"].isin(["filename", "image"]).sum()),
        "seconds": {"load": round(t_load - t0, 2), "hash": round(t_hash - t_load, 2),
                    "total": round(time.perf_counter() - t0, 2)},
    })
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(_summary_md(summary))
    log.info("wrote %s: %s", out / "manifest.csv", summary["by_split"])
    return df


#: what ``build_manifest`` writes into ``out``
OUTPUT_FILES = ("manifest.csv", "summary.json", "summary.md")


def _refuse_writing_sources(sources: list[tuple[str, str]], out: Path) -> None:
    """``data build`` never writes over a source: not its CSV, and not into a source's own folder."""
    from covidcxr.outpaths import OverwriteError, refuse_overwrite, same_file

    try:
        refuse_overwrite([out / n for n in OUTPUT_FILES], [p for _, p in sources], "covidcxr data build")
        for _, p in sources:
            if Path(p).is_dir() and out.is_dir() and same_file(p, out):
                raise OverwriteError(f"{out}: covidcxr data build would write {', '.join(OUTPUT_FILES)} into the "
                                     f"source folder {p}; choose another --out")
    except OverwriteError as err:
        raise ManifestError(str(err)) from None


def parse_source_spec(spec: str) -> tuple[str, str]:
    """``kind=PATH`` -> (kind, PATH)."""
    kind, sep, path = spec.partition("=")
    if not sep or not kind or not path:
        raise ManifestError(f"bad --source {spec!r}; expected KIND=PATH, e.g. csv=metadata.csv or cohen=DIR")
    return kind.strip(), path.strip()


__all__ = ["build_manifest", "load_sources", "assign_splits", "split_by_group",
           "parse_source_spec", "file_digest"]
