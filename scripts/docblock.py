"""Replace a generated block of a markdown file between its begin/end markers (the results scripts' one rule)."""
from __future__ import annotations

from pathlib import Path


def replace_block(doc: Path, begin: str, end: str, text: str) -> str | None:
    """Write ``text`` between ``begin`` and ``end`` in ``doc``; the error line, or None when done."""
    body = doc.read_text(encoding="utf-8")
    if begin not in body or end not in body:
        return f"error: {doc}: no {begin} ... {end} block to replace"
    head, rest = body.split(begin, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(head + begin + "\n" + text.rstrip("\n") + "\n" + end + tail, encoding="utf-8")
    return None
