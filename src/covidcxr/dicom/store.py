"""The node's disk: what was acknowledged, what waits to be sent, what was given up, which instances were seen.

::

    STORE/incoming/<key>.dcm           received and acknowledged (C-STORE success), not yet analysed
    STORE/outbox/<key>/sr.dcm          results built, not yet accepted by the destination
    STORE/outbox/<key>/sc.dcm
    STORE/outbox/<key>/refusals.txt    how often the destination refused it so far (kept across restarts)
    STORE/sent/<key>/                  delivered results (only with keep_sent)
    STORE/dead-letter/<key>/           given up: refused max_attempts times, or no result could be built
    STORE/dead-letter/<key>/reason.txt   why, one line (``covidcxr dicom status`` lists it)
    STORE/seen.txt                     keys of the instances taken in (the newest MAX_SEEN; duplicates are
                                       answered, not redone)

An instance is written to ``incoming/`` before the node answers success, and results reach ``outbox/``
(by rename) before the incoming file is removed, so after a crash or a restart nothing acknowledged is
lost: :meth:`ResultStore.pending_incoming` and :meth:`ResultStore.outbox` give the work back. What lies
in ``dead-letter/`` no longer counts towards ``max_pending``.
"""

from __future__ import annotations

import os
import shutil
import stat
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from covidcxr.dicom.results import write_atomic

#: How many instance keys seen.txt remembers (the newest): enough for months of one PACS's chest
#: X-rays, and bounded, so neither the file nor the set grows for ever.
MAX_SEEN = 200_000
DEAD_LETTER = "dead-letter"


@dataclass(frozen=True)
class DeadLetter:
    key: str
    reason: str
    when: float  # seconds since the epoch
    files: tuple[str, ...]


class ResultStore:
    def __init__(self, root: str | os.PathLike, keep_sent: bool = False, max_seen: int = MAX_SEEN,
                 read_only: bool = False) -> None:
        """``read_only``: look at a store a running node owns (``dicom status``): create and rewrite nothing."""
        self.root = Path(root)
        self.keep_sent = keep_sent
        self.max_seen = max(1, int(max_seen))
        if not read_only:
            for sub in ("incoming", "outbox", "sent", DEAD_LETTER, "tmp"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            os.chmod(self.root, 0o700)  # results carry patient attributes
        self._lock = threading.Lock()
        self._seen_path = self.root / "seen.txt"
        self._seen: OrderedDict[str, None] = OrderedDict()  # insertion order = age: the oldest go first
        if self._seen_path.is_file():
            for line in self._seen_path.read_text().splitlines():
                if line.strip():
                    self._seen[line.strip()] = None
        # a restart must not forget instances still waiting on disk
        for key in [p.stem for p in (self.root / "incoming").glob("*.dcm")] + self.outbox():
            self._seen[key] = None
        self._seen_lines = len(self._seen)
        if not read_only:
            with self._lock:
                self._trim()
                self._rewrite_seen()  # also records the keys found on disk, and drops the oldest beyond max_seen

    # ------------------------------------------------------------------ dedupe
    def seen(self, key: str) -> bool:
        with self._lock:
            return key in self._seen

    def claim(self, key: str) -> bool:
        """True the first time a key is seen (then it is recorded), False for a duplicate."""
        with self._lock:
            if key in self._seen:
                return False
            self._seen[key] = None
            with open(self._seen_path, "a") as f:
                f.write(key + "\n")
            self._seen_lines += 1
            self._trim()
            return True

    def release(self, key: str) -> None:
        """Forget a claim (the instance was refused after all, e.g. queue full), so a resend is processed."""
        with self._lock:
            if key not in self._seen:
                return
            del self._seen[key]
            self._rewrite_seen()

    def _trim(self) -> None:
        """Keep the newest ``max_seen`` keys; rewrite the file once it holds twice that (amortised O(1))."""
        while len(self._seen) > self.max_seen:
            self._seen.popitem(last=False)
        if self._seen_lines > 2 * self.max_seen:
            self._rewrite_seen()

    def _rewrite_seen(self) -> None:
        write_atomic(self._seen_path, "".join(k + "\n" for k in self._seen).encode())
        self._seen_lines = len(self._seen)

    # ------------------------------------------------------------------ incoming
    def incoming_path(self, key: str) -> Path:
        return self.root / "incoming" / f"{key}.dcm"

    def put_incoming(self, key: str, data: bytes) -> Path:
        path = self.incoming_path(key)
        write_atomic(path, data)
        return path

    def pending_incoming(self) -> list[str]:
        found = []
        for p in (self.root / "incoming").glob("*.dcm"):
            try:
                found.append((p.stat().st_mtime, p.stem))
            except FileNotFoundError:  # analysed meanwhile
                continue
        return [k for _, k in sorted(found)]

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

    def refusals(self, key: str) -> int:
        """How often the destination has refused this result (0 when never)."""
        try:
            return int((self.root / "outbox" / key / "refusals.txt").read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def add_refusal(self, key: str) -> int:
        """Count one more refusal (on disk, so a restart does not reset it); returns the new count."""
        n = self.refusals(key) + 1
        folder = self.root / "outbox" / key
        if folder.is_dir():
            write_atomic(folder / "refusals.txt", f"{n}\n".encode())
        return n

    def mark_sent(self, key: str) -> None:
        src = self.root / "outbox" / key
        if not self.keep_sent:
            shutil.rmtree(src, ignore_errors=True)
            return
        dst = self.root / "sent" / key
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(src, dst)

    # ------------------------------------------------------------------ dead letters
    def dead_letter(self, key: str, reason: str) -> Path:
        """Give up on ``key``: its results (or, when none could be built, its incoming instance) move to
        ``dead-letter/<key>/`` with ``reason.txt``; it no longer counts towards ``max_pending``."""
        dst = self.root / DEAD_LETTER / key
        shutil.rmtree(dst, ignore_errors=True)
        tmp = self.root / "tmp" / f"dead-{key}"
        shutil.rmtree(tmp, ignore_errors=True)
        src = self.root / "outbox" / key
        if src.is_dir():
            os.replace(src, tmp)
        else:
            tmp.mkdir(parents=True)
        incoming = self.incoming_path(key)
        if incoming.is_file():
            os.replace(incoming, tmp / "source.dcm")
        write_atomic(tmp / "reason.txt", (" ".join(reason.split()) + "\n").encode())
        os.replace(tmp, dst)
        return dst

    def dead_letters(self) -> list[DeadLetter]:
        """What was given up, oldest first, each with its reason."""
        out = []
        folder = self.root / DEAD_LETTER
        for d in folder.iterdir() if folder.is_dir() else []:
            reason_file = d / "reason.txt"
            try:
                reason = reason_file.read_text().strip()
                when = reason_file.stat().st_mtime
            except OSError:
                continue
            out.append(DeadLetter(d.name, reason, when, tuple(sorted(p.name for p in d.glob("*.dcm")))))
        return sorted(out, key=lambda x: x.when)

    def pending(self) -> int:
        """Instances taken in and not yet delivered: the node refuses new ones above its limit."""
        return len(list((self.root / "incoming").glob("*.dcm"))) + len(self.outbox())

    def summary(self) -> dict[str, int]:
        def count(sub: str) -> int:
            d = self.root / sub
            return sum(1 for _ in d.iterdir()) if d.is_dir() else 0

        return {"incoming": len(list((self.root / "incoming").glob("*.dcm"))), "outbox": len(self.outbox()),
                "sent": count("sent"), "dead_letter": count(DEAD_LETTER), "seen": len(self._seen)}


def age_text(when: float) -> str:
    """'3 min ago' style text for a dead letter's time."""
    s = max(0.0, time.time() - when)
    return f"{s:.0f} s ago" if s < 120 else f"{s / 60:.0f} min ago" if s < 7200 else f"{s / 3600:.1f} h ago"
