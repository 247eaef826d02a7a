"""The Structured Report: a TID 1500 measurement report made with highdicom.

One measurement group references the source image by SOP Instance UID and holds:

* the finding (TID 1501 "Finding"), in standard codes: SNOMED CT 840539006 (COVID-19), 233604007
  (pneumonia), 17621005 (normal); SNOMED CT 373121007 "Not Evaluated" when no disease label was given,
  with the reason as a qualitative evaluation: DCM 111218 "Software failure" (the analysis failed),
  "input not a frontal chest X-ray" (header or plausibility check) or SNOMED CT 74964007 "Other";
* one NUM "Probability of <class>" per class (UCUM unit ``1``) and the operating point,
* the conformal prediction set of a site-calibrated model (one CODE per class in it, standard codes, and
  a TEXT: the class alone or "uncertain: refer (...)"),
* the algorithm (TID 4019): the model's name and version, its file's sha256, the operating point,
  temperature and covidcxr version as parameters,
* severity scores when present (NUM) or the severity level (CODE),
* the plausibility verdict as a qualitative evaluation when the image was flagged,
* a TEXT DCM 121106 "Comment" with the research-use-only statement.

Private codes (scheme ``99COVIDCXR``, declared in the Coding Scheme Identification Sequence) remain only
for concepts no standard has: the class probabilities, the operating point, severity scores, the
plausibility flag and texts, "input not a frontal chest X-ray", the prediction set's concept names.

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
#: The finding when no disease label was given; why is said by one of the NOT_ASSESSED_REASONS.
NOT_ASSESSED = CodedConcept("373121007", "SCT", "Not Evaluated")
REASON_NOT_ASSESSED = CodedConcept("reason-not-asmt", SCHEME, "Reason not assessed")
NOT_ASSESSED_REASONS = {
    "software_error": CodedConcept("111218", "DCM", "Software failure"),
    "not_frontal_cxr": CodedConcept("not-frontal-cxr", SCHEME, "Input not a frontal chest X-ray"),
    "other": CodedConcept("74964007", "SCT", "Other"),
}
PLAUSIBILITY = CodedConcept("input-plausibility", SCHEME, "Input plausibility")
OPERATING_POINT = CodedConcept("operating-point", SCHEME, "COVID-19 operating point (probability threshold)")
NOTICE_CONCEPT = CodedConcept("121106", "DCM", "Comment")
PREDICTION_SET = CodedConcept("prediction-set", SCHEME, "Conformal prediction set")
IN_PREDICTION_SET = CodedConcept("in-pred-set", SCHEME, "Class in the conformal prediction set")
PLAUSIBILITY_TEXT = CodedConcept("plausibility-txt", SCHEME, "Input plausibility check")
FLAG_REASON = CodedConcept("flag-reason", SCHEME, "Reason the input was not assessed")
SEVERITY_LEVEL = CodedConcept("severity-level", SCHEME, "Severity level")
UNIT_ONE = CodedConcept("1", "UCUM", "no units")
UNIT_SCORE = CodedConcept("{score}", "UCUM", "score")
PROCEDURE = CodedConcept("399208008", "SCT", "Plain chest X-ray")
#: Sort-of stable short code values (SH: 16 chars at most).
_MAX_CODE = 16


def coding_scheme_identification() -> Dataset:
    """The Coding Scheme Identification Sequence item declaring the private scheme (PS3.3 C.12.1.1.6)."""
    item = Dataset()
    item.CodingSchemeDesignator = SCHEME
    item.CodingSchemeName = "covidcxr private concepts (research use only)"
    item.CodingSchemeResponsibleOrganization = "covidcxr project"
    return item


def not_assessed_reason(analysis: Analysis) -> str:
    """Why an image got no disease label: ``software_error``, ``not_frontal_cxr`` or ``other``.

    Read from what the record said: an ``error`` (or the node's ``analysis_failed``) is a software
    failure; a header flag or a failed plausibility verdict means the input is not a frontal chest X-ray.
    """
    if analysis.error or analysis.flag == "analysis_failed":
        return "software_error"
    verdict = analysis.plausibility or {}
    if analysis.flag in ("not_a_frontal_cxr", "not_a_chest_xray") or verdict.get("verdict") == "implausible" or (
            verdict.get("plausible") is False):
        return "not_frontal_cxr"
    return "other"


def model_identity(analysis: Analysis, engine: Engine) -> dict[str, str]:
    """{name, version, sha256} of the model: the record's own (issue 19), else the engine's."""
    m = analysis.model if isinstance(analysis.model, dict) else {}
    sha = str(m.get("sha256") or engine.sha256)
    version = str(m.get("version") or getattr(engine.predictor, "version", "") or sha[:12])
    return {"name": str(m.get("name") or engine.model_name), "version": version, "sha256": sha}


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


def algorithm(engine: Engine, analysis: Analysis | None = None) -> hd.sr.AlgorithmIdentification:
    p = engine.predictor
    model = model_identity(analysis or Analysis(), engine)
    params = [
        f"model sha256 {model['sha256']}",
        f"operating point: COVID-19 when P(COVID-19) >= {p.threshold}" if p.threshold is not None
        else "operating point: none stored (label = most probable class)",
        f"temperature {p.temperature:g}",
        *([f"logit bias {', '.join(f'{c} {v:+.3f}' for c, v in zip(p.classes, p.logit_bias))}"]
          if getattr(p, "logit_bias", None) is not None else []),
        f"arch {p.arch}",
        f"covidcxr {__version__}",
    ]
    return hd.sr.AlgorithmIdentification(name=model["name"][:64], version=model["version"][:64], parameters=params,
                                         manufacturer=MANUFACTURER)


def build_sr(source: Dataset, analysis: Analysis, engine: Engine) -> hd.sr.ComprehensiveSR:
    """The SR for one analysed source instance (UIDs derived from source + model: retries give the same ones)."""
    src = minimal_source(source)
    algo = algorithm(engine, analysis)
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
    if analysis.label is None:
        qualitative.append(hd.sr.QualitativeEvaluation(REASON_NOT_ASSESSED,
                                                       NOT_ASSESSED_REASONS[not_assessed_reason(analysis)]))
    if analysis.flagged:
        qualitative.append(hd.sr.QualitativeEvaluation(
            PLAUSIBILITY, CodedConcept(analysis.flag[:_MAX_CODE], SCHEME, analysis.flag)))  # meaning: the full flag
    pset = analysis.prediction_set
    if pset is not None:
        for cls in pset:
            qualitative.append(hd.sr.QualitativeEvaluation(IN_PREDICTION_SET, finding_code(cls)))
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
    if pset is not None:
        from covidcxr.site.sets import describe_set

        items.append(hd.sr.TextContentItem(name=PREDICTION_SET, value=describe_set(pset)[:1024],
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
    sr.CodingSchemeIdentificationSequence = [coding_scheme_identification()]
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
    quals = g.get_qualitative_evaluations()
    out["flag"] = next((q.value.meaning for q in quals if q.name == PLAUSIBILITY), None)
    by_reason = {(c.value, c.scheme_designator): k for k, c in NOT_ASSESSED_REASONS.items()}
    out["not_assessed_reason"] = next((by_reason.get((q.value.value, q.value.scheme_designator), q.value.meaning)
                                       for q in quals if q.name == REASON_NOT_ASSESSED), None)
    in_set = [by_code.get((q.value.value, q.value.scheme_designator), q.value.meaning) for q in quals
              if q.name == IN_PREDICTION_SET]
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
    algo["sha256"] = next((p.split()[-1] for p in algo["parameters"] if p.startswith("model sha256 ")), None)
    out["algorithm"] = algo
    out["notice"] = out["texts"].get(NOTICE_CONCEPT.meaning)
    out["prediction_set"] = in_set if PREDICTION_SET.meaning in out["texts"] else None
    return out
