"""CXRDataset, the prepared-image cache, samplers and the Lightning DataModule."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import covidcxr.data.dataset as dsmod
from covidcxr.data import (
    CXRDataModule,
    CXRDataset,
    ManifestError,
    RebalancingSampler,
    WeightedSampler,
    build_manifest,
    class_weights,
    rebalancing_sampler,
)
from covidcxr.io import CXRReadError
from covidcxr.preprocess import Augment
from test_data_factories import make_manifest_set

PRESET = "covidnet@64"


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dsgen")
    csv = make_manifest_set(root / "src", n_patients=30, images_per_patient=2)
    build_manifest([("csv", str(csv))], root / "out", seed=0, near_duplicates=False)
    return root / "out" / "manifest.csv"


@pytest.fixture()
def frame(manifest) -> pd.DataFrame:
    from covidcxr.data import read_manifest

    return read_manifest(manifest)


def test_item_contract(frame):
    ds = CXRDataset(frame, PRESET)
    item = ds[3]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert item["label"] == ["normal", "pneumonia", "COVID-19"].index(frame["label"].iloc[3])
    assert item["index"] == 3
    assert item["scores"].shape == (2,) and item["scores"].dtype == torch.float32
    scored = frame["geographic_extent"].notna().to_numpy()
    i, j = int(np.argmax(scored)), int(np.argmin(scored))
    assert torch.isfinite(ds[i]["scores"]).all() and float(ds[i]["scores"][0]) == frame["geographic_extent"].iloc[i]
    assert torch.isnan(ds[j]["scores"]).all()
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 64, 64) and batch["label"].shape == (2,)


def test_unlabelled_and_unknown_labels(frame):
    f = frame.copy()
    f.loc[0, "label"] = np.nan
    assert CXRDataset(f, PRESET)[0]["label"] == -1
    f.loc[1, "label"] = "tuberculosis"
    with pytest.raises(ManifestError, match="tuberculosis"):
        CXRDataset(f, PRESET)
    binary = CXRDataset(frame, PRESET, classes={"normal": 0, "pneumonia": 0, "COVID-19": 1})
    assert set(binary.labels) == {0, 1}


def test_cache_hit_path_skips_decoding(frame, tmp_path, monkeypatch):
    plain = CXRDataset(frame, PRESET)
    cached = CXRDataset(frame, PRESET, cache_dir=tmp_path / "cache")
    first = cached[5]["image"]
    assert cached.cache.misses == 1 and cached.cache.hits == 0
    assert list((tmp_path / "cache").rglob("*.f32"))
    # exact: training through the cache sees the inputs that evaluate and predict see
    assert torch.equal(first, plain[5]["image"])

    def no_decode(path):
        raise AssertionError(f"decoded {path} although it is cached")

    monkeypatch.setattr(dsmod, "read_image", no_decode)
    again = CXRDataset(frame, PRESET, cache_dir=tmp_path / "cache")
    torch.testing.assert_close(again[5]["image"], first)
    assert again.cache.hits == 1
    # another preset is another cache entry: it must decode
    with pytest.raises(AssertionError, match="decoded"):
        CXRDataset(frame, "covidnet@96", cache_dir=tmp_path / "cache")[5]
    monkeypatch.undo()
    # a modified file invalidates its entry
    p = frame["path"].iloc[5]
    st = os.stat(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    fresh = CXRDataset(frame, PRESET, cache_dir=tmp_path / "cache")
    fresh[5]
    assert fresh.cache.misses == 1


def test_bad_file_raises_naming_it_and_check_drops_it(frame, tmp_path):
    f = frame.copy()
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    f.loc[2, "path"] = str(bad)
    f.loc[4, "path"] = str(tmp_path / "gone.png")
    ds = CXRDataset(f, PRESET, cache_dir=tmp_path / "c")
    with pytest.raises(CXRReadError, match="broken.png"):
        ds[2]
    with pytest.raises(CXRReadError, match="gone.png: file not found"):
        ds[4]
    with pytest.raises(CXRReadError):
        CXRDataset(f, PRESET).check(skip_bad=False)
    errors = ds.check()
    assert [Path(e.path).name for e in errors] == ["broken.png", "gone.png"]
    assert len(ds) == len(f) - 2 and str(bad) not in ds.paths
    ds[2]  # the rows shifted; everything left reads


def test_augment_varies_with_epoch(frame):
    ds = CXRDataset(frame, PRESET, augment=Augment(seed=1))
    a, b = ds[0]["image"], ds[0]["image"]
    torch.testing.assert_close(a, b)
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["image"], a)


# --------------------------------------------------------------------------- samplers


def test_class_weights_balanced():
    w = class_weights([0, 0, 0, 1, 2, 2, -1])
    np.testing.assert_allclose(w.numpy(), [6 / 9, 2.0, 1.0], rtol=1e-6)
    assert class_weights([0, 0, 2], num_classes=3)[1] == 0


def test_rebalancing_sampler_fraction():
    labels = np.array([2] * 10 + [0] * 60 + [1] * 30)  # class 2 is the minority
    s = rebalancing_sampler(labels, batch_size=8, minority_fraction=0.25, seed=0)
    assert s.minority_class == 2
    idx = np.array(list(s))
    assert len(idx) == len(s) and len(idx) % 8 == 0
    per_batch = (labels[idx].reshape(-1, 8) == 2).sum(1)
    assert (per_batch == 2).all()
    assert set(idx[labels[idx] != 2]) == set(np.nonzero(labels != 2)[0])  # every majority image seen
    s.set_epoch(1)
    assert list(s) != idx.tolist()
    assert list(rebalancing_sampler(labels, 8, 0.25, seed=0)) == idx.tolist()  # deterministic


def test_rebalancing_sampler_ddp_shards():
    labels = np.array([1] * 12 + [0] * 50)
    ranks = [RebalancingSampler(labels, 4, 0.5, seed=3, num_replicas=2, rank=r) for r in (0, 1)]
    a, b = (np.array(list(s)) for s in ranks)
    assert len(a) == len(b)
    assert not np.array_equal(a, b)
    for idx in (a, b):
        assert ((labels[idx].reshape(-1, 4) == 1).sum(1) == 2).all()
    seen = set(a[labels[a] == 0]) | set(b[labels[b] == 0])
    assert seen == set(np.nonzero(labels == 0)[0])


def test_weighted_sampler_balances():
    labels = np.array([0] * 90 + [1] * 10)
    idx = np.array(list(WeightedSampler(labels, seed=0, num_samples=4000)))
    assert 0.4 < (labels[idx] == 1).mean() < 0.6


# --------------------------------------------------------------------------- DataModule


def test_datamodule_loaders(manifest, tmp_path):
    dm = CXRDataModule(manifest, PRESET, batch_size=4, sampler="rebalance", minority_fraction=0.5,
                       cache_dir=tmp_path / "c", augment="covidnet", seed=1)
    dm.setup("fit")
    train = dm.dataset("train")
    minority = dm.train_sampler().minority_class
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 64, 64)
    assert int((batch["label"] == minority).sum()) == 2
    assert dm.dataset("val").augment is None and train.augment is not None
    assert len(dm.class_weights()) == 3 and dm.num_classes == 3
    assert sum(len(b["label"]) for b in dm.test_dataloader()) == len(dm.dataset("test"))
    forced = CXRDataModule(manifest, PRESET, batch_size=4, sampler="rebalance", minority_label="COVID-19")
    assert forced.train_sampler().minority_class == 2
    with pytest.raises(ManifestError, match="minority_label 'covid'"):
        CXRDataModule(manifest, PRESET, sampler="rebalance", minority_label="covid").train_sampler()
    # label_filter keeps the chosen labels only
    dm2 = CXRDataModule(manifest, PRESET, label_filter=["COVID-19", "normal"])
    dm2.setup()
    assert set(dm2.dataset("train").frame["label"]) == {"COVID-19", "normal"}


def test_datamodule_takes_a_config(manifest, tmp_path):
    """DataConfig (what `covidcxr train` builds) and keyword overrides of it; a misspelt setting is a TypeError."""
    from covidcxr.data import DataConfig

    config = DataConfig(batch_size=4, sampler="rebalance", minority_label="COVID-19", seed=1)
    dm = CXRDataModule(manifest, PRESET, config)
    assert dm.batch_size == 4 and dm.train_sampler().minority_class == 2 and dm.config is config
    other = CXRDataModule(manifest, PRESET, config, batch_size=2, label_filter=["COVID-19", "normal"])
    other.setup()
    assert other.batch_size == 2 and set(other.dataset("train").frame["label"]) == {"COVID-19", "normal"}
    assert next(iter(other.train_dataloader()))["image"].shape[0] == 2
    with pytest.raises(TypeError, match="batchsize"):
        CXRDataModule(manifest, PRESET, batchsize=4)


def test_datamodule_workers(manifest):
    dm = CXRDataModule(manifest, PRESET, batch_size=8, num_workers=2)
    n = sum(len(b["index"]) for b in dm.val_dataloader())
    assert n == len(dm.dataset("val"))


def test_datamodule_under_lightning_keeps_sampler_and_sets_epoch(manifest, tmp_path):
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)
            self.epochs_seen = []

        def training_step(self, batch, _):
            sampler = self.trainer.train_dataloader.sampler
            self.epochs_seen.append((self.current_epoch, sampler.epoch, type(sampler).__name__))
            return torch.nn.functional.cross_entropy(self.lin(batch["image"].mean((2, 3))), batch["label"])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = CXRDataModule(manifest, PRESET, batch_size=8, sampler="rebalance")
    model = Tiny()
    trainer = L.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=0, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    assert [e[:2] for e in model.epochs_seen] == [(0, 0), (0, 0), (1, 1), (1, 1)]
    assert model.epochs_seen[0][2] == "RebalancingSampler"
    assert dm.dataset("train").epoch == 1



def _ddp_module(out_dir: str):
    import lightning as L

    class RankTiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)
            self.seen: list = []

        def training_step(self, batch, _):
            s = self.trainer.train_dataloader.sampler
            self.seen.append({"rank": s.rank, "world": s.num_replicas, "sampler": type(s).__name__,
                              "index": batch["index"].tolist(), "label": batch["label"].tolist()})
            return torch.nn.functional.cross_entropy(self.lin(batch["image"].mean((2, 3))), batch["label"])

        def on_train_end(self):
            import json

            Path(out_dir, f"rank{self.global_rank}.json").write_text(json.dumps(self.seen))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return RankTiny


def test_datamodule_under_ddp_two_ranks_see_different_balanced_batches(manifest, tmp_path):
    """Two CPU ranks (gloo, fork): each keeps the re-balancing sampler, with its own shard."""
    import json

    import lightning as L

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed not available")
    model = _ddp_module(str(tmp_path))()
    dm = CXRDataModule(manifest, PRESET, batch_size=4, sampler="rebalance", minority_fraction=0.5)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=0, accelerator="cpu", devices=2,
                        strategy="ddp_fork", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    idx = [sorted(i for step in steps for i in step["index"]) for steps in ranks]
    assert all(step["sampler"] == "RebalancingSampler" and step["world"] == 2 for steps in ranks for step in steps)
    assert [steps[0]["rank"] for steps in ranks] == [0, 1]
    assert idx[0] != idx[1]
    minority = RebalancingSampler(dm.dataset("train").labels, 4).minority_class
    for steps in ranks:
        for step in steps:
            assert sum(lab == minority for lab in step["label"]) == 2
