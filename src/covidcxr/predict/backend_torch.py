"""PyTorch eager backend: a checkpoint's module behind ``logits(batch)``. Imported only for ``backend="torch"``."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class TorchBackend:
    name = "torch"

    def __init__(self, model: torch.nn.Module, device: str):
        self.model = model.eval().to(device)
        self.device = torch.device(device)

    def logits(self, batch: Any) -> np.ndarray:
        """N x C x H x W (NumPy array or tensor) -> N x classes float32 logits."""
        x = torch.as_tensor(np.asarray(batch, dtype=np.float32) if isinstance(batch, np.ndarray) else batch,
                            dtype=torch.float32).to(self.device)
        with torch.inference_mode():
            out = self.model(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.float().cpu().numpy()


def set_threads(n: int | None) -> None:
    """Intra-op threads for eager inference (the CLI's --threads)."""
    if n:
        torch.set_num_threads(int(n))
