"""CPU speed of PyTorch eager, onnxruntime fp32 and onnxruntime INT8 (static QDQ), batch 1 and 16.

For each model (random weights: speed does not depend on their values, so no parity gate is run here;
``tests/test_quantize.py`` and ``covidcxr export --quantize int8`` run it on trained checkpoints) the script

1. saves a checkpoint, exports it with :func:`covidcxr.export.export_onnx` (fp32 parity check included),
   and quantizes it with :func:`covidcxr.quantize.quantize_file` (the INT8 export's own code, calibrated on
   16 dev-set images);
2. times eager, ORT fp32 and ORT INT8 in alternating rounds (same background load for all three); each
   figure is the best round, the median round alongside;
3. measures onnxruntime's own ceilings on this CPU with the same threads: fp32 MatMul GFLOP/s and u8s8
   MatMulInteger GOP/s (2048^3), and reports each model's achieved GFLOP/s (2 x MACs x img/s) as a share
   of the fp32 ceiling;
4. sweeps onnxruntime's graph optimisation level and intra-op threads (resnet18, batch 1, fp32 and INT8);
5. checks whether INT8 ran on AVX-512/AVX VNNI instructions: the CPU flags, then ``perf record`` of an
   INT8 run and a disassembly of the hottest onnxruntime addresses (share of samples in code blocks that
   contain ``vpdpbusd``), when perf and objdump are available.

    .venv/bin/python benchmarks/quantize_speed.py [--models resnet18 mobilenet_v2 densenet121 efficientnet_lite0]
        [--threads 2] [--rounds 3] [--round-seconds 1.0] [--no-sweep] [--no-perf]

Prints tables and writes benchmarks/results/quantize_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
DEFAULT_MODELS = ["resnet18", "mobilenet_v2", "densenet121", "efficientnet_lite0"]
CLASSES = ["normal", "pneumonia", "COVID-19"]


def cpu_info() -> dict[str, Any]:
    name, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    keep = sorted(f for f in flags if re.search(r"avx512|vnni|amx|^fma$|^avx2$", f))
    return {"name": name, "logical_cores": os.cpu_count(), "simd_flags": keep,
            "avx512_vnni": "avx512_vnni" in flags, "avx_vnni": "avx_vnni" in flags}


def rate(fn: Callable[[], Any], per_call: float, seconds: float, min_iters: int = 2) -> float:
    """Units per second over one round of at least ``seconds`` and ``min_iters`` calls."""
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= seconds and n >= min_iters:
            return n * per_call / dt


def alternate(fns: dict[str, Callable[[], Any]], per_call: float, rounds: int, seconds: float) -> dict[str, Any]:
    for fn in fns.values():  # warm-up: allocators, kernels, prepacked weights
        fn()
        fn()
    res: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            res[k].append(rate(fn, per_call, seconds))
    return {k: {"best": max(v), "median": statistics.median(v), "rounds": [round(x, 2) for x in v]}
            for k, v in res.items()}


# --------------------------------------------------------------------------- onnxruntime ceilings


def _session(model: Any, threads: int, level: str = "all") -> Any:
    import onnxruntime as ort

    from covidcxr.predict import session_options

    return ort.InferenceSession(model.SerializeToString(), sess_options=session_options(threads, level),
                                providers=["CPUExecutionProvider"])


def ceilings(threads: int, rounds: int, seconds: float, n: int = 2048) -> dict[str, Any]:
    """onnxruntime fp32 MatMul GFLOP/s and u8s8 MatMulInteger GOP/s on n x n x n (weights as initializers)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def graph(op: str, a_type: int, b: np.ndarray, out_type: int) -> Any:
        g = helper.make_graph(
            [helper.make_node(op, ["A", "B"], ["Y"])], op,
            [helper.make_tensor_value_info("A", a_type, [n, n])],
            [helper.make_tensor_value_info("Y", out_type, [n, n])],
            [numpy_helper.from_array(b, "B")],
        )
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    f32 = _session(graph("MatMul", TensorProto.FLOAT, rng.standard_normal((n, n), dtype=np.float32),
                         TensorProto.FLOAT), threads)
    i8 = _session(graph("MatMulInteger", TensorProto.UINT8, rng.integers(-128, 127, (n, n), dtype=np.int8),
                        TensorProto.INT32), threads)
    a32 = rng.standard_normal((n, n), dtype=np.float32)
    a8 = rng.integers(0, 255, (n, n), dtype=np.uint8)
    ops = 2.0 * n ** 3 / 1e9
    r = alternate({"fp32": lambda: f32.run(None, {"A": a32}), "int8": lambda: i8.run(None, {"A": a8})}, ops, rounds,
                  seconds)
    del onnx
    return {"n": n, "fp32_gflops": r["fp32"], "int8_gops": r["int8"],
            "int8_over_fp32": r["int8"]["best"] / r["fp32"]["best"]}


# --------------------------------------------------------------------------- models


def _calibration_files(n: int = 16) -> list[str]:
    from covidcxr.export import _shared_dev_images
    from covidcxr.predict import collect_inputs

    dev = _shared_dev_images()
    files = collect_inputs([dev]) if dev else []
    if not files:
        raise SystemExit("the shared dev set is needed for calibration images (set COVIDCXR_SHARED)")
    idx = np.linspace(0, len(files) - 1, n).round().astype(int)
    return [files[i] for i in idx]


def build_models(name: str, workdir: Path) -> dict[str, Any]:
    import torch

    from covidcxr import models
    from covidcxr.evaluate.compare import count_macs
    from covidcxr.export import export_onnx
    from covidcxr.predict import Predictor
    from covidcxr.preprocess import get_preset
    from covidcxr.quantize import quantize_file

    spec = models.get_spec(name)
    torch.manual_seed(0)
    net = models.build(name, num_classes=3)
    preset = get_preset(spec.preset).with_size(224)
    ckpt = workdir / f"{name}.ckpt"
    models.save(ckpt, net, arch=name, classes=CLASSES, preset=preset)
    fp32 = workdir / f"{name}.onnx"
    t0 = time.perf_counter()
    rep = export_onnx(ckpt, fp32, parity_count=4)
    t1 = time.perf_counter()
    int8 = workdir / f"{name}.int8.onnx"
    quantize_file(Predictor.from_path(fp32), int8, _calibration_files())
    t2 = time.perf_counter()
    return {"ckpt": ckpt, "fp32": fp32, "int8": int8, "macs": count_macs(net, preset.channels, 224),
            "export_s": round(t1 - t0, 1), "quantize_s": round(t2 - t1, 1), "parity_max_abs_diff": rep.max_abs_diff,
            "size_fp32_mb": fp32.stat().st_size / 1e6, "size_int8_mb": int8.stat().st_size / 1e6}


def bench_model(name: str, files: dict[str, Any], batch_sizes: list[int], threads: int, rounds: int,
                seconds: float, ceiling: float) -> list[dict]:
    from covidcxr.predict import Predictor

    eager = Predictor.from_path(files["ckpt"], backend="torch")
    p32 = Predictor.from_path(files["fp32"], threads=threads)
    p8 = Predictor.from_path(files["int8"], threads=threads)
    rows = []
    for bs in batch_sizes:
        x = np.random.default_rng(0).standard_normal((bs, 3, 224, 224), dtype=np.float32)
        r = alternate({"eager": lambda: eager.probabilities(x), "ort_fp32": lambda: p32.probabilities(x),
                       "ort_int8": lambda: p8.probabilities(x)}, bs, rounds, seconds)
        gflop = 2 * files["macs"] / 1e9
        row = {"model": name, "batch": bs, "gmacs": files["macs"] / 1e9, **{f"{k}_img_s": v["best"] for k, v in r.items()},
               **{f"{k}_img_s_median": v["median"] for k, v in r.items()}, "rounds": {k: v["rounds"] for k, v in r.items()}}
        row["int8_over_fp32"] = row["ort_int8_img_s"] / row["ort_fp32_img_s"]
        row["int8_over_fp32_median"] = row["ort_int8_img_s_median"] / row["ort_fp32_img_s_median"]
        row["fp32_over_eager"] = row["ort_fp32_img_s"] / row["eager_img_s"]
        for k in ("eager", "ort_fp32", "ort_int8"):
            row[f"{k}_share_of_fp32_ceiling"] = row[f"{k}_img_s"] * gflop / ceiling
        rows.append(row)
        print(f"  {name:18s} b{bs:<3d} eager {row['eager_img_s']:7.1f}  fp32 {row['ort_fp32_img_s']:7.1f}  int8 "
              f"{row['ort_int8_img_s']:7.1f} img/s  int8/fp32 x{row['int8_over_fp32']:.2f} (median "
              f"x{row['int8_over_fp32_median']:.2f})  fp32 at {row['ort_fp32_share_of_fp32_ceiling']:.0%} of "
              f"ceiling, int8 at {row['ort_int8_share_of_fp32_ceiling']:.0%}", flush=True)
    return rows


def sweep(files: dict[str, Any], rounds: int, seconds: float) -> list[dict]:
    """Graph optimisation level x intra-op threads, batch 1, fp32 and INT8."""
    from covidcxr.predict import Predictor

    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
    fns, keys = {}, []
    for kind in ("fp32", "int8"):
        for level in ("disable", "basic", "extended", "all"):
            for threads in (1, 2):
                p = Predictor.from_path(files[kind], threads=threads, graph_opt=level)
                k = f"{kind}|{level}|{threads}"
                fns[k] = (lambda p=p: p.probabilities(x))
                keys.append(k)
    r = alternate(fns, 1, rounds, seconds)
    out = []
    for k in keys:
        kind, level, threads = k.split("|")
        out.append({"kind": kind, "graph_opt": level, "threads": int(threads), "img_s": r[k]["best"],
                    "img_s_median": r[k]["median"]})
    return out


# --------------------------------------------------------------------------- VNNI evidence


def vnni_evidence(int8_path: Path, threads: int) -> dict[str, Any]:
    """perf samples of an INT8 run, attributed to onnxruntime code blocks with/without vpdpbusd."""
    perf, objdump = shutil.which("perf"), shutil.which("objdump")
    if not perf or not objdump:
        return {"checked": False, "why": "perf or objdump not installed"}
    import onnxruntime

    so = next(Path(onnxruntime.__file__).parent.joinpath("capi").glob("onnxruntime_pybind11_state*.so"))
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "perf.data"
        code = (f"import numpy as np\nfrom covidcxr.predict import Predictor\n"
                f"p = Predictor.from_path({str(int8_path)!r}, threads={threads})\n"
                "x = np.random.default_rng(0).standard_normal((8, 3, 224, 224), dtype=np.float32)\n"
                "import time\nt = time.time()\nwhile time.time() - t < 4: p.probabilities(x)\n")
        rec = subprocess.run([perf, "record", "-q", "-F", "499", "-o", str(data), "--", sys.executable, "-c", code],
                             capture_output=True, text=True, timeout=120)
        if rec.returncode != 0:
            return {"checked": False, "why": f"perf record failed: {rec.stderr.strip()[-200:]}"}
        rep = subprocess.run([perf, "report", "-i", str(data), "--no-children", "--sort", "dso,sym", "--stdio"],
                             capture_output=True, text=True, timeout=120)
    hot: dict[int, float] = {}
    total_ort = 0.0
    for line in rep.stdout.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[\.\]\s+(0x[0-9a-f]+|\S+)", line)
        if not m or "onnxruntime_pybind11_state" not in m.group(2):
            continue
        share = float(m.group(1))
        total_ort += share
        if m.group(3).startswith("0x"):
            hot[int(m.group(3), 16)] = share
    top = sorted(hot.items(), key=lambda kv: -kv[1])[:60]
    vnni_share, blocks = 0.0, 0
    for addr, share in top:
        dis = subprocess.run([objdump, "-d", "--no-show-raw-insn", f"--start-address={addr - 48:#x}",
                              f"--stop-address={addr + 48:#x}", str(so)], capture_output=True, text=True, timeout=60)
        if "vpdpbusd" in dis.stdout:
            vnni_share += share
            blocks += 1
    top_share = sum(s for _, s in top)
    return {"checked": True, "onnxruntime_sample_share": round(total_ort, 1), "top_addresses": len(top),
            "top_address_share": round(top_share, 1), "vpdpbusd_block_share": round(vnni_share, 1),
            "vnni_used": vnni_share > 0.25 * max(top_share, 1e-9)}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--threads", type=int, default=2, help="torch and ORT intra-op threads (default: 2)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--round-seconds", type=float, default=1.0)
    ap.add_argument("--no-sweep", action="store_true", help="skip the graph-optimisation/threads sweep")
    ap.add_argument("--no-perf", action="store_true", help="skip the perf-based VNNI check")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "quantize_speed.json")
    args = ap.parse_args(argv)

    import onnxruntime
    import torch

    from covidcxr import models

    torch.set_num_threads(args.threads)
    info = cpu_info()
    load0 = os.getloadavg()
    print(f"CPU: {info['name']}, {info['logical_cores']} logical cores, flags {' '.join(info['simd_flags'])}; "
          f"threads {args.threads}; load {load0[0]:.1f}; torch {torch.__version__}, onnxruntime "
          f"{onnxruntime.__version__}", flush=True)
    t_start = time.time()
    ceil = ceilings(args.threads, args.rounds, args.round_seconds)
    print(f"ceilings ({args.threads} threads): fp32 MatMul {ceil['fp32_gflops']['best']:.0f} GFLOP/s, u8s8 "
          f"MatMulInteger {ceil['int8_gops']['best']:.0f} GOP/s (x{ceil['int8_over_fp32']:.2f})", flush=True)
    rows: list[dict] = []
    skipped = [m for m in args.models if m not in models.list_models()]
    extra: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        built = {}
        for name in [m for m in args.models if m not in skipped]:
            built[name] = build_models(name, Path(tmp))
            rows += bench_model(name, built[name], args.batch_sizes, args.threads, args.rounds, args.round_seconds,
                                ceil["fp32_gflops"]["best"])
        ref = built.get("resnet18") or next(iter(built.values()), None)
        if ref is not None and not args.no_sweep:
            extra["sweep"] = sweep(ref, max(2, args.rounds - 1), args.round_seconds)
            for r in extra["sweep"]:
                print(f"  sweep {r['kind']} graph_opt={r['graph_opt']:8s} threads={r['threads']}: "
                      f"{r['img_s']:.1f} img/s (median {r['img_s_median']:.1f})")
        if ref is not None and not args.no_perf:
            extra["vnni"] = vnni_evidence(ref["int8"], args.threads)
            print(f"VNNI: {extra['vnni']}")
        files = {k: {kk: (str(vv) if isinstance(vv, Path) else vv) for kk, vv in v.items()} for k, v in built.items()}
    load1 = os.getloadavg()

    print("\n| model | GMACs | batch | eager img/s | ORT fp32 img/s | ORT INT8 img/s | INT8 / fp32 (median) | "
          "fp32 / eager | share of fp32 ceiling: eager / fp32 / INT8 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['model']} | {r['gmacs']:.2f} | {r['batch']} | {r['eager_img_s']:.1f} | {r['ort_fp32_img_s']:.1f} | "
              f"{r['ort_int8_img_s']:.1f} | {r['int8_over_fp32']:.2f}x ({r['int8_over_fp32_median']:.2f}x) | "
              f"{r['fp32_over_eager']:.2f}x | {r['eager_share_of_fp32_ceiling']:.0%} / "
              f"{r['ort_fp32_share_of_fp32_ceiling']:.0%} / {r['ort_int8_share_of_fp32_ceiling']:.0%} |")
    if skipped:
        print(f"not registered, skipped: {', '.join(skipped)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": "python benchmarks/quantize_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu": info, "threads": args.threads, "loadavg_start": load0, "loadavg_end": load1,
        "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start)), "wall_s": round(time.time() - t_start),
        "ceilings": ceil, "rows": rows, "models": files, "skipped": skipped, **extra,
    }, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
