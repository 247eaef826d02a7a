"""Load a lung segmenter by name or path, in torch or onnxruntime.

A segmenter is named by

* ``lung-unet-vgg11``: the pretrained U-Net of the weights catalogue (Montgomery + Shenzhen; file
  verified by sha256, see :mod:`covidcxr.models.catalog`), at its preset ``lung-unet@512``;
* a ``covidcxr segment train`` checkpoint (``segmenter.pt``): from scratch or fine-tuned;
* a bare state_dict file of the pretrained architecture (e.g. the ``.pth`` itself).

``default_segmenter()`` is ``$COVIDCXR_LUNG_MODEL`` when set, else ``lung-unet-vgg11``. ONNX exports
(and their optimised graphs) are kept in :func:`cache_dir`, so later runs need no torch.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from covidcxr.segment.segmenter import LungSegmenter

log = logging.getLogger(__name__)

FORMAT = "covidcxr-segmenter"
PRETRAINED = "lung-unet-vgg11"
#: the catalogue's sha256 of the pretrained file (models.catalog holds the entry; a test keeps them equal).
#: Here so that a torch-free process can find the pretrained U-Net's ONNX export without the catalogue.
PRETRAINED_SHA256 = "3e169d71d101d9e09a4ff339d53b182bac40f86a111cccfdc116e0c8c6432a8e"
ENV_MODEL = "COVIDCXR_LUNG_MODEL"


def _segmenter_error():
    from covidcxr.segment.model import SegmenterError

    return SegmenterError


class NoTorchFreeSegmenter(RuntimeError):
    """No segmenter can be loaded without torch (``load_segmenter(torch_free=True)``); the message says
    what to run. Not a SegmenterError, whose module imports torch."""


def default_segmenter() -> str:
    """The segmenter used when none is named: ``$COVIDCXR_LUNG_MODEL`` or the pretrained U-Net."""
    return os.environ.get(ENV_MODEL, "").strip() or PRETRAINED


def _onnx_session(path: Path, threads: int | None = None):
    """An onnxruntime session on an exported segmenter.

    Optimising the U-Net's graph costs about 0.25 s per process (more than a third of one 256-px mask),
    so the optimised graph is kept beside the export and later sessions load it unoptimised (identical
    output). It may hold CPU-specific kernels, so its name carries the onnxruntime version, the CPU's
    flags and the export's size and time; a file that fails to load is rebuilt.
    """
    import onnxruntime as ort

    def options():
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads or os.environ.get("OMP_NUM_THREADS") or 0)
        so.log_severity_level = 3
        # no memory arena: it keeps the peak of every run resident (+125 MB after five 256-px masks, measured)
        # for about 5 % more time per mask; the service and the batch jobs hold this session for long
        so.enable_cpu_mem_arena = False
        return so

    providers = ["CPUExecutionProvider"]
    opt = _optimized_file(path, ort.__version__)
    if opt is not None and opt.is_file():
        so = options()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            return ort.InferenceSession(str(opt), so, providers=providers)
        except Exception as err:  # truncated, or written by another build: make it again
            log.info("rebuilding %s (%s)", opt.name, err)
            opt.unlink(missing_ok=True)
    so = options()
    tmp = opt.with_name(f".{opt.name}.{os.getpid()}.tmp") if opt is not None else None
    if tmp is not None:
        so.optimized_model_filepath = str(tmp)
    session = ort.InferenceSession(str(path), so, providers=providers)
    if tmp is not None and tmp.is_file():
        try:
            os.replace(tmp, opt)  # two processes writing at once never leave half a file
        except OSError:
            tmp.unlink(missing_ok=True)
    return session


def _optimized_file(path: Path, ort_version: str) -> Path | None:
    """Where the optimised graph of the export ``path`` is kept (None: the folder is not writable)."""
    import platform

    try:
        st = path.stat()
        flags = ""
        if Path("/proc/cpuinfo").is_file():
            flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
        key = hashlib.sha256(f"{ort_version}|{platform.machine()}|{flags}|{st.st_size}|{st.st_mtime_ns}".encode())
        if not os.access(path.parent, os.W_OK):
            return None
    except OSError:
        return None
    return path.with_name(f"{path.stem}.opt-{key.hexdigest()[:12]}.onnx")


def cache_dir() -> Path:
    """Where exported ONNX segmenters and cached masks live (``$COVIDCXR_CACHE`` or ~/.cache/covidcxr)."""
    return Path(os.environ.get("COVIDCXR_CACHE") or Path.home() / ".cache" / "covidcxr")


def _file_digest(p: Path) -> str:
    from covidcxr.io import file_sha256

    return file_sha256(p)


def load_segmenter(spec: str | os.PathLike | LungSegmenter | None = None, *, size: int | None = None,
                   backend: str = "torch", threshold: float = 0.5, torch_free: bool = False) -> LungSegmenter:
    """A :class:`LungSegmenter` by catalogue name or file (``None``: :func:`default_segmenter`).

    ``size`` overrides the input size of preset-based segmenters (e.g. ``lung-unet-vgg11`` at 256 px
    for a cheaper, coarser mask). ``backend="onnx"`` runs onnxruntime on an ONNX export kept in
    :func:`cache_dir` (written on first use); ``"auto"`` picks onnx when onnxruntime is installed.
    ``torch_free=True`` (the ONNX predictors): only an existing export of the pretrained U-Net is
    loaded, with onnxruntime alone; when there is none, :class:`NoTorchFreeSegmenter` says what to run
    instead of importing torch to write it. Every call loads: whoever segments many images keeps the
    segmenter it got (the plausibility gate holds its own; a :class:`~covidcxr.segment.maskspec.MaskSpec`
    loads once per process).
    """
    if isinstance(spec, LungSegmenter):
        return spec
    spec = str(spec) if spec is not None else default_segmenter()
    if backend == "auto":
        try:
            import onnxruntime  # noqa: F401

            backend = "onnx"
        except ImportError:
            backend = "torch"
    if backend not in ("torch", "onnx"):
        raise _segmenter_error()(f"unknown segmenter backend {backend!r}; choose torch, onnx or auto")
    if torch_free and (backend != "onnx" or spec != PRETRAINED):
        raise NoTorchFreeSegmenter(f"{spec}: only the ONNX export of {PRETRAINED} loads without torch "
                                 f"(backend {backend!r}; onnxruntime installed?)")
    if backend == "onnx" and spec == PRETRAINED:
        # torch-free: the pretrained U-Net's export, once written, runs without torch or the .pth
        from covidcxr.preprocess import get_preset

        preset = get_preset("lung-unet", size)
        onnx_path = onnx_file(PRETRAINED_SHA256, preset.size)
        if onnx_path.is_file():
            return LungSegmenter(None, preset.size, str(onnx_path), {"catalogue": spec}, preset=preset, name=spec,
                                 digest=PRETRAINED_SHA256, backend="onnx", session=_onnx_session(onnx_path),
                                 threshold=threshold)
        if torch_free:
            raise NoTorchFreeSegmenter(
                f"no ONNX export of {PRETRAINED} at {preset.size} px ({onnx_path}); write it once (needs torch and "
                f"the weights) with: python -c 'from covidcxr.segment.loading import export_onnx; "
                f"export_onnx(size={preset.size})'")
    seg = _load(spec, size, threshold)
    if backend == "onnx":
        onnx_path = onnx_file(seg.digest, seg.size)
        if not onnx_path.is_file():
            seg.export_onnx(onnx_path)
        seg.session, seg.backend = _onnx_session(onnx_path), "onnx"
    return seg


def onnx_file(digest: str, size: int) -> Path:
    """Where the ONNX export of the weights with this sha256, at this input size, is kept."""
    return cache_dir() / "segment" / f"{digest[:16] or 'model'}-{size}.onnx"


def export_onnx(spec: str | os.PathLike | None = None, size: int | None = None) -> Path:
    """Write (or find) the ONNX export of a segmenter, so that later runs need no torch; returns its path."""
    seg = load_segmenter(spec, size=size, backend="onnx")
    return onnx_file(seg.digest, seg.size)


def _load(spec: str, size: int | None, threshold: float) -> LungSegmenter:
    import torch

    from covidcxr.models import catalog
    from covidcxr.preprocess import Preset, get_preset
    from covidcxr.segment.model import build, load_pretrained_file, load_state_strict

    SegmenterError = _segmenter_error()
    if catalog.is_catalogued(spec):
        entry = catalog.get_entry(spec)
        if entry.kind != "segmenter":
            raise SegmenterError(f"{spec}: a {entry.kind} in the weights catalogue, not a lung segmenter")
        path = catalog.resolve(spec)
        preset = get_preset(entry.preset, size)
        return LungSegmenter(load_pretrained_file(path), preset.size, str(path), {"catalogue": spec},
                             preset=preset, name=spec, digest=entry.sha256, threshold=threshold)
    p = Path(spec)
    if not p.is_file():
        raise SegmenterError(f"{spec}: segmentation model not found (name one of the catalogue, "
                             f"e.g. {PRETRAINED}, or a `covidcxr segment train` checkpoint)")
    from covidcxr.safeload import load_or_raise

    b = load_or_raise(spec, SegmenterError, "segmentation checkpoint")
    digest = _file_digest(p)
    if isinstance(b, dict) and b.get("format") == FORMAT:
        arch = b.get("arch", "unet")
        model = load_state_strict(build(arch, b.get("kwargs") or {}), b["state_dict"], spec).eval()
        preset = Preset.from_dict(b["preset"]) if b.get("preset") else None
        if preset is not None and size:
            preset = preset.with_size(size)
        s = preset.size if preset is not None else int(b["size"])
        return LungSegmenter(model, s, spec, {k: v for k, v in b.items() if k != "state_dict"}, preset=preset,
                             name=spec, digest=digest, threshold=threshold)
    if isinstance(b, dict) and "init_conv.weight" in b:  # the pretrained architecture's bare state_dict
        preset = get_preset("lung-unet", size)
        return LungSegmenter(load_pretrained_file(p), preset.size, spec, {}, preset=preset, name=spec,
                             digest=digest, threshold=threshold)
    raise SegmenterError(f"{spec}: not a lung-segmentation checkpoint (write one with `covidcxr segment train`, "
                         f"or name {PRETRAINED})")

