"""Severity label readers: COVIDxSev level files, COVID-Net S score CSVs and covidcxr manifests.

Every reader returns a :class:`pandas.DataFrame` in one common layout so that training,
evaluation and cross-validation never care where the labels came from::

    path               absolute image path (str)
    patient_id         str; splits and bootstrap resampling are always by patient
    source             str (may be "")
    split              "train" | "val" | "test" | "" (no split given)
    severity_level     "level1" | "level2" | "" (unknown)
    geographic_extent  float in [0, 8] or NaN
    opacity            float in [0, 6] or NaN
    mask_path          absolute lung-mask path or "" (manifests only; used by lung-crop presets)
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

#: COVID-Net CXR-S airspace severity levels, in logit order.
LEVELS: list[str] = ["level1", "level2"]
#: The class names of a level model trained on the extent PROXY (:func:`level_proxy`): never CXR-S levels,
#: so never written as "level1"/"level2" in a checkpoint, a prediction or a report.
PROXY_LEVELS: list[str] = ["proxy-level1", "proxy-level2"]
#: What every proxy result carries with it.
PROXY_NOTE = ("PROXY severity level (geographic extent threshold), not a COVID-Net CXR-S airspace grade: "
              "the extent score cannot say how many lung zones are involved; never compare with CXR-S figures")
#: COVID-Net S scores, in output order, with their valid ranges (Cohen et al. / Wong et al. scales).
SCORES: list[str] = ["geographic_extent", "opacity"]
SCORE_MAX: dict[str, float] = {"geographic_extent": 8.0, "opacity": 6.0}
#: Values above SCORE_MAX but up to this are left unscored (NaN) with a warning instead of stopping the run: the
#: published COVID-Net S annotations (severity_annotations.csv, and the dev set built from them) hold opacity
#: means up to 8 for 18 of 459 images although the documented opacity scale is 0-6 (0-3 per lung, Cohen et al.
#: 2020). A mean of 6.33 means a rater gave 7, impossible on that scale, so those raters used another one for
#: that image; clipping or rescaling would invent a score, so the value is not used (docs/severity.md).
SCORE_TOLERATED: dict[str, float] = {"geographic_extent": 8.0, "opacity": 8.0}

#: Default geographic-extent threshold of the level PROXY (see :func:`level_proxy`).
PROXY_THRESHOLD = 4.0

COLUMNS = ["path", "patient_id", "source", "split", "severity_level", "geographic_extent", "opacity", "mask_path"]


class SeverityError(ValueError):
    """A severity label file, manifest or checkpoint is malformed; the message names the file."""


def _frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=COLUMNS)
    for col in ("geographic_extent", "opacity"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    for col in ("path", "patient_id", "source", "split", "severity_level", "mask_path"):
        df[col] = df[col].astype(object).where(df[col].notna(), "").astype(str)
    return df


def _resolve(name: str, images_dir: Path) -> str:
    p = Path(name)
    return str(p if p.is_absolute() else (images_dir / p).resolve())


def read_covidxsev(path: str | os.PathLike, images_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """Read a COVIDxSev label file: one ``patientid filename level1|level2 source`` line per image.

    Patient ids may contain spaces (as in some COVIDx files), so each line is split from the right.
    Image paths are resolved against ``images_dir`` (default: the label file's folder).
    """
    path = Path(path)
    if not path.is_file():
        raise SeverityError(f"{path}: COVIDxSev label file not found")
    images = Path(images_dir) if images_dir else path.parent
    rows: list[dict] = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(maxsplit=3)
            if len(parts) != 4:
                raise SeverityError(
                    f"{path}:{lineno}: expected 'patientid filename level1|level2 source', got {line!r}"
                )
            pid, fname, level, source = parts
            level = level.lower()
            if level not in LEVELS:
                raise SeverityError(f"{path}:{lineno}: severity level must be level1 or level2, got {parts[2]!r}")
            rows.append(
                {"path": _resolve(fname, images), "patient_id": pid, "source": source, "split": "",
                 "severity_level": level, "geographic_extent": math.nan, "opacity": math.nan}
            )
    if not rows:
        raise SeverityError(f"{path}: no labelled images in COVIDxSev file")
    return _frame(rows)


def _pick(columns: list[str], *names: str) -> str | None:
    low = {c.lower().strip(): c for c in columns}
    for n in names:
        if n in low:
            return low[n]
    return None


def _check_range(path: Path, df: pd.DataFrame, col: str, name: str, offset: int = 2) -> None:
    """Reject scores outside the scale; leave the tolerated overshoot unscored (NaN, see SCORE_TOLERATED) in place."""
    vals = df[col].astype(float)
    bad = vals.notna() & ((vals < 0) | (vals > SCORE_TOLERATED[name]))
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise SeverityError(
            f"{path}: row {i + offset}: {name}={float(vals.iloc[i]):g} outside the valid range 0-{SCORE_MAX[name]:g}"
        )
    over = vals.notna() & (vals > SCORE_MAX[name])
    if over.any():
        log.warning("%s: %d %s value(s) above the documented 0-%g scale (up to %g) left unscored: off the scale, "
                    "neither clipped nor rescaled (docs/severity.md)", path, int(over.sum()), name,
                    SCORE_MAX[name], float(vals.max()))
        df[col] = vals.mask(over)


def read_severity_csv(path: str | os.PathLike, images_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """Read a COVID-Net S score CSV like ``severity_annotations.csv``.

    Needs ``filename``, ``Geographic`` and ``Opacity`` columns (case-insensitive; ``geographic_extent``
    and ``opacity`` are accepted too). ``patientid`` is used for patient grouping when present;
    otherwise each image counts as its own patient (logged, since that makes splits optimistic).
    Rows without both scores are skipped; scores outside 0-8 / 0-6 are an error.
    """
    path = Path(path)
    if not path.is_file():
        raise SeverityError(f"{path}: severity CSV not found")
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as err:
        raise SeverityError(f"{path}: cannot read CSV ({type(err).__name__}: {err})") from None
    cols = list(raw.columns)
    c_file = _pick(cols, "filename", "path", "file")
    c_geo = _pick(cols, "geographic", "geographic_extent", "geographic_extent_mean")
    c_opa = _pick(cols, "opacity", "opacity_mean")
    missing = [n for n, c in (("filename", c_file), ("Geographic", c_geo), ("Opacity", c_opa)) if c is None]
    if missing:
        raise SeverityError(f"{path}: severity CSV lacks column(s) {missing}; has {cols}")
    c_pid = _pick(cols, "patientid", "patient_id")
    c_src = _pick(cols, "dataset", "source")
    c_split = _pick(cols, "split")
    df = pd.DataFrame({
        "geo": pd.to_numeric(raw[c_geo].replace("", np.nan), errors="coerce"),
        "opa": pd.to_numeric(raw[c_opa].replace("", np.nan), errors="coerce"),
    })
    for col, name in (("geo", "geographic_extent"), ("opa", "opacity")):
        txt = raw[[c_geo, c_opa][col == "opa"]]
        nonnum = df[col].isna() & (txt.str.strip() != "")
        if nonnum.any():
            i = int(np.flatnonzero(nonnum.to_numpy())[0])
            raise SeverityError(f"{path}: row {i + 2}: {name} {txt.iloc[i]!r} is not a number")
        _check_range(path, df, col, name)
    keep = df["geo"].notna() & df["opa"].notna() & (raw[c_file].str.strip() != "")
    if (~keep).any():
        log.info("%s: skipped %d row(s) without both scores or a filename", path, int((~keep).sum()))
    images = Path(images_dir) if images_dir else path.parent
    if c_pid is None:
        log.warning("%s: no patientid column; each image is treated as its own patient", path)
    rows = []
    for i in np.flatnonzero(keep.to_numpy()):
        fname = raw[c_file].iloc[i].strip()
        rows.append({
            "path": _resolve(fname, images),
            "patient_id": (raw[c_pid].iloc[i].strip() if c_pid else "") or fname,
            "source": raw[c_src].iloc[i].strip() if c_src else "",
            "split": raw[c_split].iloc[i].strip() if c_split else "",
            "severity_level": "",
            "geographic_extent": float(df["geo"].iloc[i]),
            "opacity": float(df["opa"].iloc[i]),
        })
    if not rows:
        raise SeverityError(f"{path}: no rows with both Geographic and Opacity scores")
    return _frame(rows)


def read_manifest_severity(path: str | os.PathLike) -> pd.DataFrame:
    """Read a covidcxr manifest, keeping its optional severity columns (``geographic_extent``,
    ``opacity``, ``severity_level``). All rows are returned; callers drop unlabelled ones."""
    path = Path(path)
    if not path.is_file():
        raise SeverityError(f"{path}: manifest not found")
    try:
        from covidcxr.data import read_manifest  # validates the manifest and names bad rows
    except ImportError:  # pragma: no cover - data module not installed
        read_manifest = None
    if read_manifest is not None:
        raw = read_manifest(path)
        if not isinstance(raw, pd.DataFrame):
            raw = pd.DataFrame(raw)
    else:  # pragma: no cover
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    for need in ("path", "patient_id"):
        if need not in raw.columns:
            raise SeverityError(f"{path}: manifest lacks column {need!r}")
    base = path.resolve().parent
    df = pd.DataFrame({
        "path": [_resolve(str(p), base) for p in raw["path"]],
        "patient_id": raw["patient_id"].astype(str),
        "source": raw["source"].astype(str) if "source" in raw else "",
        "split": raw["split"].astype(str) if "split" in raw else "",
        "severity_level": raw["severity_level"] if "severity_level" in raw else "",
        "geographic_extent": raw["geographic_extent"] if "geographic_extent" in raw else np.nan,
        "opacity": raw["opacity"] if "opacity" in raw else np.nan,
        "mask_path": [_resolve(str(m), base) if str(m).strip() not in ("", "nan", "None") else ""
                      for m in raw["mask_path"]] if "mask_path" in raw else "",
    })
    df = _frame(df.to_dict("records"))
    df["split"] = df["split"].replace({"nan": "", "None": ""})
    lv = df["severity_level"].str.strip().str.lower().replace({"nan": "", "none": "", "1": "level1", "2": "level2"})
    bad = ~lv.isin(LEVELS + [""])
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise SeverityError(f"{path}: row {i + 2}: severity_level must be level1 or level2, got {lv.iloc[i]!r}")
    df["severity_level"] = lv
    for col in ("geographic_extent", "opacity"):
        _check_range(path, df, col, col)
    return df


def load_table(path: str | os.PathLike, images_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """Read any supported severity label source, detected from its content.

    ``.txt`` -> COVIDxSev file; a CSV with ``patient_id`` and ``path`` columns -> covidcxr manifest;
    any other CSV with ``filename``/``Geographic``/``Opacity`` -> COVID-Net S score CSV.
    """
    path = Path(path)
    if not path.is_file():
        raise SeverityError(f"{path}: label file not found")
    if path.suffix.lower() == ".txt":
        return read_covidxsev(path, images_dir)
    try:
        header = [c.strip().lower() for c in pd.read_csv(path, nrows=0).columns]
    except Exception as err:
        raise SeverityError(f"{path}: cannot read CSV header ({type(err).__name__}: {err})") from None
    if "path" in header and "patient_id" in header:
        if images_dir:
            log.warning("--images is ignored for a manifest (paths are relative to the manifest)")
        return read_manifest_severity(path)
    return read_severity_csv(path, images_dir)


#: Fewest lung zones (of 3 per lung) that a per-lung extent score forces: involvement of 0 / <25 /
#: 25-50 / 50-75 / >75 % of a lung needs at least 0 / 1 / 1 / 2 / 3 of its thirds.
_MIN_ZONES_PER_LUNG = (0, 1, 1, 2, 3)


def min_zones_from_extent(extent: int) -> int:
    """The fewest involved lung zones an integer geographic-extent total (0-8) allows.

    The score sheet grades each lung 0-4 by the fraction involved, not by zones, so a total only bounds
    the zone count from below (over every split into two per-lung scores); it never bounds it from
    above, since a small opacity can straddle zones. E.g. 4 = 2 + 2 allows 2 zones (CXR-S level1) and
    3 = 0 + 3 already needs 2. Only a total of 5 or more forces CXR-S level2 (>= 3 zones).
    """
    e = int(extent)
    if not 0 <= e <= 8:
        raise SeverityError(f"geographic extent total must be 0-8, got {extent!r}")
    return min(_MIN_ZONES_PER_LUNG[a] + _MIN_ZONES_PER_LUNG[e - a] for a in range(max(0, e - 4), min(4, e) + 1))


def level_classes(target_desc: str) -> list[str]:
    """Class names for level targets of origin ``target_desc`` (see :func:`level_targets`)."""
    return list(PROXY_LEVELS) if str(target_desc).startswith("proxy") else list(LEVELS)


def level_proxy(geographic_extent: np.ndarray | pd.Series, threshold: float = PROXY_THRESHOLD) -> np.ndarray:
    """PROXY severity level from the geographic-extent score: 1 (proxy-level2) where ``extent >= threshold``.

    It is not CXR-S's level. The 0-8 extent score sums, for each lung, 0-4 for involvement of
    0 / <25 / 25-50 / 50-75 / >75 % of it; CXR-S level2 means opacities in 3 or more of the 6 lung
    zones. The sheet cannot count zones: one opacity in each lung can score 4 while CXR-S calls it
    level1, and two zones of one lung can score 3 (:func:`min_zones_from_extent`: only a total of 5
    or more forces 3 zones, and no total forces fewer). 4 splits the dev set's scored images evenly.
    Results on it are a PROXY (class names :data:`PROXY_LEVELS`), never compared with CXR-S figures.
    NaN extents give -1.
    """
    g = np.asarray(geographic_extent, dtype=float)
    out = np.where(g >= threshold, 1, 0)
    return np.where(np.isnan(g), -1, out)


def level_targets(df: pd.DataFrame, source: str = "auto", threshold: float = PROXY_THRESHOLD) -> tuple[np.ndarray, str]:
    """Integer level targets (0 = level1, 1 = level2, -1 = unknown) and a description of their origin.

    ``source``: ``"column"`` (severity_level), ``"proxy"`` (geographic extent >= threshold) or
    ``"auto"`` (the column where it has any value, else the proxy, with a warning).
    """
    has_col = (df["severity_level"] != "").any()
    if source == "auto":
        source = "column" if has_col else "proxy"
        if source == "proxy":
            log.warning("no severity_level labels: using the PROXY level = geographic_extent >= %g", threshold)
    if source == "column":
        y = df["severity_level"].map({"level1": 0, "level2": 1}).fillna(-1).astype(int).to_numpy()
        return y, "severity_level"
    if source == "proxy":
        return level_proxy(df["geographic_extent"].to_numpy(), threshold), f"proxy:geographic_extent>={threshold:g}"
    raise SeverityError(f"unknown level source {source!r}; use auto, column or proxy")


def score_targets(df: pd.DataFrame) -> np.ndarray:
    """N x 2 float array of (geographic_extent, opacity); NaN where missing."""
    return df[SCORES].to_numpy(dtype=np.float32)


def select(df: pd.DataFrame, task: str, split: str = "all", level_source: str = "auto",
           threshold: float = PROXY_THRESHOLD) -> tuple[pd.DataFrame, np.ndarray, str]:
    """Rows of ``split`` that carry labels for ``task`` ("level" | "scores"), with their targets."""
    if split not in ("all", ""):
        if not (df["split"] != "").any():
            raise SeverityError(f"the data has no split column; use --split all (asked for {split!r})")
        df = df[df["split"] == split]
    if task == "scores":
        y = score_targets(df)
        keep = ~np.isnan(y).any(axis=1)
        desc = "geographic_extent,opacity"
    elif task == "level":
        y, desc = level_targets(df, level_source, threshold)
        keep = y >= 0
    else:
        raise SeverityError(f"unknown severity task {task!r}; use level or scores")
    return df[keep].reset_index(drop=True), y[keep], desc
