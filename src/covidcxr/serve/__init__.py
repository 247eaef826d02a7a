"""REST service and web page: ``create_app(model_path, ...)``; run it with ``covidcxr serve``."""

from covidcxr.serve.app import API_KEY_ENV, Service, create_app, read_api_key_file

__all__ = ["API_KEY_ENV", "Service", "create_app", "read_api_key_file"]
