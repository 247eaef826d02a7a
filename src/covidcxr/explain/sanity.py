"""Model-parameter randomisation test (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018).

Cascading randomisation: starting at the classifier and moving towards the input, the
weights of one block after another are re-initialised (cumulatively). After each step the
heatmaps are recomputed for the same images and target classes and compared with the
original ones by Spearman rank correlation of the absolute maps (as in the paper). A method
that explains the model should lose its structure once the weights are random. A method is
**flagged** when its maps stay correlated (mean rho >= ``threshold``) after the whole network
is randomised (it shows the input, not what the model learned), or through at least half of
the cascade steps (it barely reacts to most of the network's weights, typically the upper
layers that carry the class evidence).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

from covidcxr.explain.methods import Context, Method, explain


@dataclass
class SanityResult:
    method: str
    layers: list[str]
    #: mean Spearman rho (|map|) between original and randomised maps after each cascade step
    rank_correlation: list[float]
    #: per-step standard deviation over images
    rank_correlation_std: list[float]
    final: float
    flagged: bool
    threshold: float
    #: cascade steps after which the mean correlation was still >= threshold
    steps_above: int
    images: int
    skipped_constant_maps: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def cascade_groups(model: nn.Module, share: float = 0.5) -> list[str]:
    """Blocks to randomise, output side first.

    Start from the model's direct children that hold parameters; a block holding more than
    ``share`` of all parameters (DenseNet's ``features``, say) is split into its children.
    """
    total = sum(p.numel() for p in model.parameters()) or 1

    def nparams(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    def expand(prefix: str, module: nn.Module) -> list[str]:
        names = []
        for name, child in module.named_children():
            if nparams(child) == 0:
                continue
            full = f"{prefix}{name}"
            kids = [c for c in child.children() if nparams(c) > 0]
            if nparams(child) > share * total and len(kids) > 1:
                names += expand(full + ".", child)
            else:
                names.append(full)
        return names

    groups = expand("", model)
    # parameters held directly by the root (rare) form a group of their own
    return list(reversed(groups))


@torch.no_grad()
def randomize_(module: nn.Module, generator: torch.Generator) -> None:
    """Re-initialise every parameter of ``module`` (in place) with fresh random values.

    Weights get a zero-mean normal with the std a fan-in (He) init would use; BatchNorm
    scales/shifts are drawn around 1/0, and running statistics reset.
    """
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.weight is not None:
                m.weight.normal_(1.0, 0.1, generator=generator)
                m.bias.normal_(0.0, 0.1, generator=generator)
            if m.running_mean is not None:
                m.reset_running_stats()
            continue
        for name, p in m.named_parameters(recurse=False):
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.normal_(0.0, (2.0 / max(fan_in, 1)) ** 0.5, generator=generator)
            else:
                p.normal_(0.0, 0.01, generator=generator)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.abs(a).ravel(), np.abs(b).ravel()
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0  # a constant map carries no ranking, so nothing of the original survives
    return float(spearmanr(a, b).statistic)


def sanity_check(
    model: nn.Module,
    x: torch.Tensor,
    methods: dict[str, str | Method] | Sequence[str],
    *,
    ctx: Context | None = None,
    target: torch.Tensor | None = None,
    threshold: float = 0.5,
    seed: int = 0,
    layers: Sequence[str] | None = None,
) -> list[SanityResult]:
    """Run cascading randomisation for each method on images ``x``; the model itself is not modified."""
    ctx = ctx or Context()
    if not isinstance(methods, dict):
        methods = {m: m for m in methods}
    model = model.eval()
    if target is None:
        with torch.no_grad():
            target = model(x).argmax(1)
    layers = list(layers) if layers is not None else cascade_groups(model)
    originals = {name: explain(model, x, m, target=target, ctx=ctx).cpu().numpy() for name, m in methods.items()}
    skipped = {name: int(sum(np.ptp(np.abs(h)) == 0 for h in originals[name])) for name in methods}
    rhos: dict[str, list[list[float]]] = {name: [] for name in methods}
    work = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    for layer in layers:
        randomize_(work.get_submodule(layer), gen)
        for name, m in methods.items():
            maps = explain(work, x, m, target=target, ctx=ctx).cpu().numpy()
            per_image = [_spearman(o, r) for o, r in zip(originals[name], maps) if np.ptp(np.abs(o)) > 0]
            rhos[name].append(per_image)
    results = []
    for name in methods:
        means = [float(np.mean(r)) if r else float("nan") for r in rhos[name]]
        stds = [float(np.std(r)) if r else float("nan") for r in rhos[name]]
        final = means[-1] if means else float("nan")
        notes = []
        if skipped[name]:
            notes.append(f"{skipped[name]} image(s) had a constant original map and were left out")
        above = int(sum(m >= threshold for m in means if np.isfinite(m)))
        flagged = False
        if not np.isfinite(final) or final >= threshold:
            flagged = True
            notes.append(f"maps stay rank-correlated (rho={final:.2f} >= {threshold}) after every layer was "
                         "randomised: this method does not depend on what the model learned")
        elif means and above * 2 >= len(means):
            flagged = True
            notes.append(f"maps stay rank-correlated (rho >= {threshold}) through {above} of {len(means)} "
                         "randomisation steps: they barely react to most of the network's weights")
        results.append(SanityResult(name, list(layers), means, stds, final, flagged, threshold, above,
                                    int(x.shape[0]), skipped[name], notes))
    return results


def sanity_markdown(results: list[SanityResult], title: str = "Sanity check") -> str:
    """A Markdown table: one row per method and cascade step."""
    lines = [f"## {title}", "",
             "Cascading randomisation (Adebayo et al. 2018): blocks are re-initialised from the output towards "
             "the input; the value is the mean Spearman rank correlation of |heatmap| with the original maps.", ""]
    if not results:
        return "\n".join(lines)
    layers = results[0].layers
    lines.append("| randomised down to | " + " | ".join(r.method for r in results) + " |")
    lines.append("|---|" + "---|" * len(results))
    for i, layer in enumerate(layers):
        lines.append(f"| `{layer}` | " + " | ".join(f"{r.rank_correlation[i]:.3f}" for r in results) + " |")
    lines.append("")
    for r in results:
        verdict = "**FLAGGED**" if r.flagged else "passes"
        lines.append(f"- `{r.method}`: {verdict} (final rho {r.final:.3f}; rho >= {r.threshold} after "
                     f"{r.steps_above} of {len(r.layers)} steps; {r.images} images). " + " ".join(r.notes))
    return "\n".join(lines) + "\n"
