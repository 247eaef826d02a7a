"""Images per second for read + preprocess (+ augment), cold and from the prepared-image cache.

Runs on the shared dev set (../shared/data/covid-cxr-dev, 443 JPEGs, longer side <= 512 px) at 224
and 480 px: in one process with one torch thread (what each DataLoader worker does), and through a
DataLoader in the main process or with worker processes. Every row is timed ``--repeats`` times in
interleaved rounds and the best pass counts, so a burst of load from other processes hits one pass
of a row, not all of them. Prints a table and writes benchmarks/results/data_pipeline.json.

    .venv/bin/python benchmarks/data_pipeline.py [--data DIR] [--workers 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]


def _shared_data() -> Path:
    """<shared>/data: COVIDCXR_SHARED names the shared folder (its data/ is accepted too), else ../shared."""
    from covidcxr.shared import data_dir

    return data_dir()

DEFAULT_DATA = _shared_data() / "covid-cxr-dev"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with metadata.csv (dev-set layout)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader worker processes for the loader rows")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved passes per row; the best counts")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N images (0 = all)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "data_pipeline.json")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    import cv2

    cv2.setNumThreads(1)
    from torch.utils.data import DataLoader

    from covidcxr.data import CXRDataset
    from covidcxr.data.sources import load_source
    from covidcxr.io import read_image
    from covidcxr.preprocess import AUGMENT_RECIPES

    if not (args.data / "metadata.csv").is_file():
        print(f"no dataset at {args.data} (needs metadata.csv); pass --data", file=sys.stderr)
        return 2
    frame, _ = load_source("csv", args.data / "metadata.csv")
    if args.limit:
        frame = frame.head(args.limit)
    n = len(frame)
    aug = AUGMENT_RECIPES["covidnet"]
    tmp = Path(tempfile.mkdtemp(prefix="covidcxr-bench-"))
    rows: list[dict] = []
    tasks: list[tuple[dict, Callable[[], None]]] = []
    loaders: list[DataLoader] = []

    def add(size: object, stage: str, workers: int, fn: Callable[[], None]) -> None:
        row = {"size": size, "stage": stage, "workers": workers, "images_per_s": None}
        rows.append(row)
        tasks.append((row, fn))

    def each(ds: CXRDataset) -> Callable[[], None]:
        def go() -> None:
            for i in range(n):
                ds[i]  # dropped at once, as a DataLoader worker hands each item on

        return go

    paths = frame["path"].tolist()
    add("-", "decode only (JPEG -> float32)", 0, lambda: [read_image(p).shape for p in paths] and None)

    # augmentation alone on a 224 image: covidcxr's OpenCV Augment vs the same recipe in torchvision v2
    from torchvision.transforms import v2

    img224 = CXRDataset(frame.head(1), "covidnet@224").prepared(0)
    tv2 = v2.Compose([v2.RandomAffine(degrees=aug.rotation, translate=(aug.translate, aug.translate), scale=aug.zoom),
                      v2.RandomHorizontalFlip(), v2.ColorJitter(brightness=aug.brightness)])

    def aug_cv() -> None:
        for i in range(n):
            aug(img224, index=i)

    def aug_tv() -> None:
        t = torch.from_numpy(img224)[None]
        for i in range(n):
            torch.manual_seed(i)
            tv2(t).clamp(0, 1)

    add(224, "augment only: covidcxr Augment (OpenCV warpAffine)", 0, aug_cv)
    add(224, "augment only: same recipe in torchvision v2 (for comparison)", 0, aug_tv)
    cache_dirs = {}
    try:
        for size in (224, 480):
            preset = f"covidnet@{size}" if size != 480 else "covidnet"
            cache_dir = cache_dirs[size] = tmp / f"cache{size}"

            def fill(cache_dir: Path = cache_dir, preset: str = preset) -> None:
                # a fresh, empty cache folder per pass (deleting the old one is not part of an epoch)
                fresh = cache_dir.with_name(f"{cache_dir.name}-fill{len(list(tmp.glob(cache_dir.name + '-fill*')))}")
                each(CXRDataset(frame, preset, cache_dir=fresh))()

            each(CXRDataset(frame, preset, cache_dir=cache_dir))()  # the cached rows read this one

            add(size, "cold: read + preprocess", 0, each(CXRDataset(frame, preset)))
            add(size, "cold: read + preprocess + augment", 0, each(CXRDataset(frame, preset, augment=aug)))
            add(size, "first epoch filling the cache", 0, fill)
            cached = CXRDataset(frame, preset, cache_dir=cache_dir)
            cached_aug = CXRDataset(frame, preset, cache_dir=cache_dir, augment=aug)
            add(size, "cached: preprocess done, finalize", 0, each(cached))
            add(size, "cached + augment", 0, each(cached_aug))
            for ds, what in ((cached, "cached"), (cached_aug, "cached + augment")):
                for workers, persistent in ((0, False), (args.workers, False), (args.workers, True)):
                    loader = DataLoader(ds, batch_size=32, shuffle=True, num_workers=workers,
                                        persistent_workers=persistent)
                    loaders.append(loader)
                    how = ("workers kept between epochs" if persistent else
                           "workers started per epoch" if workers else "in the main process")

                    def drain(loader: DataLoader = loader) -> None:
                        for _ in loader:
                            pass

                    if persistent:
                        drain()  # start the workers once; later epochs reuse them
                    add(size, f"{what}, DataLoader batches of 32, {how}", workers, drain)

        # interleaved rounds in a fixed row order; the best pass of each row counts
        best = {id(row): float("inf") for row, _ in tasks}
        for _ in range(args.repeats):
            for row, fn in tasks:
                t0 = time.perf_counter()
                fn()
                best[id(row)] = min(best[id(row)], time.perf_counter() - t0)
        for row, _ in tasks:
            row["images_per_s"] = n / best[id(row)]
        for size, cache_dir in cache_dirs.items():
            size_mb = sum(f.stat().st_size for f in cache_dir.rglob("*.u8")) / 1e6
            rows.append({"size": size, "stage": f"cache on disk: {size_mb:.1f} MB for {n} images", "workers": 0,
                         "images_per_s": None})
    finally:
        del loaders
        shutil.rmtree(tmp, ignore_errors=True)

    load = os.getloadavg()
    print(f"data pipeline, {n} images from {args.data}, best of {args.repeats} interleaved passes, torch threads 1, "
          f"{os.cpu_count()} CPUs ({platform.machine()}), load average {load[0]:.1f} at the end")
    print(f"{'size':>5}  {'workers':>7}  {'images/s':>9}  stage")
    for r in rows:
        rate = f"{r['images_per_s']:9.0f}" if r["images_per_s"] else " " * 9
        print(f"{r['size']:>5}  {r['workers']:>7}  {rate}  {r['stage']}")
    target = next(r["images_per_s"] for r in rows if r["size"] == 224 and r["stage"] == "cached: preprocess done, finalize")
    print(f"target: cached path at 224 >= 500 images/s: {'met' if target >= 500 else 'NOT met'} ({target:.0f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "data_pipeline", "data": str(args.data), "images": n, "repeats": args.repeats,
        "cpus": os.cpu_count(), "load_average_at_end": load, "torch": torch.__version__,
        "python": platform.python_version(),
        "command": "python benchmarks/data_pipeline.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows,
        "target_224_cached_images_per_s": 500, "target_met": bool(target >= 500),
    }, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
