"""Severity training (Lightning) and the shared image pipeline for training, evaluation and CV."""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from covidcxr.preprocess import AUGMENT_RECIPES, Augment, Preset
from covidcxr.severity import labels as L_
from covidcxr.severity.labels import SCORE_MAX, SCORES, SeverityError
from covidcxr.severity.metrics import level_point, score_point
from covidcxr.severity.model import CLASSES, TASKS, Initial, clamp_scores, head_path, initial_model

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- images
def prepare_images(df: pd.DataFrame, preset: Preset) -> tuple[list[np.ndarray], np.ndarray, list[dict[str, str]]]:
    """Read and ``preset.prepare`` every image once (cached in memory; the sets are small).

    Returns the prepared arrays, a boolean mask of rows that worked, and ``[{"path", "error"}]``
    for the files that could not be read: a bad file is reported, never fatal.
    """
    from covidcxr.io import CXRReadError, read_image
    from covidcxr.preprocess import PresetError

    arrays: list[np.ndarray] = []
    ok = np.zeros(len(df), bool)
    bad: list[dict[str, str]] = []
    for i, (path, mpath) in enumerate(zip(df["path"], df.get("mask_path", [""] * len(df)))):
        try:
            mask = None
            if mpath and preset.needs_lung_mask:
                mask = read_image(mpath) > 0.5
            arrays.append(preset.prepare(read_image(path), mask))
            ok[i] = True
        except (CXRReadError, PresetError, OSError) as err:
            bad.append({"path": str(path), "error": str(err)})
    if bad:
        log.warning("%d image(s) could not be read and were skipped; first: %s", len(bad), bad[0]["error"])
    return arrays, ok, bad


class PreparedDataset(Dataset):
    """Prepared arrays + targets; optional seeded augmentation, then ``preset.finalize``."""

    def __init__(self, arrays: Sequence[np.ndarray], targets: np.ndarray, preset: Preset,
                 augment: Augment | None = None):
        self.arrays, self.targets, self.preset, self.augment = list(arrays), targets, preset, augment
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img: Any = self.arrays[i]
        if self.augment is not None:
            img = self.augment(img, index=i, epoch=self.epoch)
        return self.preset.finalize(img), torch.as_tensor(self.targets[i])


@torch.no_grad()
def run_model(model: nn.Module, arrays: Sequence[np.ndarray], preset: Preset, batch_size: int = 32) -> np.ndarray:
    """Raw network outputs (N x k) for prepared arrays, in eval mode."""
    model.eval()
    dev = next(model.parameters()).device
    outs = []
    for i in range(0, len(arrays), batch_size):
        x = torch.stack([preset.finalize(a) for a in arrays[i : i + batch_size]]).to(dev)
        outs.append(model(x).float().cpu())
    return torch.cat(outs).numpy() if outs else np.zeros((0, 2), np.float32)


def outputs_to_predictions(task: str, raw: np.ndarray) -> np.ndarray:
    """Level probabilities (softmax) or clamped scores."""
    if task == "level":
        return torch.softmax(torch.as_tensor(raw), 1).numpy()
    return clamp_scores(raw)


# ----------------------------------------------------------------------------- Lightning
def _lightning():
    import lightning as L

    return L


class SeverityModule(_lightning().LightningModule):
    """Fine-tunes a backbone + 2-output head; the backbone may stay frozen for the first epochs."""

    def __init__(self, model: nn.Module, task: str, head: str, lr: float = 1e-3, backbone_lr_mult: float = 0.1,
                 weight_decay: float = 1e-4, freeze_epochs: int = 0, class_weights: Sequence[float] | None = None):
        super().__init__()
        self.model, self.task, self.head = model, task, head
        self.lr, self.backbone_lr_mult, self.weight_decay = lr, backbone_lr_mult, weight_decay
        self.freeze_epochs = int(freeze_epochs)
        cw = torch.as_tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.register_buffer("class_weights", cw, persistent=False)
        self.register_buffer("score_scale", torch.tensor([SCORE_MAX[s] for s in SCORES]), persistent=False)
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {}
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._train_loss: list[float] = []

    # -- parameters
    def _head_params(self) -> list[nn.Parameter]:
        return list(self.model.get_submodule(self.head).parameters())

    def _backbone_params(self) -> list[nn.Parameter]:
        ids = {id(p) for p in self._head_params()}
        return [p for p in self.model.parameters() if id(p) not in ids]

    @property
    def frozen(self) -> bool:
        return self.current_epoch < self.freeze_epochs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.task == "level":
            return nn.functional.cross_entropy(out, y.long(), weight=self.class_weights)
        # scores: both scales to [0, 1] so opacity (0-6) weighs as much as extent (0-8)
        return nn.functional.mse_loss(out / self.score_scale, y.float() / self.score_scale)

    # -- hooks
    def on_train_epoch_start(self) -> None:
        for p in self._backbone_params():
            p.requires_grad_(not self.frozen)
        ds = self.trainer.train_dataloader.dataset if self.trainer.train_dataloader is not None else None
        if isinstance(ds, PreparedDataset):
            ds.epoch = self.current_epoch
        self._train_loss = []

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.frozen:  # keep frozen BatchNorm statistics fixed too
            head = self.model.get_submodule(self.head)
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m is not head:
                    m.eval()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss(self(x), y)
        self._train_loss.append(float(loss.detach()))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self._val.append((self(x).detach().cpu(), y.cpu()))

    def on_train_epoch_end(self) -> None:
        row = {"epoch": self.current_epoch, "train_loss": float(np.mean(self._train_loss)) if self._train_loss else None,
               "backbone_frozen": self.frozen}
        if self.history and self.history[-1]["epoch"] == self.current_epoch:
            self.history[-1].update(row)
        else:
            self.history.append(row)
        if not self.trainer.val_dataloaders:  # no validation set: the last epoch is the one kept
            self._keep(row, float(self.current_epoch))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        out = torch.cat([o for o, _ in self._val])
        y = torch.cat([t for _, t in self._val])
        self._val = []
        row: dict[str, Any] = {"epoch": self.current_epoch, "val_loss": float(self.loss(out, y))}
        if self.task == "level":
            row.update({f"val_{k}": v for k, v in level_point(y.numpy(), out.argmax(1).numpy()).items()})
            monitor = -row["val_loss"]
        else:
            pred = clamp_scores(out).numpy()
            row.update({f"val_{k}": v for k, v in score_point(y.numpy(), pred).items()})
            monitor = -sum(row[f"val_{s}_mae"] / SCORE_MAX[s] for s in SCORES)
        self.history.append(row)
        self._keep(row, monitor)

    def _keep(self, row: dict[str, Any], monitor: float) -> None:
        if not self.best or monitor >= self.best["monitor"]:
            self.best = {"monitor": monitor, "epoch": self.current_epoch, "row": dict(row),
                         "state": copy.deepcopy({k: v.detach().cpu() for k, v in self.model.state_dict().items()})}

    def configure_optimizers(self):
        groups = [{"params": self._head_params(), "lr": self.lr}]
        bb = self._backbone_params()
        if bb:
            groups.append({"params": bb, "lr": self.lr * self.backbone_lr_mult})
        return torch.optim.AdamW(groups, weight_decay=self.weight_decay)


def make_trainer(max_epochs: int, accelerator: str = "cpu", progress: bool | None = None, **kw: Any):
    """The Lightning trainer; ``progress`` (default on) shows a progress bar per epoch on stderr,
    so a 40-60 s severity fit is not silent (issue 11 §8)."""
    L = _lightning()
    show = True if progress is None else progress
    if show:
        from lightning.pytorch.callbacks import TQDMProgressBar

        kw["callbacks"] = [*kw.get("callbacks", []), TQDMProgressBar(refresh_rate=1)]
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*number of training batches.*")
    warnings.filterwarnings("ignore", ".*no `val_dataloader`.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*is deprecated.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no "GPU available: False" chatter
    return L.Trainer(
        max_epochs=int(max_epochs), accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=show, enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1,
        deterministic=False, **kw,
    )


# ----------------------------------------------------------------------------- training
@dataclass
class SeverityConfig:
    """Everything ``severity train`` takes; stored in the checkpoint's ``training`` summary."""

    task: str
    data: str
    out: str
    init: str | None = None
    arch: str = "resnet18"
    #: initial weights of ``arch`` when no ``init`` detector is given: none | imagenet | catalogue name | PATH
    weights: str | None = None
    preset: str | None = None
    size: int | None = None
    images: str | None = None
    max_epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    backbone_lr_mult: float = 0.1
    weight_decay: float = 1e-4
    freeze_epochs: int = 0
    augment: str = "light"
    level_source: str = "auto"
    level_threshold: float = L_.PROXY_THRESHOLD
    val_fraction: float = 0.15
    seed: int = 0
    #: Lightning accelerator: "cpu" (default, what the tests and the dev figures use), "gpu" or "auto"
    accelerator: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)


def file_sha256(path: str | os.PathLike, n: int = 16) -> str:
    """The first ``n`` hex digits of the file's sha256 (the training summary's short form)."""
    from covidcxr.io import file_sha256 as full

    return full(path)[:n]


def patient_split(patients: Sequence[str], fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of rows whose patient falls in a seeded ``fraction`` of patients."""
    uniq = np.unique(np.asarray(patients, dtype=str))
    rng = np.random.default_rng(seed)
    k = max(1, int(round(fraction * len(uniq)))) if len(uniq) > 1 else 0
    chosen = set(rng.permutation(uniq)[:k].tolist())
    return np.asarray([p in chosen for p in patients])


def train_val_frames(df: pd.DataFrame, val_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Train and validation rows: the manifest's split when it has one, else a seeded patient split.
    Test rows are never used."""
    has_split = (df["split"] != "").any()
    if has_split:
        tr, va = df[df["split"] == "train"], df[df["split"] == "val"]
        if len(tr) == 0:
            raise SeverityError("no labelled rows in split 'train'")
        if len(va) == 0 and val_fraction > 0:
            m = patient_split(tr["patient_id"].tolist(), val_fraction, seed)
            return tr[~m], tr[m], f"manifest train split, {val_fraction:g} of its patients held out for validation"
        return tr, va, "manifest train/val splits"
    if val_fraction <= 0:
        return df, df.iloc[0:0], "all rows (no validation)"
    m = patient_split(df["patient_id"].tolist(), val_fraction, seed)
    return df[~m], df[m], f"no split column: seeded patient split, {val_fraction:g} of patients for validation"


def fit_model(ini: Initial, task: str, tr_arrays: Sequence[np.ndarray], y_tr: np.ndarray,
              va_arrays: Sequence[np.ndarray], y_va: np.ndarray, cfg: SeverityConfig) -> SeverityModule:
    """Train ``ini.model`` in place; returns the module (``.best``, ``.history``)."""
    L = _lightning()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    head = head_path(ini.arch)
    if task == "scores":  # start the regression at the training mean: no huge first-epoch loss
        h = ini.model.get_submodule(head)
        with torch.no_grad():
            h.weight.mul_(0.01)
            h.bias.copy_(torch.as_tensor(np.nanmean(y_tr, axis=0), dtype=h.bias.dtype))
        y_tr, y_va = y_tr.astype(np.float32), y_va.astype(np.float32)
        cw = None
    else:
        counts = np.bincount(y_tr.astype(int), minlength=2).astype(float)
        cw = (counts.sum() / (2 * np.maximum(counts, 1))).tolist()
        y_tr, y_va = y_tr.astype(np.int64), y_va.astype(np.int64)
    aug = AUGMENT_RECIPES.get(cfg.augment)
    if cfg.augment not in AUGMENT_RECIPES:
        raise SeverityError(f"unknown augmentation {cfg.augment!r}; known: {', '.join(AUGMENT_RECIPES)}")
    if aug is not None:
        aug = Augment(**{**aug.to_dict(), "seed": cfg.seed})
    g = torch.Generator().manual_seed(cfg.seed)
    tr = DataLoader(PreparedDataset(tr_arrays, y_tr, ini.preset, aug), batch_size=cfg.batch_size, shuffle=True,
                    generator=g, drop_last=len(tr_arrays) > cfg.batch_size and len(tr_arrays) % cfg.batch_size == 1)
    va = DataLoader(PreparedDataset(va_arrays, y_va, ini.preset), batch_size=max(cfg.batch_size, 32)) if len(va_arrays) else None
    module = SeverityModule(ini.model, task, head, cfg.lr, cfg.backbone_lr_mult, cfg.weight_decay,
                            cfg.freeze_epochs, cw)
    make_trainer(cfg.max_epochs, cfg.accelerator).fit(module, tr, va)
    module.model.cpu()
    for p in module.model.parameters():
        p.requires_grad_(True)
    return module


def train_severity(cfg: SeverityConfig) -> Path:
    """Train a severity model; writes ``best.ckpt``, ``last.ckpt`` and ``train_summary.json`` in ``cfg.out``.

    Returns the path of ``best.ckpt`` (the epoch with the best validation loss for levels, or the
    best range-normalised validation MAE for scores; the last epoch when there is no validation set).
    """
    from covidcxr import models

    if cfg.task not in TASKS:
        raise SeverityError(f"unknown severity task {cfg.task!r}; use level or scores")
    table = L_.load_table(cfg.data, cfg.images)
    df, y_all, target_desc = L_.select(table, cfg.task, "all", cfg.level_source, cfg.level_threshold)
    if len(df) == 0:
        raise SeverityError(f"{cfg.data}: no rows with {cfg.task} labels"
                            + (" (geographic_extent/opacity)" if cfg.task == "scores" else ""))
    df = df.assign(_y=list(y_all))
    tr_df, va_df, split_desc = train_val_frames(df, cfg.val_fraction, cfg.seed)
    ini = initial_model(cfg.task, cfg.init, cfg.arch, cfg.size, cfg.preset, cfg.weights)
    log.info("severity %s: %d train / %d val images; targets %s; init %s; preset %s",
             cfg.task, len(tr_df), len(va_df), target_desc, ini.init["init"], ini.preset.name)
    tr_arrays, tr_ok, bad_tr = prepare_images(tr_df, ini.preset)
    va_arrays, va_ok, bad_va = prepare_images(va_df, ini.preset)
    if not tr_arrays:
        raise SeverityError(f"{cfg.data}: none of the {len(tr_df)} training images could be read")
    y_tr = np.stack(tr_df["_y"].to_numpy()[tr_ok]) if cfg.task == "scores" else tr_df["_y"].to_numpy()[tr_ok]
    y_va = (np.stack(va_df["_y"].to_numpy()[va_ok]) if cfg.task == "scores" else va_df["_y"].to_numpy()[va_ok]) \
        if len(va_arrays) else np.zeros((0, 2) if cfg.task == "scores" else (0,))
    module = fit_model(ini, cfg.task, tr_arrays, y_tr, va_arrays, y_va, cfg)

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    training = {
        **{k: v for k, v in asdict(cfg).items() if k != "extra"}, **cfg.extra,
        "data_sha256": file_sha256(cfg.data),
        "targets": target_desc,
        "level_source": target_desc if cfg.task == "level" else None,
        "split": split_desc,
        "n_train": len(tr_arrays), "n_val": len(va_arrays),
        "n_train_patients": int(tr_df["patient_id"][tr_ok].nunique()),
        "n_val_patients": int(va_df["patient_id"][va_ok].nunique()) if len(va_arrays) else 0,
        "skipped_files": bad_tr + bad_va,
        "epochs_run": len({h["epoch"] for h in module.history}),
        "best_epoch": module.best.get("epoch"),
        "history": module.history,
        **ini.init,
    }
    if cfg.task == "scores":
        training["train_mean"] = dict(zip(SCORES, map(float, np.mean(y_tr, axis=0))))
    else:
        training["train_counts"] = dict(zip(L_.level_classes(target_desc),
                                            map(int, np.bincount(y_tr.astype(int), minlength=2))))
    best_row = {k: v for k, v in module.best.get("row", {}).items() if k.startswith("val_")}
    # a level model trained on the extent proxy is named so: proxy-level1/2, never CXR-S's level1/2
    classes = L_.level_classes(target_desc) if cfg.task == "level" else CLASSES[cfg.task]
    common = dict(arch=ini.arch, arch_kwargs={"num_classes": 2}, task=TASKS[cfg.task], classes=classes,
                  preset=ini.preset, training=training)
    models.save(out / "last.ckpt", module.model, metrics={k: v for k, v in (module.history[-1] if module.history else {}).items()
                                                          if k.startswith("val_")}, **common)
    best_model = copy.deepcopy(module.model)
    if module.best.get("state"):
        best_model.load_state_dict(module.best["state"])
    models.save(out / "best.ckpt", best_model, metrics=best_row, **common)
    (out / "train_summary.json").write_text(json.dumps({**training, "best_val": best_row}, indent=2, default=str))
    return out / "best.ckpt"
