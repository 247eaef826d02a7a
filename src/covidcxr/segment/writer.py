"""Batch lung masks: for arrays (:func:`predict_masks`) and for files, written as PNGs with overlays and a
``masks.csv`` of measurements and plausibility verdicts (:func:`predict_files`, ``covidcxr segment predict``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np

from covidcxr.segment.loading import load_segmenter
from covidcxr.segment.masks import overlay
from covidcxr.segment.plausibility import assess
from covidcxr.segment.segmenter import LungSegmenter


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
