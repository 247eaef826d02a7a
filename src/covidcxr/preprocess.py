"""Named, serialisable preprocessing presets, one per paper.

A preset turns the [0, 1] grayscale array from :mod:`covidcxr.io` into the tensor a
model was trained on. It runs in two stages so that the expensive, deterministic
part can be cached and augmentation can sit between them::

    prepare(array)  -> H x W float32 in [0, 1] at the model size   (crop, CLAHE, resize)
    [Augment]       -> training only, on the prepared image
    finalize(image) -> C x H x W float32 tensor                     (channels, scaling, mean/std)

``preset(array)`` does both. Checkpoints store ``preset.to_dict()`` and
:func:`Preset.from_dict` refuses an unknown or missing preset: no silent default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import cv2
import numpy as np

if TYPE_CHECKING:  # torch is imported where a tensor is made: the ONNX paths run without it
    import torch

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# COVID-CXNet's lung crop needs a lung mask: :meth:`Preset.prepare` takes one (or a mask function), or the
# preset's own ``masks`` (:meth:`Preset.with_masks`): a picklable mask function, in practice a
# :class:`covidcxr.segment.maskspec.MaskSpec` (segmenter name + sha256), which travels with the preset into
# worker processes and Ray tasks. No process-wide hook (issue 21 §1). Preprocessing never imports a
# segmenter itself: data flows one way (preprocess -> data -> models -> segment).


class PresetError(ValueError):
    """A preset is unknown, missing or malformed."""


@dataclass(frozen=True)
class Preset:
    name: str
    size: int
    channels: int = 3
    #: fraction of the image height removed from the top (COVID-Net drops burned-in text there)
    crop_top: float = 0.0
    #: take the central square before resizing (otherwise the image is resized, aspect not kept)
    center_square: bool = False
    #: CLAHE clip limit and tile grid; 0 disables it
    clahe_clip: float = 0.0
    clahe_tiles: int = 8
    #: crop to the dilated lung bounding box before resizing (COVID-CXNet)
    lung_crop: bool = False
    lung_margin: float = 0.05
    #: output value range before mean/std: [0,1] images are mapped linearly onto it
    value_range: tuple[float, float] = (0.0, 1.0)
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    #: resize interpolation: "auto" (area when shrinking, bilinear when enlarging) or "cubic"
    #: (COVID-CXNet resizes with cv2.INTER_CUBIC)
    interpolation: str = "auto"
    #: histogram matching (COVID-CXNet): the 8-bit prepared image is matched to this template, given as
    #: its gray values at evenly spaced quantiles 0..1 (see :func:`histogram_template`); empty: off
    hist_template: tuple[float, ...] = ()
    #: per-channel enhancements made at finalize, in channel order: "beasf", "clahe" (clahe_clip /
    #: clahe_tiles) or "raw". Empty: the prepared image in every channel (CLAHE, if on, at prepare).
    channel_stack: tuple[str, ...] = ()
    #: gamma of the BEASF channel
    beasf_gamma: float = 1.5
    #: where ``hist_template``'s mapping is fitted: "film" (every pixel) or "lung" (only the pixels inside the
    #: lung mask, the mapping then applied to the whole film; :func:`match_histogram_in_mask`). "lung" needs a
    #: lung mask, as the lung crop does. Left out of :meth:`to_dict` when "film", so older fingerprints hold.
    hist_region: str = "film"
    #: a lung-crop preset's mask function ``(image) -> bool mask`` (picklable: a MaskSpec); not serialised:
    #: a checkpoint records its segmenter in ``training.lung_segmenter``
    masks: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        unknown = [c for c in self.channel_stack if c not in CHANNEL_ENHANCERS]
        if unknown:
            raise PresetError(f"preset {self.name}: unknown channel enhancement(s) {unknown}; "
                              f"known: {sorted(CHANNEL_ENHANCERS)}")
        if self.channel_stack and len(self.channel_stack) != self.channels:
            raise PresetError(f"preset {self.name}: channel_stack {list(self.channel_stack)} "
                              f"gives {len(self.channel_stack)} channels, not {self.channels}")
        if self.interpolation not in _INTERP:
            raise PresetError(f"preset {self.name}: interpolation {self.interpolation!r}; "
                              f"choose one of {sorted(_INTERP)}")
        if self.hist_region not in HIST_REGIONS:
            raise PresetError(f"preset {self.name}: hist_region {self.hist_region!r}; "
                              f"choose one of {list(HIST_REGIONS)}")
        if self.hist_region == "lung" and not self.hist_template:
            raise PresetError(f"preset {self.name}: hist_region lung needs a hist_template")
        t = self.hist_template
        if t and (len(t) < 2 or any(b < a for a, b in zip(t, t[1:])) or t[0] < 0 or t[-1] > 255):
            raise PresetError(f"preset {self.name}: hist_template must be >= 2 non-decreasing gray values in 0..255")

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(dataclasses.replace(self, masks=None))
        d.pop("masks", None)  # the segmenter is recorded beside the preset (training.lung_segmenter)
        for k in _TUPLE_FIELDS:
            d[k] = list(getattr(self, k))
        if d.get("hist_region") == "film":  # the default: absent, as in every file written before it existed
            d.pop("hist_region")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Preset":
        if not d:
            raise PresetError("no preprocessing preset given; refusing to guess (a wrong preset makes every image one class)")
        if not isinstance(d, dict) or "name" not in d:
            raise PresetError(f"malformed preprocessing preset: {d!r}")
        base = d["name"].split("@")[0]
        if base not in PRESETS:
            raise PresetError(f"unknown preprocessing preset {d['name']!r}; known: {', '.join(sorted(PRESETS))}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise PresetError(f"preset {d['name']!r} has unknown fields {sorted(unknown)}")
        kw = dict(d)
        for k in _TUPLE_FIELDS:
            if k in kw:
                kw[k] = tuple(kw[k])
        return cls(**kw)

    def fingerprint(self) -> str:
        """Short hash of every field; two presets that differ in anything differ here."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    @property
    def needs_lung_mask(self) -> bool:
        """Whether :meth:`prepare` needs a lung mask: a lung crop, or lung-field histogram standardisation."""
        return self.lung_crop or self.hist_region == "lung"

    def with_masks(self, masks: Any) -> "Preset":
        """The same preset cropping with ``masks`` (a mask function, e.g. a MaskSpec) when no mask is given."""
        return dataclasses.replace(self, masks=masks)

    def with_size(self, size: int) -> "Preset":
        """The same preset at another resolution, named e.g. ``covidnet@224``."""
        if size == self.size:
            return self
        base = self.name.split("@")[0]
        return dataclasses.replace(self, size=int(size), name=f"{base}@{int(size)}")

    # ------------------------------------------------------------------ stages
    def prepare(self, image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """Geometry and contrast: H x W [0,1] float32 at ``size`` x ``size``."""
        img = np.asarray(image, dtype=np.float32)
        if img.ndim != 2:
            raise PresetError(f"expected a 2-D grayscale image, got shape {img.shape}")
        # the lung mask, when one is needed, follows the image through every crop (one segmentation per film)
        lung = self._lung_mask(img, mask) if self.needs_lung_mask else None
        if self.lung_crop:
            y0, y1, x0, x1 = mask_box(lung, self.lung_margin)
            img, lung = img[y0:y1, x0:x1], lung[y0:y1, x0:x1]
        if self.crop_top > 0:
            top = int(round(img.shape[0] * self.crop_top))
            img = img[top:, :]
            lung = lung[top:, :] if lung is not None else None
        if self.center_square:
            h, w = img.shape
            s = min(h, w)
            y0, x0 = (h - s) // 2, (w - s) // 2
            img = img[y0 : y0 + s, x0 : x0 + s]
            lung = lung[y0 : y0 + s, x0 : x0 + s] if lung is not None else None
        if self.clahe_clip > 0 and "clahe" not in self.channel_stack:
            u8 = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
            clahe = cv2.createCLAHE(clipLimit=self.clahe_clip, tileGridSize=(self.clahe_tiles, self.clahe_tiles))
            img = clahe.apply(u8).astype(np.float32) / 255.0
        h, w = img.shape
        if self.interpolation == "cubic":
            interp = cv2.INTER_CUBIC
        else:
            interp = cv2.INTER_AREA if (h > self.size or w > self.size) else cv2.INTER_LINEAR
        img = cv2.resize(np.ascontiguousarray(img), (self.size, self.size), interpolation=interp)
        img = np.clip(img, 0.0, 1.0).astype(np.float32, copy=False)
        if self.hist_template or self.channel_stack:
            # COVID-CXNet works on 8-bit images: quantise, then match to the template
            u8 = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
            if self.hist_template and self.hist_region == "lung":
                small = cv2.resize(lung.astype(np.uint8), (self.size, self.size), interpolation=cv2.INTER_NEAREST)
                u8 = self._match_in_lungs(u8, small > 0)
            elif self.hist_template:
                u8 = match_histogram(u8, self.hist_template)
            img = u8.astype(np.float32) / 255.0
        return img

    def _match_in_lungs(self, u8: np.ndarray, lung: np.ndarray) -> np.ndarray:
        """Lung-field standardisation, or the whole-film one (counted, logged) when the mask is too small."""
        lut = lung_lut(u8, lung, self.hist_template)
        if lut is not None:
            return lut[u8]
        _LUNG_FALLBACKS[0] += 1
        log.debug("preset %s: lung mask covers %.1f%% of the film; whole-film histogram standardisation used",
                  self.name, 100.0 * float(np.mean(lung)))
        return match_histogram(u8, NIH_CXR14_TEMPLATE)

    def finalize(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Channels and intensity scaling: C x H x W float32 tensor."""
        import torch

        t = torch.as_tensor(image, dtype=torch.float32)
        if t.ndim == 3 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 2:
            raise PresetError(f"finalize expects H x W or 1 x H x W, got {tuple(t.shape)}")
        if self.channel_stack:  # per-channel enhancements work on 8-bit images, in NumPy
            out = torch.from_numpy(self.finalize_array(t.detach().cpu().numpy()))
            return out.to(t.device) if t.device.type != "cpu" else out
        # one per-channel affine map: ((t * (hi - lo) + lo) - mean) / std = t * a + b
        a, b = self._affine()
        if t.requires_grad or t.device.type != "cpu":
            return (t.unsqueeze(0) * a.to(t.device) + b.to(t.device)).contiguous()
        # NumPy per channel: ~10x faster than a broadcast torch op on one thread (the data-loader case)
        src = t.numpy()
        out = np.empty((self.channels, *src.shape), dtype=np.float32)
        fa, fb = self.__dict__["_affine_cache"][2:]
        for c in range(self.channels):
            np.multiply(src, fa[c], out=out[c])
            out[c] += fb[c]
        return torch.from_numpy(out)

    def __call__(self, image: np.ndarray, mask: np.ndarray | None = None) -> torch.Tensor:
        return self.finalize(self.prepare(image, mask))

    def finalize_array(self, image: np.ndarray) -> np.ndarray:
        """:meth:`finalize` in NumPy (no torch import): C x H x W float32 array, the same values."""
        src = np.asarray(image, dtype=np.float32)
        if src.ndim == 3 and src.shape[0] == 1:
            src = src[0]
        if src.ndim != 2:
            raise PresetError(f"finalize expects H x W or 1 x H x W, got {tuple(src.shape)}")
        fa, fb = self._affine_floats()
        planes = self.enhance(src) if self.channel_stack else [src] * self.channels
        out = np.empty((self.channels, *src.shape), dtype=np.float32)
        for c in range(self.channels):
            np.multiply(planes[c], np.float32(fa[c]), out=out[c])
            out[c] += np.float32(fb[c])
        return out

    def enhance(self, image: np.ndarray) -> list[np.ndarray]:
        """The ``channel_stack`` planes of a prepared H x W [0,1] image, each H x W float32 in [0, 1].

        The image is read as 8-bit (``round(x * 255)``), each enhancement maps 0..255 to 0..255, and the
        result is divided by 255, as COVID-CXNet does (``np.concatenate((beasf, clahe, raw)) / 255``).
        """
        u8 = np.clip(np.asarray(image, dtype=np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return [CHANNEL_ENHANCERS[name](self, u8).astype(np.float32) / np.float32(255.0) for name in self.channel_stack]

    def array(self, image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """``preset(image)`` as a NumPy C x H x W float32 array (what the ONNX paths feed onnxruntime)."""
        return self.finalize_array(self.prepare(image, mask))

    def denormalize(self, tensor: torch.Tensor) -> np.ndarray:
        """Inverse of :meth:`finalize`: C x H x W (or H x W) tensor back to H x W in [0, 1] for display."""
        t = tensor.detach().float().cpu().numpy() if hasattr(tensor, "detach") else np.asarray(tensor, np.float32)
        if t.ndim == 3 and "raw" in self.channel_stack:
            # an enhancement stack: show the unenhanced channel, not the mean of three different contrasts
            c = self.channel_stack.index("raw")
            mean, std = self._per_channel(self.mean)[c], self._per_channel(self.std)[c]
            t = t[c] * std + mean
        if t.ndim == 3:  # NumPy, so that a torch-free (ONNX) caller can pass an array
            mean = np.asarray(self._per_channel(self.mean), dtype=np.float32).reshape(-1, 1, 1)
            std = np.asarray(self._per_channel(self.std), dtype=np.float32).reshape(-1, 1, 1)
            t = (t * std + mean).mean(0)
        lo, hi = self.value_range
        return np.clip((t - lo) / (hi - lo), 0.0, 1.0)

    # ------------------------------------------------------------------ helpers
    def _affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel scale and offset of :meth:`finalize`, as C x 1 x 1 tensors (cached)."""
        cached = self.__dict__.get("_affine_cache")
        if cached is None:
            import torch

            fa, fb = self._affine_floats()
            a = torch.tensor(fa, dtype=torch.float32).view(-1, 1, 1)
            b = torch.tensor(fb, dtype=torch.float32).view(-1, 1, 1)
            cached = (a, b, fa, fb)
            object.__setattr__(self, "_affine_cache", cached)
        return cached[0], cached[1]

    def __getstate__(self) -> dict[str, Any]:
        # drop the caches (torch tensors): a pickled preset must not import torch where it lands
        return {k: v for k, v in self.__dict__.items() if not k.endswith("_cache")}

    def _affine_floats(self) -> tuple[list[float], list[float]]:
        """Per-channel scale and offset as float32-rounded Python floats (shared by both finalizers)."""
        cached = self.__dict__.get("_affine_floats_cache")
        if cached is None:
            lo, hi = self.value_range
            mean = np.asarray(self._per_channel(self.mean), dtype=np.float64)
            std = np.asarray(self._per_channel(self.std), dtype=np.float64)
            a = ((hi - lo) / std).astype(np.float32)
            b = ((lo - mean) / std).astype(np.float32)
            cached = ([float(x) for x in a], [float(x) for x in b])
            object.__setattr__(self, "_affine_floats_cache", cached)
        return cached

    def _per_channel(self, v: tuple[float, ...]) -> tuple[float, ...]:
        if len(v) == self.channels:
            return v
        if len(v) == 1:
            return v * self.channels
        raise PresetError(f"preset {self.name}: {len(v)} mean/std values for {self.channels} channels")

    def _lung_mask(self, img: np.ndarray, mask: np.ndarray | Callable[[np.ndarray], np.ndarray] | None) -> np.ndarray:
        """The boolean lung mask at ``img``'s shape. ``mask``: a lung mask, a mask function ``(image) -> mask``,
        or None (the preset's own ``masks``)."""
        provider = mask if callable(mask) else (self.masks if mask is None else None)
        if mask is None and provider is None:
            what = "crops to the lungs" if self.lung_crop else "standardises the histogram inside the lungs"
            raise PresetError(
                f"preset {self.name} {what} but got no lung mask and has no lung segmenter; pass a "
                "mask, or give the preset one: preset.with_masks(covidcxr.segment.maskspec.MaskSpec('lung-unet-vgg11'))"
            )
        if provider is not None:
            mask = provider(img)
        m = np.asarray(mask)
        if m.shape != img.shape:
            m = cv2.resize(m.astype(np.uint8), (img.shape[1], img.shape[0]), interpolation=cv2.INTER_NEAREST)
        return m > 0


def mask_box(mask: np.ndarray, margin: float = 0.05) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)``: the bounding box of ``mask`` widened by ``margin`` of each side; the whole image when
    the mask is empty or degenerate (under 16 pixels), rather than a crop to noise."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    if len(ys) < 16:
        return 0, h, 0, w
    dy, dx = int(margin * h), int(margin * w)
    return max(0, ys.min() - dy), min(h, ys.max() + 1 + dy), max(0, xs.min() - dx), min(w, xs.max() + 1 + dx)


def crop_to_mask(img: np.ndarray, mask: np.ndarray, margin: float = 0.05) -> np.ndarray:
    """Crop to the bounding box of ``mask`` (resized to the image), widened by ``margin`` of each side."""
    m = np.asarray(mask)
    if m.shape != img.shape:
        m = cv2.resize(m.astype(np.uint8), (img.shape[1], img.shape[0]), interpolation=cv2.INTER_NEAREST)
    y0, y1, x0, x1 = mask_box(m > 0, margin)
    return img[y0:y1, x0:x1]


# --------------------------------------------------------------------------- COVID-CXNet enhancements

_TUPLE_FIELDS = ("value_range", "mean", "std", "hist_template", "channel_stack")
HIST_REGIONS = ("film", "lung")
_INTERP = {"auto", "cubic"}


def beasf(image: np.ndarray, gamma: float = 1.5) -> np.ndarray:
    """Bi-histogram Equalization with Adaptive Sigmoid Functions (Arriaga-Garcia et al. 2014) on a uint8 image.

    The histogram is split at the mean gray level ``m``; each half is remapped by a sigmoid of slope
    ``gamma`` centred on that half's median (the tone where its CDF passes 0.5), spanning 5 units over
    the half's range, then stretched back onto ``[0, m]`` and ``[m, 255]``. The mapping reproduces the
    one COVID-CXNet trained with (armiro/COVID-CXNet, ``BEASF.py``), including its integer truncations,
    its upper median taken one tone early and its upper sigmoid read one tone late, so that a network
    trained there sees the same channel. A constant image is returned unchanged.
    """
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim != 2:
        raise PresetError(f"BEASF needs a 2-D uint8 image, got {img.dtype} {img.shape}")
    lo, hi = int(img.min()), int(img.max())
    if lo == hi:
        return img.copy()
    m = int(img.mean())
    hist = np.bincount(img.ravel(), minlength=256).astype(np.float64)
    tones = np.arange(256, dtype=np.float64)
    lut = tones.copy()

    low = hist[: m + 1] / hist[: m + 1].sum()
    if m > 0:
        half_low = int(np.argmax(np.cumsum(low) > 0.5))  # first tone whose lower CDF passes 0.5
        s_low = 1.0 / (1.0 + np.exp(-gamma * 5.0 * (tones[: m + 1] - half_low) / m))
        v = np.trunc(m * s_low)
        if v[m] > v[0]:
            lut[: m + 1] = np.trunc(m / (v[m] - v[0]) * (v - v[0]))

    if m < 254:  # the upper half needs two tones above m to be stretched
        up = np.zeros(256)
        up[m:] = hist[m:] / hist[m:].sum()
        cdf_up = np.cumsum(up)
        half_up = m + int(np.argmax(cdf_up[m + 1 :] > 0.5))  # as the authors: the tone before the crossing
        s_up = 1.0 / (1.0 + np.exp(-gamma * 5.0 * (tones[m:] - half_up) / (255 - m)))
        v = np.trunc(m + (255 - m) * s_up[: 255 - m])  # tone t reads the sigmoid at t - 1
        if v[-1] > v[0]:
            lut[m + 1 :] = (255 - m) * (v - v[0]) / (v[-1] - v[0]) + m
    return np.clip(lut, 0, 255).astype(np.uint8)[img]


def match_histogram(image: np.ndarray, template: tuple[float, ...] | np.ndarray) -> np.ndarray:
    """Map a uint8 image so that its gray-level distribution follows ``template`` (quantile table).

    ``template[k]`` is the template's gray value at quantile ``k / (len - 1)``. Each gray level of the
    image goes to the template value at the same quantile (the image's CDF at that level), linearly
    interpolated and truncated to uint8, as COVID-CXNet's ``match_histogram`` does with a template image.
    """
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise PresetError(f"histogram matching needs a uint8 image, got {img.dtype}")
    t = np.asarray(template, dtype=np.float64)
    cdf = np.cumsum(np.bincount(img.ravel(), minlength=256)) / img.size
    lut = np.interp(cdf, np.linspace(0.0, 1.0, len(t)), t)
    return np.clip(lut, 0, 255).astype(np.uint8)[img]


#: a lung mask under this fraction of the prepared film (or under 64 pixels) is taken as a segmenter failure:
#: lung-field standardisation falls back to the whole film for that film (a normal lung field covers 20-40 %)
LUNG_HIST_MIN_FRACTION = 0.02
#: the in-lung percentiles between which the quantile mapping holds; beyond them it goes on linearly
LUNG_HIST_LANDMARKS = (1.0, 99.0)
_LUNG_FALLBACKS = [0]


def lung_hist_fallbacks() -> int:
    """How many films this process standardised over the whole film because their lung mask was too small."""
    return _LUNG_FALLBACKS[0]


def lung_lut(image: np.ndarray, mask: np.ndarray, template: tuple[float, ...] | np.ndarray) -> np.ndarray | None:
    """The 256-entry uint8 look-up table of lung-field histogram standardisation, fitted on ``image[mask]`` only.

    Between the lung's 1st and 99th percentile gray levels (:data:`LUNG_HIST_LANDMARKS`) it is
    :func:`match_histogram`'s quantile mapping of the in-mask histogram onto ``template``; beyond them the
    in-mask CDF is flat and would crush every darker or brighter pixel (mediastinum, bone, background) to one
    value, so the mapping goes on linearly with its mean slope over the lung range, as Nyul & Udupa (1999)
    extend their landmark mapping. None when the mask covers under :data:`LUNG_HIST_MIN_FRACTION` of the
    image or under 64 pixels, or the lung field is one gray level (the caller falls back to the whole film).
    """
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise PresetError(f"histogram matching needs a uint8 image, got {img.dtype}")
    m = np.asarray(mask, dtype=bool)
    if m.shape != img.shape:
        raise PresetError(f"lung mask shape {m.shape} differs from the image's {img.shape}")
    n = int(m.sum())
    if n < max(64, LUNG_HIST_MIN_FRACTION * img.size):
        return None
    counts = np.bincount(img[m], minlength=256)
    cdf = np.cumsum(counts) / n
    lo = int(np.searchsorted(cdf, LUNG_HIST_LANDMARKS[0] / 100.0))
    hi = int(np.searchsorted(cdf, LUNG_HIST_LANDMARKS[1] / 100.0))
    if hi <= lo:
        return None
    t = np.asarray(template, dtype=np.float64)
    lut = np.interp(cdf, np.linspace(0.0, 1.0, len(t)), t)
    slope = (lut[hi] - lut[lo]) / (hi - lo)
    levels = np.arange(256, dtype=np.float64)
    lut[:lo] = lut[lo] + slope * (levels[:lo] - lo)
    lut[hi + 1 :] = lut[hi] + slope * (levels[hi + 1 :] - hi)
    return np.clip(lut, 0, 255).astype(np.uint8)


def match_histogram_in_mask(image: np.ndarray, mask: np.ndarray,
                            template: tuple[float, ...] | np.ndarray) -> np.ndarray:
    """``image`` (uint8) standardised by :func:`lung_lut` fitted inside ``mask``; the whole-film
    :func:`match_histogram` to :data:`NIH_CXR14_TEMPLATE` when the mask is too small."""
    lut = lung_lut(image, mask, template)
    return lut[image] if lut is not None else match_histogram(np.asarray(image), NIH_CXR14_TEMPLATE)


def histogram_template(images: Any, n: int = 101) -> tuple[float, ...]:
    """A ``hist_template`` for :func:`match_histogram`: the pooled gray values of ``images`` (uint8 arrays,
    already at the preset's size) at ``n`` evenly spaced quantiles, rounded to 0.01.

    COVID-CXNet matched every image to one training image; pooling many training images gives a
    template that does not hinge on which image came first.
    """
    counts = np.zeros(256)
    for im in images:
        a = np.asarray(im)
        if a.dtype != np.uint8:
            raise PresetError(f"histogram_template needs uint8 images, got {a.dtype}")
        counts += np.bincount(a.ravel(), minlength=256)
    if counts.sum() == 0:
        raise PresetError("histogram_template: no pixels given")
    present = np.nonzero(counts)[0]
    cdf = np.cumsum(counts)[present] / counts.sum()
    q = np.interp(np.linspace(0.0, 1.0, n), cdf, present.astype(np.float64))
    q[0] = present[0]
    return tuple(round(float(x), 2) for x in q)


def _clahe_channel(p: "Preset", u8: np.ndarray) -> np.ndarray:
    return cv2.createCLAHE(clipLimit=p.clahe_clip, tileGridSize=(p.clahe_tiles, p.clahe_tiles)).apply(u8)


#: channel name -> (preset, uint8 H x W) -> uint8 H x W
CHANNEL_ENHANCERS: dict[str, Callable[["Preset", np.ndarray], np.ndarray]] = {
    "beasf": lambda p, u8: beasf(u8, p.beasf_gamma),
    "clahe": _clahe_channel,
    "raw": lambda p, u8: u8,
}


#: COVID-CXNet's histogram-matching template (gray values at quantiles 0, 0.01, ..., 1). COVID-CXNet
#: matched every image to its first training image; this fixed table pools the 666 images of the shared
#: NIH ChestX-ray14 subset (no COVID test image), each resized to 320 px (cubic) as the preset does:
#: ``histogram_template(uint8(Preset(..., channel_stack=...).prepare(img) * 255) for img in nih)``.
NIH_CXR14_TEMPLATE: tuple[float, ...] = (
    0.0, 0.0, 0.76, 2.99, 6.57, 11.39, 16.31, 22.3, 29.19, 36.3, 43.12, 49.87, 56.15, 62.0, 67.38, 72.26, 76.63,
    80.59, 84.22, 87.6, 90.76, 93.76, 96.58, 99.27, 101.86, 104.36, 106.78, 109.11, 111.37, 113.6, 115.8, 117.96,
    120.08, 122.14, 124.17, 126.16, 128.11, 130.02, 131.9, 133.73, 135.51, 137.26, 138.99, 140.68, 142.33, 143.95,
    145.54, 147.12, 148.7, 150.25, 151.79, 153.32, 154.83, 156.33, 157.8, 159.26, 160.72, 162.18, 163.63, 165.08,
    166.54, 167.99, 169.44, 170.89, 172.33, 173.77, 175.2, 176.62, 178.06, 179.51, 180.95, 182.38, 183.81, 185.25,
    186.69, 188.13, 189.58, 191.02, 192.48, 193.96, 195.48, 197.01, 198.57, 200.16, 201.77, 203.4, 205.04, 206.7,
    208.4, 210.17, 212.03, 214.0, 216.07, 218.24, 220.53, 222.94, 225.6, 228.65, 232.5, 237.93, 255.0,
)


#: The reference of lung-field standardisation (``data.hist_standardize: lung``): the pooled gray values inside
#: the lung masks of the first 48 films (name order) of the shared NIH ChestX-ray14 subset, each resized to
#: 256 px (``imagenet@256`` geometry) and masked by the pretrained lung U-Net as the lung crop masks it
#: (lung-unet-vgg11, sha256 3e169d71d101, dilated 3 %; median lung fraction 0.39), at quantiles 0, 0.01, ..., 1:
#: ``scripts/lung_hist_template.py``.
NIH_CXR14_LUNG_TEMPLATE: tuple[float, ...] = (
    0.0, 34.74, 41.77, 46.94, 51.35, 55.3, 58.97, 62.39, 65.62, 68.61, 71.4, 74.06, 76.51, 78.79, 80.94, 82.98,
    84.9, 86.68, 88.37, 89.99, 91.58, 93.15, 94.64, 96.09, 97.51, 98.91, 100.28, 101.65, 102.98, 104.3, 105.61,
    106.88, 108.14, 109.36, 110.57, 111.76, 112.94, 114.13, 115.28, 116.44, 117.58, 118.71, 119.86, 120.99, 122.11,
    123.24, 124.35, 125.48, 126.61, 127.73, 128.84, 129.95, 131.04, 132.13, 133.24, 134.33, 135.4, 136.46, 137.54,
    138.63, 139.75, 140.89, 142.05, 143.22, 144.4, 145.6, 146.82, 148.06, 149.33, 150.62, 151.94, 153.28, 154.65,
    156.08, 157.55, 159.04, 160.57, 162.14, 163.76, 165.48, 167.27, 169.13, 171.04, 173.01, 175.05, 177.09, 179.19,
    181.3, 183.46, 185.68, 187.98, 190.37, 192.84, 195.47, 198.14, 201.03, 204.16, 207.6, 211.63, 217.22, 241.0,
)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "covidnet",
            size=480,
            channels=3,
            crop_top=0.08,
            center_square=True,
            description="COVID-Net: crop top 8%, central square, resize 480, [0,1], 3 channels",
        ),
        Preset(
            "deepcovid",
            size=224,
            channels=3,
            center_square=True,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            description="Deep-COVID: Resize(224) keeping aspect + CenterCrop(224) (= central square, resize 224), "
                        "ImageNet mean/std",
        ),
        Preset(
            "chexnet",
            size=224,
            channels=3,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            description="CheXNet: resize 224, ImageNet mean/std",
        ),
        Preset(
            "cxnet",
            size=320,
            channels=3,
            clahe_clip=2.0,
            clahe_tiles=8,
            interpolation="cubic",
            hist_template=NIH_CXR14_TEMPLATE,
            channel_stack=("beasf", "clahe", "raw"),
            beasf_gamma=1.5,
            description="COVID-CXNet: resize 320 (cubic), histogram-match to a fixed template, channels "
                        "BEASF (gamma 1.5) / CLAHE (clip 2.0, 8x8) / raw, divided by 255",
        ),
        Preset(
            "cxnet-lungcrop",
            size=320,
            channels=3,
            clahe_clip=2.0,
            clahe_tiles=8,
            lung_crop=True,
            interpolation="cubic",
            hist_template=NIH_CXR14_TEMPLATE,
            channel_stack=("beasf", "clahe", "raw"),
            beasf_gamma=1.5,
            description="COVID-CXNet with lung crop: crop to the lungs, then as cxnet (resize 320, histogram "
                        "match, BEASF / CLAHE / raw, /255)",
        ),
        Preset(
            "imagenet",
            size=224,
            channels=3,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            description="ImageNet transfer (torchvision weights): resize 224, ImageNet mean/std",
        ),
        Preset(
            "effnet-lite",
            size=224,
            channels=3,
            # the TF Lite checkpoints read (x - 127) / 128 on 0..255 pixels
            mean=(127.0 / 255.0,) * 3,
            std=(128.0 / 255.0,) * 3,
            description="EfficientNet-Lite ImageNet weights: resize 224, (x - 127) / 128 on 0..255",
        ),
        Preset(
            "lung-unet",
            size=512,
            channels=1,
            value_range=(-0.5, 0.5),
            description="pretrained lung U-Net (Montgomery/Shenzhen): 1 channel, resize 512, [0,1] - 0.5",
        ),
        Preset(
            "xrv",
            size=224,
            channels=1,
            center_square=True,
            value_range=(-1024.0, 1024.0),
            description="torchxrayvision: 1 channel, [-1024, 1024], center crop, 224",
        ),
    ]
}


def get_preset(name: str | dict | Preset, size: int | None = None) -> Preset:
    """Look up a preset by name (``covidnet``, ``covidnet@224``), dict or Preset."""
    if isinstance(name, Preset):
        p = name
    elif isinstance(name, dict):
        p = Preset.from_dict(name)
    else:
        base, _, at = str(name).partition("@")
        if base not in PRESETS:
            raise PresetError(f"unknown preprocessing preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        p = PRESETS[base]
        if at:
            p = p.with_size(int(at))
    return p.with_size(size) if size else p


# --------------------------------------------------------------------------- augmentation


@dataclass(frozen=True)
class Augment:
    """Seeded training-time augmentation on a prepared 1 x H x W image.

    Each call with the same ``(seed, epoch, index)`` gives the same result, whatever the worker. The
    geometry (ratio resize, random resized crop, rotation, shift, zoom) is composed into one affine map
    and applied by one OpenCV ``warpAffine`` with a black border, so the image is interpolated once.

    - ``zoom``: with ``zoom_xy`` False one factor ``s`` enlarges the image ``s`` times (isotropic). With
      ``zoom_xy`` True it is Keras' ``zoom_range``: separate factors ``zx, zy`` are drawn and, as in
      Keras, a factor above 1 zooms out (the content shrinks to ``1/z``).
    - ``ratio_resize = (p, delta)``: COVID-Net's ``random_ratio_resize``: with probability ``p`` the
      aspect ratio is jittered by up to ``±delta`` (the image is narrowed or flattened, black padding).
    - ``crop_scale`` (with ``crop_ratio``): torchvision's ``RandomResizedCrop``: a box of that area
      fraction and aspect ratio is cut out and resized to the full image (Deep-COVID).
    """

    rotation: float = 10.0
    translate: float = 0.1
    zoom: tuple[float, float] = (0.85, 1.15)
    hflip: bool = True
    brightness: tuple[float, float] = (0.9, 1.1)
    seed: int = 0
    zoom_xy: bool = False
    ratio_resize: tuple[float, float] = (0.0, 0.0)
    vflip: bool = False
    crop_scale: tuple[float, ...] = ()
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def params(self, index: int = 0, epoch: int = 0, shape: tuple[int, int] = (224, 224)) -> dict[str, Any]:
        """The random draw for ``(seed, epoch, index)``. Every call draws the same number of values, so
        the draw of one parameter never depends on which others are switched on."""
        rng = np.random.default_rng([int(self.seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF, int(index) & 0xFFFFFFFF])
        h, w = shape
        p: dict[str, Any] = {
            "angle": float(rng.uniform(-self.rotation, self.rotation)),
            "tx": float(round(rng.uniform(-self.translate * w, self.translate * w))),
            "ty": float(round(rng.uniform(-self.translate * h, self.translate * h))),
            "scale": float(rng.uniform(*self.zoom)),
            "flip": bool(self.hflip and rng.random() < 0.5),
            "brightness": float(rng.uniform(*self.brightness)),
        }
        zy = float(rng.uniform(*self.zoom))
        vflip = bool(rng.random() < 0.5)
        ratio_u, ratio_v = float(rng.random()), float(rng.random())
        crop_u = rng.random((4, 10))
        if self.zoom_xy:  # Keras: a factor z maps output to input coordinates, so the content scales by 1/z
            p["scale_x"], p["scale_y"] = 1.0 / p["scale"], 1.0 / zy
        else:
            p["scale_x"] = p["scale_y"] = p["scale"]
        p["vflip"] = bool(self.vflip and vflip)
        p["ratio"] = None
        prob, delta = self.ratio_resize
        if prob > 0 and ratio_u < prob:
            # COVID-Net: ratio = h / w jittered; the image is narrowed (ratio <= 1 on a square) or flattened
            r0 = h / w
            lo = max(r0 - delta, 0.01)
            p["ratio"] = float(lo + ratio_v * (r0 + delta - lo))
        p["crop"] = self._crop_box(h, w, crop_u) if self.crop_scale else None
        return p

    def _crop_box(self, h: int, w: int, u: np.ndarray) -> tuple[int, int, int, int]:
        """torchvision RandomResizedCrop.get_params from pre-drawn uniforms: (x0, y0, width, height)."""
        area = h * w
        s0, s1 = self.crop_scale
        lr0, lr1 = math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1])
        for k in range(10):
            target = area * (s0 + u[0, k] * (s1 - s0))
            aspect = math.exp(lr0 + u[1, k] * (lr1 - lr0))
            cw = int(round(math.sqrt(target * aspect)))
            ch = int(round(math.sqrt(target / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                y0 = int(u[2, k] * (h - ch + 1))
                x0 = int(u[3, k] * (w - cw + 1))
                return x0, y0, cw, ch
        # fallback, as torchvision: the central crop closest to the allowed ratios
        in_ratio = w / h
        if in_ratio < min(self.crop_ratio):
            cw, ch = w, int(round(w / min(self.crop_ratio)))
        elif in_ratio > max(self.crop_ratio):
            ch, cw = h, int(round(h * max(self.crop_ratio)))
        else:
            cw, ch = w, h
        return (w - cw) // 2, (h - ch) // 2, cw, ch

    def matrix(self, p: dict[str, Any], shape: tuple[int, int]) -> np.ndarray:
        """The 2 x 3 forward affine map (input pixel -> output pixel) of a draw ``p``."""
        h, w = shape
        cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
        m = np.eye(3)
        if p.get("crop") is not None:  # the crop box fills the output (pixel centres at +0.5)
            x0, y0, cw, ch = p["crop"]
            sx, sy = w / cw, h / ch
            m = np.array([[sx, 0, (0.5 - x0) * sx - 0.5], [0, sy, (0.5 - y0) * sy - 0.5], [0, 0, 1]]) @ m
        if p.get("ratio") is not None:  # COVID-Net random_ratio_resize: shrink one axis about the centre
            r = p["ratio"]
            sx, sy = (int(w * r) / w, 1.0) if r * w <= w else (1.0, int(h / r) / h)
            m = np.array([[sx, 0, cx * (1 - sx)], [0, sy, cy * (1 - sy)], [0, 0, 1]]) @ m
        a = math.radians(p["angle"])  # counter-clockwise, as torchvision and cv2.getRotationMatrix2D
        rot = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
        # Keras rotates, then zooms along the output axes (the same as rotate-and-scale when isotropic)
        lin = np.diag([p.get("scale_x", p["scale"]), p.get("scale_y", p["scale"])]) @ rot
        c = np.array([cx, cy])
        aff = np.eye(3)
        aff[:2, :2] = lin
        aff[:2, 2] = c - lin @ c + np.array([p["tx"], p["ty"]])
        return (aff @ m)[:2]

    def __call__(self, image: np.ndarray | torch.Tensor, index: int = 0, epoch: int = 0) -> torch.Tensor:
        """Augment a prepared H x W (or 1 x H x W) image in [0, 1]; returns a 1 x H x W tensor in [0, 1].

        OpenCV's warpAffine (bilinear, black border) does the geometry: on one core it is ~6x faster
        than the same recipe in torchvision v2 (benchmarks/data_pipeline.py measures both).
        """
        import torch

        arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        arr = np.ascontiguousarray(arr.reshape(arr.shape[-2:]), dtype=np.float32)
        h, w = arr.shape
        p = self.params(index, epoch, (h, w))
        out = cv2.warpAffine(arr, self.matrix(p, (h, w)), (w, h), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
        if p["flip"]:
            out = out[:, ::-1]
        if p["vflip"]:
            out = out[::-1, :]
        if p["brightness"] != 1.0:
            out = out * np.float32(p["brightness"])
        return torch.from_numpy(np.ascontiguousarray(np.clip(out, 0.0, 1.0), dtype=np.float32)).unsqueeze(0)


# --------------------------------------------------------------------------- source-randomising augmentation
# What differs between hospitals besides the patients: detector response (gamma, contrast), sharpness,
# noise, the export (bit depth, JPEG), collimation borders and burnt-in text. Randomising all of them in
# training takes away the cues a network can use to tell the source (Zech et al. 2018; DeGrave et al.
# 2021). Each op maps a H x W float32 image in [0, 1] to one of the same shape, dtype and range.


def apply_gamma(img: np.ndarray, gamma: float) -> np.ndarray:
    """``img ** gamma``: > 1 darkens the mid-tones, < 1 brightens them; 0 and 1 stay put."""
    return np.power(np.clip(img, 0.0, 1.0), np.float32(gamma)).astype(np.float32)


def apply_contrast(img: np.ndarray, factor: float) -> np.ndarray:
    """Stretch (> 1) or flatten (< 1) the gray levels about the image mean, clipped to [0, 1]."""
    m = np.float32(img.mean())
    return np.clip((img - m) * np.float32(factor) + m, 0.0, 1.0).astype(np.float32)


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of standard deviation ``sigma`` pixels (a softer detector or a resampled export)."""
    return np.clip(cv2.GaussianBlur(np.ascontiguousarray(img, dtype=np.float32), (0, 0), float(sigma)), 0.0, 1.0)


def add_noise(img: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian noise of ``std`` (quantum and electronic noise), clipped to [0, 1]."""
    noise = rng.standard_normal(img.shape).astype(np.float32) * np.float32(std)
    return np.clip(img + noise, 0.0, 1.0).astype(np.float32)


def jpeg_recompress(img: np.ndarray, quality: int) -> np.ndarray:
    """Encode as 8-bit JPEG at ``quality`` (1..100) and decode again: block artefacts of a lossy export."""
    u8 = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", u8, [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:  # pragma: no cover - OpenCV always encodes a uint8 image
        return img.astype(np.float32)
    return cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE).astype(np.float32) / np.float32(255.0)


def reduce_bit_depth(img: np.ndarray, bits: int) -> np.ndarray:
    """Quantise to ``2**bits`` gray levels (a low-bit-depth export or a screenshot)."""
    levels = np.float32(2 ** int(bits) - 1)
    return (np.round(np.clip(img, 0.0, 1.0) * levels) / levels).astype(np.float32)


def add_borders(img: np.ndarray, widths: tuple[int, int, int, int], value: float) -> np.ndarray:
    """Constant bars of ``widths`` = (top, bottom, left, right) pixels in gray ``value`` (collimation, padding)."""
    out = np.array(img, dtype=np.float32, copy=True)
    h, w = out.shape
    t, b, le, r = (max(0, int(x)) for x in widths)
    if t:
        out[: min(t, h)] = value
    if b:
        out[max(0, h - b):] = value
    if le:
        out[:, : min(le, w)] = value
    if r:
        out[:, max(0, w - r):] = value
    return out


def burn_text(img: np.ndarray, text: str, origin: tuple[int, int], value: float, scale: float = 0.4) -> np.ndarray:
    """Draw ``text`` at ``origin`` (x, y of the baseline start) in gray ``value``: burnt-in markers and labels."""
    out = np.ascontiguousarray(img, dtype=np.float32)
    ink = np.zeros(out.shape, dtype=np.uint8)  # OpenCV draws text on 8-bit images only: draw the coverage
    thick = max(1, int(round(scale * 2)))
    cv2.putText(ink, text, (int(origin[0]), int(origin[1])), cv2.FONT_HERSHEY_SIMPLEX, float(scale), 255, thick,
                cv2.LINE_AA)
    a = ink.astype(np.float32) / np.float32(255.0)
    return np.clip(out * (1.0 - a) + np.float32(value) * a, 0.0, 1.0).astype(np.float32)


#: the order the source ops are applied in: acquisition, burnt-in marks, then the export
SOURCE_OPS = ("gamma", "contrast", "blur", "noise", "borders", "text", "bits", "jpeg")


@dataclass(frozen=True)
class SourceAugment(Augment):
    """:class:`Augment`'s geometry and brightness, then source-randomising ops, each with probability ``p_op``.

    The ops (:data:`SOURCE_OPS`): gamma (log-uniform in ``gamma``), contrast (``contrast`` factor), Gaussian
    blur (``blur_sigma`` px), Gaussian noise (``noise_std``), constant borders (up to ``border`` of each side,
    black or white), burnt-in text (random letters and digits in a corner), bit-depth reduction (``bits``
    levels, inclusive) and JPEG re-compression (``jpeg_quality``, inclusive). Seeded by ``(seed, epoch,
    index)`` like the geometry, with every draw made whatever is switched on.
    """

    p_op: float = 0.5
    gamma: tuple[float, float] = (0.6, 1.6)
    contrast: tuple[float, float] = (0.7, 1.3)
    blur_sigma: tuple[float, float] = (0.3, 1.5)
    noise_std: tuple[float, float] = (0.005, 0.03)
    border: float = 0.08
    bits: tuple[int, int] = (4, 7)
    jpeg_quality: tuple[int, int] = (15, 75)

    def source_params(self, index: int = 0, epoch: int = 0, shape: tuple[int, int] = (224, 224)) -> dict[str, Any]:
        """The ops switched on for ``(seed, epoch, index)`` and their draws (a fixed number of draws)."""
        rng = np.random.default_rng([int(self.seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF,
                                     int(index) & 0xFFFFFFFF, 0x50C])
        h, w = shape
        on = rng.random(len(SOURCE_OPS)) < self.p_op
        lg = np.log(self.gamma)
        bw = rng.integers(0, max(1, int(self.border * min(h, w))) + 1, size=4) * (rng.random(4) < 0.5)
        chars = "".join(rng.choice(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 "), size=6))
        corner = int(rng.integers(0, 4))
        p = {
            "gamma": float(np.exp(rng.uniform(*lg))),
            "contrast": float(rng.uniform(*self.contrast)),
            "blur": float(rng.uniform(*self.blur_sigma)),
            "noise": float(rng.uniform(*self.noise_std)),
            "noise_seed": int(rng.integers(0, 2**31 - 1)),
            "borders": tuple(int(x) for x in bw),
            "border_value": float(rng.random() < 0.5),
            "text": chars.strip() or "L",
            "text_value": float(rng.random() < 0.8),  # mostly white, as burnt-in markers are
            "text_corner": corner,
            "text_scale": float(rng.uniform(0.3, 0.6)) * min(h, w) / 224.0,
            "bits": int(rng.integers(self.bits[0], self.bits[1] + 1)),
            "jpeg": int(rng.integers(self.jpeg_quality[0], self.jpeg_quality[1] + 1)),
        }
        p["on"] = [op for op, flag in zip(SOURCE_OPS, on) if flag]
        return p

    def apply_source(self, img: np.ndarray, p: dict[str, Any]) -> np.ndarray:
        """Apply the switched-on ops of a draw ``p`` (from :meth:`source_params`) to a H x W [0, 1] image."""
        out = np.ascontiguousarray(img, dtype=np.float32)
        h, w = out.shape
        for op in SOURCE_OPS:
            if op not in p["on"]:
                continue
            if op == "gamma":
                out = apply_gamma(out, p["gamma"])
            elif op == "contrast":
                out = apply_contrast(out, p["contrast"])
            elif op == "blur":
                out = gaussian_blur(out, p["blur"])
            elif op == "noise":
                out = add_noise(out, p["noise"], np.random.default_rng(p["noise_seed"]))
            elif op == "borders":
                out = add_borders(out, p["borders"], p["border_value"])
            elif op == "text":
                m = max(2, int(0.04 * min(h, w)))
                x = m if p["text_corner"] % 2 == 0 else max(m, w // 2)
                y = max(m + 8, int(0.08 * h)) if p["text_corner"] < 2 else h - m
                out = burn_text(out, p["text"], (x, y), p["text_value"], p["text_scale"])
            elif op == "bits":
                out = reduce_bit_depth(out, p["bits"])
            elif op == "jpeg":
                out = jpeg_recompress(out, p["jpeg"])
        return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)

    def __call__(self, image: np.ndarray | torch.Tensor, index: int = 0, epoch: int = 0) -> torch.Tensor:
        import torch

        geo = super().__call__(image, index=index, epoch=epoch)[0].numpy()
        out = self.apply_source(geo, self.source_params(index, epoch, geo.shape))
        return torch.from_numpy(np.ascontiguousarray(out)).unsqueeze(0)


def standardized(preset: Preset, mode: str | None) -> Preset:
    """``preset`` with histogram standardisation switched on (recipe key ``data.hist_standardize``).

    ``film``: every prepared image's gray levels are matched to the NIH ChestX-ray14 reference quantiles
    (:data:`NIH_CXR14_TEMPLATE`, the COVID-CXNet matching, Nyul & Udupa-style standardisation over the
    whole film), so that films from different sources share one histogram. The template is a preset
    field, so it travels inside checkpoints and inference applies it too. A preset that already matches
    to a template keeps its own.

    ``lung``: the mapping is fitted on the pixels inside the lung mask only (:func:`lung_lut`, to the NIH
    ChestX-ray14 lung-field quantiles :data:`NIH_CXR14_LUNG_TEMPLATE`) and applied to the whole film; the
    preset then needs a lung mask (:attr:`Preset.needs_lung_mask`), given as the lung crop's is. It replaces
    any whole-film template the preset had (a film template is no reference for lung pixels).
    """
    if mode in (None, "", "none"):
        return preset
    if mode == "lung":
        if preset.hist_region == "lung":
            return preset
        return dataclasses.replace(
            preset, hist_template=NIH_CXR14_LUNG_TEMPLATE, hist_region="lung",
            description=(preset.description + "; " if preset.description else "")
            + "histogram-standardised inside the lung mask to the NIH ChestX-ray14 lung-field quantiles")
    if mode != "film":
        raise PresetError(f"histogram standardisation {mode!r}; choose film, lung or none")
    if preset.hist_template:
        return preset
    return dataclasses.replace(preset, hist_template=NIH_CXR14_TEMPLATE,
                               description=(preset.description + "; " if preset.description else "")
                               + "histogram-standardised to the NIH ChestX-ray14 reference quantiles (whole film)")


AUGMENT_RECIPES: dict[str, Augment | None] = {
    # COVID-Net data.py: random_ratio_resize(p=0.3, delta=0.1), then Keras ImageDataGenerator(rotation 10,
    # width/height shift 0.1, horizontal flip, brightness (0.9, 1.1), zoom_range (0.85, 1.15), black fill)
    "covidnet": Augment(rotation=10.0, translate=0.1, zoom=(0.85, 1.15), hflip=True, brightness=(0.9, 1.1),
                        zoom_xy=True, ratio_resize=(0.3, 0.1)),
    # Deep-COVID ResNet18_train.py: Resize(224), RandomResizedCrop(224) (scale 0.08-1, ratio 3/4-4/3), no flip
    "deepcovid": Augment(rotation=0.0, translate=0.0, zoom=(1.0, 1.0), hflip=False, brightness=(1.0, 1.0),
                         crop_scale=(0.08, 1.0), crop_ratio=(3.0 / 4.0, 4.0 / 3.0)),
    # COVID-CXNet multiclass_covid_cxnet.py: Keras ImageDataGenerator(rotation 170, horizontal and vertical
    # flip, zoom_range [0.8, 1.5], brightness [0.5, 1.3], width/height shift 0.2, black fill)
    "cxnet": Augment(rotation=170.0, translate=0.2, zoom=(0.8, 1.5), hflip=True, vflip=True,
                     brightness=(0.5, 1.3), zoom_xy=True),
    "none": None,
    "light": Augment(rotation=5.0, translate=0.05, zoom=(0.95, 1.05), hflip=False, brightness=(0.95, 1.05)),
    # the light geometry plus source randomisation (gamma, contrast, blur, noise, borders, burnt-in text,
    # bit depth, JPEG), each op on half the images: see SourceAugment and docs/recipes.md
    "source-random": SourceAugment(rotation=5.0, translate=0.05, zoom=(0.95, 1.05), hflip=False,
                                   brightness=(0.9, 1.1)),
}
