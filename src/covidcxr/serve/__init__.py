"""REST service and web page: ``create_app(ServeConfig(model=...))`` (or ``create_app(model_path, **settings)``);
run it with ``covidcxr serve``."""

from covidcxr.serve.app import API_KEY_ENV, Service, create_app, read_api_key_file
from covidcxr.serve.config import ServeConfig

__all__ = ["API_KEY_ENV", "ServeConfig", "Service", "create_app", "read_api_key_file"]
