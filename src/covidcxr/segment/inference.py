"""Lung-mask prediction: load a segmenter by name or path, run it in torch or onnxruntime, cache masks.

A segmenter is named by

* ``lung-unet-vgg11``: the pretrained U-Net of the weights catalogue (Montgomery + Shenzhen; file
  verified by sha256, see :mod:`covidcxr.models.catalog`), at its preset ``lung-unet@512``;
* a ``covidcxr segment train`` checkpoint (``segmenter.pt``): from scratch or fine-tuned;
* a bare state_dict file of the pretrained architecture (e.g. the ``.pth`` itself).

``default_segmenter()`` is ``$COVIDCXR_LUNG_MODEL`` when set, else ``lung-unet-vgg11``.
Masks are boolean, at each image's own size, post-processed (two largest components, holes
filled). :class:`MaskCache` keys masks by the image's pixel hash and the segmenter's id, so an
audit never segments the same image twice.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import cv2
import numpy as np

from covidcxr.segment.masks import dilate, overlay, postprocess

if TYPE_CHECKING:
    import torch

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


def _standardize(img: np.ndarray, size: int) -> np.ndarray:
    """Resize to ``size`` x ``size`` and standardise per image (the from-scratch U-Net's input)."""
    small = cv2.resize(img.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    return (small - small.mean()) / (small.std() + 1e-6)


class LungSegmenter:
    """A segmentation network with its input convention; predicts boolean lung masks.

    ``preset``: a :class:`~covidcxr.preprocess.Preset` (1 channel) for the pretrained and fine-tuned
    U-Nets; ``None`` means the from-scratch U-Net's per-image standardisation at ``size``.
    ``backend``: ``"torch"`` or ``"onnx"`` (``session`` is then an onnxruntime session).
    """

    def __init__(self, model: Any, size: int, path: str | None = None, meta: dict | None = None, *,
                 preset: Any = None, name: str | None = None, digest: str | None = None,
                 backend: str = "torch", session: Any = None, threshold: float = 0.5):
        self.model = model.eval() if model is not None else None
        self.size = int(size)
        self.path = path
        self.meta = meta or {}
        self.preset = preset
        self.name = name or (str(path) if path else "in-memory")
        self.digest = digest or ""
        self.backend = backend
        self.session = session
        self.threshold = threshold

    # ------------------------------------------------------------------ identity
    @property
    def id(self) -> str:
        """What produced a mask: name, weights digest, input size (recorded next to every mask)."""
        return f"{self.name}@{self.size}" + (f"#{self.digest[:12]}" if self.digest else "")

    def describe(self) -> dict:
        return {"segmenter": self.name, "id": self.id, "size": self.size, "backend": self.backend,
                "preset": self.preset.name if self.preset is not None else "per-image standardisation",
                "sha256": self.digest or None}

    # ------------------------------------------------------------------ inference
    def inputs(self, images: Sequence[np.ndarray]) -> np.ndarray:
        if self.preset is not None:
            return np.stack([self.preset.array(np.asarray(im, np.float32)) for im in images]).astype(np.float32)
        return np.stack([_standardize(im, self.size) for im in images])[:, None].astype(np.float32)

    def _lung_prob(self, x: np.ndarray) -> np.ndarray:
        """N x S x S lung probability at the network's resolution."""
        if self.backend == "onnx":
            (logit,) = self.session.run(None, {"image": x})
            _trim_heap()
            return 1.0 / (1.0 + np.exp(-logit[:, 0]))
        import torch

        from covidcxr.segment.model import lung_logit

        with torch.inference_mode():
            return torch.sigmoid(lung_logit(self.model, torch.from_numpy(x)))[:, 0].numpy()

    def probabilities(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Lung probability maps, each at its image's size."""
        if not len(images):
            return []
        prob = self._lung_prob(self.inputs(images))
        return [cv2.resize(p, (im.shape[1], im.shape[0]), interpolation=cv2.INTER_LINEAR)
                for p, im in zip(prob, images)]

    def predict(self, images: Sequence[np.ndarray], threshold: float | None = None) -> list[np.ndarray]:
        t = self.threshold if threshold is None else threshold
        return [postprocess(p, t) for p in self.probabilities(images)]

    def low_res(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Lung probability at the network's resolution (S x S, float16): what :class:`MaskCache` keeps, so a
        cached entry costs 2 S^2 bytes whatever the image size (a 2500 x 2048 mask held 5 MB)."""
        if not len(images):
            return []
        return [p.astype(np.float16) for p in self._lung_prob(self.inputs(images))]

    def mask_from_low_res(self, prob: np.ndarray, shape: tuple[int, ...], threshold: float | None = None) -> np.ndarray:
        """The boolean mask at ``shape`` (H, W) from :meth:`low_res` (resized, then thresholded and cleaned)."""
        t = self.threshold if threshold is None else threshold
        full = cv2.resize(np.asarray(prob, np.float32), (int(shape[1]), int(shape[0])), interpolation=cv2.INTER_LINEAR)
        return postprocess(full, t)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return self.predict([image])[0]

    # ------------------------------------------------------------------ onnx
    def export_onnx(self, path: str | os.PathLike) -> Path:
        """Write the network (one lung-logit output, dynamic batch) as ONNX; returns the path."""
        import torch

        from covidcxr.segment.model import lung_logit

        class _Logit(torch.nn.Module):
            def __init__(self, net):
                super().__init__()
                self.net = net

            def forward(self, x):
                return lung_logit(self.net, x)

        import io

        buf = io.BytesIO()
        x = torch.zeros(1, 1, self.size, self.size)
        import warnings

        with warnings.catch_warnings():  # the legacy exporter's deprecation notice; it handles this plain CNN
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(_Logit(self.model).eval(), (x,), buf, input_names=["image"],
                              output_names=["lung_logit"], dynamic_axes={"image": {0: "n"}, "lung_logit": {0: "n"}},
                              opset_version=17, dynamo=False)
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, out)  # two processes exporting at once never leave half a file
        return out


_TRIM: Any = None


def _trim_heap() -> None:
    """Hand the U-Net's freed activations back to the OS (glibc ``malloc_trim``; elsewhere nothing).

    Without a memory arena onnxruntime frees them after each run, but glibc keeps the pages: 60 MB more
    resident after five 256-px masks (measured). Trimming costs well under a millisecond here.
    """
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


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
_LOADED: dict[tuple, LungSegmenter] = {}


def load_segmenter(spec: str | os.PathLike | LungSegmenter | None = None, *, size: int | None = None,
                   backend: str = "torch", threshold: float = 0.5, torch_free: bool = False) -> LungSegmenter:
    """A :class:`LungSegmenter` by catalogue name or file (``None``: :func:`default_segmenter`).

    ``size`` overrides the input size of preset-based segmenters (e.g. ``lung-unet-vgg11`` at 256 px
    for a cheaper, coarser mask). ``backend="onnx"`` runs onnxruntime on an ONNX export kept in
    :func:`cache_dir` (written on first use); ``"auto"`` picks onnx when onnxruntime is installed.
    ``torch_free=True`` (the ONNX predictors): only an existing export of the pretrained U-Net is
    loaded, with onnxruntime alone; when there is none, :class:`NoTorchFreeSegmenter` says what to run
    instead of importing torch to write it. Loaded segmenters are kept per process.
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
    # an ONNX session belongs to the export it was loaded from: another COVIDCXR_CACHE is another session
    key = (spec, size, backend, threshold, str(cache_dir()) if backend == "onnx" else None)
    if key in _LOADED:
        return _LOADED[key]
    if torch_free and (backend != "onnx" or spec != PRETRAINED):
        raise NoTorchFreeSegmenter(f"{spec}: only the ONNX export of {PRETRAINED} loads without torch "
                                 f"(backend {backend!r}; onnxruntime installed?)")
    if backend == "onnx" and spec == PRETRAINED:
        # torch-free: the pretrained U-Net's export, once written, runs without torch or the .pth
        from covidcxr.preprocess import get_preset

        preset = get_preset("lung-unet", size)
        onnx_path = onnx_file(PRETRAINED_SHA256, preset.size)
        if onnx_path.is_file():
            seg = LungSegmenter(None, preset.size, str(onnx_path), {"catalogue": spec}, preset=preset, name=spec,
                                digest=PRETRAINED_SHA256, backend="onnx", session=_onnx_session(onnx_path),
                                threshold=threshold)
            _LOADED[key] = seg
            return seg
        if torch_free:
            raise NoTorchFreeSegmenter(
                f"no ONNX export of {PRETRAINED} at {preset.size} px ({onnx_path}); write it once (needs torch and "
                f"the weights) with: python -c 'from covidcxr.segment.inference import export_onnx; "
                f"export_onnx(size={preset.size})'")
    seg = _load(spec, size, threshold)
    if backend == "onnx":
        onnx_path = onnx_file(seg.digest, seg.size)
        if not onnx_path.is_file():
            seg.export_onnx(onnx_path)
        seg.session, seg.backend = _onnx_session(onnx_path), "onnx"
    _LOADED[key] = seg
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
    from covidcxr.safeload import UnsafeFileError, torch_load

    try:
        b = torch_load(p)  # weights_only=True unless the user passed --trust-checkpoint
    except UnsafeFileError as err:
        raise SegmenterError(str(err)) from None
    except Exception as err:
        raise SegmenterError(f"{spec}: cannot read segmentation checkpoint ({type(err).__name__}: {err})") from None
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


# --------------------------------------------------------------------------- cache


def image_hash(image: np.ndarray) -> str:
    """sha256 of the image's pixels (as 8-bit) and shape: the same picture from two files hashes alike."""
    a = np.asarray(image)
    u8 = np.clip(a * 255.0 + 0.5, 0, 255).astype(np.uint8) if a.dtype.kind == "f" else a.astype(np.uint8)
    h = hashlib.sha256(str(u8.shape).encode())
    h.update(np.ascontiguousarray(u8).tobytes())
    return h.hexdigest()


class MaskCache:
    """Low-resolution lung maps by (segmenter id, image hash): in memory (LRU) and, with ``folder``, on disk.

    Entries are what :meth:`LungSegmenter.low_res` returns (S x S at the segmenter's resolution, float16), never
    full-size masks: memory per entry is bounded by the segmenter's size, not the image's (issue 21 §2.7). On
    disk they are 16-bit PNGs under ``lowres/`` (older full-size mask PNGs beside it are not read).
    """

    def __init__(self, folder: str | os.PathLike | None = None, max_items: int = 512):
        self.folder = Path(folder) if folder else None
        self.max_items = max_items
        self._mem: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self.hits = self.misses = 0

    def _file(self, seg_id: str, key: str) -> Path | None:
        if self.folder is None:
            return None
        safe = hashlib.sha256(seg_id.encode()).hexdigest()[:16]
        return self.folder / safe / "lowres" / key[:2] / f"{key}.png"

    def get(self, seg_id: str, key: str) -> np.ndarray | None:
        m = self._mem.get((seg_id, key))
        if m is None:
            f = self._file(seg_id, key)
            if f is not None and f.is_file():
                raw = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
                m = (raw.astype(np.float32) / 65535.0).astype(np.float16) if raw is not None else None
        if m is None:
            self.misses += 1
            return None
        self.hits += 1
        self._remember(seg_id, key, m)
        return m.copy()

    def put(self, seg_id: str, key: str, mask: np.ndarray) -> None:
        self._remember(seg_id, key, mask)
        f = self._file(seg_id, key)
        if f is not None:
            f.parent.mkdir(parents=True, exist_ok=True)
            tmp = f.with_suffix(f".{os.getpid()}.tmp.png")
            cv2.imwrite(str(tmp), np.round(np.clip(np.asarray(mask, np.float32), 0, 1) * 65535).astype(np.uint16))
            os.replace(tmp, f)

    def _remember(self, seg_id: str, key: str, mask: np.ndarray) -> None:
        self._mem[(seg_id, key)] = np.asarray(mask, np.float16)
        self._mem.move_to_end((seg_id, key))
        while len(self._mem) > self.max_items:
            self._mem.popitem(last=False)


class CachedSegmenter:
    """``(image) -> mask`` through a :class:`MaskCache`; ``segment_many`` batches the misses."""

    def __init__(self, segmenter: LungSegmenter, cache: MaskCache | None = None):
        self.segmenter = segmenter
        self.cache = cache or MaskCache()
        self.calls = 0  # images actually segmented

    @property
    def id(self) -> str:
        return self.segmenter.id

    def segment_many(self, images: Sequence[np.ndarray], batch_size: int = 4) -> list[np.ndarray]:
        keys = [image_hash(im) for im in images]
        found: dict[str, np.ndarray] = {}  # low-resolution maps; a mask is made at each image's size below
        for k in dict.fromkeys(keys):
            m = self.cache.get(self.id, k)
            if m is not None:
                found[k] = m
        todo = [keys.index(k) for k in dict.fromkeys(keys) if k not in found]  # one image per distinct hash
        for s in range(0, len(todo), batch_size):
            chunk = todo[s : s + batch_size]
            for i, m in zip(chunk, self.segmenter.low_res([images[i] for i in chunk]), strict=True):
                self.cache.put(self.id, keys[i], m)
                found[keys[i]] = m
            self.calls += len(chunk)
        return [self.segmenter.mask_from_low_res(found[k], np.shape(im)[:2]) for k, im in zip(keys, images)]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return self.segment_many([image])[0]


# --------------------------------------------------------------------------- lung-crop provider


def lung_crop_provider(spec: str | os.PathLike | LungSegmenter | None = None, dilation: float = 0.03,
                       cache: MaskCache | None = None, **load_kw) -> Callable[[np.ndarray], np.ndarray]:
    """A mask function for lung-crop presets: segment (cached), then dilate by ``dilation`` of the
    longer side (COVID-CXNet widens the lung box). Pass it to ``Preset.prepare(img, provider)``; a preset
    carries one as a picklable :class:`covidcxr.segment.maskspec.MaskSpec` (``preset.with_masks(spec)``).
    ``provider.id`` names segmenter and dilation."""
    seg = CachedSegmenter(load_segmenter(spec, **load_kw), cache)

    def provider(image: np.ndarray) -> np.ndarray:
        return dilate(seg(image), dilation)

    provider.segmenter = seg.segmenter  # type: ignore[attr-defined]
    provider.id = f"{seg.id}+dilate{dilation}"  # type: ignore[attr-defined]
    return provider


# --------------------------------------------------------------------------- batch helpers


def predict_masks(images: Sequence[np.ndarray], model: str | os.PathLike | LungSegmenter | None = None,
                  batch_size: int = 4) -> list[np.ndarray]:
    """Boolean lung masks for [0,1] grayscale arrays (each at its own size)."""
    seg = load_segmenter(model)
    out: list[np.ndarray] = []
    for s in range(0, len(images), batch_size):
        out += seg.predict(images[s : s + batch_size])
    return out


def predict_files(paths: Sequence[str], model: str | os.PathLike | LungSegmenter | None, out: str | os.PathLike, *,
                  batch_size: int = 4, overlay_images: bool = True,
                  on_error: Callable[[str, str], None] | None = None,
                  progress: Callable[[int], None] | None = None, **kw) -> tuple[list[str], list[tuple[str, str]]]:
    """Write ``<stem>_mask.png`` (0/255, image size) and ``<stem>_overlay.png`` per readable image,
    and ``masks.csv``: per image the mask's measurements and plausibility verdict, and the segmenter.

    Returns written mask files and failures. Refuses to write over an input file.
    """
    from covidcxr.io import CXRReadError, read_image

    if "overlay" in kw:  # the old keyword
        overlay_images = bool(kw.pop("overlay")) or overlay_images
    seg = load_segmenter(model)
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    inputs = {Path(p).resolve() for p in paths}
    written: list[str] = []
    failures: list[tuple[str, str]] = []
    used: set[str] = set()
    rows: list[dict] = []
    from covidcxr.segment.plausibility import assess

    for s in range(0, len(paths), batch_size):
        imgs, names = [], []
        for p in paths[s : s + batch_size]:
            try:
                imgs.append(read_image(p))
                names.append(p)
            except CXRReadError as err:
                reason = str(err).removeprefix(f"{p}: ")
                failures.append((str(p), reason))
                if on_error:
                    on_error(str(p), reason)
        for p, img, m in zip(names, imgs, seg.predict(imgs) if imgs else []):
            stem = Path(p).stem
            k = 1
            while stem in used:
                k += 1
                stem = f"{Path(p).stem}-{k}"
            used.add(stem)
            dest = outdir / f"{stem}_mask.png"
            targets = [dest] + ([outdir / f"{stem}_overlay.png"] if overlay_images else [])
            if any(t.resolve() in inputs for t in targets):
                reason = f"output {dest.name} would overwrite an input file; choose another --out"
                failures.append((str(p), reason))
                if on_error:
                    on_error(str(p), reason)
                continue
            cv2.imwrite(str(dest), (m * 255).astype(np.uint8))
            written.append(str(dest))
            if overlay_images:
                cv2.imwrite(str(targets[1]), overlay(img, m))
            v = assess(m, img, seg.id)
            keep = ("fraction", "components", "balance", "left_fraction", "right_fraction", "cx", "cy")
            rows.append({"file": str(p), "mask": str(dest), "segmenter": seg.id, "plausible": v.plausible,
                         "reason": v.reason, **{k: v.measurements.get(k) for k in keep}})
        if progress:
            progress(len(paths[s : s + batch_size]))
    if rows:
        import csv

        with open(outdir / "masks.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return written, failures
