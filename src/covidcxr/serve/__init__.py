"""REST service and web page: ``create_app(ServeConfig(model=...))`` (or ``create_app(model_path, **settings)``);
run it with ``covidcxr serve``."""

from __future__ import annotations

from typing import Any

from covidcxr.serve.config import ServeConfig

#: names served by covidcxr.serve.app, imported on first use: the CLI reads ServeConfig's defaults to build its
#: parser, and that must not import FastAPI (the optional 'deploy' extra)
_APP_NAMES = ("API_KEY_ENV", "Service", "create_app", "read_api_key_file")


def __getattr__(name: str) -> Any:
    if name in _APP_NAMES:
        from covidcxr.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'covidcxr.serve' has no attribute {name!r}")


__all__ = ["API_KEY_ENV", "ServeConfig", "Service", "create_app", "read_api_key_file"]
