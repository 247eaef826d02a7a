"""``fit(config, data, out)``: build the DataModule and module, run Lightning, keep best/last checkpoints."""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import json
import logging
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from covidcxr.models.checkpoint import atomic_torch_save
from covidcxr.train.config import ConfigError, dump_config

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write checkpoints to a temporary file in the same folder, then rename over the target.

    A run killed while saving leaves the previous ``last.ckpt`` intact instead of half a file.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        atomic_torch_save(checkpoint, path)


def _sha256(path: str | os.PathLike) -> str:
    from covidcxr.evaluate.core import sha256_file

    return sha256_file(path)


def split_counts(df: pd.DataFrame) -> dict[str, Any]:
    """Images, patients and class counts per split: what the checkpoint's training summary records."""
    out: dict[str, Any] = {}
    for split, part in df.groupby("split"):
        out[str(split)] = {
            "n_images": int(len(part)),
            "n_patients": int(part["patient_id"].nunique()),
            "labels": {str(k): int(v) for k, v in part["label"].value_counts().sort_index().items()},
        }
    return out


def _check_splits(df: pd.DataFrame, manifest: str | os.PathLike) -> None:
    """Validation must come from training patients; refuse a manifest without it or with overlap."""
    present = set(df["split"].dropna())
    for need in ("train", "val"):
        if need not in present:
            raise ConfigError(
                f"{manifest}: no {need!r} rows; build the manifest with `covidcxr data build`, which carves the "
                "validation split out of the training patients (never from the test set)"
            )
    pats = {s: set(df.loc[df["split"] == s, "patient_id"].astype(str)) for s in present}
    for a in present:
        for b in present:
            if a < b and pats[a] & pats[b]:
                raise ConfigError(f"{manifest}: {len(pats[a] & pats[b])} patient(s) in both {a!r} and {b!r}")


def _augment(cfg: dict) -> Any:
    from covidcxr.preprocess import AUGMENT_RECIPES

    name = cfg["data"]["augment"]
    if name in (None, False, "none"):
        return None
    if name not in AUGMENT_RECIPES:
        raise ConfigError(f"data.augment = {name!r}; known recipes: {sorted(AUGMENT_RECIPES)}")
    aug = AUGMENT_RECIPES[name]
    return dataclasses.replace(aug, seed=int(cfg["seed"])) if aug is not None else None


def _loggers(out: Path) -> list[Any]:
    from lightning.pytorch.loggers import CSVLogger

    loggers: list[Any] = [CSVLogger(save_dir=str(out), name="logs")]
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            return loggers
    from lightning.pytorch.loggers import TensorBoardLogger

    loggers.append(TensorBoardLogger(save_dir=str(out), name="tensorboard"))
    return loggers


def _callbacks(cfg: dict, out: Path) -> list[Any]:
    ck = cfg["checkpoint"]
    common = {"dirpath": out, "enable_version_counter": False, "auto_insert_metric_name": False}
    cbs: list[Any] = [
        # best by the chosen validation figure (Lightning >= 2.5 refreshes save_last only when top-k saved,
        # so last.ckpt has callbacks of its own)
        # best.ckpt: weights only (no optimiser state); fit() slims it to the covidcxr bundle at the end
        ModelCheckpoint(filename="best", monitor=ck["monitor"], mode=ck["mode"], save_top_k=1,
                        save_weights_only=True, **common),
        ModelCheckpoint(filename="last", monitor=None, save_top_k=1, every_n_epochs=1, **common),
    ]
    if ck.get("every_n_train_steps"):
        # a mid-epoch last.ckpt so that a killed run loses at most N steps
        cbs.append(ModelCheckpoint(filename="last", monitor=None, save_top_k=1,
                                   every_n_train_steps=int(ck["every_n_train_steps"]), **common))
    es = cfg["early_stopping"]
    if es.get("monitor"):
        cbs.append(EarlyStopping(monitor=es["monitor"], mode=es["mode"], patience=int(es["patience"]),
                                 min_delta=float(es["min_delta"])))
    cbs.append(LearningRateMonitor(logging_interval="epoch"))
    return cbs


def build_trainer(cfg: dict, out: Path) -> L.Trainer:
    t = cfg["trainer"]
    kw: dict[str, Any] = {
        "default_root_dir": str(out),
        "max_epochs": int(t["max_epochs"]),
        "max_steps": int(t["max_steps"]),
        "accelerator": t["accelerator"],
        "devices": t["devices"],
        "num_nodes": int(t["num_nodes"]),
        "strategy": t["strategy"],
        "precision": t["precision"],
        "log_every_n_steps": int(t["log_every_n_steps"]),
        "accumulate_grad_batches": int(t["accumulate_grad_batches"]),
        "deterministic": t["deterministic"],
        "enable_progress_bar": bool(t["progress_bar"]),
        "callbacks": _callbacks(cfg, out),
        "logger": _loggers(out),
        "plugins": [AtomicCheckpointIO()],
        "enable_model_summary": bool(t["progress_bar"]),
    }
    for k in ("limit_train_batches", "limit_val_batches", "val_check_interval", "gradient_clip_val"):
        if t.get(k) is not None:
            kw[k] = t[k]
    return L.Trainer(**kw)


def _default_preset(cfg: dict) -> str:
    """The preset the weights need (``xrv`` for torchxrayvision weights), else the architecture's."""
    from covidcxr import models

    if hasattr(models, "preset_for"):
        return models.preset_for(cfg["model"]["arch"], cfg["model"]["weights"])
    return models.get_spec(cfg["model"]["arch"]).preset


def resolve_config_path(name: str | os.PathLike) -> Path:
    """A recipe file, or a recipe name (``deepcovid-resnet18``) looked up in ./configs and the repo's configs/."""
    p = Path(name)
    if p.is_file():
        return p
    stem = p.name if p.suffix in (".yaml", ".yml") else p.name + ".yaml"
    for d in (Path.cwd() / "configs", Path(__file__).resolve().parents[3] / "configs"):
        if (d / stem).is_file():
            return d / stem
    return p


def training_preset(cfg: dict) -> Any:
    """The preset a recipe trains with: its named preset at its size, histogram standardisation, and the lung
    segmenter where the films need a mask. Every place that trains or records a recipe's preset (covidcxr train,
    a federated site, the federated coordinator's checkpoint) takes it from here."""
    from covidcxr.preprocess import get_preset

    preset = get_preset(cfg["data"]["preset"] or _default_preset(cfg), size=cfg["data"]["size"])
    if cfg["data"].get("hist_standardize"):
        from covidcxr.preprocess import standardized

        preset = standardized(preset, cfg["data"]["hist_standardize"])
    if preset.needs_lung_mask:  # lung crop or lung-field standardisation: $COVIDCXR_LUNG_MODEL or the pretrained
        from covidcxr.segment.maskspec import MaskSpec  # lung U-Net, carried by the preset into the loader workers

        preset = preset.with_masks(MaskSpec.for_training())
    return preset


def segmenter_record(preset: Any) -> dict[str, Any]:
    """``{training key: segmenter record}`` for a preset whose films need a lung mask, else ``{}``: inference uses
    that segmenter or refuses."""
    if not preset.needs_lung_mask:
        return {}
    from covidcxr.segment.maskspec import TRAINING_KEY

    return {TRAINING_KEY: preset.masks.record()}


def prepare(cfg: dict, data: str | os.PathLike) -> tuple[Any, Any, list[str], dict[str, Any]]:
    """The DataModule, preset, class names and training summary for a config and a manifest."""
    from covidcxr.data import CXRDataModule, DataConfig, read_manifest
    from covidcxr.data.labels import task_classes
    from covidcxr.models import get_spec

    get_spec(cfg["model"]["arch"])  # unknown architecture: fail before reading data
    preset = training_preset(cfg)
    d = cfg["data"]
    if d.get("task") == "findings":
        return _prepare_findings(cfg, data, preset)
    try:  # binary (Deep-COVID): normal and pneumonia both train the non-COVID output
        classes, label_map = task_classes(d.get("task", "3class"), d["classes"])
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if d.get("minority_label") is not None and d["minority_label"] not in label_map:
        raise ConfigError(f"data.minority_label {d['minority_label']!r} is not a training label ({sorted(label_map)})")
    cw = cfg["loss"]["class_weights"]
    if isinstance(cw, list) and len(cw) != len(classes):
        raise ConfigError(f"loss.class_weights has {len(cw)} values for {len(classes)} classes {classes}")
    df = read_manifest(data, require_split=True)
    from covidcxr.data.manifest import keep_labels  # logs what it leaves out, and how many rows

    df, dropped_labels = keep_labels(df, list(label_map), cfg["data"]["label_filter"] or None, where=data)
    _check_splits(df, data)
    dm = CXRDataModule(df, preset, DataConfig(
        batch_size=d["batch_size"], num_workers=d["num_workers"], pin_memory=bool(d["pin_memory"]),
        augment=_augment(cfg), cache_dir=d["cache_dir"], sampler=d["sampler"],
        minority_fraction=d["minority_fraction"], minority_label=d.get("minority_label"),
        group_max_repeat=d["group_max_repeat"], group_min_size=d["group_min_size"], seed=cfg["seed"],
        classes=label_map))
    summary = {
        "run_name": cfg["name"],
        "recipe": cfg["name"],
        "recipe_description": cfg["recipe"],
        "config": cfg,
        "manifest": str(Path(data).resolve()),
        "manifest_sha256": _sha256(data),
        "labels_left_out": dropped_labels,
        "splits": split_counts(df),
        "seed": cfg["seed"],
        "preset": preset.name,
        "weights_init": cfg["model"]["weights"],
        "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": str(torch.__version__),
        "lightning": str(L.__version__),
    }
    summary.update(segmenter_record(preset))  # which segmenter masked the training images
    return dm, preset, classes, summary


# --------------------------------------------------------------------------- ChestX-ray14 findings (multi-label)


def _split_findings(v: object) -> list[str]:
    return [f.strip() for f in str(v).split("|") if f.strip()] if isinstance(v, str) else []


def findings_targets(frame: pd.DataFrame, classes: list[str]) -> torch.Tensor:
    """Multi-hot rows (frame rows x classes) from NIH's '|'-separated Finding Labels."""
    index = {c: i for i, c in enumerate(classes)}
    t = torch.zeros(len(frame), len(classes))
    for r, v in enumerate(frame["findings"]):
        for f in _split_findings(v):
            if f in index:
                t[r, index[f]] = 1.0
    return t


def _prepare_findings(cfg: dict, data: str | os.PathLike, preset: Any) -> tuple[Any, Any, list[str], dict[str, Any]]:
    """data.task findings: the manifest rows with NIH findings (the ChestX-ray14 step of twice transfer).

    The outputs are the findings seen in the training rows ("No Finding" included, as a label of its own:
    its neuron becomes the COVID stage's "normal" row)."""
    from covidcxr.data import CXRDataModule, DataConfig, read_manifest

    d = cfg["data"]
    if cfg["loss"]["class_weights"] is not None or d["sampler"] is not None:
        raise ConfigError("data.task findings is multi-label: set loss.class_weights and data.sampler to null")
    df = read_manifest(data, require_split=True)
    if "findings" not in df.columns:
        raise ConfigError(f"{data}: data.task findings needs a 'findings' column (NIH 'Finding Labels'); build the "
                          "manifest with `covidcxr data build --source nih=DIR ...`")
    has = df["findings"].map(lambda v: bool(_split_findings(v)))
    df = df[has & df["split"].isin(["train", "val"])]
    counts = pd.Series([f for v in df.loc[df["split"] == "train", "findings"] for f in _split_findings(v)])
    classes = sorted(counts.unique().tolist())
    if len(classes) < 2 or (df["split"] == "val").sum() == 0:
        raise ConfigError(f"{data}: data.task findings needs NIH rows with at least two findings in 'train' and some "
                          f"in 'val' (found {len(classes)} finding(s), {(df['split'] == 'val').sum()} val rows)")
    _check_splits(df, data)
    label_map = {lab: i for i, lab in enumerate(sorted(df["label"].astype(str).unique()))}  # unused by the loss
    dm = CXRDataModule(df, preset, DataConfig(
        batch_size=d["batch_size"], num_workers=d["num_workers"], pin_memory=bool(d["pin_memory"]),
        augment=_augment(cfg), cache_dir=d["cache_dir"], sampler=None, seed=cfg["seed"], classes=label_map))
    summary = {
        "run_name": cfg["name"], "recipe": cfg["name"], "recipe_description": cfg["recipe"], "config": cfg,
        "task": "findings-multilabel",
        "manifest": str(Path(data).resolve()), "manifest_sha256": _sha256(data), "splits": split_counts(df),
        "findings_train": {str(k): int(v) for k, v in counts.value_counts().items()},
        "seed": cfg["seed"], "preset": preset.name, "weights_init": cfg["model"]["weights"],
        "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": str(torch.__version__), "lightning": str(L.__version__),
    }
    return dm, preset, classes, summary


#: keys a resumed run may change without a warning: training longer, or on other hardware
_RESUME_FREE = ("trainer.max_epochs", "trainer.max_steps", "trainer.accelerator", "trainer.devices",
                "trainer.num_nodes", "trainer.num_threads", "data.num_workers")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def resume_changes(previous: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """Config keys that differ from the run being resumed (``"key: old -> new"``), hardware/length excepted.

    Lightning resumes whatever it is given; a changed input size or model silently mixes two runs.
    """
    a, b = _flatten(previous), _flatten(cfg)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k not in _RESUME_FREE and a.get(k) != b.get(k)]


def finalize_best(best: Path, module: Any, dm: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    """Rewrite ``best.ckpt`` as the self-contained inference bundle (no optimiser, no Lightning state) and
    store the COVID-19 operating threshold chosen on the val split with the best weights.

    Returns what was stored (``{"threshold": ..., "operating_point": {...}}``; threshold None when the
    recipe keeps argmax or the classes have no positive output).
    """
    from covidcxr.evaluate.core import val_operating_point
    from covidcxr.models.checkpoint import load

    from covidcxr.safeload import torch_load

    raw = torch_load(best)  # weights_only=True unless --trust-checkpoint
    bundle = raw["covidcxr"] if isinstance(raw, dict) and "covidcxr" in raw else raw
    op_cfg = cfg["operating_point"]
    positive, target = op_cfg["positive"], op_cfg["target_sensitivity"]
    stored: dict[str, Any] = {"threshold": None, "best_epoch": (bundle.get("training") or {}).get("epoch")}
    if target is not None and positive in bundle["classes"]:
        from covidcxr.data.dataset import CXRDataset

        lm = load(best)
        ds = dm.dataset("val")
        # the images as inference reads them (predict / evaluate / serve): decoded afresh, not from the
        # training cache, whose 8-bit quantisation moved p(COVID-19) by up to 0.17 on a fine-tuned MobileNetV2
        # (a lung-mask preset keeps the training run's segmenter: the stored preset carries none)
        fresh = CXRDataset(ds.frame, lm.preset.with_masks(ds.preset.masks), augment=None, cache_dir=None,
                           classes=ds.classes)
        loader = torch.utils.data.DataLoader(fresh, batch_size=dm.batch_size, num_workers=dm.num_workers)
        probs = []
        with torch.no_grad():
            for batch in loader:
                probs.append(torch.softmax(lm.model(batch["image"]).float(), dim=1))
        p = torch.cat(probs).numpy()
        classes = list(bundle["classes"])
        frame = ds.frame.assign(label=[classes[i] for i in ds.labels])
        op = val_operating_point(frame, p, classes, positive, float(target))
        if op.get("threshold") is not None:
            op["chosen_at"] = "end of training (covidcxr train), best epoch's weights"
            bundle["threshold"] = float(op["threshold"])
            bundle.setdefault("metrics", {})["operating_point"] = json.loads(json.dumps(op, default=float))
            stored.update(threshold=bundle["threshold"], operating_point=bundle["metrics"]["operating_point"])
            log.info("COVID-19 threshold %.4f (sensitivity >= %s on val) stored in %s", op["threshold"], target, best)
        else:
            log.warning("%s: no %s image in the val split; best.ckpt keeps argmax", best, positive)
    from covidcxr.models.features import attach_feature_summary  # site check's reference; a failure only warns

    attach_feature_summary(bundle, best, dm)
    atomic_torch_save(bundle, best)
    return stored


def last_ok(out: Path) -> bool:
    return (out / "last.ckpt").is_file()


def fit(cfg: dict[str, Any], data: str | os.PathLike, out: str | os.PathLike, resume: bool = False,
        overwrite: bool = False) -> Path:
    """Train per ``cfg`` on manifest ``data`` into folder ``out``; returns ``out``.

    With ``stages`` in the recipe (twice transfer learning), each stage trains first into
    ``out/stages/NAME/`` (the recipe with the stage's overrides), each starting from the previous stage's
    ``best.ckpt`` (the first from ``model.weights``); then the recipe itself trains into ``out`` from the
    last stage's ``best.ckpt``, keeping the output neurons whose names match (``Pneumonia`` -> pneumonia,
    ``No Finding`` -> normal). ``resume`` skips finished stages (those with a ``summary.json``).
    See :func:`fit_one` for one stage.
    """
    stages = cfg.get("stages") or []
    if not stages:
        return fit_one(cfg, data, out, resume=resume, overwrite=overwrite)
    from covidcxr.train.config import apply_mapping, validate

    out = Path(out)
    if not resume and not overwrite and (out / "best.ckpt").exists():  # refuse before any stage trains
        raise ConfigError(f"{out}: already holds a trained run (best.ckpt, with its tuned threshold); "
                          "pass --overwrite to replace it, --resume to continue it, or choose another --out")
    base = {**copy.deepcopy(cfg), "stages": []}
    chain: list[dict[str, Any]] = []
    previous: Path | None = None
    for st in stages:
        over = dict(st.get("overrides") or {})
        scfg = apply_mapping(base, over, f"stage {st['name']}")
        scfg["name"] = f"{cfg['name']}.{st['name']}"
        if previous is not None and "model.weights" not in over:
            scfg["model"]["weights"] = str(previous)
        scfg = validate(scfg)
        sout = out / "stages" / st["name"]
        if resume and (sout / "summary.json").is_file() and (sout / "best.ckpt").is_file():
            log.info("stage %s already trained in %s; skipping it", st["name"], sout)
        else:
            log.info("stage %s: %s -> %s", st["name"], scfg["model"]["weights"], sout)
            fit_one(scfg, data, sout, resume=resume and last_ok(sout), overwrite=overwrite)
        previous = sout / "best.ckpt"
        chain.append({"name": st["name"], "run": str(sout), "init": scfg["model"]["weights"],
                      "best_checkpoint": str(previous), "sha256": _sha256(previous),
                      "task": scfg["data"].get("task")})
    final = copy.deepcopy(base)
    final["model"]["weights"] = str(previous)
    log.info("final stage: %s -> %s", previous, out)
    # a chain interrupted during an earlier stage has no final last.ckpt yet: start the final stage then
    return fit_one(validate(final), data, out, resume=resume and last_ok(out), overwrite=overwrite,
                   extra_summary={"stages": chain, "recipe_weights": cfg["model"]["weights"]})


def fit_one(cfg: dict[str, Any], data: str | os.PathLike, out: str | os.PathLike, resume: bool = False,
            overwrite: bool = False, extra_summary: dict[str, Any] | None = None) -> Path:
    """Train one stage per ``cfg`` on manifest ``data`` into folder ``out``; returns ``out``.

    ``resume`` continues from ``out/last.ckpt`` (optimiser, schedule, epoch and step included).
    A folder that already holds a trained run (``best.ckpt``) is refused unless ``overwrite``: its
    checkpoints and logs are then replaced. At the end ``best.ckpt`` (best epoch by ``checkpoint.monitor``)
    is rewritten as the inference bundle with the val-chosen threshold; ``last.ckpt`` keeps the full
    training state for ``resume``.
    """
    from covidcxr.train.module import CXRClassifier

    out = Path(out)
    last = out / "last.ckpt"
    if not resume and not overwrite and "LOCAL_RANK" not in os.environ and (out / "best.ckpt").exists():
        raise ConfigError(f"{out}: already holds a trained run (best.ckpt, with its tuned threshold); "
                          "pass --overwrite to replace it, --resume to continue it, or choose another --out")
    if resume and not last.is_file():
        raise ConfigError(f"{last}: nothing to resume (no last.ckpt); start without --resume")
    if resume and not zipfile.is_zipfile(last):
        # torch.save writes a zip archive; a truncated or foreign file would otherwise fail deep inside
        # Lightning with a miniz traceback
        raise ConfigError(f"{last}: cannot resume, not a complete checkpoint (truncated or not written by "
                          "covidcxr train); delete it or start without --resume")
    if resume and (out / "config.yaml").is_file():
        import yaml

        try:
            previous = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, OSError, UnicodeDecodeError):
            previous = None  # only a check: an unreadable old config must not stop the resume
        changed = resume_changes(previous, cfg) if isinstance(previous, dict) else []
        if changed:
            log.warning("resuming %s with a config that differs from the original run: %s", out, "; ".join(changed))
    # only the launching process cleans up: DDP children (and torchrun ranks) have LOCAL_RANK set
    if not resume and "LOCAL_RANK" not in os.environ:
        stale = [p for p in (out / "best.ckpt", last, out / "logs", out / "tensorboard", out / "samples") if p.exists()]
        if stale:
            log.warning("%s holds an earlier run; replacing its checkpoints and logs (--overwrite)", out)
            for p in stale:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    if cfg["trainer"].get("num_threads"):
        torch.set_num_threads(int(cfg["trainer"]["num_threads"]))
    L.seed_everything(int(cfg["seed"]), workers=True, verbose=False)

    if cfg["model"]["freeze_backbone"] and cfg["model"]["weights"] in (None, "", "none"):
        log.warning("model.freeze_backbone with weights 'none' trains only the head on random features")
    dm, preset, classes, summary = prepare(cfg, data)
    summary.update(extra_summary or {})
    dm.setup("fit")
    cw = cfg["loss"]["class_weights"]
    weights = (dm.class_weights() if cw == "balanced"
               else torch.tensor(cw, dtype=torch.float32) if isinstance(cw, list) else None)
    robust: dict[str, Any] = {}
    if not cfg["data"].get("task") == "findings":
        # the (source, class) groups that group DRO and the source adversary work on, recorded in the summary
        counts = dm.group_counts()
        need = 2 if cfg["adversary"]["kind"] else 1
        if (cfg["loss"]["kind"] == "group_dro" or need == 2) and len({g // len(classes) for g in
                                                                      counts.nonzero()[0]}) < need:
            raise ConfigError(f"{data}: loss.kind group_dro needs a 'source' column; adversary.kind source needs "
                              "training images from at least two sources")
        robust = {"sources": list(dm.sources), "group_counts": counts.tolist()}
        summary["train_groups"] = {n: int(c) for n, c in zip(dm.group_names(), counts) if c}
    model = CXRClassifier(cfg, classes=classes, preset=preset, class_weights=weights, summary=summary, **robust)
    if model.multilabel:
        for role in ("train", "val"):
            model.set_targets(role, findings_targets(dm.dataset(role).frame, classes))
    trainer = build_trainer(cfg, out)
    model.summary["run"] = {"world_size": int(trainer.world_size), "num_nodes": int(trainer.num_nodes),
                            "strategy": type(trainer.strategy).__name__, "precision": str(trainer.precision),
                            "accelerator": type(trainer.accelerator).__name__, "resumed": bool(resume)}
    if trainer.is_global_zero:
        dump_config(cfg, out / ("config.resumed.yaml" if resume else "config.yaml"))
    trainer.fit(model, datamodule=dm, ckpt_path=str(last) if resume else None)

    if trainer.is_global_zero:
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        score = trainer.checkpoint_callback.best_model_score if trainer.checkpoint_callback else None
        stored = finalize_best(Path(best), model, dm, cfg) if best and Path(best).is_file() else {"threshold": None}
        result = {
            "run": str(out),
            "best_checkpoint": best,
            "best_score": float(score) if score is not None else None,
            "monitor": cfg["checkpoint"]["monitor"],
            "last_checkpoint": str(last),
            "epochs": int(trainer.current_epoch),
            "global_step": int(trainer.global_step),
            "stopped_early": any(getattr(cb, "stopped_epoch", 0) > 0 for cb in trainer.callbacks
                                 if isinstance(cb, EarlyStopping)),
            "final_metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if torch.as_tensor(v).numel() == 1},
            "best_epoch": stored.get("best_epoch"),
            "threshold": stored["threshold"],
            "operating_point": stored.get("operating_point"),
            "training": {k: v for k, v in model.summary.items() if k != "config"},
        }
        (out / "summary.json").write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    return out
