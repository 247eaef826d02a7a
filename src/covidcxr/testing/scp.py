"""A real pynetdicom storage SCP on a free loopback port that answers what a test tells it to.

::

    with StoreScp(refuse_first=1) as pacs:          # each instance's first C-STORE gets 0xA700
        ... node with destination Peer("PACS", "127.0.0.1", pacs.port) ...
        pacs.wait_for(lambda: len(pacs.stored) == 2)

``answers`` maps a SOP Instance UID to a list of statuses to give for its successive C-STOREs;
``refuse_first`` refuses every instance that many times, ``always`` answers one status for everything.
Loopback only; for tests and trials.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Callable

from pydicom.dataset import Dataset


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(cond: Callable[[], Any], timeout: float = 60.0, what: str = "condition", every: float = 0.05) -> Any:
    """Poll ``cond`` until it is truthy (returned) or ``timeout`` passes (AssertionError naming ``what``)."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


class StoreScp:
    def __init__(self, ae_title: str = "PACS", refuse_first: int = 0, refuse_status: int = 0xA700,
                 always: int | None = None, answers: dict[str, list[int]] | None = None) -> None:
        self.ae_title = ae_title
        self.refuse_first = refuse_first
        self.refuse_status = refuse_status
        self.always = always
        self.answers = {k: list(v) for k, v in (answers or {}).items()}
        self.calls: list[tuple[str, int]] = []  # (SOP Instance UID, status answered), in order
        self.stored: dict[str, Dataset] = {}  # SOP Instance UID -> data set, for every stored instance
        self.associations = 0
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server: Any = None
        self.port = 0

    def _on_store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        uid = str(ds.SOPInstanceUID)
        with self._lock:
            n = self._counts[uid] = self._counts.get(uid, 0) + 1
            queued = self.answers.get(uid)
            if queued:
                status = queued.pop(0)
            elif self.always is not None:
                status = self.always
            elif n <= self.refuse_first:
                status = self.refuse_status
            else:
                status = 0x0000
            self.calls.append((uid, status))
            if status in (0x0000, 0x0001, 0x0107, 0x0116) or status >> 12 == 0xB:
                self.stored[uid] = ds
        return status

    def _on_open(self, event: Any) -> None:
        with self._lock:
            self.associations += 1

    def start(self) -> "StoreScp":
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_CONN_OPEN, self._on_open)]
        self._server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
        self.port = int(self._server.server_address[1])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> "StoreScp":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def statuses(self, uid: str) -> list[int]:
        with self._lock:
            return [s for u, s in self.calls if u == uid]
