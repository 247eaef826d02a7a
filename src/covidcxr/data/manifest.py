"""Manifest CSV and COVIDx label files: reading, validating, writing.

A manifest has one row per image with at least ``patient_id,path,label,source`` (``split`` once
split) and optional ``view, geographic_extent, opacity, severity_level, mask_path`` and any other
columns a source carries. ``path`` and ``mask_path`` may be relative to the manifest's folder;
:func:`read_manifest` resolves them to absolute paths.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ["patient_id", "path", "label", "source"]
OPTIONAL_COLUMNS = ["split", "view", "geographic_extent", "opacity", "severity_level", "mask_path"]
SPLITS = ("train", "val", "test")
_PATH_COLUMNS = ("path", "mask_path")


class ManifestError(ValueError):
    """A manifest or label file is missing, malformed or inconsistent. The message names the file."""


def _resolve(col: pd.Series, base: Path) -> pd.Series:
    def one(v: object) -> object:
        if v is None or (isinstance(v, float) and np.isnan(v)) or str(v).strip() == "":
            return np.nan
        p = Path(str(v)).expanduser()
        return str(p if p.is_absolute() else (base / p).resolve())

    return col.map(one)


def repeated_images(df: pd.DataFrame, where: str | os.PathLike) -> str | None:
    """One line naming the rows that list an image already listed, or None. A metric would count such an
    image twice, so ``evaluate`` and ``site calibrate`` refuse them; training only warns (oversampling)."""
    dup = df["path"].duplicated(keep="first").to_numpy()
    if not dup.any():
        return None
    first = int(np.argmax(dup))
    idx = df.index[first]
    line = int(idx) + 2 if isinstance(idx, (int, np.integer)) else first + 2  # the CSV line (header is line 1)
    return (f"{where}: {int(dup.sum())} row(s) repeat an image already listed (first at line {line}: "
            f"{df['path'].iloc[first]}); each image counts once")


def read_manifest(path: str | os.PathLike, require_split: bool = False, check_leakage: bool = True) -> pd.DataFrame:
    """Read and validate a manifest CSV; ``path``/``mask_path`` come back absolute.

    Raises ManifestError naming the file for a missing file, unreadable CSV, missing columns,
    empty paths or sources, unknown split names, or (``check_leakage``) a patient in two splits.
    """
    p = Path(path)
    if not p.is_file():
        raise ManifestError(f"{p}: manifest not found")
    try:
        df = pd.read_csv(p, dtype={"patient_id": str, "path": str, "label": str, "source": str, "split": str},
                         keep_default_na=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ManifestError(f"{p}: not a readable CSV manifest ({err})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(
            f"{p}: manifest lacks required column(s) {missing}; it needs {REQUIRED_COLUMNS} (has {list(df.columns)})"
        )
    if require_split and "split" not in df.columns:
        raise ManifestError(f"{p}: manifest has no 'split' column; build it with `covidcxr data build`")
    if df.empty:
        raise ManifestError(f"{p}: manifest has no rows")
    for col in ("patient_id", "path", "source"):
        bad = df[col].isna() | (df[col].astype(str).str.strip() == "")
        if bad.any():
            raise ManifestError(f"{p}: {int(bad.sum())} row(s) with an empty '{col}' (first at line {int(bad.idxmax()) + 2})")
    base = p.resolve().parent
    for col in _PATH_COLUMNS:
        if col in df.columns:
            df[col] = _resolve(df[col], base)
    repeats = repeated_images(df, p)
    if repeats:  # deliberate oversampling is legitimate in training; evaluate and site calibrate refuse it
        log.warning(repeats)
    if "split" in df.columns:
        unknown = sorted(set(df["split"].dropna()) - set(SPLITS))
        if unknown:
            raise ManifestError(f"{p}: unknown split name(s) {unknown}; expected {list(SPLITS)}")
    if "split" in df.columns and check_leakage:
        per_patient = df.dropna(subset=["split"]).groupby("patient_id")["split"].nunique()
        leaky = per_patient[per_patient > 1]
        if len(leaky):
            raise ManifestError(
                f"{p}: {len(leaky)} patient(s) appear in more than one split (e.g. {leaky.index[0]!r}); "
                "a patient-level split is required"
            )
    df.attrs["manifest_path"] = str(p.resolve())
    return df


def write_manifest(df: pd.DataFrame, path: str | os.PathLike, relative: bool = False) -> Path:
    """Write a manifest CSV (required columns first). ``relative=True`` stores paths relative to it."""
    p = Path(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"{p}: refusing to write a manifest without column(s) {missing}")
    p.parent.mkdir(parents=True, exist_ok=True)
    out = df.copy()
    if relative:
        base = p.resolve().parent
        for col in _PATH_COLUMNS:
            if col in out.columns:
                out[col] = out[col].map(lambda v: os.path.relpath(v, base) if isinstance(v, str) and v else v)
    first = [c for c in REQUIRED_COLUMNS + OPTIONAL_COLUMNS if c in out.columns]
    out = out[first + [c for c in out.columns if c not in first]]
    out.to_csv(p, index=False)
    return p


def keep_labels(df: pd.DataFrame, labels: list[str] | set[str] | dict, label_filter: list[str] | None = None,
                where: str | os.PathLike | None = None) -> tuple[pd.DataFrame, dict[str, int]]:
    """Keep the rows whose label a task can use, and say what was left out.

    Rows whose ``label`` is outside ``labels`` (or outside ``label_filter`` when given) are dropped,
    except rows without a split (never used). Returns ``(kept, {label: rows dropped})`` and logs
    one warning line naming the manifest, the count and the labels, so a training run never loses
    images silently (e.g. NIH ``other`` findings, or pneumonia in a run restricted to 2 classes).
    """
    import logging

    keep_set = set(labels) if label_filter is None else set(labels) & set(label_filter)
    lab = df["label"].astype(str)
    drop = ~lab.isin(keep_set)
    if "split" in df.columns:
        drop &= df["split"].notna()
    counts = {str(k): int(v) for k, v in lab[drop].value_counts().sort_index().items()}
    if counts:
        src = where or df.attrs.get("manifest_path", "the manifest")
        why = f"not in label_filter {sorted(label_filter)}" if label_filter is not None else f"not among the classes {sorted(keep_set)}"
        logging.getLogger(__name__).warning(
            "%s: left out %d of %d row(s) whose label is %s: %s", src, int(drop.sum()), len(df), why,
            ", ".join(f"{k} ({v})" for k, v in counts.items()))
    out = df[~drop]
    out.attrs = dict(df.attrs)
    return out, counts


# --------------------------------------------------------------------------- COVIDx label files

#: Label words in COVIDx files -> (label, severity_level).
_COVIDX_LABELS = {
    "covid-19": ("COVID-19", None),
    "positive": ("COVID-19", None),
    "pneumonia": ("pneumonia", None),
    "normal": ("normal", None),
    "negative": ("negative", None),
    "level1": ("COVID-19", "level1"),
    "level2": ("COVID-19", "level2"),
}


def read_covidx_labels(path: str | os.PathLike, image_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """Read a COVIDx label file (``patientid filename label source``, space separated).

    Parsed from the right, so COVIDx8B patient ids containing spaces survive. Labels ``positive``
    (binary files) become ``COVID-19``; ``negative`` stays ``negative``; COVIDxSev ``level1|level2``
    become label ``COVID-19`` with ``severity_level`` ``level1``/``level2`` (the manifest convention). ``covidx_label`` keeps the raw word.
    """
    p = Path(path)
    if not p.is_file():
        raise ManifestError(f"{p}: COVIDx label file not found")
    rows = []
    with open(p, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) < 4:
                raise ManifestError(
                    f"{p}: line {lineno} has {len(parts)} field(s); expected 'patientid filename label source'"
                )
            *_, filename, raw, source = parts
            key = raw.lower()
            if key not in _COVIDX_LABELS:
                raise ManifestError(f"{p}: line {lineno}: unknown label {raw!r}; expected one of {sorted(_COVIDX_LABELS)}")
            label, level = _COVIDX_LABELS[key]
            # Keep the original spacing of ids such as "COVID 123": re-split only the first field.
            patient = line.rsplit(None, 3)[0]
            rows.append(
                {"patient_id": patient, "path": filename, "label": label, "source": source,
                 "severity_level": level, "covidx_label": raw}
            )
    if not rows:
        raise ManifestError(f"{p}: COVIDx label file is empty")
    df = pd.DataFrame(rows)
    if df["severity_level"].isna().all():
        df = df.drop(columns=["severity_level"])
    if image_dir is not None:
        base = Path(image_dir).resolve()
        df["path"] = df["path"].map(lambda f: str(base / f))
    return df


def write_covidx_labels(df: pd.DataFrame, path: str | os.PathLike, label_style: str = "3class") -> Path:
    """Write ``patientid filename label source`` lines.

    ``label_style``: ``3class`` (COVID-19/pneumonia/normal), ``binary`` (positive/negative) or
    ``severity`` (level1/level2 from ``severity_level``). ``filename`` is the basename of ``path``.
    """
    p = Path(path)
    lines = []
    for row in df.itertuples(index=False):
        r = row._asdict()
        if label_style == "3class":
            word = r["label"]
        elif label_style == "binary":
            word = "positive" if r["label"] == "COVID-19" else "negative"
        elif label_style == "severity":
            lvl = r.get("severity_level")
            if lvl is None or pd.isna(lvl) or str(lvl).strip() == "":
                raise ManifestError(f"{p}: row for {r['path']} has no severity_level to write")
            word = str(lvl) if str(lvl).startswith("level") else f"level{int(float(lvl))}"
        else:
            raise ValueError(f"label_style must be 3class, binary or severity, not {label_style!r}")
        lines.append(f"{r['patient_id']} {Path(str(r['path'])).name} {word} {r['source']}")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p
