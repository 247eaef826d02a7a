"""``simulate``: every site of one manifest on this machine, as real Flower server and client processes on
loopback (Flower's deployment engine; its Ray-based simulation engine is not used, see docs/federated.md).

Each site's rows are written to ``OUT/sites/NAME/manifest.csv`` (absolute image paths) and only that file is
given to the site's client process; the server process gets the recipe and nothing about the data.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

from covidcxr.federated.plan import FederatedError, Plan

log = logging.getLogger("covidcxr.federated")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def split_sites(manifest: str | os.PathLike, column: str, out: Path) -> dict[str, Path]:
    """One manifest per value of ``column`` (sites without training rows are left out with a warning)."""
    from covidcxr.data import read_manifest

    df = read_manifest(manifest, require_split=True)
    if column not in df.columns:
        raise FederatedError(f"{manifest}: no column {column!r} to split sites by (columns: {', '.join(df.columns)})")
    base = Path(manifest).resolve().parent
    for col in ("path", "mask_path"):
        if col in df.columns:
            df[col] = [p if not isinstance(p, str) or os.path.isabs(p) else str((base / p).resolve()) for p in df[col]]
    sites: dict[str, Path] = {}
    for value, part in df.groupby(df[column].astype(str)):
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", value).strip("-") or "site"
        if not (part["split"] == "train").any():
            log.warning("site %s: no training rows; left out", name)
            continue
        d = out / "sites" / name
        d.mkdir(parents=True, exist_ok=True)
        part.to_csv(d / "manifest.csv", index=False)
        sites[name] = d / "manifest.csv"
    if len(sites) < 2:
        raise FederatedError(f"{manifest}: {len(sites)} site(s) with training rows in column {column!r}; "
                             "federation needs at least 2")
    return sites


def _cli() -> list[str]:
    return [sys.executable, "-c", "import sys; from covidcxr.cli import main; sys.exit(main(sys.argv[1:]))"]


def simulate(plan_args: list[str], data: str | os.PathLike, site_column: str, out: str | os.PathLike, *,
             rounds: int, timeout: float = 24 * 3600, verbose: bool = False) -> dict[str, Any]:
    """Split ``data`` by ``site_column``, start ``covidcxr federated server`` (with ``plan_args``: --config,
    --strategy, ...) on a free loopback port and one ``covidcxr federated client`` per site; wait for the
    server to finish. Logs go to ``OUT/logs/``; each site's audit trail to ``OUT/sites/NAME/sent/``."""
    import json

    out = Path(out)
    sites = split_sites(data, site_column, out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    addr = f"127.0.0.1:{port}"
    v = ["-v"] if verbose else []
    server_cmd = [*_cli(), *v, "federated", "server", *plan_args, "--rounds", str(rounds), "--address", addr,
                  "--out", str(out), "--insecure", "--sites", str(len(sites)), "--overwrite"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log.info("simulating %d site(s) (%s) on %s; logs in %s", len(sites), ", ".join(sites), addr, logs)
    procs: dict[str, subprocess.Popen] = {}
    files = []
    try:
        fh = open(logs / "server.log", "w", encoding="utf-8")
        files.append(fh)
        server = subprocess.Popen(server_cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        # the sites give up on a server they cannot reach within a minute; on a loaded machine the server's
        # imports alone can take longer, so start them only once it listens
        _wait_listening(port, server, logs / "server.log", bound=min(timeout, 900.0))
        for name, manifest in sites.items():
            fh = open(logs / f"site-{name}.log", "w", encoding="utf-8")
            files.append(fh)
            procs[name] = subprocess.Popen(
                [*_cli(), *v, "federated", "client", "--data", str(manifest), "--server", addr, "--site", name,
                 "--insecure", "--audit-dir", str(manifest.parent / "sent")],
                stdout=fh, stderr=subprocess.STDOUT, env=env)
        shown = 0
        t0 = time.time()
        while server.poll() is None:  # echo the server's progress lines as they come
            shown = _echo(logs / "server.log", shown)
            if time.time() - t0 > timeout:
                raise FederatedError(f"simulation still running after {timeout:g} s; stopped")
            time.sleep(1.0)
        _echo(logs / "server.log", shown)
        if server.returncode != 0:
            raise FederatedError(f"the federated server failed (exit {server.returncode}); see {logs / 'server.log'}")
        for name, p in procs.items():  # the server's end disconnects every client
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                log.warning("site %s still running after the server ended; stopping it", name)
    finally:
        for p in [*procs.values(), *(locals().get("server") and [server] or [])]:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for fh in files:
            fh.close()
    return json.loads((out / "history.json").read_text(encoding="utf-8"))


def _wait_listening(port: int, server: subprocess.Popen, log_path: Path, bound: float) -> None:
    """Return once the server accepts TCP connections on loopback ``port``; FederatedError if it exits first
    or does not listen within ``bound`` seconds."""
    import socket

    t0 = time.time()
    while True:
        if server.poll() is not None:
            raise FederatedError(f"the federated server exited before it listened (exit {server.returncode}); "
                                 f"see {log_path}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            pass
        if time.time() - t0 > bound:
            raise FederatedError(f"the federated server did not listen on port {port} within {bound:g} s; "
                                 f"see {log_path}")
        time.sleep(0.2)


def _echo(path: Path, start: int) -> int:
    """Print the server log's new complete lines from byte ``start``; returns the new offset."""
    try:
        with open(path, "rb") as fh:
            fh.seek(start)
            chunk = fh.read()
    except OSError:
        return start
    end = chunk.rfind(b"\n") + 1
    if end:  # the coordinator's own lines (progress, drops, refusals), not Flower's or Lightning's
        lines = chunk[:end].decode("utf-8", "replace").splitlines(keepends=True)
        sys.stderr.write("".join(ln for ln in lines if " covidcxr.federated: " in ln))
        sys.stderr.flush()
    return start + end
