"""The DICOM node against a real Orthanc: end to end, bad input, duplicates, a destination that is down.

Orthanc (Debian package ``orthanc``) is started on free loopback ports with a generated configuration
and stopped afterwards; every test here skips with the reason when it is not installed.
"""

from __future__ import annotations

import io
import json
import socket
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pydicom
import pytest

from covidcxr.cli import main
from covidcxr.dicom.common import AllowRule, Peer
from covidcxr.testing.orthanc import Orthanc, OrthancUnavailable, orthanc_binary
from covidcxr.dicom.sr import read_result

from test_dciodvfy import assert_valid, need_dciodvfy
from test_dicom_node_support import CLASSES, Scu, make_classifier, renamed, to_bytes, wrap_file, wrap_image

NOTICE = "RESEARCH USE ONLY — NOT FOR DIAGNOSIS"


def _need_orthanc() -> None:
    try:
        orthanc_binary()
    except OrthancUnavailable as err:
        pytest.skip(str(err))


# Every wait below is for a condition, bounded generously: CI runs this on 2 loaded cores (pytest -n 2).
def wait_for(cond: Callable[[], object], timeout: float = 120.0, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_classifier(tmp_path_factory.mktemp("dicom-ckpt") / "tiny.ckpt")


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory):
    _need_orthanc()
    with Orthanc(tmp_path_factory.mktemp("orthanc")) as o:
        yield o


def start_node(ckpt: Path, store: Path, destination: Peer, **kw):
    from covidcxr.dicom.node import DicomNode, NodeConfig

    cfg = NodeConfig(model=str(ckpt), destination=destination, host="127.0.0.1", port=0, store=str(store),
                     allow=[AllowRule("ORTHANC", "127.0.0.1"), AllowRule("TESTSCU", "127.0.0.1")], **kw)
    node = DicomNode(cfg)
    node.start()
    return node


@pytest.fixture(scope="module")
def node(ckpt: Path, pacs: Orthanc, tmp_path_factory: pytest.TempPathFactory):
    import os

    from conftest import WEIGHTS

    if (WEIGHTS / "README.md").is_file():  # the plausibility check's lung U-Net; without it records say 'unchecked'
        os.environ.setdefault("COVIDCXR_WEIGHTS_DIR", str(WEIGHTS))
    n = start_node(ckpt, tmp_path_factory.mktemp("store"), Peer("ORTHANC", "127.0.0.1", pacs.dicom_port))
    pacs.add_modality("covidcxr", "COVIDCXR", "127.0.0.1", n.port)
    yield n
    n.stop(timeout_s=20)


def results_for(pacs: Orthanc, sop_uid: str) -> dict[str, pydicom.Dataset]:
    """The SR and SC in Orthanc that reference ``sop_uid`` (read back through the REST API)."""
    out: dict[str, pydicom.Dataset] = {}
    for modality, key in (("SR", "sr"), ("OT", "sc")):
        for iid in pacs.instances_by_modality(modality):
            ds = pydicom.dcmread(io.BytesIO(pacs.file(iid)))
            refs = ([str(r.ReferencedSOPInstanceUID) for r in ds.get("SourceImageSequence", [])] if key == "sc"
                    else [str(r.ReferencedSOPInstanceUID) for s in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
                          for se in s.ReferencedSeriesSequence for r in se.ReferencedSOPSequence])
            if sop_uid in refs:
                out[key] = ds
    return out


def wait_results(pacs: Orthanc, sop_uid: str, timeout: float = 120.0) -> dict[str, pydicom.Dataset]:
    """Wait until both the SR and the SC for ``sop_uid`` are in Orthanc; return them."""
    def both() -> dict[str, pydicom.Dataset] | None:
        r = results_for(pacs, sop_uid)
        return r if len(r) == 2 else None

    return wait_for(both, timeout, "SR + SC in Orthanc")  # type: ignore[return-value]


def down_port() -> socket.socket:
    """A loopback port where nothing listens (connections are refused), held by a bound socket that is not
    listening, so that no other process (the other pytest worker, an ephemeral bind) takes it while the
    test needs the destination down; close it just before starting the test's PACS on that port."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    return s


# --------------------------------------------------------------------------- association and peers


def test_echo_and_only_allowed_peers(node) -> None:
    assert Scu(node.port).echo() == 0
    assert Scu(node.port, calling="STRANGER").echo() is None  # association rejected: not an allowed peer
    assert Scu(node.port, called="WRONGAE").echo() is None  # called AE title is checked
    assert main(["dicom", "echo", f"COVIDCXR@127.0.0.1:{node.port}", "--ae-title", "TESTSCU"]) == 0
    assert main(["dicom", "echo", f"COVIDCXR@127.0.0.1:{node.port}", "--ae-title", "STRANGER"]) == 1


# --------------------------------------------------------------------------- end to end


def test_orthanc_forwards_images_and_gets_sr_and_sc_back(node, pacs: Orthanc, ckpt: Path, samples_dir: Path,
                                                        dev_dir: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    need_dciodvfy()
    rsna = (samples_dir / "rsna-pneumonia-sample.dcm").read_bytes()
    wrapped = [wrap_file(samples_dir / "nih-00000001_000.png"),
               wrap_file(sorted((dev_dir / "images").glob("*.jpg"))[0])]
    files = {"rsna.dcm": rsna, **{f"wrapped{i}.dcm": to_bytes(ds) for i, ds in enumerate(wrapped)}}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    ids = [pacs.upload(data) for data in files.values()]
    sources = {name: pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True) for name, data in files.items()}

    pacs.store_to_modality("covidcxr", ids)  # Orthanc C-STOREs them to the node, as a routing rule would

    # what `covidcxr predict` says for the same files
    out = tmp_path / "preds.jsonl"
    assert main(["predict", *[str(tmp_path / n) for n in files], "--model", str(ckpt), "--out", str(out),
                 "--workers", "0", "-q"]) == 0
    cli = {Path(r["path"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    gate = node.engine.gate is not None  # the lung U-Net is in ../shared/weights

    for name, src in sources.items():
        uid = str(src.SOPInstanceUID)
        got = wait_results(pacs, uid, 180)
        sr, sc = got["sr"], got["sc"]
        # same study, new series, the right instance referenced
        assert sr.StudyInstanceUID == sc.StudyInstanceUID == src.StudyInstanceUID
        assert sr.SeriesInstanceUID != src.SeriesInstanceUID and sc.SeriesInstanceUID != src.SeriesInstanceUID
        res = read_result(sr)  # opens in highdicom
        assert res["referenced_sop_instance_uids"] == [uid]
        # the same label and probabilities as `covidcxr predict`, and the same plausibility verdict: all three
        # are frontal films, none is flagged (pinned: a flagged one would skip the comparison below)
        assert not cli[name].get("flag") and res["flag"] is None, (name, cli[name])
        if gate:
            assert cli[name]["plausibility"]["verdict"] == "frontal_cxr", (name, cli[name])
            assert res["texts"]["Input plausibility check"].startswith("frontal_cxr"), name
        assert res["label"] == cli[name]["label"] in CLASSES, name
        assert res["probabilities"].keys() == set(CLASSES)
        for c in CLASSES:
            assert res["probabilities"][c] == pytest.approx(cli[name]["probabilities"][c], abs=1e-6)  # float32 batching
        assert res["threshold"] == pytest.approx(0.4)
        assert NOTICE in res["notice"]
        assert res["algorithm"]["name"] == "tiny-dicom-test"
        from covidcxr.predict import file_sha256

        assert res["algorithm"]["version"] == node.engine.predictor.version  # every SR names model and version
        assert res["algorithm"]["sha256"] == file_sha256(ckpt)
        # patient attributes: those DICOM requires, nothing more
        assert sr.PatientID == src.PatientID and "PatientAge" not in sr and "PatientAge" not in sc
        # the secondary capture: RGB, the notice burned in (flagged as such), the red banner on top
        assert sc.BurnedInAnnotation == "YES" and sc.PhotometricInterpretation == "RGB"
        assert NOTICE in sc.ImageComments
        px = sc.pixel_array
        assert px.ndim == 3 and px.shape[2] == 3 and px.shape[1] == 512
        banner = px[2:8, :, :].reshape(-1, 3).mean(0)
        assert banner[0] > 120 and banner[1] < 80, banner  # mostly red: the notice banner
        # what the PACS holds passes dciodvfy (issue 21 §3)
        for kind, ds in (("sr", sr), ("sc", sc)):
            assert_valid(ds, tmp_path, f"{name}-{kind}")
    err = capsys.readouterr().err
    assert "Test^Wrapped" not in err and "TEST-0001" not in err


def test_compressed_transfer_syntaxes_are_accepted(node, pacs: Orthanc, samples_dir: Path) -> None:
    """RLE, JPEG 2000 and JPEG-LS lossless (12-bit data), as a modality or a PACS may send them."""
    from pydicom.pixels import get_encoder
    from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

    from covidcxr.io import decode

    rng = np.random.default_rng(1)
    base = (np.linspace(0, 4000, 256)[None, :] + rng.normal(0, 50, (256, 256))).clip(0, 4095).astype(np.uint16)
    sent = []
    # every encoder is required, not skipped: RLE is pydicom's own, JPEG 2000 comes with pylibjpeg-openjpeg (a
    # core dependency), JPEG-LS with pyjpegls (highdicom's dependency, in the dicom extra)
    for ts in (RLELossless, JPEG2000Lossless, JPEGLSLossless):
        enc = get_encoder(ts)
        assert enc.is_available, f"no {ts.name} encoder: {enc.missing_dependencies}"
        ds = wrap_image(base, sop_class="1.2.840.10008.5.1.4.1.1.1.1", modality="DX", BitsStored=12, HighBit=11)
        ds.compress(ts)
        assert decode(to_bytes(ds))[0].shape == (256, 256)
        assert Scu(node.port, syntaxes=(ts,)).store(ds) == [(0, "")], ts.name
        sent.append(ds)
    assert len(sent) == 3
    for ds in sent:
        assert read_result(wait_results(pacs, str(ds.SOPInstanceUID))["sr"])["referenced_sop_instance_uids"] == [
            str(ds.SOPInstanceUID)]


def test_send_command_stores_a_compressed_file(node, samples_dir: Path, capsys: pytest.CaptureFixture) -> None:
    sample = samples_dir / "rsna-pneumonia-sample.dcm"  # JPEG Baseline: sent as it is
    assert main(["dicom", "send", f"COVIDCXR@127.0.0.1:{node.port}", str(sample), "--ae-title", "TESTSCU"]) == 0
    assert f"{sample}: stored" in capsys.readouterr().out


# --------------------------------------------------------------------------- bad input


def test_bad_input_gets_failure_status_and_the_node_keeps_serving(node, pacs: Orthanc, samples_dir: Path,
                                                                  tmp_path: Path) -> None:
    rsna = (samples_dir / "rsna-pneumonia-sample.dcm").read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(to_bytes(renamed(rsna))[: len(rsna) * 2 // 3])
    no_pixels = renamed(rsna)
    del no_pixels.PixelData
    failed_before = node.stats.failed

    (st1, why1), (st2, why2) = Scu(node.port).store(truncated, no_pixels)
    assert st1 in (0xA900, 0xC000) and "truncated" in why1.lower(), (hex(st1 or 0), why1)
    assert st2 == 0xA900 and "no pixel data" in why2, (hex(st2 or 0), why2)
    assert node.stats.failed == failed_before + 2

    # still serving: echo, and a good image after the bad ones is analysed and its SR reaches Orthanc
    assert Scu(node.port).echo() == 0
    good = renamed(rsna)
    assert Scu(node.port).store(good) == [(0, "")]
    wait_results(pacs, str(good.SOPInstanceUID))


def test_non_chest_and_lateral_images_get_a_flagged_sr(node, pacs: Orthanc, samples_dir: Path) -> None:
    rsna = (samples_dir / "rsna-pneumonia-sample.dcm").read_bytes()
    lateral = renamed(rsna, ViewPosition="LL")
    hand = renamed(rsna, BodyPartExamined="HAND")
    assert Scu(node.port).store(lateral, hand) == [(0, ""), (0, "")]
    for ds, flag in ((lateral, "not_a_frontal_cxr"), (hand, "not_a_chest_xray")):
        got = wait_results(pacs, str(ds.SOPInstanceUID))
        res = read_result(got["sr"])
        assert res["flag"] == flag and res["label"] is None and res["probabilities"] == {}
        assert res["finding_code"] == ("373121007", "SCT") and NOTICE in res["notice"]  # SNOMED CT "Not Evaluated"
        assert res["not_assessed_reason"] == "not_frontal_cxr"
        assert "NOT ASSESSED" in got["sc"].ImageComments


def test_blank_image_fails_the_plausibility_check(node, pacs: Orthanc, weights_dir: Path) -> None:
    if node.engine.gate is None:
        pytest.skip(str(node.engine.plausibility_note))
    blank = wrap_image(np.full((512, 512), 40, np.uint8))
    assert Scu(node.port).store(blank) == [(0, "")]
    res = read_result(wait_results(pacs, str(blank.SOPInstanceUID))["sr"])
    assert res["flag"] == "not_a_frontal_cxr" and res["label"] is None, res
    assert "uniform" in res["texts"]["Reason the input was not assessed"]


# --------------------------------------------------------------------------- duplicates


def test_same_instance_twice_is_processed_once(node, pacs: Orthanc, samples_dir: Path) -> None:
    ds = renamed((samples_dir / "rsna-pneumonia-sample.dcm").read_bytes())
    wait_for(node.idle, what="node idle")  # work of earlier tests (e.g. `dicom send`) still counts otherwise
    analysed, dups = node.stats.analysed, node.stats.duplicates
    assert Scu(node.port).store(ds) == [(0, "")]
    wait_results(pacs, str(ds.SOPInstanceUID))
    wait_for(node.idle, what="node idle")
    assert Scu(node.port).store(ds, ds) == [(0, ""), (0, "")]  # answered success ...
    wait_for(node.idle, what="node idle")
    assert node.stats.analysed == analysed + 1  # ... but processed once
    assert node.stats.duplicates == dups + 2
    # and the PACS holds one SR for it
    srs = [i for i in pacs.instances_by_modality("SR")
           if str(ds.SOPInstanceUID) in pacs.get_bytes(f"/instances/{i}/file").decode("latin-1")]
    assert len(srs) == 1


# --------------------------------------------------------------------------- destination down


def test_destination_down_results_wait_on_disk_bounded_and_are_delivered(ckpt: Path, samples_dir: Path,
                                                                         tmp_path: Path) -> None:
    _need_orthanc()
    rsna = (samples_dir / "rsna-pneumonia-sample.dcm").read_bytes()
    held = down_port()
    port = held.getsockname()[1]
    store = tmp_path / "store"
    node = start_node(ckpt, store, Peer("ORTHANC", "127.0.0.1", port), max_pending=2, retry_max_s=0.5)
    try:
        a, b, c = (renamed(rsna) for _ in range(3))
        assert Scu(node.port).store(a, b) == [(0, ""), (0, "")]
        wait_for(lambda: len(list((store / "outbox").iterdir())) == 2, what="two results in the outbox")
        # it tried, the destination is down (the sender's attempt runs in its own thread: wait for it)
        wait_for(lambda: node.sender.failures >= 1, what="a failed delivery attempt")
        (status, why), = Scu(node.port).store(c)
        assert status == 0xA700 and "queue full" in why  # bounded: the PACS keeps it and retries later
        left = node.stop(timeout_s=10)
        assert left == 2  # nothing lost on the way out
    finally:
        node.stop(timeout_s=5) if node._server else None

    # the destination comes up; a restarted node (same store) delivers what waited
    held.close()
    with Orthanc(tmp_path / "orthanc2", dicom_port=port) as pacs2:
        node2 = start_node(ckpt, store, Peer("ORTHANC", "127.0.0.1", port), retry_max_s=0.5)
        try:
            wait_for(lambda: not list((store / "outbox").iterdir()), what="the outbox to empty")
            for ds in (a, b):
                assert len(results_for(pacs2, str(ds.SOPInstanceUID))) == 2
            # a duplicate of an instance handled before the restart is still recognised
            assert Scu(node2.port).store(a) == [(0, "")]
            assert node2.stats.duplicates == 1
        finally:
            node2.stop(timeout_s=10)


def test_destination_coming_back_is_retried_while_running(ckpt: Path, samples_dir: Path, tmp_path: Path) -> None:
    _need_orthanc()
    held = down_port()
    port = held.getsockname()[1]
    store = tmp_path / "store"
    node = start_node(ckpt, store, Peer("ORTHANC", "127.0.0.1", port), retry_max_s=0.5)
    try:
        ds = renamed((samples_dir / "rsna-pneumonia-sample.dcm").read_bytes())
        assert Scu(node.port).store(ds) == [(0, "")]
        wait_for(lambda: node.sender.failures >= 2, what="failed delivery attempts")
        held.close()
        with Orthanc(tmp_path / "orthanc3", dicom_port=port) as pacs3:
            wait_results(pacs3, str(ds.SOPInstanceUID))
            # the sender clears its outbox entry only after the PACS has acknowledged every result
            wait_for(lambda: not list((store / "outbox").iterdir()), what="the outbox to empty")
    finally:
        held.close()
        node.stop(timeout_s=10)


def test_images_acknowledged_before_a_crash_are_analysed_at_the_next_start(ckpt: Path, pacs: Orthanc,
                                                                            samples_dir: Path, tmp_path: Path) -> None:
    """What a killed node had answered 'success' for lies in STORE/incoming/; the next start does it."""
    from covidcxr.dicom.common import instance_key
    from covidcxr.dicom.store import ResultStore
    from covidcxr.predict import file_sha256

    ds = renamed((samples_dir / "rsna-pneumonia-sample.dcm").read_bytes())
    key = instance_key(str(ds.SOPInstanceUID), file_sha256(ckpt))
    store = ResultStore(tmp_path / "store")
    assert store.claim(key)
    store.put_incoming(key, to_bytes(ds))  # as the C-STORE handler leaves it before the crash
    node = start_node(ckpt, tmp_path / "store", Peer("ORTHANC", "127.0.0.1", pacs.dicom_port))
    try:
        wait_results(pacs, str(ds.SOPInstanceUID))
        wait_for(node.idle, what="node idle")
        assert not list((tmp_path / "store" / "incoming").glob("*.dcm"))
        assert Scu(node.port).store(ds) == [(0, "")] and node.stats.duplicates == 1  # still known after the restart
    finally:
        node.stop(timeout_s=10)


def test_outbox_listing_survives_a_result_sent_meanwhile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sender removes a delivered entry from its own thread while others list the outbox (the C-STORE
    handler's queue bound, ``idle()``): a folder gone between two looks raised FileNotFoundError, and the
    handler answered a good image with 'internal error'."""
    from covidcxr.dicom.store import ResultStore

    store = ResultStore(tmp_path / "store")
    store.put_results("a", {"sr": b"x", "sc": b"y"})
    store.put_results("b", {"sr": b"x", "sc": b"y"})
    real = Path.stat
    sent: list[str] = []

    def looked_at_then_sent(self: Path, **kw):
        st = real(self, **kw)
        if self.name == "a" and self.parent.name == "outbox" and not sent:
            sent.append(self.name)
            store.mark_sent("a")  # delivered right after the listing's first look at it
        return st

    monkeypatch.setattr(Path, "stat", looked_at_then_sent)
    assert "b" in store.outbox()
    assert sent
    monkeypatch.undo()
    assert store.outbox() == ["b"] and store.pending() == 1


# --------------------------------------------------------------------------- the command: SIGTERM drains, no PHI in logs


def test_listen_command_drains_on_sigterm_and_logs_no_patient_data(ckpt: Path, pacs: Orthanc, samples_dir: Path,
                                                                   tmp_path: Path) -> None:
    import os
    import re
    import signal
    import subprocess
    import sys
    import threading

    from test_dicom_node_support import PHI

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --port 0: the node binds a free port itself and prints it (a port picked here first could be taken
    # by another process before the child, still importing, binds it)
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from covidcxr.cli import main; sys.exit(main())", "-v", "dicom", "listen", "--model", str(ckpt), "--host", "127.0.0.1",
         "--port", "0", "--forward", f"ORTHANC@127.0.0.1:{pacs.dicom_port}", "--store", str(tmp_path / "s"),
         "--allow", "TESTSCU@127.0.0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def listening_port() -> int | None:
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", "".join(lines))
        return int(m.group(1)) if m else None

    try:
        wait_for(lambda: proc.poll() is not None or listening_port(), 180, "the listener to start")
        assert proc.poll() is None, "".join(lines)
        port = listening_port()
        assert Scu(port).echo() == 0
        ds = renamed((samples_dir / "rsna-pneumonia-sample.dcm").read_bytes(), **PHI, PatientAge="061Y")
        assert Scu(port).store(ds) == [(0, "")]
        proc.send_signal(signal.SIGTERM)  # at once: the image is still in flight
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        reader.join(timeout=30)
    out = "".join(lines)
    assert proc.returncode == 0, out
    assert "draining" in out and "1 images analysed, 1 results sent" in out, out
    assert len(results_for(pacs, str(ds.SOPInstanceUID))) == 2  # drained: delivered before exit
    for secret in [*PHI.values(), "Doe", str(ds.SOPInstanceUID), str(ds.StudyInstanceUID)]:
        assert secret not in out, f"{secret!r} reached the log"


# --------------------------------------------------------------------------- an ONNX model never needs torch


TORCH_BLOCKER = """
import sys
class _NoTorch:  # as on an install without torch: importing it fails
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not installed (blocked by the test)")
sys.meta_path.insert(0, _NoTorch())
from covidcxr.cli import main
code = main()
print("TORCH_IMPORTED", "torch" in sys.modules, flush=True)
sys.exit(code)
"""


def test_listen_with_threads_and_an_onnx_model_never_imports_torch(ckpt: Path, samples_dir: Path,
                                                                   tmp_path: Path) -> None:
    """Before: `dicom listen --threads N` imported torch after the port was open, and on a torch-free install
    the node died without draining."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import threading

    from covidcxr.testing.scp import StoreScp

    onnx = tmp_path / "tiny.onnx"
    assert main(["export", "--model", str(ckpt), "--onnx", str(onnx), "--parity-images",
                 str(samples_dir / "nih-00000001_000.png")]) == 0
    with StoreScp(ae_title="PACS") as pacs:
        proc = subprocess.Popen(
            [sys.executable, "-c", TORCH_BLOCKER, "dicom", "listen", "--model", str(onnx), "--threads", "2",
             "--no-plausibility", "--host", "127.0.0.1", "--port", "0", "--forward", f"PACS@127.0.0.1:{pacs.port}",
             "--store", str(tmp_path / "s"), "--allow", "TESTSCU@127.0.0.1"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
        reader.start()

        def listening_port() -> int | None:
            m = re.search(r"listening on 127\.0\.0\.1:(\d+)", "".join(lines))
            return int(m.group(1)) if m else None

        try:
            wait_for(lambda: proc.poll() is not None or listening_port(), 180, "the listener to start")
            assert proc.poll() is None, "".join(lines)
            port = listening_port()
            ds = renamed((samples_dir / "rsna-pneumonia-sample.dcm").read_bytes())
            assert Scu(port).store(ds) == [(0, "")]
            wait_for(lambda: len(pacs.stored) == 2, 120, "the SR and SC at the destination")
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
            reader.join(timeout=30)
    out = "".join(lines)
    assert proc.returncode == 0, out
    assert "TORCH_IMPORTED False" in out and "ImportError" not in out, out
    assert "1 images analysed, 1 results sent" in out, out
