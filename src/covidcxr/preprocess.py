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
from dataclasses import dataclass, field
from typing import Any, Callable

import cv2
import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Hook for COVID-CXNet's lung crop. ``covidcxr.segment`` installs a function
#: ``(image HxW [0,1]) -> bool mask HxW``; a preset with ``lung_crop=True`` uses it
#: when no mask is given to :meth:`Preset.prepare`.
LUNG_SEGMENTER: Callable[[np.ndarray], np.ndarray] | None = None


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

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["value_range"] = list(self.value_range)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
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
        for k in ("value_range", "mean", "std"):
            if k in kw:
                kw[k] = tuple(kw[k])
        return cls(**kw)

    def fingerprint(self) -> str:
        """Short hash of every field; two presets that differ in anything differ here."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

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
        if self.lung_crop:
            img = self._lung_crop(img, mask)
        if self.crop_top > 0:
            img = img[int(round(img.shape[0] * self.crop_top)) :, :]
        if self.center_square:
            h, w = img.shape
            s = min(h, w)
            y0, x0 = (h - s) // 2, (w - s) // 2
            img = img[y0 : y0 + s, x0 : x0 + s]
        if self.clahe_clip > 0:
            u8 = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
            clahe = cv2.createCLAHE(clipLimit=self.clahe_clip, tileGridSize=(self.clahe_tiles, self.clahe_tiles))
            img = clahe.apply(u8).astype(np.float32) / 255.0
        h, w = img.shape
        interp = cv2.INTER_AREA if (h > self.size or w > self.size) else cv2.INTER_LINEAR
        img = cv2.resize(np.ascontiguousarray(img), (self.size, self.size), interpolation=interp)
        return np.clip(img, 0.0, 1.0).astype(np.float32, copy=False)

    def finalize(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Channels and intensity scaling: C x H x W float32 tensor."""
        t = torch.as_tensor(image, dtype=torch.float32)
        if t.ndim == 3 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 2:
            raise PresetError(f"finalize expects H x W or 1 x H x W, got {tuple(t.shape)}")
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

    def denormalize(self, tensor: torch.Tensor) -> np.ndarray:
        """Inverse of :meth:`finalize`: C x H x W (or H x W) tensor back to H x W in [0, 1] for display."""
        t = tensor.detach().float().cpu()
        if t.ndim == 3:
            mean = torch.tensor(self._per_channel(self.mean)).view(-1, 1, 1)
            std = torch.tensor(self._per_channel(self.std)).view(-1, 1, 1)
            t = (t * std + mean).mean(0)
        lo, hi = self.value_range
        return np.clip(((t - lo) / (hi - lo)).numpy(), 0.0, 1.0)

    # ------------------------------------------------------------------ helpers
    def _affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel scale and offset of :meth:`finalize`, as C x 1 x 1 tensors (cached)."""
        cached = self.__dict__.get("_affine_cache")
        if cached is None:
            lo, hi = self.value_range
            mean = np.asarray(self._per_channel(self.mean), dtype=np.float64)
            std = np.asarray(self._per_channel(self.std), dtype=np.float64)
            a = torch.tensor((hi - lo) / std, dtype=torch.float32).view(-1, 1, 1)
            b = torch.tensor((lo - mean) / std, dtype=torch.float32).view(-1, 1, 1)
            cached = (a, b, [float(x) for x in a.flatten()], [float(x) for x in b.flatten()])
            object.__setattr__(self, "_affine_cache", cached)
        return cached[0], cached[1]

    def _per_channel(self, v: tuple[float, ...]) -> tuple[float, ...]:
        if len(v) == self.channels:
            return v
        if len(v) == 1:
            return v * self.channels
        raise PresetError(f"preset {self.name}: {len(v)} mean/std values for {self.channels} channels")

    def _lung_crop(self, img: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        if mask is None:
            if LUNG_SEGMENTER is None:
                # Importing the segmentation module installs the default segmenter, if a model is configured.
                try:
                    import covidcxr.segment  # noqa: F401
                except ImportError:
                    pass
            if LUNG_SEGMENTER is None:
                raise PresetError(
                    f"preset {self.name} crops to the lungs but no lung mask and no segmentation model is available; "
                    "pass a mask or set one with covidcxr.segment.use_model(CKPT)"
                )
            mask = LUNG_SEGMENTER(img)
        return crop_to_mask(img, mask, self.lung_margin)


def crop_to_mask(img: np.ndarray, mask: np.ndarray, margin: float = 0.05) -> np.ndarray:
    """Crop to the bounding box of ``mask`` (resized to the image), widened by ``margin`` of each side."""
    m = np.asarray(mask)
    if m.shape != img.shape:
        m = cv2.resize(m.astype(np.uint8), (img.shape[1], img.shape[0]), interpolation=cv2.INTER_NEAREST)
    ys, xs = np.nonzero(m > 0)
    if len(ys) < 16:  # empty or degenerate mask: keep the whole image rather than crop to noise
        return img
    h, w = img.shape
    dy, dx = int(margin * h), int(margin * w)
    y0, y1 = max(0, ys.min() - dy), min(h, ys.max() + 1 + dy)
    x0, x1 = max(0, xs.min() - dx), min(w, xs.max() + 1 + dx)
    return img[y0:y1, x0:x1]


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
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            description="Deep-COVID: resize 224, ImageNet mean/std",
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
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            description="COVID-CXNet: CLAHE (clip 2.0, 8x8), resize 320, ImageNet mean/std",
        ),
        Preset(
            "cxnet-lungcrop",
            size=320,
            channels=3,
            clahe_clip=2.0,
            clahe_tiles=8,
            lung_crop=True,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            description="COVID-CXNet with lung crop: segment, dilate, crop to lungs, CLAHE, resize 320",
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
    """Seeded training-time augmentation on a prepared 1 x H x W image (COVID-Net recipe by default).

    Each call with the same ``(seed, epoch, index)`` gives the same result, whatever the worker.
    """

    rotation: float = 10.0
    translate: float = 0.1
    zoom: tuple[float, float] = (0.85, 1.15)
    hflip: bool = True
    brightness: tuple[float, float] = (0.9, 1.1)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def params(self, index: int = 0, epoch: int = 0, shape: tuple[int, int] = (224, 224)) -> dict[str, Any]:
        """The random draw for ``(seed, epoch, index)``: same ranges as torchvision's RandomAffine,
        RandomHorizontalFlip and ColorJitter(brightness)."""
        rng = np.random.default_rng([int(self.seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF, int(index) & 0xFFFFFFFF])
        h, w = shape
        return {
            "angle": float(rng.uniform(-self.rotation, self.rotation)),
            "tx": float(round(rng.uniform(-self.translate * w, self.translate * w))),
            "ty": float(round(rng.uniform(-self.translate * h, self.translate * h))),
            "scale": float(rng.uniform(*self.zoom)),
            "flip": bool(self.hflip and rng.random() < 0.5),
            "brightness": float(rng.uniform(*self.brightness)),
        }

    def __call__(self, image: np.ndarray | torch.Tensor, index: int = 0, epoch: int = 0) -> torch.Tensor:
        """Augment a prepared H x W (or 1 x H x W) image in [0, 1]; returns a 1 x H x W tensor in [0, 1].

        OpenCV's warpAffine (bilinear, black border) does the geometry: on one core it is ~6x faster
        than the same recipe in torchvision v2 (benchmarks/data_pipeline.py measures both).
        """
        arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        arr = np.ascontiguousarray(arr.reshape(arr.shape[-2:]), dtype=np.float32)
        h, w = arr.shape
        p = self.params(index, epoch, (h, w))
        # rotation (counter-clockwise, as torchvision) and zoom about the centre, then translation
        m = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), p["angle"], p["scale"])
        m[0, 2] += p["tx"]
        m[1, 2] += p["ty"]
        out = cv2.warpAffine(arr, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
        if p["flip"]:
            out = out[:, ::-1]
        if p["brightness"] != 1.0:
            out = out * np.float32(p["brightness"])
        return torch.from_numpy(np.ascontiguousarray(np.clip(out, 0.0, 1.0), dtype=np.float32)).unsqueeze(0)


AUGMENT_RECIPES: dict[str, Augment | None] = {
    "covidnet": Augment(),
    "none": None,
    "light": Augment(rotation=5.0, translate=0.05, zoom=(0.95, 1.05), hflip=False, brightness=(0.95, 1.05)),
}
