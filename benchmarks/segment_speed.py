"""Cost of one lung mask: the pretrained lung U-Net at 512 and 256 px (and a fine-tuned or from-scratch
checkpoint if given), in torch and in onnxruntime, one thread, batch 1; plus the cached path.

Reports per image the CPU time of the process (the honest figure on a shared machine: wall time
depends on what else runs) and the wall time, best of ``--repeats`` after one warm-up. Prints a
table and writes benchmarks/results/segment_speed.json.

    COVIDCXR_WEIGHTS_DIR=../shared/weights .venv/bin/python benchmarks/segment_speed.py \\
        [--sizes 512,256] [--repeats 3] [--extra CKPT ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]


def _image():
    from covidcxr.shared import data_dir

    from covidcxr.io import read_image

    p = data_dir() / "samples" / "nih-00000001_000.png"
    if p.is_file():
        return read_image(p), str(p)
    import numpy as np

    return np.random.default_rng(0).random((512, 512)).astype("float32"), "random 512x512"


def _time(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up (first call allocates, ORT optimises)
    best_cpu = best_wall = float("inf")
    for _ in range(repeats):
        c, w = time.process_time(), time.perf_counter()
        fn()
        best_cpu, best_wall = min(best_cpu, time.process_time() - c), min(best_wall, time.perf_counter() - w)
    return best_cpu, best_wall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="512,256")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--extra", nargs="*", default=[], help="segment-train checkpoints to time too")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "segment_speed.json"))
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from covidcxr.segment import CachedSegmenter, load_segmenter

    img, src = _image()
    os.environ.setdefault("COVIDCXR_CACHE", tempfile.mkdtemp(prefix="segspeed-"))
    rows = []
    specs = [("lung-unet-vgg11", int(s)) for s in args.sizes.split(",")] + [(e, None) for e in args.extra]
    for spec, size in specs:
        for backend in ("torch", "onnx"):
            try:
                seg = load_segmenter(spec, size=size, backend=backend)
            except Exception as err:  # e.g. onnxruntime missing: say so, time the rest
                rows.append({"segmenter": spec, "size": size, "backend": backend, "error": str(err)[:200]})
                continue
            cpu, wall = _time(lambda: seg.predict([img]), args.repeats)
            rows.append({"segmenter": seg.id, "size": seg.size, "backend": backend, "cpu_s": round(cpu, 3),
                         "wall_s": round(wall, 3)})
            print(f"{seg.id:50s} {backend:6s} cpu {cpu:.2f} s  wall {wall:.2f} s", flush=True)
        cached = CachedSegmenter(load_segmenter(spec, size=size))
        cached(img)
        cpu, wall = _time(lambda: cached(img), args.repeats)
        rows.append({"segmenter": cached.id, "size": cached.segmenter.size, "backend": "cache hit",
                     "cpu_s": round(cpu, 4), "wall_s": round(wall, 4)})
        print(f"{cached.id:50s} cached cpu {cpu:.4f} s  wall {wall:.4f} s", flush=True)
    result = {"benchmark": "segment_speed", "image": src, "threads": 1, "batch": 1, "repeats": args.repeats,
              "python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
              "cpus": os.cpu_count(), "load_avg": os.getloadavg(), "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "rows": rows}
    try:
        import onnxruntime

        result["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
