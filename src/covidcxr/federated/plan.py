"""The federated plan: the coordinator's recipe and run settings, sent to every site with each round.

A site trains with exactly the recipe the coordinator sends (so a federated run uses the same recipe keys as
``covidcxr train``). A site that holds its own copy of the recipe (``covidcxr federated client --config``)
is refused when its classes, preset or architecture differ: its model would not be the coordinator's.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from covidcxr.federated.params import STRATEGIES


class FederatedError(RuntimeError):
    """A federated run cannot go on (bad settings, no reachable server, too few sites): one line for the CLI."""


@dataclass
class DPSettings:
    """Client-side fixed clipping with Gaussian noise on the aggregate (Flower's
    ``DifferentialPrivacyClientSideFixedClipping``): clipping norm C, noise multiplier z, target delta."""

    noise_multiplier: float
    clipping_norm: float
    delta: float = 1e-5

    def stddev(self, n_sites: int) -> float:
        """The noise standard deviation added to the (uniform) mean of ``n_sites`` clipped updates."""
        return self.noise_multiplier * self.clipping_norm / n_sites


@dataclass
class Plan:
    config: dict[str, Any]
    strategy: str
    rounds: int
    local_epochs: int = 1
    proximal_mu: float = 0.0
    dp: DPSettings | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise FederatedError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.rounds < 1 or self.local_epochs < 1:
            raise FederatedError("--rounds and --local-epochs must be at least 1")
        if self.strategy == "fedprox" and self.proximal_mu <= 0:
            raise FederatedError("fedprox needs --proximal-mu above 0 (0 is FedAvg)")

    def recipe_json(self) -> str:
        """The recipe as the sites receive it: the schedules span every round's local epochs."""
        cfg = copy.deepcopy(self.config)
        cfg["trainer"]["max_epochs"] = self.rounds * self.local_epochs
        return json.dumps(cfg, sort_keys=True, default=str)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("config")
        return d


def identity(cfg: dict[str, Any]) -> dict[str, Any]:
    """What must agree between a site and the coordinator: classes, preset (name and size), architecture."""
    from covidcxr.data.labels import task_classes

    d = cfg["data"]
    try:
        classes, _ = task_classes(d.get("task", "3class"), d.get("classes"))
    except ValueError as err:
        raise FederatedError(str(err)) from None
    return {"classes": list(classes), "preset": d.get("preset"), "size": d.get("size"),
            "arch": cfg["model"]["arch"]}


def mismatch(local_cfg: dict[str, Any] | None, server_cfg: dict[str, Any]) -> str | None:
    """Why a site with recipe ``local_cfg`` must not join a run of ``server_cfg`` (None: it may)."""
    if local_cfg is None:
        return None
    mine, theirs = identity(local_cfg), identity(server_cfg)
    diffs = [f"{k} {mine[k]!r} here, {theirs[k]!r} at the coordinator" for k in mine if mine[k] != theirs[k]]
    return "; ".join(diffs) or None


def segmenter_mismatch(local: dict[str, Any] | None, coordinator: dict[str, Any] | None) -> str | None:
    """Why a site whose lung segmenter (``{"name", "sha256"}``, or None) is ``local`` must not train a recipe whose
    films need lung masks when the coordinator's checkpoint will record ``coordinator``: inference would use the
    recorded one on films the site masked with another."""
    if not local or not coordinator or local.get("sha256") == coordinator.get("sha256"):
        return None
    return (f"lung segmenter {local.get('name')!r} (sha256 {str(local.get('sha256'))[:12]}) here, "
            f"{coordinator.get('name')!r} (sha256 {str(coordinator.get('sha256'))[:12]}) at the coordinator")
