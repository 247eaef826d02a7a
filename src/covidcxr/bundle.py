"""Export a covidcxr classifier as a MONAI bundle (``covidcxr export --model CKPT --monai-bundle DIR``).

The bundle follows the MONAI Bundle specification::

    DIR/configs/metadata.json    validated against MONAI's meta schema (shipped here: bundle_schema/, so
                                 ``python -m monai.bundle verify_metadata --filepath SCHEMA`` runs offline)
    DIR/configs/inference.json   the preset as MONAI transforms (``preprocessing``), the TorchScript network
                                 (``network_def``), softmax with the checkpoint's temperature (``postprocessing``),
                                 and ``predict`` / ``run`` entries
    DIR/models/model.ts          TorchScript (traced), input ``image`` N x C x S x S float32, output ``pred`` logits
    DIR/models/model.pt          the same weights as a plain state dict (``covidcxr.models.build(arch, **arch_kwargs)``)
    DIR/docs/README.md           the model card and how to run it; DIR/docs/license.txt

Preprocessing in MONAI terms: ``LoadImaged`` (PIL, converted to 8-bit gray as covidcxr.io does), ``ScaleIntensityRanged``
to [0, 1], the crop steps as ``Lambdad`` slices, the resize as a ``Lambdad`` calling OpenCV with the
interpolation covidcxr uses (INTER_AREA when shrinking, bilinear when enlarging, or cubic): MONAI's
``Resize(mode="area")`` is adaptive average pooling and differs from OpenCV's area filter at non-integer scales,
which would cost the 1e-4 parity. Then ``RepeatChanneld`` and ``NormalizeIntensityd`` (channel-wise mean/std).
Presets with CLAHE, BEASF or histogram matching have no MONAI transform and are refused, naming the step;
a lung-crop preset is refused with what the bundle would lack (the lung segmenter).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from covidcxr.preprocess import Preset

SCHEMA_URL = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
              "meta_schema_20240725.json")
#: MONAI's bundle metadata schema (verbatim copy of the 0.8.1 release file named in SCHEMA_URL)
SCHEMA_FILE = Path(__file__).resolve().parent / "bundle_schema" / "meta_schema_20240725.json"


class BundleError(ValueError):
    """The checkpoint cannot be expressed as a MONAI bundle, or the export failed (one line)."""


@dataclass
class BundleReport:
    out_dir: str
    source: str
    preset: str
    files: list[str] = field(default_factory=list)
    parity_images: int = 0
    max_abs_diff: float | None = None


# --------------------------------------------------------------------------- preset -> MONAI transforms
def unsupported_step(preset: Preset) -> str | None:
    """The first preset step MONAI transforms cannot express, as a phrase, or None."""
    if preset.lung_crop:
        return ("lung crop: the bundle would lack covidcxr's lung segmenter (lung-unet-vgg11 U-Net) that finds the "
                "lungs to crop to; export a model trained without lung crop, or use the ONNX export with covidcxr")
    if preset.channel_stack:
        return f"channel stack {'/'.join(preset.channel_stack)} (BEASF/CLAHE enhancement channels)"
    if preset.hist_template:
        return "histogram matching to a fixed template"
    if preset.clahe_clip > 0:
        return f"CLAHE (clip {preset.clahe_clip:g}, {preset.clahe_tiles}x{preset.clahe_tiles} tiles)"
    return None


def _interp(preset: Preset) -> str:
    if preset.interpolation == "cubic":
        return "cv2.INTER_CUBIC"
    return f"(cv2.INTER_AREA if max(x.shape[1:]) > {preset.size} else cv2.INTER_LINEAR)"


def preprocessing(preset: Preset) -> dict[str, Any]:
    """``preset`` (covidcxr.io decoding of an 8-bit PNG/JPEG + prepare + finalize) as a MONAI Compose config."""
    why = unsupported_step(preset)
    if why:
        raise BundleError(f"preset {preset.name}: MONAI transforms cannot express its step {why}")
    k = "image"
    t: list[dict[str, Any]] = [
        # covidcxr.io: PIL decode, .convert('L') (ITU-R 601 luma), / 255; H x W order (no transpose)
        {"_target_": "LoadImaged", "keys": k, "reader": "PILReader", "image_only": True, "ensure_channel_first": True,
         "dtype": "$np.float32", "reverse_indexing": False, "converter": "$lambda im: im.convert('L')"},
        {"_target_": "ScaleIntensityRanged", "keys": k, "a_min": 0.0, "a_max": 255.0, "b_min": 0.0, "b_max": 1.0,
         "clip": True},
    ]
    if preset.crop_top > 0:
        t.append({"_target_": "Lambdad", "keys": k,
                  "func": f"$lambda x: x[:, int(round(x.shape[1] * {preset.crop_top!r})):, :]"})
    if preset.center_square:
        t.append({"_target_": "Lambdad", "keys": k, "func": (
            "$lambda x: x[:, (x.shape[1] - min(x.shape[1:])) // 2:(x.shape[1] - min(x.shape[1:])) // 2 + min(x.shape[1:]), "
            "(x.shape[2] - min(x.shape[1:])) // 2:(x.shape[2] - min(x.shape[1:])) // 2 + min(x.shape[1:])]")})
    s = preset.size
    t.append({"_target_": "Lambdad", "keys": k, "func": (
        f"$lambda x: torch.as_tensor(np.clip(cv2.resize(np.ascontiguousarray(np.asarray(x[0], dtype=np.float32)), "
        f"({s}, {s}), interpolation={_interp(preset)}), 0.0, 1.0), dtype=torch.float32)[None]")})
    if preset.channels > 1:
        t.append({"_target_": "RepeatChanneld", "keys": k, "repeats": preset.channels})
    lo, hi = preset.value_range
    if (lo, hi) != (0.0, 1.0):
        t.append({"_target_": "ScaleIntensityRanged", "keys": k, "a_min": 0.0, "a_max": 1.0, "b_min": float(lo),
                  "b_max": float(hi)})
    mean = [float(v) for v in preset._per_channel(preset.mean)]
    std = [float(v) for v in preset._per_channel(preset.std)]
    if any(m != 0.0 for m in mean) or any(v != 1.0 for v in std):
        t.append({"_target_": "NormalizeIntensityd", "keys": k, "subtrahend": mean, "divisor": std,
                  "channel_wise": True})
    t.append({"_target_": "EnsureTyped", "keys": k, "dtype": "$torch.float32", "track_meta": False})
    return {"_target_": "Compose", "transforms": t}


def _input_range(preset: Preset) -> list[float]:
    a, b = preset._affine_floats()
    return [float(min(b)), float(max(x + y for x, y in zip(a, b)))]


# --------------------------------------------------------------------------- files
def inference_config(preset: Preset, classes: Sequence[str], temperature: float,
                     threshold: float | None, logit_bias: Sequence[float] | None = None) -> dict[str, Any]:
    post: list[dict[str, Any]] = []
    if float(temperature) != 1.0:
        post.append({"_target_": "Lambdad", "keys": "pred", "func": f"$lambda x: x / {float(temperature)!r}"})
    if logit_bias is not None:  # a site calibrate --bias checkpoint: softmax(z / T + b), as covidcxr predict
        post.append({"_target_": "Lambdad", "keys": "pred",
                     "func": f"$lambda x: x + torch.tensor({[float(v) for v in logit_bias]!r}, dtype=x.dtype)"})
    post.append({"_target_": "Activationsd", "keys": "pred", "softmax": True})
    return {
        "imports": ["$import json", "$import cv2", "$import numpy as np", "$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cpu')",
        "classes": list(classes),
        "covid_threshold": threshold,
        "temperature": float(temperature),
        "logit_bias": None if logit_bias is None else [float(v) for v in logit_bias],
        "network_def": "$torch.jit.load(@bundle_root + '/models/model.ts', map_location='cpu')",
        "network": "$@network_def.to(@device).eval()",
        "preprocessing": preprocessing(preset),
        "postprocessing": {"_target_": "Compose", "transforms": post},
        # one image path -> its class probabilities (a list, in 'classes' order)
        "predict": ("$lambda f: [float(v) for v in @postprocessing({'pred': @network(@preprocessing({'image': f})"
                    "['image'][None].to(@device)).detach()[0].cpu()})['pred']]"),
        "input_files": [],
        "output_file": "predictions.json",
        "run": ["$json.dump({f: dict(zip(@classes, @predict(f))) for f in @input_files}, open(@output_file, 'w'), "
                "indent=1)"],
    }


def metadata(preset: Preset, classes: Sequence[str], *, name: str, version: str, card: dict[str, Any],
             metrics: dict[str, Any], temperature: float, threshold: float | None) -> dict[str, Any]:
    import cv2
    import numpy as np
    import PIL
    import torch

    try:
        import monai

        monai_version = monai.__version__
    except ImportError:  # the bundle is written without MONAI; checking it needs the extra
        monai_version = "1.4.0"
    from covidcxr import __version__
    from covidcxr.reference_models import LICENSE, RESEARCH_ONLY

    channel_def = {str(i): c for i, c in enumerate(classes)}
    rule = (f"COVID-19 when p(COVID-19) >= {threshold:.4f} (chosen on validation), else the most probable of the "
            "others" if threshold is not None else "argmax")
    return {
        "schema": SCHEMA_URL,
        "version": version,
        "changelog": {version: f"exported by covidcxr {__version__} from {name}"},
        "monai_version": monai_version,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"opencv-python-headless": cv2.__version__, "pillow": PIL.__version__},
        "name": name,
        "task": "Chest X-ray classification: normal / pneumonia / COVID-19 (research use only)",
        "description": (f"{name}: a covidcxr classifier (preset {preset.name}) exported with its preprocessing as "
                        f"MONAI transforms. Decision rule: {rule}. {RESEARCH_ONLY}."),
        "authors": "covidcxr contributors",
        "copyright": "Copyright (c) covidcxr contributors",
        "data_source": str(card.get("data_source") or "see docs/README.md"),
        "data_type": "png/jpeg (8-bit; DICOM: use covidcxr predict)",
        "image_classes": "single-channel frontal chest X-ray, read as 8-bit gray, scaled to [0, 1]",
        "pred_classes": ", ".join(f"{i}: {c}" for i, c in enumerate(classes)),
        "eval_metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        "intended_use": f"{RESEARCH_ONLY}; not a medical device; no clinical performance is claimed",
        "references": ["Mitchell et al., Model Cards for Model Reporting, FAT* 2019"],
        "license": str(card.get("license") or LICENSE),
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "modality": "CR/DX", "num_channels": preset.channels,
                "spatial_shape": [preset.size, preset.size], "dtype": "float32", "value_range": _input_range(preset),
                "is_patch_data": False, "channel_def": {str(i): "gray" for i in range(preset.channels)}}},
            "outputs": {"pred": {
                "type": "logits", "format": "classes", "num_channels": len(classes), "spatial_shape": [1],
                "dtype": "float32", "value_range": [], "is_onehot": False, "channel_def": channel_def}},
            "post_processed_outputs": {"pred": {
                "type": "probabilities", "format": "classes", "num_channels": len(classes), "spatial_shape": [1],
                "dtype": "float32", "value_range": [0, 1], "is_onehot": False, "channel_def": channel_def}},
        },
    }


def _readme(name: str, version: str, card: dict[str, Any], preset: Preset, lm_card: str) -> str:
    from covidcxr.reference_models import RESEARCH_ONLY

    return f"""# {name} {version} — MONAI bundle ({RESEARCH_ONLY})

Exported by `covidcxr export --monai-bundle`. Not a medical device; no clinical performance is claimed.

## Run it

```bash
python -m monai.bundle run --config_file configs/inference.json --bundle_root . \\
    --input_files "['chest.png']" --output_file predictions.json
```

or in Python: `ConfigParser` → `parser.read_config("configs/inference.json")`, then
`parser.get_parsed_content("predict")("chest.png")` gives the class probabilities in `classes` order.

Input `image`: an 8-bit PNG or JPEG frontal chest X-ray (DICOM and 16-bit files: use `covidcxr predict`,
whose reader handles windowing and MONOCHROME1). Output `pred`: logits; `postprocessing` divides by the
temperature and applies softmax.

## Preprocessing (covidcxr preset `{preset.name}`)

{preset.description}. Expressed as MONAI transforms: `LoadImaged` (PIL, `convert('L')`, as covidcxr.io),
`ScaleIntensityRanged` to [0, 1], crops as `Lambdad` slices, the resize as a `Lambdad` calling OpenCV with
covidcxr's interpolation (INTER_AREA when shrinking, bilinear when enlarging): MONAI's `Resize(mode="area")`
is adaptive average pooling and differs at non-integer scales. Then `RepeatChanneld` and
`NormalizeIntensityd` (channel-wise mean/std). The same image gives the same probabilities as
`covidcxr predict` to 1e-4 (tests/test_monai_bundle.py).

## Model card

{lm_card}
"""


def export_bundle(model: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False,
                  parity_images: Sequence[str] | None = None, atol: float = 1e-4) -> BundleReport:
    """Write the MONAI bundle of checkpoint ``model`` (a path or ``reference``) into ``out_dir``.

    With ``parity_images``, the written bundle is run through MONAI's ConfigParser on them and compared
    with covidcxr's own predictor; a difference above ``atol`` is a :class:`BundleError`.
    """
    import numpy as np
    import torch

    from covidcxr import reference_models as rm
    from covidcxr.models import load

    lm = load(model)
    if lm.task != "classification":
        raise BundleError(f"{model}: a {lm.task} checkpoint; the MONAI bundle export takes a classifier")
    unsupported = unsupported_step(lm.preset)
    if unsupported:
        raise BundleError(f"{model}: preset {lm.preset.name}: MONAI transforms cannot express its step {unsupported}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise BundleError(f"{out}: folder exists and is not empty; choose another or remove it")
    name = str(lm.training.get("run_name") or Path(str(model)).stem)
    version = str(lm.training.get("model_version") or "0.1.0")
    card = rm.card(name) if rm.is_reference(name) else {}
    lm_card = rm.render_card({"name": name, "version": version, **card}) if card.get("sections") else (
        f"- architecture: {lm.arch}; classes: {', '.join(lm.classes)}; preset: {lm.preset.name}\n"
        f"- COVID-19 threshold: {lm.threshold}; temperature: {lm.temperature}\n"
        f"- training: recipe {lm.training.get('recipe')}, manifest sha256 {lm.training.get('manifest_sha256')}\n"
        f"- validation metrics: {json.dumps(lm.metrics.get('val'), default=str)}\n")
    val = lm.metrics.get("val") if isinstance(lm.metrics.get("val"), dict) else {}
    for d in ("configs", "models", "docs"):
        (out / d).mkdir(parents=True, exist_ok=True)
    net = lm.model.float().eval()
    example = torch.rand(1, lm.preset.channels, lm.preset.size, lm.preset.size)
    with torch.no_grad():
        traced = torch.jit.trace(net, example, check_trace=False)
        ref = net(example)
        if not torch.allclose(traced(example), ref, atol=1e-5):
            raise BundleError(f"{model}: the traced TorchScript model differs from the PyTorch model")
    traced.save(str(out / "models" / "model.ts"))
    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, out / "models" / "model.pt")
    meta = metadata(lm.preset, lm.classes, name=name, version=version, card=card, metrics=val or {},
                    temperature=lm.temperature, threshold=lm.threshold)
    (out / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    cfg = inference_config(lm.preset, lm.classes, lm.temperature, lm.threshold, lm.logit_bias)
    (out / "configs" / "inference.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    (out / "docs" / "README.md").write_text(_readme(name, version, card, lm.preset, lm_card), encoding="utf-8")
    (out / "docs" / "license.txt").write_text(
        f"Weights: {card.get('license') or rm.LICENSE}\n{rm.RESEARCH_ONLY}; not a medical device.\n", encoding="utf-8")
    shutil.copyfile(SCHEMA_FILE, out / "configs" / SCHEMA_FILE.name)  # verify_metadata --filepath, offline
    rep = BundleReport(out_dir=str(out), source=str(lm.path), preset=lm.preset.name,
                       files=sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()))
    if parity_images:
        got = bundle_probabilities(out, parity_images)
        from covidcxr.predict import Predictor

        pred = Predictor.from_path(str(lm.path))
        want = torch_probabilities(pred, parity_images)
        rep.parity_images = len(parity_images)
        rep.max_abs_diff = float(np.max(np.abs(got - want)))
        if rep.max_abs_diff > atol:
            raise BundleError(f"{out}: the bundle's probabilities differ from covidcxr's by {rep.max_abs_diff:.2e} "
                              f"(> {atol:g}) on {len(parity_images)} images")
    return rep


def torch_probabilities(pred: Any, images: Sequence[str]) -> "Any":
    """Class probabilities (N x K) of ``images`` by covidcxr's own predictor (what ``covidcxr predict`` reports)."""
    import numpy as np

    from covidcxr.io import read_image

    batch = np.stack([pred.preprocess(read_image(f)) for f in images])
    return np.asarray(pred.probabilities(batch), dtype=np.float64)


def bundle_probabilities(bundle_dir: str | os.PathLike, images: Sequence[str]) -> "Any":
    """Class probabilities (N x K) of ``images`` through the bundle, parsed by MONAI's own ConfigParser."""
    import numpy as np

    try:
        from monai.bundle import ConfigParser
    except ImportError:
        raise BundleError("checking a MONAI bundle needs MONAI: pip install 'covidcxr[monai]'") from None
    parser = ConfigParser()
    parser.read_config(str(Path(bundle_dir) / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle_dir)
    predict = parser.get_parsed_content("predict")
    return np.asarray([predict(str(f)) for f in images], dtype=np.float64)
