"""Synthetic chest-X-ray-like images with lung masks, for the explain/segment/audit tests.

Two dark ellipses ("lungs") on a brighter body, with a bright text-like block in one
corner; masks are the ellipses. Small (96 x 80) so that tests stay fast.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd

CLASSES = ["normal", "pneumonia", "COVID-19"]


def synthetic_cxr(seed: int, h: int = 96, w: int = 80, text: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    img = np.full((h, w), 150, np.uint8)
    mask = np.zeros((h, w), np.uint8)
    cy = h // 2 + int(rng.integers(-4, 5))
    for cx in (w // 4 + int(rng.integers(-2, 3)), 3 * w // 4 + int(rng.integers(-2, 3))):
        cv2.ellipse(mask, (cx, cy), (w // 7, h // 3), 0, 0, 360, 255, -1)
    img[mask > 0] = 60
    if text:
        img[2:8, 2:20] = 255
    img = np.clip(img.astype(np.float32) + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    return img, mask


def make_dataset(root: Path, n: int = 12, with_masks: int | None = None) -> Path:
    """Write n images (3 classes, 2 sources), masks for the first ``with_masks`` and a manifest."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    rows = []
    with_masks = n if with_masks is None else with_masks
    for i in range(n):
        img, mask = synthetic_cxr(i, text=i % 2 == 0)
        p = root / "images" / f"img{i:02d}.png"
        cv2.imwrite(str(p), img)
        mp = ""
        if i < with_masks:
            mp = f"masks/img{i:02d}_mask.png"
            cv2.imwrite(str(root / mp), mask)
        split = "test" if i % 3 == 0 else ("val" if i % 3 == 1 else "train")
        rows.append({"patient_id": f"p{i}", "path": f"images/img{i:02d}.png", "label": CLASSES[i % 3],
                     "source": "a" if i % 2 else "b", "split": split, "mask_path": mp})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"
