"""The reference models shipped inside the package: names, files, cards, and the default-model notice.

Torch-free on purpose: :meth:`covidcxr.predict.Predictor.from_path` and the CLI resolve a model
*name* (``reference``) into a file before they know which backend runs it, and the ONNX paths must
not import torch. Reading the weights lives in :mod:`covidcxr.models.reference`.

Each shipped model is two files in ``covidcxr/models/reference/``:

    NAME.safetensors   fp16 state dict (safe to load: no pickle)
    NAME.json          the checkpoint's metadata (format covidcxr-checkpoint: arch, classes, preset,
                       threshold, temperature, training provenance, metrics) and its model card

and ``MANIFEST.json`` lists them with their sha256 (read by the weights catalogue).

>>> from covidcxr import reference_models as rm
>>> rm.resolve_model("reference")          # -> .../covidcxr/models/reference/covidcxr-reference.safetensors
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

#: the folder of the shipped files
REFERENCE_DIR = Path(__file__).resolve().parent / "models" / "reference"
CLASSIFIER = "covidcxr-reference"
SEVERITY = "covidcxr-reference-severity"
#: every accepted spelling -> the model's name
ALIASES: dict[str, str] = {
    "reference": CLASSIFIER,
    CLASSIFIER: CLASSIFIER,
    "reference-severity": SEVERITY,
    SEVERITY: SEVERITY,
}
RESEARCH_ONLY = "research use only, not for diagnosis"
#: The training images include Figure1 (and Cohen images) released CC BY-NC-SA; weights learned from them
#: are treated as a derived work: released under the same terms, non-commercial research use only.
LICENSE = ("CC BY-NC-SA 4.0 (weights trained on images under CC BY-NC-SA and other licences: non-commercial "
           "research use only, share alike, attribute the datasets); covidcxr code MIT")


class ReferenceModelError(FileNotFoundError):
    """A shipped reference model is missing from this installation (one line; the CLI prints it)."""


def is_reference(name: str | os.PathLike | None) -> bool:
    """True for ``reference``, ``reference-severity`` and the full names, unless a file of that name exists."""
    if name is None:
        return False
    s = str(name)
    return s in ALIASES and not Path(s).exists()


def canonical(name: str) -> str:
    return ALIASES[name]


def weights_file(name: str) -> Path:
    return REFERENCE_DIR / f"{canonical(name)}.safetensors"


def meta_file(name: str) -> Path:
    return REFERENCE_DIR / f"{canonical(name)}.json"


def resolve_model(path: str | os.PathLike, *, severity: bool = False) -> str:
    """A model argument as a file path: ``reference`` (or ``reference-severity``) becomes the shipped
    file; anything else is returned unchanged. ``severity=True`` maps plain ``reference`` to the
    reference severity model (what ``--severity reference`` means)."""
    if not is_reference(path):
        return str(path)
    name = canonical(str(path))
    if severity and name == CLASSIFIER:
        name = SEVERITY
    f = weights_file(name)
    if not f.is_file() or not meta_file(name).is_file():
        raise ReferenceModelError(f"{path}: the reference model {name} is not installed ({f} missing); "
                                  "reinstall covidcxr or re-create it with scripts/train_reference.sh")
    return str(f)


def model_files(path: str | os.PathLike) -> list[Path]:
    """The files a model argument reads (``reference`` resolved): the model file and, for a safetensors model,
    its JSON metadata beside it. What a command that writes files must never write over."""
    f = Path(resolve_model(path))
    return [f, f.with_suffix(".json")] if f.suffix == ".safetensors" else [f]


@lru_cache(maxsize=8)
def _read_meta(path: str, mtime: float) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def metadata(name: str) -> dict[str, Any]:
    """The checkpoint metadata of a shipped model (no weights)."""
    f = meta_file(name)
    if not f.is_file():
        raise ReferenceModelError(f"{name}: the reference model is not installed ({f} missing)")
    return _read_meta(str(f), f.stat().st_mtime)


def card(name: str) -> dict[str, Any]:
    """The model card stored with a shipped model."""
    return dict(metadata(name).get("card") or {})


def version(name: str) -> str:
    return str((metadata(name).get("training") or {}).get("model_version") or "unversioned")


def manifest() -> dict[str, Any]:
    """``MANIFEST.json``: name -> {file, sha256, size, version, ...} (empty when nothing is installed)."""
    f = REFERENCE_DIR / "MANIFEST.json"
    if not f.is_file():
        return {}
    with open(f, encoding="utf-8") as fh:
        return json.load(fh)


def default_notice(name: str = CLASSIFIER, *, what: str = "--model") -> str:
    """The one line printed when a command uses a reference model because no model was given."""
    try:
        v = version(name)
    except ReferenceModelError:
        v = "not installed"
    return f"model: {canonical(name)} {v} (the shipped reference model; no {what} given); {RESEARCH_ONLY}"


def render_card(c: dict[str, Any]) -> str:
    """A model card (Mitchell et al. 2019 sections, as stored by scripts/model_card.py) as Markdown."""
    lines = [f"## {c.get('name', 'model')} {c.get('version', '')}".rstrip(), ""]
    if c.get("summary"):
        lines += [str(c["summary"]), ""]
    for sec in c.get("sections") or []:
        lines += [f"### {sec.get('title', '')}", ""]
        for para in sec.get("paragraphs") or []:
            lines += [str(para), ""]
        for item in sec.get("items") or []:
            lines.append(f"- {item}")
        if sec.get("items"):
            lines.append("")
        for t in sec.get("tables") or []:
            if t.get("caption"):
                lines += [f"*{t['caption']}*", ""]
            cols = [str(x) for x in t.get("columns") or []]
            lines.append("| " + " | ".join(cols) + " |")
            lines.append("|" + "|".join("---" for _ in cols) + "|")
            lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in t.get("rows") or []]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def model_or_default(value: str | None, *, what: str = "--model", stream: Any = None) -> str:
    """The CLI's model argument: ``value``, or ``reference`` when none was given. Either way a reference
    model is announced in one line on stderr (name, version, research use only): the default is never silent."""
    import sys

    out = stream if stream is not None else sys.stderr
    if value and not is_reference(value):
        return str(value)
    name = canonical(value) if value else CLASSIFIER
    line = default_notice(name, what=what) if not value else default_notice(name).replace(
        f" (the shipped reference model; no --model given)", " (the shipped reference model)")
    print(line, file=out)
    return str(value or "reference")
