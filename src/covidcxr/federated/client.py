"""A hospital's side of a federated run: a Flower client that trains the coordinator's recipe on local rows.

Only weights (the tensors :func:`covidcxr.federated.params.exchanged_keys` names), row counts and validation
figures leave the process; images and the manifest never do. ``audit_dir`` keeps a copy of every array and
figure this site sent, so a hospital can check what left it.

Local training reuses :class:`covidcxr.train.module.CXRClassifier` and :func:`covidcxr.train.runner.prepare`
(same recipe keys, data module, loss, optimiser), with two additions: the FedProx proximal term and an
epoch offset so that head warm-up and learning-rate schedules run over the whole federation, not per round.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from covidcxr.federated.params import exchanged_keys, get_arrays, local_keys, set_arrays
from covidcxr.federated.plan import FederatedError, mismatch, segmenter_mismatch
from covidcxr.train.module import CXRClassifier

log = logging.getLogger("covidcxr.federated")


class FedClassifier(CXRClassifier):
    """:class:`CXRClassifier` with FedProx's proximal term and a global epoch offset.

    ``prox_mu`` > 0 adds ``mu / 2 * ||w - w_global||^2`` over the exchanged trainable weights to the training
    loss (Li et al., MLSys 2020), which pulls a site's weights towards the model it received.
    """

    epoch_offset: int = 0  # class attribute: read by CXRClassifier.__init__ before ours runs
    prox_mu: float = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._anchor: list[tuple[torch.nn.Parameter, torch.Tensor]] = []

    def body_frozen_at(self, epoch: int) -> bool:
        return super().body_frozen_at(epoch + self.epoch_offset)

    def set_anchor(self, keys: list[str]) -> None:
        """Remember the received global weights for the proximal term (trainable exchanged parameters only)."""
        wanted = set(keys)
        self._anchor = [(p, p.detach().clone()) for n, p in self.model.named_parameters() if n in wanted]

    def proximal_term(self) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        for p, g in self._anchor:
            if p.requires_grad:
                total = total + (p - g).pow(2).sum()
        return 0.5 * self.prox_mu * total

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.prox_mu > 0 and self._anchor:
            loss = loss + self.proximal_term()
        return loss

    def configure_optimizers(self) -> Any:
        out = super().configure_optimizers()
        sched = out.get("lr_scheduler", {}).get("scheduler") if isinstance(out, dict) else None
        # a fresh optimiser each round: advance the recipe's epoch schedule to where the federation is
        if sched is not None and not isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": intended here
                for _ in range(self.epoch_offset):
                    sched.step()
        return out


def _auc(y: np.ndarray, score: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    if y.min() == y.max():
        return None  # one class only at this site: undefined
    return float(roc_auc_score(y, score))


def _metric_name(c: str) -> str:
    return "covid" if c == "COVID-19" else c.lower().replace("-", "").replace(" ", "_")


class SiteClient:
    """The Flower NumPyClient logic for one site (wrapped by :func:`make_client`)."""

    def __init__(self, site: str, data: str | os.PathLike, local_config: dict[str, Any] | None = None,
                 audit_dir: str | os.PathLike | None = None) -> None:
        self.site, self.data = site, str(data)
        self.local_config = local_config
        self.audit_dir = Path(audit_dir) if audit_dir else None
        self.refused: str | None = None
        self.module: FedClassifier | None = None
        self.keys: list[str] = []
        self.strategy = "fedavg"
        self.local_epochs = 1

    # ------------------------------------------------------------------ setup on the first message
    def _setup(self, config: dict[str, Any]) -> None:
        if self.module is not None or self.refused is not None:
            return
        from covidcxr.data.manifest import ManifestError
        from covidcxr.train.config import ConfigError
        from covidcxr.train.runner import prepare

        from covidcxr.segment.maskspec import TRAINING_KEY, MaskSpecError

        cfg = json.loads(str(config["recipe"]))
        reason = mismatch(self.local_config, cfg)
        if reason is None:
            try:
                dm, preset, classes, summary = prepare(cfg, self.data)
                reason = segmenter_mismatch(summary.get(TRAINING_KEY),
                                            json.loads(str(config.get("lung_segmenter") or "null")))
                if reason is None:
                    dm.setup("fit")
                    robust = self._robust_groups(cfg, dm, classes)
            except (ConfigError, ManifestError, MaskSpecError, ValueError, OSError) as err:
                reason = str(err)
        if reason is not None:
            self.refused = reason
            log.error("site %s refused: %s", self.site, reason)
            return
        if cfg["trainer"].get("num_threads"):
            torch.set_num_threads(int(cfg["trainer"]["num_threads"]))
        cw = cfg["loss"]["class_weights"]
        weights = (dm.class_weights() if cw == "balanced"
                   else torch.tensor(cw, dtype=torch.float32) if isinstance(cw, list) else None)
        torch.manual_seed(int(cfg["seed"]))
        self.cfg, self.dm = cfg, dm
        self.module = FedClassifier(cfg, classes=classes, preset=preset, class_weights=weights, summary=summary,
                                    **robust)
        self.strategy = str(config["strategy"])
        self.local_epochs = int(config["local_epochs"])
        self.keys = exchanged_keys(self.module.model, self.strategy)
        self.bn_keys = local_keys(self.module.model, self.strategy)
        log.info("site %s: %d training and %d validation images; %d tensors exchanged, %d kept here (%s)",
                 self.site, len(dm.dataset("train")), self._n_val(), len(self.keys), len(self.bn_keys), self.strategy)

    def _robust_groups(self, cfg: dict[str, Any], dm: Any, classes: list[str]) -> dict[str, Any]:
        """The (source, class) groups of this site's train rows, for a group-robust recipe (group DRO, source
        adversary), as ``covidcxr train`` passes them. A site usually holds one source: group DRO then weighs
        its classes, and the source adversary has nothing to tell apart, so it is switched off here (said in
        the log); the group-balanced sampler needs nothing from here."""
        if cfg["data"].get("task") == "findings":
            return {}
        dro = cfg["loss"].get("kind") == "group_dro"
        adv = bool((cfg.get("adversary") or {}).get("kind"))
        if not (dro or adv):
            return {}
        counts = dm.group_counts()
        n_sources = len({int(g) // len(classes) for g in counts.nonzero()[0]})
        if adv and n_sources < 2:
            cfg["adversary"]["kind"] = None
            log.info("site %s: %d source(s) in its training rows: the recipe's source adversary is off here "
                     "(nothing to tell apart)%s", self.site, n_sources, "; group DRO weighs its classes" if dro else "")
        if dro and n_sources < 1:
            raise ValueError(f"{self.data}: loss.kind group_dro needs a 'source' column")
        return {"sources": list(dm.sources), "group_counts": counts.tolist()}

    def _n_val(self) -> int:
        try:
            return len(self.dm.dataset("val"))
        except Exception:
            return 0

    def _trainer(self) -> Any:
        import lightning as L

        t = self.cfg["trainer"]
        kw: dict[str, Any] = dict(max_epochs=self.local_epochs, accelerator=t["accelerator"], devices=1,
                                  precision=t["precision"], logger=False, enable_checkpointing=False,
                                  enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                                  num_sanity_val_steps=0, log_every_n_steps=int(t["log_every_n_steps"]),
                                  accumulate_grad_batches=int(t["accumulate_grad_batches"]),
                                  deterministic=t["deterministic"])
        for k in ("limit_train_batches", "gradient_clip_val"):
            if t.get(k) is not None:
                kw[k] = t[k]
        return L.Trainer(**kw)

    # ------------------------------------------------------------------ Flower calls
    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        return get_arrays(self.module.model, self.keys) if self.module is not None else []

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict]:
        self._setup(config)
        if self.refused is not None:
            return [], 0, {"site": self.site, "refused": self.refused}
        m = self.module
        set_arrays(m.model, self.keys, parameters)
        rnd = int(config["server_round"])
        m.epoch_offset = (rnd - 1) * self.local_epochs
        m.prox_mu = float(config.get("proximal_mu", 0.0))
        m.set_anchor(self.keys)
        n_train = len(self.dm.dataset("train"))
        log.info("site %s round %d: training %d epoch(s) on %d images%s", self.site, rnd, self.local_epochs,
                 n_train, f" (proximal mu {m.prox_mu:g})" if m.prox_mu else "")
        trainer = self._trainer()
        trainer.fit(m, train_dataloaders=self.dm.train_dataloader())
        out = get_arrays(m.model, self.keys)
        loss = trainer.callback_metrics.get("train_loss_epoch")
        metrics: dict[str, Any] = {"site": self.site, "rows_train": n_train, "rows_val": self._n_val(),
                                   "train_loss": float(loss) if loss is not None else math.nan}
        if self.audit_dir is not None and self.bn_keys:  # what FedBN keeps here, for the audit trail
            self.audit_dir.mkdir(parents=True, exist_ok=True)
            np.savez(self.audit_dir / f"round-{rnd}-kept.npz",
                     **dict(zip(self.bn_keys, get_arrays(m.model, self.bn_keys))))
        # under DP the accountant assumes the uniform mean of clipped updates: every site weighs the same
        weight = 1 if "clipping_norm" in config else n_train
        log.info("site %s round %d: done, train loss %.4f", self.site, rnd, metrics["train_loss"])
        return out, weight, metrics

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[float, int, dict]:
        self._setup(config)
        if self.refused is not None or self._n_val() == 0:
            return 0.0, 0, {"site": self.site, **({"refused": self.refused} if self.refused else {})}
        m = self.module
        set_arrays(m.model, self.keys, parameters)
        ds = self.dm.dataset("val")
        loader = torch.utils.data.DataLoader(ds, batch_size=self.dm.batch_size, num_workers=self.dm.num_workers)
        m.eval()
        logits, labels = [], []
        with torch.no_grad():
            for batch in loader:
                logits.append(m(batch["image"]).float())
                labels.append(batch["label"])
        z, y = torch.cat(logits), torch.cat(labels)
        loss = float(torch.nn.functional.cross_entropy(z, y))
        p = torch.softmax(z, dim=1).numpy()
        yn = y.numpy()
        metrics: dict[str, Any] = {"site": self.site, "rows_val": int(len(yn)), "val_loss": loss,
                                   "val_acc": float((p.argmax(1) == yn).mean())}
        for i, c in enumerate(m.classes):
            auc = _auc((yn == i).astype(int), p[:, i])
            if auc is not None:
                metrics[f"val_auc_{_metric_name(c)}"] = auc
        if config.get("release_bn") and self.bn_keys:
            buf = io.BytesIO()  # FedBN's one release of the local BatchNorm state, for the final checkpoint
            np.savez(buf, **dict(zip(self.bn_keys, get_arrays(m.model, self.bn_keys))))
            metrics["bn_state"] = buf.getvalue()
        return loss, int(len(yn)), metrics


def _audit_mod(audit_dir: Path | None):
    """A Flower client mod (outermost): writes exactly what this site sends, after clipping, per round."""
    from flwr.app.message_type import MessageType
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    def mod(msg: Any, ctxt: Any, call_next: Any) -> Any:
        out = call_next(msg, ctxt)
        if audit_dir is None or out.has_error():
            return out
        kind = msg.metadata.message_type
        if kind == MessageType.TRAIN:
            ins = compat.recorddict_to_fitins(msg.content, keep_input=True)
            res = compat.recorddict_to_fitres(out.content, keep_input=True)
            rnd = int(ins.config.get("server_round", 0))
            audit_dir.mkdir(parents=True, exist_ok=True)
            np.savez(audit_dir / f"round-{rnd}-received.npz", *parameters_to_ndarrays(ins.parameters))
            np.savez(audit_dir / f"round-{rnd}-sent.npz", *parameters_to_ndarrays(res.parameters))
            (audit_dir / f"round-{rnd}-sent.json").write_text(json.dumps(
                {"num_examples": res.num_examples, "metrics": dict(res.metrics)}, default=str), encoding="utf-8")
        elif kind == MessageType.EVALUATE:
            res = compat.recorddict_to_evaluateres(out.content)
            rnd = int(compat.recorddict_to_evaluateins(msg.content, keep_input=True).config.get("server_round", 0))
            audit_dir.mkdir(parents=True, exist_ok=True)
            shown = {k: (f"<{len(v)} bytes>" if isinstance(v, bytes) else v) for k, v in res.metrics.items()}
            (audit_dir / f"round-{rnd}-evaluate.json").write_text(json.dumps(
                {"loss": res.loss, "num_examples": res.num_examples, "metrics": shown}, default=str), encoding="utf-8")
        return out

    return mod


def _dp_clip_mod(msg: Any, ctxt: Any, call_next: Any) -> Any:
    """Flower's ``fixedclipping_mod`` when the coordinator runs DP (it sends the clipping norm), else a no-op."""
    from flwr.app.message_type import MessageType
    from flwr.client.mod import fixedclipping_mod
    from flwr.compat.common import recorddict_compat as compat

    if msg.metadata.message_type == MessageType.TRAIN:
        if "clipping_norm" in compat.recorddict_to_fitins(msg.content, keep_input=True).config:
            return fixedclipping_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def make_client(site_client: SiteClient) -> Any:
    """The Flower ``Client`` for a :class:`SiteClient`."""
    from flwr.client import NumPyClient

    class _Numpy(NumPyClient):
        def get_parameters(self, config):  # type: ignore[override]
            return site_client.get_parameters(config)

        def fit(self, parameters, config):  # type: ignore[override]
            return site_client.fit(parameters, config)

        def evaluate(self, parameters, config):  # type: ignore[override]
            return site_client.evaluate(parameters, config)

    return _Numpy().to_client()


def _never_reached(err: Exception) -> bool:
    """Whether gRPC failed to open a connection at all (nothing listening, a name that does not resolve, a TLS
    handshake refused): then dialling again makes sense. A stream that was open and then closed is not this."""
    code = getattr(err, "code", None)
    try:
        name = code().name if callable(code) else ""
    except Exception:  # noqa: BLE001  (not a finished RPC)
        return True
    reason = _grpc_reason(err).lower()
    return name == "UNAVAILABLE" and any(k in reason for k in ("failed to connect", "errors resolving",
                                                                 "dns resolution failed", "name resolution"))


def _grpc_reason(err: Exception) -> str:
    """gRPC's status and detail (``UNAVAILABLE: failed to connect to all addresses...``), not its multi-line repr."""
    code, details = getattr(err, "code", None), getattr(err, "details", None)
    if callable(code) and callable(details):
        try:
            return f"{code().name}: {details()}"
        except Exception:  # noqa: BLE001  (not a finished RPC: fall back to the text)
            pass
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def quiet_flower(verbose: bool = False) -> None:
    """Flower's own console lines (deprecation banners, per-retry warnings) only with --verbose."""
    logging.getLogger("alembic").setLevel(logging.INFO if verbose else logging.WARNING)  # Flower's state store
    import flwr.supercore.logger  # noqa: F401  (sets its logger to DEBUG on import: import it first)

    lg = logging.getLogger("flwr")
    lg.propagate = False  # Flower prints through its own handler; through ours too would double every line
    lg.setLevel(logging.DEBUG if verbose else logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*`validation_step` but have no `val_dataloader`")
    threading.excepthook = _without_grpc_closed_channel_race


def _without_grpc_closed_channel_race(args: threading.ExceptHookArgs) -> None:
    """gRPC's connectivity poller thread may still run when a failed dial closes its channel and then dies with
    "Cannot monitor channel state: Channel closed!": a harmless race that printed a traceback beside our one
    error line. Every other thread error still goes to Python's hook."""
    if isinstance(args.exc_value, ValueError) and "Channel closed" in str(args.exc_value):
        log.debug("gRPC connectivity poller ended with its closed channel: %s", args.exc_value)
        return
    threading.__excepthook__(args)


def run_client(site: str, data: str | os.PathLike, server: str, *, insecure: bool = False,
               tls_ca: str | os.PathLike | None = None, local_config: dict[str, Any] | None = None,
               audit_dir: str | os.PathLike | None = None, connect_timeout: float = 60.0,
               verbose: bool = False) -> SiteClient:
    """Join the run at ``server`` (HOST:PORT) as ``site`` with the rows of manifest ``data``; returns when the
    coordinator ends the run. Raises :class:`FederatedError` when the server cannot be reached in
    ``connect_timeout`` seconds."""
    from covidcxr.data import read_manifest

    read_manifest(data, require_split=True)  # a bad manifest fails here, before any connection
    if not insecure and tls_ca is None:
        raise FederatedError("give --tls-ca CA.pem (the coordinator's certificate authority) or --insecure")
    quiet_flower(verbose)
    from flwr.clientapp import ClientApp
    from flwr.compat.client.app import start_client_internal

    sc = SiteClient(site, data, local_config=local_config, audit_dir=audit_dir)
    client = make_client(sc)
    app = ClientApp(client_fn=lambda context: client, mods=[_audit_mod(Path(audit_dir) if audit_dir else None),
                                                             _dp_clip_mod])
    log.info("site %s: connecting to %s (%s)", site, server, "insecure" if insecure else "TLS")
    certs = Path(tls_ca).read_bytes() if tls_ca else None
    deadline = time.monotonic() + connect_timeout
    wait = 1.0
    while True:
        try:
            start_client_internal(server_address=server, node_config={}, load_client_app_fn=lambda *a: app,
                                  root_certificates=certs, insecure=insecure,
                                  max_wait_time=max(1.0, deadline - time.monotonic()))
            break
        except Exception as err:  # grpc's error on giving up is a long multi-line repr: keep its first line
            first = _grpc_reason(err)
            if sc.refused is not None:  # the refusal is the reason, whatever the connection did next
                raise FederatedError(f"site {site} refused by this run: {sc.refused}") from None
            if sc.module is not None or not _never_reached(err):  # it was connected: the coordinator went away
                raise FederatedError(f"site {site}: the connection to {server} ended before the run did "
                                     f"({first[:160]})") from None
            # Flower's bidirectional stream fails at once while nothing listens (its own back-off covers only
            # later reconnects), so a site started before its coordinator dials again here until its bound
            if time.monotonic() + wait > deadline:
                raise FederatedError(f"cannot reach the federated server at {server} within {connect_timeout:g} s "
                                     f"({first[:160]})") from None
            log.debug("site %s: %s not reachable yet (%s); dialling again in %.0f s", site, server, first[:80], wait)
            time.sleep(wait)
            wait = min(wait * 2, 5.0)
    if sc.refused is not None:
        raise FederatedError(f"site {site} refused by this run: {sc.refused}")
    log.info("site %s: the coordinator ended the run", site)
    return sc
