"""A throwaway Orthanc (Debian package ``orthanc``) on free loopback ports, for tests, benchmarks and trials.

::

    with Orthanc(tmp_dir) as pacs:                      # generated JSON configuration, storage in tmp_dir
        pacs.add_modality("covidcxr", "COVIDCXR", "127.0.0.1", 11112)
        iid = pacs.upload(Path("x.dcm").read_bytes())
        pacs.store_to_modality("covidcxr", [iid])       # Orthanc C-STOREs it to the node

Loopback only, no authentication; never point a real PACS configuration at this.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any


class OrthancUnavailable(RuntimeError):
    """The Orthanc binary is not installed (``apt-get install orthanc``)."""


class _ExitedAtStart(RuntimeError):
    """Orthanc stopped before answering (e.g. a port already in use)."""


def orthanc_binary() -> str:
    """Path of the Orthanc executable, or OrthancUnavailable saying how to get it."""
    found = shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")
                                             if os.access(p, os.X_OK)), None)
    if not found:
        raise OrthancUnavailable("Orthanc is not installed (Debian: apt-get install orthanc; .ci/run installs it)")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Orthanc:
    def __init__(self, workdir: str | os.PathLike, aet: str = "ORTHANC", dicom_port: int | None = None,
                 http_port: int | None = None) -> None:
        self.binary = orthanc_binary()
        self.workdir = Path(workdir)
        self.aet = aet
        self.name = f"covidcxr-test-pacs-{uuid.uuid4().hex[:8]}"  # tells this Orthanc from another on the port
        self._free_ports = (dicom_port is None, http_port is None)
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or self._other_free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "orthanc.log"

    def _other_free_port(self) -> int:
        port = free_port()
        while port == self.dicom_port:
            port = free_port()
        return port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def config(self) -> dict[str, Any]:
        db = str(self.workdir / "db")
        return {
            "Name": self.name,
            "StorageDirectory": db,
            "IndexDirectory": db,
            "HttpPort": self.http_port,
            "HttpBindAddress": "127.0.0.1",
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "DicomCheckCalledAet": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomModalities": {},
            "DicomModalitiesInDatabase": False,
            "Plugins": [],
            "StableAge": 1,
            "DicomScuTimeout": 30,
            "DicomScpTimeout": 30,
            "ConcurrentJobs": 2,
            "KeepAlive": True,
            "StorageCompression": False,
            "HttpsVerifyPeers": False,
        }

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout_s: float = 60.0, attempts: int = 3) -> "Orthanc":
        for attempt in range(attempts):
            try:
                return self._start(timeout_s)
            except _ExitedAtStart:
                # a port picked by free_port() can be taken by another process before Orthanc binds it:
                # pick the free ones again (a port the caller named is kept: then the error stands)
                if attempt == attempts - 1 or not any(self._free_ports):
                    raise
                if self._free_ports[0]:
                    self.dicom_port = free_port()
                if self._free_ports[1]:
                    self.http_port = self._other_free_port()
        raise AssertionError("unreachable")

    def _start(self, timeout_s: float) -> "Orthanc":
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(self.config(), indent=1))
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([self.binary, str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                                     cwd=self.workdir, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise _ExitedAtStart(f"Orthanc exited at start (code {self.proc.returncode}); see {self.log_path}")
            if self._answers():
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer on {self.url} within {timeout_s:.0f} s; see {self.log_path}")

    def _answers(self) -> bool:
        """True once this Orthanc (not another server that took the port) answers on its REST port."""
        try:
            with urllib.request.urlopen(self.url + "/system", timeout=5) as resp:
                return json.loads(resp.read()).get("Name") == self.name
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def __enter__(self) -> "Orthanc":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ REST
    def _request(self, method: str, path: str, body: bytes | None = None, ctype: str = "application/json") -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", ctype)
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.read()

    def get(self, path: str) -> Any:
        return json.loads(self._request("GET", path))

    def get_bytes(self, path: str) -> bytes:
        return self._request("GET", path)

    def post(self, path: str, payload: Any) -> Any:
        raw = self._request("POST", path, json.dumps(payload).encode())
        return json.loads(raw) if raw.strip() else None

    def upload(self, data: bytes) -> str:
        """Store one DICOM instance (REST, not DICOM); returns Orthanc's instance id."""
        return json.loads(self._request("POST", "/instances", data, "application/dicom"))["ID"]

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        self._request("PUT", f"/modalities/{name}", json.dumps({"AET": aet, "Host": host, "Port": port}).encode())

    def store_to_modality(self, name: str, instance_ids: list[str], synchronous: bool = True) -> Any:
        """Have Orthanc C-STORE the instances to a modality (what a PACS routing rule does)."""
        return self.post(f"/modalities/{name}/store", {"Resources": instance_ids, "Synchronous": synchronous})

    def instances(self) -> list[str]:
        return list(self.get("/instances"))

    def tags(self, instance_id: str) -> dict[str, Any]:
        return self.get(f"/instances/{instance_id}/simplified-tags")

    def file(self, instance_id: str) -> bytes:
        return self.get_bytes(f"/instances/{instance_id}/file")

    def instances_by_modality(self, modality: str) -> list[str]:
        """Instance ids whose Modality is ``modality`` (e.g. SR), via /tools/find."""
        series = self.post("/tools/find", {"Level": "Series", "Query": {"Modality": modality}})
        return [iid for sid in series for iid in self.get(f"/series/{sid}")["Instances"]]
