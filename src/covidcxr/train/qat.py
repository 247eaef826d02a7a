"""Quantization-aware fine-tuning: make a trained classifier's INT8 export agree with its fp32 one.

Post-training INT8 (``covidcxr export --quantize int8``, onnxruntime QDQ: int8 per-channel weights, uint8
per-tensor activations) adds rounding noise to every activation. A model whose COVID-19 threshold sits where many
images' probabilities crowd (the reference's 0.041) flips a few labels under that noise and fails the export's
parity gate (98 % label agreement with fp32). Fine-tuning with that noise simulated in the forward pass lets the
weights absorb it (Jacob et al., CVPR 2018; Krishnamoorthi, arXiv:1806.08342).

What :func:`finetune` does, on the ``train`` split only:

1. **BatchNorm is folded** into the preceding convolutions, as onnxruntime's pre-processing does before it
   quantizes; the folded network keeps the architecture (each BatchNorm becomes ``x + bias``), so the result is
   an ordinary checkpoint of the same ``arch``.
2. **Fake quantization where onnxruntime's QDQ export rounds**: the weights of every Conv2d/Linear per output
   channel (symmetric int8); activations per tensor (asymmetric uint8) on the consumer side: the input of every
   Conv2d/Linear, both operands and the output of each residual add, and the last convolution's output before
   the pooling. The first ``fp32_convs`` convolutions stay fp32, as ``export --keep-fp32 N`` keeps them.
   Activation ranges are the min/max over calibration images (onnxruntime's ``minmax`` calibration), measured
   again each epoch. The logits stay fp32, as in the export.
3. **Distillation from the model itself**: each step runs the network twice, with and without the simulated
   quantization. The loss is the squared difference of the two (centred: a softmax ignores a common shift) logit
   vectors, which is what the parity gate measures since it compares the INT8 file with *this* model's fp32
   export, plus the fp32 logits' squared distance from the trained model's, which keeps the fp32 model where it was.

The result is a checkpoint with the original's preset, classes and provenance plus ``training.qat`` (steps,
rates, the fp32/simulated-INT8 agreement measured on the train images); the threshold and temperature are
chosen again on val by ``covidcxr evaluate --calibrate --set-threshold`` (as after any training).
Research use only: agreement with fp32 says nothing about clinical performance.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from covidcxr.io import MAX_UNREADABLE_SHARE, CXRReadError

log = logging.getLogger(__name__)


class QATError(RuntimeError):
    """Quantization-aware fine-tuning cannot run on this model or data."""


# --------------------------------------------------------------------------- BatchNorm folding


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every ``Conv2d -> BatchNorm2d`` pair (consecutive children of a Sequential) in place.

    The convolution takes the BatchNorm's per-channel gain; the BatchNorm becomes ``x + bias`` (weight 1, running
    mean 0, running variance ``1 - eps``) with its weight frozen, so the network computes the same function in
    eval mode and its weights are the ones an INT8 export quantizes. Returns the number of pairs folded.
    """
    folded = 0
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        kids = list(seq.children())
        for conv, bn in zip(kids, kids[1:]):
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
                continue
            with torch.no_grad():
                gain = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                conv.weight.mul_(gain.view(-1, *([1] * (conv.weight.dim() - 1))))
                bias = bn.bias - bn.running_mean * gain
                if conv.bias is not None:
                    bias = bias + conv.bias * gain
                    conv.bias.zero_()
                bn.bias.copy_(bias)
                bn.weight.fill_(1.0)
                bn.running_mean.zero_()
                bn.running_var.fill_(1.0 - bn.eps)
            bn.weight.requires_grad_(False)
            folded += 1
    return folded


# --------------------------------------------------------------------------- fake quantization


class _WeightFakeQuant(nn.Module):
    """Per-output-channel symmetric int8 (onnxruntime: ``WeightSymmetric``, ``QInt8``, per_channel)."""

    def __init__(self, owner: "Simulator"):
        super().__init__()
        self.owner = [owner]  # a list: not registered as a submodule (no recursion in state_dict)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.owner[0].enabled:
            return w
        amax = w.detach().abs().flatten(1).amax(dim=1).clamp_min(1e-8)
        scale = (amax / 127.0).float()
        zero = torch.zeros_like(scale, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -127, 127)


@dataclass
class _Range:
    lo: float = math.inf
    hi: float = -math.inf

    def update(self, t: torch.Tensor) -> None:
        self.lo = min(self.lo, float(t.detach().min()))
        self.hi = max(self.hi, float(t.detach().max()))

    def scale_zero(self) -> tuple[float, int]:
        lo, hi = min(0.0, self.lo), max(0.0, self.hi)  # uint8 ranges hold 0 exactly
        scale = max(hi - lo, 1e-8) / 255.0
        return scale, int(round(-lo / scale))


class Simulator:
    """Fake quantization hooks on a (BatchNorm-folded) MobileNetV2-style network; ``enabled`` switches it.

    Where onnxruntime's QDQ export rounds: the weights of every Conv2d/Linear, the input of each of them (the consumer
    side, so a layer kept fp32 reads fp32), and both sides of each residual add. ``fp32_convs``: the first that many
    convolutions stay fp32, weights and input, as ``covidcxr export --keep-fp32 N`` leaves them; the fine-tuning then
    spends itself on the layers that will be INT8.
    """

    def __init__(self, model: nn.Module, fp32_convs: int = 0):
        from torch.nn.utils import parametrize
        from torchvision.models.mobilenetv2 import InvertedResidual
        from torchvision.ops.misc import Conv2dNormActivation

        self.model = model
        self.enabled = False
        self.observing = False
        self.ranges: dict[str, _Range] = {}
        self._hooks: list[Any] = []
        self.weights = 0
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        if fp32_convs < 0 or fp32_convs > len(convs):
            raise QATError(f"--keep-fp32 {fp32_convs}: this model has {len(convs)} convolutions")
        kept = {id(m) for m in convs[:fp32_convs]}
        self.fp32_convs = fp32_convs
        points: list[tuple[str, nn.Module, str]] = []
        for name, mod in model.named_modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)) and id(mod) not in kept:
                parametrize.register_parametrization(mod, "weight", _WeightFakeQuant(self))
                self.weights += 1
                points.append((f"{name}.input", mod, "pre"))
            elif isinstance(mod, InvertedResidual) and mod.use_res_connect:
                # the block input is one tensor for the Add and the first conv: onnxruntime rounds it once for both
                points.append((f"{name}.skip", mod, "pre"))
                last_bn = [m for m in mod.conv.children() if isinstance(m, nn.BatchNorm2d)]
                if last_bn:
                    points.append((f"{name}.project", last_bn[-1], "out"))
                points.append((name, mod, "out"))
        # the last conv-norm-ReLU6 (features[-1]) is rounded at its output before the (fp32) pooling
        tail = [(n, m) for n, m in model.named_modules() if isinstance(m, Conv2dNormActivation)]
        if tail and not any(id(c) in kept for c in tail[-1][1].modules()):
            points.append((f"{tail[-1][0]}.output", tail[-1][1], "out"))
        for key, mod, kind in points:
            self.ranges[key] = _Range()
            if kind == "pre":
                self._hooks.append(mod.register_forward_pre_hook(self._pre_hook(key)))
            else:
                self._hooks.append(mod.register_forward_hook(self._out_hook(key)))

    def _fq(self, key: str, t: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.ranges[key].update(t)
            return t
        if not self.enabled or not math.isfinite(self.ranges[key].hi):
            return t
        scale, zero = self.ranges[key].scale_zero()
        return torch.fake_quantize_per_tensor_affine(t, scale, zero, 0, 255)

    def _pre_hook(self, key: str) -> Callable[..., Any]:
        def hook(_mod: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            return (self._fq(key, args[0]), *args[1:])
        return hook

    def _out_hook(self, key: str) -> Callable[..., Any]:
        def hook(_mod: nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor:
            return self._fq(key, out)
        return hook

    @torch.no_grad()
    def observe(self, batches: Iterator[torch.Tensor]) -> None:
        """Measure every activation range (min/max) on ``batches``, in fp32, as onnxruntime's minmax does."""
        self.ranges = {k: _Range() for k in self.ranges}
        was, self.enabled, self.observing = self.enabled, False, True
        try:
            for x in batches:
                self.model(x)
        finally:
            self.observing, self.enabled = False, was

    def remove(self) -> None:
        """Take every hook and parametrization off, leaving the plain fp32 weights."""
        from torch.nn.utils import parametrize

        for h in self._hooks:
            h.remove()
        for mod in self.model.modules():
            if parametrize.is_parametrized(mod, "weight"):
                parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)


# --------------------------------------------------------------------------- fine-tuning


@dataclass
class QATReport:
    steps: int
    epochs: int
    lr: float
    batch_size: int
    fp32_convs: int
    boundary_weight: float
    train_images: int
    calibration_images: int
    bn_folded: int
    weights_quantized: int
    activation_points: int
    seconds: float
    #: on the train images, against the original model: :func:`logit_error` and COVID-19 label agreement at the
    #: original threshold, for the fp32 forward and the simulated-INT8 forward, before and after
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def logit_error(ref: np.ndarray, new: np.ndarray) -> float:
    """How far ``new`` logits are from ``ref`` (N x classes), relative to how much ``ref`` varies between images.

    Rows are centred first (softmax ignores a shift common to all classes), so this is the RMS error of the
    class contrasts divided by their RMS spread over the images: 0 is identical, 1 is as large as the signal.
    """
    r = ref - ref.mean(axis=1, keepdims=True)
    d = (new - ref) - (new - ref).mean(axis=1, keepdims=True)
    spread = float(np.sqrt(np.mean((r - r.mean(axis=0)) ** 2)))
    return float(np.sqrt(np.mean(d ** 2))) / spread if spread > 0 else float("inf")


def _describe(m: dict[str, float]) -> str:
    return (f"simulated INT8 logit error {m['int8_simulated_logit_error']:.3f}, labels "
            f"{m['int8_simulated_label_agreement']:.1%}; fp32 logit error {m['fp32_logit_error']:.3f}, labels "
            f"{m['fp32_label_agreement']:.1%} (train images, against the input model)")


def _centre(z: torch.Tensor) -> torch.Tensor:
    return z - z.mean(dim=1, keepdim=True)


def _boundary_margin(logits: torch.Tensor, temperature: float, pos: int, threshold: float) -> torch.Tensor:
    """Per image, how far (in logits) the trained model is from changing its label: the COVID-19 log-odds against
    the threshold's, and the gap between the two other classes, whichever is smaller."""
    z = logits / temperature
    logp = torch.log_softmax(z, dim=1)
    p = logp[:, pos].exp().clamp(1e-7, 1 - 1e-7)
    covid = (torch.log(p) - torch.log1p(-p) - math.log(threshold / (1 - threshold))).abs()
    others = torch.cat([z[:, :pos], z[:, pos + 1:]], dim=1)
    top2 = others.topk(2, dim=1).values if others.shape[1] >= 2 else torch.full_like(others, math.inf)
    return torch.minimum(covid, (top2[:, 0] - top2[:, -1]).abs())


def _covid_labels(logits: torch.Tensor, temperature: float, pos: int, threshold: float) -> torch.Tensor:
    return torch.softmax(logits / temperature, dim=1)[:, pos] >= threshold


def finetune(model: nn.Module, images: torch.Tensor, *, temperature: float, positive_index: int, threshold: float,
             epochs: int = 3, lr: float = 2e-5, batch_size: int = 16, calibration_count: int = 128,
             fp32_convs: int = 0, boundary_weight: float = 0.0, seed: int = 0,
             progress: Callable[[str], None] | None = None) -> tuple[nn.Module, QATReport]:
    """Quantization-aware fine-tuning of ``model`` on ``images`` (N x C x H x W, preprocessed train images).

    Returns a new, BatchNorm-folded model (``model`` is left as it is) and a :class:`QATReport`.
    ``calibration_count`` images, spread over ``images``, set the activation ranges each epoch.
    """
    if images.ndim != 4 or len(images) < batch_size:
        raise QATError(f"quantization-aware fine-tuning needs at least {batch_size} train images, got {len(images)}")
    started = time.monotonic()
    teacher = copy.deepcopy(model).float().eval()  # the caller's model keeps its mode and weights
    student = copy.deepcopy(teacher)  # eval: frozen (folded) BatchNorm, no dropout
    folded = fold_batchnorm(student)
    sim = Simulator(student, fp32_convs)
    cal_idx = np.unique(np.linspace(0, len(images) - 1, min(calibration_count, len(images))).round().astype(int))

    def cal_batches() -> Iterator[torch.Tensor]:
        for i in range(0, len(cal_idx), batch_size):
            yield images[cal_idx[i:i + batch_size]]

    def logits_of(net: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([net(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])

    target = logits_of(teacher)
    ref_labels = _covid_labels(target, temperature, positive_index, threshold)
    weights = 1.0 + boundary_weight * torch.exp(-_boundary_margin(target, temperature, positive_index, threshold) / 0.5)

    def measure() -> dict[str, float]:
        out: dict[str, float] = {}
        for mode in ("fp32", "int8_simulated"):
            sim.enabled = mode != "fp32"
            z = logits_of(student)
            out[f"{mode}_logit_error"] = round(logit_error(target.numpy(), z.numpy()), 4)
            out[f"{mode}_label_agreement"] = round(float(
                (_covid_labels(z, temperature, positive_index, threshold) == ref_labels).float().mean()), 4)
        sim.enabled = False
        return out

    sim.observe(cal_batches())
    before = measure()
    if progress:
        progress(f"QAT start: {_describe(before)}")
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    steps_per_epoch = len(images) // batch_size
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total))
    gen = torch.Generator().manual_seed(seed)
    history: list[dict[str, float]] = []
    step = 0
    for epoch in range(epochs):
        if epoch:
            sim.observe(cal_batches())
        order = torch.randperm(len(images), generator=gen)
        running = 0.0
        for b in range(steps_per_epoch):
            idx = order[b * batch_size:(b + 1) * batch_size]
            x, t = images[idx], _centre(target[idx])
            sim.enabled = True
            zq = _centre(student(x))
            sim.enabled = False
            zf = _centre(student(x))
            # the gate compares INT8 with this model's own fp32: the INT8 forward follows the fp32 one (not the
            # other way round), and the second term keeps the fp32 model where it was
            gap = (zq - zf.detach()).pow(2).mean(dim=1)
            if boundary_weight:
                gap = gap * weights[idx]
            loss = gap.mean() + (zf - t).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            running += float(loss.detach())
        history.append({"epoch": epoch, "loss": float(f"{running / max(1, steps_per_epoch):.6g}")})
        if progress:
            progress(f"QAT epoch {epoch + 1}/{epochs}: loss {history[-1]['loss']:.5f}")
    sim.observe(cal_batches())
    after = measure()
    if progress:
        progress(f"QAT end: {_describe(after)}")
    sim.remove()
    for p in student.parameters():
        p.requires_grad_(True)
    report = QATReport(steps=step, epochs=epochs, lr=lr, batch_size=batch_size, fp32_convs=fp32_convs,
                       boundary_weight=boundary_weight, train_images=len(images),
                       calibration_images=len(cal_idx), bn_folded=folded, weights_quantized=sim.weights,
                       activation_points=len(sim.ranges), seconds=round(time.monotonic() - started, 1),
                       before=before, after=after, history=history)
    return student.eval(), report


def load_train_images(frame: Any, preset: Any, cache_dir: str | Path | None = None, split: str = "train",
                      manifest: str | Path = "the manifest") -> tuple[torch.Tensor, list[str]]:
    """The ``split`` images of a manifest ``frame`` (``read_manifest``), preprocessed by ``preset`` (no
    augmentation), as one tensor; unreadable ones are skipped and named, up to :data:`MAX_UNREADABLE_SHARE`."""
    from covidcxr.data.dataset import CXRDataset

    df = frame[frame["split"] == split]
    if df.empty:
        raise QATError(f"{manifest}: no {split!r} rows to fine-tune on")
    ds = CXRDataset(df, preset, cache_dir=cache_dir, classes=sorted(set(df["label"].astype(str))))
    xs, skipped = [], []
    for i in range(len(ds)):
        try:
            xs.append(ds[i]["image"])
        except CXRReadError as err:
            skipped.append(str(err))
            log.warning("%s", err)
    if not xs:
        raise QATError(f"{manifest}: none of the {len(df)} {split!r} images could be read")
    if len(skipped) > MAX_UNREADABLE_SHARE * len(df):  # as the INT8 export's calibration refuses
        raise QATError(f"{manifest}: {len(skipped)} of {len(df)} {split!r} images could not be read "
                       f"({len(skipped) / len(df):.1%}, limit {MAX_UNREADABLE_SHARE:.0%}); e.g. {skipped[0]}")
    return torch.stack(xs), skipped


#: architectures whose activations :class:`Simulator` places as onnxruntime quantizes them
SUPPORTED_ARCHS = ("mobilenet_v2",)


def qat_checkpoint(model_path: str | Path, manifest: str | Path, out: str | Path, *, epochs: int = 3,
                   lr: float = 2e-5, batch_size: int = 16, calibration_count: int = 128, fp32_convs: int = 0,
                   boundary_weight: float = 0.0, cache_dir: str | Path | None = None, seed: int = 0,
                   progress: Callable[[str], None] | None = None) -> QATReport:
    """Fine-tune the checkpoint ``model_path`` quantization-aware on ``manifest``'s train split; write ``out``.

    ``out`` keeps the input's arch, classes, preset, threshold, temperature and training record, less its release
    and run name, card and figures (new weights), and adds ``training.qat`` (the report; the input's file, sha256,
    name and release). Its threshold is marked ``inherited`` until chosen again on val (``covidcxr evaluate
    --calibrate --set-threshold``); its training-feature summary (for ``covidcxr site check``) is computed anew.
    """
    from covidcxr import __version__
    from covidcxr.data import read_manifest
    from covidcxr.models.checkpoint import FORMAT, CheckpointError, atomic_torch_save, load, read_bundle
    from covidcxr.models.features import SUMMARY_KEY, summarise_frames
    from covidcxr.models.reference import file_sha256
    from covidcxr.reference_models import resolve_model

    lm = load(model_path)
    if lm.task != "classification" or lm.threshold is None or "COVID-19" not in lm.classes:
        raise QATError(f"{model_path}: quantization-aware fine-tuning needs a COVID-19 classifier with a threshold "
                       f"(task {lm.task!r}, classes {lm.classes}, threshold {lm.threshold})")
    if lm.arch not in SUPPORTED_ARCHS:
        raise QATError(f"{model_path}: arch {lm.arch!r}: quantization-aware fine-tuning simulates onnxruntime's INT8 "
                       f"for {', '.join(SUPPORTED_ARCHS)} only")
    if lm.logit_bias is not None:
        raise QATError(f"{model_path}: a site-calibrated checkpoint (logit bias); fine-tune the model it came from")
    frame = read_manifest(manifest, require_split=True, check_leakage=False)
    images, skipped = load_train_images(frame, lm.preset, cache_dir, manifest=manifest)
    if len(images) < batch_size:
        raise QATError(f"{manifest}: {len(images)} readable train images, fewer than one batch ({batch_size})")
    model, report = finetune(lm.model, images, temperature=lm.temperature,
                             positive_index=lm.classes.index("COVID-19"), threshold=float(lm.threshold),
                             epochs=epochs, lr=lr, batch_size=batch_size, calibration_count=calibration_count,
                             fp32_convs=fp32_convs, boundary_weight=boundary_weight, seed=seed, progress=progress)
    bundle = dict(read_bundle(model_path))
    for key in ("stored_as", "card"):  # a shipped model's file format and card describe the input, not this model
        bundle.pop(key, None)
    bundle["format"] = FORMAT
    bundle["covidcxr_version"] = __version__
    bundle["state_dict"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    training = dict(bundle.get("training") or {})
    source = Path(resolve_model(model_path))
    # new weights: not the input's release or run name (records name the model that made them), and none of the
    # input's figures; the threshold is the input's until `evaluate --set-threshold` chooses it on val again
    from_model = {"path": str(source), "sha256": file_sha256(source), "name": training.pop("run_name", None),
                  "version": training.pop("model_version", None)}
    training["qat"] = {**report.to_dict(), "from": from_model, "from_sha256": from_model["sha256"],
                       "manifest": str(manifest), "split": "train", "unreadable": skipped, "seed": seed,
                       "note": "BatchNorm folded; fine-tuned with simulated onnxruntime INT8 (covidcxr.train.qat); "
                               "threshold and temperature are the input's until chosen again on val"}
    bundle["training"] = training
    bundle["metrics"] = {"operating_point": {"positive": "COVID-19", "chosen_on": "inherited",
                                             "note": "the input model's threshold, not chosen again for these weights "
                                                     "(covidcxr evaluate --calibrate --set-threshold does)"}}
    # the training-feature summary that `covidcxr site check` compares a site with, for these weights
    model.eval()
    bundle[SUMMARY_KEY] = summarise_frames(model, lm.preset, frame[frame["split"] == "train"],
                                           frame[frame["split"] == "val"])
    try:
        atomic_torch_save(bundle, out)
    except OSError as err:
        raise CheckpointError(f"{out}: cannot write the checkpoint ({err.strerror or err})") from None
    return report
