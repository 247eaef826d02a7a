"""Class names and the COVIDx label mapping shared by every source adapter."""

from __future__ import annotations

import math
import re

#: The 3-class task, always in this order (index = class id).
CLASSES: list[str] = ["normal", "pneumonia", "COVID-19"]

#: The binary task (Deep-COVID): COVID-19 against everything else, in this order.
BINARY_CLASSES: list[str] = ["non-COVID", "COVID-19"]


def task_classes(task: str, classes: list[str] | None = None) -> tuple[list[str], dict[str, int]]:
    """(model class names, manifest label -> class index) for a training task.

    ``"3class"``: ``classes`` (default :data:`CLASSES`), one index each. ``"binary"``: :data:`BINARY_CLASSES`,
    with normal and pneumonia both mapped to non-COVID.
    """
    if task == "binary":
        if classes and list(classes) != BINARY_CLASSES:
            raise ValueError(f"data.task binary has the classes {BINARY_CLASSES}; drop data.classes={list(classes)}")
        return list(BINARY_CLASSES), label_index_map(BINARY_CLASSES)
    if task != "3class":
        raise ValueError(f"unknown task {task!r}; use 3class or binary")
    names = list(classes or CLASSES)
    return names, {c: i for i, c in enumerate(names)}


def label_index_map(classes: list[str]) -> dict[str, int]:
    """Manifest label -> index into a model's ``classes``. A binary COVID model
    (:data:`BINARY_CLASSES`) also takes the 3-class labels: normal and pneumonia count as non-COVID."""
    out = {str(c): i for i, c in enumerate(classes)}
    if list(classes) == BINARY_CLASSES:
        out.update({"normal": 0, "pneumonia": 0})
    return out

#: Finding -> label, as the COVIDx notebook (create_COVIDx.ipynb) maps it. Keys are lower case.
#: Later Cohen metadata writes findings as paths ("Pneumonia/Viral/COVID-19"); see :func:`map_finding`.
FINDING_TO_LABEL: dict[str, str] = {
    "covid-19": "COVID-19",
    "covid19": "COVID-19",
    "covid": "COVID-19",
    "sars": "pneumonia",
    "mers": "pneumonia",
    "mers-cov": "pneumonia",
    "streptococcus": "pneumonia",
    "klebsiella": "pneumonia",
    "chlamydophila": "pneumonia",
    "legionella": "pneumonia",
    "e.coli": "pneumonia",
    "staphylococcus": "pneumonia",
    "pneumocystis": "pneumonia",
    "mycoplasma": "pneumonia",
    "varicella": "pneumonia",
    "influenza": "pneumonia",
    "herpes": "pneumonia",
    "nocardia": "pneumonia",
    "bacterial": "pneumonia",
    "viral": "pneumonia",
    "fungal": "pneumonia",
    "pneumonia": "pneumonia",
    "bacterial pneumonia": "pneumonia",
    "viral pneumonia": "pneumonia",
    "lung opacity": "pneumonia",  # RSNA's opacity class, as COVIDx uses it
    "no finding": "normal",
    "normal": "normal",
}

#: Findings that COVIDx leaves out on purpose (not an infectious pneumonia, or unspecific).
DROPPED_FINDINGS = {"lipoid", "ards", "todo", "unknown", "tuberculosis"}

#: The exact keys of the original COVIDx notebook, for ``map_finding(..., strict=True)``.
COVIDX_STRICT = {"covid-19", "sars", "mers", "streptococcus", "klebsiella", "chlamydophila", "legionella", "e.coli", "normal", "no finding", "lung opacity"}

#: Views that count as frontal. Everything else (L, lateral, axial, coronal) is dropped.
FRONTAL_VIEWS = {"pa", "ap", "ap supine", "ap erect", "ap semi erect", "ap semi-erect", "ap upright", "frontal"}


def _blank(v: object) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or str(v).strip() == ""


def map_finding(finding: object, strict: bool = False) -> str | None:
    """Map a source's finding text to a class, or None to drop the image.

    ``"COVID-19, ARDS"`` -> COVID-19 (first finding wins, as in COVIDx); ``"ARDS"`` alone -> None;
    ``"Pneumonia/Viral/COVID-19"`` -> COVID-19 (most specific part first); ``"Pneumonia/Lipoid"`` -> None.
    ``strict=True`` keeps only the original notebook's keys (drops Varicella, Influenza, ...).
    """
    if _blank(finding):
        return None
    text = str(finding).strip()
    first = text.split(",")[0].strip()
    parts = [p.strip().lower() for p in first.split("/") if p.strip()]
    if any(p in DROPPED_FINDINGS for p in parts):
        return None
    for part in reversed(parts):  # most specific first
        if part in FINDING_TO_LABEL:
            if strict and part not in COVIDX_STRICT:
                return None
            return FINDING_TO_LABEL[part]
    return None


def is_frontal(view: object) -> bool:
    """True for PA/AP views (any AP variant). A missing view counts as frontal (Figure1 often omits it)."""
    if _blank(view):
        return True
    return str(view).strip().lower() in FRONTAL_VIEWS or str(view).strip().lower().startswith("ap ")


_LABEL_ALIASES = {
    "covid-19": "COVID-19",
    "covid19": "COVID-19",
    "covid": "COVID-19",
    "positive": "COVID-19",
    "normal": "normal",
    "no finding": "normal",
    "pneumonia": "pneumonia",
    "viral pneumonia": "pneumonia",
    "bacterial pneumonia": "pneumonia",
    "lung opacity": "pneumonia",
    "lung_opacity": "pneumonia",
}


def normalize_label(label: object) -> str | None:
    """Canonical class name for a label written in any common spelling, or None if unknown.

    ``negative`` (COVIDx binary files) is kept as ``negative``: it is not one of the 3 classes.
    """
    if _blank(label):
        return None
    key = re.sub(r"\s+", " ", str(label).strip().lower())
    if key == "negative":
        return "negative"
    return _LABEL_ALIASES.get(key)
