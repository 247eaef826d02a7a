"""schemathesis (a validator nobody here wrote) against the service's OpenAPI schema, on a real uvicorn.

Issue 21 §3: with ``--checks all`` it must find no 5xx other than 503, no response that violates the schema,
and no hang; bounded in examples and time, on loopback, with a tiny random-weight model. Run once without an
API key and once with one, since the schema differs (security and 401 are declared only with a key).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")
torch = pytest.importorskip("torch")

CONFIG = Path(__file__).with_name("schemathesis.toml")
KEY = "st-key-0123456789"


def _st() -> str:
    exe = Path(sys.executable).with_name("st")
    return str(exe) if exe.exists() else (shutil.which("st") or "st")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from covidcxr import models
    from covidcxr.preprocess import get_preset

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("schemathesis") / "tiny.ckpt"
    models.save(path, models.build("resnet18", num_classes=3), arch="resnet18",
                classes=["normal", "pneumonia", "COVID-19"], preset=get_preset("deepcovid", size=64), threshold=0.4)
    return path


def _serve(app):
    """uvicorn in a thread on a socket bound here (a free port picked and bound by us, not raced for)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=sock.getsockname()[1], log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start within 120 s")
        time.sleep(0.05)
    return srv, thread, sock


@pytest.mark.parametrize("api_key", ["", KEY], ids=["no-key", "with-key"])
def test_schemathesis_finds_nothing(tiny_ckpt: Path, api_key: str, tmp_path: Path) -> None:
    from covidcxr.serve import create_app

    app = create_app(tiny_ckpt, api_key=api_key, plausibility=False, max_upload_mb=2.0)
    srv, thread, sock = _serve(app)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    cmd = [_st(), "--config-file", str(CONFIG), "run", f"{url}/openapi.json", "--checks", "all",
           "--max-examples", "8", "--max-time", "45", "--request-timeout", "30", "--seed", "21",
           "--workers", "1", "--no-color", "--wait-for-schema", "30"]
    if api_key:
        cmd += ["-H", f"X-API-Key: {api_key}"]
    try:
        # bounded: --max-time 45 for the fuzzing, 30 s per request; 300 s for the whole run catches a hang
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
        sock.close()
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    assert "Operations:       3 selected / 3 total" in out, out[-3000:]
    assert "No issues found" in out or "passed" in out, out[-3000:]
