"""What the REST service is built from: one config object (``covidcxr serve`` fills it from its options)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from covidcxr.overrides import with_overrides

#: measured defaults (docs/benchmarks.md "Service"): batches of up to 8 images, formed within 10 ms
DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_WAIT_MS = 10.0
DEFAULT_DECODE_WORKERS = 2

#: the keyword names create_app took before this config existed
_OLD_NAMES = {"model_path": "model", "severity_path": "severity"}


@dataclass(frozen=True)
class ServeConfig:
    """The service's settings; :func:`covidcxr.serve.create_app` takes one (or keyword overrides of the defaults)."""

    # the models: a checkpoint or ONNX file, its backend and CPU threads; the severity model (scored above the
    # COVID-19 operating point, or for every input with always_severity)
    model: str | None = None
    backend: str | None = None
    threads: int | None = None
    severity: str | None = None
    always_severity: bool = False
    # the frontal-CXR gate of covidcxr.predict.gate (off: records say 'unchecked'); label_implausible keeps the
    # disease label of a flagged input
    plausibility: bool = True
    label_implausible: bool = False
    # access: api_key None reads api_key_file, else $COVIDCXR_API_KEY; an empty key means no authentication.
    # cors_origins: browser origins allowed to call the API (none by default)
    api_key: str | None = None
    api_key_file: str | None = None
    cors_origins: tuple[str, ...] = ()
    # load: upload size; max_batch > 1 batches concurrent requests (up to max_batch images within max_wait_ms,
    # decoded in decode_workers threads); max_batch 1 runs each request alone in one of max_concurrency slots.
    # queue: requests that may wait, each up to queue_timeout seconds, before a 503
    max_upload_mb: float = 20.0
    max_concurrency: int = 2
    queue: int = 8
    queue_timeout: float = 30.0
    max_batch: int = DEFAULT_MAX_BATCH
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS
    decode_workers: int = DEFAULT_DECODE_WORKERS

    @classmethod
    def build(cls, config: "ServeConfig | str | os.PathLike | None" = None, **overrides: Any) -> "ServeConfig":
        """``config`` (a ServeConfig, or a model path) with ``overrides`` (field names, or the old keyword names
        ``model_path``/``severity_path``); raises TypeError for an unknown name."""
        base = config if isinstance(config, ServeConfig) else cls(model=None if config is None else str(config))
        changes = {_OLD_NAMES.get(k, k): v for k, v in overrides.items()}
        for key in ("model", "severity", "api_key_file"):  # paths travel as strings
            if changes.get(key) is not None:
                changes[key] = str(changes[key])
        if "cors_origins" in changes:
            changes["cors_origins"] = tuple(changes["cors_origins"] or ())
        return with_overrides(cls, base, changes, where="create_app")
