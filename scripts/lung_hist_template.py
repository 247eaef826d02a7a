"""Compute ``NIH_CXR14_LUNG_TEMPLATE`` (covidcxr.preprocess): the reference quantiles of lung-field
histogram standardisation (``data.hist_standardize: lung``).

The pooled gray values inside the lung masks of NIH ChestX-ray14 films (no COVID-19 film), each film
prepared by the plain ``imagenet@256`` geometry (resize, no enhancement) and masked by the pretrained
lung U-Net as the lung crop masks it (``MaskSpec.for_training()``: segmentation dilated by 3 % of the
longer side), at 101 evenly spaced quantiles. Research tool; prints the tuple to paste.

    python scripts/lung_hist_template.py [--images ../shared/data/nih-cxr14-subset/images] [--n 48]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

from covidcxr.io import read_image
from covidcxr.preprocess import get_preset, histogram_template
from covidcxr.segment.maskspec import MaskSpec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images",
                    default=str(Path(__file__).resolve().parents[2] / "shared/data/nih-cxr14-subset/images"))
    ap.add_argument("--n", type=int, default=48, help="first N films in name order (default 48)")
    args = ap.parse_args()
    paths = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[: args.n]
    if not paths:
        raise SystemExit(f"{args.images}: no PNG or JPEG films")
    spec = MaskSpec.for_training()
    preset = get_preset("imagenet", size=256)
    pooled, fractions = [], []
    for p in paths:
        img = read_image(p)
        mask = spec(img)
        u8 = np.clip(preset.prepare(img) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        m = cv2.resize(np.asarray(mask, np.uint8), u8.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
        fractions.append(float(m.mean()))
        pooled.append(u8[m])
        print(f"{len(pooled)}/{len(paths)} {p.name}: lung fraction {fractions[-1]:.3f}", file=sys.stderr, flush=True)
    print(f"# {len(paths)} films from {args.images}, segmenter {spec.describe()}, "
          f"lung fraction median {np.median(fractions):.3f} (min {min(fractions):.3f})")
    print(histogram_template(pooled))


if __name__ == "__main__":
    main()
