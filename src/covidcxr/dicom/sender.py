"""Sends results from the store's outbox to the destination by C-STORE, retrying while it is down.

The outbox on disk is the queue: nothing is held only in memory, so a destination that is down for
hours, or a restart, loses nothing. While the destination is unreachable the sender waits with an
exponential back-off (1 s doubling up to ``retry_max_s``); the node refuses new images with
"out of resources" once ``max_pending`` results wait, so the queue is bounded and the PACS keeps
the images it could not hand over.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import ComprehensiveSRStorage, SecondaryCaptureImageStorage

from covidcxr.dicom.common import Peer, safe_reason
from covidcxr.dicom.store import ResultStore

log = logging.getLogger("covidcxr.dicom")

_SUCCESS_OR_WARNING = {0x0000, 0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007}


class Sender:
    def __init__(self, store: ResultStore, destination: Peer, ae_title: str, retry_max_s: float = 60.0,
                 max_attempts: int = 5, timeout_s: float = 30.0) -> None:
        self.store = store
        self.destination = destination
        self.retry_max_s = retry_max_s
        self.max_attempts = max_attempts
        self.ae = AE(ae_title=ae_title)
        for cx in (ComprehensiveSRStorage, SecondaryCaptureImageStorage):
            self.ae.add_requested_context(cx)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = timeout_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._refusals: dict[str, int] = {}
        self._thread: threading.Thread | None = None
        self.sent = 0
        self.failures = 0  # delivery attempts that failed (destination down or refusing)
        self.delay = 0.0
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
        backoff = 1.0
        while True:
            stopping = self._stop.is_set()
            ok = self.flush()
            if stopping:
                return
            self.delay = 0.0 if ok else backoff
            if ok:
                backoff = 1.0
                self._wake.wait()
            else:
                self._wake.wait(timeout=backoff)
                backoff = min(backoff * 2, self.retry_max_s)
            self._wake.clear()

    # ------------------------------------------------------------------ sending
    def flush(self) -> bool:
        """Send every result in the outbox over one association; False when the destination is unreachable."""
        keys = self.store.outbox()
        if not keys:
            return True
        d = self.destination
        assoc = self.ae.associate(d.host, d.port, ae_title=d.ae_title)
        if not assoc.is_established:
            self.failures += 1
            now = time.monotonic()
            if now - self._last_warning < 60:  # once a minute while it stays down
                return False
            self._last_warning = now
            log.warning("destination %s unreachable or refusing the association; %d results wait in %s "
                        "(retrying)", d, len(keys), self.store.root / "outbox")
            return False
        if self._last_warning:
            log.info("destination %s reachable again; sending %d waiting results", d, len(keys))
            self._last_warning = 0.0
        try:
            for key in keys:
                if not assoc.is_established:
                    return False
                self._send_one(assoc, key)
        finally:
            if assoc.is_established:
                assoc.release()
        return True

    def _send_one(self, assoc: object, key: str) -> None:
        files = self.store.result_files(key)
        statuses = []
        for f in files:
            try:
                status = assoc.send_c_store(Path(f))  # type: ignore[attr-defined]
                statuses.append(int(status.Status) if "Status" in status else None)
            except Exception as err:  # a file the destination cannot take must not stop the others
                log.warning("result %s: sending failed (%s)", key, safe_reason(err))
                statuses.append(None)
        if not assoc.is_established:  # type: ignore[attr-defined]
            return  # the connection went away mid-way: a delivery failure, not a refusal; retried
        if statuses and all(s in _SUCCESS_OR_WARNING for s in statuses):
            self.store.mark_sent(key)
            self._refusals.pop(key, None)
            self.sent += 1
            log.info("result %s: SR and secondary capture stored at %s", key, self.destination)
            return
        self.failures += 1
        n = self._refusals[key] = self._refusals.get(key, 0) + 1
        shown = ", ".join("no answer" if s is None else f"0x{s:04X}" for s in statuses)
        if n >= self.max_attempts:
            self.store.mark_rejected(key)
            self._refusals.pop(key, None)
            log.error("result %s: refused %d times by %s (status %s); moved to %s", key, n, self.destination,
                      shown, self.store.root / "rejected")
        else:
            log.warning("result %s: destination answered %s (attempt %d of %d)", key, shown, n, self.max_attempts)
