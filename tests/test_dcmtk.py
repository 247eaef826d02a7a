"""A real DICOM client and server that nobody here wrote (issue 21 §3): DCMTK against ``covidcxr dicom listen``.

* ``echoscu`` is answered;
* ``storescu -xy`` of the RSNA sample (JPEG baseline) gets the SR and the SC back at a DCMTK ``storescp``,
  and both pass ``dciodvfy``;
* an unknown calling AE title is rejected.

Every process runs on free loopback ports and is stopped afterwards; every wait is for a condition,
with a generous bound. DCMTK is the Debian package ``dcmtk`` (.ci/run installs it; a failed install
fails CI); without it these tests skip with the reason.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pydicom
import pytest

from covidcxr.dicom.sr import read_result
from covidcxr.testing.scp import free_port, wait_for

from test_dciodvfy import assert_valid, need_dciodvfy
from test_dicom_node_support import make_classifier

TOOLS = ("echoscu", "storescu", "storescp")


def need_dcmtk() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"DCMTK not installed ({', '.join(missing)} missing; Debian: apt-get install dcmtk; "
                    ".ci/run installs it)")


class Proc:
    """A child process whose output is collected by a thread (so that its pipe never fills up)."""

    def __init__(self, args: list[str], **kw: object) -> None:
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True, **kw)  # type: ignore[call-overload]
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    @property
    def out(self) -> str:
        return "".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._reader.join(timeout=30)
        return int(self.proc.returncode)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    """storescp (the PACS) and `covidcxr dicom listen` forwarding to it; both stopped at the end."""
    need_dcmtk()
    root = tmp_path_factory.mktemp("dcmtk")
    ckpt = make_classifier(root / "tiny.ckpt")
    received = root / "received"
    received.mkdir()
    scp_port = free_port()
    scp = Proc(["storescp", "-aet", "DCMTKPACS", "-od", str(received), "+xa", str(scp_port)])
    node = None
    try:
        # storescp is ready once it accepts a C-ECHO
        wait_for(lambda: scp.proc.poll() is not None or _run(["echoscu", "-aec", "DCMTKPACS", "127.0.0.1",
                                                               str(scp_port)]).returncode == 0,
                 60, "storescp to answer")
        assert scp.proc.poll() is None, scp.out
        node = Proc([sys.executable, "-c", "import sys; from covidcxr.cli import main; sys.exit(main())", "-v",
                     "dicom", "listen", "--model", str(ckpt), "--host", "127.0.0.1", "--port", "0",
                     "--forward", f"DCMTKPACS@127.0.0.1:{scp_port}", "--store", str(root / "store"),
                     "--allow", "DCMTKSCU@127.0.0.1", "--no-plausibility"],
                    env={**os.environ, "OMP_NUM_THREADS": "1"})

        def port() -> int | None:
            m = re.search(r"listening on 127\.0\.0\.1:(\d+)", node.out)
            return int(m.group(1)) if m else None

        wait_for(lambda: node.proc.poll() is not None or port(), 180, "the node to listen")
        assert node.proc.poll() is None, node.out
        yield {"node": node, "port": port(), "received": received, "scp": scp}
    finally:
        if node is not None:
            assert node.stop() == 0, node.out  # SIGTERM drains and exits 0
        scp.stop()


def _run(args: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def test_echoscu_is_answered(setup: dict) -> None:
    r = _run(["echoscu", "-v", "-aet", "DCMTKSCU", "-aec", "COVIDCXR", "127.0.0.1", str(setup["port"])])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Received Echo Response (Success)" in r.stdout + r.stderr


def test_unknown_calling_ae_is_rejected(setup: dict) -> None:
    r = _run(["echoscu", "-v", "-aet", "STRANGER", "-aec", "COVIDCXR", "127.0.0.1", str(setup["port"])])
    text = r.stdout + r.stderr
    assert r.returncode != 0 and "Association Rejected" in text, text
    assert "Calling AE Title Not Recognized" in text, text
    wait_for(lambda: "calling AE 'STRANGER'" in setup["node"].out, 30, "the node to log the refusal")


def test_storescu_jpeg_sample_gets_sr_and_sc_back_at_storescp(setup: dict, samples_dir: Path) -> None:
    need_dciodvfy()
    sample = samples_dir / "rsna-pneumonia-sample.dcm"
    src = pydicom.dcmread(sample, stop_before_pixels=True)
    r = _run(["storescu", "-xy", "-aet", "DCMTKSCU", "-aec", "COVIDCXR", "127.0.0.1", str(setup["port"]), str(sample)])
    assert r.returncode == 0, r.stdout + r.stderr
    received: Path = setup["received"]

    def both() -> dict[str, Path] | None:
        got: dict[str, Path] = {}
        for f in received.iterdir():
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True)
            except Exception:  # storescp may still be writing it
                continue
            if ds.get("StudyInstanceUID") == src.StudyInstanceUID:
                got["sr" if ds.Modality == "SR" else "sc"] = f
        return got if len(got) == 2 else None

    files = wait_for(both, 180, "the SR and SC at storescp")
    sr, sc = pydicom.dcmread(files["sr"]), pydicom.dcmread(files["sc"])
    res = read_result(sr)
    assert res["referenced_sop_instance_uids"] == [str(src.SOPInstanceUID)]
    assert res["label"] in ("normal", "pneumonia", "COVID-19") and res["notice"].startswith("RESEARCH USE ONLY")
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert sc.BurnedInAnnotation == "YES"
    for kind, path in files.items():  # the files exactly as DCMTK received them
        assert_valid(path, path.parent)
