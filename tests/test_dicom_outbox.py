"""The node's outbox (issue 21 §2.4): timed retries, dead letters with reasons, ``dicom status``, bounded
``seen.txt``, thread-safe counters, the port opening only after ``incoming/`` is queued, and the C-STORE
status rule shared by the sender and ``dicom send``.

The destination is a real pynetdicom storage SCP on loopback (:class:`covidcxr.testing.scp.StoreScp`)
that refuses or warns on command; no network code is mocked.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pydicom
import pytest

from covidcxr.cli import main
from covidcxr.dicom.common import AllowRule, Peer, instance_key
from covidcxr.dicom.store import ResultStore
from covidcxr.predict import file_sha256
from covidcxr.testing.scp import StoreScp, free_port, wait_for

from test_dicom_node_support import Scu, make_classifier, renamed, to_bytes, wrap_image


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_classifier(tmp_path_factory.mktemp("outbox-ckpt") / "tiny.ckpt")


def start_node(ckpt: Path, store: Path, port: int, dest_port: int, start: bool = True, **kw):
    from covidcxr.dicom.node import DicomNode, NodeConfig

    cfg = NodeConfig(model=str(ckpt), destination=Peer("PACS", "127.0.0.1", dest_port), host="127.0.0.1",
                     port=port, store=str(store), allow=[AllowRule("TESTSCU", "127.0.0.1")], plausibility=False,
                     **{"retry_max_s": 0.5, **kw})
    node = DicomNode(cfg)
    if start:
        node.start()
    return node


def two_results(store: ResultStore, key: str) -> None:
    """An outbox entry with two real DICOM files (secondary captures), as the node leaves them."""
    import numpy as np

    files = {}
    for name in ("sr", "sc"):
        files[name] = to_bytes(wrap_image(np.full((8, 8), 7, np.uint8)))
    store.put_results(key, files)


# --------------------------------------------------------------------------- the sender alone


def test_flush_reports_a_refusal_and_dead_letters_after_max_attempts(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    from covidcxr.dicom.sender import Sender

    store = ResultStore(tmp_path / "store")
    two_results(store, "k1")
    with StoreScp(always=0xA700) as pacs:
        sender = Sender(store, Peer("PACS", "127.0.0.1", pacs.port), "COVIDCXR", max_attempts=2)
        first = sender.flush()
        assert not first and first.refused == 1 and first.reachable  # a refusal is a failure, not a success
        assert store.outbox() == ["k1"] and not store.dead_letters() and store.refusals("k1") == 1
        # a restart (a new sender on the same store) does not reset the count: the second refusal is the last
        restarted = Sender(ResultStore(tmp_path / "store"), Peer("PACS", "127.0.0.1", pacs.port), "COVIDCXR",
                           max_attempts=2)
        second = restarted.flush()
        assert not second and second.dead_lettered == 1
    assert store.outbox() == [] and store.pending() == 0  # given up: no longer counts towards max_pending
    (dead,) = store.dead_letters()
    assert dead.key == "k1" and "refused 2 times" in dead.reason and "0xA700" in dead.reason
    assert set(dead.files) == {"sr.dcm", "sc.dcm"}  # the results are kept, for a person to look at
    assert main(["dicom", "status", "--store", str(tmp_path / "store")]) == 0
    out = capsys.readouterr().out
    assert "1 dead letters" in out and "dead letter k1" in out and "0xA700" in out


def test_warning_statuses_count_as_stored(tmp_path: Path) -> None:
    from covidcxr.dicom.sender import Sender

    store = ResultStore(tmp_path / "store")
    for key in ("a", "b", "c"):
        two_results(store, key)
    with StoreScp(always=0x0107) as pacs:  # "attribute list error": stored, with a warning
        res = Sender(store, Peer("PACS", "127.0.0.1", pacs.port), "COVIDCXR").flush()
    assert res and res.delivered == 3 and store.outbox() == []


def test_unreachable_destination_is_not_a_refusal(tmp_path: Path) -> None:
    from covidcxr.dicom.sender import Sender

    store = ResultStore(tmp_path / "store")
    two_results(store, "k")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
    try:
        sender = Sender(store, Peer("PACS", "127.0.0.1", s.getsockname()[1]), "COVIDCXR", max_attempts=1)
        for _ in range(3):
            res = sender.flush()
            assert not res and not res.reachable
    finally:
        s.close()
    assert store.outbox() == ["k"] and not store.dead_letters()  # waits; an outage never dead-letters


# --------------------------------------------------------------------------- the node


def test_result_refused_once_is_retried_on_a_timer(ckpt: Path, samples_dir: Path, tmp_path: Path) -> None:
    """The destination refuses each result once. Before: 1 association, then nothing until the next image."""
    with StoreScp(refuse_first=1) as pacs:
        node = start_node(ckpt, tmp_path / "store", 0, pacs.port)
        try:
            ds = renamed((samples_dir / "rsna-pneumonia-sample.dcm").read_bytes())
            assert Scu(node.port).store(ds) == [(0, "")]
            wait_for(lambda: len(pacs.stored) == 2, 120, "the SR and SC stored after a retry")
            wait_for(lambda: not node.store.outbox(), 30, "the outbox to empty")
            assert pacs.associations >= 2
            for uid in pacs.stored:
                assert pacs.statuses(uid) == [0xA700, 0x0000]
            assert not node.store.dead_letters()
        finally:
            node.stop(timeout_s=10)


def test_unbuildable_results_go_to_dead_letter_and_stop_counting(ckpt: Path, samples_dir: Path,
                                                                 tmp_path: Path) -> None:
    """A source without StudyInstanceUID, or with a non-integer InstanceNumber, can never get a result.
    Before: it stayed in incoming/ for ever and counted towards max_pending on every restart."""
    rsna = (samples_dir / "rsna-pneumonia-sample.dcm").read_bytes()
    no_study = renamed(rsna)
    del no_study.StudyInstanceUID
    bad_number = renamed(rsna)
    # written as raw bytes: pydicom refuses to set an IS it cannot parse, but a modality may send one
    tag = pydicom.tag.Tag("InstanceNumber")
    bad_number._dict[tag] = pydicom.dataelem.RawDataElement(tag, "IS", 4, b"1.5x", 0, False, True)
    sha = file_sha256(ckpt)
    store = ResultStore(tmp_path / "store")
    keys = []
    for ds in (no_study, bad_number):
        key = instance_key(str(ds.SOPInstanceUID), sha)
        assert store.claim(key)
        store.put_incoming(key, to_bytes(ds))  # acknowledged by an earlier run, as the handler leaves it
        keys.append(key)
    assert store.pending() == 2
    with StoreScp() as pacs:
        node = start_node(ckpt, tmp_path / "store", 0, pacs.port, max_pending=2)
        try:
            wait_for(lambda: len(node.store.dead_letters()) == 2, 120, "two dead letters")
            assert node.store.pending() == 0 and not list((tmp_path / "store" / "incoming").iterdir())
            reasons = {d.key: d for d in node.store.dead_letters()}
            assert set(reasons) == set(keys)
            for d in reasons.values():
                assert d.reason.startswith("no result could be built") and d.files == ("source.dcm",)
            assert node.stats.dead_lettered == 2
            # the node takes new images again (max_pending 2 would refuse them if the two still counted)
            good = renamed(rsna)
            assert Scu(node.port).store(good) == [(0, "")]
            wait_for(lambda: str(good.SOPInstanceUID) in {str(x.ReferencedSOPInstanceUID) for ds in
                                                          pacs.stored.values()
                                                          for x in ds.get("SourceImageSequence", [])},
                     120, "the good image's SC at the destination")
        finally:
            node.stop(timeout_s=10)


def test_port_opens_only_after_incoming_is_queued(ckpt: Path, samples_dir: Path, tmp_path: Path) -> None:
    ds = renamed((samples_dir / "rsna-pneumonia-sample.dcm").read_bytes())
    store = ResultStore(tmp_path / "store")
    key = instance_key(str(ds.SOPInstanceUID), file_sha256(ckpt))
    store.claim(key)
    store.put_incoming(key, to_bytes(ds))
    port = free_port()
    with StoreScp() as pacs:
        node = start_node(ckpt, tmp_path / "store", port, pacs.port, start=False)
        seen_open: list[bool] = []
        scan = node.store.pending_incoming

        def scan_and_probe() -> list[str]:
            with socket.socket() as probe:  # is anyone accepting on the node's port yet?
                seen_open.append(probe.connect_ex(("127.0.0.1", port)) == 0)
            return scan()

        node.store.pending_incoming = scan_and_probe  # type: ignore[method-assign]
        node.start()
        try:
            assert seen_open == [False]
            wait_for(lambda: len(pacs.stored) == 2, 120, "the waiting instance's results")
        finally:
            node.stop(timeout_s=10)


# --------------------------------------------------------------------------- the store and the counters


def test_seen_keys_are_bounded_and_the_newest_survive_a_restart(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "s", max_seen=10)
    keys = [f"k{i:03d}" for i in range(50)]
    for k in keys:
        assert store.claim(k)
    assert not store.seen("k000") and store.seen("k049")
    lines = (tmp_path / "s" / "seen.txt").read_text().split()
    assert len(lines) <= 20 and "k049" in lines
    again = ResultStore(tmp_path / "s", max_seen=10)
    assert [k for k in keys if again.seen(k)] == keys[-10:]
    assert len((tmp_path / "s" / "seen.txt").read_text().split()) == 10


def test_stats_counters_are_thread_safe() -> None:
    from covidcxr.dicom.node import Stats

    stats = Stats()
    threads = [threading.Thread(target=lambda: [stats.add("received") for _ in range(20000)]) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stats.received == 160000


# --------------------------------------------------------------------------- `dicom send` uses the same status rule


def test_send_command_counts_warning_statuses_as_stored(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import numpy as np

    files = []
    for i, _ in enumerate((0x0001, 0x0107, 0x0116)):
        p = tmp_path / f"w{i}.dcm"
        p.write_bytes(to_bytes(wrap_image(np.full((8, 8), i, np.uint8))))
        files.append(p)
    answers = {str(pydicom.dcmread(p).SOPInstanceUID): [s] for p, s in zip(files, (0x0001, 0x0107, 0x0116))}
    refused = tmp_path / "r.dcm"
    refused.write_bytes(to_bytes(wrap_image(np.full((8, 8), 9, np.uint8))))
    answers[str(pydicom.dcmread(refused).SOPInstanceUID)] = [0xA700]
    with StoreScp(answers=answers) as pacs:
        peer = f"PACS@127.0.0.1:{pacs.port}"
        assert main(["dicom", "send", peer, *map(str, files)]) == 0  # before: 0x0001/0x0107/0x0116 failed
        out = capsys.readouterr().out
        for p, code in zip(files, ("0x0001", "0x0107", "0x0116")):
            assert f"{p}: stored, warning {code}" in out
        assert main(["dicom", "send", peer, str(refused)]) == 2
        assert "status 0xA700" in capsys.readouterr().out
