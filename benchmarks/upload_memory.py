"""Server memory under many concurrent large uploads (issue 21 §2.8: admit first, then read the body).

Starts the real ``covidcxr serve`` (uvicorn subprocess, 127.0.0.1, a free port) with a random-weight resnet18
and the default limits (``--max-batch 8 --queue 8``: 16 requests inside at most, 20 MB upload limit), then
sends ``--clients`` concurrent ``POST /v1/predict`` uploads of ``--mb`` MB each (random bytes behind a PNG
signature: admitted ones are read whole and refused with 422 by the decoder, the rest get 503). Reports the
server's resident memory before the burst (VmRSS) and its peak over the process's life (VmHWM, from
/proc/PID/status, Linux only), and the status codes.

    .venv/bin/python benchmarks/upload_memory.py [--clients 64] [--mb 19.9] [--src DIR]

``--src DIR`` serves the ``covidcxr`` package found in ``DIR/src`` instead (e.g. a ``git worktree`` of an older
commit), to compare before and after on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _models import random_resnet18  # noqa: E402
from service_load import _free_port, _start_server  # noqa: E402


def _mem_mb(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(rest.split()[0]) / 1024  # kB -> MiB
    return fields


async def _burst(url: str, payload: bytes, clients: int, timeout: float) -> collections.Counter:
    import httpx

    async def one(client: httpx.AsyncClient) -> str:
        try:
            r = await client.post(url, files={"file": ("big.png", payload, "image/png")})
            return str(r.status_code)
        except httpx.TimeoutException:
            return "timeout"
        except httpx.HTTPError as err:
            return type(err).__name__

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        return collections.Counter(await asyncio.gather(*(one(client) for _ in range(clients))))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--mb", type=float, default=19.9, help="upload size in MB (the limit is 20)")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--src", type=Path, default=None, help="serve the covidcxr package in SRC/src instead")
    args = ap.parse_args(argv)
    if args.src is not None:
        os.environ["PYTHONPATH"] = str(args.src.resolve() / "src")
    payload = b"\x89PNG\r\n\x1a\n" + os.urandom(int(args.mb * 1e6) - 8)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = random_resnet18(Path(tmp))
        port = _free_port()
        proc = _start_server(ckpt, port, 2, 8, 1, 30.0, max_batch=8, plausibility=False)
        try:
            before = _mem_mb(proc.pid)
            t0 = time.perf_counter()
            counts = asyncio.run(_burst(f"http://127.0.0.1:{port}/v1/predict", payload, args.clients, args.timeout))
            wall = time.perf_counter() - t0
            after = _mem_mb(proc.pid)
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"server code: {args.src or 'this checkout'}; {args.clients} concurrent uploads of {args.mb:g} MB "
          f"in {wall:.1f} s; status codes {dict(sorted(counts.items()))}")
    print(f"server RSS before {before['VmRSS']:.0f} MiB, peak {after['VmHWM']:.0f} MiB "
          f"(+{after['VmHWM'] - before['VmRSS']:.0f} MiB), after {after['VmRSS']:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
