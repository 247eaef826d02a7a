"""The plausibility gate: applies the frontal-CXR check to records, in front of every disease label.

Roles: :mod:`covidcxr.segment.plausibility` *assesses* one image (lung U-Net + intensity rules);
this module *gates* predictions with that assessment (verdict in the record, relabelling, counters).
(Issue 11 §6.)

Every ``predict`` record and service response carries ``plausibility`` (verdict, reason, the rule
that failed) from :mod:`covidcxr.segment.plausibility` (the pretrained lung U-Net). An implausible
input -- a blank picture, noise, a strip, a lateral view, a photo -- is flagged
``not_a_frontal_cxr`` and by default gets that as its label instead of a disease label; its class
probabilities stay in the record for transparency. ``label_implausible=True`` (``--label-implausible``)
keeps the disease label, still flagged. When the check cannot run (no segmenter weights; on the
ONNX backend, no ONNX export of the U-Net -- it never imports torch), records say
``"verdict": "unchecked"`` and why after the mask-free rules, a warning says once what to run, and
labels are given as before. Such a failure is per image: the next image is checked again.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

NOT_FRONTAL = "not_a_frontal_cxr"


@dataclass(frozen=True)
class PlausibilityInput:
    """An extra 'preset' for the decode workers: the original image, shrunk to ``side`` px on its long side.

    The check segments at 256 px and measures shape and intensity, so a small copy with the original
    aspect ratio is all it needs; it travels from the workers instead of the full image.
    """

    side: int = 512

    def array(self, image: np.ndarray) -> np.ndarray:
        import cv2

        img = np.asarray(image, dtype=np.float32)
        h, w = img.shape[:2]
        f = self.side / float(max(h, w))
        if f < 1:
            img = cv2.resize(img, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
        return img


#: consecutive images the check could not run on before the gate reports itself down (``/healthz``, the node log)
DOWN_AFTER = 5


class PlausibilityGate:
    """Checks images and writes the verdict into records; see the module docstring.

    A failure of the check is per image (issue 21 §2.1): that record says ``unchecked`` with the reason,
    :attr:`failures` rises, and the next image is checked again. After :attr:`down_after` consecutive
    failures :meth:`status` says ``down`` (and the log says so once) until an image is checked again.
    """

    def __init__(self, enabled: bool = True, label_implausible: bool = False, segmenter: Any = None,
                 backend: str = "torch", torch_free: bool = False, down_after: int = DOWN_AFTER):
        self.enabled = enabled
        self.label_implausible = label_implausible
        #: the segmenter to load (name, path, LungSegmenter; None: the pretrained U-Net at the check's size)
        self.segmenter = segmenter
        #: the loaded segmenter with its mask cache, held for the gate's life; loaded on the first check that
        #: needs it, and tried again on the next image when loading fails (no per-process memo)
        self._checker: Any = None
        self.backend = backend
        #: the ONNX paths must not import torch: they run the lung U-Net's ONNX export with onnxruntime alone
        #: (``covidcxr.segment.loading.export_onnx`` writes it once); without the export only the rules that
        #: need no mask (aspect ratio, a uniform picture) run, the records say so, and a warning says what to run
        self.torch_free = torch_free
        self.down_after = max(1, int(down_after))
        self.off_reason: str | None = None if enabled else "plausibility check turned off (--no-plausibility)"
        self.flagged = 0
        self.checked = 0
        #: images the check failed on (total, and in a row), and the last reason
        self.failures = 0
        self.consecutive_failures = 0
        self.last_error: str | None = None
        self._said: set[str] = set()
        # the service finishes requests on several threads: one loads the U-Net, one mask at a time (the
        # mask cache is not thread-safe, and two U-Net runs at once would only share the same cores)
        self._lock = threading.Lock()

    @classmethod
    def for_predictor(cls, predictor: Any, enabled: bool = True, label_implausible: bool = False,
                      down_after: int = DOWN_AFTER) -> "PlausibilityGate":
        onnx = getattr(predictor, "backend_name", "torch") == "onnx"
        return cls(enabled, label_implausible, backend="onnx" if onnx else "torch", torch_free=onnx,
                   down_after=down_after)

    @property
    def down(self) -> bool:
        return self.enabled and self.consecutive_failures >= self.down_after

    def status(self) -> dict[str, Any]:
        """``{"state": "off" | "ok" | "down", "checked", "failures", "consecutive_failures", "last_error"}``."""
        state = "off" if not self.enabled else "down" if self.down else "ok"
        return {"state": state, "checked": self.checked, "failures": self.failures,
                "consecutive_failures": self.consecutive_failures, "last_error": self.last_error}

    def extra_presets(self) -> dict[str, Any]:
        return {"plausibility": PlausibilityInput()} if self.enabled else {}

    @staticmethod
    def input(image: np.ndarray) -> np.ndarray:
        """The gate's input from a decoded image: what the decode workers make (:class:`PlausibilityInput`)."""
        return PlausibilityInput().array(image)

    def _failed(self, err: BaseException) -> str:
        reason = f"plausibility check unavailable: {type(err).__name__}: {err}".splitlines()[0]
        self.failures += 1
        self.consecutive_failures += 1
        self.last_error = reason
        if reason not in self._said:  # each distinct reason is logged once, not per image
            self._said.add(reason)
            log.warning("%s; this image's record says 'unchecked' after the mask-free rules", reason)
        if self.consecutive_failures == self.down_after:
            log.error("plausibility gate is down: the check failed on %d images in a row (the warning above says "
                      "why); records say 'unchecked' until it works again", self.down_after)
        return reason

    def checker(self) -> Any:
        """The gate's segmenter (a CachedSegmenter), loaded on first use; raises when it cannot be loaded."""
        if self._checker is None:
            from covidcxr.segment.plausibility import check_segmenter

            self._checker = check_segmenter(self.segmenter, backend=self.backend, torch_free=self.torch_free)
        return self._checker

    def check(self, image: np.ndarray) -> dict[str, Any]:
        """``{"verdict", "plausible", "reason", "rule"}`` for one H x W [0, 1] image, and ``lung_fraction`` (the share
        of the image the lung mask covers) when the U-Net ran."""
        if not self.enabled:
            return {"verdict": "unchecked", "plausible": None, "reason": self.off_reason, "rule": None}
        from covidcxr.segment.plausibility import precheck  # torch-free: aspect ratio, a uniform picture

        img = np.asarray(image, dtype=np.float32)
        v = precheck(img)
        if v is not None:
            return {"verdict": v.verdict, "plausible": False, "reason": v.reason, "rule": v.rule}
        try:
            from covidcxr.segment.plausibility import check_plausibility

            with self._lock:
                v = check_plausibility(img, segmenter=self.checker())
                if self.down:
                    log.warning("plausibility gate is up again after %d failed images", self.consecutive_failures)
                self.consecutive_failures = 0
                self.checked += 1
            return {"verdict": v.verdict, "plausible": bool(v.plausible), "reason": v.reason, "rule": v.rule,
                    "lung_fraction": v.measurements.get("fraction")}
        except Exception as err:  # no weights, a broken segmenter: this image is unchecked; the next is tried again
            with self._lock:
                reason = self._failed(err)
        return {"verdict": "unchecked", "plausible": None, "rule": None,
                "reason": f"partly checked: aspect ratio and contrast pass; {reason}"}

    def apply(self, rec: dict[str, Any], image: np.ndarray | None = None) -> dict[str, Any]:
        """Add ``plausibility`` and ``flag`` to a good record; relabel it when implausible (unless overridden).

        ``image``: the decoded image, else ``rec["tensors"]["plausibility"]`` from the decode workers.
        """
        if rec.get("error"):
            return rec
        if image is None:
            image = (rec.get("tensors") or {}).get("plausibility")
        verdict = self.check(image) if image is not None else {
            "verdict": "unchecked", "plausible": None, "rule": None,
            "reason": self.off_reason or "no image was kept for the plausibility check"}
        rec["plausibility"] = verdict
        rec["flag"] = NOT_FRONTAL if verdict["plausible"] is False else None
        if rec["flag"]:
            self.flagged += 1
            if not self.label_implausible:
                rec["label"] = NOT_FRONTAL  # no disease label for what is not a frontal chest X-ray
        return rec

    def notes(self) -> list[str]:
        out = []  # a failing check was already logged, as a warning, when it happened
        if self.flagged:
            what = "kept their disease label (--label-implausible)" if self.label_implausible else (
                f"were labelled {NOT_FRONTAL} instead of a disease")
            out.append(f"{self.flagged} input(s) did not look like a frontal chest X-ray and {what}")
        if self.failures:
            out.append(f"the plausibility check could not run on {self.failures} input(s) (see the warning above); "
                       "their records say 'unchecked' and why")
        return out
