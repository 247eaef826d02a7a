"""`predict --engine ray`: a local Ray instance (2 predictor actors), equivalence with the single-process
path, every input exactly once, resume, and a worker killed mid-run. Ray starts and stops in this module;
every run is bounded (a few dozen images, 64 px model).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from covidcxr import models
from covidcxr.preprocess import get_preset

ray = pytest.importorskip("ray")
pytest.importorskip("onnxruntime")

from covidcxr.predict import collect_inputs  # noqa: E402
from covidcxr.predict.distributed import RayEngineError, predict_ray, read_records  # noqa: E402

CLASSES = ["normal", "pneumonia", "COVID-19"]


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory, samples_dir: Path) -> Path:
    from covidcxr.export import export_onnx

    d = tmp_path_factory.mktemp("raymodel")
    torch.manual_seed(0)
    ckpt = d / "tiny.ckpt"
    models.save(ckpt, models.build("resnet18", num_classes=3), arch="resnet18", classes=CLASSES,
                preset=get_preset("deepcovid", size=64), threshold=0.4, training={"run_name": "tiny-ray"})
    export_onnx(ckpt, d / "tiny.onnx", parity_images=[samples_dir], exporter="torchscript")
    return d / "tiny.onnx"


@pytest.fixture(scope="module")
def inputs(dev_dir: Path, samples_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    bad = tmp_path_factory.mktemp("bad") / "broken.png"
    bad.write_bytes(b"not a png")
    files = collect_inputs([samples_dir]) + sorted(collect_inputs([dev_dir / "images"]))[:36]
    return files + [str(bad), str(dev_dir / "images" / "does-not-exist.jpg")]


@pytest.fixture(scope="module")
def local_ray():
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 1024 * 1024,
             ignore_reinit_error=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(onnx_model: Path, inputs: list[str]) -> dict[str, dict]:
    """The local engine's records (the same pipeline and config; tests/test_pipeline.py checks the gate too)."""
    from covidcxr.predict.pipeline import Pipeline, run_paths

    pipe = Pipeline(_config(onnx_model))
    return {r["path"]: r for r in run_paths(pipe, inputs, batch_size=8)}


def _config(model: Path):
    """The plausibility gate off here: 42 U-Net runs per engine would dominate this module's time on a loaded
    machine; tests/test_pipeline.py compares gate verdicts between the engines."""
    from covidcxr.predict.pipeline import PipelineConfig

    return PipelineConfig(model=str(model), threads=1, plausibility=False)


def _check_equivalent(recs: list[dict], reference: dict[str, dict], inputs: list[str]) -> None:
    paths = [r["path"] for r in recs]
    assert sorted(paths) == sorted(inputs) and len(set(paths)) == len(paths)  # every input exactly once
    for r in recs:
        ref = reference[r["path"]]
        assert r["label"] == ref["label"] and r["threshold"] == ref["threshold"]
        assert r["model"] == ref["model"] and len(r["model"]["sha256"]) == 64
        assert r.get("flag") == ref.get("flag") and r.get("plausibility") == ref.get("plausibility")
        assert r.get("error") or r["plausibility"]["verdict"] == "unchecked"  # the config travelled to the actors
        assert bool(r["error"]) == bool(ref["error"]) and r["error"] == ref["error"]
        if not r["error"]:
            for c in CLASSES:
                assert abs(r["probabilities"][c] - ref["probabilities"][c]) <= 1e-5


@pytest.mark.timeout(300)
def test_ray_equals_single_process_and_resumes(local_ray, onnx_model: Path, inputs: list[str],
                                               reference: dict[str, dict], tmp_path: Path) -> None:
    out = tmp_path / "shards"
    run = predict_ray([], onnx_model, out, files=inputs, workers=2, batch_size=8, shard_size=10, threads=1,
                      pipeline=_config(onnx_model))
    assert run.written == len(inputs) and run.failed == 2 and run.duplicates_dropped == 0
    assert len(run.shards) == -(-len(inputs) // 10)
    recs = read_records(out)
    _check_equivalent(recs, reference, inputs)
    missing = [r for r in recs if r["path"].endswith("does-not-exist.jpg")][0]
    assert missing["error"] == "file not found" and missing["label"] is None

    # a rerun without --resume is refused; with it, nothing is left to do
    with pytest.raises(RayEngineError, match="--resume"):
        predict_ray([], onnx_model, out, files=inputs, workers=2, pipeline=_config(onnx_model))
    # with it, only the two failed inputs are tried again (as the local engine's --resume does)
    again = predict_ray([], onnx_model, out, files=inputs, workers=2, resume=True,
                        pipeline=_config(onnx_model))
    assert again.skipped_done == len(inputs) - 2 and again.written == 2 and again.failed == 2
    assert len(again.shards) == 1
    _check_equivalent(read_records(out), reference, inputs)  # one record per input: the latest
    # lose one shard: only its inputs are predicted again, into a new shard
    lost = Path(run.shards[1])
    lost_paths = {json.loads(line)["path"] for line in lost.read_text().splitlines()}
    lost.unlink()
    third = predict_ray([], onnx_model, out, files=inputs, workers=2, batch_size=8, shard_size=10, resume=True,
                        pipeline=_config(onnx_model))
    redo = lost_paths | {r["path"] for r in read_records(out, latest=False) if r["error"]}  # failed ones again too
    assert third.written == len(redo) and third.skipped_done == len(inputs) - len(redo)
    _check_equivalent(read_records(out), reference, inputs)


@pytest.mark.timeout(300)
def test_config_form_equals_keyword_form(local_ray, onnx_model: Path, inputs: list[str],
                                         reference: dict[str, dict], tmp_path: Path) -> None:
    """predict_ray(..., RayConfig(...)) and predict_ray(..., **settings) run the same engine; keywords override a
    config's fields; a misspelt setting is a TypeError before any folder or cluster work (issue 21 §1)."""
    from covidcxr.predict.distributed import RayConfig

    few = inputs[:5] + inputs[-2:]  # five images, the unreadable file and the missing one
    settings = dict(workers=1, batch_size=4, shard_size=3, threads=1, pipeline=_config(onnx_model))
    config = RayConfig(**settings)
    by_config = predict_ray([], onnx_model, tmp_path / "config", config, files=few)
    by_keywords = predict_ray([], onnx_model, tmp_path / "keywords", files=few, **settings)
    for run in (by_config, by_keywords):
        assert (run.total, run.written, run.failed, run.workers, len(run.shards)) == (7, 7, 2, 1, 3)
    recs = read_records(tmp_path / "config")
    _check_equivalent(recs, {r["path"]: r for r in read_records(tmp_path / "keywords")}, few)
    _check_equivalent(recs, reference, few)
    assert [Path(s).name for s in by_config.shards] == [Path(s).name for s in by_keywords.shards]

    # a keyword overrides the config's field: resume the config's folder (only the two failed inputs again)
    with pytest.raises(RayEngineError, match="--resume"):
        predict_ray([], onnx_model, tmp_path / "config", config, files=few)
    again = predict_ray([], onnx_model, tmp_path / "config", config, files=few, resume=True)
    assert (again.skipped_done, again.written, again.failed) == (5, 2, 2)
    with pytest.raises(TypeError, match=r"predict_ray got unknown settings \['worker'\]"):
        predict_ray([], onnx_model, tmp_path / "typo", config, files=few, worker=2)
    assert not (tmp_path / "typo").exists()


@pytest.mark.timeout(300)
def test_worker_killed_mid_run_completes_without_duplicates(local_ray, onnx_model: Path, inputs: list[str],
                                                            reference: dict[str, dict], tmp_path: Path) -> None:
    pid_file = tmp_path / "actors.txt"
    killed: list[int] = []

    def kill_one_actor(done: int, total: int) -> None:
        if killed or not pid_file.exists():
            return
        pids = [int(x) for x in pid_file.read_text().split()]
        if pids:
            os.kill(pids[0], signal.SIGKILL)  # a predictor actor dies with work in flight
            killed.append(pids[0])
            # Ray restarts it (max_restarts) in its own time; the rest of the run may be quicker than that (the
            # other actor takes the work) and the pool goes away at the end: hold the driver until the restarted
            # actor has started, so that the check below does not depend on which is faster
            deadline = time.monotonic() + 120
            while len(pid_file.read_text().split()) <= len(pids) and time.monotonic() < deadline:
                time.sleep(0.1)

    out = tmp_path / "shards"
    run = predict_ray([], onnx_model, out, files=inputs, workers=2, batch_size=4, shard_size=8, threads=1,
                      fmt="parquet", progress=kill_one_actor, pid_file=str(pid_file),
                      pipeline=_config(onnx_model))
    assert killed, "the test did not get to kill an actor"
    assert len(pid_file.read_text().split()) >= 3  # the killed actor was restarted (or replaced)
    assert run.written == len(inputs)
    recs = read_records(out)
    assert all(Path(s).suffix == ".parquet" for s in run.shards)
    _check_equivalent(recs, reference, inputs)


def test_cli_engine_ray_errors_are_one_line(onnx_model: Path, tmp_path: Path, samples_dir: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    from covidcxr.cli import main

    assert main(["predict", str(samples_dir), "--model", str(onnx_model), "--engine", "ray"]) == 1
    assert "needs --out FOLDER" in capsys.readouterr().err
    assert main(["predict", str(samples_dir), "--model", str(onnx_model), "--engine", "ray", "--out",
                 str(tmp_path / "o"), "--heatmap", str(tmp_path / "h")]) == 1
    err = capsys.readouterr().err.strip()
    assert "--heatmap" in err and "\n" not in err
