"""Issue 21 §2 (no silent failure): the items of H4c, each with a check that fails on the old code."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest


# --------------------------------------------------------------------------- §2.12 the batcher


def test_batcher_output_length_mismatch_fails_every_request() -> None:
    """A model that returns fewer rows than the batch fails all requests of the batch (no zip truncation)."""
    from covidcxr.serve.batcher import BatchMismatch, MicroBatcher

    b = MicroBatcher(lambda x: np.zeros((max(0, len(x) - 1), 3), np.float32), max_batch=4, max_wait_ms=50)

    async def go() -> list:
        return await asyncio.wait_for(
            asyncio.gather(*(b.submit(np.zeros((1, 2, 2))) for _ in range(3)), return_exceptions=True), 10)

    res = asyncio.run(go())
    assert len(res) == 3 and all(isinstance(r, BatchMismatch) for r in res), res


def test_batcher_restart_fails_orphaned_requests() -> None:
    """Restarting the task fails the running batch and the queued requests instead of leaving them waiting."""
    from covidcxr.serve.batcher import BatcherRestarted, MicroBatcher

    release = threading.Event()

    def fn(x: np.ndarray) -> np.ndarray:
        release.wait(20)
        return np.ones((len(x), 3), np.float32)

    b = MicroBatcher(fn, max_batch=1, max_wait_ms=0)

    async def go() -> tuple[list, object]:
        old = [asyncio.ensure_future(b.submit(np.zeros((1, 2, 2)))) for _ in range(2)]
        for _ in range(200):  # until the first batch is in the inference thread
            if b.running:
                break
            await asyncio.sleep(0.01)
        assert b.running and b.not_started == 1  # one runs, one waits
        b._task.cancel()  # the task ends (as it would after a crash): the next submit restarts it
        await asyncio.sleep(0)
        new = asyncio.ensure_future(b.submit(np.zeros((1, 2, 2))))
        got = await asyncio.wait_for(asyncio.gather(*old, return_exceptions=True), 10)
        release.set()
        return got, await asyncio.wait_for(new, 20)

    old, new = asyncio.run(go())
    assert all(isinstance(r, BatcherRestarted) for r in old), old
    row, timing = new
    assert row.shape == (3,) and timing.batch_size == 1
    assert b.not_started == 0


# --------------------------------------------------------------------------- §2.8 service admission


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory):
    torch = pytest.importorskip("torch")
    from covidcxr import models
    from covidcxr.preprocess import get_preset

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("h4c") / "tiny.ckpt"
    models.save(path, models.build("resnet18", num_classes=3), arch="resnet18",
                classes=["normal", "pneumonia", "COVID-19"], preset=get_preset("deepcovid", size=64))
    return path


def _multipart(payload: bytes, boundary: str = "b0undary") -> tuple[bytes, bytes]:
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + payload + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}".encode()


def _call(app, body: bytes, ctype: bytes, chunk: int, content_length: bool = True) -> tuple[int, int]:
    """Drive the ASGI app by hand: (status, body bytes the app pulled from the client)."""
    chunks = [body[i:i + chunk] for i in range(0, len(body), chunk)]
    pulled = 0
    sent: list[dict] = []

    async def receive() -> dict:
        nonlocal pulled
        if not chunks:
            return {"type": "http.disconnect"}
        part = chunks.pop(0)
        pulled += len(part)
        return {"type": "http.request", "body": part, "more_body": bool(chunks)}

    async def send(msg: dict) -> None:
        sent.append(msg)

    headers = [(b"content-type", ctype), (b"host", b"test")]
    if content_length:
        headers.append((b"content-length", str(len(body)).encode()))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/predict", "raw_path": b"/v1/predict", "query_string": b"", "headers": headers,
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "root_path": ""}
    asyncio.run(app(scope, receive, send))
    return next(m["status"] for m in sent if m["type"] == "http.response.start"), pulled


@pytest.mark.parametrize("max_batch", [1, 4])
def test_refused_upload_is_never_read(tiny_ckpt, max_batch: int) -> None:
    """A request refused with 503 is refused before its body is read: no upload sits in RAM for a 503."""
    pytest.importorskip("fastapi")
    from covidcxr.serve import create_app

    app = create_app(tiny_ckpt, api_key="", max_batch=max_batch, max_concurrency=1, queue=0, plausibility=False)
    limiter = app.state.limiter
    limiter.busy = limiter.capacity  # the service is full
    body, ctype = _multipart(b"\x89PNG" + bytes(300_000))
    status, pulled = _call(app, body, ctype, chunk=65536)
    assert status == 503 and pulled == 0


def test_upload_read_stops_at_the_limit(tiny_ckpt) -> None:
    """A chunked upload without Content-Length is cut off (413) once it passes the limit, not read whole."""
    pytest.importorskip("fastapi")
    from covidcxr.serve import create_app

    app = create_app(tiny_ckpt, api_key="", max_upload_mb=0.1, plausibility=False)
    body, ctype = _multipart(bytes(2_000_000))
    status, pulled = _call(app, body, ctype, chunk=16384, content_length=False)
    assert status == 413 and pulled <= 100_000 + 2 * 16384


# --------------------------------------------------------------------------- §2.11 safe loading


def _with_pickled_object(src, dst):
    """A copy of checkpoint ``src`` that also pickles a Python object (weights_only=True refuses it)."""
    import fractions

    torch = pytest.importorskip("torch")
    b = torch.load(src, map_location="cpu", weights_only=True)
    b["extra"] = fractions.Fraction(1, 3)
    torch.save(b, dst)
    return dst


def test_checkpoints_the_project_writes_load_weights_only(tiny_ckpt) -> None:
    torch = pytest.importorskip("torch")
    b = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)
    assert b["arch"] == "resnet18"


def test_checkpoint_with_pickled_objects_is_refused_unless_trusted(tiny_ckpt, tmp_path, monkeypatch) -> None:
    from covidcxr import models
    from covidcxr.models import CheckpointError

    bad = _with_pickled_object(tiny_ckpt, tmp_path / "pickled.ckpt")
    monkeypatch.delenv("COVIDCXR_TRUST_CHECKPOINT", raising=False)
    with pytest.raises(CheckpointError) as err:
        models.load(bad)
    msg = str(err.value)
    assert "\n" not in msg and str(bad) in msg and "fractions.Fraction" in msg and "--trust-checkpoint" in msg
    monkeypatch.setenv("COVIDCXR_TRUST_CHECKPOINT", "1")
    assert models.load(bad).arch == "resnet18"


def test_weights_file_with_pickled_objects_is_refused(tiny_ckpt, tmp_path, monkeypatch) -> None:
    """models/weights.py no longer retries with weights_only=False after an UnpicklingError."""
    torch = pytest.importorskip("torch")
    from covidcxr import models
    from covidcxr.models.weights import WeightsError

    sd = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    path = tmp_path / "sd.pt"
    torch.save({"state_dict": sd, "note": __import__("fractions").Fraction(2, 3)}, path)
    monkeypatch.delenv("COVIDCXR_TRUST_CHECKPOINT", raising=False)
    with pytest.raises(WeightsError, match=r"sd.pt: refused: .*--trust-checkpoint"):
        models.create("resnet18", num_classes=3, weights=str(path))


def test_segmenter_file_with_pickled_objects_is_refused(tmp_path, monkeypatch) -> None:
    torch = pytest.importorskip("torch")
    from covidcxr.segment.loading import load_segmenter
    from covidcxr.segment.model import SegmenterError

    path = tmp_path / "seg.ckpt"
    torch.save({"format": "x", "obj": __import__("fractions").Fraction(1, 2)}, path)
    monkeypatch.delenv("COVIDCXR_TRUST_CHECKPOINT", raising=False)
    with pytest.raises(SegmenterError, match=r"seg.ckpt: refused: .*fractions.Fraction"):
        load_segmenter(str(path))


def test_cli_trust_checkpoint_flag(tiny_ckpt, tmp_path, monkeypatch, capsys) -> None:
    """Refused by default with one line; --trust-checkpoint loads it; the choice does not outlive the command."""
    import os

    from PIL import Image

    from covidcxr.cli import main

    bad = _with_pickled_object(tiny_ckpt, tmp_path / "pickled.ckpt")
    img = tmp_path / "x.png"
    Image.fromarray((np.random.default_rng(0).random((96, 96)) * 255).astype(np.uint8)).save(img)
    monkeypatch.delenv("COVIDCXR_TRUST_CHECKPOINT", raising=False)
    out = tmp_path / "out.jsonl"
    assert main(["predict", "--model", str(bad), "--out", str(out), "--no-plausibility", str(img)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pickled.ckpt: refused" in err[0] and "--trust-checkpoint" in err[0]
    assert main(["predict", "--trust-checkpoint", "--model", str(bad), "--out", str(out), "--no-plausibility",
                 str(img)]) == 0
    assert out.read_text().count("\n") == 1 and "COVIDCXR_TRUST_CHECKPOINT" not in os.environ


# --------------------------------------------------------------------------- §2.10 patient ids across CSV sources


def test_two_csv_sources_with_patient_1_are_two_persons(tmp_path) -> None:
    """Patient "1" of two CSV files is two persons (ids prefixed per source); a true duplicate still links."""
    import pandas as pd

    from covidcxr.data import build_manifest
    from test_data_factories import distinct_image, write_png

    def make(name: str, rows: list[tuple[str, str, int]]) -> str:
        d = tmp_path / name
        (d / "images").mkdir(parents=True)
        for fname, _, seed in rows:
            write_png(d / "images" / fname, distinct_image(seed))
        lines = ["filename,patient_id,label"] + [f"{f},{pid},normal" for f, pid, _ in rows]
        (d / "metadata.csv").write_text("\n".join(lines) + "\n")
        return str(d / "metadata.csv")

    # b/shared.png is a byte-identical copy of a/shared.png under another patient id: the same person
    a = make("a", [("one.png", "1", 11), ("shared.png", "2", 13)])
    b = make("b", [("one.png", "1", 12), ("shared.png", "7", 13)])
    df = build_manifest([("csv:siteA", a), ("csv:siteB", b)], tmp_path / "out", seed=0, dedupe=False)
    df = pd.read_csv(tmp_path / "out" / "manifest.csv") if not isinstance(df, pd.DataFrame) else df
    by = {(Path(p).parent.parent.name, Path(p).name): pid for p, pid in zip(df["path"], df["patient_id"])}
    assert by[("a", "one.png")] != by[("b", "one.png")]  # two different patients called "1"
    assert by[("a", "shared.png")] == by[("b", "shared.png")]  # linked through the identical image
    assert set(df["source_patient_id"]) == {"siteA-1", "siteA-2", "siteB-1", "siteB-7"}


def test_csv_aliases_rules() -> None:
    from covidcxr.data import ManifestError
    from covidcxr.data.sources import csv_aliases

    assert csv_aliases([("csv", "x/meta.csv"), ("nih", "d")]) == [None, None]  # one CSV keeps its ids
    assert csv_aliases([("csv", "x/a.csv"), ("csv", "y/b.csv")]) == ["a", "b"]
    assert csv_aliases([("csv:dev", "x/a.csv")]) == ["dev"]
    with pytest.raises(ManifestError, match="csv:NAME=PATH"):
        csv_aliases([("csv", "x/metadata.csv"), ("csv", "y/metadata.csv")])


# --------------------------------------------------------------------------- §2.3 export and INT8


def _pngs(folder, n: int) -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    out = []
    for i in range(n):
        p = folder / f"img{i}.png"
        Image.fromarray((rng.random((96, 96)) * 255).astype(np.uint8)).save(p)
        out.append(str(p))
    return out


@pytest.fixture(scope="module")
def tiny_onnx(tiny_ckpt, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from covidcxr.export import export_onnx

    d = tmp_path_factory.mktemp("h4c-onnx")
    imgs = _pngs(d / "imgs", 6)
    export_onnx(tiny_ckpt, d / "m.onnx", parity_images=imgs, exporter="torchscript")
    return d / "m.onnx", imgs


def _other_filesystem_than_tmp():
    """A writable folder on another filesystem than tempfile's folder, or None."""
    import os
    import tempfile

    tmp_dev = os.stat(tempfile.gettempdir()).st_dev
    for cand in (Path("/dev/shm"), Path(__file__).parent):
        try:
            if cand.is_dir() and os.access(cand, os.W_OK) and os.stat(cand).st_dev != tmp_dev:
                return cand
        except OSError:
            continue
    return None


def test_int8_output_on_another_filesystem_than_tmp(tiny_onnx) -> None:
    """The temp files go beside the output, so the final rename never crosses filesystems (EXDEV before)."""
    import shutil
    import tempfile

    from covidcxr.predict import Predictor
    from covidcxr.quantize import quantize_file

    other = _other_filesystem_than_tmp()
    if other is None:
        pytest.skip("only one filesystem here: /dev/shm and the tests folder share tempfile's device")
    onnx, imgs = tiny_onnx
    target = Path(tempfile.mkdtemp(dir=other, prefix="covidcxr-xfs-"))
    try:
        out = target / "int8.onnx"
        reader = quantize_file(Predictor.from_path(onnx), out, imgs)
        assert out.is_file() and reader.used == len(imgs)
        assert [p.name for p in target.iterdir()] == ["int8.onnx"]  # no temp folder left beside it
    finally:
        shutil.rmtree(target, ignore_errors=True)


def test_int8_os_error_is_one_line(tiny_onnx, tmp_path) -> None:
    from covidcxr.predict import Predictor
    from covidcxr.quantize import QuantizeError, quantize_file

    onnx, imgs = tiny_onnx
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(QuantizeError) as err:
        quantize_file(Predictor.from_path(onnx), blocker / "int8.onnx", imgs)
    assert "\n" not in str(err.value) and "a-file" in str(err.value)


def test_parity_gate_refuses_many_unreadable_images(tiny_ckpt, tiny_onnx, tmp_path) -> None:
    """Unreadable parity/held-out images are counted; above the documented share the check refuses."""
    from covidcxr.export import MAX_UNREADABLE_SHARE, ExportError, export_onnx
    from covidcxr.predict import Predictor
    from covidcxr.quantize import ParityGate, parity_gate, quantize_file

    onnx, imgs = tiny_onnx
    bad = []
    for i in range(2):
        p = tmp_path / f"broken{i}.png"
        p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
        bad.append(str(p))
    assert 2 / (len(imgs) + 2) > MAX_UNREADABLE_SHARE
    with pytest.raises(ExportError, match=r"2 of 8 parity images could not be read"):
        export_onnx(tiny_ckpt, tmp_path / "e.onnx", parity_images=imgs + bad, exporter="torchscript")
    fp32 = Predictor.from_path(onnx)
    quantize_file(fp32, tmp_path / "q.onnx", imgs)
    labels = ["COVID-19", "normal"] * (len(imgs) // 2)
    gate = parity_gate(fp32, Predictor.from_path(tmp_path / "q.onnx"), imgs + bad, labels + ["normal", "normal"],
                       ["test"], max_auc_change=1.0, min_agreement=0.0)
    assert isinstance(gate, ParityGate) and gate.failed_images == 2 and not gate.passed
    assert any("could not be read" in r for r in gate.reasons())


# --------------------------------------------------------------------------- §2.7 mask cache memory


def test_mask_cache_entry_is_bounded_by_the_segmenter_size(tmp_path) -> None:
    """A 2500 x 2048 image costs the cache 2 S^2 bytes (S = the segmenter's input), not a full-size mask."""
    torch = pytest.importorskip("torch")
    from covidcxr.segment.maskcache import CachedSegmenter, MaskCache
    from covidcxr.segment.segmenter import LungSegmenter
    from covidcxr.segment.model import build

    torch.manual_seed(0)
    size = 64
    seg = LungSegmenter(build("unet", {"base": 4, "depth": 2}), size, name="tiny-unet")
    rng = np.random.default_rng(0)
    images = [rng.random((2500, 2048), dtype=np.float32), rng.random((300, 200), dtype=np.float32)]
    for cache in (MaskCache(), MaskCache(tmp_path / "disk")):
        cached = CachedSegmenter(seg, cache)
        masks = cached.segment_many(images)
        assert [m.shape for m in masks] == [(2500, 2048), (300, 200)] and all(m.dtype == bool for m in masks)
        entries = list(cache._mem.values())
        assert len(entries) == 2 and all(e.nbytes <= 2 * size * size for e in entries)
        # a hit (memory, or disk in a fresh cache) gives the same mask as the miss that filled it
        again = CachedSegmenter(seg, MaskCache(tmp_path / "disk") if cache.folder else cache).segment_many(images)
        assert all(np.array_equal(a, b) for a, b in zip(masks, again))
        assert cached.calls == 2


# --------------------------------------------------------------------------- §4 export writes the U-Net's ONNX export


def test_export_writes_the_gate_unet_onnx(tiny_ckpt, weights_dir, tmp_path, monkeypatch, capsys) -> None:
    """`covidcxr export` writes the plausibility check's U-Net export, so the torch-free ONNX paths run the check
    (before, they warned and printed a python one-liner to run by hand)."""
    pytest.importorskip("onnxruntime")
    from covidcxr.cli import main
    from covidcxr.segment.loading import PRETRAINED, PRETRAINED_SHA256, load_segmenter, onnx_file
    from covidcxr.segment.plausibility import SIZE

    monkeypatch.setenv("COVIDCXR_CACHE", str(tmp_path / "cache"))
    unet = onnx_file(PRETRAINED_SHA256, SIZE)
    assert not unet.exists()
    imgs = _pngs(tmp_path / "imgs", 4)
    assert main(["export", "--model", str(tiny_ckpt), "--onnx", str(tmp_path / "m.onnx"), "--exporter", "torchscript",
                 "--parity-images", *imgs]) == 0
    assert unet.is_file() and str(unet) in capsys.readouterr().out
    seg = load_segmenter(PRETRAINED, size=SIZE, backend="onnx", torch_free=True)  # what the ONNX gate loads
    assert seg.backend == "onnx" and seg.predict([np.full((300, 300), 0.5, np.float32)])[0].shape == (300, 300)
