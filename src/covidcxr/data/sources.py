"""Source adapters: each reads one public dataset in its own folder layout and yields manifest rows.

Every adapter returns ``(rows, dropped)``: a DataFrame with at least ``patient_id, path, label,
source, view`` (paths absolute) and a ``{reason: count}`` dict of what it left out and why, so the
build summary can say exactly what happened. Labels follow the COVIDx notebook (see
:mod:`covidcxr.data.labels`); only frontal X-rays are kept.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from covidcxr.data.labels import is_frontal, map_finding, normalize_label
from covidcxr.data.manifest import ManifestError, read_covidx_labels

log = logging.getLogger(__name__)

AdapterResult = tuple[pd.DataFrame, dict[str, int]]
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom"}
COLUMNS = ["patient_id", "path", "label", "source", "view"]


def _blank(v: object) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v)) or str(v).strip() == ""


def _read_csv(path: Path, what: str) -> pd.DataFrame:
    if not path.is_file():
        raise ManifestError(f"{path}: {what} not found")
    try:
        # Cohen's metadata has Latin-1 bytes in free text; never fail on them.
        return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8", encoding_errors="replace")
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise ManifestError(f"{path}: cannot parse {what} ({err})") from None


def _finish(rows: list[dict], dropped: Counter, source: str, notes: list[str] | None = None) -> AdapterResult:
    """Rows -> frame. ``notes`` (things the adapter did that change the data, e.g. invented patient ids)
    travel in ``df.attrs["notes"]``; the builder logs them and writes them into the summary."""
    df = pd.DataFrame(rows, columns=None if rows else COLUMNS)
    for c in COLUMNS:
        if c not in df.columns:
            df[c] = np.nan
    df.attrs["notes"] = list(notes or [])
    for n in df.attrs["notes"]:
        log.warning("%s: %s", source, n)
    log.info("%s: kept %d image(s); dropped %s", source, len(df), dict(dropped) or "none")
    return df, dict(dropped)


def _need_dir(root: str | os.PathLike, source: str) -> Path:
    p = Path(root).expanduser()
    if not p.is_dir():
        raise ManifestError(f"{p}: {source} source folder not found")
    return p.resolve()


# --------------------------------------------------------------------------- public repositories


def cohen(root: str | os.PathLike, strict_labels: bool = False, **_: object) -> AdapterResult:
    """ieee8023/covid-chestxray-dataset: ``metadata.csv`` + ``images/`` (the ``folder`` column names it)."""
    root = _need_dir(root, "cohen")
    meta = _read_csv(root / "metadata.csv", "cohen metadata.csv")
    for col in ("patientid", "finding", "view", "filename"):
        if col not in meta.columns:
            raise ManifestError(f"{root / 'metadata.csv'}: not the cohen layout (no '{col}' column)")
    rows, dropped = [], Counter()
    for r in meta.to_dict("records"):
        modality = r.get("modality", "X-ray")
        if modality and modality.strip().lower() not in ("x-ray", "xray", "cr", "dx"):
            dropped[f"modality {modality.strip()}"] += 1
            continue
        if not is_frontal(r["view"]):
            dropped["not frontal"] += 1
            continue
        if _blank(r["finding"]):
            dropped["empty finding"] += 1
            continue
        label = map_finding(r["finding"], strict=strict_labels)
        if label is None:
            dropped["finding not mapped"] += 1
            continue
        img = root / (r.get("folder") or "images") / r["filename"]
        if not img.is_file():
            dropped["image file missing"] += 1
            continue
        rows.append({"patient_id": f"cohen-{r['patientid'].strip()}", "path": str(img), "label": label,
                     "source": "cohen", "view": r["view"].strip() or np.nan, "finding": r["finding"]})
    return _finish(rows, dropped, "cohen")


def _agchung(root: Path, source: str, image_of: Callable[[dict], str | None], patient_of: Callable[[dict], str]) -> AdapterResult:
    meta = _read_csv(root / "metadata.csv", f"{source} metadata.csv")
    for col in ("patientid", "finding"):
        if col not in meta.columns:
            raise ManifestError(f"{root / 'metadata.csv'}: not the {source} layout (no '{col}' column)")
    rows, dropped = [], Counter()
    for r in meta.to_dict("records"):
        modality = r.get("modality", "X-ray")
        if modality and modality.strip().lower() not in ("x-ray", "xray"):
            dropped[f"modality {modality.strip()}"] += 1
            continue
        if not is_frontal(r.get("view")):
            dropped["not frontal"] += 1
            continue
        if _blank(r["finding"]):
            dropped["empty finding"] += 1
            continue
        label = map_finding(r["finding"])
        if label is None:
            dropped["finding not mapped"] += 1
            continue
        name = image_of(r)
        if name is None:
            dropped["image file missing"] += 1
            continue
        rows.append({"patient_id": f"{source}-{patient_of(r)}", "path": name, "label": label, "source": source,
                     "view": (r.get("view") or "").strip() or np.nan, "finding": r["finding"]})
    return _finish(rows, dropped, source)


def figure1(root: str | os.PathLike, **_: object) -> AdapterResult:
    """agchung/Figure1-COVID-chestxray-dataset: ``metadata.csv`` + ``images/<patientid>.jpg|png``.

    Ids such as ``COVID-00039a/b/c`` are images of one case, so the letter is stripped from the
    patient id (keeping them in one split).
    """
    root = _need_dir(root, "figure1")

    def image_of(r: dict) -> str | None:
        for ext in (".jpg", ".png", ".jpeg"):
            p = root / "images" / f"{r['patientid'].strip()}{ext}"
            if p.is_file():
                return str(p)
        return None

    return _agchung(root, "figure1", image_of, lambda r: re.sub(r"[a-z]$", "", r["patientid"].strip()))


def actualmed(root: str | os.PathLike, **_: object) -> AdapterResult:
    """agchung/Actualmed-COVID-chestxray-dataset: ``metadata.csv`` (``imagename``) + ``images/``."""
    root = _need_dir(root, "actualmed")

    def image_of(r: dict) -> str | None:
        p = root / "images" / str(r.get("imagename", "")).strip()
        return str(p) if p.is_file() and p.suffix else None

    return _agchung(root, "actualmed", image_of, lambda r: r["patientid"].strip())


def rsna(root: str | os.PathLike, read_views: bool = True, **_: object) -> AdapterResult:
    """RSNA Pneumonia Detection Challenge: ``stage_2_train_labels.csv``, ``stage_2_detailed_class_info.csv``,
    ``stage_2_train_images/<patientId>.dcm``.

    As in COVIDx: ``Normal`` -> normal, ``Lung Opacity`` (Target 1) -> pneumonia, and
    ``No Lung Opacity / Not Normal`` is dropped. The view comes from each DICOM header
    (``ViewPosition``; only the header is read).
    """
    root = _need_dir(root, "rsna")
    labels = _read_csv(root / "stage_2_train_labels.csv", "rsna stage_2_train_labels.csv")
    info_path = root / "stage_2_detailed_class_info.csv"
    info = _read_csv(info_path, "rsna stage_2_detailed_class_info.csv") if info_path.is_file() else None
    img_dir = next((root / d for d in ("stage_2_train_images", "stage_1_train_images", "images") if (root / d).is_dir()), None)
    if img_dir is None:
        raise ManifestError(f"{root}: rsna layout needs a stage_2_train_images/ folder")
    target = labels.groupby("patientId")["Target"].max()
    klass = info.drop_duplicates("patientId").set_index("patientId")["class"] if info is not None else None
    rows, dropped = [], Counter()
    for pid, tgt in target.items():
        cls = klass.get(pid) if klass is not None else ("Lung Opacity" if str(tgt) == "1" else "Normal")
        if cls == "Lung Opacity" or str(tgt) == "1":
            label = "pneumonia"
        elif cls == "Normal":
            label = "normal"
        else:
            dropped["No Lung Opacity / Not Normal"] += 1
            continue
        img = img_dir / f"{pid}.dcm"
        if not img.is_file():
            dropped["image file missing"] += 1
            continue
        view = np.nan
        if read_views:
            try:
                import pydicom

                ds = pydicom.dcmread(img, stop_before_pixels=True, specific_tags=["ViewPosition"])
                view = str(ds.get("ViewPosition", "")) or np.nan
            except Exception:  # a bad header is reported later by the dataset check, not here
                view = np.nan
        if not is_frontal(view):
            dropped["not frontal"] += 1
            continue
        rows.append({"patient_id": f"rsna-{pid}", "path": str(img), "label": label, "source": "rsna",
                     "view": view, "finding": cls})
    return _finish(rows, dropped, "rsna")


#: NIH ChestX-ray14 ``Finding Labels`` value for a normal image.
NIH_NORMAL = "No Finding"
#: Label given to NIH images with other findings when ``keep_other_findings`` is on (not one of CLASSES).
NIH_OTHER_LABEL = "other"


def nih_label(findings: object, keep_other_findings: bool = False) -> str | None:
    """NIH ``Finding Labels`` ('|'-separated) -> class: ``No Finding`` -> normal, any list containing
    ``Pneumonia`` -> pneumonia, anything else -> None (or ``"other"`` with ``keep_other_findings``)."""
    parts = [f.strip() for f in str(findings or "").split("|") if f.strip()]
    if parts == [NIH_NORMAL]:
        return "normal"
    if "Pneumonia" in parts:
        return "pneumonia"
    return NIH_OTHER_LABEL if keep_other_findings and parts else None


def nih(root: str | os.PathLike, keep_other_findings: bool = False, **_: object) -> AdapterResult:
    """NIH ChestX-ray14: ``Data_Entry_2017_v2020.csv`` (or ``Data_Entry_2017.csv``) + ``images/``.

    Labels by :func:`nih_label`; findings other than No Finding / Pneumonia are dropped unless
    ``keep_other_findings`` (they then get label ``"other"``, outside the 3 classes: training filters
    them out, a multi-label step can use them). The raw ``Finding Labels`` stay in ``findings`` for
    every row. Patient from ``Patient ID`` (follow-ups share it), view from ``View Position``.
    """
    root = _need_dir(root, "nih")
    csv = next((root / n for n in ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv") if (root / n).is_file()),
               root / "Data_Entry_2017_v2020.csv")
    meta = _read_csv(csv, "nih Data_Entry_2017_v2020.csv")
    for col in ("Image Index", "Finding Labels", "Patient ID", "View Position"):
        if col not in meta.columns:
            raise ManifestError(f"{csv}: not the NIH ChestX-ray14 layout (no '{col}' column)")
    # NIH ships images/ (or images_001/images ... from the zip parts); index every file once.
    files = {f.name: f for d in [root / "images", *sorted(root.glob("images_*/images"))] if d.is_dir()
             for f in d.iterdir()}
    rows, dropped = [], Counter()
    for r in meta.to_dict("records"):
        findings = r["Finding Labels"].strip()
        label = nih_label(findings, keep_other_findings)
        if label is None:
            dropped["other finding (not No Finding / Pneumonia)" if findings else "empty Finding Labels"] += 1
            continue
        view = r["View Position"].strip()
        if not is_frontal(view):
            dropped["not frontal"] += 1
            continue
        pid = r["Patient ID"].strip()
        if not pid:
            raise ManifestError(f"{csv}: empty 'Patient ID' for {r['Image Index']}")
        img = files.get(r["Image Index"].strip())
        if img is None:
            dropped["image file missing"] += 1
            continue
        rows.append({"patient_id": f"nih-{pid}", "path": str(img), "label": label, "source": "nih",
                     "view": view or np.nan, "findings": findings, "follow_up": r.get("Follow-up #", ""),
                     "age": r.get("Patient Age", ""), "sex": r.get("Patient Gender", ""), "patient_id_from": "source"})
    return _finish(rows, dropped, "nih")


def hannover(root: str | os.PathLike, **_: object) -> AdapterResult:
    """Hannover Medical School COVID-19 images (ml-workgroup/covid-19-image-repository): ``data.csv``
    + ``png/<image_id>.png``. Every image is COVID-19 (PCR-confirmed); patient from ``patient_id``,
    view from ``projection`` (ap/pa). Many of these pictures are also in the Cohen collection under
    other patient ids: the builder links them through the duplicate images."""
    root = _need_dir(root, "hannover")
    meta = _read_csv(root / "data.csv", "hannover data.csv")
    for col in ("patient_id", "image_id"):
        if col not in meta.columns:
            raise ManifestError(f"{root / 'data.csv'}: not the hannover layout (no '{col}' column)")
    img_dir = root / "png" if (root / "png").is_dir() else root / "images"
    rows, dropped = [], Counter()
    for r in meta.to_dict("records"):
        view = (r.get("projection") or "").strip().upper()
        if not is_frontal(view):
            dropped["not frontal"] += 1
            continue
        pid = r["patient_id"].strip()
        if not pid:
            raise ManifestError(f"{root / 'data.csv'}: empty patient_id for image {r['image_id']}")
        img = next((img_dir / f"{r['image_id'].strip()}{e}" for e in (".png", ".jpg", ".dcm")
                    if (img_dir / f"{r['image_id'].strip()}{e}").is_file()), None)
        if img is None:
            dropped["image file missing"] += 1
            continue
        rows.append({"patient_id": f"hannover-{pid}", "path": str(img), "label": "COVID-19", "source": "hannover",
                     "view": view or np.nan, "finding": "COVID-19", "sex": r.get("sex", ""),
                     "admission_offset": r.get("admission_offset", ""), "modality": r.get("modality", ""),
                     "patient_id_from": "source"})
    return _finish(rows, dropped, "hannover")


#: COVID-19 Radiography Database class folders -> label.
RADIOGRAPHY_DB_FOLDERS = {
    "covid": "COVID-19",
    "covid-19": "COVID-19",
    "normal": "normal",
    "viral pneumonia": "pneumonia",
    "lung_opacity": "pneumonia",
    "lung opacity": "pneumonia",
}


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()
                  and "masks" not in {q.lower() for q in p.relative_to(folder).parts[:-1]})


def radiography_db(root: str | os.PathLike, include_lung_opacity: bool = True, **_: object) -> AdapterResult:
    """COVID-19 Radiography Database (Kaggle): ``COVID/``, ``Normal/``, ``Viral Pneumonia/``, ``Lung_Opacity/``,
    each holding images directly or in ``images/`` (``masks/`` is skipped).

    The database has no patient ids, so each image is its own patient (``radiography-db-<stem>``);
    the audit's duplicate check catches images shared with other sources.
    """
    root = _need_dir(root, "radiography-db")
    # the Kaggle zip unpacks into one more folder level
    subdirs = [d for d in root.iterdir() if d.is_dir()]
    if not any(d.name.lower() in RADIOGRAPHY_DB_FOLDERS for d in subdirs) and len(subdirs) == 1:
        root, subdirs = subdirs[0], [d for d in subdirs[0].iterdir() if d.is_dir()]
    rows, dropped = [], Counter()
    found = False
    for d in sorted(subdirs):
        label = RADIOGRAPHY_DB_FOLDERS.get(d.name.lower())
        if label is None:
            continue
        found = True
        if d.name.lower().startswith("lung") and not include_lung_opacity:
            dropped["Lung_Opacity excluded"] += len(_images_in(d))
            continue
        for img in _images_in(d):
            rows.append({"patient_id": f"radiography-db-{img.stem}", "path": str(img), "label": label,
                         "source": "radiography-db", "view": np.nan, "finding": d.name, "patient_id_from": "image"})
    if not found:
        raise ManifestError(f"{root}: no COVID/Normal/Viral Pneumonia/Lung_Opacity folders (radiography-db layout)")
    return _finish(rows, dropped, "radiography-db")


def folder(root: str | os.PathLike, source_name: str | None = None, **_: object) -> AdapterResult:
    """One sub-folder per class (``normal/``, ``pneumonia/``, ``COVID-19/`` or common spellings).

    Each image is its own patient unless its name starts with ``<patient>__`` (double underscore).
    """
    root = _need_dir(root, "folder")
    name = source_name or root.name
    rows, dropped = [], Counter()
    classes = 0
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        label = normalize_label(d.name.replace("_", " "))
        if label is None:
            dropped[f"folder {d.name!r} is not a class"] += 1
            continue
        classes += 1
        for img in _images_in(d):
            pid = img.stem.split("__")[0] if "__" in img.stem else img.stem
            rows.append({"patient_id": f"{name}-{pid}", "path": str(img), "label": label, "source": name,
                         "view": np.nan, "patient_id_from": "filename" if "__" in img.stem else "image"})
    if not classes:
        raise ManifestError(f"{root}: no class sub-folders (expected e.g. normal/, pneumonia/, COVID-19/)")
    return _finish(rows, dropped, name)


# --------------------------------------------------------------------------- generic CSV / COVIDx files

#: Manifest column -> candidate CSV columns, first match wins (case-insensitive).
CSV_COLUMN_CANDIDATES: dict[str, list[str]] = {
    "path": ["path", "filename", "file", "image", "imagename", "image_path"],
    "patient_id": ["patient_id", "patientid", "patient"],
    "label": ["label", "class", "diagnosis"],
    "finding": ["finding"],
    "source": ["source", "dataset"],
    "view": ["view", "viewposition"],
    "geographic_extent": ["geographic_extent", "geographic_extent_mean", "geographic"],
    "opacity": ["opacity", "opacity_mean"],
    "severity_level": ["severity_level"],
    "mask_path": ["mask_path", "mask"],
}


#: How ``patient_id_from`` invents a patient id when a CSV has none (see :func:`csv_source`).
PATIENT_ID_FROM = ("filename", "image")


def _invented_id(source_name: str, raw: str, how: str) -> str:
    if how == "filename":  # files named <patient>__<rest> share a patient, as in the folder source
        stem = Path(raw).stem
        return f"{source_name}-{stem.split('__')[0] if '__' in stem else stem}"
    return f"{source_name}-{raw}"  # "image": every listed file is its own patient


def csv_source(path: str | os.PathLike, column_map: dict[str, str] | None = None,
               image_dir: str | os.PathLike | None = None, mask_dir: str | os.PathLike | None = None,
               source_name: str = "csv", patient_id_from: str | None = None, **_: object) -> AdapterResult:
    """Any CSV with a column mapping (``column_map``: manifest column -> CSV column; the rest guessed).

    File names resolve against ``image_dir`` (default: ``images/`` beside the CSV if it exists, else
    the CSV's folder); masks against ``mask_dir`` (default ``masks/``). The covid-cxr-dev set maps
    filename -> images/, geographic_extent_mean -> geographic_extent, opacity_mean -> opacity,
    mask -> masks/ as mask_path. A ``label`` column is normalised; without one, ``finding`` is mapped
    (and a note says so, with the number of rows).

    A patient id column is required: without one (or with empty cells) every image would become its
    own patient and patients could cross splits unnoticed. ``patient_id_from="filename"`` (the file
    stem, up to a ``__``) or ``"image"`` (each listed file) invents ids instead; those rows get
    ``patient_id_from`` set to that word, so ``data audit`` can say that ids were invented.
    """
    if patient_id_from is not None and patient_id_from not in PATIENT_ID_FROM:
        raise ManifestError(f"patient_id_from must be one of {list(PATIENT_ID_FROM)}, not {patient_id_from!r}")
    p = Path(path).expanduser()
    meta = _read_csv(p, "CSV source")
    base = p.resolve().parent
    img_dir = Path(image_dir) if image_dir else (base / "images" if (base / "images").is_dir() else base)
    msk_dir = Path(mask_dir) if mask_dir else (base / "masks" if (base / "masks").is_dir() else base)
    lower = {c.lower(): c for c in meta.columns}
    mapping: dict[str, str] = {}
    for target, cands in CSV_COLUMN_CANDIDATES.items():
        if column_map and target in column_map:
            if column_map[target] not in meta.columns:
                raise ManifestError(f"{p}: mapped column {column_map[target]!r} (for {target}) not in the CSV")
            mapping[target] = column_map[target]
            continue
        for c in cands:
            if c in lower:
                mapping[target] = lower[c]
                break
    if "path" not in mapping:
        raise ManifestError(f"{p}: no image column (one of {CSV_COLUMN_CANDIDATES['path']}); pass column_map")
    if "label" not in mapping and "finding" not in mapping:
        raise ManifestError(f"{p}: no label column (label/class) and no finding column to map")
    if "patient_id" not in mapping and patient_id_from is None:
        raise ManifestError(
            f"{p}: no patient id column (one of {CSV_COLUMN_CANDIDATES['patient_id']}); without it patients can "
            "cross splits unnoticed. Map one (--column patient_id=COL) or say how to invent ids "
            "(--patient-id-from filename|image)")
    notes: list[str] = []
    rows, dropped = [], Counter()
    invented = 0
    empty_ids: list[str] = []
    used = set(mapping.values())
    for r in meta.to_dict("records"):
        raw = r[mapping["path"]].strip()
        if not raw:
            dropped["empty file name"] += 1
            continue
        img = Path(raw).expanduser()
        if not img.is_absolute():
            img = (img_dir / img) if (img_dir / img).exists() or not (base / img).exists() else (base / img)
        if not img.is_file():
            dropped["image file missing"] += 1
            continue
        view = r.get(mapping.get("view", ""), "")
        if not is_frontal(view):
            dropped["not frontal"] += 1
            continue
        label = normalize_label(r[mapping["label"]]) if "label" in mapping else map_finding(r[mapping["finding"]])
        if label is None:
            dropped["label not mapped"] += 1
            continue
        pid = (r.get(mapping["patient_id"], "") or "").strip() if "patient_id" in mapping else ""
        pid_from = "source"
        if not pid:
            if patient_id_from is None:
                empty_ids.append(raw)
                continue
            pid, pid_from = _invented_id(source_name, raw, patient_id_from), patient_id_from
            invented += 1
        row = {"patient_id": pid, "path": str(img.resolve()), "label": label,
               "source": (r.get(mapping.get("source", ""), "") or "").strip() or source_name,
               "view": (view or "").strip() or np.nan, "patient_id_from": pid_from}
        for col in ("geographic_extent", "opacity"):
            if col in mapping:
                v = str(r[mapping[col]]).strip()
                try:
                    row[col] = float(v) if v else np.nan
                except ValueError:
                    raise ManifestError(f"{p}: {mapping[col]} = {v!r} is not a number (file {raw})") from None
        if "severity_level" in mapping:  # manifest convention: level1 | level2
            v = str(r[mapping["severity_level"]]).strip().lower()
            row["severity_level"] = (f"level{v}" if v in ("1", "2") else v) or np.nan
        if "finding" in mapping:
            row["finding"] = r[mapping["finding"]] or np.nan
        if "mask_path" in mapping:
            m = str(r[mapping["mask_path"]]).strip()
            row["mask_path"] = str((msk_dir / m).resolve()) if m else np.nan
        for c, v in r.items():  # keep the source's other columns (finding, license, ...)
            if c not in used and c not in row:
                row[c] = v if v != "" else np.nan
        rows.append(row)
    if empty_ids:
        raise ManifestError(
            f"{p}: {len(empty_ids)} row(s) with an empty patient id (e.g. {empty_ids[0]}); fill them in or pass "
            "--patient-id-from filename|image to invent ids for them")
    if invented:
        notes.append(f"patient ids invented from the {patient_id_from} for {invented} of {len(rows)} row(s) "
                     f"(--patient-id-from {patient_id_from}); patient-level leakage cannot be checked for them")
    if "label" not in mapping and rows:
        notes.append(f"no label column: the label of {len(rows)} row(s) was mapped from the "
                     f"{mapping['finding']!r} column (COVIDx finding mapping; {dropped.get('label not mapped', 0)} "
                     "row(s) not mapped and dropped)")
    return _finish(rows, dropped, source_name, notes)


def covidx(path: str | os.PathLike, image_dir: str | os.PathLike | None = None, **_: object) -> AdapterResult:
    """A COVIDx label file (``patientid filename label source``); images in ``image_dir`` (default: the
    ``train/`` or ``test/`` folder beside the file, matching its name, else the file's folder)."""
    p = Path(path).expanduser()
    if image_dir is None:
        split = "test" if p.name.lower().startswith("test") else "train"
        image_dir = p.parent / split if (p.parent / split).is_dir() else p.parent
    df = read_covidx_labels(p, image_dir=image_dir)
    exists = df["path"].map(lambda f: Path(f).is_file())
    dropped = {"image file missing": int((~exists).sum())} if (~exists).any() else {}
    df = df[exists].copy()
    df["view"] = np.nan
    return df.reset_index(drop=True), dropped


ADAPTERS: dict[str, Callable[..., AdapterResult]] = {
    "cohen": cohen,
    "figure1": figure1,
    "actualmed": actualmed,
    "rsna": rsna,
    "nih": nih,
    "hannover": hannover,
    "radiography-db": radiography_db,
    "folder": folder,
    "csv": csv_source,
    "covidx": covidx,
}


def csv_aliases(sources: list[tuple[str, str]]) -> list[str | None]:
    """Per ``(kind, path)`` source: the alias that prefixes its patient ids, or None (ids kept as given).

    ``csv:NAME=PATH`` names a CSV source; several ``csv=PATH`` sources are named by their file stems. A CSV's
    own ids are then prefixed with its alias (``NAME-1``), so patient "1" of two CSV files are two persons;
    one CSV without a name keeps its ids as given (they are often already source-qualified, e.g.
    ``cohen-2``). Two CSV sources with the same alias are an error. True duplicates across the files are
    still linked into one person by their images (:mod:`covidcxr.data.linking`).
    """
    csv = [i for i, (k, _) in enumerate(sources) if k.partition(":")[0] == "csv"]
    out: list[str | None] = [None] * len(sources)
    seen: dict[str, str] = {}
    for i in csv:
        kind, path = sources[i]
        name = kind.partition(":")[2].strip()
        if not name and len(csv) == 1:
            continue
        alias = name or Path(path).stem
        if alias in seen:
            raise ManifestError(f"{path}: CSV source alias {alias!r} is also used by {seen[alias]}; name each "
                                "CSV source: --source csv:NAME=PATH")
        seen[alias] = str(path)
        out[i] = alias
    return out


def prefix_patients(df: pd.DataFrame, alias: str) -> pd.DataFrame:
    """The source's own patient ids prefixed with ``alias`` (ids invented from file names carry it already)."""
    own = df["patient_id_from"].fillna("source").eq("source") if "patient_id_from" in df.columns else \
        pd.Series(True, index=df.index)
    df.loc[own, "patient_id"] = alias + "-" + df.loc[own, "patient_id"].astype(str)
    return df


def load_source(kind: str, path: str | os.PathLike, **kw: object) -> AdapterResult:
    """Run the adapter named ``kind`` on ``path``."""
    if kind not in ADAPTERS:
        raise ManifestError(f"unknown source kind {kind!r}; known: {', '.join(ADAPTERS)}")
    return ADAPTERS[kind](path, **kw)
