"""Group-robust training (issue 18 §2, §5): group-balanced sampling, group DRO, the class-conditional source
adversary, histogram standardisation, source-randomising augmentation and bf16 training on the CPU.

A synthetic manifest (random 64 px PNGs from three sources) keeps every fit to seconds and needs no shared data.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from covidcxr import models
from covidcxr.data import CXRDataModule
from covidcxr.data.sampling import GroupBalancedSampler, merge_small_groups
from covidcxr.preprocess import (AUGMENT_RECIPES, NIH_CXR14_TEMPLATE, Preset, SourceAugment, add_borders, add_noise,
                                 apply_contrast, apply_gamma, burn_text, gaussian_blur, get_preset, jpeg_recompress,
                                 reduce_bit_depth, standardized)
from covidcxr.train import ConfigError, load_config
from covidcxr.train.robust import GroupDRO, SourceAdversary, dann_strength, grad_reverse

REPO = Path(__file__).resolve().parents[1]
FAST = ["data.size=64", "data.batch_size=6", "data.num_workers=0", "trainer.accelerator=cpu", "trainer.devices=1",
        "trainer.progress_bar=false", "trainer.num_threads=1", "trainer.log_every_n_steps=1",
        "early_stopping.monitor=null", "model.weights=none", "model.arch=mobilenet_v2", "data.preset=imagenet"]
# (source, label) -> images: a dominant source for normal/pneumonia, small ones elsewhere, as the merged benchmark
CELLS = {("nih", "normal"): 14, ("nih", "pneumonia"): 12, ("cohen", "COVID-19"): 12, ("cohen", "pneumonia"): 6,
         ("cohen", "normal"): 3, ("hannover", "COVID-19"): 8, ("hannover", "normal"): 2}


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Train rows per CELLS, val/test with every class; each source has its own brightness (a shortcut)."""
    d = tmp_path_factory.mktemp("robust")
    rng = np.random.default_rng(0)
    level = {"nih": 60, "cohen": 120, "hannover": 180}
    rows, i = [], 0
    for split, scale in (("train", 1.0), ("val", 0.5), ("test", 0.5)):
        for (src, label), n in CELLS.items():
            for _ in range(max(1, int(n * scale))):
                img = np.clip(rng.normal(level[src], 30, (64, 72)), 0, 255).astype(np.uint8)
                if label == "COVID-19":
                    img[16:48, 16:56] //= 2
                p = d / f"img{i:03d}.png"
                cv2.imwrite(str(p), img)
                rows.append({"patient_id": f"p{i}", "path": str(p), "label": label, "source": src, "split": split})
                i += 1
    out = d / "manifest.csv"
    pd.DataFrame(rows).to_csv(out, index=False)
    return out


# --------------------------------------------------------------------------- group-balanced sampling


def test_group_balanced_sampler_draws_every_cell_equally_within_the_repeat_cap() -> None:
    sizes = [8, 20, 100, 300]
    groups = np.concatenate([np.full(n, g) for g, n in enumerate(sizes)] + [np.full(5, -1)])
    s = GroupBalancedSampler(groups, seed=3, max_repeat=4)
    # quota = min(ceil(428 / 4), 4 x 8) = 32 per cell: epoch length 4 x 32, not the 433 rows
    assert s.quota == 32 and len(s) == 128
    idx = list(s)
    per_cell = Counter(int(groups[i]) for i in idx)
    assert per_cell == {0: 32, 1: 32, 2: 32, 3: 32}
    small = Counter(i for i in idx if groups[i] == 0)
    assert set(small.values()) == {4}  # the 8-image cell: every image exactly max_repeat times
    big = [i for i in idx if groups[i] == 3]
    assert len(set(big)) == len(big)  # a large cell: a subset, no image twice
    assert list(GroupBalancedSampler(groups, seed=3, max_repeat=4)) == idx  # deterministic by seed
    s.set_epoch(1)
    assert list(s) != idx and Counter(int(groups[i]) for i in s) == per_cell  # new draw, same balance
    assert list(GroupBalancedSampler(groups, seed=4, max_repeat=4)) != idx
    # without a binding cap the quota is n / G and an epoch is as long as the data
    assert GroupBalancedSampler(groups, seed=0, max_repeat=1000).quota == 107


def test_group_balanced_sampler_shards_over_ranks() -> None:
    groups = np.repeat([0, 1, 2], [5, 9, 30])
    full = list(GroupBalancedSampler(groups, seed=1, max_repeat=2, num_replicas=1, rank=0))
    r0 = list(GroupBalancedSampler(groups, seed=1, max_repeat=2, num_replicas=2, rank=0))
    r1 = list(GroupBalancedSampler(groups, seed=1, max_repeat=2, num_replicas=2, rank=1))
    assert len(r0) == len(r1) == 15 and sorted(r0 + r1) == sorted(full)


def test_merge_small_groups_pools_rare_cells_per_class_and_drops_nothing() -> None:
    # class 0: cells 0 (20), 1 (2), 2 (2), 3 (9); class 1: cells 4 (30), 5 (3); one unlabelled row
    groups = np.array([0] * 20 + [1] * 2 + [2] * 2 + [3] * 9 + [4] * 30 + [5] * 3 + [6])
    labels = np.array([0] * 33 + [1] * 33 + [-1])
    out = merge_small_groups(groups, labels, min_size=4)
    assert out[-1] == -1
    assert len(set(out[20:24])) == 1 and out[20] not in (0, 1, 2, 3)  # 2 + 2 = 4: a pooled cell of their own
    assert (out[:20] == 0).all() and (out[24:33] == 3).all()
    # class 1: the 3 rare images are too few for a cell: they join class 1's smallest cell with >= 4 (cell 4)
    assert (out[63:66] == 4).all()
    assert ((out >= 0) == (labels >= 0)).all()  # no labelled image dropped


def test_datamodule_batches_carry_source_and_group_and_balance_cells(synth: Path) -> None:
    dm = CXRDataModule(synth, "imagenet@32", batch_size=8, sampler="group_balanced", seed=0, group_max_repeat=2,
                       group_min_size=3)
    dm.setup("fit")
    assert dm.sources == ["cohen", "hannover", "nih"]
    names = dm.group_names()
    assert names[dm.sources.index("nih") * 3 + 1] == "nih/pneumonia"
    counts = dm.group_counts()
    assert counts[names.index("cohen/normal")] == 3 and counts[names.index("hannover/pneumonia")] == 0
    batch = next(iter(dm.val_dataloader()))
    val = dm.dataset("val").frame
    for j, i in enumerate(batch["index"].tolist()):
        row = val.iloc[i]
        assert names[int(batch["group"][j])] == f"{row['source']}/{row['label']}"
        assert dm.sources[int(batch["source"][j])] == row["source"]
    ds = dm.dataset("train")
    sampler = dm.train_sampler()
    drawn = Counter(names[ds.groups[i]] for i in sampler)
    # hannover/normal (2 < group_min_size 3) joined hannover's COVID-19? no: the smallest normal cell >= 3
    assert drawn["hannover/normal"] + drawn["cohen/normal"] == sampler.quota
    cells = merge_small_groups(ds.groups, ds.labels, 3)
    assert set(Counter(cells[i] for i in sampler).values()) == {sampler.quota}


# --------------------------------------------------------------------------- group DRO


def test_group_dro_weights_rise_for_the_group_with_the_higher_loss() -> None:
    dro = GroupDRO(4, eta=0.5, group_counts=[10, 10, 10, 0])
    assert torch.allclose(dro.q, torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0]))  # an empty group never weighs
    per = torch.tensor([0.2, 0.2, 2.0, 2.4, 0.5, 0.7])
    groups = torch.tensor([0, 0, 1, 1, 2, -1])
    q_before = dro.q.clone()
    loss = dro(per, groups)
    assert dro.q[1] > q_before[1] and dro.q[0] < q_before[0] and dro.q[1] == dro.q.max()
    assert dro.q[3] == 0 and torch.isclose(dro.q.sum(), torch.tensor(1.0))
    # the loss is the new weights' mean over the present groups' mean losses (row -1 belongs to none)
    expected = dro.q[0] * 0.2 + dro.q[1] * 2.2 + dro.q[2] * 0.5
    assert torch.isclose(loss, expected)
    # repeated: the weight concentrates on the worst group
    for _ in range(20):
        dro(per, groups)
    assert dro.q[1] > 0.9
    # exponentiated gradient: q_g ~ q_g exp(eta L_g)
    fresh = GroupDRO(3, eta=0.5)
    fresh(torch.tensor([1.0, 3.0]), torch.tensor([0, 1]))
    w = torch.tensor([1 / 3 * np.exp(0.5), 1 / 3 * np.exp(1.5), 1 / 3], dtype=torch.float32)
    assert torch.allclose(fresh.q, w / w.sum())


def test_group_dro_adjustment_favours_small_groups_and_gradients_flow() -> None:
    dro = GroupDRO(2, eta=1.0, adjustment=2.0, group_counts=[100, 4])
    per = torch.tensor([1.0, 1.0], requires_grad=True)
    loss = dro(per, torch.tensor([0, 1]))
    assert dro.q[1] > dro.q[0]  # equal losses, but the 4-image group gets C / sqrt(4) = 1 on top (0.2 for 100)
    assert torch.isclose(loss, dro.q[0] * 1.2 + dro.q[1] * 2.0)
    loss.backward()
    assert torch.allclose(per.grad, dro.q)  # each image's loss enters with its group's weight


def test_module_group_dro_loss_is_the_weighted_group_mean(synth: Path) -> None:
    from covidcxr.train.module import CXRClassifier

    cfg = load_config(None, [*FAST, "loss=group_dro", "loss.dro_eta=0.1"])
    assert cfg["loss"]["kind"] == "group_dro"
    counts = [3, 6, 12, 2, 0, 8, 14, 12, 0]  # sources cohen, hannover, nih x normal, pneumonia, COVID-19
    m = CXRClassifier(cfg, ["normal", "pneumonia", "COVID-19"], get_preset("imagenet@32"),
                      sources=["cohen", "hannover", "nih"], group_counts=counts)
    logits = torch.randn(5, 3)
    y = torch.tensor([0, 1, 2, 0, 2])
    batch = {"group": torch.tensor([6, 7, 2, 3, 2])}
    per = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    loss = m.task_loss(logits, y, batch)
    q = m.dro.q
    assert torch.isclose(loss, q[6] * per[0] + q[7] * per[1] + q[2] * (per[2] + per[4]) / 2 + q[3] * per[3])
    assert q[4] == 0 and q[8] == 0
    with pytest.raises(ValueError, match="group counts"):
        CXRClassifier(cfg, ["normal", "pneumonia", "COVID-19"], get_preset("imagenet@32"), sources=["a"],
                      group_counts=counts)


# --------------------------------------------------------------------------- source adversary


def test_gradient_reversal_negates_and_scales() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    (grad_reverse(x, 0.3) * torch.arange(3.0)).sum().backward()
    assert torch.allclose(x.grad, -0.3 * torch.arange(3.0).expand(4, 3))
    assert dann_strength(0.0) == 0.0 and 0.99 < dann_strength(1.0) <= 1.0 and dann_strength(0.1) < dann_strength(0.3)


def test_adversary_gradient_on_features_is_the_negated_weighted_gradient() -> None:
    torch.manual_seed(0)
    adv = SourceAdversary(8, num_classes=3, num_sources=3, hidden=5, active=[True, True, False])
    feats = torch.randn(10, 8, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 1, -1])
    sources = torch.tensor([0, 1, 2, 0, 1, 2, 0, 2, -1, 1])
    weight, strength = 0.25, 0.7
    loss, _ = adv(feats, labels, sources, strength)
    (weight * loss).backward()
    g_rev = feats.grad.clone()
    used = [p for h in adv.heads[:2] for p in h.parameters()]  # class 2's head is inactive: never used
    head_grads = [p.grad.clone() for p in used]
    assert all(p.grad is None for p in adv.heads[2].parameters())
    # the same loss without the reversal layer, by hand: per-class heads, mean over usable rows
    adv.zero_grad()
    f2 = feats.detach().clone().requires_grad_(True)
    use = [i for i in range(10) if labels[i] >= 0 and sources[i] >= 0 and labels[i] != 2]
    plain = sum(torch.nn.functional.cross_entropy(adv.heads[int(labels[i])](f2[i:i + 1]), sources[i:i + 1])
                for i in use) / len(use)
    assert torch.isclose(loss, plain)
    (weight * plain).backward()
    assert torch.allclose(g_rev, -strength * f2.grad, atol=1e-6)
    assert g_rev[[5, 6, 8, 9]].abs().sum() == 0  # inactive class, unknown source, unlabelled: no gradient
    # the heads themselves descend the loss (no reversal for them)
    for a, b in zip(head_grads, used):
        assert torch.allclose(a, b.grad, atol=1e-6)


def test_adversary_heads_learn_the_source() -> None:
    torch.manual_seed(0)
    n = 120
    sources = torch.randint(0, 2, (n,))
    labels = torch.randint(0, 2, (n,))
    feats = torch.randn(n, 6) + sources[:, None].float() * 1.5  # the source shows in the features
    adv = SourceAdversary(6, num_classes=2, num_sources=2, hidden=16)
    opt = torch.optim.Adam(adv.parameters(), lr=1e-2)
    first, acc0 = adv(feats, labels, sources)
    for _ in range(150):
        opt.zero_grad()
        loss, acc = adv(feats, labels, sources)
        loss.backward()
        opt.step()
    assert loss < first.detach() - 0.2 and acc > 0.8 and acc > acc0


def test_module_adversary_reads_pooled_features_and_stays_out_of_the_model() -> None:
    from covidcxr.train.module import CXRClassifier

    cfg = load_config(None, [*FAST, "adversary=source", "adversary.weight=0.5", "adversary.hidden=0"])
    counts = [3, 6, 12, 2, 0, 8, 14, 12, 0]
    m = CXRClassifier(cfg, ["normal", "pneumonia", "COVID-19"], get_preset("imagenet@32"),
                      sources=["cohen", "hannover", "nih"], group_counts=counts)
    assert m.adversary.active.tolist() == [True, True, True]
    assert m.adversary.heads[0].in_features == 1280  # MobileNetV2's pooled features
    m.train()
    m(torch.randn(4, 3, 32, 32))
    assert m._features is not None and m._features.shape == (4, 1280)
    opt = m.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    adv_ids = {id(p) for p in m.adversary.parameters()}
    assert any(g["name"] == "adversary" and {id(p) for p in g["params"]} == adv_ids for g in opt.param_groups)
    assert not any(k.startswith("adversary") for k in m.model.state_dict())
    # a class drawn from a single source has nothing to confuse: no head loss for it
    m2 = CXRClassifier(cfg, ["normal", "pneumonia", "COVID-19"], get_preset("imagenet@32"),
                       sources=["cohen", "nih"], group_counts=[3, 0, 12, 14, 12, 0])
    assert m2.adversary.active.tolist() == [True, False, False]


# --------------------------------------------------------------------------- config


def test_robust_keys_are_documented_defaults_and_validated() -> None:
    cfg = load_config(None, ["data.sampler=group_balanced", "loss=group_dro", "adversary=source",
                             "trainer.precision=bf16-mixed", "data.hist_standardize=film"])
    assert cfg["loss"]["kind"] == "group_dro" and cfg["loss"]["label_smoothing"] == 0.0  # shorthand keeps the rest
    assert cfg["adversary"] == {**load_config(None)["adversary"], "kind": "source"}
    for bad, msg in (("loss=dro", "loss.kind"), ("adversary=site", "adversary.kind"),
                     ("data.sampler=groups", "data.sampler"), ("loss.dro_eta=0", "dro_eta"),
                     ("data.group_max_repeat=0.5", "group_max_repeat"), ("adversary.hidden=-1", "hidden"),
                     ("data.hist_standardize=lungs", "hist_standardize"), ("adversary.grl_schedule=linear", "grl")):
        with pytest.raises(ConfigError, match=msg):
            load_config(None, [bad])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(None, ["adversary.strength=1"])


def test_robust_recipe_file_loads() -> None:
    cfg = load_config(REPO / "configs" / "robust-mobilenet_v2.yaml")
    assert cfg["model"]["arch"] == "mobilenet_v2" and cfg["checkpoint"]["monitor"]


# --------------------------------------------------------------------------- harmonising input


def test_film_standardisation_maps_different_histograms_to_the_reference_quantiles() -> None:
    rng = np.random.default_rng(0)
    dark = np.clip(rng.beta(2, 6, (90, 80)), 0, 1).astype(np.float32)
    bright = np.clip(rng.beta(6, 2, (70, 100)), 0, 1).astype(np.float32) * 0.5 + 0.4
    plain = get_preset("imagenet@64")
    p = standardized(plain, "film")
    assert p.hist_template == NIH_CXR14_TEMPLATE and standardized(plain, None) is plain
    qs = np.linspace(0.05, 0.95, 10)
    ref = np.interp(qs, np.linspace(0, 1, len(NIH_CXR14_TEMPLATE)), NIH_CXR14_TEMPLATE) / 255.0
    a, b = p.prepare(dark), p.prepare(bright)
    assert np.abs(np.quantile(plain.prepare(dark), qs) - np.quantile(plain.prepare(bright), qs)).max() > 0.3
    assert np.abs(np.quantile(a, qs) - ref).max() < 0.03 and np.abs(np.quantile(b, qs) - ref).max() < 0.03
    # travels in checkpoints: the preset round-trips with its template, and inference (preset(...)) applies it
    assert Preset.from_dict(p.to_dict()) == p and p.fingerprint() != plain.fingerprint()
    assert torch.allclose(p(bright), p.finalize(b))


# --------------------------------------------------------------------------- source-randomising augmentation


@pytest.fixture()
def film() -> np.ndarray:
    y, x = np.mgrid[0:64, 0:64].astype(np.float32)
    img = 0.2 + 0.6 * (x / 63.0)  # a smooth ramp with a sharp square
    img[20:40, 20:40] = 0.9
    return img.astype(np.float32)


def _ok(out: np.ndarray, ref: np.ndarray) -> None:
    assert out.shape == ref.shape and out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1
    assert not np.array_equal(out, ref)


def test_each_source_op_changes_what_it_should(film: np.ndarray) -> None:
    g = apply_gamma(film, 2.0)
    _ok(g, film)
    assert np.allclose(g, film ** 2, atol=1e-6)
    c = apply_contrast(film, 1.5)
    _ok(c, film)
    assert c.std() > film.std() and abs(c.mean() - film.mean()) < 0.02
    b = gaussian_blur(film, 1.5)
    _ok(b, film)
    lap = lambda im: np.abs(cv2.Laplacian(im, cv2.CV_32F)).mean()  # noqa: E731
    assert lap(b) < 0.5 * lap(film) and abs(b.mean() - film.mean()) < 0.01
    n = add_noise(film, 0.02, np.random.default_rng(0))
    _ok(n, film)
    assert 0.015 < (n - film)[25:35, 5:15].std() < 0.025
    j = jpeg_recompress(film, 10)
    _ok(j, film)
    assert np.abs(j - film).max() > 0.02 and np.abs(j - film).mean() < 0.05
    q = reduce_bit_depth(film, 3)
    _ok(q, film)
    assert len(np.unique(q)) <= 8 and np.abs(q - film).max() <= 0.5 / 7 + 1e-6
    br = add_borders(film, (3, 0, 5, 0), 1.0)
    _ok(br, film)
    assert (br[:3] == 1).all() and (br[:, :5] == 1).all() and np.array_equal(br[3:, 5:], film[3:, 5:])
    t = burn_text(film, "R L", (4, 14), 1.0, 0.4)
    _ok(t, film)
    changed = np.argwhere(t != film)
    assert changed[:, 0].max() < 20 and changed[:, 1].max() < 40  # only near the text's place
    assert t.max() == pytest.approx(1.0, abs=1e-3)


def test_source_random_recipe_is_seeded_and_combinable(film: np.ndarray) -> None:
    aug = AUGMENT_RECIPES["source-random"]
    assert isinstance(aug, SourceAugment)
    outs = [aug(film, index=i, epoch=0) for i in range(12)]
    for o in outs:
        assert o.shape == (1, 64, 64) and o.dtype == torch.float32 and 0 <= o.min() and o.max() <= 1
    assert torch.equal(outs[3], aug(film, index=3, epoch=0))  # same (seed, epoch, index): same image
    assert not torch.equal(outs[3], aug(film, index=3, epoch=1))
    switched = [set(aug.source_params(i, 0, (64, 64))["on"]) for i in range(40)]
    assert set().union(*switched) == {"gamma", "contrast", "blur", "noise", "borders", "text", "bits", "jpeg"}
    # with every op off it is the plain geometric augmentation
    import dataclasses

    off = dataclasses.replace(aug, p_op=0.0)
    base = dataclasses.replace(AUGMENT_RECIPES["light"], brightness=aug.brightness)
    assert torch.equal(off(film, index=5), base(film, index=5))


# --------------------------------------------------------------------------- end to end, bf16


def test_fit_with_every_robust_option_in_bf16_keeps_the_checkpoint_plain(synth: Path, tmp_path: Path) -> None:
    from covidcxr.train import fit

    cfg = load_config(None, [*FAST, "data.size=32", "trainer.max_epochs=2", "trainer.precision=bf16-mixed",
                             "trainer.limit_train_batches=4",
                             "trainer.channels_last=true", "data.sampler=group_balanced", "data.group_min_size=3",
                             "loss=group_dro", "loss.dro_eta=0.05", "adversary=source", "adversary.hidden=16",
                             "data.augment=source-random", "data.hist_standardize=film",
                             "checkpoint.monitor=val_auc_covid", "checkpoint.mode=max"])
    run = fit(cfg, data=synth, out=tmp_path / "run")
    summary = __import__("json").loads((run / "summary.json").read_text())
    assert summary["training"]["run"]["precision"] == "bf16-mixed"
    assert summary["training"]["train_groups"]["hannover/normal"] == 2
    assert "train_adv_loss" in summary["final_metrics"] and "train_dro_max_weight" in summary["final_metrics"]
    lm = models.load(run / "best.ckpt")
    assert lm.preset.hist_template == NIH_CXR14_TEMPLATE  # inference standardises as training did
    raw = torch.load(run / "best.ckpt", map_location="cpu", weights_only=False)
    assert not any("adversary" in k or k.startswith("dro") for k in raw["state_dict"])
    weights = raw["training"]["group_dro_weights"]
    assert abs(sum(weights.values()) - 1) < 1e-4 and weights["hannover/pneumonia"] == 0
    # the resumable last.ckpt keeps the adversary and the DRO weights
    last = torch.load(run / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert any(k.startswith("adversary.") for k in last) and "dro.q" in last
    with torch.no_grad():
        out = lm.model(lm.preset(cv2.imread(str(pd.read_csv(synth)["path"][0]), 0) / 255.0).unsqueeze(0))
    assert out.shape == (1, 3) and torch.isfinite(out).all()
