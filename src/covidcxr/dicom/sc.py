"""The Secondary Capture: the model's view of the image, the heatmap blended on, the result and the notice burned in.

A secondary capture rather than a presentation state because every viewer shows it, including those
that ignore GSPS overlays; ``BurnedInAnnotation`` is ``YES`` so that de-identification tools know.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from covidcxr import __version__
from covidcxr.dicom.analysis import Analysis, Engine
from covidcxr.dicom.common import BURNED_NOTICE, MANUFACTURER, SC_SERIES_NUMBER, derived_uid
from covidcxr.dicom.sr import CHARSET, minimal_source

_FONTS = ("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf", "DejaVuSans-Bold.ttf")
#: Display convention of frontal chest radiographs (rows run to the patient's left, columns to the feet),
#: used when the source does not state its own orientation.
DEFAULT_ORIENTATION = ("L", "F")


@lru_cache(maxsize=8)
def _font(size: int) -> Any:
    from PIL import ImageFont

    for name in _FONTS:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)  # Pillow's bundled font (has the em dash)


def result_lines(analysis: Analysis, engine: Engine) -> list[str]:
    """The text burned under the image."""
    from covidcxr.dicom.sr import NOT_ASSESSED_REASONS, not_assessed_reason

    if analysis.label is None:
        why = NOT_ASSESSED_REASONS[not_assessed_reason(analysis)].meaning.lower()
        return [f"NOT ASSESSED ({why}): {analysis.flag_reason}"[:90],
                f"model {engine.model_name} ({engine.sha256[:12]})"]
    probs = analysis.probabilities or {}
    thr = f"   (COVID-19 threshold {analysis.threshold:.2f})" if analysis.threshold is not None else ""
    lines = [f"finding: {analysis.label}{thr}", "p: " + ", ".join(f"{c} {v:.2f}" for c, v in probs.items())]
    if analysis.prediction_set is not None:
        from covidcxr.site.sets import describe_set

        lines.append(f"prediction set: {describe_set(analysis.prediction_set)}")
    if analysis.severity:
        s = analysis.severity
        if "level" in s:
            lines.append(f"severity {s['level']}")
        else:
            lines.append("severity " + ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in s.items()
                                                 if isinstance(v, (int, float))))
    if analysis.flagged:
        lines.append(f"FLAGGED {analysis.flag}: {analysis.flag_reason}"[:90])
    lines.append(f"model {engine.model_name} ({engine.sha256[:12]}), Grad-CAM" if engine.heatmapper
                 else f"model {engine.model_name} ({engine.sha256[:12]}), no heatmap")
    return lines


def render(overlay: np.ndarray, lines: list[str]) -> np.ndarray:
    """Add a banner with the notice above and the result lines below: H' x W x 3 uint8."""
    from PIL import Image, ImageDraw

    h, w = overlay.shape[:2]
    size = max(12, w // 34)
    top = int(size * 2.0)
    bottom = int(size * 1.5) * len(lines) + size // 2
    canvas = Image.new("RGB", (w, h + top + bottom), (0, 0, 0))
    canvas.paste(Image.fromarray(np.ascontiguousarray(overlay)), (0, top))
    draw = ImageDraw.Draw(canvas)
    font = _font(size)
    box = draw.textbbox((0, 0), BURNED_NOTICE, font=font)
    draw.rectangle((0, 0, w, top - 1), fill=(180, 0, 0))
    draw.text(((w - (box[2] - box[0])) // 2, (top - (box[3] - box[1])) // 2 - box[1]), BURNED_NOTICE,
              fill=(255, 255, 255), font=font)
    y = h + top + size // 4
    for line in lines:
        fs = max(10, int(size * 0.8))
        while fs > 8 and draw.textlength(line, font=_font(fs)) > w - size:  # shrink a long line to fit
            fs -= 1
        draw.text((size // 2, y), line, fill=(255, 255, 0), font=_font(fs))
        y += int(size * 1.5)
    return np.asarray(canvas, dtype=np.uint8)


def _orientation(source: Dataset) -> tuple[str, str]:
    po = source.get("PatientOrientation")
    if po is not None and not isinstance(po, str) and len(po) == 2 and all(str(v).strip() for v in po):
        return str(po[0]), str(po[1])  # highdicom validates it; build_sc falls back when it refuses
    return DEFAULT_ORIENTATION


def _body_part_and_laterality(sc: Dataset, source: Dataset) -> None:
    """Body Part Examined and Laterality (General Series; Laterality is Type 2C: required for a paired
    body part). The chest is not paired, so a chest image carries no Laterality; any other body part
    gets the source's laterality, or an empty one (unknown). dciodvfy counts a missing one as an error."""
    from covidcxr.dicom.analysis import _CHEST_PARTS

    part = str(source.get("BodyPartExamined", "") or "").strip().upper()
    sc.BodyPartExamined = (part or "CHEST")[:16]  # the node reads an unstated body part as chest
    side = str(source.get("Laterality", "") or source.get("ImageLaterality", "") or "").strip().upper()
    if side in ("R", "L"):
        sc.Laterality = side
    elif part not in _CHEST_PARTS:
        sc.Laterality = ""  # paired, or not known to be unpaired: present, value unknown


def build_sc(source: Dataset, analysis: Analysis, engine: Engine) -> hd.sc.SCImage:
    """The secondary capture for one source instance, in its study, in a new series."""
    if analysis.overlay is None:
        raise ValueError("analysis has no overlay image")
    src = minimal_source(source)
    pixels = render(analysis.overlay, result_lines(analysis, engine))
    kwargs = dict(
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        study_instance_uid=src.StudyInstanceUID,
        series_instance_uid=derived_uid(source.get("SeriesInstanceUID", ""), engine.sha256, "sc-series"),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=derived_uid(source.SOPInstanceUID, engine.sha256, "sc"),
        instance_number=int(source.get("InstanceNumber") or 1),
        manufacturer=MANUFACTURER,
        patient_id=src.PatientID,
        patient_name=src.PatientName,
        patient_birth_date=src.PatientBirthDate,
        patient_sex=src.PatientSex,
        accession_number=src.AccessionNumber,
        study_id=src.StudyID,
        study_date=src.StudyDate,
        study_time=src.StudyTime,
        referring_physician_name=src.ReferringPhysicianName,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description="covidcxr heatmap (research use only)",
        software_versions=f"covidcxr {__version__}",
    )
    try:
        sc = hd.sc.SCImage(patient_orientation=_orientation(source), **kwargs)
    except ValueError:  # an orientation value highdicom does not accept: fall back to the convention
        sc = hd.sc.SCImage(patient_orientation=DEFAULT_ORIENTATION, **kwargs)
    sc.SpecificCharacterSet = CHARSET
    _body_part_and_laterality(sc, source)
    sc.BurnedInAnnotation = "YES"
    sc.ConversionType = "WSD"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.DerivationDescription = ("covidcxr Grad-CAM heatmap over the model's crop of the source image"
                                if engine.heatmapper else "covidcxr: the model's crop of the source image")
    sc.ImageComments = f"{BURNED_NOTICE}. " + " | ".join(result_lines(analysis, engine))[:10000]
    ref = Dataset()
    ref.ReferencedSOPClassUID = src.SOPClassUID
    ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    return sc
