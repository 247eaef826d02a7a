"""The one decision rule: how class probabilities become a label, in every tool.

A checkpoint holds at most one operating point: a COVID-19 threshold chosen on the validation split
(by ``covidcxr train`` or ``covidcxr evaluate --set-threshold``). ``evaluate``, ``compare``,
``explain``, ``predict``, ``serve`` and the web page all build a :class:`DecisionRule` from the
checkpoint and label with it, and each states the rule and the threshold's value in its output:

* with a threshold: COVID-19 when p(COVID-19) >= threshold, else the most probable other class;
* without one: the most probable class (argmax).

Where the threshold came from travels with it (``chosen_on``): a threshold chosen on the very data
being evaluated (a test split, say) is labelled as such, because its figures are optimistic.

This module also holds the step before the rule, temperature-scaled softmax (formerly
``covidcxr.predict.rules``), so that probabilities and labels come from one place.

Numpy only: the ONNX paths import this without torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np

POSITIVE_CLASS = "COVID-19"


@dataclass(frozen=True)
class DecisionRule:
    """A COVID-19 operating threshold (or None: argmax) and where it was chosen."""

    threshold: float | None = None
    positive: str = POSITIVE_CLASS
    #: the split the threshold was chosen on ("val", "test", ...), "user" for a --threshold given by
    #: hand, or None when the checkpoint does not say
    chosen_on: str | None = None
    #: a short account of the choice, e.g. "sensitivity >= 0.95 on val (40 images, 12 COVID-19)"
    detail: str = ""

    @classmethod
    def from_checkpoint(cls, threshold: float | None, metrics: Mapping[str, Any] | None = None,
                        positive: str = POSITIVE_CLASS) -> "DecisionRule":
        """The rule stored in a checkpoint bundle (its ``threshold`` and ``metrics.operating_point``)."""
        if threshold is None:
            return cls(None, positive)
        op = dict((metrics or {}).get("operating_point") or {})
        chosen_on = op.get("chosen_on")
        if chosen_on is None:
            note = str(op.get("note", "")).lower()
            chosen_on = "val" if "validation" in note or " val" in note else None
        detail = str(op.get("note", ""))
        if op.get("target_sensitivity") is not None and not detail:
            detail = f"sensitivity >= {op['target_sensitivity']} on {chosen_on or 'unrecorded data'}"
        return cls(float(threshold), str(op.get("positive") or positive), chosen_on, detail)

    @classmethod
    def from_predictor(cls, predictor: Any) -> "DecisionRule":
        """The rule of a :class:`covidcxr.predict.Predictor` or :class:`covidcxr.models.LoadedModel`."""
        return cls.from_checkpoint(getattr(predictor, "threshold", None), getattr(predictor, "metrics", None))

    def override(self, threshold: float) -> "DecisionRule":
        """A threshold given by hand (``evaluate --threshold``)."""
        return DecisionRule(float(threshold), self.positive, "user", "set with --threshold")

    def uses_threshold(self, classes: Sequence[str]) -> bool:
        return self.threshold is not None and self.positive in list(classes)

    def label_indices(self, probs: np.ndarray, classes: Sequence[str]) -> np.ndarray:
        """N x K probabilities -> N class indices under this rule."""
        p = np.asarray(probs, dtype=np.float64)
        if p.ndim == 1:
            p = p[None]
        pred = p.argmax(1)
        if not self.uses_threshold(classes):
            return pred
        pos = list(classes).index(self.positive)
        rest = p.copy()
        rest[:, pos] = -np.inf
        return np.where(p[:, pos] >= float(self.threshold), pos, rest.argmax(1))  # type: ignore[arg-type]

    def label(self, probs: Sequence[float], classes: Sequence[str]) -> str:
        """One row of probabilities -> the class name under this rule."""
        return list(classes)[int(self.label_indices(np.asarray(probs)[None], classes)[0])]

    def provenance(self, evaluated_split: str | None = None) -> str:
        """Where the threshold came from, flagging one chosen on the data being evaluated."""
        if self.threshold is None:
            return "no operating threshold stored in the checkpoint"
        if self.chosen_on == "user":
            return "set by hand with --threshold"
        if self.chosen_on is None:
            return "chosen on data the checkpoint does not record"
        if evaluated_split is not None and self.chosen_on == evaluated_split:
            return (f"chosen on the {self.chosen_on} split, the data evaluated here: "
                    "figures at this threshold are optimistic")
        return f"chosen on the {'validation' if self.chosen_on == 'val' else self.chosen_on} split"

    def describe(self, classes: Sequence[str] | None = None, evaluated_split: str | None = None) -> str:
        """One line stating the rule and the threshold's value, e.g. for a report header."""
        if self.threshold is None or (classes is not None and self.positive not in list(classes)):
            why = "no operating threshold stored in the checkpoint" if self.threshold is None else (
                f"the model has no {self.positive} output")
            return f"argmax: the most probable class ({why})"
        return (f"{self.positive} if p({self.positive}) >= {self.threshold:.4f}, else the most probable other class "
                f"(threshold {self.provenance(evaluated_split)})")

    def to_dict(self, classes: Sequence[str] | None = None, evaluated_split: str | None = None) -> dict[str, Any]:
        d = asdict(self)
        d["rule"] = "threshold" if self.threshold is not None and (
            classes is None or self.positive in list(classes)) else "argmax"
        d["text"] = self.describe(classes, evaluated_split)
        return d


def softmax_with_temperature(logits: Any, temperature: float = 1.0, bias: Any = None) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature + bias`` in float64 (stable), returned as float64.

    ``bias`` (one value per class, or None) is a site checkpoint's ``logit_bias`` (bias-corrected temperature
    scaling, :mod:`covidcxr.site.calibrate`); None or absent is exactly softmax(logits / temperature).

    A row with a NaN or infinite logit comes out non-finite (NaN): :func:`finite_rows` tells the
    caller, who must turn it into an error, never a label.
    """
    if hasattr(logits, "detach"):  # a torch tensor (tests and callers holding torch outputs)
        logits = logits.detach().float().cpu().numpy()
    z = np.asarray(logits, dtype=np.float64) / float(temperature or 1.0)
    if bias is not None:
        z = z + np.asarray(bias, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)


def logit_bias_of(value: Any, n_classes: int, where: str) -> list[float] | None:
    """A checkpoint's ``logit_bias`` checked: None (no bias: plain temperature scaling) or ``n_classes`` finite
    floats; anything else is a ValueError naming ``where`` (the file)."""
    if value is None:
        return None
    try:
        b = [float(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: logit_bias {value!r} is not a list of numbers") from None
    if len(b) != n_classes or not all(np.isfinite(b)):
        raise ValueError(f"{where}: logit_bias {b} must hold {n_classes} finite numbers (one per class)")
    return b


def finite_rows(probs: Any) -> np.ndarray:
    """N booleans: which rows of probabilities are all finite (a NaN/inf row must never get a label)."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1:
        p = p[None]
    return np.isfinite(p).all(axis=1)


def decide_label(probs: Sequence[float], classes: Sequence[str], threshold: float | None) -> str:
    """COVID-19 when its probability reaches ``threshold``, else argmax of the other classes."""
    return DecisionRule(threshold, POSITIVE_CLASS).label(probs, classes)
