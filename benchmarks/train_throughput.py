"""Training images per second: real images through the prepared-image cache vs synthetic tensors.

Both paths run the same Lightning training loop (``covidcxr.train.CXRClassifier``, Adam, the
model at its size) for a few steps; only the data differ. The real path is the one ``covidcxr
train`` uses: ``CXRDataModule`` over the shared dev set with the on-disk cache (warmed first, as
after one epoch) and augmentation. The synthetic path feeds random tensors already in memory, so
it measures the model alone. If real / synthetic is close to 1, data loading is not the
bottleneck; the share of the real run's wall time spent waiting for the next batch says the same
without depending on how busy the machine was between runs.

Each row also measures inference (eval mode, no gradients, the same batch size) in PyTorch eager and,
after ``covidcxr.export.export_onnx`` (with its parity check), in onnxruntime with the same thread count.
``--no-inference`` skips that. ``--precision 32-true bf16-mixed`` times each model's training under each
Lightning precision (``trainer.precision``: bf16-mixed autocasts to bfloat16 on the CPU, which pays on CPUs
with AVX512-BF16 / AMX), ``--channels-last`` as ``trainer.channels_last``. Prints a table and writes
benchmarks/results/train_throughput.json.

    .venv/bin/python benchmarks/train_throughput.py [--models mobilenet_v2:224 efficientnet_lite0:224 ...]
        [--steps 6] [--warmup 2] [--batch-size 8] [--workers 0] [--threads 1] [--no-inference]
        [--precision 32-true bf16-mixed] [--channels-last]
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

import torch

REPO = Path(__file__).resolve().parents[1]


def _shared_data() -> Path:
    """<shared>/data: COVIDCXR_SHARED names the shared folder (its data/ is accepted too), else ../shared."""
    from covidcxr.shared import data_dir

    return data_dir()

DEFAULT_DATA = _shared_data() / "covid-cxr-dev"
DEFAULT_MODELS = ["resnet18:224", "densenet121:224", "covidnet-cxr-small:224", "mobilenet_v2:224",
                  "efficientnet_lite0:224"]


class _Timer:
    """Lightning callback: wall time of the training batches after ``warmup``."""

    def __new__(cls, warmup: int):
        import lightning as L

        class T(L.Callback):
            def __init__(self) -> None:
                self.t0: float | None = None
                self.t1: float | None = None
                self.images = 0
                self.wait = 0.0  # time between one batch's end and the next one's start: fetching data

            def on_train_batch_start(self, trainer, module, batch, idx) -> None:
                now = time.perf_counter()
                if idx == warmup:
                    self.t0 = now
                elif idx > warmup and self.t1 is not None:
                    self.wait += now - self.t1

            def on_train_batch_end(self, trainer, module, outputs, batch, idx) -> None:
                if idx >= warmup:
                    self.images += len(batch["label"])
                    self.t1 = time.perf_counter()

        return T()


class _Synthetic(torch.utils.data.Dataset):
    def __init__(self, n: int, channels: int, size: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, channels, size, size, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": int(self.y[i]), "index": i}


def _run(cfg: dict, preset, loader, steps: int, warmup: int, precision: str = "32-true") -> tuple[float, float]:
    import lightning as L

    from covidcxr.train import CXRClassifier

    module = CXRClassifier(cfg, ["normal", "pneumonia", "COVID-19"], preset)
    timer = _Timer(warmup)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=warmup + steps, precision=precision,
                        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[timer])
    trainer.fit(module, train_dataloaders=loader)
    total = timer.t1 - timer.t0
    return timer.images / total, timer.wait / total


def _inference(name: str, preset, batch: int, threads: int, tmp: Path, repeats: int) -> dict:
    """Inference img/s of one model (random weights: speed does not depend on them), eager and onnxruntime."""
    from covidcxr import models
    from covidcxr.export import export_onnx

    torch.manual_seed(0)
    net = models.build(name, num_classes=3).eval()
    x = torch.randn(batch, preset.channels, preset.size, preset.size)

    def best_rate(fn) -> float:
        fn()  # warm-up (allocations, ORT graph optimisation)
        rates = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            rates.append(batch / (time.perf_counter() - t))
        return max(rates)

    with torch.no_grad():
        eager = best_rate(lambda: net(x))
    ckpt = tmp / f"{name}.ckpt"
    models.save(ckpt, net, classes=["normal", "pneumonia", "COVID-19"], preset=preset)
    report = export_onnx(ckpt, tmp / f"{name}.onnx")
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(str(tmp / f"{name}.onnx"), so, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x.numpy()}
    onnx = best_rate(lambda: sess.run(None, feed))
    return {"eager_infer_img_s": eager, "onnx_infer_img_s": onnx,
            "onnx_parity_max_abs_diff": getattr(report, "max_abs_diff", None)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with metadata.csv (dev-set layout)")
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help="NAME:SIZE entries")
    ap.add_argument("--steps", type=int, default=6, help="timed training steps per row")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers for the real-data path")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a busy machine)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per row; the best counts (least disturbed)")
    ap.add_argument("--no-inference", action="store_true", help="skip the eager / onnxruntime inference columns")
    ap.add_argument("--infer-repeats", type=int, default=5, help="timed inference batches per backend (best counts)")
    ap.add_argument("--precision", nargs="+", default=["32-true"],
                    help="Lightning precisions to time (trainer.precision), e.g. 32-true bf16-mixed")
    ap.add_argument("--channels-last", action="store_true", help="channels-last tensors (trainer.channels_last)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "train_throughput.json")
    args = ap.parse_args(argv)

    if not (args.data / "metadata.csv").is_file():
        print(f"no dataset at {args.data} (needs metadata.csv); pass --data", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    from covidcxr.data import CXRDataModule, build_manifest
    from covidcxr.models import get_spec
    from covidcxr.preprocess import get_preset
    from covidcxr.train import load_config

    tmp = Path(tempfile.mkdtemp(prefix="covidcxr-bench-"))
    build_manifest(sources=[("csv", str(args.data / "metadata.csv"))], out=tmp / "data", seed=62)
    manifest = tmp / "data" / "manifest.csv"
    n_img = args.batch_size * (args.warmup + args.steps)
    rows = []
    for entry in args.models:
        name, _, size = entry.partition(":")
        spec = get_spec(name)
        preset = get_preset(spec.preset, size=int(size) if size else None)
        cfg = load_config(None, [f"model.arch={name}", "optimizer.name=adam", "optimizer.lr=1e-4",
                                 "operating_point.target_sensitivity=null",
                                 f"trainer.channels_last={str(args.channels_last).lower()}"])
        dm = CXRDataModule(manifest, preset, batch_size=args.batch_size, num_workers=args.workers, augment="covidnet",
                           cache_dir=tmp / "cache", seed=0)
        dm.setup("fit")
        ds = dm.dataset("train")
        for i in range(min(len(ds), n_img * 2)):  # warm the cache (what epoch 1 does)
            ds.prepared(i)
        synth = torch.utils.data.DataLoader(_Synthetic(n_img, preset.channels, preset.size), batch_size=args.batch_size)
        infer = None if args.no_inference else _inference(name, preset, args.batch_size, args.threads, tmp,
                                                           args.infer_repeats)
        for precision in args.precision:
            real_r, synth_r, wait = 0.0, 0.0, []
            for _ in range(args.repeats):  # alternate, so that load changes hit both paths alike
                synth_r = max(synth_r, _run(cfg, preset, synth, args.steps, args.warmup, precision)[0])
                r, w = _run(cfg, preset, dm.train_dataloader(), args.steps, args.warmup, precision)
                real_r, wait = max(real_r, r), wait + [w]
            row = {"model": name, "size": preset.size, "batch_size": args.batch_size, "precision": precision,
                   "channels_last": args.channels_last, "synthetic_img_s": synth_r,
                   "real_cached_img_s": real_r, "ratio": real_r / synth_r, "data_wait_fraction": min(wait),
                   "workers": args.workers, **(infer or {})}
            rows.append(row)
            print(f"{name:>20} {preset.size:>4}px {precision:>10}  synthetic {synth_r:7.2f} img/s   "
                  f"real+cache {real_r:7.2f} img/s   ratio {row['ratio']:.2f}   "
                  f"data wait {100 * row['data_wait_fraction']:.1f}%"
                  + (f"   infer eager {row['eager_infer_img_s']:.1f} / onnx {row['onnx_infer_img_s']:.1f} img/s"
                     if "eager_infer_img_s" in row else ""), flush=True)

    meta = {"threads": args.threads, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
            "load_average_at_end": os.getloadavg()[0], "augment": "covidnet", "precision": args.precision,
            "channels_last": args.channels_last,
            "command": "python benchmarks/train_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print()
    print("| model | size | batch | precision | synthetic img/s | real (cached) img/s | real / synthetic "
          "| time waiting for data | inference eager img/s | inference onnxruntime img/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    for r in rows:
        print(f"| {r['model']} | {r['size']} | {r['batch_size']} | {r['precision']} | {r['synthetic_img_s']:.2f} | "
              f"{r['real_cached_img_s']:.2f} | {r['ratio']:.2f} | {100 * r['data_wait_fraction']:.1f}% | "
              f"{fmt(r.get('eager_infer_img_s'))} | {fmt(r.get('onnx_infer_img_s'))} |")
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
