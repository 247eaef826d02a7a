"""The LightningModule: a registry model, its loss, optimiser, schedule and validation metrics.

Every Lightning checkpoint it writes carries a self-contained covidcxr bundle under the key
``"covidcxr"`` (architecture, classes, preset, weights, training summary, validation metrics), so
``covidcxr.models.load("RUN/best.ckpt")`` needs nothing else.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torchmetrics
from torch import nn

from covidcxr.preprocess import Preset

log = logging.getLogger(__name__)
# A frozen body is in eval mode on purpose (its BatchNorm statistics stay those of the pretrained network)
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


def _module_at(model: nn.Module, dotted: str | None) -> nn.Module | None:
    if not dotted:
        return None
    m = model
    for part in dotted.split("."):
        m = getattr(m, part, None)
        if m is None:
            return None
    return m


def init_model(arch: str, weights: str | None, classes: list[str], kwargs: dict[str, Any]) -> nn.Module:
    """A registry model with fresh weights (``none``) or initialised from a weight source."""
    from covidcxr import models

    if weights in (None, "", "none"):
        return models.build(arch, num_classes=len(classes), **kwargs)
    return models.create(arch, num_classes=len(classes), weights=weights, classes=list(classes), **kwargs)


class CXRClassifier(L.LightningModule):
    """Image classifier over ``classes`` with a covidcxr registry architecture.

    ``config`` is the full training config (see :mod:`covidcxr.train.config`); ``class_weights``
    (tensor, one per class) weights the cross-entropy when the recipe asks for it.

    Group-robust options (:mod:`covidcxr.train.robust`) need the training groups: ``sources`` (source
    names, the batches' ``source`` index) and ``group_counts`` (training images per group index
    ``source * len(classes) + class``). ``loss.kind: group_dro`` weights the groups' losses;
    ``adversary.kind: source`` adds per-class source heads through gradient reversal. Both stay outside
    ``self.model``, so checkpoints hold the classifier only.
    """

    def __init__(
        self,
        config: dict[str, Any],
        classes: list[str],
        preset: Preset,
        model: nn.Module | None = None,
        class_weights: torch.Tensor | None = None,
        summary: dict[str, Any] | None = None,
        sources: list[str] | None = None,
        group_counts: Any = None,
    ) -> None:
        super().__init__()
        from covidcxr.models import get_spec

        self.config = config
        self.classes = list(classes)
        self.preset = preset
        self.arch = config["model"]["arch"]
        # the input channels follow the preset (1 for torchxrayvision's scaling, else 3)
        kwargs = {"in_chans": preset.channels, **(config["model"].get("kwargs") or {})}
        self.arch_kwargs = {"num_classes": len(self.classes), **kwargs}
        self.summary: dict[str, Any] = dict(summary or {})
        self.spec = get_spec(self.arch)
        if model is None:
            model = init_model(self.arch, config["model"]["weights"], self.classes, kwargs)
        # builder arguments set by a weight source (in_chans=1 for xrv) are recorded on the model itself
        self.arch_kwargs.update(getattr(model, "covidcxr_arch_kwargs", None) or {})
        # provenance of the initial weights (source, file, sha256, catalogue entry) travels in the training
        # summary too, so every model card that shows the summary shows where the weights came from
        init = getattr(model, "covidcxr_init", None) or {}
        self.summary.setdefault("weights", {k: init[k] for k in ("weights", "source", "file", "sha256", "catalog",
                                                                  "head", "kept_neurons") if k in init}
                                if init else {"weights": "none"})
        self.model = model
        self._body_frozen = False
        self.set_body_frozen(self.body_frozen_at(0))
        if config["trainer"].get("channels_last"):
            self.model = self.model.to(memory_format=torch.channels_last)
        self._compiled: nn.Module | None = None
        self.register_buffer("class_weight", class_weights.float() if class_weights is not None else None,
                             persistent=False)
        self.label_smoothing = float(config["loss"]["label_smoothing"])
        k = len(self.classes)
        # multi-label over ChestX-ray14 findings (the twice-transfer NIH stage): sigmoid outputs, binary
        # cross-entropy, per-finding AUC; targets come from set_targets() by dataset row
        self.multilabel = config["data"].get("task") == "findings"
        self._targets: dict[str, torch.Tensor] = {}
        if self.multilabel:
            self.val_ml_auroc = torchmetrics.classification.MultilabelAUROC(num_labels=k, average=None)
        self.val_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=k, average="micro")
        self.val_bacc = torchmetrics.classification.MulticlassRecall(num_classes=k, average="macro")
        self.val_f1 = torchmetrics.classification.MulticlassF1Score(num_classes=k, average="macro")
        self.val_auroc = torchmetrics.classification.MulticlassAUROC(num_classes=k, average=None)
        self._seen: list[int] = []
        self._record_to: Path | None = None
        self._init_robust(sources, group_counts)

    def _init_robust(self, sources: list[str] | None, group_counts: Any) -> None:
        from covidcxr.train.robust import GroupDRO, SourceAdversary, feature_dim

        lo, adv = self.config["loss"], self.config.get("adversary") or {}
        self.sources = list(sources or [])
        self.dro: GroupDRO | None = None
        self.adversary: SourceAdversary | None = None
        self._features: torch.Tensor | None = None
        if lo.get("kind", "erm") != "group_dro" and not adv.get("kind"):
            return
        k = len(self.classes)
        if not self.sources or group_counts is None:
            # fit() always passes them (and refuses a manifest without sources); a module built by hand for a
            # quick step (a recipe smoke test) trains as plain ERM, and says so
            log.warning("no training sources given: group DRO and the source adversary are off for this module")
            return
        counts = torch.as_tensor(group_counts, dtype=torch.float32).reshape(-1)
        if counts.numel() != len(self.sources) * k:
            raise ValueError(f"{counts.numel()} group counts for {len(self.sources)} sources x {k} classes")
        if lo.get("kind") == "group_dro":
            self.dro = GroupDRO(counts.numel(), eta=float(lo["dro_eta"]), adjustment=float(lo["dro_adjustment"]),
                                group_counts=counts.tolist())
        if adv.get("kind") == "source":
            per = counts.reshape(len(self.sources), k)
            active = ((per > 0).sum(0) >= 2).tolist()  # a class with one source has nothing to confuse
            head = self._head_module()
            self.adversary = SourceAdversary(feature_dim(head), k, len(self.sources), hidden=int(adv["hidden"]),
                                             active=active)
            # the head block's input is the pooled feature vector whatever the architecture
            head.register_forward_pre_hook(self._keep_features)

    def _keep_features(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if self.adversary is not None and self.training:
            self._features = inputs[0]

    def grl_strength(self) -> float:
        """Gradient-reversal strength now: 1, or DANN's schedule over the training's progress."""
        from covidcxr.train.robust import dann_strength

        if (self.config.get("adversary") or {}).get("grl_schedule") == "constant":
            return 1.0
        try:
            total = max(int(self.trainer.estimated_stepping_batches), 1)
        except (RuntimeError, AttributeError, TypeError, ValueError):
            return 1.0  # no trainer attached (a direct call): full strength
        return dann_strength(self.global_step / total)

    # ------------------------------------------------------------------ model
    def _head_module(self) -> nn.Module:
        """The block re-initialised for new outputs (COVID-CXNet: its whole MLP head; else the final Linear)."""
        head = _module_at(self.model, self.spec.reinit_block)
        if head is None:
            raise ValueError(f"model {self.arch!r} names no head layer; cannot freeze its backbone")
        return head

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(head parameters, body parameters): the body is everything outside the head block."""
        head_ids = {id(p) for p in self._head_module().parameters()}
        head = [p for p in self.model.parameters() if id(p) in head_ids]
        body = [p for p in self.model.parameters() if id(p) not in head_ids]
        return head, body

    def body_frozen_at(self, epoch: int) -> bool:
        """Linear probe (``model.freeze_backbone``): always; head warm-up: the first ``model.warmup_epochs``."""
        m = self.config["model"]
        return bool(m.get("freeze_backbone")) or epoch < int(m.get("warmup_epochs") or 0)

    def set_body_frozen(self, frozen: bool) -> None:
        """Freeze or thaw the body. A frozen body also keeps its BatchNorm statistics (eval mode), so the
        head learns on the features the pretrained network computes, not on drifting batch statistics."""
        head, body = self.param_groups()
        for p in body:
            p.requires_grad_(not frozen)
        for p in head:
            p.requires_grad_(True)
        if frozen != self._body_frozen:
            n = sum(p.numel() for p in (head if frozen else head + body))
            log.info("%s body of %s: training %d parameters", "frozen" if frozen else "trainable", self.arch, n)
        self._body_frozen = frozen
        self.train(self.training)

    def train(self, mode: bool = True) -> "CXRClassifier":
        super().train(mode)
        if mode and getattr(self, "_body_frozen", False):
            self.model.eval()
            self._head_module().train()
        return self

    def on_train_epoch_start(self) -> None:
        self.set_body_frozen(self.body_frozen_at(int(self.current_epoch)))

    def configure_model(self) -> None:
        if self.config["trainer"].get("compile") and self._compiled is None:
            # kept outside the module tree so state_dict keys stay those of the plain model
            object.__setattr__(self, "_compiled", torch.compile(self.model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config["trainer"].get("channels_last"):
            x = x.contiguous(memory_format=torch.channels_last)
        net = self._compiled if self._compiled is not None else self.model
        out = net(x)
        return out[0] if isinstance(out, (tuple, list)) else out

    def set_targets(self, role: str, targets: torch.Tensor) -> None:
        """Multi-hot targets (rows of the ``role`` dataset x classes) for the multi-label task."""
        self._targets[role] = targets.float()

    def _multi_hot(self, role: str, batch: dict[str, Any]) -> torch.Tensor:
        return self._targets[role].to(batch["image"].device)[batch["index"].long().cpu()]

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.multilabel:
            return nn.functional.binary_cross_entropy_with_logits(logits.float(), y)
        return nn.functional.cross_entropy(logits.float(), y, weight=self.class_weight,
                                           label_smoothing=self.label_smoothing)

    def task_loss(self, logits: torch.Tensor, y: torch.Tensor, batch: dict[str, Any],
                  update: bool = True) -> torch.Tensor:
        """The classification loss: mean cross-entropy, or group DRO's weighted group mean (``update``: take
        the weights' exponentiated-gradient step with this batch)."""
        if self.dro is None or self.multilabel:
            return self._loss(logits, y)
        per = nn.functional.cross_entropy(logits.float(), y, weight=self.class_weight,
                                          label_smoothing=self.label_smoothing, reduction="none")
        return self.dro(per, batch["group"].to(per.device), update=update)

    def adversary_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(source loss, source accuracy) of the adversary on the features of the last training forward."""
        assert self.adversary is not None and self._features is not None
        dev = self._features.device
        return self.adversary(self._features, batch["label"].to(dev), batch["source"].to(dev), self.grl_strength())

    # ------------------------------------------------------------------ steps
    def on_fit_start(self) -> None:
        if self.config.get("debug", {}).get("record_samples"):
            d = Path(self.trainer.default_root_dir) / "samples"
            d.mkdir(parents=True, exist_ok=True)
            self._record_to = d / f"rank{self.global_rank}.txt"

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x, y = batch["image"], batch["label"]
        if self.multilabel:
            y = self._multi_hot("train", batch)
        self._features = None
        logits = self(x)
        loss = self.task_loss(logits, y, batch)
        bs = len(y)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=bs, sync_dist=True)
        if self.dro is not None:
            self.log("train_dro_max_weight", self.dro.q.max(), on_step=False, on_epoch=True, batch_size=bs)
        if self.adversary is not None and self._features is not None:
            adv, acc = self.adversary_loss(batch)
            self.log("train_adv_loss", adv, on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)
            self.log("train_adv_acc", acc, on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)
            loss = loss + float(self.config["adversary"]["weight"]) * adv
            self._features = None
        if self._record_to is not None:
            idx = batch["index"].tolist()
            with open(self._record_to, "a", encoding="utf-8") as fh:
                fh.write(f"{self.current_epoch} {self.global_step} " + ",".join(map(str, idx)) + "\n")
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x, y = batch["image"], batch["label"]
        logits = self(x).float()
        if self.multilabel:
            t = self._multi_hot("val", batch)
            self.val_ml_auroc.update(torch.sigmoid(logits), t.long())
            self.log("val_loss", self._loss(logits, t), on_epoch=True, prog_bar=True, batch_size=len(y),
                     sync_dist=True)
            return
        loss = self._loss(logits, y)
        probs = torch.softmax(logits, dim=1)
        self.val_acc.update(probs, y)
        self.val_bacc.update(probs, y)
        self.val_f1.update(probs, y)
        self.val_auroc.update(probs, y)
        self.log("val_loss", loss, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        # torchmetrics already gathers over ranks; sync_dist only averages identical values (and silences
        # Lightning's DDP warning)
        kw = {"sync_dist": True}
        if self.multilabel:
            auc = self.val_ml_auroc.compute()
            for i, c in enumerate(self.classes):
                self.log(f"val_auc_{c.lower().replace(' ', '_')}", auc[i], **kw)
            self.log("val_auc_mean", torch.nanmean(auc), prog_bar=True, **kw)
            self.val_ml_auroc.reset()
            return
        self.log("val_acc", self.val_acc.compute(), prog_bar=True, **kw)
        self.log("val_balanced_acc", self.val_bacc.compute(), **kw)
        self.log("val_f1_macro", self.val_f1.compute(), **kw)
        auc = self.val_auroc.compute()
        for i, c in enumerate(self.classes):
            name = "covid" if c == "COVID-19" else c.lower().replace("-", "").replace(" ", "_")
            self.log(f"val_auc_{name}", auc[i], **kw)
        for m in (self.val_acc, self.val_bacc, self.val_f1, self.val_auroc):
            m.reset()

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        o, s = self.config["optimizer"], self.config["scheduler"]
        head, body = self.param_groups()
        # Two groups: the pretrained body learns at lr x body_lr_mult (gentler than the fresh head). The body
        # group is left out only for a linear probe; during a head warm-up its parameters get no gradient
        # (requires_grad off), which every optimiser here skips, so a resume at any epoch rebuilds the same
        # optimiser.
        params: list[dict[str, Any]] = [{"params": head, "lr": o["lr"], "name": "head"}]
        if body and not self.config["model"].get("freeze_backbone"):
            params.append({"params": body, "lr": o["lr"] * float(o.get("body_lr_mult", 1.0)), "name": "body"})
        if self.adversary is not None:  # the source heads learn at the head's rate; never exported
            params.append({"params": list(self.adversary.parameters()), "lr": o["lr"], "name": "adversary"})
        if o["name"] == "sgd":
            opt = torch.optim.SGD(params, lr=o["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"],
                                  nesterov=bool(o.get("nesterov")))
        elif o["name"] == "adamw":
            opt = torch.optim.AdamW(params, lr=o["lr"], weight_decay=o["weight_decay"])
        else:
            opt = torch.optim.Adam(params, lr=o["lr"], weight_decay=o["weight_decay"])
        if s["name"] == "step":
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=int(s["step_size"]), gamma=s["gamma"])
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
        if s["name"] == "plateau":
            mode = "min" if s["monitor"] == "val_loss" else "max"
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=mode, factor=s["factor"],
                                                               patience=int(s["patience"]), min_lr=s["min_lr"])
            return {"optimizer": opt,
                    "lr_scheduler": {"scheduler": sched, "monitor": s["monitor"], "interval": "epoch"}}
        if s["name"] == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=int(self.config["trainer"]["max_epochs"]),
                                                               eta_min=s["min_lr"])
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
        return opt

    # ------------------------------------------------------------------ checkpoints
    def bundle(self) -> dict[str, Any]:
        """The self-contained covidcxr checkpoint dict for the current weights."""
        from covidcxr.models.checkpoint import make_bundle

        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items()
                   if k.startswith("val_") and torch.as_tensor(v).numel() == 1} if self._trainer else {}
        training = {
            **self.summary,
            "epoch": int(self.current_epoch) if self._trainer else 0,  # 0-based epoch at save time
            "global_step": int(self.global_step) if self._trainer else 0,
        }
        if self.dro is not None:  # where group DRO's weights stood: which groups it found hardest
            names = [f"{s}/{c}" for s in self.sources for c in self.classes]
            training["group_dro_weights"] = {n: round(float(q), 6) for n, q in zip(names, self.dro.q.tolist())}
        return make_bundle(self.model, arch=self.arch, classes=self.classes, preset=self.preset,
                           task="findings-multilabel" if self.multilabel else "classification",
                           arch_kwargs=self.arch_kwargs, training=training, metrics={"val": metrics})

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["covidcxr"] = self.bundle()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # state_dict restore is Lightning's job; nothing of ours needs restoring beyond it
        checkpoint.pop("covidcxr", None)
