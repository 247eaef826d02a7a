"""Ray Data engine throughput with 1 and 2 predictor actors on this machine, against the pieces it is made of.

On N dev-set images (random-weight resnet18 exported to ONNX at 224 px; speed does not depend on the weights):

* ``decode``: single-process read + preprocess rate (the CPU-task stage alone), images/s on one core;
* ``model``: onnxruntime model-only rate on preprocessed batches (the actor stage alone), one thread;
* ``local``: ``covidcxr predict``'s single-process engine (decode in 1 worker process + ORT, one thread);
* ``ray-1``/``ray-2``: :func:`covidcxr.predict.distributed.predict_ray` with 1 and 2 actors on a local Ray
  instance (logical CPUs = actors + 1), timed from the first task to the last shard (Ray start-up apart).

    .venv/bin/python benchmarks/ray_scaling.py [--images 200] [--batch-size 16]

Writes benchmarks/results/ray_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _models import random_resnet18  # benchmarks/ is the script's folder: sys.path[0]

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ray_scaling.json")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from covidcxr.export import _shared_dev_images, export_onnx
    from covidcxr.predict import Predictor, collect_inputs
    from covidcxr.predict.distributed import predict_ray, shutdown

    files = sorted(collect_inputs([_shared_dev_images()]))[: args.images]
    mean_kb = sum(Path(f).stat().st_size for f in files) / len(files) / 1024
    res: dict = {"images": len(files), "mean_file_kib": round(mean_kb, 1), "loadavg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = random_resnet18(Path(tmp))
        onnx = Path(tmp) / "r18.onnx"
        export_onnx(ckpt, onnx, parity_count=2)
        p = Predictor.from_path(onnx, threads=1)
        loader = p.loader()

        t0 = time.perf_counter()
        items = [loader(f) for f in files[:60]]
        res["decode_img_s"] = 60 / (time.perf_counter() - t0)
        x = np.stack([it.array for it in items[: args.batch_size]])
        p.probabilities(x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 5:
            p.probabilities(x)
            n += len(x)
        res["model_img_s"] = n / (time.perf_counter() - t0)
        print(f"decode {res['decode_img_s']:.1f} img/s (1 core), model {res['model_img_s']:.1f} img/s (1 thread)",
              flush=True)

        t0 = time.perf_counter()
        recs = list(p.predict_paths([], files=files, batch_size=args.batch_size, num_workers=1))
        res["local_img_s"] = len(recs) / (time.perf_counter() - t0)
        print(f"local engine: {res['local_img_s']:.1f} img/s", flush=True)

        for workers in (1, 2):
            out = Path(tmp) / f"ray{workers}"
            import ray

            t0 = time.perf_counter()
            ray.init(num_cpus=workers + 1, include_dashboard=False, log_to_driver=False,
                     object_store_memory=256 * 1024 * 1024)
            start_s = time.perf_counter() - t0
            from covidcxr.predict.pipeline import PipelineConfig

            # the gate off, as the local baseline above (predict_paths): the figures compare the engines only
            run = predict_ray([], onnx, out, files=files, workers=workers, batch_size=args.batch_size, threads=1,
                              shard_size=100, pipeline=PipelineConfig(model=str(onnx), threads=1, plausibility=False))
            shutdown()
            res[f"ray{workers}_img_s"] = run.written / run.seconds
            res[f"ray{workers}_startup_s"] = round(start_s, 1)
            print(f"ray, {workers} actor(s): {run.written} images in {run.seconds:.1f} s = "
                  f"{res[f'ray{workers}_img_s']:.1f} img/s (Ray start-up {start_s:.1f} s)", flush=True)
    res["ray2_over_ray1"] = res["ray2_img_s"] / res["ray1_img_s"]
    res["loadavg_end"] = os.getloadavg()
    res["cores"] = os.cpu_count()
    res["command"] = "python benchmarks/ray_scaling.py " + " ".join(argv if argv is not None else sys.argv[1:])
    res["time_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
