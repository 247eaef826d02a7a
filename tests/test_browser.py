"""End-to-end: uvicorn on 127.0.0.1, headless Chromium via Playwright, a real JPEG chosen and a real DICOM dropped."""

from __future__ import annotations

import base64
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from covidcxr import models
from covidcxr.preprocess import get_preset

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CLASSES = ["normal", "pneumonia", "COVID-19"]
T_MS = 120_000  # bound on every wait in the page: CI runs this on 2 loaded cores (pytest -n 2)

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists() and shutil.which("chromium") is None,
    reason="Chromium is not installed (apt-get install -y chromium); the browser test needs it",
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> str:
    import uvicorn

    from covidcxr.serve import create_app

    torch.manual_seed(0)
    ckpt = tmp_path_factory.mktemp("browser") / "tiny.ckpt"
    models.save(ckpt, models.build("resnet18", num_classes=3), arch="resnet18", classes=CLASSES,
                preset=get_preset("deepcovid", size=64), threshold=0.4, training={"run_name": "tiny-browser"})
    sev = ckpt.parent / "sev.ckpt"  # a severity model, shown for every image (--always-severity)
    models.save(sev, models.build("resnet18", num_classes=2), arch="resnet18", classes=["geographic_extent", "opacity"],
                task="severity-scores", preset=get_preset("deepcovid", size=64))
    app = create_app(ckpt, api_key="", severity_path=sev, always_severity=True)
    # uvicorn serves a socket bound here to a free port (a port picked first and bound later by uvicorn
    # could be taken by another process in between)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start within 120 s")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=30)
    sock.close()


@pytest.fixture(scope="module")
def page(server: str):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"),
                                    args=ARGS, timeout=T_MS)
        pg = browser.new_page(viewport={"width": 1200, "height": 1000})
        pg.set_default_timeout(T_MS)
        errors: list[str] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        # JS errors only; "Failed to load resource" console lines are the expected 4xx answers
        pg.on("console", lambda m: errors.append(m.text) if m.type == "error" and "Failed to load" not in m.text else None)
        pg.goto(server + "/")
        sync_api.expect(pg.locator("#model-info")).to_contain_text("tiny-browser", timeout=T_MS)
        pg.errors = errors
        yield pg
        browser.close()


def _decoded_width(pg, selector: str) -> int:
    """The image's natural width once it is decoded: the page sets a data-URL ``src`` and then the text the
    test waits for, and the browser decodes the image asynchronously (naturalWidth is 0 until then)."""
    return pg.locator(selector).evaluate("el => el.decode().then(() => el.naturalWidth, () => el.naturalWidth)")


def _check_result(pg, fmt: str) -> str:
    # locator assertions, not wait_for_function: the page's CSP forbids string eval, and the test keeps it on
    from playwright.sync_api import expect

    expect(pg.locator("#input-info")).to_contain_text(fmt, timeout=T_MS)
    assert pg.locator("#probabilities .bar-row").count() == 3
    values = [float(t.strip().rstrip("%").strip()) for t in pg.locator("#probabilities .bar-value").all_inner_texts()]
    assert abs(sum(values) - 100) < 0.5
    label = pg.inner_text("#label")
    assert label in CLASSES
    assert pg.locator("#error").is_hidden()
    # the X-ray and the heatmap overlay are decoded images on top of each other
    assert _decoded_width(pg, "#xray") == 512
    if pg.locator("#show-heatmap").is_enabled():
        assert _decoded_width(pg, "#heatmap") == 512
        expect(pg.locator("#heatmap")).to_be_visible(timeout=T_MS)
        pg.uncheck("#show-heatmap")
        expect(pg.locator("#heatmap")).to_be_hidden(timeout=T_MS)
        pg.check("#show-heatmap")
        expect(pg.locator("#heatmap")).to_be_visible(timeout=T_MS)
    else:
        pytest.fail("no heatmap overlay: " + pg.inner_text("#heatmap-note"))
    assert "Research use only" in pg.inner_text("#notice")
    sev = pg.inner_text("#severity")
    assert "geographic extent" in sev and "(scale 0–8)" in sev and "opacity" in sev
    return label


def test_choose_jpeg_drop_dicom_and_read_errors(page, dev_dir: Path, samples_dir: Path, tmp_path: Path) -> None:
    pg = page
    jpg = sorted((dev_dir / "images").glob("*.jpg"))[0]
    pg.set_input_files("#file", str(jpg))
    _check_result(pg, "JPEG")
    pg.screenshot(path=str(tmp_path / "page-jpeg.png"), full_page=True)

    # drop a real DICOM onto the drop zone, as a user would
    b64 = base64.b64encode((samples_dir / "rsna-pneumonia-sample.dcm").read_bytes()).decode()
    pg.evaluate(
        """(b64) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], "rsna-pneumonia-sample.dcm", {type: "application/dicom"}));
            document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true}));
        }""",
        b64,
    )
    _check_result(pg, "DICOM")
    assert "rsna-pneumonia-sample.dcm" in pg.inner_text("#input-info")
    shot = tmp_path / "page-dicom.png"
    pg.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000

    # a non-image gives a readable message, not a stack trace
    bad = tmp_path / "notes.png"
    bad.write_text("these are notes, not an X-ray")
    pg.set_input_files("#file", str(bad))
    pg.wait_for_selector("#error:not([hidden])", timeout=T_MS)
    msg = pg.inner_text("#error")
    assert "HTTP 415" in msg and "not an image" in msg and "notes.png" in msg
    assert pg.locator("#result").is_hidden()  # the previous result is not shown next to the error
    pg.screenshot(path=str(tmp_path / "page-error.png"), full_page=True)
    assert not pg.errors, pg.errors
