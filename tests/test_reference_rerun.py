"""scripts/reference_rerun.py: the shipped run's settings, and figures set beside the shipped card's."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("reference_rerun", REPO / "scripts" / "reference_rerun.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_both_ci_shapes_are_compared_and_figures_without_a_ci_are_left_out() -> None:
    rr = _script()
    shipped = {"test": {"covid_auc": {"value": 0.90, "ci_low": 0.85, "ci_high": 0.95}, "ece_after": 0.07},
               "sev": {"metrics": {"mae": {"value": 1.2, "ci95": [1.0, 1.5]}}},
               "only_shipped": {"value": 0.5, "ci_low": 0.4, "ci_high": 0.6}}
    rerun = {"test": {"covid_auc": {"value": 0.80, "ci_low": 0.70, "ci_high": 0.88}, "ece_after": 0.05},
             "sev": {"metrics": {"mae": {"value": 1.3, "ci95": [1.1, 1.6]}}}}
    rows = {r["figure"]: r for r in rr.compare(shipped, rerun)}
    assert set(rows) == {"test.covid_auc", "sev.metrics.mae"}
    auc = rows["test.covid_auc"]
    assert abs(auc["difference"] + 0.10) < 1e-12
    assert auc["rerun_in_shipped_ci"] is False and auc["shipped_in_rerun_ci"] is False
    mae = rows["sev.metrics.mae"]
    assert mae["rerun_in_shipped_ci"] is True and mae["shipped_in_rerun_ci"] is True


def test_a_run_stopped_by_hand_is_repeated_with_the_steps_it_reached() -> None:
    rr = _script()
    t = {"recipe_file": "configs/x.yaml", "seed": 3, "global_step": 56,
         "stopped": "training stopped after epoch 1 (counted from 0) of max_epochs 3",
         "config": {"trainer": {"max_epochs": 3, "max_steps": -1, "num_threads": 2}, "data": {"size": 224}}}
    assert rr.settings_of(t) == {"RECIPE": "configs/x.yaml", "SEED": 3, "EPOCHS": 3, "SIZE": 224, "THREADS": 2,
                                 "MAX_STEPS": 56, "QAT": 0}
    t["qat"] = {"epochs": 3, "lr": 2e-5, "fp32_convs": 4}  # quantization-aware fine-tuning is repeated as it ran
    assert {k: rr.settings_of(t)[k] for k in ("QAT", "QAT_EPOCHS", "QAT_LR", "QAT_KEEP_FP32")} == {
        "QAT": 1, "QAT_EPOCHS": 3, "QAT_LR": 2e-5, "QAT_KEEP_FP32": 4}
    t["config"]["trainer"]["max_steps"] = 20  # an explicit limit wins over the step reached
    assert rr.settings_of(t)["MAX_STEPS"] == 20
    del t["stopped"]
    t["config"]["trainer"]["max_steps"] = -1
    assert "MAX_STEPS" not in rr.settings_of(t)


def test_shipped_settings_are_shell_assignments_read_from_the_shipped_checkpoint() -> None:
    from covidcxr.reference_models import CLASSIFIER, metadata

    r = subprocess.run([sys.executable, str(REPO / "scripts" / "reference_rerun.py"), "--shipped-settings"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = dict(line.split("=", 1) for line in r.stdout.split())
    t = metadata(CLASSIFIER)["training"]
    assert got["RECIPE"] == t["recipe_file"] and got["SEED"] == str(t["seed"])
    assert got["SIZE"] == str(t["config"]["data"]["size"]) and got["EPOCHS"] == str(t["config"]["trainer"]["max_epochs"])


def test_another_recipe_or_batch_limits_are_never_called_the_same() -> None:
    rr = _script()
    shipped = {"recipe": "transfer-mobilenet_v2",
               "config": {"data": {"size": 224, "cache_dir": "a/cache", "sampler": None},
                          "trainer": {"max_steps": -1, "limit_train_batches": None}}}
    same = {"recipe": "transfer-mobilenet_v2",
            "config": {"data": {"size": 224, "cache_dir": "b/cache", "sampler": None},
                       "trainer": {"max_steps": 56, "limit_train_batches": None}}}
    assert rr.config_differences(shipped, same) == {}  # where the cache went and the stop are not the recipe
    other = {"recipe": "robust-mobilenet_v2",
             "config": {"data": {"size": 224, "cache_dir": "b/cache", "sampler": "group_balanced"},
                        "trainer": {"max_steps": 56, "limit_train_batches": 2}}}
    assert rr.config_differences(shipped, other) == {"data.sampler": "group_balanced",
                                                     "trainer.limit_train_batches": 2,
                                                     "recipe": "robust-mobilenet_v2"}
