"""Which model tensors travel between a site and the coordinator, as NumPy arrays in a fixed order.

FedAvg and FedProx exchange every float tensor of the state dict (BatchNorm running statistics included);
FedBN keeps BatchNorm parameters and statistics at the site and exchanges the rest (Li et al., ICLR 2021).
``num_batches_tracked`` never travels: it is a counter, not a weight, and its integer dtype would not survive
clipping or averaging.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from torch import nn

STRATEGIES = ("fedavg", "fedprox", "fedbn")


def batchnorm_keys(model: nn.Module) -> set[str]:
    """State-dict keys that belong to BatchNorm layers (affine parameters and running statistics)."""
    keys: set[str] = set()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            prefix = f"{name}." if name else ""
            keys.update(prefix + k for k in mod.state_dict().keys())
    return keys


def exchanged_keys(model: nn.Module, strategy: str) -> list[str]:
    """The state-dict keys that leave a site each round, in state-dict order."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    local = batchnorm_keys(model) if strategy == "fedbn" else set()
    return [k for k, v in model.state_dict().items()
            if not k.endswith("num_batches_tracked") and k not in local and torch.is_floating_point(v)]


def local_keys(model: nn.Module, strategy: str) -> list[str]:
    """BatchNorm keys a FedBN site keeps (empty for FedAvg/FedProx); counters excluded."""
    if strategy != "fedbn":
        return []
    return [k for k in model.state_dict() if k in batchnorm_keys(model) and not k.endswith("num_batches_tracked")]


def get_arrays(model: nn.Module, keys: Iterable[str]) -> list[np.ndarray]:
    state = model.state_dict()
    return [state[k].detach().cpu().numpy().copy() for k in keys]


def set_arrays(model: nn.Module, keys: list[str], arrays: list[np.ndarray]) -> None:
    """Copy ``arrays`` into the tensors named by ``keys`` (shapes must match: a mismatch is a different model)."""
    if len(keys) != len(arrays):
        raise ValueError(f"expected {len(keys)} arrays for this model, received {len(arrays)}")
    state = model.state_dict()
    with torch.no_grad():
        for k, a in zip(keys, arrays):
            t = state[k]
            if tuple(t.shape) != tuple(a.shape):
                raise ValueError(f"{k}: shape {tuple(a.shape)} received, the model has {tuple(t.shape)}")
            t.copy_(torch.from_numpy(np.asarray(a)).to(t.dtype))


def nbytes(arrays: Iterable[np.ndarray]) -> int:
    return int(sum(np.asarray(a).nbytes for a in arrays))
