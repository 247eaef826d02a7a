"""Bounded load test of ``covidcxr serve`` on the loopback interface.

Starts the real server (uvicorn, in a subprocess, on 127.0.0.1 and a free port), then for each
concurrency level sends a fixed number of ``POST /v1/predict`` requests with real dev-set JPEGs,
``concurrency`` at a time, with a per-request timeout and a time limit per level (or, with ``--duration``,
requests for that many seconds, at most ``--requests``). Clients retry a 503 at once, without honouring
``Retry-After``: the harshest client. With a fixed count such clients burn the level's requests on 503s
within the first batch, so answered/s under overload is best measured with ``--duration``. Reports p50/p95
latency of the answered requests, counts per status code, other 5xx, timeouts and transport errors.

The server's limits decide what overload looks like: with ``--max-concurrency 2 --queue 8`` at most
10 requests are inside at once, so 16 concurrent clients must see some 503 + Retry-After answers
(by design), never a 500 and never a timeout. ``--queues`` runs the whole sweep once per queue size.

    .venv/bin/python benchmarks/service_load.py [--model CKPT] [--requests 64]
        [--concurrency 1 4 16] [--queues 8 32] [--max-concurrency 2] [--threads 1] [--time-limit 120]
        [--engines checkpoint onnx-fp32 onnx-int8] [--max-batches 1 8] [--max-wait-ms 10]
        [--duration 20] [--batch-threads 1 2] [--no-plausibility] [--out FILE.json]

``--engines`` serves the checkpoint, its fp32 ONNX export and/or its INT8 quantization; ``--max-batches 1 8``
compares unbatched (1) with micro-batching.

Same cores for inference in both modes: unbatched, ``--max-concurrency`` slots each run with ``--threads``
intra-op threads (2 x 1 = two cores busy); batched, one batch runs at a time, so its server gets
``--batch-threads`` intra-op threads (default: max-concurrency x threads; several values run one batched
server each). Giving the batched server ``--threads 1`` would leave it one core for inference where the
unbatched one has two; on a busy machine, though, a second intra-op thread may not pay (docs/benchmarks.md).

After the runs, each model file's offline throughput (``Predictor.probabilities`` on a preprocessed batch of
8, model only) is measured with ``--threads`` and with ``--batch-threads`` threads, and each row reports
answered/s as a fraction of the one with its own thread count (unbatched: x max-concurrency slots, at most
the concurrency). The server's log goes to a temporary file (an unread pipe would fill and wedge it).

Without --model a random-weight resnet18 checkpoint at 224 px is made (speed does not depend on
the weights). Prints a table and writes benchmarks/results/service_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _models import random_resnet18  # benchmarks/ is the script's folder: sys.path[0]

REPO = Path(__file__).resolve().parents[1]


def _shared_data() -> Path:
    """<shared>/data: COVIDCXR_SHARED names the shared folder (its data/ is accepted too), else ../shared."""
    from covidcxr.shared import data_dir

    return data_dir()

DEV = _shared_data() / "covid-cxr-dev" / "images"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def _onnx_models(ckpt: Path, workdir: Path) -> dict[str, Path]:
    """fp32 ONNX export of ``ckpt`` and its INT8 version (the export's own code; random weights: no gate)."""
    from covidcxr.export import _shared_dev_images, export_onnx
    from covidcxr.predict import Predictor, collect_inputs
    from covidcxr.quantize import quantize_file

    fp32 = workdir / "model.onnx"
    export_onnx(ckpt, fp32, parity_count=4)
    int8 = workdir / "model.int8.onnx"
    files = collect_inputs([_shared_dev_images()])[::28][:16]
    quantize_file(Predictor.from_path(fp32), int8, files)
    return {"onnx-fp32": fp32, "onnx-int8": int8}


def _offline_img_s(model: Path, batch: int, threads: int, seconds: float = 4.0) -> float:
    """Model-only images/s of the same file through Predictor (preprocessed input, no HTTP, no decode)."""
    import numpy as np

    from covidcxr.predict import Predictor

    p = Predictor.from_path(model, threads=threads)
    x = np.random.default_rng(0).standard_normal((batch, p.preset.channels, p.preset.size, p.preset.size),
                                                 dtype=np.float32)
    p.probabilities(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        p.probabilities(x)
        n += batch
    return n / (time.perf_counter() - t0)


def _start_server(model: Path, port: int, max_conc: int, queue: int, threads: int, queue_timeout: float,
                  max_batch: int = 1, max_wait_ms: float = 10.0, plausibility: bool = True):
    exe = Path(sys.executable).parent / "covidcxr"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "import sys; from covidcxr.cli import main; sys.exit(main())"]
    cmd += ["serve", "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
            "--max-concurrency", str(max_conc), "--queue", str(queue), "--threads", str(threads),
            "--queue-timeout", str(queue_timeout), "--log-level", "warning",
            "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms)]
    if not plausibility:
        cmd.append("--no-plausibility")
    env = {**os.environ, "COVIDCXR_API_KEY": ""}
    # The server's log goes to a file, never to a pipe nobody reads: it logs a line per request, and once a
    # pipe's 64 KiB buffer is full (~650 requests) every logging thread blocks and the server wedges.
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    proc.log = log  # closed with the process object
    import httpx

    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited: {log.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.25)
    proc.kill()
    raise RuntimeError("server did not answer /healthz within 120 s")


async def _level(url: str, images: list[tuple[str, bytes]], n: int, conc: int, timeout: float,
                 time_limit: float, duration: float | None = None) -> dict:
    import httpx

    results: list[tuple[str, float]] = []
    counter = iter(range(n))
    t_start = time.perf_counter()

    async def worker(client: httpx.AsyncClient) -> None:
        for i in counter:
            if duration is not None and time.perf_counter() - t_start > duration:
                break  # a timed level: no new request after `duration` seconds
            if time.perf_counter() - t_start > time_limit:
                results.append(("skipped", 0.0))
                continue
            name, data = images[i % len(images)]
            t0 = time.perf_counter()
            try:
                r = await client.post(url, files={"file": (name, data, "image/jpeg")}, timeout=timeout)
                results.append((str(r.status_code), time.perf_counter() - t0))
            except httpx.TimeoutException:
                results.append(("timeout", time.perf_counter() - t0))
            except httpx.HTTPError as err:
                results.append((f"error:{type(err).__name__}", time.perf_counter() - t0))

    limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
    async with httpx.AsyncClient(limits=limits) as client:
        await asyncio.gather(*[worker(client) for _ in range(conc)])
    wall = time.perf_counter() - t_start
    codes: dict[str, int] = {}
    for code, _ in results:
        codes[code] = codes.get(code, 0) + 1
    ok = [dt * 1000 for code, dt in results if code == "200"]
    busy = [dt * 1000 for code, dt in results if code == "503"]
    return {
        "concurrency": conc, "requests": len(results), "wall_s": round(wall, 2), "codes": codes,
        "ok": len(ok), "ok_per_s": round(len(ok) / wall, 2) if wall else None,
        "p50_ms": _pct(ok, 0.5), "p95_ms": _pct(ok, 0.95), "max_ms": max(ok) if ok else None,
        "busy_503": codes.get("503", 0), "busy_503_median_ms": statistics.median(busy) if busy else None,
        "other_5xx": sum(v for k, v in codes.items() if k.isdigit() and k.startswith("5") and k != "503"),
        "timeouts": codes.get("timeout", 0),
        "transport_errors": sum(v for k, v in codes.items() if k.startswith("error:")),
        "skipped_time_limit": codes.get("skipped", 0),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="checkpoint or ONNX (default: random-weight resnet18 at 224 px)")
    ap.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--queues", nargs="+", type=int, default=[8], help="server --queue values to sweep")
    ap.add_argument("--max-concurrency", type=int, default=2, help="server --max-concurrency")
    ap.add_argument("--threads", type=int, default=1, help="server intra-op threads per inference (unbatched)")
    ap.add_argument("--batch-threads", type=int, nargs="+", default=None,
                    help="server intra-op threads when batching, one server per value "
                         "(default: --max-concurrency x --threads)")
    ap.add_argument("--queue-timeout", type=float, default=30.0)
    ap.add_argument("--timeout", type=float, default=60.0, help="client timeout per request, seconds")
    ap.add_argument("--time-limit", type=float, default=120.0, help="seconds per level; later requests are skipped")
    ap.add_argument("--duration", type=float, default=None,
                    help="timed levels: clients send requests (at most --requests) for this many seconds, then stop; "
                         "the steady state then outweighs the first burst (503s retried at once end a fixed-count "
                         "level within one batch)")
    ap.add_argument("--images", type=int, default=8, help="distinct dev-set JPEGs to cycle through")
    ap.add_argument("--max-batches", nargs="+", type=int, default=[1], help="server --max-batch values (1: unbatched)")
    ap.add_argument("--max-wait-ms", type=float, default=10.0, help="server --max-wait-ms")
    ap.add_argument("--no-plausibility", action="store_true",
                    help="serve without the frontal-CXR check (its lung U-Net caches masks by image hash, so with "
                         "a few repeated JPEGs it costs little here, unlike traffic of new images)")
    ap.add_argument("--engines", nargs="+", default=["checkpoint"], choices=["checkpoint", "onnx-fp32", "onnx-int8"],
                    help="which model file the server loads (ONNX ones are made from the checkpoint)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "service_load.json")
    args = ap.parse_args(argv)
    batch_threads = args.batch_threads or [args.max_concurrency * args.threads]

    files = sorted(DEV.glob("*.jpg"))
    if not files:
        print(f"no dev-set images at {DEV} (set COVIDCXR_SHARED)", file=sys.stderr)
        return 1
    step = max(1, len(files) // args.images)
    images = [(f.name, f.read_bytes()) for f in files[::step][: args.images]]
    mean_kb = sum(len(b) for _, b in images) / len(images) / 1024

    runs = []
    offline: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.model or random_resnet18(Path(tmp))
        files = {"checkpoint": ckpt}
        if any(e != "checkpoint" for e in args.engines):
            files.update(_onnx_models(ckpt, Path(tmp)))
        configs = [(e, q, b, t) for e in args.engines for q in args.queues for b in args.max_batches
                   for t in ([args.threads] if b == 1 else batch_threads)]
        for engine, queue, max_batch, threads in configs:
            model = files[engine]
            port = _free_port()
            proc = _start_server(model, port, args.max_concurrency, queue, threads, args.queue_timeout,
                                 max_batch, args.max_wait_ms, plausibility=not args.no_plausibility)
            try:
                url = f"http://127.0.0.1:{port}/v1/predict"
                asyncio.run(_level(url, images, 4, 1, args.timeout, args.time_limit))  # warm-up
                print(f"server: {engine} --max-batch {max_batch} --max-concurrency {args.max_concurrency} --queue "
                      f"{queue} --threads {threads}; {len(images)} JPEGs, mean {mean_kb:.0f} KiB; "
                      f"load {os.getloadavg()[0]:.2f}", flush=True)
                for conc in args.concurrency:
                    r = asyncio.run(_level(url, images, args.requests, conc, args.timeout, args.time_limit,
                                           args.duration))
                    r.update({"engine": engine, "max_batch": max_batch, "queue": queue,
                              "plausibility": not args.no_plausibility,
                              "max_concurrency": args.max_concurrency, "threads": threads,
                              "loadavg": os.getloadavg()[0]})
                    runs.append(r)
                    print(f"  c={conc:3d}: {r['codes']}  p50 {r['p50_ms'] or 0:.0f} ms  p95 {r['p95_ms'] or 0:.0f} ms"
                          f"  {r['ok_per_s']} ok/s", flush=True)
                alive = proc.poll() is None
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
            if not alive:
                print("SERVER DIED during the run", file=sys.stderr)
                return 1
        for engine in args.engines:  # model-only throughput of the same file, batch 8
            for t in sorted({args.threads, *batch_threads}):
                offline[(engine, t)] = _offline_img_s(files[engine], 8, t)
                print(f"offline {engine}: {offline[(engine, t)]:.1f} img/s (batch 8, {t} thread(s), model only)",
                      flush=True)
    for r in runs:
        # what the same cores give offline: unbatched, max-concurrency slots of --threads; batched, batch-threads
        if r["max_batch"] == 1:
            ref = offline.get((r["engine"], args.threads), 0) * min(args.max_concurrency, r["concurrency"])
        else:
            ref = offline.get((r["engine"], r["threads"]), 0)
        r["offline_img_s"] = round(ref, 2) if ref else None
        r["ratio_to_offline"] = round(r["ok_per_s"] / ref, 3) if ref else None

    print()
    print("| model | max batch | threads | queue | concurrency | requests | 200 | 503 (busy) | other 5xx | timeouts | "
          "p50 ms | p95 ms | answered/s | / offline |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        print(f"| {r['engine']} | {r['max_batch']} | {r['threads']} | {r['queue']} | {r['concurrency']} | "
              f"{r['requests']} | {r['ok']} | "
              f"{r['busy_503']} | {r['other_5xx']} | {r['timeouts']} | {r['p50_ms'] or 0:.0f} | {r['p95_ms'] or 0:.0f} | "
              f"{r['ok_per_s']} | {r['ratio_to_offline']} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": "python benchmarks/service_load.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": str(args.model) if args.model else "random-weight resnet18, deepcovid preset, 224 px",
        "logical_cores": os.cpu_count(), "image_mean_kib": round(mean_kb, 1), "batch_threads": batch_threads,
        "offline_img_s": {f"{e} x{t} threads": round(v, 2) for (e, t), v in offline.items()},
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": runs,
    }, indent=2))
    print(f"wrote {args.out}")
    bad = sum(r["other_5xx"] + r["timeouts"] + r["transport_errors"] for r in runs)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
