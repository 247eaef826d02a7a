"""Archive-scale prediction on Ray Data (``covidcxr predict ... --engine ray``; extra ``covidcxr[ray]``).

The pipeline, on any Ray cluster (a local one by default, ``address="auto"`` or ``"ray://HOST:PORT"``):

1. the driver lists the inputs (:func:`covidcxr.predict.collect_inputs`) and drops those that already have
   a record in the output folder (resume);
2. **CPU tasks** read and preprocess (:class:`covidcxr.predict.inputs.Loader`, the single-process path's
   own code); an unreadable file travels on as an error row;
3. an **actor pool** predicts: each actor builds one :class:`~covidcxr.predict.pipeline.Pipeline` from the
   driver's :class:`~covidcxr.predict.pipeline.PipelineConfig` (ORT on CPU nodes, torch with one GPU per
   actor where ``num_gpus`` is given) and turns a batch into records: the plausibility gate, the decision
   rule, the prediction set, exactly as the local engine;
4. the driver writes the records into **shards** (``part-NNNNN.jsonl`` or ``.parquet``, each written to a
   temporary name and renamed, so a shard is either whole or absent), one record per input, errors included.

Exactly once: Ray Data retries a task or restarts an actor that dies, and the driver keeps a set of the
paths written, so a retried block can never produce a second record. A rerun (``resume``) skips every input
that has a successful record in a complete shard and retries the failed ones; where a path has several
records (a retried error), :func:`read_records` keeps the latest. A folder written by another model
(``model.sha256``) is refused.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from dataclasses import replace as _replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from covidcxr.overrides import with_overrides
from covidcxr.predict.inputs import Item, Loader, collect_inputs
from covidcxr.predict.output import resolved
from covidcxr.predict.pipeline import PipelineConfig
from covidcxr.predict.records import PredictorError, jsonable, strip_transient

log = logging.getLogger(__name__)


class RayEngineError(RuntimeError):
    """Ray is missing, cannot connect, or the output folder is unusable."""


@dataclass
class RayRun:
    out_dir: str
    total: int
    skipped_done: int
    written: int
    failed: int
    shards: list[str] = field(default_factory=list)
    duplicates_dropped: int = 0
    seconds: float = 0.0
    workers: int = 0


# --------------------------------------------------------------------------- shards


def _shard_paths(out_dir: Path) -> list[Path]:
    return sorted(p for p in out_dir.glob("part-*") if p.suffix in (".jsonl", ".parquet"))


def read_records(out_dir: str | os.PathLike, latest: bool = True) -> list[dict[str, Any]]:
    """The records in the complete shards of ``out_dir`` (JSONL and Parquet), in shard order.

    ``latest``: one record per input path, the one in the latest shard (a failed input retried by a
    resumed run has its old error record in an earlier shard); False: every record.
    """
    out: list[dict[str, Any]] = []
    for p in _shard_paths(Path(out_dir)):
        if p.suffix == ".jsonl":
            with open(p, encoding="utf-8") as f:
                out += [json.loads(line) for line in f if line.strip()]
        else:
            import pyarrow.parquet as pq

            for row in pq.read_table(p).to_pylist():
                out.append(json.loads(row["record"]))
    if not latest:
        return out
    last = {resolved(r["path"]): i for i, r in enumerate(out)}
    return [r for i, r in enumerate(out) if last[resolved(r["path"])] == i]


class _ShardWriter:
    """Writes records in shards of ``shard_size``; each shard appears atomically (temp name, then rename)."""

    def __init__(self, out_dir: Path, fmt: str, shard_size: int):
        self.out_dir, self.fmt, self.shard_size = out_dir, fmt, max(1, shard_size)
        existing = [int(p.stem.split("-")[1]) for p in _shard_paths(out_dir) if p.stem.split("-")[1].isdigit()]
        self.next_index = max(existing, default=-1) + 1
        self.buffer: list[dict[str, Any]] = []
        self.shards: list[str] = []

    def add(self, rec: dict[str, Any]) -> None:
        self.buffer.append(rec)
        if len(self.buffer) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        final = self.out_dir / f"part-{self.next_index:05d}.{self.fmt}"
        tmp = self.out_dir / f".{final.name}.tmp"
        if self.fmt == "jsonl":
            with open(tmp, "w", encoding="utf-8") as f:
                for rec in self.buffer:
                    f.write(json.dumps(rec, default=str) + "\n")
                f.flush()
                os.fsync(f.fileno())
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.table({"path": [r["path"] for r in self.buffer],
                              "label": [r.get("label") for r in self.buffer],
                              "error": [r.get("error") for r in self.buffer],
                              "record": [json.dumps(r, default=str) for r in self.buffer]})
            pq.write_table(table, tmp)
        os.replace(tmp, final)
        self.shards.append(str(final))
        self.next_index += 1
        self.buffer = []


# --------------------------------------------------------------------------- pipeline stages


def _pack(arrays: dict[str, np.ndarray]) -> bytes:
    """Arrays as one .npz blob (no pickle), so that rows of any shape fit one bytes column."""
    import io

    buf = io.BytesIO()
    np.savez(buf, **{k: np.ascontiguousarray(v) for k, v in arrays.items()})
    return buf.getvalue()


def _unpack(blob: bytes) -> dict[str, np.ndarray]:
    import io

    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _decode_batch(batch: dict[str, np.ndarray], loader: Loader) -> dict[str, list]:
    """Ray Data CPU task: paths -> the model's array and the pipeline's small extra inputs (an .npz blob
    per row, so that error rows fit the same columns)."""
    paths, data, errors = [], [], []
    for path in batch["path"]:
        item = loader(str(path))
        paths.append(item.path)
        if item.array is None:
            data.append(b"")
            errors.append(item.error or "unknown error")
        else:
            data.append(_pack({"__model__": np.asarray(item.array, dtype=np.float32), **item.extra}))
            errors.append("")
    return {"path": paths, "data": data, "error": errors}


class _PredictActor:
    """Ray Data actor: builds the pipeline once; batch of decoded rows -> JSON records (the local engine's)."""

    def __init__(self, config: Any, pid_file: str | None = None):
        if pid_file:  # passed by the caller only (the kill test needs a process to kill); no environment hook
            with open(pid_file, "a", encoding="utf-8") as f:
                f.write(f"{os.getpid()}\n")
        from covidcxr.predict.pipeline import Pipeline

        self.pipeline = Pipeline(config)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        paths = [str(x) for x in batch["path"]]
        items = []
        for i, path in enumerate(paths):
            if batch["error"][i]:
                items.append(Item(path, error=str(batch["error"][i])))
                continue
            arrays = _unpack(batch["data"][i])
            items.append(Item(path, arrays.pop("__model__"), arrays))
        out = [json.dumps(jsonable(strip_transient(rec))) for rec in self.pipeline.run_batch(items)]
        return {"path": paths, "record": out}


# --------------------------------------------------------------------------- driver


def _init_ray(address: str | None, num_cpus: int | None, workers: int) -> Any:
    try:
        import ray
    except ImportError:
        raise RayEngineError("--engine ray needs Ray Data: pip install 'covidcxr[ray]'") from None
    if ray.is_initialized():
        return ray
    kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": False, "include_dashboard": False}
    if address:
        kwargs["address"] = address
    else:
        # logical CPUs: one per predictor actor plus at least one for the decode tasks (an actor pool that takes
        # every CPU would starve the decode stage and the pipeline would wait forever)
        kwargs["num_cpus"] = max(num_cpus or os.cpu_count() or 1, workers + 1)
        kwargs["object_store_memory"] = 256 * 1024 * 1024  # images travel preprocessed: a small store suffices
    try:
        ray.init(**kwargs)
    except Exception as err:  # ConnectionError, RuntimeError, ... : one line naming the address
        raise RayEngineError(f"cannot start or reach Ray{' at ' + address if address else ''}: "
                             f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    return ray


@dataclass(frozen=True)
class RayConfig:
    """How the Ray engine runs (``covidcxr predict --engine ray`` fills it from its options); :func:`predict_ray`
    takes one (or keyword overrides). Picklable, as the pipeline config it carries."""

    # the cluster: None starts a local Ray ("auto": the cluster of `ray start`, "ray://HOST:PORT": Ray Client);
    # num_cpus: logical CPUs of a local one (None: the machine's, at least one per actor plus one for decoding)
    address: str | None = None
    num_cpus: int | None = None
    # the actor pool: predictor actors, intra-op threads and GPUs per actor (GPUs > 0: torch on cuda, one actor
    # per GPU with 1); images per decode task and per actor call
    workers: int = 2
    threads: int | None = 1
    num_gpus: float = 0.0
    batch_size: int = 16
    # the output folder: shard format (jsonl or parquet) and records per shard; resume keeps the successful
    # records already there and predicts the rest (without it a folder holding shards is refused)
    fmt: str = "jsonl"
    shard_size: int = 1000
    resume: bool = False
    # what each actor's pipeline does (plausibility gate, severity, backend, ...); None: the model with the gate
    # on, as `covidcxr predict` without options. Its model, threads and device are set by predict_ray
    pipeline: PipelineConfig | None = None


def predict_ray(
    paths: Iterable[str | os.PathLike],
    model: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: RayConfig | None = None,
    *,
    files: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    pid_file: str | None = None,
    **overrides: Any,
) -> RayRun:
    """Predict every input once on Ray Data; write sharded records into ``out_dir``; resume what is there.

    ``config``: a :class:`RayConfig` (what each setting does); keyword ``overrides`` replace its fields
    (``predict_ray([], m, out, files=fs, workers=1, resume=True)``); a misspelt one is a TypeError.
    ``files``: the inputs already listed (else :func:`collect_inputs` of ``paths``).
    ``progress(done, total)`` is called after each record batch; ``pid_file``: each actor appends its process
    id (the kill test needs a process to kill).
    """
    c = with_overrides(RayConfig, config, overrides, where="predict_ray")
    fmt, workers, batch_size, num_gpus = c.fmt, c.workers, c.batch_size, c.num_gpus
    if fmt not in ("jsonl", "parquet"):
        raise RayEngineError(f"unknown output format {fmt!r}; choose jsonl or parquet")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RayEngineError(f"{out}: --out must be a folder for --engine ray (it gets part-NNNNN.{fmt} shards)")
    # the model loads here too: a bad file is one line before any cluster work
    from covidcxr.predict.pipeline import Pipeline

    pipeline = c.pipeline if c.pipeline is not None else PipelineConfig(model=str(model))
    # absolute: the actors may run in another working directory
    pipeline = _replace(pipeline.with_model(Path(model).resolve() if Path(model).is_file() else model),
                        threads=c.threads, device="cuda" if num_gpus else pipeline.device)
    pipe = Pipeline(pipeline)  # here too: a bad file is one line before any cluster work
    all_files = list(files) if files is not None else collect_inputs(paths)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".part-*.tmp"):  # a shard that was being written when a run died
        stale.unlink()
    if _shard_paths(out) and not c.resume:
        raise RayEngineError(f"{out}: already holds result shards; pass --resume to continue that run, "
                             "or choose another --out folder")
    earlier = read_records(out)
    others = {str((r.get("model") or {}).get("sha256")) for r in earlier} - {pipe.predictor.sha256}
    if others:
        raise RayEngineError(f"{out}: holds records of another model (sha256 {sorted(others)[0][:12]}; this one is "
                             f"{pipe.predictor.sha256[:12]}); one output never mixes two models. Choose another --out")
    done = {resolved(r["path"]) for r in earlier if not r.get("error")}  # failed inputs are tried again
    todo = [f for f in dict.fromkeys(all_files) if resolved(f) not in done]
    run = RayRun(out_dir=str(out), total=len(all_files), skipped_done=len(all_files) - len(todo), written=0,
                 failed=0, workers=workers)
    writer = _ShardWriter(out, fmt, c.shard_size)
    t0 = time.perf_counter()
    if todo:
        ray = _init_ray(c.address, c.num_cpus, workers)
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        n_blocks = max(1, min(len(todo) // max(1, batch_size), 4 * max(1, workers) * 8))
        ds = ray.data.from_items([{"path": f} for f in todo], override_num_blocks=n_blocks)
        ds = ds.map_batches(_decode_batch, fn_kwargs={"loader": pipe.loader()}, batch_size=batch_size,
                            batch_format="numpy", num_cpus=1, max_retries=3)
        ds = ds.map_batches(
            _PredictActor,
            fn_constructor_args=(pipeline, pid_file),
            batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=max(1, workers)),
            num_cpus=1,
            num_gpus=num_gpus or None, max_restarts=3, max_task_retries=3,
        )
        seen: set[str] = set()
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for path, text in zip(batch["path"], batch["record"]):
                path = str(path)
                if path in seen:  # a retried block: keep the first record only
                    run.duplicates_dropped += 1
                    continue
                seen.add(path)
                rec = json.loads(text)
                writer.add(rec)
                run.written += 1
                run.failed += bool(rec.get("error"))
            if progress is not None:
                progress(run.skipped_done + run.written, run.total)
        writer.flush()
        missing = [f for f in todo if f not in seen]
        if missing:  # never silently: a dropped input is an error of the engine
            raise RayEngineError(f"{len(missing)} inputs got no record (first: {missing[0]}); rerun to resume")
    run.shards = writer.shards
    run.seconds = time.perf_counter() - t0
    return run


def shutdown() -> None:
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except ImportError:  # pragma: no cover
        pass


__all__ = ["RayConfig", "RayEngineError", "RayRun", "PredictorError", "predict_ray", "read_records", "shutdown"]
