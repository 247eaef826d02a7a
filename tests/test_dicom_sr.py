"""The DICOM results without a network: SR content (highdicom and plain pydicom), the secondary capture,
severity, flags, attribute hygiene, and ``covidcxr predict --dicom-out``."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from covidcxr.cli import main
from covidcxr.dicom.analysis import Engine
from covidcxr.dicom.results import build_results, read_header, to_bytes
from covidcxr.dicom.sr import read_result
from covidcxr.io import decode
from covidcxr.predict import Predictor, file_sha256

from test_dicom_node_support import CLASSES, make_classifier, renamed, wrap_image

NOTICE = "RESEARCH USE ONLY — NOT FOR DIAGNOSIS"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_classifier(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")


@pytest.fixture(scope="module")
def engine(ckpt: Path) -> Engine:
    return Engine(Predictor.from_path(ckpt))


@pytest.fixture(scope="module")
def rsna(samples_dir: Path) -> bytes:
    return (samples_dir / "rsna-pneumonia-sample.dcm").read_bytes()


def roundtrip(ds: pydicom.Dataset) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(to_bytes(ds)))


def results(engine: Engine, data: bytes, **kw):
    header = read_header(data)
    image, _ = decode(data)
    a = engine.analyze(image, header, **kw)
    r = build_results(header, a, engine)
    return header, image, a, roundtrip(r.sr), roundtrip(r.sc)


def num_items(sr: pydicom.Dataset) -> dict[str, float]:
    """NUM content items by concept meaning, walking the tree with plain pydicom."""
    out: dict[str, float] = {}

    def walk(items: pydicom.Sequence) -> None:
        for it in items:
            if it.ValueType == "NUM":
                out[it.ConceptNameCodeSequence[0].CodeMeaning] = float(it.MeasuredValueSequence[0].NumericValue)
            if "ContentSequence" in it:
                walk(it.ContentSequence)

    walk(sr.ContentSequence)
    return out


def test_sr_content_in_highdicom_and_pydicom(engine: Engine, rsna: bytes, ckpt: Path) -> None:
    header, image, a, sr, _ = results(engine, rsna)
    expected = engine.predictor.predict_arrays([image])[0]
    # identity: SR in the source's study, a new series, referencing the source instance
    assert sr.SOPClassUID == COMPREHENSIVE_SR and sr.Modality == "SR"
    assert sr.StudyInstanceUID == header.StudyInstanceUID and sr.SeriesInstanceUID != header.SeriesInstanceUID
    ev = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ev.ReferencedSOPInstanceUID == header.SOPInstanceUID
    # content, through highdicom
    res = read_result(sr)
    assert res["referenced_sop_instance_uids"] == [header.SOPInstanceUID]
    assert res["label"] == expected["label"] == a.label
    for c in CLASSES:
        assert res["probabilities"][c] == pytest.approx(expected["probabilities"][c], abs=1e-12)
    assert res["threshold"] == 0.4
    assert res["algorithm"]["name"] == "tiny-dicom-test"
    assert res["algorithm"]["version"] == engine.predictor.version  # issue 19: every SR names model and version
    assert res["algorithm"]["sha256"] == file_sha256(ckpt)  # and the file's full sha256
    assert any("0.4" in p for p in res["algorithm"]["parameters"])  # the operating point, stated
    assert res["notice"].startswith(NOTICE) and "Not a medical device" in res["notice"]
    # the same numbers with plain pydicom, no highdicom involved
    nums = num_items(sr)
    assert {f"Probability of {c}" for c in CLASSES} <= nums.keys()
    assert nums["Probability of COVID-19"] == pytest.approx(expected["probabilities"]["COVID-19"], abs=1e-12)
    assert sr.SpecificCharacterSet == "ISO_IR 192"  # the em dash survives


def test_uids_are_stable_so_a_retry_does_not_duplicate(engine: Engine, rsna: bytes) -> None:
    _, _, _, sr1, sc1 = results(engine, rsna)
    _, _, _, sr2, sc2 = results(engine, rsna)
    assert sr1.SOPInstanceUID == sr2.SOPInstanceUID and sc1.SOPInstanceUID == sc2.SOPInstanceUID
    assert len({sr1.SOPInstanceUID, sc1.SOPInstanceUID, sr1.SeriesInstanceUID, sc1.SeriesInstanceUID}) == 4
    other = to_bytes(renamed(rsna))
    _, _, _, sr3, _ = results(engine, other)
    assert sr3.SOPInstanceUID != sr1.SOPInstanceUID
    assert sr3.SeriesInstanceUID == sr1.SeriesInstanceUID  # one result series per source series and model


def test_only_required_patient_and_study_attributes_are_copied(engine: Engine, rsna: bytes) -> None:
    src = renamed(rsna, PatientAge="061Y", PatientWeight="70", OtherPatientIDs="OTHER-1", InstitutionName="Hosp",
                  OperatorsName="Op^Erator", PatientAddress="Street 1", StudyDescription="chest")
    header, _, _, sr, sc = results(engine, to_bytes(src))
    for ds in (sr, sc):
        assert ds.PatientID == header.PatientID and ds.PatientName == header.PatientName
        for kw in ("PatientAge", "PatientWeight", "OtherPatientIDs", "InstitutionName", "OperatorsName",
                   "PatientAddress", "StudyDescription"):
            assert kw not in ds, kw
        assert {e.keyword for e in ds if e.tag.group == 0x0010} <= {
            "PatientName", "PatientID", "PatientBirthDate", "PatientSex"}


def test_secondary_capture_has_heatmap_and_notice_burned_in(engine: Engine, rsna: bytes) -> None:
    header, _, a, _, sc = results(engine, rsna)
    assert sc.StudyInstanceUID == header.StudyInstanceUID and sc.SeriesInstanceUID != header.SeriesInstanceUID
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == header.SOPInstanceUID
    assert sc.BurnedInAnnotation == "YES" and sc.PhotometricInterpretation == "RGB"
    assert NOTICE in sc.ImageComments and a.label in sc.ImageComments
    px = sc.pixel_array
    assert px.shape[1] == 512 and px.shape[0] > 512 and px.shape[2] == 3
    banner = px[1:10].reshape(-1, 3)
    assert (banner[:, 0] > 150).mean() > 0.6 and (banner == 255).all(axis=1).any()  # red band, white letters
    # the heatmap is blended in: a colour image, not gray copied into three channels
    body = px[60:500].astype(int)
    assert np.abs(body[..., 0] - body[..., 2]).mean() > 5


def test_severity_scores_reach_the_sr(ckpt: Path, rsna: bytes, tmp_path: Path) -> None:
    pytest.importorskip("covidcxr.severity.model")
    from covidcxr import models
    from covidcxr.predict import SeverityScorer
    from covidcxr.preprocess import get_preset

    sev = tmp_path / "sev.ckpt"
    models.save(sev, models.build("resnet18", num_classes=2), arch="resnet18", classes=["geographic_extent", "opacity"],
                task="severity-scores", preset=get_preset("deepcovid", size=64))
    eng = Engine(Predictor.from_path(ckpt), SeverityScorer.from_path(sev), always_severity=True)
    _, image, a, sr, sc = results(eng, rsna)
    res = read_result(sr)
    assert set(res["severity"]) == {"geographic_extent", "opacity"}
    assert res["severity"] == pytest.approx({k: a.severity[k] for k in res["severity"]}, abs=1e-9)
    assert 0 <= res["severity"]["geographic_extent"] <= 8 and 0 <= res["severity"]["opacity"] <= 6
    assert "severity" in sc.ImageComments


def test_implausible_or_lateral_input_gets_a_flagged_sr_without_a_label(engine: Engine, rsna: bytes) -> None:
    # the verdict of predict's plausibility gate in the record (covidcxr.predict.gate) ...
    header = read_header(rsna)
    image, _ = decode(rsna)
    probs = {"normal": 0.1, "pneumonia": 0.1, "COVID-19": 0.8}
    verdict = {"verdict": "implausible", "plausible": False, "reason": "no lungs of plausible size", "rule": "area"}
    rec = {"label": "not_a_frontal_cxr", "flag": "not_a_frontal_cxr", "probabilities": probs, "threshold": 0.4,
           "plausibility": verdict}
    a = engine.analyze(image, header, rec=rec)
    sr = roundtrip(build_results(header, a, engine).sr)
    res = read_result(sr)
    assert res["flag"] == "not_a_frontal_cxr" and res["label"] is None and res["probabilities"] == {}
    assert res["texts"]["Reason the input was not assessed"] == "no lungs of plausible size"
    assert res["texts"]["Input plausibility check"] == "implausible: no lungs of plausible size"
    # ... with --label-implausible the disease label stays, and the SR still carries the flag
    kept = engine.analyze(image, header, rec={**rec, "label": "COVID-19"})
    res = read_result(roundtrip(build_results(header, kept, engine).sr))
    assert res["label"] == "COVID-19" and res["flag"] == "not_a_frontal_cxr" and res["probabilities"] == probs
    # ... and a header that says lateral
    _, _, a2, sr2, sc2 = results(engine, to_bytes(renamed(rsna, ViewPosition="LL")))
    assert a2.flag == "not_a_frontal_cxr" and read_result(sr2)["label"] is None
    assert "NOT ASSESSED" in sc2.ImageComments


def test_predict_dicom_out_writes_sr_and_sc_per_dicom_input(ckpt: Path, samples_dir: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "a.dcm").write_bytes((samples_dir / "rsna-pneumonia-sample.dcm").read_bytes())
    (scans / "b.dcm").write_bytes((samples_dir / "monochrome1-sample.dcm").read_bytes())
    rng = np.random.default_rng(0)
    (scans / "c.dcm").write_bytes(to_bytes(wrap_image((rng.random((300, 280)) * 65535).astype(np.uint16))))
    (scans / "d.png").write_bytes((samples_dir / "nih-00000001_000.png").read_bytes())
    before = {p.name: p.read_bytes() for p in scans.iterdir()}
    out, preds = tmp_path / "dicom-out", tmp_path / "preds.jsonl"
    assert main(["predict", str(scans), "--model", str(ckpt), "--dicom-out", str(out), "--out", str(preds),
                 "--workers", "0", "-q"]) == 0
    recs = {Path(r["path"]).name: r for r in map(json.loads, preds.read_text().splitlines())}
    # with the lung U-Net (../shared/weights) the gate runs: the RSNA film passes, the noise image and the
    # MONOCHROME1 sample (lungs cover 0.0% of it in the U-Net's mask) do not; without it nothing is flagged
    from conftest import WEIGHTS

    flagged = {"b.dcm", "c.dcm"} if (WEIGHTS / "README.md").is_file() else set()
    for name in ("a.dcm", "b.dcm", "c.dcm"):
        r = recs[name]
        sr = pydicom.dcmread(r["dicom_sr"])
        sc = pydicom.dcmread(r["dicom_sc"])
        src = pydicom.dcmread(scans / name, stop_before_pixels=True)
        res = read_result(sr)
        assert res["referenced_sop_instance_uids"] == [src.SOPInstanceUID]
        assert sc.StudyInstanceUID == sr.StudyInstanceUID == src.StudyInstanceUID and sc.BurnedInAnnotation == "YES"
        if name in flagged:  # the plausibility gate flagged it (pinned below): so does the SR, with the reason
            assert r["flag"] == "not_a_frontal_cxr" and r["plausibility"]["plausible"] is False, (name, r)
            assert res["flag"] == r["flag"] and res["label"] is None and res["probabilities"] == {}, name
            assert res["not_assessed_reason"] == "not_frontal_cxr", name
            assert res["texts"]["Input plausibility check"].startswith(r["plausibility"]["verdict"]), name
            continue
        assert not r.get("flag") and r["label"] in CLASSES, (name, r)
        assert res["label"] == r["label"] and res["flag"] is None, name
        for c in CLASSES:
            assert res["probabilities"][c] == pytest.approx(r["probabilities"][c], abs=1e-12)
    assert "dicom_sr" not in recs["d.png"] and "not a DICOM input" in recs["d.png"]["dicom_note"]
    assert len(list(out.glob("*.sr.dcm"))) == 3 and len(list(out.glob("*.sc.dcm"))) == 3
    assert {p.name: p.read_bytes() for p in scans.iterdir()} == before  # inputs untouched
    assert "--dicom-out: wrote SR + secondary capture for 3 DICOM inputs" in capsys.readouterr().err
