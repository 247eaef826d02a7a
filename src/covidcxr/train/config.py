"""Training configuration: recipe YAML + command-line overrides -> one validated nested dict.

A recipe (``configs/*.yaml``) only states what differs from :data:`DEFAULTS`. Overrides are
``dotted.key=value`` strings whose value is parsed as YAML (``optimizer.lr=1e-3``,
``trainer.devices=2``, ``data.augment=none``). Unknown keys are refused, so a typo cannot
silently leave the default in place.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Iterable

import yaml

#: Every key a recipe may set, with its default.
DEFAULTS: dict[str, Any] = {
    "name": "run",
    "recipe": "",  # one line naming the paper and what the recipe reproduces
    "seed": 0,
    "model": {
        "arch": "resnet18",
        "weights": "none",  # none | imagenet | xrv-nih | xrv-all | chexnet | PATH
        "freeze_backbone": False,  # linear probe: only the head block trains, the body stays frozen (BN included)
        "warmup_epochs": 0,  # head warm-up: the body stays frozen for the first N epochs, then fine-tunes
        "kwargs": {},
    },
    "data": {
        "preset": None,  # default: the architecture's preset
        "size": None,  # override the preset's input size
        "batch_size": 16,
        "num_workers": 0,
        "augment": "light",  # a covidcxr.preprocess.AUGMENT_RECIPES name, or none
        "sampler": None,  # null | rebalance | weighted | group_balanced
        # group_balanced: every (source, class) cell of the train split drawn equally often per epoch
        # (docs/recipes.md). A cell is repeated at most group_max_repeat times per epoch, which caps the
        # per-cell quota (and the epoch length); cells under group_min_size images are merged per class
        "group_max_repeat": 4.0,
        "group_min_size": 5,
        # histogram standardisation of the input (stored in the checkpoint's preset, so inference applies it):
        # null (off) | film (the whole film's gray levels matched to the NIH ChestX-ray14 reference quantiles)
        # | lung (the mapping fitted on the pixels inside the lung mask of the run's lung segmenter, to NIH
        # ChestX-ray14 lung-field quantiles, then applied to the whole film; docs/recipes.md)
        "hist_standardize": None,
        "minority_fraction": 0.5,
        # the class the rebalance sampler fills minority_fraction of each batch with (COVID-Net: COVID-19,
        # whatever its frequency); null: the rarest training class
        "minority_label": None,
        "task": "3class",  # 3class (normal, pneumonia, COVID-19) | binary (non-COVID, COVID-19: Deep-COVID)
        "cache_dir": None,  # keep preset.prepare outputs on disk here (null: no cache)
        "label_filter": None,  # list of labels to keep
        "classes": None,  # default: normal, pneumonia, COVID-19
        "pin_memory": False,
    },
    "loss": {
        # erm: mean cross-entropy | group_dro: online group DRO over (source, class) groups (Sagawa et al.,
        # ICLR 2020): exponentiated-gradient group weights with step dro_eta; dro_adjustment C adds
        # C / sqrt(n_group) to each group's loss (their group adjustment). ``loss: group_dro`` is short for
        # ``loss: {kind: group_dro}``
        "kind": "erm",
        "dro_eta": 0.01,
        "dro_adjustment": 0.0,
        "label_smoothing": 0.0,
        "class_weights": None,  # null | balanced | a list, one weight per class (COVID-Net: [1, 1, 4])
    },
    "optimizer": {
        "name": "adam",  # adam | adamw | sgd
        "lr": 1e-4,
        "momentum": 0.9,
        "weight_decay": 0.0,
        "nesterov": False,
        "body_lr_mult": 1.0,  # the body's learning rate = lr x body_lr_mult (the fresh head keeps lr)
    },
    "scheduler": {
        "name": "none",  # none | step | plateau | cosine
        "step_size": 7,
        "gamma": 0.1,
        "factor": 0.7,
        "patience": 5,
        "monitor": "val_loss",
        "min_lr": 0.0,
    },
    "early_stopping": {
        "monitor": "val_loss",  # val_loss | val_acc | val_balanced_acc | val_auc_covid | null (off)
        "mode": "min",
        "patience": 10,
        "min_delta": 0.0,
    },
    "checkpoint": {
        "monitor": "val_loss",
        "mode": "min",
        "every_n_train_steps": None,  # also refresh last.ckpt every N optimiser steps (mid-epoch resume)
    },
    "operating_point": {
        # after training, the COVID-19 threshold reaching this sensitivity on the val split is stored in
        # best.ckpt (predict/serve/evaluate use it); null: keep argmax
        "target_sensitivity": 0.95,
        "positive": "COVID-19",
    },
    "trainer": {
        "max_epochs": 20,
        "max_steps": -1,
        "accelerator": "auto",  # cpu | gpu | auto
        "devices": "auto",
        "num_nodes": 1,
        "strategy": "auto",  # auto | ddp | ddp_spawn | fsdp ...
        "precision": "32-true",  # 32-true | bf16-mixed | 16-mixed
        "channels_last": False,
        "compile": False,  # torch.compile the model
        "log_every_n_steps": 10,
        "limit_train_batches": None,
        "limit_val_batches": None,
        "val_check_interval": None,
        "gradient_clip_val": None,
        "accumulate_grad_batches": 1,
        "deterministic": False,
        "progress_bar": True,
        "num_threads": None,  # torch.set_num_threads per process (CPU runs)
    },
    # A source adversary (conditional DANN: Ganin et al. 2016; Li et al. 2018): per class, a small MLP head
    # predicts the image's source from the pooled features through a gradient-reversal layer, so the body
    # learns features that do not tell the sources apart within a class. Training only: the head is not part
    # of best.ckpt. ``adversary: source`` is short for ``adversary: {kind: source}``
    "adversary": {
        "kind": None,  # null | source
        "weight": 0.1,  # the adversary loss's weight in the total loss
        "hidden": 128,  # hidden units of each per-class head (0: a linear head)
        "grl_schedule": "dann",  # dann: reversal strength 2 / (1 + exp(-10 p)) - 1 over progress p | constant: 1
    },
    # Earlier training stages, run in order before this recipe's own training (twice transfer learning:
    # ImageNet -> ChestX-ray14 findings -> COVID). Each item is {name: NAME, overrides: {dotted.key: value}}
    # applied to this recipe; the first stage starts from model.weights, every later stage (and the final
    # one, this recipe) from the previous stage's RUN/stages/NAME/best.ckpt, with output neuron keeping.
    "stages": [],
    "debug": {
        "record_samples": False,  # write RUN/samples/rank{R}.txt with the dataset indices each rank trained on
    },
}

_ENUMS = {
    ("optimizer", "name"): {"adam", "adamw", "sgd"},
    ("scheduler", "name"): {"none", "step", "plateau", "cosine"},
    ("data", "sampler"): {None, "rebalance", "weighted", "group_balanced"},
    ("data", "hist_standardize"): {None, "film", "lung"},
    ("loss", "kind"): {"erm", "group_dro"},
    ("adversary", "kind"): {None, "source"},
    ("adversary", "grl_schedule"): {"dann", "constant"},
    # findings: multi-label over the NIH ChestX-ray14 'Finding Labels' (manifest column findings) of the rows
    # that have them -- the ChestX-ray14 step of twice transfer learning (stages:)
    ("data", "task"): {"3class", "binary", "findings"},
    ("early_stopping", "mode"): {"min", "max"},
    ("checkpoint", "mode"): {"min", "max"},
}
#: Metrics the module logs at validation: what monitor keys may name.
VAL_METRICS = ("val_loss", "val_acc", "val_balanced_acc", "val_auc_covid", "val_f1_macro",
               "val_auc_mean")  # val_auc_mean: mean per-finding AUC of the multi-label findings task


class ConfigError(ValueError):
    """A recipe or override is malformed; the message names the file or key."""


#: sections that may be given as one word, short for {kind: WORD} (``loss: group_dro``, ``adversary: source``)
_KIND_SHORTHAND = ("loss", "adversary")


def _shorthand(key: str, base: Any, v: Any) -> Any:
    if key in _KIND_SHORTHAND and isinstance(base, dict) and (v is None or isinstance(v, str)):
        return {"kind": v}
    return v


def _merge(base: dict, over: dict, where: str, path: str = "") -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        key = f"{path}{k}"
        if k not in base:
            raise ConfigError(f"{where}: unknown key {key!r}; known here: {sorted(base)}")
        if not path:
            v = _shorthand(k, base[k], v)
        if isinstance(base[k], dict) and k != "kwargs":
            if not isinstance(v, dict):
                raise ConfigError(f"{where}: {key!r} must be a mapping, got {v!r}")
            out[k] = _merge(base[k], v, where, key + ".")
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. optimizer.lr=1e-3)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({yaml_problem(err)})") from None
    return key.split("."), value


def apply_overrides(cfg: dict, overrides: Iterable[str]) -> dict:
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        keys, value = parse_override(item)
        _set(cfg, keys, value, item)
    return cfg


def apply_mapping(cfg: dict, mapping: dict[str, Any], where: str) -> dict:
    """Apply ``{"dotted.key": value}`` (a stage's overrides) like ``--set`` does; ``where`` names the origin."""
    cfg = copy.deepcopy(cfg)
    for key, value in mapping.items():
        _set(cfg, str(key).split("."), value, f"{where}: {key}")
    return cfg


def _set(cfg: dict, keys: list[str], value: Any, item: str) -> None:
    node = cfg
    for i, k in enumerate(keys[:-1]):
        if not isinstance(node, dict) or k not in node:
            raise ConfigError(f"override {item!r}: unknown key {'.'.join(keys[: i + 1])!r}")
        node = node[k]
    last = keys[-1]
    if not isinstance(node, dict) or (last not in node and keys[-2:-1] != ["kwargs"]):
        raise ConfigError(f"override {item!r}: unknown key {'.'.join(keys)!r}")
    if len(keys) == 1 and node is cfg:
        value = _shorthand(last, node.get(last), value)
        if isinstance(value, dict) and isinstance(node.get(last), dict):
            node[last] = _merge(node[last], value, f"override {item!r}", last + ".")
            return
    if isinstance(node.get(last), dict) and keys[-1] != "kwargs":
        raise ConfigError(f"override {item!r}: {'.'.join(keys)!r} is a section; set one of {sorted(node[last])}")
    node[last] = value


def _coerce_float(cfg: dict, section: str, key: str) -> None:
    v = cfg[section][key]
    if v is None:
        return
    try:
        cfg[section][key] = float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{section}.{key} must be a number, got {v!r}") from None


def validate(cfg: dict) -> dict:
    """Check types and choices; returns the config with numbers coerced (YAML reads 1e-4 as a string)."""
    for sec, key in (("optimizer", "lr"), ("optimizer", "momentum"), ("optimizer", "weight_decay"),
                     ("scheduler", "gamma"), ("scheduler", "factor"), ("scheduler", "min_lr"),
                     ("loss", "label_smoothing"), ("data", "minority_fraction"), ("early_stopping", "min_delta"),
                     ("optimizer", "body_lr_mult"), ("operating_point", "target_sensitivity"),
                     ("data", "group_max_repeat"), ("loss", "dro_eta"), ("loss", "dro_adjustment"),
                     ("adversary", "weight")):
        _coerce_float(cfg, sec, key)
    for (sec, key), allowed in _ENUMS.items():
        v = cfg[sec][key]
        if isinstance(v, str) and v.lower() in ("none", "null") and None in allowed:
            v = cfg[sec][key] = None
        if v not in allowed:
            raise ConfigError(f"{sec}.{key} = {v!r}; choose one of {sorted(str(a) for a in allowed)}")
    cw = cfg["loss"]["class_weights"]
    if isinstance(cw, str) and cw.lower() in ("none", "null"):
        cw = cfg["loss"]["class_weights"] = None
    if isinstance(cw, (list, tuple)):
        try:
            cfg["loss"]["class_weights"] = [float(x) for x in cw]
        except (TypeError, ValueError):
            raise ConfigError(f"loss.class_weights list must hold numbers, got {cw!r}") from None
        if any(x < 0 for x in cfg["loss"]["class_weights"]):
            raise ConfigError(f"loss.class_weights must be >= 0, got {cw!r}")
    elif cw not in (None, "balanced"):
        raise ConfigError(f"loss.class_weights = {cw!r}; choose null, balanced or a list of per-class weights")
    for sec in ("early_stopping", "checkpoint"):
        mon = cfg[sec]["monitor"]
        if mon is not None and mon not in VAL_METRICS:
            raise ConfigError(f"{sec}.monitor = {mon!r}; choose one of {list(VAL_METRICS)} or null")
    if cfg["optimizer"]["lr"] <= 0:
        raise ConfigError(f"optimizer.lr must be > 0, got {cfg['optimizer']['lr']}")
    if cfg["optimizer"]["body_lr_mult"] <= 0:
        raise ConfigError(f"optimizer.body_lr_mult must be > 0, got {cfg['optimizer']['body_lr_mult']}")
    _validate_robust(cfg)
    wu = cfg["model"]["warmup_epochs"]
    if not isinstance(wu, int) or isinstance(wu, bool) or wu < 0:
        raise ConfigError(f"model.warmup_epochs must be an integer >= 0, got {wu!r}")
    ts = cfg["operating_point"]["target_sensitivity"]
    if ts is not None and not 0 < ts <= 1:
        raise ConfigError(f"operating_point.target_sensitivity must be in (0, 1] or null, got {ts}")
    if not 0 <= cfg["loss"]["label_smoothing"] < 1:
        raise ConfigError("loss.label_smoothing must be in [0, 1)")
    bs = cfg["data"]["batch_size"]
    if not isinstance(bs, int) or bs < 1:
        raise ConfigError(f"data.batch_size must be a positive integer, got {bs!r}")
    if cfg["data"]["size"] is not None and (not isinstance(cfg["data"]["size"], int) or cfg["data"]["size"] < 32):
        raise ConfigError(f"data.size must be an integer >= 32, got {cfg['data']['size']!r}")
    me = cfg["trainer"]["max_epochs"]
    if not isinstance(me, int) or me < 1:
        raise ConfigError(f"trainer.max_epochs must be a positive integer, got {me!r}")
    if not isinstance(cfg["seed"], int):
        raise ConfigError(f"seed must be an integer, got {cfg['seed']!r}")
    w = cfg["model"]["weights"]
    cfg["model"]["weights"] = "none" if w in (None, False) else str(w)
    _validate_stages(cfg)
    return cfg


def _validate_robust(cfg: dict) -> None:
    """The group-robust keys (docs/recipes.md): sampler limits, group DRO step, adversary head."""
    d, lo, adv = cfg["data"], cfg["loss"], cfg["adversary"]
    if d["group_max_repeat"] < 1:
        raise ConfigError(f"data.group_max_repeat must be >= 1, got {d['group_max_repeat']}")
    gm = d["group_min_size"]
    if not isinstance(gm, int) or isinstance(gm, bool) or gm < 1:
        raise ConfigError(f"data.group_min_size must be an integer >= 1, got {gm!r}")
    if lo["dro_eta"] <= 0:
        raise ConfigError(f"loss.dro_eta must be > 0, got {lo['dro_eta']}")
    if lo["dro_adjustment"] < 0:
        raise ConfigError(f"loss.dro_adjustment must be >= 0, got {lo['dro_adjustment']}")
    if adv["weight"] < 0:
        raise ConfigError(f"adversary.weight must be >= 0, got {adv['weight']}")
    hid = adv["hidden"]
    if not isinstance(hid, int) or isinstance(hid, bool) or hid < 0:
        raise ConfigError(f"adversary.hidden must be an integer >= 0, got {hid!r}")
    robust = d["sampler"] == "group_balanced" or lo["kind"] == "group_dro" or adv["kind"] is not None
    if robust and d.get("task") == "findings":
        raise ConfigError("data.task findings is multi-label: the group-robust options (group_balanced, group_dro, "
                          "adversary) need single-label classes")


def _validate_stages(cfg: dict) -> None:
    stages = cfg.get("stages") or []
    if not isinstance(stages, list):
        raise ConfigError(f"stages must be a list of {{name, overrides}} mappings, got {type(stages).__name__}")
    names = []
    for i, st in enumerate(stages):
        if not isinstance(st, dict) or set(st) - {"name", "overrides"} or not isinstance(st.get("name"), str):
            raise ConfigError(f"stages[{i}] must be a mapping with 'name' (text) and 'overrides' (mapping), got {st!r}")
        if not st["name"] or "/" in st["name"] or st["name"] in names:
            raise ConfigError(f"stages[{i}]: name {st['name']!r} must be unique, non-empty and without '/'")
        names.append(st["name"])
        over = st.get("overrides") or {}
        if not isinstance(over, dict):
            raise ConfigError(f"stages[{i}] ({st['name']}): overrides must be a mapping of dotted keys")
        if "stages" in over:
            raise ConfigError(f"stages[{i}] ({st['name']}): a stage cannot have stages of its own")
        validate(apply_mapping({**cfg, "stages": []}, over, f"stages[{i}] ({st['name']})"))


def yaml_problem(err: Exception) -> str:
    """PyYAML's message on one line: the problem and where (its own text spans several lines with a caret)."""
    problem, mark = getattr(err, "problem", None), getattr(err, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(err).split())


def load_config(path: str | os.PathLike | None, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Read a recipe YAML (or start from the defaults when ``path`` is None) and apply overrides."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found (recipes live in configs/*.yaml)")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML ({yaml_problem(err)})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: a recipe must be a YAML mapping, got {type(raw).__name__}")
        cfg = _merge(cfg, raw, str(p))
        cfg.setdefault("name", p.stem)
        if cfg["name"] == "run":
            cfg["name"] = p.stem
    cfg = apply_overrides(cfg, overrides)
    return validate(cfg)


def dump_config(cfg: dict, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
