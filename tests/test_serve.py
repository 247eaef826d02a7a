"""REST service: every status code (200, 401, 413, 415, 422, 500, 503), logs, CORS, model card, OpenAPI, page."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from covidcxr import models
from covidcxr.preprocess import get_preset

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from covidcxr.serve import create_app  # noqa: E402

CLASSES = ["normal", "pneumonia", "COVID-19"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("serve") / "tiny.ckpt"
    models.save(path, models.build("resnet18", num_classes=3), arch="resnet18", classes=CLASSES,
                preset=get_preset("deepcovid", size=64), threshold=0.4,
                training={"run_name": "tiny-serve", "epochs": 1}, metrics={"test_auc": 0.5})
    return path


@pytest.fixture(scope="module")
def client(ckpt: Path) -> TestClient:
    with TestClient(create_app(ckpt, api_key="", max_upload_mb=1.0)) as c:
        yield c


@pytest.fixture(scope="module")
def jpeg(dev_dir: Path) -> bytes:
    return sorted((dev_dir / "images").glob("*.jpg"))[0].read_bytes()


@pytest.fixture(scope="module")
def dicom_with_phi(samples_dir: Path) -> bytes:
    """The RSNA sample with made-up patient tags that must never reach logs or responses."""
    import pydicom

    ds = pydicom.dcmread(samples_dir / "rsna-pneumonia-sample.dcm")
    ds.PatientName = "Doe^Secretname"
    ds.PatientID = "PID-0042-SECRET"
    ds.PatientBirthDate = "19010101"
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def _png_shape(b64: str) -> tuple[int, ...]:
    import cv2

    arr = cv2.imdecode(np.frombuffer(base64.b64decode(b64), np.uint8), cv2.IMREAD_UNCHANGED)
    assert arr is not None
    return arr.shape


def test_predict_jpeg_and_dicom_200(client: TestClient, jpeg: bytes, dicom_with_phi: bytes) -> None:
    r = client.post("/v1/predict", files={"file": ("x.jpg", jpeg, "image/jpeg")})
    assert r.status_code == 200, r.text
    j = r.json()
    assert set(j["probabilities"]) == set(CLASSES) and abs(sum(j["probabilities"].values()) - 1) < 1e-6
    assert j["label"] in CLASSES and j["threshold"] == 0.4
    assert j["model"]["name"] == "tiny-serve" and len(j["model"]["version"]) == 12 and j["model"]["arch"] == "resnet18"
    assert j["input"]["format"] == "jpeg" and j["heatmap_png"] is None and j["image_png"] is None
    assert "research use only" in j["notice"].lower()
    assert j["severity"] is None and "no severity model" in j["severity_note"]

    # DICOM, uploaded under a misleading name and type: the content decides
    r = client.post("/v1/predict?heatmap=true&image=true", files={"file": ("scan.png", dicom_with_phi, "image/png")})
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["input"]["format"] == "dicom" and (j["input"]["width"], j["input"]["height"]) == (1024, 1024)
    assert _png_shape(j["image_png"]) == (512, 512)
    # a PyTorch checkpoint with covidcxr.explain (part of this package): the heatmap is there, one outcome only
    assert j["heatmap_note"] is None and _png_shape(j["heatmap_png"]) == (512, 512, 4)
    assert "Secretname" not in r.text and "PID-0042" not in r.text


def test_415_not_an_image(client: TestClient) -> None:
    r = client.post("/v1/predict", files={"file": ("chest.png", b"%PDF-1.4 definitely not an X-ray", "image/png")})
    assert r.status_code == 415
    assert "not an image" in r.json()["detail"] and "content was checked" in r.json()["detail"]


def test_422_undecodable_or_unusable_image(client: TestClient, jpeg: bytes) -> None:
    r = client.post("/v1/predict", files={"file": ("x.jpg", jpeg[: len(jpeg) // 4], "image/jpeg")})
    assert r.status_code == 422 and "truncated" in r.json()["detail"].lower()
    import cv2

    ok, tiny = cv2.imencode(".png", np.zeros((20, 20), np.uint8))
    r = client.post("/v1/predict", files={"file": ("tiny.png", tiny.tobytes(), "image/png")})
    assert r.status_code == 422 and "too small" in r.json()["detail"]
    r = client.post("/v1/predict", files={"file": ("empty.png", b"", "image/png")})
    assert r.status_code == 422 and "empty" in r.json()["detail"]
    r = client.post("/v1/predict", data={"other": "x"})  # no "file" field
    assert r.status_code == 422


def test_413_upload_limit(client: TestClient) -> None:
    big = b"\x89PNG\r\n\x1a\n" + bytes(1_200_000)
    r = client.post("/v1/predict", files={"file": ("big.png", big, "image/png")})
    assert r.status_code == 413 and "limit is 1 MB" in r.json()["detail"]

    def chunks():  # no Content-Length: the limit is enforced while the body streams
        boundary = b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"b.png\"\r\n\r\n"
        yield boundary
        for _ in range(20):
            yield bytes(100_000)
        yield b"\r\n--xyz--\r\n"

    r = client.post("/v1/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert r.status_code == 413
    assert client.get("/healthz").status_code == 200  # and the server is fine


def test_401_api_key(ckpt: Path, jpeg: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COVIDCXR_API_KEY", "s3cret-key")
    with TestClient(create_app(ckpt)) as c:
        assert c.get("/healthz").json()["auth_required"] is True
        assert c.get("/v1/model").status_code == 401
        r = c.post("/v1/predict", files={"file": ("x.jpg", jpeg)})
        assert r.status_code == 401 and "API key" in r.json()["detail"]
        r = c.post("/v1/predict", files={"file": ("x.jpg", jpeg)}, headers={"X-API-Key": "wrong"})
        assert r.status_code == 401
        r = c.post("/v1/predict", files={"file": ("x.jpg", jpeg)}, headers={"X-API-Key": "s3cret-key"})
        assert r.status_code == 200
        assert c.get("/v1/model", headers={"X-API-Key": "s3cret-key"}).status_code == 200


def test_503_when_queue_full_and_on_queue_timeout(ckpt: Path, jpeg: bytes) -> None:
    import threading
    import time

    import httpx

    # The running request holds its slot until the test has seen the others answered (no sleep decides who
    # is inside when: a loaded machine must not change the outcome); a regression that makes the others
    # wait for it instead still fails, after the bound.
    async def burst(app, n: int, answered_while_held: int, gate: threading.Event) -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            tasks = [asyncio.create_task(c.post("/v1/predict", files={"file": ("x.jpg", jpeg)})) for _ in range(n)]
            deadline = time.monotonic() + 120
            while sum(t.done() for t in tasks) < answered_while_held and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            gate.set()
            return await asyncio.gather(*tasks)

    def held(real, gate: threading.Event):
        def infer(*a, **k):
            assert gate.wait(300), "the test never released the running request"
            return real(*a, **k)
        return infer

    # 1 running + 1 waiting: of 4 simultaneous requests, 2 are answered 503 at once
    app = create_app(ckpt, api_key="", max_concurrency=1, queue=1, max_batch=1)  # the unbatched path
    real = app.state.service.infer
    gate = threading.Event()
    app.state.service.infer = held(real, gate)
    codes = sorted(r.status_code for r in asyncio.run(burst(app, 4, 2, gate)))
    assert codes == [200, 200, 503, 503]
    gate = threading.Event()
    app.state.service.infer = held(real, gate)
    busy = [r for r in asyncio.run(burst(app, 4, 2, gate)) if r.status_code == 503][0]
    assert busy.headers["retry-after"] == "2" and "server busy" in busy.json()["detail"]

    # a long queue but a short wait: waiting too long is also a 503, not a hang
    app = create_app(ckpt, api_key="", max_concurrency=1, queue=10, queue_timeout=0.1, max_batch=1)
    gate = threading.Event()
    app.state.service.infer = held(app.state.service.infer, gate)
    codes = sorted(r.status_code for r in asyncio.run(burst(app, 3, 2, gate)))
    assert codes == [200, 503, 503]


def test_500_is_json_and_server_survives(ckpt: Path, jpeg: bytes) -> None:
    app = create_app(ckpt, api_key="", max_batch=1)  # unbatched; tests/test_batching.py has the batched 500

    def boom(*a, **k):
        raise RuntimeError("internal detail that must not leak")

    real = app.state.service.infer
    app.state.service.infer = boom
    with TestClient(app) as c:
        r = c.post("/v1/predict", files={"file": ("x.jpg", jpeg)})
        assert r.status_code == 500 and "internal error" in r.json()["detail"] and "must not leak" not in r.text
        app.state.service.infer = real
        assert c.post("/v1/predict", files={"file": ("x.jpg", jpeg)}).status_code == 200


def test_logs_hold_no_image_bytes_or_patient_tags(client: TestClient, dicom_with_phi: bytes,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        r = client.post("/v1/predict?heatmap=true", files={"file": ("Doe_Secretname.dcm", dicom_with_phi)})
        client.post("/v1/predict", files={"file": ("Doe_Secretname.png", b"garbage bytes here")})
    assert r.status_code == 200
    text = caplog.text
    assert "predict dicom 1024x1024" in text  # the request is logged ...
    for secret in ("Secretname", "PID-0042", "19010101", "garbage bytes"):
        assert secret not in text  # ... but not the patient, the file name or the bytes
    assert all(len(rec.getMessage()) < 500 for rec in caplog.records)


def test_cors_closed_by_default_and_opt_in(client: TestClient, ckpt: Path) -> None:
    pre = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    r = client.options("/v1/predict", headers=pre)
    assert "access-control-allow-origin" not in r.headers
    r = client.get("/healthz", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    with TestClient(create_app(ckpt, api_key="", cors_origins=["https://ok.example"])) as c:
        r = c.options("/v1/predict", headers={**pre, "Origin": "https://ok.example"})
        assert r.headers.get("access-control-allow-origin") == "https://ok.example"
        r = c.options("/v1/predict", headers=pre)
        assert r.headers.get("access-control-allow-origin") != "https://evil.example"


def test_model_card_health_openapi_and_page(client: TestClient) -> None:
    card = client.get("/v1/model").json()
    assert card["arch"] == "resnet18" and card["classes"] == CLASSES and card["preset"]["name"] == "deepcovid@64"
    assert card["training"]["run_name"] == "tiny-serve" and card["metrics"]["test_auc"] == 0.5
    assert card["limits"]["max_upload_mb"] == 1.0 and "research use only" in card["notice"].lower()
    h = client.get("/healthz").json()
    assert h["status"] == "ok" and h["capacity"] == 16 and h["auth_required"] is False  # batch of 8 + queue 8

    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/v1/predict"]["post"]
    assert {"200", "413", "415", "422", "503"} <= set(op["responses"])
    # no key configured: the schema declares no API-key security and no 401 (it must tell the truth)
    assert "401" not in op["responses"] and "security" not in op and "securitySchemes" not in spec.get("components", {})
    assert op["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]["file"]["minLength"] == 1
    assert "multipart/form-data" in op["requestBody"]["content"]
    assert "PredictResponse" in spec["components"]["schemas"]

    page = client.get("/")
    assert page.status_code == 200 and "Research use only" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    js = client.get("/static/app.js")
    assert js.status_code == 200 and "/v1/predict" in js.text and "innerHTML" not in js.text


def test_onnx_backed_service(ckpt: Path, jpeg: bytes, tmp_path: Path, samples_dir: Path) -> None:
    pytest.importorskip("onnxruntime")
    from covidcxr.export import export_onnx

    onnx = tmp_path / "m.onnx"
    export_onnx(ckpt, onnx, parity_images=[samples_dir], exporter="torchscript")
    with TestClient(create_app(onnx, api_key="")) as c:
        card = c.get("/v1/model").json()
        assert card["backend"] == "onnx" and card["heatmap_available"] is False
        r = c.post("/v1/predict?heatmap=true", files={"file": ("x.jpg", jpeg)})
        assert r.status_code == 200
        j = r.json()
        assert j["heatmap_png"] is None and "PyTorch checkpoint" in j["heatmap_note"]
        assert j["model"]["backend"] == "onnx"


def test_cli_serve_builds_the_app_with_its_limits(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    from covidcxr.cli import main

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    monkeypatch.delenv("COVIDCXR_API_KEY", raising=False)
    assert main(["serve", "--model", str(ckpt), "--host", "127.0.0.1", "--port", "8123", "--max-upload-mb", "3",
                 "--max-concurrency", "3", "--queue", "4", "--max-batch", "1"]) == 0
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8123
    with TestClient(seen["app"]) as c:
        limits = c.get("/v1/model").json()["limits"]
    assert (limits["max_upload_mb"], limits["max_concurrency"], limits["queue"]) == (3.0, 3, 4)


def test_severity_in_response_and_model_card(ckpt: Path, jpeg: bytes, tmp_path: Path) -> None:
    pytest.importorskip("covidcxr.severity.model")
    sev = tmp_path / "sev.ckpt"
    models.save(sev, models.build("resnet18", num_classes=2), arch="resnet18", classes=["geographic_extent", "opacity"],
                task="severity-scores", preset=get_preset("deepcovid", size=64))
    with TestClient(create_app(ckpt, api_key="", severity_path=sev, always_severity=True)) as c:
        card = c.get("/v1/model").json()
        assert card["severity"]["task"] == "severity-scores" and card["always_severity"] is True
        j = c.post("/v1/predict", files={"file": ("x.jpg", jpeg)}).json()
        assert 0 <= j["severity"]["geographic_extent"] <= 8 and 0 <= j["severity"]["opacity"] <= 6
        assert j["severity_note"] is None
    strict = tmp_path / "strict.ckpt"  # threshold 1.0: nothing passes, so severity is gated off
    models.save(strict, models.build("resnet18", num_classes=3), arch="resnet18", classes=CLASSES,
                preset=get_preset("deepcovid", size=64), threshold=1.0)
    with TestClient(create_app(strict, api_key="", severity_path=sev)) as c:
        j = c.post("/v1/predict", files={"file": ("x.jpg", jpeg)}).json()
        assert j["severity"] is None and "below the operating threshold" in j["severity_note"]


def test_cli_serve_bad_model_files_are_one_line(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A missing or wrong-task model must fail before uvicorn starts, as one line (was a traceback)."""
    from covidcxr.cli import main

    sev = tmp_path / "sev.ckpt"
    models.save(sev, models.build("resnet18", num_classes=2), arch="resnet18", classes=["geographic_extent", "opacity"],
                task="severity-scores", preset=get_preset("deepcovid", size=64))
    cases = [
        (["--model", str(tmp_path / "nope.ckpt")], "nope.ckpt: model file not found"),
        (["--model", str(ckpt), "--backend", "onnx"], "export it first"),
        (["--model", str(sev)], "not a COVID-19 classifier"),
        (["--model", str(ckpt), "--severity", str(tmp_path / "nosev.ckpt")], "--severity"),
    ]
    for args, msg in cases:
        assert main(["serve", *args, "--port", "1"]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("covidcxr serve: error:") and msg in err and "\n" not in err, err


def test_cli_serve_rejects_nonsense_limits(ckpt: Path, capsys: pytest.CaptureFixture) -> None:
    """--max-upload-mb 0 started a server that answered 413 to every upload."""
    from covidcxr.cli import main

    for opt, val in (("--max-upload-mb", "0"), ("--max-concurrency", "0"), ("--queue", "-1")):
        with pytest.raises(SystemExit) as exc:
            main(["serve", "--model", str(ckpt), opt, val])
        assert exc.value.code == 2
        assert f"argument {opt}:" in capsys.readouterr().err


def test_every_error_body_is_one_detail_sentence(client: TestClient, jpeg: bytes) -> None:
    """Issue 11 §9: FastAPI's validation list (missing field, bad query flag) has the same shape as the rest."""
    cases = [
        client.post("/v1/predict", data={"other": "x"}),                                   # no file field
        client.post("/v1/predict?heatmap=maybe", files={"file": ("x.jpg", jpeg)}),          # bad boolean
        client.post("/v1/predict", files={"file": ("x.png", b"")}),                          # empty upload
        client.post("/v1/predict", files={"file": ("x.png", b"%PDF-1.4")}),                 # 415
        client.get("/v1/nothing-here"),                                                      # 404
    ]
    assert [r.status_code for r in cases] == [422, 422, 422, 415, 404]
    for r in cases:
        body = r.json()
        assert set(body) == {"detail"} and isinstance(body["detail"], str) and "\n" not in body["detail"], body
    assert "file" in cases[0].json()["detail"] and "heatmap" in cases[1].json()["detail"]


def test_api_key_file_and_openapi_behind_the_key(ckpt: Path, jpeg: bytes, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    from covidcxr.cli import main

    monkeypatch.delenv("COVIDCXR_API_KEY", raising=False)
    keyfile = tmp_path / "key.txt"
    keyfile.write_text("file-key-123\n")
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app))
    assert main(["serve", "--model", str(ckpt), "--api-key-file", str(keyfile), "--no-plausibility"]) == 0
    with TestClient(seen["app"]) as c:
        assert c.get("/healthz").json()["auth_required"] is True
        assert c.get("/openapi.json").status_code == 401  # the document follows the API's auth rule
        assert c.get("/docs").status_code == 404          # Swagger UI cannot send the key: off with a key
        spec = c.get("/openapi.json", headers={"X-API-Key": "file-key-123"}).json()
        assert spec["info"]["title"] == "covidcxr"
        for path, method in (("/v1/predict", "post"), ("/v1/model", "get")):  # with a key, the schema says so
            op = spec["paths"][path][method]
            assert "401" in op["responses"] and op["security"] == [{"APIKeyHeader": []}]
        r = c.post("/v1/predict", files={"file": ("x.jpg", jpeg)}, headers={"X-API-Key": "file-key-123"})
        assert r.status_code == 200
    # without a key: the document and the Swagger page are open, as before
    with TestClient(create_app(ckpt, api_key="")) as c:
        assert c.get("/openapi.json").status_code == 200 and c.get("/docs").status_code == 200


def test_api_key_file_errors_are_one_line(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from covidcxr.cli import main

    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    for path, msg in ((tmp_path / "missing.txt", "cannot read the API key file"), (empty, "is empty")):
        assert main(["serve", "--model", str(ckpt), "--api-key-file", str(path)]) == 1
        err = capsys.readouterr().err.strip()
        assert msg in err and str(path) in err and "\n" not in err, err


def test_serve_options_default_to_serve_config(capsys: pytest.CaptureFixture) -> None:
    """`covidcxr serve`'s defaults are ServeConfig's (one source of truth): options left out give
    ServeConfig(model=...) field for field, --help shows those values, and the parser builds without FastAPI."""
    import subprocess
    import sys

    from covidcxr.cli import build_parser, main
    from covidcxr.cli.serve import serve_config
    from covidcxr.serve import ServeConfig

    assert serve_config(build_parser().parse_args(["serve", "--model", "m.onnx"])) == ServeConfig(model="m.onnx")
    with pytest.raises(SystemExit) as done:
        main(["serve", "--help"])
    assert done.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    d = ServeConfig()
    for option, value in (("--max-batch", d.max_batch), ("--max-wait-ms", d.max_wait_ms),
                          ("--decode-workers", d.decode_workers), ("--max-concurrency", d.max_concurrency),
                          ("--queue", d.queue), ("--queue-timeout", d.queue_timeout),
                          ("--max-upload-mb", d.max_upload_mb)):
        own_help = shown.split(f"{option} {option[2:].upper().replace('-', '_')} ", 1)[1].split(" --", 1)[0]
        assert f"(default: {value}" in own_help, (option, own_help)
    code = "import sys, covidcxr.cli; covidcxr.cli.build_parser(); assert 'fastapi' not in sys.modules, 'fastapi'"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr


def test_create_app_takes_a_config_or_keyword_settings(ckpt: Path) -> None:
    """One ServeConfig (what `covidcxr serve` builds) or keyword overrides give the same service; a misspelt
    setting is an error, not silently ignored."""
    from covidcxr.serve import ServeConfig

    config = ServeConfig(model=str(ckpt), api_key="", max_upload_mb=1.5, max_batch=1, queue=3, plausibility=False)
    by_config = create_app(config)
    by_keywords = create_app(ckpt, api_key="", max_upload_mb=1.5, max_batch=1, queue=3, plausibility=False)
    with TestClient(by_config) as a, TestClient(by_keywords) as b:
        limits = a.get("/v1/model").json()["limits"]
        assert limits == b.get("/v1/model").json()["limits"]
        assert limits["max_upload_mb"] == 1.5 and limits["max_batch"] == 1 and limits["queue"] == 3
        assert a.get("/healthz").json()["plausibility"]["state"] == "off"
    assert ServeConfig.build(config, max_batch=4).max_batch == 4 and config.max_batch == 1
    with pytest.raises(TypeError, match="max_batches"):
        create_app(ckpt, max_batches=2)
