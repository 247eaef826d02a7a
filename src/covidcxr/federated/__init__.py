"""Federated training across hospitals on Flower: each site keeps its images, the model learns from all.

    covidcxr federated server --config RECIPE --rounds R --strategy fedavg|fedprox|fedbn --address HOST:PORT --out RUN
    covidcxr federated client --data LOCAL_MANIFEST --server HOST:PORT --site NAME
    covidcxr federated simulate --config RECIPE --data MANIFEST --site-column source --rounds R --out RUN

The result (``RUN/best.ckpt``) is an ordinary covidcxr checkpoint. See docs/federated.md.
Flower and torch are imported lazily.
"""

from __future__ import annotations

from typing import Any

from covidcxr.federated.plan import DPSettings, FederatedError, Plan

__all__ = ["DPSettings", "FederatedError", "Plan", "run_server", "run_client", "simulate"]


def __getattr__(name: str) -> Any:
    if name == "run_server":
        from covidcxr.federated.server import run_server

        return run_server
    if name == "run_client":
        from covidcxr.federated.client import run_client

        return run_client
    if name == "simulate":
        from covidcxr.federated.simulation import simulate

        return simulate
    raise AttributeError(f"module 'covidcxr.federated' has no attribute {name!r}")
