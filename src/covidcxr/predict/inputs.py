"""Input collection (files, folders, manifests) and decoding + preprocessing, in worker processes.

Everything here is NumPy/OpenCV only, so the ONNX paths and Ray's decode tasks run without torch.
A file that cannot be read becomes an item with an ``error`` string; a batch never stops for one file.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from covidcxr.io import SUPPORTED_SUFFIXES, CXRReadError, read_image
from covidcxr.preprocess import Preset, PresetError, lung_hist_fallbacks

log = logging.getLogger(__name__)

def _looks_like_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def manifest_paths(path: Path) -> list[str]:
    """Image paths listed in a manifest CSV (column ``path``, else ``filename``), resolved to its folder."""
    import pandas as pd

    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as err:
        raise CXRReadError(path, f"cannot read manifest CSV ({type(err).__name__}: {err})") from None
    col = "path" if "path" in df.columns else "filename" if "filename" in df.columns else None
    if col is None:
        raise CXRReadError(path, f"manifest has no 'path' (or 'filename') column; columns: {list(df.columns)}")
    base = path.parent
    out = []
    for value in df[col]:
        p = Path(value)
        if not p.is_absolute():
            p = base / p
            # metadata.csv files of the shared data sets list bare names that live in images/
            if col == "filename" and not p.exists() and (base / "images" / value).exists():
                p = base / "images" / value
        out.append(str(p))
    return out


def collect_inputs(paths: Iterable[str | os.PathLike]) -> list[str]:
    """Expand files, folders (recursive: supported suffixes and suffix-less DICOM) and manifest CSVs.

    A path that does not exist is kept, so it becomes an error record rather than vanishing.
    """
    out: list[str] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if not f.is_file() or f.name.startswith("."):
                    continue
                suffix = f.suffix.lower()
                if suffix in SUPPORTED_SUFFIXES or (suffix == "" and _looks_like_dicom(f)):
                    out.append(str(f))
        elif p.suffix.lower() == ".csv" and p.is_file():
            out.extend(manifest_paths(p))
        else:
            out.append(str(p))
    return out


@dataclass
class Item:
    """One decoded, preprocessed input: ``array`` is C x H x W float32, or None with ``error`` set."""

    path: str
    array: np.ndarray | None = None
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    error: str | None = None
    #: the decoded H x W [0, 1] image, kept where it is at hand (service upload, DICOM node); the decode
    #: workers send only ``array`` and the small ``extra`` inputs instead
    image: np.ndarray | None = None


@dataclass(frozen=True)
class Loader:
    """Picklable ``path -> Item``: read, then the model's preset (plus optional extra presets).

    ``mask``: the :class:`covidcxr.segment.maskspec.MaskSpec` of a lung-crop model: the segmenter that
    cropped its training images, loaded once in whichever process (worker, Ray task) runs the loader.
    """

    preset: Preset
    extra: tuple[tuple[str, Preset], ...] = ()
    mask: Any = None

    def masks(self) -> Any:
        """The lung-mask function of :attr:`mask` in this process, or None."""
        if self.mask is None:
            return None
        from covidcxr.segment.maskspec import provider

        return provider(self.mask)

    def __call__(self, path: str) -> Item:
        try:
            image = read_image(path)
            masks = self.masks()
            before = lung_hist_fallbacks()
            arr = self.preset.array(image, masks if self.preset.needs_lung_mask else None)
            if lung_hist_fallbacks() > before:  # the segmenter found (almost) no lung: said, never fatal
                log.warning("%s: lung mask empty or tiny; histogram standardised over the whole film instead", path)
            extra = {name: p.array(image, masks) if getattr(p, "needs_lung_mask", False) else p.array(image)
                     for name, p in self.extra}
            return Item(path, arr, extra)
        except CXRReadError as err:
            return Item(path, error=err.reason)
        except PresetError as err:
            return Item(path, error=f"preprocessing failed: {err}")
        except Exception as err:  # one bad file must not stop a batch of thousands
            return Item(path, error=f"{type(err).__name__}: {err}")


def _worker_init() -> None:
    try:  # the workers are the parallelism; OpenCV's own threads would only oversubscribe the cores
        import cv2

        cv2.setNumThreads(1)
    except Exception:  # pragma: no cover
        pass


def _use_threads(loader: "Loader | None" = None) -> bool:
    """Threads, not processes, for a lung-crop model's loader (it runs the lung segmenter).

    Worker processes are started with ``spawn`` (clean workers): forking a process that runs
    onnxruntime/torch/OpenMP thread pools can leave a worker waiting forever on a lock that a parent
    thread held at fork time (seen: a hung ``predict`` after an ONNX export in the same process).
    A lung-crop preset's segmenter runs exactly those thread pools, and each spawned worker would load it
    again; so that case decodes in threads of this process, which share one loaded segmenter (decoding
    and the segmenter release the GIL for their heavy work).
    """
    return loader is not None and (loader.mask is not None or loader.preset.masks is not None)


def iter_batches(files: Sequence[str], loader: Loader, batch_size: int = 16,
                 num_workers: int = 0) -> Iterator[list[Item]]:
    """Items in input order, ``batch_size`` at a time; ``num_workers`` > 0 decodes in that many processes."""
    bs = max(1, int(batch_size))
    if num_workers <= 0 or len(files) <= 1:
        for i in range(0, len(files), bs):
            yield [loader(f) for f in files[i : i + bs]]
        return
    if _use_threads(loader):
        from multiprocessing.pool import ThreadPool

        pool = ThreadPool(processes=int(num_workers))
    else:
        pool = mp.get_context("spawn").Pool(processes=int(num_workers), initializer=_worker_init)
    try:
        batch: list[Item] = []
        for item in pool.imap(loader, files, chunksize=max(1, min(bs, len(files) // (4 * num_workers) or 1))):
            batch.append(item)
            if len(batch) == bs:
                yield batch
                batch = []
        if batch:
            yield batch
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def stack(items: Sequence[Item]) -> np.ndarray:
    """The good items' arrays as one N x C x H x W float32 batch."""
    return np.stack([it.array for it in items if it.array is not None]).astype(np.float32, copy=False)


def as_extra_presets(extra: dict[str, Preset] | None) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((extra or {}).items()))
