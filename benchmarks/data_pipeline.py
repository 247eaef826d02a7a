"""Images per second for read + preprocess (+ augment), cold and from the prepared-image cache.

Runs on the shared dev set (../shared/data/covid-cxr-dev, 443 JPEGs, longer side <= 512 px) at 224
and 480 px: in one process with one torch thread (what each DataLoader worker does), and through a
DataLoader in the main process or with worker processes. Every row is timed ``--repeats`` times in
interleaved rounds and the best pass counts, so a burst of load from other processes hits one pass
of a row, not all of them. Prints a table and writes benchmarks/results/data_pipeline.json.

    .venv/bin/python benchmarks/data_pipeline.py [--data DIR] [--workers 2] [--repeats 3]

``--scale 30000 100000`` instead times the build's patient linking + split and the audit on N
synthetic images (SHA-1 and 64-bit perceptual hashes made up, so no file is read), each size in a
fresh process so its peak RSS is its own, and writes benchmarks/results/data_pipeline_scale.json:

    .venv/bin/python benchmarks/data_pipeline.py --scale 30000 100000
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


def _synthetic(n: int, kind: str, seed: int = 0):
    """N rows, 2 images per patient, 4 sources; 1 % near copies (0-6 bits) and 0.5 % byte-identical
    copies filed under another patient. ``kind`` "uniform": random hashes; "clustered": 2000 centres
    with 10 random bit flips each, like many similar-looking films (large multi-index buckets)."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    pid = np.arange(n) // 2
    label = np.array(["normal", "pneumonia", "COVID-19"])[rng.integers(0, 3, n // 2 + 1)][pid]
    if kind == "uniform":
        h = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) * np.uint64(2) + rng.integers(0, 2, n).astype(np.uint64)
    else:
        centres = rng.integers(0, 2**63, 2000, dtype=np.int64).astype(np.uint64)
        h = centres[rng.integers(0, 2000, n)]
        for _ in range(10):
            h ^= np.uint64(1) << rng.integers(0, 64, n).astype(np.uint64)
    digests = np.array([f"{i:040x}" for i in range(n)], dtype=object)
    copies = rng.choice(n, n // 100, replace=False)
    for c in copies:
        o = int(rng.integers(0, n))
        flips = rng.choice(64, int(rng.integers(0, 7)), replace=False)
        h[c] = h[o] ^ np.uint64(sum(1 << int(b) for b in flips))
    same = rng.choice(n, n // 200, replace=False)
    digests[same] = digests[rng.integers(0, n, len(same))]
    df = pd.DataFrame({"patient_id": [f"p{p}" for p in pid], "path": [f"/synthetic/{i}.png" for i in range(n)],
                       "label": label, "source": [f"site{p % 4}" for p in pid]})
    return df, list(digests), h


def scale_worker(n: int, kind: str) -> dict:
    """Link + split + audit of N synthetic hashes, in this process; returns times and peak RSS."""
    import resource

    import numpy as np

    from covidcxr.data.audit import audit_manifest
    from covidcxr.data.duplicates import ImageFeatures
    from covidcxr.data.linking import link_patients
    from covidcxr.data.splits import assign_splits

    df, digests, h = _synthetic(n, kind)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    linked, dropped, links = link_patients(df, ImageFeatures(digests=digests, hashes=h))
    linked["split"] = assign_splits(linked, seed=0).values
    t1 = time.perf_counter()
    kept = set(linked["path"])
    keep = [i for i, p in enumerate(df["path"]) if p in kept]
    report = audit_manifest(linked, digests=[digests[i] for i in keep], hashes=h[keep])
    t2 = time.perf_counter()
    return {"images": n, "hashes": kind, "build_link_split_s": round(t1 - t0, 2), "audit_s": round(t2 - t1, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rss_before_mb": round(base, 1), "near_pairs": int(dropped.get("near-duplicate pairs kept in one split", 0)),
            "identical_dropped": int(dropped.get("byte-identical duplicate image", 0)),
            "persons_linked": len({ln["person"] for ln in links}),
            "audit_leak": bool(report["leak"]), "split_images": {k: int(v) for k, v in linked["split"].value_counts().items()},
            "np_version": np.__version__}


def scale_main(sizes: list[int], out: Path) -> int:
    import subprocess

    rows = []
    for kind in ("uniform", "clustered"):
        for n in sizes:
            code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import data_pipeline as d; "
                    f"print(json.dumps(d.scale_worker({n}, {kind!r})))")
            t0 = time.perf_counter()
            res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
            if res.returncode:
                print(res.stderr[-2000:], file=sys.stderr)
                return 1
            row = json.loads(res.stdout.strip().splitlines()[-1])
            row["process_wall_s"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print(f"{kind:>9} {n:>7} images: link+split {row['build_link_split_s']:6.1f} s, audit {row['audit_s']:6.1f} s, "
                  f"peak RSS {row['peak_rss_mb']:7.0f} MB ({row['near_pairs']} near pairs, "
                  f"{row['identical_dropped']} identical dropped, leak={row['audit_leak']})")
    load = os.getloadavg()
    ok = all(r["peak_rss_mb"] < 2048 and r["build_link_split_s"] + r["audit_s"] < 300 for r in rows)
    print(f"target: < 2 GB and < 5 min at 100k: {'met' if ok else 'NOT met'}; load average {load[0]:.1f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "data_pipeline_scale", "rows": rows, "cpus": os.cpu_count(), "load_average_at_end": load,
        "python": platform.python_version(), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python benchmarks/data_pipeline.py --scale " + " ".join(map(str, sizes)), "target_met": ok,
    }, indent=2))
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with metadata.csv (dev-set layout)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader worker processes for the loader rows")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved passes per row; the best counts")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N images (0 = all)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "data_pipeline.json")
    ap.add_argument("--scale", type=int, nargs="+", metavar="N",
                    help="time linking + split + audit on N synthetic hashes instead (e.g. 30000 100000)")
    args = ap.parse_args(argv)
    if args.scale:
        return scale_main(args.scale, REPO / "benchmarks" / "results" / "data_pipeline_scale.json")

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
            size_mb = sum(f.stat().st_size for f in cache_dir.rglob("*.f32")) / 1e6
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
