"""site check on real films, with ImageNet MobileNetV2 features (no fine-tuning): films of the training sources'
held-out patients against NIH ChestX-ray14 films (a source the summary never saw) and inverted films.

    COVIDCXR_WEIGHTS_DIR=../shared/weights .venv/bin/python scripts/site_shift_demo.py [--size 224] [--n 60]

It builds the dev manifest (cohen, actualmed, figure1; seed 62), stores the training-feature summary of an
ImageNet MobileNetV2 (random 3-class head) from its train split (fit) and val split (spread), then runs
`covidcxr site check` on each film set and prints the verdict lines. Research use only.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from covidcxr import models
from covidcxr.data import build_manifest, read_manifest
from covidcxr.models.checkpoint import atomic_torch_save, make_bundle
from covidcxr.models.features import SUMMARY_KEY, summarise_frames
from covidcxr.preprocess import get_preset
from covidcxr.shared import data_dir
from covidcxr.site.check import check_site


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--n", type=int, default=60, help="films per set")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shared = data_dir()
    tmp = Path(tempfile.mkdtemp(prefix="site-demo-"))
    build_manifest(sources=[("csv", str(shared / "covid-cxr-dev" / "metadata.csv"))], out=tmp / "dev", seed=62)
    df = read_manifest(tmp / "dev" / "manifest.csv")
    torch.manual_seed(0)
    net = models.create("mobilenet_v2", weights="mobilenet_v2-imagenet", num_classes=3).eval()
    preset = get_preset("imagenet", size=args.size)
    bundle = make_bundle(net, classes=["normal", "pneumonia", "COVID-19"], preset=preset,
                         training={"run_name": "imagenet-mobilenet_v2-features"})
    bundle[SUMMARY_KEY] = summarise_frames(net, preset, df[df["split"] == "train"], df[df["split"] == "val"])
    ckpt = tmp / "model.ckpt"
    atomic_torch_save(bundle, ckpt)

    rng = np.random.default_rng(0)
    test = df[df["split"] == "test"]["path"].tolist()
    nih = sorted(str(p) for p in (shared / "nih-cxr14-subset" / "images").glob("*.png"))
    sets = {
        "dev test split (held-out patients of the training sources)": list(rng.choice(test, min(args.n, len(test)), replace=False)),
        "NIH ChestX-ray14 subset (a source not in the summary)": list(rng.choice(nih, args.n, replace=False)),
    }
    import cv2

    from covidcxr.io import read_image

    inv = tmp / "inverted"
    inv.mkdir()
    for i, p in enumerate(sets["dev test split (held-out patients of the training sources)"]):
        cv2.imwrite(str(inv / f"{i:03d}.png"), np.round((1 - read_image(p)) * 255).astype(np.uint8))
    sets["the same dev test films, inverted"] = [str(inv)]
    for name, inputs in sets.items():
        r = check_site(ckpt, inputs, tmp / "out")
        print(f"{name}: n={r['n_images']}; " + json.dumps({k: round(v["fraction_beyond_own_q95"], 2)
                                                            for k, v in r["per_source"].items()}))
        print(f"  {r['verdict_line']}")
    spread = [f"{k} spread from {v['n_spread']} {v['spread_from']}" for k, v in bundle[SUMMARY_KEY]["sources"].items()]
    print("summary: " + ", ".join(spread))


if __name__ == "__main__":
    main()
