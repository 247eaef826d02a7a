"""The coordinator of a federated run: Flower's server with FedAvg, FedProx or FedBN (client side), optional
client-side fixed-clipping DP, per-site validation figures each round, and covidcxr checkpoints.

The coordinator never receives a data path: it holds the recipe and the model, nothing else. With
``record_opens`` the process records every file it opens (a Python audit hook) into
``OUT/server-opened-files.txt``, so that this can be checked.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from covidcxr.federated.params import exchanged_keys, get_arrays, local_keys, nbytes, set_arrays
from covidcxr.federated.plan import FederatedError, Plan, identity

log = logging.getLogger("covidcxr.federated")

#: what the FedBN checkpoint's BatchNorm layers hold (docs/federated.md)
FEDBN_CHECKPOINT_BN = (
    "FedBN: each site's BatchNorm parameters and statistics stayed at the site during training. The global "
    "model still needs one BatchNorm state: after the last round each site sends its BatchNorm state once, and "
    "the checkpoint carries their pooled state (weights, biases and running means averaged by training rows; "
    "running variances pooled as within- plus between-site variance), the state that matches a new hospital's "
    "mixture of the sites best without its own statistics. With DP this release is skipped (it would not be "
    "noised) and the checkpoint keeps the initial BatchNorm state; `covidcxr site calibrate` can adapt it.")


def _serialized_bytes(params: Any) -> int:
    return int(sum(len(t) for t in params.tensors)) if params is not None else 0


def _weighted(values: list[tuple[float, int]]) -> float | None:
    vals = [(v, n) for v, n in values if v is not None and not (isinstance(v, float) and math.isnan(v)) and n > 0]
    total = sum(n for _, n in vals)
    return float(sum(v * n for v, n in vals) / total) if total else None


def pooled_batchnorm(states: list[tuple[dict[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
    """Row-weighted BatchNorm state of several sites: means for affine parameters and running means, and the
    pooled variance (mean of within-site variances plus the spread of the site means) for running variances."""
    total = float(sum(n for _, n in states))
    out: dict[str, np.ndarray] = {}
    for key in states[0][0]:
        if key.endswith("running_var"):
            mkey = key[: -len("running_var")] + "running_mean"
            mean = sum(s[mkey].astype(np.float64) * n for s, n in states) / total
            second = sum((s[key].astype(np.float64) + s[mkey].astype(np.float64) ** 2) * n for s, n in states) / total
            out[key] = np.maximum(second - mean ** 2, 0.0).astype(states[0][0][key].dtype)
        else:
            out[key] = (sum(s[key].astype(np.float64) * n for s, n in states) / total).astype(states[0][0][key].dtype)
    return out


def _record_opens(out: Path) -> list[str]:
    """Record every file this process opens (not Python's own modules) in a list written by the caller."""
    opened: list[str] = []
    skip = (".py", ".pyc", ".so", ".pth", ".typed")

    def hook(event: str, args: tuple) -> None:
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            p = os.fsdecode(args[0])
            if not p.endswith(skip):
                opened.append(p)

    sys.addaudithook(hook)
    return opened


class _SiteAware:
    """Mixed into Flower's FedAvg / FedProx: waits for the sites, drops refused and dead ones with a log line,
    logs per-site validation figures each round and writes covidcxr checkpoints."""

    def setup_run(self, plan: Plan, out: Path, model: Any, preset: Any, classes: list[str], expected: int,
                  min_sites: int, connect_timeout: float) -> None:
        self.plan, self.out, self.model, self.preset, self.classes = plan, out, model, preset, classes
        self.keys = exchanged_keys(model, plan.strategy)
        self.bn_keys = local_keys(model, plan.strategy)
        self.expected, self.min_sites, self.connect_timeout = expected, min_sites, connect_timeout
        self.refused: dict[str, tuple[str, str]] = {}  # cid -> (site, reason)
        self.site_of: dict[str, str] = {}
        self.rows: dict[str, dict[str, int]] = {}
        self.sampled: dict[int, list[str]] = {}
        self.history: list[dict[str, Any]] = []
        self.best: tuple[float, int] | None = None
        self.current: Any = None
        self.dp_wrapper: Any = None
        self.accountant: Any = None
        self._round: dict[str, Any] = {}
        c = plan.config["checkpoint"]
        self.monitor, self.mode = str(c["monitor"]), str(c["mode"])

    def _post_noise(self, parameters: Any) -> Any:
        """DP noise can push BatchNorm running variances below 0 (NaN at the next forward pass): clamp them.
        Post-processing of a DP release costs no privacy."""
        if self.plan.dp is None or parameters is None:
            return parameters
        from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

        arrays = parameters_to_ndarrays(parameters)
        arrays = [np.maximum(a, 1e-5).astype(a.dtype) if k.endswith("running_var") else a
                  for k, a in zip(self.keys, arrays)]
        return ndarrays_to_parameters(arrays)

    # -------------------------------------------------------------- fit
    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list:
        parameters = self._post_noise(parameters)
        need = self.expected if server_round == 1 else self.min_sites
        if not client_manager.wait_for(need, timeout=int(self.connect_timeout)):
            n = client_manager.num_available()
            if n < self.min_sites:
                raise FederatedError(f"round {server_round}: only {n} site(s) connected within "
                                     f"{self.connect_timeout:g} s; the run needs at least {self.min_sites}")
            log.warning("round %d: %d of %d expected site(s) connected within %g s; going on with them",
                        server_round, n, self.expected, self.connect_timeout)
        self._round = {"round": server_round, "t0": time.time()}
        ins = [(c, fi) for c, fi in super().configure_fit(server_round, parameters, client_manager)
               if c.cid not in self.refused]
        self.sampled[server_round] = [c.cid for c, _ in ins]
        self._round["bytes_sent"] = _serialized_bytes(parameters) * len(ins)
        log.info("round %d/%d: training at %d site(s)", server_round, self.plan.rounds, len(ins))
        return ins

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple[Any, dict]:
        ok = []
        for proxy, res in results:
            site = str(res.metrics.get("site", proxy.cid))
            if "refused" in res.metrics:
                self.refused[proxy.cid] = (site, str(res.metrics["refused"]))
                log.error("site %s refused: %s; the run goes on with the others", site, res.metrics["refused"])
                if self.dp_wrapper is not None:  # the noise is scaled to the sites that actually contribute
                    self.dp_wrapper.num_sampled_clients = max(1, self.dp_wrapper.num_sampled_clients - 1)
                continue
            self.site_of[proxy.cid] = site
            self.rows[site] = {"rows_train": int(res.metrics.get("rows_train", res.num_examples)),
                               "rows_val": int(res.metrics.get("rows_val", 0))}
            ok.append((proxy, res))
        answered = {p.cid for p, _ in results}
        lost = [self.site_of.get(cid, cid) for cid in self.sampled.get(server_round, []) if cid not in answered]
        errors = sorted({f"{type(f).__name__}: {f}" if isinstance(f, BaseException) else "failed reply"
                         for f in failures})
        if lost or failures:
            log.warning("round %d: site(s) %s dropped for this round (%s); aggregating the %d that answered",
                        server_round, ", ".join(lost) or "?", "; ".join(e[:120] for e in errors) or "no reply",
                        len(ok))
        self._round.update(bytes_received=sum(_serialized_bytes(r.parameters) for _, r in ok),
                           sites_trained=[str(r.metrics.get("site")) for _, r in ok], dropped=lost,
                           train_loss={str(r.metrics.get("site")): float(r.metrics.get("train_loss", math.nan))
                                       for _, r in ok})
        if not ok:
            log.error("round %d: no site contributed; the global model is unchanged", server_round)
            return None, {}
        if self.accountant is not None:
            from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

            self.accountant.compose(GaussianPrivacyEvent(noise_multiplier=self.plan.dp.noise_multiplier,
                                                         sample_size=len(ok),
                                                         population_size=self.accountant.config.population_size))
        return super().aggregate_fit(server_round, ok, [])

    # -------------------------------------------------------------- evaluate
    def configure_evaluate(self, server_round: int, parameters: Any, client_manager: Any) -> list:
        parameters = self._post_noise(parameters)
        self.current = parameters
        return [(c, ei) for c, ei in super().configure_evaluate(server_round, parameters, client_manager)
                if c.cid not in self.refused]

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple[Any, dict]:
        from flwr.common import parameters_to_ndarrays

        per_site: dict[str, dict[str, Any]] = {}
        released: list[tuple[dict[str, np.ndarray], int]] = []
        for _, res in results:
            m = dict(res.metrics)
            if "refused" in m or res.num_examples == 0:
                continue
            site = str(m.pop("site", "?"))
            blob = m.pop("bn_state", None)
            if isinstance(blob, bytes):
                with np.load(io.BytesIO(blob)) as z:
                    released.append(({k: z[k] for k in z.files}, self.rows.get(site, {}).get("rows_train", 1)))
            per_site[site] = {k: float(v) for k, v in m.items() if isinstance(v, (int, float))}
        names = sorted({k for m in per_site.values() for k in m if k.startswith("val_")})
        pooled = {k: _weighted([(m.get(k), int(m.get("rows_val", 0))) for m in per_site.values()]) for k in names}
        pooled = {k: v for k, v in pooled.items() if v is not None}
        r = self._round
        r.update(wall_s=round(time.time() - r.get("t0", time.time()), 2), per_site=per_site, val=pooled)
        r.pop("t0", None)
        if self.accountant is not None:
            r["dp_epsilon"] = float(self.accountant.get_privacy_spent().epsilon)
        self.history.append(r)
        self._progress(server_round, per_site, pooled, r)
        if self.current is not None:
            set_arrays(self.model, self.keys, parameters_to_ndarrays(self.current))
            if released:
                set_arrays(self.model, self.bn_keys, [pooled_batchnorm(released)[k] for k in self.bn_keys])
                r["batchnorm"] = f"pooled from {len(released)} site(s)"
            self._save(server_round, pooled)
        loss = pooled.get("val_loss")
        return loss, {k: v for k, v in pooled.items()}

    def _progress(self, rnd: int, per_site: dict, pooled: dict, r: dict) -> None:
        def auc(m: dict) -> str:
            v = m.get("val_auc_covid")
            return f"{v:.3f}" if v is not None else "n/a"

        sites = ", ".join(f"{s} {auc(m)} (n={int(m.get('rows_val', 0))})" for s, m in sorted(per_site.items()))
        log.info("round %d/%d done in %.1f s: val COVID-19 AUC per site: %s; row-weighted %s, val loss %s; "
                 "sent %.2f MB, received %.2f MB%s", rnd, self.plan.rounds, r["wall_s"], sites or "none",
                 auc(pooled), f"{pooled['val_loss']:.4f}" if "val_loss" in pooled else "n/a",
                 r.get("bytes_sent", 0) / 1e6, r.get("bytes_received", 0) / 1e6,
                 f"; DP epsilon {r['dp_epsilon']:.3f} at delta {self.plan.dp.delta:g}" if "dp_epsilon" in r else "")

    # -------------------------------------------------------------- checkpoints
    def summary(self) -> dict[str, Any]:
        p = self.plan
        import flwr

        fed: dict[str, Any] = {
            "engine": f"Flower {flwr.__version__} (server and client processes over gRPC)",
            **p.to_dict(),
            "sites": dict(self.rows),
            "refused": {s: reason for s, reason in self.refused.values()},
            "rounds_log": self.history,
        }
        if p.strategy == "fedbn":
            fed["batchnorm"] = FEDBN_CHECKPOINT_BN
        if self.accountant is not None:
            spent = self.accountant.get_privacy_spent()
            fed["dp"] = {**(fed.get("dp") or {}), "epsilon": float(spent.epsilon), "delta": float(spent.delta),
                         "releases": int(spent.num_releases), "accountant": spent.accounting_method,
                         "unit": "one site (client-level DP)"}
        return fed

    def _save(self, rnd: int, pooled: dict[str, float]) -> None:
        from covidcxr.models.checkpoint import atomic_torch_save, make_bundle
        from covidcxr.train.runner import segmenter_record

        cfg = self.plan.config
        fed = self.summary()
        training = {"run_name": cfg["name"], "recipe": cfg["name"], "recipe_description": cfg.get("recipe", ""),
                    "config": cfg, "preset": self.preset.name, "weights_init": cfg["model"]["weights"],
                    "seed": cfg["seed"], "epoch": rnd, "federated": fed, **segmenter_record(self.preset)}
        kwargs = {"num_classes": len(self.classes), "in_chans": self.preset.channels,
                  **(cfg["model"].get("kwargs") or {}), **(getattr(self.model, "covidcxr_arch_kwargs", None) or {})}
        bundle = make_bundle(self.model, arch=cfg["model"]["arch"], classes=self.classes, preset=self.preset,
                             arch_kwargs=kwargs, training=training, metrics={"val": pooled, "round": rnd})
        atomic_torch_save(bundle, self.out / "last.ckpt")
        score = pooled.get(self.monitor)
        if self.plan.strategy == "fedbn":  # only the last round's shared weights match the released BN state
            better = rnd == self.plan.rounds
        elif score is None:
            better = self.best is None
        else:
            better = self.best is None or (score > self.best[0] if self.mode == "max" else score < self.best[0])
        if better:
            self.best = (score if score is not None else math.nan, rnd)
            bundle["training"]["best_round"] = rnd
            atomic_torch_save(bundle, self.out / "best.ckpt")
            log.info("round %d: best.ckpt (%s %s)", rnd, self.monitor, f"{score:.4f}" if score is not None else "n/a")
        (self.out / "history.json").write_text(json.dumps({**fed, "best_round": self.best[1] if self.best else None},
                                                          indent=2, default=str), encoding="utf-8")


def make_strategy(plan: Plan, n_sites: int, segmenter: dict[str, Any] | None = None) -> Any:
    """Flower's FedAvg (fedavg, fedbn) or FedProx (fedprox) with the site bookkeeping mixed in. ``segmenter``: the
    lung segmenter the checkpoint will record (a recipe whose films need lung masks), sent so a site masking
    with another one refuses to join."""
    from flwr.server.strategy import FedAvg, FedProx

    base = FedProx if plan.strategy == "fedprox" else FedAvg
    recipe = plan.recipe_json()
    seg = json.dumps(segmenter) if segmenter else ""

    def fit_config(rnd: int) -> dict[str, Any]:
        return {"recipe": recipe, "strategy": plan.strategy, "local_epochs": plan.local_epochs,
                "server_round": rnd, "rounds": plan.rounds, "lung_segmenter": seg}

    def eval_config(rnd: int) -> dict[str, Any]:
        release = plan.strategy == "fedbn" and plan.dp is None and rnd == plan.rounds
        return {**fit_config(rnd), "release_bn": bool(release)}

    kw: dict[str, Any] = dict(fraction_fit=1.0, fraction_evaluate=1.0, min_fit_clients=1, min_evaluate_clients=1,
                              min_available_clients=1, on_fit_config_fn=fit_config,
                              on_evaluate_config_fn=eval_config, accept_failures=True)
    if plan.strategy == "fedprox":
        kw["proximal_mu"] = plan.proximal_mu
    cls = type(f"Covidcxr{base.__name__}", (_SiteAware, base), {})
    return cls(**kw)


def run_server(plan: Plan, address: str, out: str | os.PathLike, *, sites: int = 2, min_sites: int | None = None,
               certificates: tuple[bytes, bytes, bytes] | None = None, connect_timeout: float = 600.0,
               round_timeout: float | None = 3600.0, overwrite: bool = False, record_opens: bool = False,
               verbose: bool = False) -> dict[str, Any]:
    """Run ``plan`` as the coordinator on ``address`` until its rounds end; writes ``out/best.ckpt``,
    ``out/last.ckpt`` and ``out/history.json`` and returns the federated summary.

    ``sites``: how many sites round 1 waits for (up to ``connect_timeout`` seconds); later rounds go on with
    whoever is connected, at least ``min_sites``."""
    out = Path(out)
    if (out / "best.ckpt").exists() and not overwrite:
        raise FederatedError(f"{out}: already holds a federated run (best.ckpt); pass --overwrite or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    opened = _record_opens(out) if record_opens else None
    min_sites = min(min_sites or min(2, sites), sites)
    from covidcxr.federated.client import quiet_flower
    from covidcxr.train.module import init_model
    from covidcxr.segment.maskspec import TRAINING_KEY
    from covidcxr.train.runner import segmenter_record, training_preset

    quiet_flower(verbose)
    cfg = plan.config
    ident = identity(cfg)
    try:  # as the sites' (standardisation, lung segmenter): the checkpoint must carry it
        preset = training_preset(cfg)
    except RuntimeError as err:  # e.g. the lung segmenter's weights missing here: one line, not a traceback
        raise FederatedError(f"the recipe's preset cannot be built at the coordinator: {err}") from None
    kwargs = {"in_chans": preset.channels, **(cfg["model"].get("kwargs") or {})}
    import torch

    torch.manual_seed(int(cfg["seed"]))
    model = init_model(cfg["model"]["arch"], cfg["model"]["weights"], ident["classes"], kwargs)
    strategy = make_strategy(plan, sites, segmenter_record(preset).get(TRAINING_KEY))
    strategy.setup_run(plan, out, model, preset, ident["classes"], sites, min_sites, connect_timeout)
    from flwr.common import ndarrays_to_parameters

    strategy.initial_parameters = ndarrays_to_parameters(get_arrays(model, strategy.keys))
    top: Any = strategy
    if plan.dp is not None:
        from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping
        from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
        from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

        top = DifferentialPrivacyClientSideFixedClipping(strategy, noise_multiplier=plan.dp.noise_multiplier,
                                                         clipping_norm=plan.dp.clipping_norm,
                                                         num_sampled_clients=sites)
        strategy.dp_wrapper = top
        strategy.accountant = RdpAccountant(PrivacyConfig(
            target_delta=plan.dp.delta, population_size=sites,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION))
    from flwr.server import ServerConfig

    log.info("federated %s: %d round(s) of %d local epoch(s), waiting for %d site(s) on %s (%s)", plan.strategy,
             plan.rounds, plan.local_epochs, sites, address, "TLS" if certificates else "insecure")
    t0 = time.time()
    try:
        _serve(address, ServerConfig(num_rounds=plan.rounds, round_timeout=round_timeout), top, certificates)
    finally:
        if opened is not None:
            (out / "server-opened-files.txt").write_text("\n".join(dict.fromkeys(opened)) + "\n", encoding="utf-8")
    fed = strategy.summary()
    fed["wall_s"] = round(time.time() - t0, 2)
    fed["best_round"] = strategy.best[1] if strategy.best else None
    (out / "history.json").write_text(json.dumps(fed, indent=2, default=str), encoding="utf-8")
    if strategy.best is None:
        raise FederatedError(f"{out}: no round finished (no site contributed); no checkpoint written")
    return fed


def _serve(address: str, config: Any, strategy: Any, certificates: tuple[bytes, bytes, bytes] | None) -> None:
    """Flower's long-running server (``flwr.compat`` ``start_server``), with its gRPC server stopped however the
    run ends: Flower stops it only after a run that finished, and its non-daemon gRPC threads then kept a failed
    coordinator's process alive for ever while a site stayed connected."""
    from flwr.server.server import init_defaults, run_fl
    from flwr.server.superlink.fleet.grpc_bidi.grpc_server import start_grpc_server
    from flwr.supercore.address import parse_address
    from flwr.supercore.grpc import GRPC_MAX_MESSAGE_LENGTH

    parsed = parse_address(address)
    if not parsed:
        raise FederatedError(f"--address {address!r} is not HOST:PORT")
    host, port, is_v6 = parsed
    address = f"[{host}]:{port}" if is_v6 else f"{host}:{port}"
    server, config = init_defaults(server=None, config=config, strategy=strategy, client_manager=None)
    grpc_server = start_grpc_server(client_manager=server.client_manager(), server_address=address,
                                    max_message_length=GRPC_MAX_MESSAGE_LENGTH, certificates=certificates)
    previous = _stop_on_signals(grpc_server)
    try:
        run_fl(server=server, config=config)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        # a failed run stops with sites still connected: their streams end with Flower's GrpcBridgeClosed, which
        # gRPC would log as a traceback beside our one error line (the sites themselves say the run ended)
        logging.getLogger("grpc._server").addFilter(_without_closed_bridge)
        grpc_server.stop(grace=1).wait(10)


def _stop_on_signals(grpc_server: Any) -> dict[int, Any]:
    """Ctrl-C or SIGTERM stop the gRPC server first, which ends every site's stream, so a round waiting on its
    sites returns at once (as Flower's own start_server does); then the run ends as interrupted. Returns the
    handlers it replaced (none off the main thread, where Python allows no handler)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def stop(signum: int, frame: Any) -> None:
        grpc_server.stop(0)
        raise KeyboardInterrupt(f"signal {signum}")

    return {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}


def _without_closed_bridge(record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return type(exc).__name__ != "GrpcBridgeClosed"
