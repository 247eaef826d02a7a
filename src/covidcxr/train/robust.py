"""Group-robust training pieces: online group DRO and a class-conditional source adversary.

- :class:`GroupDRO` (Sagawa et al., "Distributionally Robust Neural Networks", ICLR 2020, Algorithm 1):
  a weight ``q_g`` per (source, class) group, updated each step by exponentiated gradient,
  ``q_g <- q_g * exp(eta * (L_g + C / sqrt(n_g)))`` then normalised, and the loss
  ``sum_g q_g * (L_g + C / sqrt(n_g))`` over the groups present in the batch. The weights drift towards
  the groups with the highest loss, so the network is pushed to do well on the worst group.
- :class:`SourceAdversary` (conditional DANN: Ganin et al., JMLR 2016; Li et al., ECCV 2018 "Deep domain
  generalization via conditional invariant adversarial networks"): one small head per class predicts
  the image's source from the pooled features through a gradient-reversal layer. Conditioning on the
  class (a head per class, not one head for all) asks for features whose source cannot be told *within*
  a class; an unconditional adversary would also erase the class signal wherever class and source are
  confounded (here: every NIH film is normal or pneumonia).

Neither is part of the inference model: they live beside ``CXRClassifier.model`` and stay out of
``best.ckpt``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, strength: float) -> torch.Tensor:  # type: ignore[override]
        ctx.strength = strength
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return -ctx.strength * grad, None


def grad_reverse(x: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """Identity forward; the backward pass multiplies the gradient by ``-strength`` (Ganin et al. 2016)."""
    return _GradReverse.apply(x, float(strength))


def dann_strength(progress: float, gamma: float = 10.0) -> float:
    """DANN's reversal schedule ``2 / (1 + exp(-gamma p)) - 1``: 0 at the start, near 1 from p ~ 0.5 on,
    so the adversary does not disturb the first, noisy steps."""
    p = min(max(float(progress), 0.0), 1.0)
    return 2.0 / (1.0 + math.exp(-gamma * p)) - 1.0


class GroupDRO(nn.Module):
    """Online group DRO loss over ``num_groups`` groups (see the module docstring).

    ``group_counts``: training images per group; groups with none start (and stay) at weight 0, the others
    start uniform. ``adjustment`` is Sagawa's C (0: off). The weights are a persistent buffer, so a
    resumed run continues from them. Under DDP the weight update uses the group losses of all ranks.
    """

    def __init__(self, num_groups: int, eta: float = 0.01, adjustment: float = 0.0,
                 group_counts: Sequence[int] | None = None) -> None:
        super().__init__()
        if num_groups < 1:
            raise ValueError("group DRO needs at least one group")
        counts = torch.as_tensor(list(group_counts) if group_counts is not None else [1] * num_groups,
                                 dtype=torch.float32)
        if counts.numel() != num_groups:
            raise ValueError(f"{counts.numel()} group counts for {num_groups} groups")
        present = counts > 0
        if not present.any():
            raise ValueError("group DRO: no group has training images")
        self.eta = float(eta)
        self.register_buffer("q", present.float() / present.sum())
        adj = torch.where(present, float(adjustment) / counts.clamp(min=1).sqrt(), torch.zeros_like(counts))
        self.register_buffer("adjust", adj, persistent=False)

    def group_losses(self, per_sample: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss per group, images per group) of one batch; 0 and 0 for an absent group."""
        g = groups.long()
        valid = g >= 0
        n = self.q.numel()
        sums = torch.zeros(n, dtype=per_sample.dtype, device=per_sample.device).index_add(0, g[valid], per_sample[valid])
        counts = torch.bincount(g[valid], minlength=n).to(per_sample.dtype)
        return sums / counts.clamp(min=1), counts

    def forward(self, per_sample: torch.Tensor, groups: torch.Tensor, update: bool = True) -> torch.Tensor:
        """The robust loss of a batch; with ``update`` the group weights take one exponentiated-gradient step
        first (Sagawa et al.'s order: update q with this batch's losses, then weight them with the new q)."""
        losses, counts = self.group_losses(per_sample.float(), groups)
        present = counts > 0
        adjusted = torch.where(present, losses + self.adjust, torch.zeros_like(losses))
        if update:
            with torch.no_grad():
                step = adjusted.detach().clone()
                seen = present.float()
                if torch.distributed.is_available() and torch.distributed.is_initialized():
                    # the same weights on every rank: step with the group losses of the whole global batch
                    tot = torch.stack([step * counts, counts.detach().clone()])
                    torch.distributed.all_reduce(tot)
                    seen = (tot[1] > 0).float()
                    step = torch.where(tot[1] > 0, tot[0] / tot[1].clamp(min=1), torch.zeros_like(step))
                q = self.q * torch.exp(self.eta * step * seen)
                self.q.copy_(q / q.sum())
        return (self.q * adjusted).sum()


def _first_linear(module: nn.Module) -> nn.Linear | None:
    if isinstance(module, nn.Linear):
        return module
    return next((m for m in module.modules() if isinstance(m, nn.Linear)), None)


def feature_dim(head: nn.Module) -> int:
    """Width of the pooled features a head block reads (its first Linear's ``in_features``)."""
    lin = _first_linear(head)
    if lin is None:
        raise ValueError(f"head {type(head).__name__} has no Linear layer; cannot attach a source adversary")
    return int(lin.in_features)


class SourceAdversary(nn.Module):
    """Per-class source classifiers on pooled features, trained through gradient reversal.

    ``active``: the classes whose training images come from at least two sources; a class with one source
    has nothing to confuse and gets no loss. ``hidden`` 0 makes each head linear.
    """

    def __init__(self, in_features: int, num_classes: int, num_sources: int, hidden: int = 128,
                 active: Sequence[bool] | None = None) -> None:
        super().__init__()
        if num_sources < 2:
            raise ValueError(f"a source adversary needs at least 2 training sources, got {num_sources}")

        def head() -> nn.Module:
            if hidden <= 0:
                return nn.Linear(in_features, num_sources)
            return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_sources))

        self.heads = nn.ModuleList(head() for _ in range(num_classes))
        act = torch.as_tensor(list(active) if active is not None else [True] * num_classes, dtype=torch.bool)
        if act.numel() != num_classes:
            raise ValueError(f"{act.numel()} active flags for {num_classes} classes")
        self.register_buffer("active", act, persistent=False)

    def forward(self, features: torch.Tensor, labels: torch.Tensor, sources: torch.Tensor,
                strength: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean source cross-entropy over the batch's usable images, source accuracy on them).

        The features pass a gradient-reversal layer of ``strength`` first: the heads descend this loss,
        the network that made the features ascends it."""
        f = grad_reverse(features.flatten(1), strength)
        y, s = labels.long(), sources.long()
        use = (y >= 0) & (s >= 0)
        use &= self.active[y.clamp(min=0)]
        total = f.new_zeros((), dtype=torch.float32)
        correct = f.new_zeros((), dtype=torch.float32)
        n = int(use.sum())
        for c in torch.unique(y[use]).tolist():
            m = use & (y == c)
            logits = self.heads[c](f[m]).float()
            total = total + nn.functional.cross_entropy(logits, s[m], reduction="sum")
            correct = correct + (logits.argmax(1) == s[m]).sum()
        if n == 0:  # keep the heads in the graph so DDP sees every parameter used
            zero = sum(p.sum() for p in self.parameters()) * 0.0
            return total + zero, correct
        return total / n, correct / n
