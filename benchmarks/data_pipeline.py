"""Images per second for read + preprocess (+ augment), cold and from the prepared-image cache.

Runs on the shared dev set (../shared/data/covid-cxr-dev, 443 JPEGs, longer side <= 512 px) at 224
and 480 px, in one process with one torch thread (what each DataLoader worker does), and through a
DataLoader with worker processes. Prints a table and writes benchmarks/results/data_pipeline.json.

    .venv/bin/python benchmarks/data_pipeline.py [--data DIR] [--workers 2] [--repeats 2]
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

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("COVIDCXR_SHARED", REPO.parent / "shared" / "data")) / "covid-cxr-dev"


def _rate(fn, n: int, repeats: int) -> float:
    """Best of ``repeats`` passes, in images per second (best = least disturbed by other load)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n / best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with metadata.csv (dev-set layout)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader worker processes for the loader rows")
    ap.add_argument("--repeats", type=int, default=3, help="passes per row; the best counts (least disturbed)")
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
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="covidcxr-bench-"))
    try:
        # decode alone, once: the part the cache removes
        paths = frame["path"].tolist()
        def decode_all():
            for p in paths:
                read_image(p)

        rows.append({"size": "-", "stage": "decode only (JPEG -> float32)", "workers": 0,
                     "images_per_s": _rate(decode_all, n, args.repeats)})
        for size in (224, 480):
            preset = f"covidnet@{size}" if size != 480 else "covidnet"
            cold = CXRDataset(frame, preset)
            cold_aug = CXRDataset(frame, preset, augment=aug)
            cache_dir = tmp / f"cache{size}"
            cached = CXRDataset(frame, preset, cache_dir=cache_dir)

            def run(ds):
                def go():
                    for i in range(n):
                        ds[i]  # dropped at once, as a DataLoader worker hands each item on

                return go

            def fill():
                shutil.rmtree(cache_dir, ignore_errors=True)
                ds = CXRDataset(frame, preset, cache_dir=cache_dir)
                for i in range(n):
                    ds[i]

            rows.append({"size": size, "stage": "cold: read + preprocess", "workers": 0,
                         "images_per_s": _rate(run(cold), n, args.repeats)})
            rows.append({"size": size, "stage": "cold: read + preprocess + augment", "workers": 0,
                         "images_per_s": _rate(run(cold_aug), n, args.repeats)})
            rows.append({"size": size, "stage": "first epoch filling the cache", "workers": 0,
                         "images_per_s": _rate(fill, n, args.repeats)})
            cached_aug = CXRDataset(frame, preset, cache_dir=cache_dir, augment=aug)
            rows.append({"size": size, "stage": "cached: preprocess done, finalize", "workers": 0,
                         "images_per_s": _rate(run(cached), n, args.repeats)})
            rows.append({"size": size, "stage": "cached + augment", "workers": 0,
                         "images_per_s": _rate(run(cached_aug), n, args.repeats)})
            for ds, what in ((cached, "cached"), (cached_aug, "cached + augment")):
                for workers, persistent in ((0, False), (args.workers, False), (args.workers, True)):
                    loader = DataLoader(ds, batch_size=32, shuffle=True, num_workers=workers,
                                        persistent_workers=persistent)

                    def drain(loader=loader):
                        for _ in loader:
                            pass

                    if persistent:
                        drain()  # start the workers once; later epochs reuse them
                    how = ("workers kept between epochs" if persistent else
                           "workers started per epoch" if workers else "in the main process")
                    rows.append({"size": size, "stage": f"{what}, DataLoader batches of 32, {how}", "workers": workers,
                                 "images_per_s": _rate(drain, n, args.repeats)})
                    del loader
            size_mb = sum(f.stat().st_size for f in cache_dir.rglob("*.u8")) / 1e6
            rows.append({"size": size, "stage": f"cache on disk: {size_mb:.1f} MB for {n} images", "workers": 0,
                         "images_per_s": None})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"data pipeline, {n} images from {args.data}, best of {args.repeats}, torch threads 1, "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), load average {os.getloadavg()[0]:.1f}")
    print(f"{'size':>5}  {'workers':>7}  {'images/s':>9}  stage")
    for r in rows:
        rate = f"{r['images_per_s']:9.0f}" if r["images_per_s"] else " " * 9
        print(f"{r['size']:>5}  {r['workers']:>7}  {rate}  {r['stage']}")
    target = next(r["images_per_s"] for r in rows if r["size"] == 224 and r["stage"] == "cached: preprocess done, finalize")
    print(f"target: cached path at 224 >= 500 images/s: {'met' if target >= 500 else 'NOT met'} ({target:.0f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "data_pipeline", "data": str(args.data), "images": n, "repeats": args.repeats,
        "cpus": os.cpu_count(), "load_average_at_end": os.getloadavg(), "torch": torch.__version__, "python": platform.python_version(),
        "command": "python benchmarks/data_pipeline.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows,
        "target_224_cached_ips": 500, "target_met": bool(target >= 500),
    }, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
