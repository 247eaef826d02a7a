"""Pooled features of any registry model, and the small training-feature summary a checkpoint carries.

``covidcxr site check`` asks whether a hospital's films look like the training data. It needs the
training distribution in the model's own feature space (the pooled features the head Linear reads),
stored in the checkpoint at training time, so it must be small. The summary (JSON-serialisable,
a few KB) is:

* a fixed random projection of the D pooled features to ``m`` <= 64 dimensions (regenerated from a
  seed with numpy's frozen ``RandomState`` stream, so nothing D-sized is stored);
* a probabilistic-PCA model of the training images in that space (Tipping & Bishop 1999): mean,
  the top ``k`` principal directions (m x k) and variances, and the mean residual variance. The
  distance of an image is the PPCA Mahalanobis distance
  d^2 = sum_i z_i^2 / lambda_i + ||r||^2 / sigma^2 (z: PCA coordinates, r: the residual);
* per training source: its mean in PCA coordinates, and quantiles of the distance of that source's
  held-out (val) images to the training distribution and to the source's own mean -- the training
  sources' own spread, against which a new site's films are measured.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

SUMMARY_KEY = "feature_summary"
SUMMARY_VERSION = 1
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)


def _head(model: nn.Module) -> nn.Linear:
    from covidcxr.models.registry import get_head

    return get_head(model, getattr(model, "covidcxr_arch", None))


@torch.no_grad()
def extract_features(model: nn.Module, batches: Iterable[Any]) -> tuple[np.ndarray, np.ndarray]:
    """(pooled features N x D, logits N x K) for batches of preprocessed images (arrays or tensors, N x C x H x W).

    The features are the input of the registry head Linear, captured by a hook during one forward pass.
    """
    head = _head(model)
    feats: list[np.ndarray] = []
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, inp, _out: captured.append(inp[0].detach()))
    device = next(model.parameters()).device
    logits: list[np.ndarray] = []
    try:
        for batch in batches:
            x = torch.as_tensor(np.asarray(batch, dtype=np.float32) if isinstance(batch, np.ndarray) else batch,
                                dtype=torch.float32).to(device)
            out = model(x)
            out = out[0] if isinstance(out, (tuple, list)) else out
            f = captured.pop()
            captured.clear()
            feats.append(f.float().reshape(len(x), -1).cpu().numpy())
            logits.append(out.float().cpu().numpy())
    finally:
        handle.remove()
    if not feats:
        return np.zeros((0, head.in_features), np.float32), np.zeros((0, head.out_features), np.float32)
    return np.concatenate(feats), np.concatenate(logits)


# --------------------------------------------------------------------------- the summary (numpy only)


def _projection(dim: int, m: int, seed: int) -> np.ndarray:
    """A fixed Gaussian projection D -> m (identity when D <= m); RandomState's stream never changes."""
    if dim <= m:
        return np.eye(dim)
    return np.random.RandomState(seed).standard_normal((dim, m)) / math.sqrt(m)


def _coords(summary: Mapping[str, Any], feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PCA coordinates (N x k) and squared residual norms (N,) of features."""
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2 or f.shape[1] != int(summary["dim"]):
        raise ValueError(f"features of width {f.shape[-1]} for a summary of width {summary['dim']}")
    y = f @ _projection(int(summary["dim"]), int(summary["m"]), int(summary["seed"])) - np.asarray(summary["mean"])
    basis = np.asarray(summary["basis"], dtype=np.float64)
    z = y @ basis
    r2 = np.maximum((y * y).sum(1) - (z * z).sum(1), 0.0)
    return z, r2


def feature_distances(summary: Mapping[str, Any], feats: np.ndarray) -> dict[str, np.ndarray]:
    """PPCA Mahalanobis distance of each feature row to the training distribution (``"all"``) and to
    each training source's mean (``"source:NAME"``), in the summary's units."""
    z, r2 = _coords(summary, feats)
    lam = np.asarray(summary["variances"], dtype=np.float64)
    res = r2 / float(summary["residual_variance"])
    out = {"all": np.sqrt((z * z / lam).sum(1) + res)}
    for name, s in summary["sources"].items():
        dz = z - np.asarray(s["mean"], dtype=np.float64)
        out[f"source:{name}"] = np.sqrt((dz * dz / lam).sum(1) + res)
    return out


def _quantiles(d: np.ndarray) -> dict[str, float]:
    return {f"q{round(q * 100):02d}": float(np.quantile(d, q)) for q in QUANTILES} if len(d) else {}


def _round(a: np.ndarray) -> list:
    """float32 precision is plenty, and keeps the stored summary small."""
    return np.asarray(a, dtype=np.float32).astype(np.float64).round(7).tolist()


def summarise_features(train_feats: np.ndarray, train_sources: Sequence[str], ref_feats: np.ndarray | None = None,
                       ref_sources: Sequence[str] | None = None, *, k: int = 16, m: int = 64, seed: int = 0,
                       min_ref: int = 10) -> dict[str, Any]:
    """The summary from training-image features (fit) and held-out reference features (spread).

    A source with fewer than ``min_ref`` reference images takes its spread from its training images
    instead, marked ``"spread_from": "train (in-sample: optimistic)"``.
    """
    x = np.asarray(train_feats, dtype=np.float64)
    if x.ndim != 2 or len(x) < 3:
        raise ValueError(f"need at least 3 training feature rows, got {len(x)}")
    dim = x.shape[1]
    m = min(m, dim)
    y = x @ _projection(dim, m, seed)
    mean = y.mean(0)
    yc = y - mean
    # eigen-decomposition of the covariance (m x m, small)
    cov = yc.T @ yc / max(len(y) - 1, 1)
    vals, vecs = np.linalg.eigh(cov)
    order = np.argsort(vals)[::-1]
    vals, vecs = np.maximum(vals[order], 0.0), vecs[:, order]
    k = int(max(1, min(k, m - 1, len(x) - 1)))
    floor = max(float(vals[0]) * 1e-6, 1e-12)  # keeps a degenerate direction from dividing by ~0
    rest = vals[k:]
    summary: dict[str, Any] = {
        "version": SUMMARY_VERSION,
        "method": "PPCA Mahalanobis distance in a fixed random projection of the pooled features",
        "dim": int(dim), "m": int(m), "k": k, "seed": int(seed),
        "mean": _round(mean),
        "basis": _round(vecs[:, :k]),
        "variances": np.maximum(vals[:k], floor).tolist(),
        "residual_variance": float(max(rest.mean() if len(rest) else floor, floor)),
        "n_train": int(len(x)),
    }
    train_sources = [str(s) for s in train_sources]
    z, _ = _coords(summary, x)
    summary["sources"] = {s: {"mean": _round(z[np.asarray(train_sources) == s].mean(0)),
                              "n_train": int((np.asarray(train_sources) == s).sum())}
                          for s in sorted(set(train_sources))}
    if ref_feats is None or ref_sources is None or len(ref_feats) == 0:
        ref_feats, ref_sources = x, train_sources
    ref = np.asarray(ref_feats, dtype=np.float64)
    ref_src = np.asarray([str(s) for s in ref_sources])
    d_ref = feature_distances(summary, ref)
    d_train = feature_distances(summary, x)
    tr_src = np.asarray(train_sources)
    used_all: list[np.ndarray] = []
    for s, info in summary["sources"].items():
        held = ref_src == s
        if held.sum() >= min_ref:
            own, glob, how = d_ref[f"source:{s}"][held], d_ref["all"][held], "val (held out)"
        else:
            sel = tr_src == s
            own, glob, how = d_train[f"source:{s}"][sel], d_train["all"][sel], "train (in-sample: optimistic)"
        info.update(spread_from=how, n_spread=int(len(own)), own=_quantiles(own), all=_quantiles(glob))
        used_all.append(glob)
    pooled = np.concatenate(used_all)
    summary["all"] = {"n": int(len(pooled)), **_quantiles(pooled)}
    return summary


# --------------------------------------------------------------------------- from a manifest frame


def frame_features(model: nn.Module, preset: Any, frame: Any, *, batch_size: int = 16,
                   num_workers: int = 0) -> tuple[np.ndarray, np.ndarray, Any]:
    """Features and logits of a manifest frame's readable images (decoded afresh, no augmentation),
    and the frame rows they belong to (unreadable rows are dropped with a warning)."""
    from covidcxr.data.dataset import CXRDataset

    # labels play no part here: drop them, so any label set (binary, findings) reads
    ds = CXRDataset(frame.drop(columns=["label"], errors="ignore").reset_index(drop=True), preset, augment=None,
                    cache_dir=None)
    bad = ds.check(skip_bad=True)
    for err in bad:
        log.warning("feature summary: skipped %s", err)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers)
    feats, logits = extract_features(model, (b["image"] for b in loader))
    return feats, logits, ds.frame


def _cap(frame: Any, per_source: int, seed: int) -> Any:
    """At most ``per_source`` rows of each source (a bounded cost at the end of training)."""
    if "source" not in frame.columns:
        frame = frame.assign(source="all")
    frame = frame.assign(source=frame["source"].fillna("unknown").astype(str))
    keep = [i for _, g in frame.groupby("source") for i in g.sample(min(len(g), per_source), random_state=seed).index]
    return frame.loc[sorted(keep)].reset_index(drop=True)


def summarise_frames(model: nn.Module, preset: Any, train: Any, ref: Any | None, *, per_source: int = 200,
                     ref_per_source: int = 100, seed: int = 0, batch_size: int = 16) -> dict[str, Any]:
    """The summary of a model for a manifest's train rows (fit) and val rows (spread), capped per source."""
    model.eval()
    train = _cap(train, per_source, seed)
    tf, _, tframe = frame_features(model, preset, train, batch_size=batch_size)
    rf = rs = None
    if ref is not None and len(ref):
        ref = _cap(ref, ref_per_source, seed)
        rf, _, rframe = frame_features(model, preset, ref, batch_size=batch_size)
        rs = list(rframe["source"].astype(str))
    out = summarise_features(tf, list(tframe["source"].astype(str)), rf, rs, seed=seed)
    out["preset"] = getattr(preset, "name", None)
    return out


def attach_feature_summary(bundle: dict[str, Any], ckpt: Any, dm: Any) -> bool:
    """Store the training-feature summary in a checkpoint bundle (``bundle["feature_summary"]``), computed
    with the weights in ``ckpt`` on the DataModule's train and val rows. Called at the end of training: any
    failure logs a warning and leaves the bundle without a summary; training never fails for it."""
    try:
        from covidcxr.models.checkpoint import load

        lm = load(ckpt)
        train = dm.dataset("train").frame
        try:
            val = dm.dataset("val").frame
        except Exception:  # no val split: the spread comes from the training images (marked in-sample)
            val = None
        bundle[SUMMARY_KEY] = summarise_frames(lm.model, lm.preset, train, val, batch_size=int(dm.batch_size))
        s = bundle[SUMMARY_KEY]
        log.info("training-feature summary stored (%d train images, %d sources)", s["n_train"], len(s["sources"]))
        return True
    except Exception as err:  # the summary is an extra: never lose a finished training over it
        log.warning("%s: no training-feature summary stored (covidcxr site check will need --reference-data): "
                    "%s: %s", ckpt, type(err).__name__, err)
        return False
