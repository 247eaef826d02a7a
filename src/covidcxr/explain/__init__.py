"""Explanations for covidcxr classifiers: Grad-CAM, LRP (zennit), occlusion and integrated gradients
(captum), the Adebayo et al. sanity check and the shortcut audit.

    >>> from covidcxr.explain import explain, Context
    >>> heat = explain(model, batch, "lrp", ctx=Context(arch="densenet121", preset=preset))  # B x H x W

Heavy dependencies (zennit, captum, matplotlib) load only when a method that needs them runs.
"""

from __future__ import annotations

from covidcxr.explain.methods import METHODS, SIGNED, Context, ExplainError, explain, find_cam_layer, get_method
from covidcxr.explain.sanity import SanityResult, cascade_groups, sanity_check, sanity_markdown


def audit_model(*args, **kwargs):  # noqa: D103  (lazy: see covidcxr.explain.audit.audit_model)
    from covidcxr.explain.audit import audit_model as _audit

    return _audit(*args, **kwargs)


__all__ = [
    "METHODS",
    "SIGNED",
    "Context",
    "ExplainError",
    "SanityResult",
    "audit_model",
    "cascade_groups",
    "explain",
    "find_cam_layer",
    "get_method",
    "sanity_check",
    "sanity_markdown",
]
