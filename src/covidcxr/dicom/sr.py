"""The Structured Report: a TID 1500 measurement report made with highdicom.

One measurement group references the source image by SOP Instance UID and holds:

* the finding (TID 1501 "Finding": SNOMED CT codes for COVID-19, pneumonia, normal; a private code
  for other classes and for "not assessed" when the image was flagged),
* one NUM "Probability of <class>" per class (UCUM unit ``1``) and the operating point,
* the algorithm (TID 4019): model name, the checkpoint's full sha256 as version, the operating point,
  temperature and covidcxr version as parameters,
* severity scores when present (NUM) or the severity level (CODE),
* the plausibility verdict as a qualitative evaluation when the image was flagged,
* a TEXT item with the research-use-only statement.

Patient and study attributes come from :func:`minimal_source`, i.e. only the Patient and General Study
module attributes the SR IOD requires.
"""

from __future__ import annotations

from typing import Any

import highdicom as hd
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from covidcxr import __version__
from covidcxr.dicom.analysis import Analysis, Engine
from covidcxr.dicom.common import (
    BURNED_NOTICE,
    MANUFACTURER,
    SCHEME,
    SR_SERIES_NUMBER,
    derived_uid,
)
from covidcxr.predict import RESEARCH_NOTICE

#: Patient module (Type 2) and General Study module attributes an SR/SC must carry; nothing else is copied.
REQUIRED_PATIENT_STUDY = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
)
_REFERENCE = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID")
#: Results are written in UTF-8 (the notice has an em dash); values read from the source are already decoded.
CHARSET = "ISO_IR 192"

FINDING_CODES = {
    "COVID-19": CodedConcept("840539006", "SCT", "COVID-19"),
    "pneumonia": CodedConcept("233604007", "SCT", "Pneumonia"),
    "normal": CodedConcept("17621005", "SCT", "Normal"),
}
NOT_ASSESSED = CodedConcept("not-assessed", SCHEME, "Not assessed: input not a frontal chest X-ray")
PLAUSIBILITY = CodedConcept("input-plausibility", SCHEME, "Input plausibility")
OPERATING_POINT = CodedConcept("operating-point", SCHEME, "COVID-19 operating point (probability threshold)")
NOTICE_CONCEPT = CodedConcept("ruo-notice", SCHEME, "Research use only statement")
PLAUSIBILITY_TEXT = CodedConcept("plausibility-txt", SCHEME, "Input plausibility check")
FLAG_REASON = CodedConcept("flag-reason", SCHEME, "Reason the input was not assessed")
SEVERITY_LEVEL = CodedConcept("severity-level", SCHEME, "Severity level")
UNIT_ONE = CodedConcept("1", "UCUM", "no units")
UNIT_SCORE = CodedConcept("{score}", "UCUM", "score")
PROCEDURE = CodedConcept("399208008", "SCT", "Plain chest X-ray")
#: Sort-of stable short code values (SH: 16 chars at most).
_MAX_CODE = 16


def probability_concept(cls: str) -> CodedConcept:
    return CodedConcept(f"p-{cls}"[:_MAX_CODE], SCHEME, f"Probability of {cls}")


def finding_code(label: str) -> CodedConcept:
    return FINDING_CODES.get(label) or CodedConcept(label[:_MAX_CODE], SCHEME, label)


def minimal_source(header: Dataset) -> Dataset:
    """The source's identity and the attributes the result IODs require, and nothing else."""
    ds = Dataset()
    for kw in _REFERENCE + REQUIRED_PATIENT_STUDY:
        if kw in header:
            setattr(ds, kw, header[kw].value)
    for kw in REQUIRED_PATIENT_STUDY:  # Type 2: present, possibly empty
        if kw not in ds and kw != "StudyInstanceUID":
            setattr(ds, kw, "")
    return ds


def algorithm(engine: Engine) -> hd.sr.AlgorithmIdentification:
    p = engine.predictor
    params = [
        f"checkpoint sha256 {engine.sha256}",
        f"operating point: COVID-19 when P(COVID-19) >= {p.threshold}" if p.threshold is not None
        else "operating point: none stored (label = most probable class)",
        f"temperature {p.temperature:g}",
        f"arch {p.arch}",
        f"covidcxr {__version__}",
    ]
    return hd.sr.AlgorithmIdentification(name=engine.model_name, version=engine.sha256, parameters=params,
                                         manufacturer=MANUFACTURER)


def build_sr(source: Dataset, analysis: Analysis, engine: Engine) -> hd.sr.ComprehensiveSR:
    """The SR for one analysed source instance (UIDs derived from source + model: retries give the same ones)."""
    src = minimal_source(source)
    algo = algorithm(engine)
    measurements = []
    if analysis.probabilities:
        for cls, v in analysis.probabilities.items():
            measurements.append(hd.sr.Measurement(name=probability_concept(cls), value=float(v), unit=UNIT_ONE))
    if engine.predictor.threshold is not None:
        measurements.append(hd.sr.Measurement(name=OPERATING_POINT, value=float(engine.predictor.threshold),
                                              unit=UNIT_ONE))
    qualitative = []
    sev = analysis.severity or {}
    for key, value in sev.items():
        if key in ("task", "ranges", "probabilities") or not isinstance(value, (int, float)):
            continue
        rng = (sev.get("ranges") or {}).get(key)
        meaning = f"Severity: {key}" + (f" (range {rng[0]:g}-{rng[1]:g})" if rng else "")
        measurements.append(hd.sr.Measurement(name=CodedConcept(f"sev-{key}"[:_MAX_CODE], SCHEME, meaning),
                                              value=float(value), unit=UNIT_SCORE))
    if isinstance(sev.get("level"), str):
        qualitative.append(hd.sr.QualitativeEvaluation(SEVERITY_LEVEL, CodedConcept(sev["level"][:_MAX_CODE], SCHEME,
                                                                                     sev["level"])))
    if analysis.flagged:
        qualitative.append(hd.sr.QualitativeEvaluation(
            PLAUSIBILITY, CodedConcept(analysis.flag[:_MAX_CODE], SCHEME, analysis.flag)))  # meaning: the full flag
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=derived_uid(source.SOPInstanceUID, engine.sha256, "tracking"),
                                                     identifier="covidcxr chest X-ray classification"),
        finding_type=NOT_ASSESSED if analysis.label is None else finding_code(analysis.label),
        algorithm_id=algo,
        measurements=measurements or None,
        qualitative_evaluations=qualitative or None,
        source_images=[hd.sr.SourceImageForMeasurementGroup(
            referenced_sop_class_uid=src.SOPClassUID, referenced_sop_instance_uid=src.SOPInstanceUID)],
    )
    items = group[0].ContentSequence
    if analysis.flagged:
        items.append(hd.sr.TextContentItem(name=FLAG_REASON, value=str(analysis.flag_reason)[:1024],
                                           relationship_type="CONTAINS"))
    verdict = analysis.plausibility or {}
    if verdict.get("verdict"):
        text = f"{verdict['verdict']}" + (f": {verdict['reason']}" if verdict.get("reason") else "")
        items.append(hd.sr.TextContentItem(name=PLAUSIBILITY_TEXT, value=text[:1024], relationship_type="CONTAINS"))
    items.append(hd.sr.TextContentItem(name=NOTICE_CONCEPT, value=f"{BURNED_NOTICE}. {RESEARCH_NOTICE}",
                                       relationship_type="CONTAINS"))
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derived_uid(MANUFACTURER, engine.sha256, "device"), name=MANUFACTURER, manufacturer_name=MANUFACTURER,
        model_name=engine.model_name)
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))
    report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=PROCEDURE,
                                     imaging_measurements=[group])
    sr = hd.sr.ComprehensiveSR(
        evidence=[src],
        content=report[0],
        series_instance_uid=derived_uid(source.get("SeriesInstanceUID", ""), engine.sha256, "sr-series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=derived_uid(source.SOPInstanceUID, engine.sha256, "sr"),
        instance_number=int(source.get("InstanceNumber") or 1),
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description="covidcxr AI result (research use only)",
        manufacturer_model_name=engine.model_name[:64],
        software_versions=f"covidcxr {__version__}",
    )
    sr.SpecificCharacterSet = CHARSET
    return sr


# --------------------------------------------------------------------------- reading back


def read_result(sr: Dataset) -> dict[str, Any]:
    """What an SR written by :func:`build_sr` says, read with highdicom: for tests, tools and audits."""
    doc = hd.sr.ComprehensiveSR.from_dataset(sr) if not isinstance(sr, hd.sr.ComprehensiveSR) else sr
    groups = doc.content.get_image_measurement_groups()
    if len(groups) != 1:
        raise ValueError(f"expected one measurement group, found {len(groups)}")
    g = groups[0]
    out: dict[str, Any] = {"probabilities": {}, "severity": {}, "threshold": None, "texts": {}}
    for m in g.get_measurements():
        code = m.name.value
        if code.startswith("p-"):
            out["probabilities"][m.name.meaning.removeprefix("Probability of ")] = float(m.value)
        elif code == OPERATING_POINT.value:
            out["threshold"] = float(m.value)
        elif code.startswith("sev-"):  # the code value is cut at 16 characters; the meaning has the name
            out["severity"][m.name.meaning.removeprefix("Severity: ").split(" (")[0]] = float(m.value)
    finding = g.finding_type
    out["finding"] = finding.meaning if finding is not None else None
    by_code = {(c.value, c.scheme_designator): cls for cls, c in FINDING_CODES.items()}
    out["label"] = None if finding is None or finding.value == NOT_ASSESSED.value else by_code.get(
        (finding.value, finding.scheme_designator), finding.meaning)
    out["finding_code"] = (finding.value, finding.scheme_designator) if finding is not None else None
    out["flag"] = next((q.value.meaning for q in g.get_qualitative_evaluations() if q.name == PLAUSIBILITY), None)
    out["referenced_sop_instance_uids"] = [str(s.referenced_sop_instance_uid) for s in g.source_images]
    algo: dict[str, Any] = {"parameters": []}
    for item in g[0].ContentSequence:
        if item.ValueType != "TEXT":
            continue
        meaning = item.ConceptNameCodeSequence[0].CodeMeaning
        if meaning == "Algorithm Parameters":
            algo["parameters"].append(str(item.TextValue))
        elif meaning in ("Algorithm Name", "Algorithm Version", "Algorithm Manufacturer"):
            algo[meaning.split()[-1].lower()] = str(item.TextValue)
        else:
            out["texts"][meaning] = str(item.TextValue)
    out["algorithm"] = algo
    out["notice"] = out["texts"].get(NOTICE_CONCEPT.meaning)
    return out
