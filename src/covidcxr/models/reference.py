"""Reading and packing the shipped reference models (fp16 safetensors + JSON metadata).

A checkpoint stored as ``NAME.safetensors`` + ``NAME.json`` is a normal covidcxr checkpoint: the
JSON holds every key of :func:`covidcxr.models.checkpoint.make_bundle` except ``state_dict``, which
is the safetensors file (fp16 floats, restored to float32 on load). Nothing is unpickled, so it is
as safe as ``torch.load(..., weights_only=True)``. :func:`covidcxr.models.load` accepts such a file
and the names ``reference`` / ``reference-severity`` (see :mod:`covidcxr.reference_models`).

>>> from covidcxr.models import reference
>>> reference.pack("run/best.ckpt", "covidcxr-reference", card={...}, version="1.0.0")
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from covidcxr import reference_models as rm
from covidcxr.models.checkpoint import FORMAT, CheckpointError, read_bundle

#: the shipped files together may not exceed this (issue 19)
MAX_TOTAL_BYTES = 12_000_000


def sidecar(path: str | os.PathLike) -> Path:
    return Path(path).with_suffix(".json")


def read_safetensors_bundle(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint dict of ``NAME.safetensors`` + ``NAME.json`` (float tensors as float32)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    meta_path = sidecar(p)
    if not meta_path.is_file():
        raise CheckpointError(f"{p}: no {meta_path.name} beside it (a safetensors checkpoint keeps its "
                              "architecture, classes and preset there)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{meta_path}: cannot read ({type(err).__name__}: {err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: not covidcxr checkpoint metadata (format {FORMAT!r} expected)")
    try:
        sd = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{p}: cannot read weights ({type(err).__name__}: {err})") from None
    # fp16 on disk to fit the size budget; inference and fine-tuning run in float32
    meta["state_dict"] = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    return meta


def _jsonable(obj: Any) -> Any:
    """Checkpoint metadata as plain JSON (tensors and NumPy scalars become numbers)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor) or (hasattr(obj, "tolist") and hasattr(obj, "dtype")):  # tensors, NumPy
        return _jsonable(obj.tolist())
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pack(
    checkpoint: str | os.PathLike,
    name: str,
    *,
    version: str,
    card: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
    out_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Store ``checkpoint`` as the shipped model ``name``: fp16 safetensors + JSON; updates MANIFEST.json.

    ``provenance`` (manifest sha256, recipe, seed, start weights, ...) is merged into ``training``;
    ``card`` is stored under ``card``. Returns the manifest row. Refuses when the shipped files would
    exceed :data:`MAX_TOTAL_BYTES` together.
    """
    from safetensors.torch import save_file

    name = rm.canonical(name)
    out = Path(out_dir) if out_dir is not None else rm.REFERENCE_DIR
    out.mkdir(parents=True, exist_ok=True)
    b = read_bundle(checkpoint)
    sd = {k: (v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu()).contiguous()
          for k, v in b["state_dict"].items()}
    meta = {k: v for k, v in b.items() if k != "state_dict"}
    meta["training"] = {**(meta.get("training") or {}), **(provenance or {}), "run_name": name,
                        "model_version": version}
    meta["card"] = dict(card or {})
    meta["stored_as"] = "float16 safetensors (restored to float32 on load)"
    tmp_w = out / f".{name}.safetensors.tmp"
    save_file(sd, str(tmp_w), metadata={"format": FORMAT, "name": name, "version": version})
    tmp_m = out / f".{name}.json.tmp"
    tmp_m.write_text(json.dumps(_jsonable(meta), indent=1, sort_keys=True) + "\n", encoding="utf-8")
    for tmp in (tmp_w, tmp_m):
        os.chmod(tmp, 0o644)  # package data: readable by everyone
    # the budget is checked before anything shipped is replaced: a refused pack leaves the package as it was
    others = sum(p.stat().st_size for p in out.iterdir() if p.is_file() and not p.name.startswith(".")
                 and p.stem != name and p.name != "MANIFEST.json")
    total = others + tmp_w.stat().st_size + tmp_m.stat().st_size
    if total > MAX_TOTAL_BYTES:
        tmp_w.unlink()
        tmp_m.unlink()
        raise CheckpointError(f"{checkpoint}: packed as {name}, the reference files would take {total / 1e6:.1f} MB "
                              f"together, over the {MAX_TOTAL_BYTES / 1e6:.0f} MB budget")
    os.replace(tmp_w, out / f"{name}.safetensors")
    os.replace(tmp_m, out / f"{name}.json")
    return write_manifest(out)


def update_card(name: str, card: dict[str, Any], out_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Replace the card stored in a shipped model's JSON sidecar (weights untouched); MANIFEST.json's sha256 follow.

    For figures measured after packing (scripts/model_card.py --refresh). Returns the manifest rows.
    """
    name = rm.canonical(name)
    out = Path(out_dir) if out_dir is not None else rm.REFERENCE_DIR
    side = out / f"{name}.json"
    meta = json.loads(side.read_text(encoding="utf-8"))
    meta["card"] = dict(card)
    tmp = out / f".{name}.json.tmp"
    tmp.write_text(json.dumps(_jsonable(meta), indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.chmod(tmp, 0o644)
    os.replace(tmp, side)
    return write_manifest(out)


def write_manifest(out_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """(Re)write MANIFEST.json from the files present; refuse when they exceed the size budget."""
    out = Path(out_dir) if out_dir is not None else rm.REFERENCE_DIR
    rows: dict[str, Any] = {}
    total = 0
    for w in sorted(out.glob("*.safetensors")):
        m = sidecar(w)
        meta = json.loads(m.read_text(encoding="utf-8"))
        size = w.stat().st_size
        total += size + m.stat().st_size
        t = meta.get("training") or {}
        rows[w.stem] = {
            "file": w.name, "sha256": file_sha256(w), "size": size,
            "metadata_file": m.name, "metadata_sha256": file_sha256(m),
            "version": t.get("model_version"), "arch": meta.get("arch"), "task": meta.get("task"),
            "preset": (meta.get("preset") or {}).get("name"),
            "license": (meta.get("card") or {}).get("license", rm.LICENSE),
            "trained_on": (meta.get("card") or {}).get("trained_on", ""),
        }
    if total > MAX_TOTAL_BYTES:
        raise CheckpointError(f"{out}: the reference files take {total / 1e6:.1f} MB together, over the "
                              f"{MAX_TOTAL_BYTES / 1e6:.0f} MB budget")
    (out / "MANIFEST.json").write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return rows
