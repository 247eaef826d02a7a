"""Training: recipes, overrides, seed determinism, DDP on CPU (gloo), kill-and-resume, checkpoints.

Real images from the shared dev set at 64 px and a few steps keep every fit to seconds.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from covidcxr.train import ConfigError, load_config
from covidcxr.train.config import apply_overrides

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(glob.glob(str(REPO / "configs" / "*.yaml")))
CLI = str(Path(sys.executable).with_name("covidcxr"))
FAST = [
    "model.weights=none", "data.size=64", "data.batch_size=4", "data.num_workers=0", "trainer.accelerator=cpu",
    "trainer.devices=1", "trainer.progress_bar=false", "trainer.num_threads=1", "trainer.log_every_n_steps=1",
    "early_stopping.monitor=null",
]


@pytest.fixture(scope="module")
def small_manifest(dev_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A patient-level subset of the dev split (train 24 patients, val/test 10 each), every class kept."""
    df = pd.read_csv(dev_manifest)
    base = dev_manifest.parent
    df["path"] = [p if os.path.isabs(p) else str((base / p).resolve()) for p in df["path"]]
    if "mask_path" in df.columns:
        df["mask_path"] = [p if not isinstance(p, str) or os.path.isabs(p) else str((base / p).resolve())
                           for p in df["mask_path"]]
    parts = []
    for split, n in (("train", 8), ("val", 4), ("test", 4)):
        sub = df[df["split"] == split]
        pats = sub.groupby("label")["patient_id"].apply(lambda s: list(dict.fromkeys(s))[:n])
        keep = {p for ps in pats for p in ps}
        parts.append(sub[sub["patient_id"].isin(keep)])
    out = tmp_path_factory.mktemp("small") / "manifest.csv"
    pd.concat(parts).to_csv(out, index=False)
    return out


def _fit(manifest: Path, out: Path, recipe: str = "deepcovid-resnet18.yaml", extra: list[str] = ()) -> Path:
    from covidcxr.train import fit

    cfg = load_config(REPO / "configs" / recipe, [*FAST, *extra])
    return fit(cfg, data=manifest, out=out)


def _epoch_losses(run: Path) -> list[float]:
    m = pd.read_csv(sorted((run / "logs").glob("version_*/metrics.csv"))[-1])
    return m["train_loss_epoch"].dropna().tolist()


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: Path(p).stem)
def test_recipe_builds_and_steps(recipe: str) -> None:
    """Every recipe validates, builds its model (from scratch) and does one optimiser step at 64 px."""
    from covidcxr.preprocess import get_preset
    from covidcxr.train import CXRClassifier
    from covidcxr.train.runner import _default_preset

    cfg = load_config(recipe, ["model.weights=none"])
    assert cfg["recipe"], "a recipe names its paper"
    preset = get_preset(cfg["data"]["preset"] or _default_preset(cfg), size=64)
    torch.manual_seed(0)
    module = CXRClassifier(cfg, ["normal", "pneumonia", "COVID-19"], preset)
    opt = module.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    batch = {"image": torch.rand(2, preset.channels, 64, 64), "label": torch.tensor([0, 2])}
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    module.train()
    loss = module._loss(module(batch["image"]), batch["label"])
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    # the step trains what the recipe trains and nothing else: every optimised parameter with a gradient
    # moved, every parameter the recipe leaves out (frozen, or outside the optimiser) stayed bit-identical
    # (a tiny lr x gradient can round away on a weight of 1.0, so each optimiser group must move, and most
    # of its parameters with a gradient, rather than every single one)
    named = dict(module.named_parameters())
    ids = {id(p): n for n, p in named.items()}
    frozen = [n for n, p in named.items() if id(p) not in in_opt or not p.requires_grad]
    n_groups = 0
    for g in opt.param_groups:
        with_grad = [ids[id(p)] for p in g["params"] if p.grad is not None and p.grad.abs().sum() > 0]
        if not with_grad or g["lr"] == 0:
            continue
        n_groups += 1
        moved = [n for n in with_grad if not torch.equal(named[n].detach(), before[n])]
        assert len(moved) >= 0.5 * len(with_grad), f"optimised but unmoved: {sorted(set(with_grad) - set(moved))[:5]}"
    assert n_groups, "no optimiser group with a learning rate got a gradient"
    changed = [n for n in frozen if not torch.equal(named[n].detach(), before[n])]
    assert not changed, f"frozen but moved: {changed[:5]}"


def test_recipes_state_the_paper_settings() -> None:
    c = load_config(REPO / "configs" / "covidnet.yaml")
    # the full side-by-side pins are in tests/test_recipes.py (docs/recipes.md)
    assert (c["optimizer"]["name"], c["optimizer"]["lr"], c["data"]["batch_size"]) == ("adam", 2e-4, 64)
    assert (c["data"]["sampler"], c["data"]["minority_label"], c["data"]["augment"]) == ("rebalance", "COVID-19", "covidnet")
    assert (c["scheduler"]["name"], c["scheduler"]["factor"], c["scheduler"]["patience"]) == ("plateau", 0.7, 5)
    d = load_config(REPO / "configs" / "deepcovid-resnet18.yaml")
    assert (d["optimizer"]["name"], d["optimizer"]["lr"], d["optimizer"]["momentum"]) == ("sgd", 1e-4, 0.9)
    assert (d["scheduler"]["step_size"], d["scheduler"]["gamma"], d["model"]["weights"]) == (7, 0.1, "imagenet")
    assert (d["data"]["task"], d["model"]["freeze_backbone"]) == ("binary", True)
    x = load_config(REPO / "configs" / "cxnet.yaml")
    assert (x["optimizer"]["lr"], x["loss"]["label_smoothing"], x["data"]["batch_size"]) == (1e-3, 0.1, 16)
    assert x["loss"]["class_weights"] == "balanced" and x["data"]["preset"] == "cxnet"
    # Bassi & Attux: the twice-transfer recipe is the real chain (ImageNet -> ChestX-ray14 findings -> COVID);
    # torchxrayvision's NIH DenseNet (random init) is labelled ChestX-ray14 -> COVID, not twice transfer
    b = load_config(REPO / "configs" / "bassi-twice-transfer.yaml")
    assert b["model"]["weights"] == "imagenet" and b["stages"][0]["overrides"]["data.task"] == "findings"
    xrv = load_config(REPO / "configs" / "bassi-chestxray14-xrv.yaml")
    assert xrv["model"]["weights"] == "xrv-nih" and "ChestX-ray14 -> COVID" in xrv["recipe"]
    assert "ImageNet" not in xrv["recipe"]


def test_overrides_and_errors(tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs" / "deepcovid-resnet18.yaml",
                      ["optimizer.lr=1e-3", "trainer.devices=2", "data.sampler=none", "model.kwargs.dropout=0.1"])
    assert cfg["optimizer"]["lr"] == 1e-3 and cfg["trainer"]["devices"] == 2 and cfg["data"]["sampler"] is None
    assert cfg["model"]["kwargs"] == {"dropout": 0.1}
    with pytest.raises(ConfigError, match="unknown key 'optimizer.lrr'"):
        apply_overrides(cfg, ["optimizer.lrr=1"])
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        apply_overrides(cfg, ["optimizer.lr"])
    with pytest.raises(ConfigError, match="optimizer.name"):
        load_config(None, ["optimizer.name=rmsprop"])
    with pytest.raises(ConfigError, match="early_stopping.monitor"):
        load_config(None, ["early_stopping.monitor=val_auc"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimiser:\n  lr: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'optimiser'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_cli_errors_are_one_line(tmp_path: Path, small_manifest: Path, capsys: pytest.CaptureFixture) -> None:
    from covidcxr.cli import main

    no_val = tmp_path / "noval.csv"
    df = pd.read_csv(small_manifest)
    df[df["split"] != "val"].to_csv(no_val, index=False)
    dev, data = "configs/dev-resnet18.yaml", str(small_manifest)
    malformed = tmp_path / "malformed.yaml"
    malformed.write_text("model: [unclosed\n")  # PyYAML's own message spans three lines
    cases = [
        (["--config", str(tmp_path / "nope.yaml"), "--data", data], "config file not found"),
        (["--config", dev, "--data", data, "--set", "trainer.max_epoch=2"], "unknown key"),
        (["--config", dev, "--data", str(no_val)], "no 'val' rows"),
        (["--config", dev, "--data", data, "--resume"], "nothing to resume"),
        (["--config", dev, "--data", str(tmp_path / "none.csv")], "manifest not found"),
        (["--config", str(malformed), "--data", data], "malformed.yaml: not valid YAML (expected ',' or ']'"),
        (["--config", dev, "--data", data, "--set", "optimizer.lr=[1"], "value is not valid YAML"),
    ]
    for args, msg in cases:
        rc = main(["train", "--out", str(tmp_path / "run"), *args])
        err = capsys.readouterr().err.strip()
        assert rc == 1 and msg in err, err
        assert err.startswith("covidcxr train: error:") and "\n" not in err, err


def test_resume_from_truncated_last_ckpt_is_one_line(tmp_path: Path, small_manifest: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    """A half-written or foreign last.ckpt must not end in Lightning's miniz traceback."""
    from covidcxr.cli import main

    run = tmp_path / "run"
    run.mkdir()
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, run / "full.ckpt")
    (run / "last.ckpt").write_bytes((run / "full.ckpt").read_bytes()[:500])  # killed mid-copy
    rc = main(["train", "--config", "configs/dev-resnet18.yaml", "--data", str(small_manifest),
               "--out", str(run), "--resume"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "last.ckpt: cannot resume, not a complete checkpoint" in err, err
    assert "\n" not in err, err


# --------------------------------------------------------------------------- fitting


@pytest.fixture(scope="module")
def trained(small_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One short COVID-Net-recipe run (re-balancing sampler, plateau schedule), reused below."""
    out = tmp_path_factory.mktemp("run") / "covidnet"
    return _fit(small_manifest, out, "covidnet.yaml",
                ["model.arch=covidnet-cxr-small", "trainer.max_epochs=2", "trainer.limit_train_batches=2"])


def test_fit_writes_self_contained_checkpoints(trained: Path, small_manifest: Path) -> None:
    from covidcxr.models import load

    for name in ("best.ckpt", "last.ckpt", "config.yaml", "summary.json"):
        assert (trained / name).is_file(), name
    assert not list(trained.glob(".*.tmp")), "no temporary checkpoint files left behind"
    lm = load(trained / "best.ckpt")
    assert lm.arch == "covidnet-cxr-small" and lm.classes == ["normal", "pneumonia", "COVID-19"]
    assert lm.preset.name == "covidnet@64" and lm.preset.size == 64
    t = lm.training
    import hashlib

    assert t["manifest_sha256"] == hashlib.sha256(small_manifest.read_bytes()).hexdigest()
    assert set(t["splits"]) == {"train", "val", "test"} and t["splits"]["val"]["n_patients"] > 0
    assert t["seed"] == 0 and t["recipe"] == "covidnet" and t["config"]["data"]["sampler"] == "rebalance"
    assert "val_loss" in lm.metrics["val"] and "val_auc_covid" in lm.metrics["val"]
    # what the project writes loads without unpickling code (issue 21 §2.11): weights_only=True
    raw = torch.load(trained / "last.ckpt", map_location="cpu", weights_only=True)
    best = torch.load(trained / "best.ckpt", map_location="cpu", weights_only=True)
    assert best.get("covidcxr", best)["arch"] == "covidnet-cxr-small"
    assert raw["global_step"] == 4 and raw["covidcxr"]["training"]["global_step"] == 4
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["global_step"] == 4 and summary["epochs"] == 2
    x = lm.preset(torch.rand(100, 90).numpy()).unsqueeze(0)
    assert lm.model(x).shape == (1, 3)


def test_seed_gives_same_split_and_first_epoch_loss(small_manifest: Path, dev_dir: Path, tmp_path: Path) -> None:
    from covidcxr.data import build_manifest

    for d in ("a", "b"):
        build_manifest(sources=[("csv", str(dev_dir / "metadata.csv"))], out=tmp_path / d, seed=62)
    split = lambda d: pd.read_csv(tmp_path / d / "manifest.csv").set_index("path")["split"].sort_index()  # noqa: E731
    pd.testing.assert_series_equal(split("a"), split("b"))

    extra = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]
    runs = [_fit(small_manifest, tmp_path / f"r{i}", extra=[*extra, f"seed={s}"]) for i, s in enumerate((3, 3, 4))]
    l0, l1, l2 = (_epoch_losses(r)[0] for r in runs)
    assert l0 == pytest.approx(l1, rel=1e-6, abs=1e-7)
    assert l0 != pytest.approx(l2, rel=1e-6, abs=1e-7)


@pytest.mark.slow
def test_ddp_two_processes_on_cpu(small_manifest: Path, tmp_path: Path) -> None:
    """A 2-process DDP fit (gloo): the ranks train on different samples and the checkpoint loads."""
    from covidcxr.predict import Predictor

    run = tmp_path / "ddp"
    cmd = [CLI, "train", "--config", "configs/deepcovid-resnet18.yaml", "--data", str(small_manifest), "--out",
           str(run), "--weights", "none", "--max-epochs", "1", "--size", "64", "--batch-size", "4",
           "--accelerator", "cpu", "--devices", "2", "--set", "trainer.strategy=ddp",
           "--set", "trainer.limit_train_batches=3", "--set", "trainer.limit_val_batches=2",
           "--set", "trainer.num_threads=1", "--set", "trainer.progress_bar=false",
           "--set", "debug.record_samples=true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("best checkpoint:") == 1, "only rank 0 reports"
    seen = {}
    for r in (0, 1):
        lines = (run / "samples" / f"rank{r}.txt").read_text().split("\n")
        seen[r] = [int(i) for ln in lines if ln for i in ln.split()[2].split(",")]
    assert len(seen[0]) == len(seen[1]) == 12  # 3 steps x batch 4 on each rank
    assert not set(seen[0]) & set(seen[1]), "ranks must see different samples"
    p = Predictor.from_path(run / "best.ckpt")
    assert p.training["run"]["world_size"] == 2
    out = p.predict_arrays([torch.rand(80, 80).numpy()])
    assert abs(sum(out[0]["probabilities"].values()) - 1) < 1e-6


# `covidcxr train ...` that kills itself (SIGKILL, no clean-up) right after writing its first step checkpoint
KILLED_AFTER_FIRST_STEP_CHECKPOINT = """
import os, signal, sys
from covidcxr.train import runner
save = runner.AtomicCheckpointIO.save_checkpoint
def save_then_die(self, checkpoint, path, storage_options=None):
    save(self, checkpoint, path, storage_options)
    if os.path.basename(str(path)) == "last.ckpt" and checkpoint.get("global_step") == 3:
        os.kill(os.getpid(), signal.SIGKILL)
runner.AtomicCheckpointIO.save_checkpoint = save_then_die
from covidcxr.cli import main
sys.exit(main())
"""


@pytest.mark.slow
def test_killed_run_resumes_to_same_step_count(small_manifest: Path, tmp_path: Path) -> None:
    """SIGKILL mid-epoch once a step checkpoint exists; --resume finishes with the planned step count."""
    run = tmp_path / "resume"
    base = [CLI, "train", "--config", "configs/deepcovid-resnet18.yaml", "--data", str(small_manifest), "--out",
            str(run), "--weights", "none", "--max-epochs", "2", "--size", "64", "--batch-size", "2",
            "--accelerator", "cpu", "--set", "trainer.limit_train_batches=8", "--set", "trainer.limit_val_batches=1",
            "--set", "checkpoint.every_n_train_steps=3", "--set", "trainer.num_threads=1",
            "--set", "trainer.progress_bar=false", "--set", "early_stopping.monitor=null"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # The run SIGKILLs itself as soon as the first step checkpoint is on disk: the kill comes at that point
    # on any machine (a watcher that polled for last.ckpt could be late on a loaded one, past step 6).
    log = tmp_path / "killed-run.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", KILLED_AFTER_FIRST_STEP_CHECKPOINT, *base[1:]], cwd=REPO,
                                env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            proc.wait(timeout=300)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the run itself, if still there, and anything it started
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-2000:]
    killed = torch.load(run / "last.ckpt", map_location="cpu", weights_only=False)
    assert killed["global_step"] == 3, "killed right after the first mid-epoch checkpoint (step 3 of 8)"
    assert not (run / "summary.json").exists(), "the first run did not finish"
    done = subprocess.run([*base, "--resume"], capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    final = json.loads((run / "summary.json").read_text())
    assert final["global_step"] == 16 and final["epochs"] == 2
    assert final["training"]["run"]["resumed"] is True
    assert torch.load(run / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 16


def test_gpu_options_on_cpu(small_manifest: Path, tmp_path: Path) -> None:
    """bf16 mixed precision and channels_last run (here on the CPU); compile keeps checkpoint keys plain."""
    from covidcxr.models import load
    from covidcxr.preprocess import get_preset
    from covidcxr.train import CXRClassifier

    run = _fit(small_manifest, tmp_path / "bf16", extra=[
        "trainer.precision=bf16-mixed", "trainer.channels_last=true", "trainer.max_epochs=1",
        "trainer.limit_train_batches=1", "trainer.limit_val_batches=1"])
    lm = load(run / "last.ckpt")
    assert lm.training["run"]["precision"] == "bf16-mixed"
    assert all(t.dtype == torch.float32 for t in lm.model.state_dict().values() if t.is_floating_point())

    cfg = load_config(REPO / "configs" / "deepcovid-resnet18.yaml", ["model.weights=none", "trainer.compile=true"])
    module = CXRClassifier(cfg, ["normal", "pneumonia", "COVID-19"], get_preset("deepcovid", size=64))
    module.configure_model()
    assert module._compiled is not None
    assert not any("_orig_mod" in k for k in module.state_dict())
    assert set(module.bundle()["state_dict"]) == set(module.model.state_dict())


def test_resume_changes_name_changed_keys_but_not_length_or_hardware() -> None:
    """--resume with another --size or model used to mix two runs without a word."""
    from covidcxr.train.runner import resume_changes

    old = load_config("configs/dev-resnet18.yaml")
    assert resume_changes(old, load_config("configs/dev-resnet18.yaml",
                                           ["trainer.max_epochs=99", "trainer.accelerator=gpu"])) == []
    new = load_config("configs/dev-resnet18.yaml", ["optimizer.lr=0.5"])
    changed = resume_changes(old, new)
    assert len(changed) == 1 and changed[0].startswith("optimizer.lr:") and "0.5" in changed[0]
