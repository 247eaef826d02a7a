"""Config dataclasses with keyword overrides: the one rule behind ``create_app(path, max_batch=1)``,
``train_segmenter(manifest, out, epochs=3)`` and the like, where a config object replaced a long parameter list.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any, Mapping, TypeVar

C = TypeVar("C")


def with_overrides(cls: type[C], config: C | None, overrides: Mapping[str, Any],
                   aliases: Mapping[str, str] | None = None, where: str = "") -> C:
    """``config`` (or ``cls()``) with the fields in ``overrides`` replaced. ``aliases`` maps old keyword names to
    field names. An unknown name is a TypeError naming ``where`` and the known fields: a misspelt setting is never
    silently ignored."""
    base = config if config is not None else cls()
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    changes = {(aliases or {}).get(k, k): v for k, v in overrides.items()}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise TypeError(f"{where or cls.__name__} got unknown settings {unknown}; {cls.__name__} has {sorted(known)}")
    return replace(base, **changes) if changes else base  # type: ignore[type-var]
