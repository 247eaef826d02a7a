"""``covidcxr dicom listen``: a DICOM node (pynetdicom) a PACS sends chest X-rays to.

For each accepted C-STORE the node

1. checks the instance in the association thread (header, pixel data decoded by :func:`covidcxr.io.decode`,
   size checked before decoding) and answers a failure status with a reason when it cannot be read,
2. answers success for an instance it has already taken in (same SOP Instance UID, same model) without
   doing it again,
3. writes the instance to ``STORE/incoming/`` and answers success (or "out of resources" when
   ``max_pending`` results already wait, so the PACS keeps it and retries),
4. in a worker thread: predicts (operating point, severity, plausibility), builds the SR and the
   secondary capture, and moves them into ``STORE/outbox/``,
5. the :class:`~covidcxr.dicom.sender.Sender` C-STOREs them to the destination, retrying on a timer while
   it is down or refusing; a result refused ``max_attempts`` times, or one that cannot be built (e.g. a
   source without StudyInstanceUID), goes to ``STORE/dead-letter/`` with its reason
   (``covidcxr dicom status`` lists them).

The port opens only after the work left in ``STORE/incoming/`` by an earlier run has been queued.

:meth:`DicomNode.stop` drains: no new associations, running ones finish, queued images are analysed,
and the sender makes one last attempt; undelivered results stay on disk for the next start.
Log lines name instances by key (a hash of the SOP Instance UID), never by UID or patient attribute.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from covidcxr.dicom.analysis import Engine
from covidcxr.dicom.common import (
    ACCEPTED_SOP_CLASSES,
    MANUFACTURER,
    AllowRule,
    DicomNodeError,
    Peer,
    decodable_transfer_syntaxes,
    instance_key,
    quiet_dicom_libraries,
    safe_reason,
)
from covidcxr.dicom.results import build_results, read_header, to_bytes
from covidcxr.dicom.sender import Sender
from covidcxr.dicom.store import ResultStore

log = logging.getLogger("covidcxr.dicom")

# C-STORE statuses (PS3.4 B.2.3)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
NOT_AUTHORIZED = 0x0124


@dataclass
class NodeConfig:
    model: str
    destination: Peer
    ae_title: str = "COVIDCXR"
    host: str = "0.0.0.0"
    port: int = 11112
    store: str = "covidcxr-dicom-store"
    severity: str | None = None
    always_severity: bool = False
    plausibility: bool = True
    label_implausible: bool = False
    backend: str | None = None
    threads: int | None = None
    #: who may send; empty means: only the destination's AE title from the destination's host
    allow: list[AllowRule] = field(default_factory=list)
    allow_any: bool = False
    workers: int = 1
    max_pending: int = 500
    retry_max_s: float = 60.0
    #: refusals (failure statuses) of one result before it goes to dead-letter
    max_attempts: int = 5
    keep_sent: bool = False
    max_associations: int = 8


@dataclass
class Stats:
    """Counters, raised from the association threads and the workers: use :meth:`add`."""

    received: int = 0
    duplicates: int = 0
    refused: int = 0
    failed: int = 0  # answered with a failure status
    analysed: int = 0
    flagged: int = 0
    errors: int = 0  # analysis crashed (an error SR is still sent)
    dead_lettered: int = 0  # no result could be built: the instance went to dead-letter
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str, n: int = 1) -> None:
        """``+=`` is not atomic across threads; this is."""
        with self._lock:
            setattr(self, name, getattr(self, name) + n)


class DicomNode:
    """The listener. ``start()`` returns once the port is open; ``stop()`` drains."""

    def __init__(self, config: NodeConfig, engine: Engine | None = None) -> None:
        quiet_dicom_libraries()
        self.config = c = config
        self.engine = engine or Engine.from_paths(c.model, severity=c.severity, backend=c.backend,
                                                  always_severity=c.always_severity, threads=c.threads,
                                                  plausibility=c.plausibility, label_implausible=c.label_implausible)
        self.store = ResultStore(c.store, keep_sent=c.keep_sent)
        self.sender = Sender(self.store, c.destination, c.ae_title, retry_max_s=c.retry_max_s,
                             max_attempts=c.max_attempts)
        self.rules = list(c.allow) or [AllowRule(c.destination.ae_title, _resolve(c.destination.host))]
        self.stats = Stats()
        self._queue: queue.Queue[tuple[str, np.ndarray | None] | None] = queue.Queue()
        self._workers: list[threading.Thread] = []
        self._busy = 0
        self._busy_lock = threading.Lock()
        self._server: Any = None
        self._stopped = False
        self._port = c.port
        self.ae = AE(ae_title=c.ae_title)
        self.ae.maximum_associations = c.max_associations
        self.ae.require_called_aet = True
        self.transfer_syntaxes = decodable_transfer_syntaxes()
        self.ae.add_supported_context(Verification)
        for sop in ACCEPTED_SOP_CLASSES:
            self.ae.add_supported_context(sop, self.transfer_syntaxes)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        c = self.config
        handlers = [(evt.EVT_REQUESTED, self._on_requested), (evt.EVT_C_ECHO, self._on_echo),
                    (evt.EVT_C_STORE, self._on_store)]
        # work acknowledged before a crash or a stop is queued before the port opens: an instance that
        # arrives now must not be taken for (or race with) one waiting on disk
        for key in self.store.pending_incoming():
            self._queue.put((key, None))
        for i in range(max(1, c.workers)):
            t = threading.Thread(target=self._work, name=f"covidcxr-dicom-worker-{i}", daemon=True)
            t.start()
            self._workers.append(t)
        self.sender.start()
        if self.store.outbox():
            self.sender.notify()
        try:
            self._server = self.ae.start_server((c.host, c.port), block=False, evt_handlers=handlers)
        except OSError as err:
            self._stop_workers(time.monotonic() + 5)
            self.sender.stop(flush_timeout_s=1)
            raise DicomNodeError(f"cannot listen on {c.host}:{c.port} ({err.strerror or err})") from None
        self._port = int(self._server.server_address[1])
        log.info("listening as %s on %s:%d; results go to %s; store %s; allowed peers: %s", c.ae_title, c.host,
                 self.port, c.destination, self.store.root,
                 "any" if c.allow_any else ", ".join(str(r) for r in self.rules))

    @property
    def port(self) -> int:
        return self._port

    def stop(self, timeout_s: float = 60.0) -> int:
        """Drain and stop; returns the number of results left on disk for the next start."""
        if self._stopped:
            return len(self.store.outbox())
        self._stopped = True
        deadline = time.monotonic() + timeout_s
        if self._server is not None:
            self._server.shutdown()  # no new associations; running ones go on
            self._server = None
        while self.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in self.ae.active_associations:
            assoc.abort()
        self._stop_workers(deadline)
        left = self.sender.stop(flush_timeout_s=max(1.0, min(10.0, deadline - time.monotonic())))
        log.info("stopped: %d received, %d analysed (%d flagged), %d duplicates, %d failed, %d refused; "
                 "%d results sent, %d left in %s, %d in %s", self.stats.received, self.stats.analysed,
                 self.stats.flagged, self.stats.duplicates, self.stats.failed, self.stats.refused, self.sender.sent,
                 left, self.store.root / "outbox", len(self.store.dead_letters()), self.store.root / "dead-letter")
        return left

    def _stop_workers(self, deadline: float) -> None:
        for _ in self._workers:
            self._queue.put(None)
        for t in self._workers:
            t.join(timeout=max(1.0, deadline - time.monotonic()))
        self._workers = []

    def idle(self) -> bool:
        """Nothing queued, analysed or waiting to be sent (tests and benchmarks wait for this)."""
        return self._queue.unfinished_tasks == 0 and not self.store.outbox()

    # ------------------------------------------------------------------ handlers
    def _on_requested(self, event: Any) -> None:
        if self.config.allow_any:
            return
        rq = event.assoc.requestor
        calling = str(rq.primitive.calling_ae_title).strip()
        address = str(rq.address)
        if not any(rule.matches(calling, address) for rule in self.rules):
            log.warning("association refused: calling AE %r from %s is not an allowed peer", calling, address)
            event.assoc.acse.send_reject(0x01, 0x01, 0x03)  # rejected-permanent, calling AE not recognised
            event.assoc.kill()

    def _on_echo(self, event: Any) -> int:
        return SUCCESS

    def _on_store(self, event: Any) -> Dataset | int:
        self.stats.add('received')
        try:
            return self._store(event)
        except Exception as err:  # the listener never dies on one instance
            self.stats.add('failed')
            log.error("C-STORE handler failed: %s", safe_reason(err))
            return _status(CANNOT_UNDERSTAND, "internal error; see the node's log")

    def _store(self, event: Any) -> Dataset | int:
        from covidcxr.io import CXRReadError, decode

        data = event.encoded_dataset(include_meta=True)
        try:
            header = read_header(data)
            uid = str(header.SOPInstanceUID)
        except Exception as err:
            self.stats.add('failed')
            log.warning("instance refused: unreadable DICOM header (%s)", type(err).__name__)
            return _status(CANNOT_UNDERSTAND, "unreadable DICOM header")
        key = instance_key(uid, self.engine.sha256)
        if str(header.get("Manufacturer", "")) == MANUFACTURER and "BurnedInAnnotation" in header:
            log.info("instance %s: a covidcxr result sent back to the node; ignored", key)
            return SUCCESS
        if self.store.seen(key):
            self.stats.add('duplicates')
            log.info("instance %s: already taken in; duplicate not processed again", key)
            return SUCCESS
        if self.store.pending() >= self.config.max_pending:
            self.stats.add('refused')
            log.warning("instance %s refused: %d results wait (max_pending); the sender retries %s",
                        key, self.store.pending(), self.config.destination)
            return _status(OUT_OF_RESOURCES, "result queue full; send again later")
        if not self.store.claim(key):
            self.stats.add('duplicates')
            log.info("instance %s: already taken in; duplicate not processed again", key)
            return SUCCESS
        try:
            image, _ = decode(data, f"instance {key}")
        except CXRReadError as err:
            self.store.release(key)
            self.stats.add('failed')
            log.warning("instance %s refused: %s", key, err.reason)
            missing = "no pixel data" in err.reason or "truncated" in err.reason  # the data set is incomplete
            return _status(DOES_NOT_MATCH if missing else CANNOT_UNDERSTAND, err.reason)
        except Exception as err:
            self.store.release(key)
            raise err
        try:
            self.store.put_incoming(key, data)
        except OSError as err:  # disk full or gone: not taken in, so the PACS must keep it and retry
            self.store.release(key)
            self.stats.add('refused')
            log.error("instance %s refused: cannot write to %s (%s)", key, self.store.root, err.strerror or err)
            return _status(OUT_OF_RESOURCES, "cannot store the instance on disk; send again later")
        # hand the decoded pixels on only while the queue is short: hundreds of waiting full-size images
        # would hold gigabytes; the others are decoded again from STORE/incoming/ when their turn comes
        keep = self._queue.qsize() < 2 * max(1, self.config.workers)
        self._queue.put((key, image if keep else None))
        log.info("instance %s accepted (%s)", key, header.get("Modality", "?"))
        return SUCCESS

    # ------------------------------------------------------------------ workers
    def _work(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                self._process(*job)
            finally:
                self._queue.task_done()

    def _process(self, key: str, image: np.ndarray | None) -> None:
        from covidcxr.io import decode

        t0 = time.perf_counter()
        path = self.store.incoming_path(key)
        try:
            data = path.read_bytes()
            header = read_header(data)
            if image is None:
                image, _ = decode(data, f"instance {key}")
            try:
                analysis = self.engine.analyze(image, header)
            except Exception as err:  # a model failure becomes a flagged SR, not a silent loss
                from covidcxr.dicom.analysis import Analysis

                self.stats.add('errors')
                log.error("instance %s: analysis failed (%s); sending a 'not assessed' SR", key, safe_reason(err))
                analysis = Analysis(threshold=self.engine.predictor.threshold, flag="analysis_failed",
                                    flag_reason=f"analysis failed ({type(err).__name__})", error=safe_reason(err),
                                    overlay=self.engine._overlay(image, None))
            results = build_results(header, analysis, self.engine)
            files = {k: to_bytes(ds) for k, ds in results.items()}
        except Exception as err:  # e.g. no StudyInstanceUID, a non-integer InstanceNumber: never will be built
            self.stats.add('errors')
            self.stats.add('dead_lettered')
            reason = f"no result could be built: {safe_reason(err)}"
            try:
                self.store.dead_letter(key, reason)
            except OSError as io_err:
                log.error("instance %s: %s; cannot move it to dead-letter (%s)", key, reason, io_err.strerror)
                return
            log.error("instance %s: %s; moved to %s", key, reason, self.store.root / "dead-letter")
            return
        try:
            self.store.put_results(key, files)
        except OSError as err:  # disk trouble: the instance stays in incoming/ for the next start
            self.stats.add('errors')
            log.error("instance %s: cannot write its results (%s); the instance stays in %s", key,
                      err.strerror or err, path.parent)
            return
        self.store.drop_incoming(key)
        self.stats.add('analysed')
        if analysis.flagged:
            self.stats.add('flagged')
            log.info("instance %s: flagged %s (%.0f ms)", key, analysis.flag, (time.perf_counter() - t0) * 1e3)
        else:
            p = (analysis.probabilities or {}).get("COVID-19")
            log.info("instance %s: %s%s (%.0f ms)", key, analysis.label,
                     f", P(COVID-19) {p:.3f}" if p is not None else "", (time.perf_counter() - t0) * 1e3)
        self.sender.notify()


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]  # LO
    return ds


def _resolve(host: str) -> str:
    from covidcxr.dicom.common import resolve_host

    return resolve_host(host)
