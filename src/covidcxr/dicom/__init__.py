"""DICOM in, DICOM out: a node a PACS sends chest X-rays to, and results as SR + secondary capture.

* :class:`~covidcxr.dicom.node.DicomNode` (``covidcxr dicom listen``): C-ECHO, C-STORE of CR/DX/secondary
  captures in every transfer syntax this installation decodes; results C-STOREd to a destination.
* :func:`~covidcxr.dicom.results.build_results`: a highdicom TID 1500 SR and a secondary capture with
  the heatmap and "RESEARCH USE ONLY — NOT FOR DIAGNOSIS" burned in, in the source's study, new series.
* :class:`~covidcxr.dicom.results.DicomResultWriter` (``covidcxr predict --dicom-out DIR``).
* :func:`~covidcxr.dicom.sr.read_result`: what such an SR says, read back with highdicom.

Heavy imports (highdicom, pynetdicom, the models) happen on first use of each submodule.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "DicomNode": "covidcxr.dicom.node",
    "NodeConfig": "covidcxr.dicom.node",
    "Engine": "covidcxr.dicom.analysis",
    "Analysis": "covidcxr.dicom.analysis",
    "build_results": "covidcxr.dicom.results",
    "DicomResultWriter": "covidcxr.dicom.results",
    "read_result": "covidcxr.dicom.sr",
    "build_sr": "covidcxr.dicom.sr",
    "build_sc": "covidcxr.dicom.sc",
    "DicomNodeError": "covidcxr.dicom.common",
    "Peer": "covidcxr.dicom.common",
    "AllowRule": "covidcxr.dicom.common",
    "parse_peer": "covidcxr.dicom.common",
    "BURNED_NOTICE": "covidcxr.dicom.common",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'covidcxr.dicom' has no attribute {name!r}")
