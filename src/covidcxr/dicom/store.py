"""The node's disk: what was acknowledged, what waits to be sent, which instances were seen.

::

    STORE/incoming/<key>.dcm      received and acknowledged (C-STORE success), not yet analysed
    STORE/outbox/<key>/sr.dcm     results built, not yet accepted by the destination
    STORE/outbox/<key>/sc.dcm
    STORE/sent/<key>/             delivered results (only with keep_sent)
    STORE/rejected/<key>/         results the destination refused max_attempts times
    STORE/seen.txt                keys of every instance taken in (duplicates are answered, not redone)

An instance is written to ``incoming/`` before the node answers success, and results reach ``outbox/``
(by rename) before the incoming file is removed, so after a crash or a restart nothing acknowledged is
lost: :meth:`ResultStore.pending_incoming` and :meth:`ResultStore.outbox` give the work back.
"""

from __future__ import annotations

import os
import shutil
import stat
import threading
from pathlib import Path

from covidcxr.dicom.results import write_atomic


class ResultStore:
    def __init__(self, root: str | os.PathLike, keep_sent: bool = False) -> None:
        self.root = Path(root)
        self.keep_sent = keep_sent
        for sub in ("incoming", "outbox", "sent", "rejected", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)  # results carry patient attributes
        self._lock = threading.Lock()
        self._seen_path = self.root / "seen.txt"
        self._seen: set[str] = set()
        if self._seen_path.is_file():
            self._seen = {line.strip() for line in self._seen_path.read_text().splitlines() if line.strip()}
        # a restart must not forget instances still waiting on disk
        self._seen.update(p.stem for p in (self.root / "incoming").glob("*.dcm"))
        self._seen.update(self.outbox())

    # ------------------------------------------------------------------ dedupe
    def seen(self, key: str) -> bool:
        with self._lock:
            return key in self._seen

    def claim(self, key: str) -> bool:
        """True the first time a key is seen (then it is recorded), False for a duplicate."""
        with self._lock:
            if key in self._seen:
                return False
            self._seen.add(key)
            with open(self._seen_path, "a") as f:
                f.write(key + "\n")
            return True

    def release(self, key: str) -> None:
        """Forget a claim (the instance was refused after all, e.g. queue full), so a resend is processed."""
        with self._lock:
            if key not in self._seen:
                return
            self._seen.discard(key)
            lines = [k for k in self._seen_path.read_text().splitlines() if k.strip() and k != key]
            write_atomic(self._seen_path, ("\n".join(lines) + "\n" if lines else "").encode())

    # ------------------------------------------------------------------ incoming
    def incoming_path(self, key: str) -> Path:
        return self.root / "incoming" / f"{key}.dcm"

    def put_incoming(self, key: str, data: bytes) -> Path:
        path = self.incoming_path(key)
        write_atomic(path, data)
        return path

    def pending_incoming(self) -> list[str]:
        files = sorted((self.root / "incoming").glob("*.dcm"), key=lambda p: p.stat().st_mtime)
        return [p.stem for p in files]

    def drop_incoming(self, key: str) -> None:
        self.incoming_path(key).unlink(missing_ok=True)

    # ------------------------------------------------------------------ outbox
    def put_results(self, key: str, files: dict[str, bytes]) -> Path:
        """Write ``{name: bytes}`` into ``outbox/<key>/`` atomically (a folder rename)."""
        tmp = self.root / "tmp" / key
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, data in files.items():
            write_atomic(tmp / f"{name}.dcm", data)
        final = self.root / "outbox" / key
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return final

    def outbox(self) -> list[str]:
        """Keys of results waiting to be sent, oldest first."""
        found = []
        for p in (self.root / "outbox").iterdir():
            try:  # the sender removes delivered entries from its own thread, also while this lists them
                st = p.stat()
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                found.append((st.st_mtime, p.name))
        return [name for _, name in sorted(found)]

    def result_files(self, key: str) -> list[Path]:
        return sorted((self.root / "outbox" / key).glob("*.dcm"))

    def _move(self, key: str, where: str) -> None:
        src = self.root / "outbox" / key
        if where == "sent" and not self.keep_sent:
            shutil.rmtree(src, ignore_errors=True)
            return
        dst = self.root / where / key
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(src, dst)

    def mark_sent(self, key: str) -> None:
        self._move(key, "sent")

    def mark_rejected(self, key: str) -> None:
        self._move(key, "rejected")

    def pending(self) -> int:
        """Instances taken in and not yet delivered: the node refuses new ones above its limit."""
        return len(list((self.root / "incoming").glob("*.dcm"))) + len(self.outbox())
