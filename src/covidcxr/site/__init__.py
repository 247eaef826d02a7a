"""Site adaptation: ``site check`` (do these films look like the training data?) and ``site calibrate``
(temperature, threshold, AdaBN and class-conditional conformal sets fitted on local labelled cases).

Only the numpy-only :mod:`covidcxr.site.sets` is imported here, so the ONNX paths stay torch-free;
``covidcxr.site.check`` and ``covidcxr.site.calibrate`` import torch.
"""

from covidcxr.site.sets import (
    SITE_KEY,
    UNCERTAIN_TEXT,
    SiteCalibrationError,
    describe_set,
    is_uncertain,
    prediction_set,
    site_info,
)

__all__ = [
    "SITE_KEY",
    "UNCERTAIN_TEXT",
    "SiteCalibrationError",
    "describe_set",
    "is_uncertain",
    "prediction_set",
    "site_info",
]
