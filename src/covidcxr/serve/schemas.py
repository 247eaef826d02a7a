"""Typed request/response models of the REST API (they make the OpenAPI document)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorResponse(BaseModel):
    detail: str = Field(description="What went wrong, in words")


class ModelRef(BaseModel):
    name: str
    version: str = Field(description="First 12 hex digits of the model file's SHA-256 (or a release version)")
    sha256: str | None = Field(None, description="SHA-256 of the model file that made this prediction")
    arch: str
    backend: str = Field(description="torch or onnx")


class InputInfo(BaseModel):
    format: str = Field(description="Detected from the content: png, jpeg, tiff, bmp or dicom")
    width: int
    height: int
    bytes: int


class PredictResponse(BaseModel):
    label: str = Field(description="Predicted class at the model's operating threshold")
    probabilities: dict[str, float] = Field(description="Calibrated probability per class")
    threshold: float | None = Field(description="COVID-19 operating threshold; null means argmax")
    decision_rule: str | None = Field(None, description="The rule that made the label, with the threshold's value")
    flag: str | None = Field(None, description="not_a_frontal_cxr when the upload does not look like a frontal "
                             "chest X-ray (its label is then not_a_frontal_cxr unless the server overrides it)")
    plausibility: dict[str, Any] | None = Field(
        None, description="Is it a frontal chest X-ray: verdict, plausible, reason, rule (lung U-Net check)"
    )
    severity: dict[str, Any] | None = Field(
        None, description="Severity from the severity model; null when not configured or not applicable"
    )
    severity_note: str | None = Field(None, description="Why severity is null, when it is")
    prediction_set: list[str] | None = Field(
        None, description="Conformal prediction set of a site-calibrated model (null without site calibration)")
    uncertain: bool = Field(False, description="True when the prediction set is not a single class")
    referral: str | None = Field(None, description="'uncertain: refer' when the prediction set holds more than "
                                 "one class (or none); null otherwise")
    model: ModelRef
    input: InputInfo
    heatmap_png: str | None = Field(
        None, description="Grad-CAM map as a base64 RGBA PNG (same size as image_png) when ?heatmap=true"
    )
    heatmap_note: str | None = Field(None, description="Why no heatmap was returned, when one was asked for")
    image_png: str | None = Field(
        None, description="The model's view of the input (after the preset's crop) as base64 PNG, when ?image=true"
    )
    plausibility: dict[str, Any] | None = Field(
        None, description="Is it a frontal chest X-ray? verdict, plausible (true/false/null), reason, rule"
    )
    flag: str | None = Field(None, description="not_a_frontal_cxr when the plausibility check failed")
    batch_size: int = Field(1, description="Images in the model call that answered this request")
    queue_ms: float | None = Field(None, description="Milliseconds from queueing to its batch starting (batched)")
    elapsed_ms: float
    notice: str


class HealthResponse(BaseModel):
    status: str
    model: str
    version: str
    auth_required: bool
    busy: int = Field(description="Requests running or waiting")
    capacity: int = Field(description="Requests that can be running or waiting before 503")
    plausibility: dict[str, Any] | None = Field(
        None, description="The frontal-CXR gate: state (ok, down after repeated failures, off), images checked, "
        "failures (total and in a row), last error; status is 'degraded' while it is down")


class Limits(BaseModel):
    max_upload_mb: float
    max_concurrency: int
    queue: int
    queue_timeout_s: float
    max_batch: int = 1
    max_wait_ms: float | None = None
    decode_workers: int | None = None


class ModelCard(BaseModel):
    name: str
    version: str
    arch: str
    task: str
    backend: str
    classes: list[str]
    threshold: float | None
    decision_rule: dict[str, Any] | None = None
    temperature: float
    logit_bias: list[float] | None = Field(None, description="per-class bias after the temperature "
                                           "(site calibrate --bias): softmax(logits / T + bias)")
    preset: dict[str, Any]
    training: dict[str, Any]
    metrics: dict[str, Any]
    quantization: dict[str, Any] | None = Field(None, description="INT8 settings and calibration (quantized ONNX only)")
    parity_gate: dict[str, Any] | None = Field(None, description="INT8 vs fp32 parity gate measured at export")
    heatmap_available: bool
    heatmap_note: str | None = None
    severity: dict[str, Any] | None = None
    always_severity: bool = False
    limits: Limits
    notice: str
