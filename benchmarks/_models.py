"""The stand-in model the speed benchmarks share: ResNet-18 with random weights, seed 0, in a checkpoint.

Speed and memory do not depend on what the weights learned, so no training and no shared weights
are needed; the checkpoint says so in its run name.
"""

from __future__ import annotations

from pathlib import Path


def random_resnet18(workdir: Path) -> Path:
    """Write ``workdir/resnet18-random.ckpt`` (3 classes, deepcovid preset, threshold 0.5); return its path."""
    import torch

    from covidcxr import models
    from covidcxr.preprocess import get_preset

    torch.manual_seed(0)
    ckpt = Path(workdir) / "resnet18-random.ckpt"
    models.save(ckpt, models.build("resnet18", num_classes=3), arch="resnet18",
                classes=["normal", "pneumonia", "COVID-19"], preset=get_preset("deepcovid"), threshold=0.5,
                training={"run_name": "resnet18-random-weights"})
    return ckpt
