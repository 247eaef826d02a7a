"""Sends results from the store's outbox to the destination by C-STORE, retrying on a timer.

The outbox on disk is the queue: nothing is held only in memory, so a destination that is down for
hours, or a restart, loses nothing. Whenever a flush leaves results behind (destination unreachable,
or it answered a failure status) the sender tries again after an exponential back-off (1 s doubling
up to ``retry_max_s``), without waiting for the next incoming image. A result the destination refuses
``max_attempts`` times goes to ``STORE/dead-letter/`` with the statuses as its reason. An unreachable
destination is not a refusal: its results wait (the node refuses new images with "out of resources"
once ``max_pending`` wait, so the queue is bounded and the PACS keeps what it could not hand over).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import ComprehensiveSRStorage, SecondaryCaptureImageStorage

from covidcxr.dicom.common import Peer, safe_reason
from covidcxr.dicom.store import ResultStore

log = logging.getLogger("covidcxr.dicom")

#: C-STORE statuses that mean "stored" (PS3.4 B.2.3 and PS3.7 C): success, and the warnings
#: 0x0001 (attribute list / value out of range), 0x0107 (attribute list error), 0x0116 (attribute value
#: out of range), 0xB000 (coercion of data elements), 0xB006 (elements discarded), 0xB007 (data set
#: does not match SOP class).
STORED_STATUSES = frozenset({0x0000, 0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007})


def is_stored(status: int | None) -> bool:
    """True when a C-STORE status says the instance was stored (success or success with a warning)."""
    return status is not None and int(status) in STORED_STATUSES


def describe_status(status: int | None) -> str:
    if status is None:
        return "no answer"
    return f"0x{status:04X}" + (" (warning)" if status in STORED_STATUSES and status else "")


@dataclass
class FlushResult:
    """What one flush did. ``ok``: the outbox was emptied (delivered, or given up as dead letters)."""

    reachable: bool = True
    delivered: int = 0
    refused: int = 0  # results the destination answered with a failure status this time
    dead_lettered: int = 0
    waiting: int = 0  # still in the outbox afterwards
    reasons: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.reachable and self.refused == 0 and self.waiting == 0

    def __bool__(self) -> bool:
        return self.ok


class Sender:
    def __init__(self, store: ResultStore, destination: Peer, ae_title: str, retry_max_s: float = 60.0,
                 max_attempts: int = 5, timeout_s: float = 30.0, retry_min_s: float = 1.0) -> None:
        self.store = store
        self.destination = destination
        self.retry_min_s = min(retry_min_s, retry_max_s)
        self.retry_max_s = retry_max_s
        self.max_attempts = max(1, int(max_attempts))
        self.ae = AE(ae_title=ae_title)
        # the results are written in explicit VR little endian: offer that (implicit as the fallback every
        # SCP must take), not pynetdicom's default list, from which some SCPs (DCMTK's storescp +xa) pick
        # deflate, which validators and some archives cannot read
        for cx in (ComprehensiveSRStorage, SecondaryCaptureImageStorage):
            self.ae.add_requested_context(cx, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = timeout_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one flush at a time (the thread, or a caller's flush())
        self._thread: threading.Thread | None = None
        self.sent = 0
        self.failures = 0  # flushes that left results behind (destination down or refusing)
        self.dead_lettered = 0
        self.delay = 0.0  # the current back-off, 0 while everything is delivered
        self._last_warning = 0.0

    # ------------------------------------------------------------------ thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="covidcxr-dicom-sender", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        """New results in the outbox: try now (also cuts a back-off short)."""
        self._wake.set()

    def stop(self, flush_timeout_s: float = 10.0) -> int:
        """Stop after one last delivery attempt (bounded); returns how many results stay on disk."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=flush_timeout_s + 5)
        return len(self.store.outbox())

    def _run(self) -> None:
        backoff = self.retry_min_s
        while True:
            self._wake.clear()
            stopping = self._stop.is_set()
            try:
                ok = self.flush().ok
            except Exception as err:  # the sender thread never dies; the outbox stays on disk
                log.error("sender: flush failed (%s); retrying", safe_reason(err))
                ok = False
            if stopping:
                return
            if ok:
                backoff = self.retry_min_s
                self.delay = 0.0
                self._wake.wait()
            else:  # retry on a timer: a refusal or an outage must not wait for the next incoming image
                self.delay = backoff
                self._wake.wait(timeout=backoff)
                backoff = min(backoff * 2, self.retry_max_s)

    # ------------------------------------------------------------------ sending
    def flush(self) -> FlushResult:
        """Send every result in the outbox over one association.

        The result is falsy when anything is left behind: the destination was unreachable, or it
        refused a result (which then waits for the next attempt, or went to dead-letter after
        ``max_attempts`` refusals).
        """
        with self._lock:
            res = self._flush()
            if not res.ok:
                self.failures += 1
        return res

    def _flush(self) -> FlushResult:
        keys = self.store.outbox()
        res = FlushResult()
        if not keys:
            return res
        d = self.destination
        assoc = self.ae.associate(d.host, d.port, ae_title=d.ae_title)
        if not assoc.is_established:
            res.reachable, res.waiting = False, len(keys)
            now = time.monotonic()
            if now - self._last_warning >= 60:  # once a minute while it stays down
                self._last_warning = now
                log.warning("destination %s unreachable or refusing the association; %d results wait in %s "
                            "(retrying)", d, len(keys), self.store.root / "outbox")
            return res
        if self._last_warning:
            log.info("destination %s reachable again; sending %d waiting results", d, len(keys))
            self._last_warning = 0.0
        try:
            for key in keys:
                if not assoc.is_established:
                    res.reachable = False
                    break
                self._send_one(assoc, key, res)
        finally:
            if assoc.is_established:
                assoc.release()
        res.waiting = len(self.store.outbox())
        return res

    def _send_one(self, assoc: Any, key: str, res: FlushResult) -> None:
        files = self.store.result_files(key)
        statuses: list[int | None] = []
        for f in files:
            try:
                status = assoc.send_c_store(Path(f))
                statuses.append(int(status.Status) if "Status" in status else None)
            except Exception as err:  # a file the destination cannot take must not stop the others
                log.warning("result %s: sending failed (%s)", key, safe_reason(err))
                statuses.append(None)
        if not assoc.is_established:
            return  # the connection went away mid-way: a delivery failure, not a refusal; retried
        if statuses and all(is_stored(s) for s in statuses):
            self.store.mark_sent(key)
            self.sent += 1
            res.delivered += 1
            log.info("result %s: SR and secondary capture stored at %s", key, self.destination)
            return
        res.refused += 1
        n = self.store.add_refusal(key)
        shown = ", ".join(f"{f.stem} {describe_status(s)}" for f, s in zip(files, statuses)) or "no result files"
        reason = f"refused {n} times by {self.destination} (last answer: {shown})"
        res.reasons[key] = reason
        if n >= self.max_attempts:
            self.store.dead_letter(key, reason)
            self.dead_lettered += 1
            res.dead_lettered += 1
            log.error("result %s: %s; moved to %s", key, reason, self.store.root / "dead-letter")
        else:
            log.warning("result %s: destination answered %s (attempt %d of %d; retrying)", key, shown, n,
                        self.max_attempts)
