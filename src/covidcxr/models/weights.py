"""Weight sources for :func:`covidcxr.models.create`: ``none``, ``imagenet``, a catalogue name, ``xrv-nih``, ``xrv-all``, a file.

* a catalogue name (``mobilenet_v2-imagenet``, ``efficientnet_lite0-imagenet``; see
  :mod:`covidcxr.models.catalog` and ``covidcxr weights list``): a named file found offline in
  ``COVIDCXR_WEIGHTS_DIR`` and checked against its sha256 before use.
* ``imagenet``: for ``mobilenet_v2`` / ``efficientnet_lite0`` the catalogue file when it is found;
  otherwise (and for the other architectures) torchvision's ``Weights`` API (``IMAGENET1K_V1``, the
  weights the papers used) or timm's pretrained file, downloaded once into the torch / Hugging Face
  cache. Offline, one line says where to put the file.
* ``xrv-nih`` / ``xrv-all``: torchxrayvision's DenseNet-121 trained on ChestX-ray14 (NIH) or on
  all its datasets, **from random initialisation** (no ImageNet stage): ChestX-ray14 -> COVID transfer.
  These models take one channel in [-1024, 1024], so the model is built with ``in_chans=1`` and
  :func:`resolve_preset` says ``xrv``. The real ImageNet -> ChestX-ray14 -> COVID chain is trained
  by ``covidcxr train`` with a ``stages:`` recipe (configs/twice-transfer-mobilenet_v2.yaml).
* a local file: a state_dict (``.pt``/``.pth``), a Lightning checkpoint (``state_dict`` with a
  ``model.`` or other prefix), a covidcxr checkpoint or a ``.safetensors`` file.

When the source head has a different number of outputs, the body is loaded and the head starts
fresh, except that output rows whose class name matches a source label are copied (Bassi &
Attux's *output neuron keeping*: a 3-class model started from a ChestX-ray14 model keeps the
"Pneumonia" neuron as its ``pneumonia`` row).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from covidcxr.io import file_sha256
from covidcxr.models import catalog
from covidcxr.models.backbones import CHEXNET_LABELS
from covidcxr.models.catalog import WeightsError
from covidcxr.models.registry import ModelError, ModelSpec, get_head, get_spec

log = logging.getLogger(__name__)

#: the 3-class convention of the whole package
DEFAULT_CLASSES: tuple[str, ...] = ("normal", "pneumonia", "COVID-19")

#: torchxrayvision weight names behind our source names
XRV_WEIGHTS = {"xrv-nih": "densenet121-res224-nih", "xrv-all": "densenet121-res224-all"}

#: torchxrayvision's 18-output label order (``xrv.datasets.default_pathologies``)
XRV_LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Consolidation",
    "Infiltration",
    "Pneumothorax",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Effusion",
    "Pneumonia",
    "Pleural_Thickening",
    "Cardiomegaly",
    "Nodule",
    "Mass",
    "Hernia",
    "Lung Lesion",
    "Fracture",
    "Lung Opacity",
    "Enlarged Cardiomediastinum",
)

#: torchvision architecture behind each registry name, for ``imagenet``
TORCHVISION_ARCH = {
    "resnet18": "resnet18",
    "resnet50": "resnet50",
    "squeezenet1_1": "squeezenet1_1",
    "vgg19": "vgg19",
    "densenet121": "densenet121",
    "densenet169": "densenet169",
    "densenet201": "densenet201",
    "chexnet": "densenet121",
    "cxnet": "densenet121",
    "mobilenet_v2": "mobilenet_v2",
}
_TV_HEAD = {"resnet": "fc", "densenet": "classifier", "squeezenet": "classifier", "vgg": "classifier",
            "mobilenet": "classifier"}
#: timm architecture behind each registry name, for ``imagenet`` without the catalogue file
TIMM_ARCH = {"efficientnet_lite0": "tf_efficientnet_lite0"}

#: output names that mean the same class as a source label (normalised as by :func:`_norm`):
#: Bassi & Attux keep ChestX-ray14's "No Finding" neuron (when modelled) as the new "normal" output
LABEL_ALIASES = {"normal": ("nofinding",), "covid19": ("covid",)}

# torchvision's fix for DenseNet files saved before PyTorch 0.4 ("norm.1" -> "norm1"), also CheXNet's
_LEGACY_DENSENET = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


@dataclass
class Source:
    """Weights from somewhere, with what is known about their head."""

    state_dict: dict[str, torch.Tensor]
    description: str
    #: names of the source head's outputs, in order, when known
    labels: list[str] | None = None
    #: dotted path of the source's final Linear / of the block to ignore when it does not fit
    head: str | None = None
    head_block: str | None = None
    in_chans: int | None = None
    preset: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- public entry points


def apply_weights(
    name: str,
    weights: str | os.PathLike | None,
    num_classes: int = 3,
    classes: list[str] | tuple[str, ...] | None = None,
    keep_neurons: bool = True,
    progress: bool = True,
    in_chans: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build ``name`` and initialise it from ``weights`` (see module docstring)."""
    from covidcxr.models import build

    spec = get_spec(name)
    if str(weights) in XRV_WEIGHTS and in_chans not in (None, 1):
        raise WeightsError(
            f"{weights}: torchxrayvision models read 1 channel in [-1024, 1024] (preset xrv); drop in_chans={in_chans}"
        )
    src = get_source(name, weights, progress=progress)
    if in_chans is None:
        in_chans = (src.in_chans if src else None) or 3
    model = build(name, num_classes=num_classes, in_chans=int(in_chans), **kwargs)
    if classes is None and num_classes == len(DEFAULT_CLASSES):
        classes = DEFAULT_CLASSES
    elif classes is None and name == "chexnet" and num_classes == len(CHEXNET_LABELS):
        classes = CHEXNET_LABELS  # CheXNet's head: every ChestX-ray14 neuron of an xrv model is kept
    if classes is not None and len(classes) != num_classes:
        raise WeightsError(f"{len(classes)} class names given for {num_classes} outputs")
    report: dict[str, Any] = {}
    if src is not None:
        report = transfer(model, spec, src, classes=classes, keep_neurons=keep_neurons)
    model.covidcxr_init = {
        "weights": "none" if src is None else str(weights),
        "source": "none" if src is None else src.description,
        "preset": _preset(spec, src, int(in_chans)),
        **(src.meta if src is not None else {}),
        **report,
    }
    return model


def resolve_preset(name: str, weights: str | os.PathLike | None = "none") -> str:
    """The preprocessing preset a model needs with these weights.

    ``xrv`` for torchxrayvision weights (1 channel, [-1024, 1024]); a covidcxr checkpoint's own
    preset; otherwise the architecture's paper preset.
    """
    spec = get_spec(name)
    if weights in (None, "", "none", "imagenet"):
        return spec.preset
    if str(weights) in XRV_WEIGHTS:
        return "xrv"
    if catalog.is_catalogued(str(weights)):
        return catalog.get_entry(str(weights)).preset.split("@")[0]
    src = get_source(name, weights)
    return _preset(spec, src, (src.in_chans if src else None) or 3)


def _preset(spec: ModelSpec, src: Source | None, in_chans: int) -> str:
    """The source's preset when it fits the model's input channels, else by channel count."""
    from covidcxr.preprocess import PresetError, get_preset

    if src is not None and src.preset:
        try:
            if get_preset(src.preset).channels == in_chans:
                return src.preset
        except PresetError:
            pass
    return "xrv" if in_chans == 1 else spec.preset


def get_source(name: str, weights: str | os.PathLike | None, progress: bool = True) -> Source | None:
    """Fetch the weights named by ``weights`` (``None`` for ``none``)."""
    spec = get_spec(name)
    w = "none" if weights is None else str(weights)
    if w in ("", "none"):
        return None
    if catalog.is_catalogued(w):
        _check_offered(spec, w)
        return catalog_source(name, w)
    if w == "imagenet":
        _check_offered(spec, w)
        entry = imagenet_entry(name)
        if entry is not None and catalog.find(entry.name) is not None:
            return catalog_source(name, entry.name)  # verified offline copy; a bad checksum is an error
        if name in TIMM_ARCH:
            return timm_imagenet_source(name)
        return imagenet_source(name, progress=progress)
    if w in XRV_WEIGHTS:
        _check_offered(spec, w)
        return xrv_source(w)
    if not Path(w).exists():
        raise WeightsError(
            f"{w}: no such weights file "
            f"(weight sources: none, {', '.join(spec.weight_sources) or '-'}, or a local file)"
        )
    return file_source(w, name)


def _check_offered(spec: ModelSpec, source: str) -> None:
    if source not in spec.weight_sources:
        offered = ", ".join(["none", *spec.weight_sources, "a local file"])
        raise WeightsError(f"{spec.name}: no {source!r} weights for this architecture (offered: {offered})")


# --------------------------------------------------------------------------- sources


def imagenet_entry(name: str) -> catalog.WeightsEntry | None:
    """The catalogue's ImageNet file for architecture ``name``, when it has one."""
    for e in catalog.CATALOG.values():
        if e.arch == name and e.kind == "classifier" and e.name.endswith("-imagenet"):
            return e
    return None


def _catalog_hint(name: str) -> str:
    e = imagenet_entry(name)
    return (f", or set {catalog.ENV_DIR} to a folder holding {e.filename} (catalogue {e.name}; "
            "see `covidcxr weights list`)") if e else ""


def catalog_source(name: str, weights: str) -> Source:
    """A catalogue file: found offline, sha256-checked, mapped onto the architecture's key names."""
    from covidcxr.models.mobile import is_lukemelas, lukemelas_to_timm

    entry = catalog.get_entry(weights)
    if entry.arch != name:
        raise WeightsError(f"{weights}: weights for {entry.arch}, not {name}")
    path = catalog.resolve(weights)
    sd = _read_file(path)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path}: {weights} should hold a state_dict")
    if is_lukemelas(sd):
        try:
            sd = lukemelas_to_timm(sd)
        except KeyError as err:
            raise WeightsError(f"{path}: cannot map lukemelas key names onto timm's ({err.args[0]})") from None
    spec = get_spec(name)
    return Source(
        sd,
        f"{entry.name} ({path.resolve()}, sha256 {entry.sha256[:12]}...)",
        head=spec.head,
        head_block=spec.reinit_block,
        in_chans=3,
        preset=entry.preset.split("@")[0],
        meta={"catalog": catalog.provenance(weights), "sha256": entry.sha256, "file": str(path.resolve())},
    )


def timm_imagenet_source(name: str) -> Source:
    """timm's own pretrained file (Hugging Face hub cache); offline, one line."""
    import timm

    arch = TIMM_ARCH[name]
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # hub progress and retry chatter
            m = timm.create_model(arch, pretrained=True)
    except Exception as err:
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:160]
        raise WeightsError(
            f"imagenet weights for {name}: timm could not get {arch} ({reason}); offline?{_catalog_hint(name)}"
        ) from None
    cfg = getattr(m, "pretrained_cfg", {}) or {}
    return Source(m.state_dict(), f"timm {arch} {cfg.get('tag', 'pretrained')}", head="classifier",
                  head_block="classifier", in_chans=3,
                  meta={"file": f"hf-hub:{cfg.get('hf_hub_id', arch)}"})


def imagenet_cache_path(name: str) -> Path:
    """Where torch looks for the ImageNet file of ``name`` (the torch hub ``checkpoints`` folder)."""
    w = _imagenet_enum(name)
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(w.url).path)


def _imagenet_enum(name: str):
    import torchvision

    arch = TORCHVISION_ARCH.get(name)
    if arch is None:
        raise WeightsError(f"{name}: no ImageNet weights for this architecture")
    return torchvision.models.get_model_weights(arch).IMAGENET1K_V1


def imagenet_source(name: str, progress: bool = True) -> Source:
    """torchvision ImageNet weights; offline, one line names the file and the folder to put it in."""
    w = _imagenet_enum(name)
    target = imagenet_cache_path(name)
    if not target.exists():
        # download_url_to_file directly: load_state_dict_from_url prints a "Downloading" line first,
        # which offline would precede our one-line error. The progress bar starts once connected.
        log.debug("downloading %s to %s", w.url, target)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(w.url, str(target), progress=progress)
        except Exception as err:  # URLError, socket errors, HTTP errors, a read-only cache...
            reason = " ".join(f"{type(err).__name__}: {err}".split())[:200]
            raise WeightsError(
                f"imagenet weights for {name}: download of {w.url} failed ({reason}); offline? place the file "
                f"{target.name} in {target.parent}/ or pass weights=PATH to a local file{_catalog_hint(name)}"
            ) from None
    try:
        sd = w.get_state_dict(progress=False, check_hash=False)  # reads the cached file
    except Exception as err:
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:200]
        raise WeightsError(
            f"imagenet weights for {name}: cannot read the cached file {target} ({reason}); delete it and retry, "
            "or pass weights=PATH to a local file"
        ) from None
    spec = get_spec(name)
    return Source(
        sd, f"torchvision {TORCHVISION_ARCH[name]} IMAGENET1K_V1", head_block=_TV_HEAD[spec.family], in_chans=3,
        meta={"file": str(target), "sha256": file_sha256(target)},
    )


def xrv_source(weights: str) -> Source:
    """torchxrayvision DenseNet-121 weights (downloaded by torchxrayvision into its cache)."""
    try:
        import torchxrayvision as xrv
    except ImportError:
        raise WeightsError(
            f"{weights}: torchxrayvision is not installed (pip install torchxrayvision, or covidcxr[xrv])"
        ) from None
    xname = XRV_WEIGHTS[weights]
    url = xrv.models.model_urls[xname]["weights_url"]
    local = Path(os.path.expanduser(xrv.utils.get_cache_dir())) / os.path.basename(url)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # torchxrayvision prints download progress
            xmodel = xrv.models.DenseNet(weights=xname)
    except Exception as err:
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:200]
        raise WeightsError(
            f"{weights}: cannot get torchxrayvision weights {xname} ({reason}); offline? download {url} "
            f"and place it as {local}, or pass weights=PATH to that file"
        ) from None
    src = xrv_model_source(xmodel, description=f"torchxrayvision {xname}")
    return src


def xrv_model_source(xmodel: nn.Module, description: str = "torchxrayvision DenseNet") -> Source:
    """A torchxrayvision ``DenseNet`` (loaded or not) as a weight source.

    Its layout is torchvision's DenseNet-121 with one input channel and an 18-output
    ``classifier``; ``op_threshs`` (calibration buffer) is not part of the network.
    """
    sd = {k: v for k, v in xmodel.state_dict().items() if k != "op_threshs"}
    labels = list(getattr(xmodel, "targets", None) or getattr(xmodel, "pathologies", None) or XRV_LABELS)
    return Source(
        sd,
        description,
        labels=labels,
        head="classifier",
        head_block="classifier",
        in_chans=int(sd["features.conv0.weight"].shape[1]),
        preset="xrv",
    )


def _torch_load(path: Path) -> Any:
    """weights_only=True; a file with pickled objects is refused (WeightsError) unless --trust-checkpoint."""
    from covidcxr.safeload import UnsafeFileError, torch_load

    try:
        return torch_load(path)
    except UnsafeFileError as err:
        raise WeightsError(str(err)) from None


def _read_file(path: Path) -> Any:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return _torch_load(path)
    except WeightsError:
        raise
    except Exception as err:
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:200]
        raise WeightsError(f"{path}: cannot read weights ({reason})") from None


def file_source(path: str | os.PathLike, name: str) -> Source:
    """A state_dict, Lightning checkpoint, covidcxr checkpoint, pickled module or safetensors file."""
    from covidcxr.models.checkpoint import FORMAT

    p = Path(path)
    obj = _read_file(p)
    meta = {"file": str(p.resolve()), "sha256": file_sha256(p)}
    if isinstance(obj, nn.Module):  # e.g. a torchxrayvision .pt file, which pickles the whole model
        labels = getattr(obj, "targets", None) or getattr(obj, "pathologies", None)
        sd, labels = obj.state_dict(), (list(labels) if labels else None)
        sd.pop("op_threshs", None)
        src = Source(sd, f"{p} (pickled {type(obj).__name__})", labels=labels)
    elif isinstance(obj, dict) and (obj.get("format") == FORMAT or isinstance(obj.get("covidcxr"), dict)):
        b = obj if obj.get("format") == FORMAT else obj["covidcxr"]
        try:
            bspec = get_spec(b["arch"])
            sd = b["state_dict"]
        except (KeyError, ModelError) as err:
            raise WeightsError(f"{p}: covidcxr checkpoint without a usable architecture/state_dict ({err})") from None
        preset = (b.get("preset") or {}).get("name")
        src = Source(
            sd,
            f"{p} (covidcxr checkpoint, {b['arch']})",
            labels=list(b.get("classes") or []) or None,
            head=bspec.head,
            head_block=bspec.reinit_block,
            in_chans=(b.get("arch_kwargs") or {}).get("in_chans"),
            preset=preset,
            meta={"arch": b["arch"]},
        )
    elif isinstance(obj, dict):
        sd = None
        for key in ("state_dict", "model_state_dict", "model", "net"):
            if isinstance(obj.get(key), dict):
                sd = obj[key]
                break
        if sd is None and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            sd = obj
        if sd is None:
            raise WeightsError(f"{p}: no state_dict in this file (top-level keys: {sorted(map(str, obj))[:10]})")
        src = Source(dict(sd), str(p))
    else:
        raise WeightsError(f"{p}: not a weights file (holds a {type(obj).__name__})")
    src.meta = {**meta, **src.meta}
    # Align key names with the architecture so that in_chans can be read before building.
    from covidcxr.models import build

    with torch.device("meta"):
        ref = build(name, num_classes=1)
    src.state_dict = align_keys(src.state_dict, ref.state_dict().keys())
    if src.in_chans is None:
        first = get_spec(name).first_conv
        w = src.state_dict.get(f"{first}.weight") if first else None
        if isinstance(w, torch.Tensor) and w.ndim == 4:
            src.in_chans = int(w.shape[1])
    return src


# --------------------------------------------------------------------------- mapping


def align_keys(sd: dict[str, torch.Tensor], target_keys) -> dict[str, torch.Tensor]:
    """Fix legacy DenseNet names and strip the wrapper prefix (``model.``, ``module.densenet121.``...).

    The prefix is the one under which most keys match the target; keys outside it belong to
    other parts of a wrapper (losses, EMA copies...) and are dropped.
    """
    targets = set(target_keys)
    fixed: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        m = _LEGACY_DENSENET.match(k)
        fixed[m.group(1) + m.group(2) if m else k] = v
    counts: Counter[str] = Counter()
    for k in fixed:
        parts = k.split(".")
        for i in range(len(parts)):
            if ".".join(parts[i:]) in targets:
                counts[".".join(parts[:i]) + ("." if i else "")] += 1
                break
    if not counts:
        return fixed
    prefix = max(counts.items(), key=lambda kv: (kv[1], -len(kv[0])))[0]
    if not prefix:
        return fixed
    return {k[len(prefix) :]: v for k, v in fixed.items() if k.startswith(prefix)}


def _in_block(key: str, block: str | None) -> bool:
    return bool(block) and (key == block or key.startswith(block + "."))


def _norm(label: str) -> str:
    return re.sub(r"[\s_\-]+", "", str(label)).lower()


def transfer(
    model: nn.Module,
    spec: ModelSpec,
    src: Source,
    classes: list[str] | tuple[str, ...] | None = None,
    keep_neurons: bool = True,
) -> dict[str, Any]:
    """Load ``src`` into ``model``: the body must fit; the head is loaded if it fits, else fresh
    with same-named output rows copied (output neuron keeping). Returns what was done."""
    target = model.state_dict()
    sd = align_keys(src.state_dict, target.keys())
    reinit = spec.reinit_block
    first = f"{spec.first_conv}.weight" if spec.first_conv else None
    load: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    adapted = None
    for k, v in sd.items():
        in_head = _in_block(k, reinit) or _in_block(k, src.head_block)
        t = target.get(k)
        if t is None:
            if not in_head:
                unexpected.append(k)
            continue
        if t.shape != v.shape:
            if k == first and v.ndim == 4 and v.shape[0] == t.shape[0] and v.shape[2:] == t.shape[2:]:
                v = _adapt_channels(v, t.shape[1])
                adapted = f"{k}: {sd[k].shape[1]} -> {t.shape[1]} input channels"
            elif in_head:
                continue
            else:
                mismatched.append(f"{k} {tuple(v.shape)}!={tuple(t.shape)}")
                continue
        load[k] = v.to(t.dtype)
    missing = [
        k for k in target if k not in load and not _in_block(k, reinit) and not k.endswith("num_batches_tracked")
    ]
    if missing or unexpected or mismatched:
        raise WeightsError(
            f"{src.description}: weights do not fit {spec.name}: "
            f"{len(missing)} missing keys {missing[:6]}, {len(unexpected)} unexpected keys {unexpected[:6]}, "
            f"{len(mismatched)} shape mismatches {mismatched[:4]}"
        )
    model.load_state_dict(load, strict=False)
    head_keys = [k for k in target if _in_block(k, reinit) and not k.endswith("num_batches_tracked")]
    head_loaded = all(k in load for k in head_keys)
    report: dict[str, Any] = {"head": "loaded" if head_loaded else "fresh", "kept_neurons": {}}
    if adapted:
        report["adapted"] = adapted
    if not head_loaded and keep_neurons and classes:
        report["kept_neurons"] = keep_output_neurons(model, spec, sd, src, classes)
    return report


def _adapt_channels(w: torch.Tensor, cin: int) -> torch.Tensor:
    """RGB filters -> grayscale by summing; grayscale -> RGB by spreading (same response to gray input)."""
    if cin == 1:
        return w.sum(1, keepdim=True)
    return w.mean(1, keepdim=True).repeat(1, cin, 1, 1) * (w.shape[1] / cin)


def _source_head(sd: dict[str, torch.Tensor], spec: ModelSpec, src: Source, in_features: int):
    candidates = [src.head, spec.head, spec.reinit_block, "classifier", "classifier.0", "fc"]
    for c in candidates:
        w = sd.get(f"{c}.weight") if c else None
        if isinstance(w, torch.Tensor) and w.ndim == 2 and w.shape[1] == in_features:
            return c, w, sd.get(f"{c}.bias")
    return None, None, None


def keep_output_neurons(
    model: nn.Module, spec: ModelSpec, sd: dict[str, torch.Tensor], src: Source, classes
) -> dict[str, str]:
    """Copy source head rows into the new head where a class name matches a source label.

    Only where the new head reads the same pooled features as the source head (same input
    width); COVID-CXNet's 10-unit hidden layer, for instance, has no such row to copy.
    """
    head = get_head(model, spec)
    name, w, b = _source_head(sd, spec, src, head.in_features)
    if w is None:
        return {}
    labels = src.labels
    if not labels or len(labels) != w.shape[0]:
        labels = {14: list(CHEXNET_LABELS), 18: list(XRV_LABELS)}.get(w.shape[0])
    if not labels:
        return {}
    index = {_norm(lab): j for j, lab in enumerate(labels) if lab}
    kept: dict[str, str] = {}
    with torch.no_grad():
        for i, c in enumerate(classes):
            j = index.get(_norm(c))
            for alias in LABEL_ALIASES.get(_norm(c), ()) if j is None else ():
                j = index.get(alias) if j is None else j
            if j is None:
                continue
            head.weight[i].copy_(w[j])
            if head.bias is not None:
                head.bias[i].copy_(b[j] if b is not None else 0.0)
            kept[str(c)] = f"{labels[j]} (row {j} of {name})"
    if kept:
        log.info("output neuron keeping: %s", kept)
    return kept


# --------------------------------------------------------------------------- listing (covidcxr weights list)

#: what each download source is, for ``covidcxr weights list``
_DOWNLOADS = {
    "imagenet": ("torchvision IMAGENET1K_V1 / timm pretrained (the catalogue file first where one exists)",
                 "ImageNet-1k classification", "BSD-3-Clause (torchvision) / Apache-2.0 (timm weights)"),
    "xrv-nih": ("torchxrayvision densenet121-res224-nih", "ChestX-ray14 (NIH), from random initialisation, 1 channel",
                "Apache-2.0 (torchxrayvision)"),
    "xrv-all": ("torchxrayvision densenet121-res224-all", "all torchxrayvision datasets, from random initialisation",
                "Apache-2.0 (torchxrayvision)"),
}


def download_sources() -> list[str]:
    return list(_DOWNLOADS)


def _offered(source: str) -> list[str]:
    from covidcxr.models.registry import REGISTRY

    return sorted(n for n, s in REGISTRY.items() if source in s.weight_sources)


def _download_status(source: str, archs: list[str]) -> tuple[str, str | None]:
    """('cached' | 'download on first use' | ..., where) without touching the network."""
    if source == "imagenet":
        cached, where = [], None
        for a in archs:
            e = imagenet_entry(a)
            if e is not None and catalog.find(e.name) is not None:
                cached.append(f"{a} (catalogue)")
            elif a in TORCHVISION_ARCH and imagenet_cache_path(a).exists():
                cached.append(a)
                where = str(imagenet_cache_path(a).parent)
        if not cached:
            return "download on first use", None
        return f"available offline for {', '.join(cached)}; others download on first use", where
    try:
        import torchxrayvision as xrv
    except ImportError:
        return "unavailable: torchxrayvision not installed", None
    url = xrv.models.model_urls[XRV_WEIGHTS[source]]["weights_url"]
    local = Path(os.path.expanduser(xrv.utils.get_cache_dir())) / os.path.basename(url)
    return ("cached", str(local)) if local.is_file() else ("download on first use", None)


def source_status(verify_files: bool = True) -> list[dict[str, Any]]:
    """Every weight source: catalogue files (found? verified?) and download sources (cached?)."""
    rows: list[dict[str, Any]] = []
    for r in catalog.status(verify_files=verify_files):
        rows.append({"name": r["name"], "kind": f"catalogue {r['kind']}", "architectures": [r["arch"]],
                     "preset": r["preset"], "trained_on": r["trained_on"], "license": r["license"],
                     "file": r["filename"], "sha256": r["sha256"], "status": r["status"], "path": r["path"],
                     "source_url": r["source_url"], "notes": r["notes"]})
    for name, (what, trained_on, lic) in _DOWNLOADS.items():
        archs = _offered(name)
        status, where = _download_status(name, archs)
        rows.append({"name": name, "kind": "download", "architectures": archs,
                     "preset": "xrv" if name.startswith("xrv") else "the architecture's", "trained_on": trained_on,
                     "license": lic, "file": None, "sha256": None, "status": status, "path": where,
                     "source_url": what, "notes": ""})
    return rows
