"""Issue 11 §8: long steps show progress; a fresh training run prints each line once, without noise."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


def test_severity_trainer_shows_progress() -> None:
    pytest.importorskip("lightning")
    from covidcxr.severity.train import make_trainer

    assert make_trainer(1).progress_bar_callback is not None  # was enable_progress_bar=False: 40-60 s of silence
    assert make_trainer(1, progress=False).progress_bar_callback is None


def test_fresh_training_run_prints_each_line_once_without_noise(tmp_path: Path) -> None:
    import cv2

    rng = np.random.default_rng(0)
    rows = []
    for i in range(18):
        p = tmp_path / f"i{i}.png"
        cv2.imwrite(str(p), (rng.random((96, 80)) * 255).astype(np.uint8))
        split = ["train", "train", "val", "test"][i % 4] if i < 16 else "val"
        rows.append({"patient_id": f"p{i}", "path": str(p), "label": ["normal", "pneumonia", "COVID-19"][i % 3],
                     "source": "synthetic", "split": split})
    manifest = tmp_path / "m.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    cmd = [sys.executable, "-c", "import sys; from covidcxr.cli import main; sys.exit(main())", "train",
           "--config", str(REPO / "configs" / "dev-resnet18.yaml"), "--data", str(manifest), "--out",
           str(tmp_path / "run"), "--weights", "none", "--set", "data.size=64", "--set", "data.batch_size=4",
           "--set", "trainer.max_epochs=1", "--set", "trainer.num_threads=1", "--set", "trainer.progress_bar=false",
           "--set", "data.num_workers=0"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    for noise in ("Tip:", "LeafSpec", "exists and is not empty", "GPU available"):
        assert not any(noise in ln for ln in lines), [ln for ln in lines if noise in ln]
    info = [ln.split(": ", 1)[-1] for ln in lines if ln.startswith("INFO")]
    twice = [m for m, n in Counter(info).items() if n > 1]
    assert not twice, twice  # each INFO line once (Lightning's own handler printed them a second time)
