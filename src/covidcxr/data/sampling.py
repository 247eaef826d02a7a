"""Class balancing for training: COVID-Net batch re-balancing, weighted sampling, class weights.

Both samplers subclass ``DistributedSampler`` so that Lightning leaves them in place under DDP:
every rank draws the same global sequence (same seed and epoch) and keeps its own share, so ranks
see different samples. ``set_epoch`` reshuffles and is forwarded to the dataset, which re-seeds
its augmentation per epoch.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DistributedSampler


def _labels(labels: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    arr = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.int64).ravel()
    if arr.size == 0:
        raise ValueError("no labels given")
    return arr


def class_weights(labels: Sequence[int] | np.ndarray | torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """Balanced class weights ``n / (k * count_c)`` (sklearn's "balanced"); unlabelled (-1) ignored.

    A class absent from ``labels`` gets weight 0 so that it cannot blow up the loss.
    """
    arr = _labels(labels)
    arr = arr[arr >= 0]
    k = int(num_classes if num_classes is not None else arr.max() + 1)
    counts = np.bincount(arr, minlength=k).astype(np.float64)
    present = counts > 0
    w = np.zeros(k)
    w[present] = len(arr) / (present.sum() * counts[present])
    return torch.tensor(w, dtype=torch.float32)


def _dist(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    if num_replicas is None or rank is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            num_replicas = torch.distributed.get_world_size() if num_replicas is None else num_replicas
            rank = torch.distributed.get_rank() if rank is None else rank
        else:
            num_replicas, rank = num_replicas or 1, rank or 0
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank {rank} outside [0, {num_replicas})")
    return int(num_replicas), int(rank)


class _EpochSampler(DistributedSampler):
    """Shared plumbing: rank/world, epoch, forwarding the epoch to the dataset."""

    def __init__(self, n: int, seed: int, num_replicas: int | None, rank: int | None, dataset: object = None):
        # DistributedSampler.__init__ insists on an initialised process group; we do not.
        self.num_replicas, self.rank = _dist(num_replicas, rank)
        self.seed, self.epoch, self.n = int(seed), 0, int(n)
        self.dataset = dataset
        self.shuffle, self.drop_last = True, False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if self.dataset is not None and hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch])


class ShuffleSampler(_EpochSampler):
    """Plain per-epoch shuffle, sharded over ranks (padded to equal length like DistributedSampler)."""

    def __init__(self, n: int, seed: int = 0, num_replicas: int | None = None, rank: int | None = None,
                 shuffle: bool = True, dataset: object = None):
        super().__init__(n, seed, num_replicas, rank, dataset)
        self.shuffle = shuffle
        self.num_samples = math.ceil(self.n / self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        idx = self._rng().permutation(self.n) if self.shuffle else np.arange(self.n)
        total = self.num_samples * self.num_replicas
        idx = np.resize(idx, total)  # pad by wrapping, as DistributedSampler does
        return iter(idx[self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples


class RebalancingSampler(_EpochSampler):
    """COVID-Net batch re-balancing: each batch of ``batch_size`` holds ``max(1, int(minority_fraction *
    batch_size))`` samples of the minority class, the rest drawn from the other classes.

    ``minority_class`` names the class that fills the fraction. COVID-Net's ``BalanceCovidDataset``
    always fills it with COVID-19, also where COVID-19 is the commonest class (the shared dev set);
    without it the rarest training class is taken.

    Both pools are walked through in shuffled order and re-shuffled when used up, so every image is
    seen. One epoch has as many samples as the non-minority pool needs to be seen once (at least
    ``len(labels)``), rounded up to whole batches per rank. Under DDP, rank r takes global batches
    r, r + world, ..., so every rank's batches keep the fraction.
    """

    def __init__(self, labels: Sequence[int] | np.ndarray | torch.Tensor, batch_size: int, minority_fraction: float = 0.5,
                 seed: int = 0, minority_class: int | None = None, num_replicas: int | None = None,
                 rank: int | None = None, dataset: object = None):
        arr = _labels(labels)
        super().__init__(len(arr), seed, num_replicas, rank, dataset)
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not 0 < minority_fraction < 1:
            raise ValueError(f"minority_fraction must be in (0, 1), got {minority_fraction}")
        valid = arr[arr >= 0]
        if minority_class is None:
            counts = np.bincount(valid)
            present = np.nonzero(counts)[0]
            minority_class = int(present[np.argmin(counts[present])])
        self.minority_class = int(minority_class)
        self.minority = np.nonzero(arr == self.minority_class)[0]
        self.majority = np.nonzero((arr != self.minority_class) & (arr >= 0))[0]
        if len(self.minority) == 0 or len(self.majority) == 0:
            raise ValueError("re-balancing needs samples of the minority class and of the other classes")
        self.batch_size = int(batch_size)
        # as COVID-Net's BalanceCovidDataset: covid_size = max(int(batch * covid_percent), 1)
        self.k_min = min(self.batch_size - 1, max(1, int(minority_fraction * self.batch_size))) if self.batch_size > 1 else 1
        k_maj = self.batch_size - self.k_min
        batches = max(math.ceil(len(arr) / self.batch_size), math.ceil(len(self.majority) / max(k_maj, 1)))
        self.batches_per_rank = math.ceil(batches / self.num_replicas)
        self.num_samples = self.batches_per_rank * self.batch_size

    @staticmethod
    def _stream(pool: np.ndarray, rng: np.random.Generator) -> Iterator[int]:
        while True:
            yield from rng.permutation(pool).tolist()

    def __iter__(self) -> Iterator[int]:
        rng = self._rng()
        mins, majs = self._stream(self.minority, rng), self._stream(self.majority, rng)
        out: list[int] = []
        for b in range(self.batches_per_rank * self.num_replicas):
            batch = [next(mins) for _ in range(self.k_min)] + [next(majs) for _ in range(self.batch_size - self.k_min)]
            if b % self.num_replicas == self.rank:
                perm = rng.permutation(len(batch)) if self.batch_size > 1 else [0]
                out.extend(batch[i] for i in perm)
            elif self.batch_size > 1:
                rng.permutation(len(batch))  # keep every rank's generator in step
        return iter(out)

    def __len__(self) -> int:
        return self.num_samples


class WeightedSampler(_EpochSampler):
    """Draw with replacement, probability proportional to the balanced class weight of each sample."""

    def __init__(self, labels: Sequence[int] | np.ndarray | torch.Tensor, seed: int = 0, num_samples: int | None = None,
                 num_replicas: int | None = None, rank: int | None = None, dataset: object = None):
        arr = _labels(labels)
        super().__init__(len(arr), seed, num_replicas, rank, dataset)
        w = class_weights(arr).numpy()
        p = np.where(arr >= 0, w[np.clip(arr, 0, None)], 0.0)
        self.p = p / p.sum()
        self.num_samples = math.ceil((num_samples or len(arr)) / self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        idx = self._rng().choice(self.n, size=self.num_samples * self.num_replicas, replace=True, p=self.p)
        return iter(idx[self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples


def rebalancing_sampler(labels: Sequence[int] | np.ndarray | torch.Tensor, batch_size: int,
                        minority_fraction: float = 0.5, seed: int = 0, **kw: object) -> RebalancingSampler:
    """The COVID-Net batch re-balancing sampler (see :class:`RebalancingSampler`)."""
    return RebalancingSampler(labels, batch_size, minority_fraction=minority_fraction, seed=seed, **kw)


def merge_small_groups(groups: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray,
                       min_size: int = 5) -> np.ndarray:
    """Cell ids for :class:`GroupBalancedSampler`: ``groups`` with every cell under ``min_size`` images merged.

    A cell (one source x class) smaller than ``min_size`` joins the other small cells of its class in one
    pooled cell ("the rare sources of this class"); a pool still under ``min_size`` joins the smallest cell of
    its class that has ``min_size`` images (the rare sources are more like another minor source than like the
    dominant one, which would swamp them). No image is dropped. Unlabelled rows (label or group -1) stay -1. Returns one id per row.
    """
    g, y = np.asarray(groups, dtype=np.int64).copy(), _labels(labels)
    if g.shape != y.shape:
        raise ValueError(f"{len(g)} group ids for {len(y)} labels")
    g[(y < 0) | (g < 0)] = -1
    out = g.copy()
    fresh = int(g.max()) + 1 if (g >= 0).any() else 0
    for c in np.unique(y[y >= 0]):
        in_c = (y == c) & (g >= 0)
        ids, counts = np.unique(g[in_c], return_counts=True)
        small = ids[counts < min_size]
        if len(small) == 0 or len(small) == len(ids) == 1:
            continue
        pool = in_c & np.isin(g, small)
        big = ids[counts >= min_size]
        if pool.sum() >= min_size or len(big) == 0:
            out[pool] = fresh  # one pooled cell for the rare sources of class c
            fresh += 1
        else:
            out[pool] = big[np.argmin(counts[counts >= min_size])]
    return out


class GroupBalancedSampler(_EpochSampler):
    """Every (source, class) cell drawn equally often per epoch (group-balanced sampling, Sagawa et al. 2020;
    Idrissi et al. 2022 "subsampling/upsampling" baseline).

    ``groups``: one cell id per row (-1: never drawn), e.g. from :func:`merge_small_groups`. Each epoch draws
    the same quota ``q`` from every cell: ``q = min(ceil(n / G), ceil(max_repeat * smallest cell))`` for
    ``n`` drawable rows in ``G`` cells. So an epoch is ``q * G`` draws (at most ``n``): a cell smaller than
    ``q`` repeats its images (each at most ``max_repeat`` times, up to one extra draw where ``q`` is not a
    multiple), a larger cell contributes a fresh random subset each epoch. Within a cell, images are walked
    through in shuffled order (no image repeats before all were drawn). Deterministic by ``(seed, epoch)``;
    under DDP each rank takes every ``world``-th draw of the same global order (padded to equal length).
    """

    def __init__(self, groups: Sequence[int] | np.ndarray | torch.Tensor, seed: int = 0, max_repeat: float = 4.0,
                 num_replicas: int | None = None, rank: int | None = None, dataset: object = None):
        arr = np.asarray(groups.cpu() if isinstance(groups, torch.Tensor) else groups).astype(np.int64).ravel()
        super().__init__(len(arr), seed, num_replicas, rank, dataset)
        if max_repeat < 1:
            raise ValueError(f"max_repeat must be >= 1, got {max_repeat}")
        ids = np.unique(arr[arr >= 0])
        if len(ids) == 0:
            raise ValueError("group-balanced sampling needs at least one labelled group")
        self.cells = [np.nonzero(arr == i)[0] for i in ids]
        self.cell_ids = ids.tolist()
        n, sizes = int((arr >= 0).sum()), np.array([len(c) for c in self.cells])
        self.quota = int(max(1, min(math.ceil(n / len(ids)), math.ceil(max_repeat * sizes.min()))))
        self.total = self.quota * len(ids)
        self.num_samples = math.ceil(self.total / self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        rng = self._rng()
        draws: list[int] = []
        for cell in self.cells:
            reps = math.ceil(self.quota / len(cell))
            # shuffled passes over the cell, cut at the quota: no image twice before every image once
            draws.extend(np.concatenate([rng.permutation(cell) for _ in range(reps)])[: self.quota].tolist())
        order = np.asarray(draws)[rng.permutation(len(draws))]
        order = np.resize(order, self.num_samples * self.num_replicas)  # pad by wrapping, as DistributedSampler
        return iter(order[self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples
