"""Shortcut audit: does a classifier look at the lungs, and does burned-in text sway it?

For every image of a manifest split (and summarised per class and per source):

* **relevance in the lungs**: the share of *positive* Grad-CAM / LRP relevance (for the predicted
  class) that falls inside the lung mask, next to the share of the image the lungs cover (a map
  that ignores anatomy scores about the lung area; a model that looks at the lungs scores well
  above it);
* **lung-only performance**: accuracy and AUC when everything outside the lungs is blanked (set to
  black after the preset's geometry), against the unmasked figures, with patient-bootstrap 95 % CIs;
* **text sensitivity**: the change in predicted probability when the border band (10 % of each side)
  or one corner (25 % x 25 %) is blanked; burned-in labels, markers and figure text sit there; and
  when the blobs an OCR-free detector (:func:`detect_text`) marks as text are blanked.

Masks come from the manifest's ``mask_path`` where present and from the lung segmenter otherwise:
by default the pretrained ``lung-unet-vgg11`` (or ``$COVIDCXR_LUNG_MODEL``), ``seg_model="none"``
for none. Every record names the mask's source (``manifest``, ``segmenter <id>`` or ``none``);
segmented masks are cached by image hash, so an image is never segmented twice.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from covidcxr.decision import DecisionRule
from covidcxr.explain.methods import Context, explain
from covidcxr.explain.render import save_overlay, to_model
from covidcxr.explain.run import probabilities

log = logging.getLogger(__name__)

BORDER = 0.10  # width of the blanked border band, per side
CORNER = 0.25  # side of each blanked corner square
CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")


@dataclass
class _Item:
    row: dict
    x: torch.Tensor  # finalized input
    prepared: np.ndarray  # H x W [0,1] after the preset's prepare()
    lung: np.ndarray | None  # bool H x W at model size
    mask_source: str


def _variants(prepared: np.ndarray, lung: np.ndarray | None) -> dict[str, np.ndarray]:
    """The prepared image with regions blanked (0 = black, the X-ray's background)."""
    h, w = prepared.shape
    out = {"original": prepared}
    if lung is not None:
        out["lung_only"] = np.where(lung, prepared, 0.0).astype(np.float32)
    b_h, b_w = max(1, int(round(BORDER * h))), max(1, int(round(BORDER * w)))
    frame = prepared.copy()
    frame[:b_h], frame[-b_h:], frame[:, :b_w], frame[:, -b_w:] = 0, 0, 0, 0
    out["border_blanked"] = frame
    text = detect_text(prepared, lung)
    out["text_blanked"] = np.where(text, 0.0, prepared).astype(np.float32)
    c_h, c_w = int(round(CORNER * h)), int(round(CORNER * w))
    for name in CORNERS:
        img = prepared.copy()
        ys = slice(0, c_h) if name.startswith("top") else slice(h - c_h, h)
        xs = slice(0, c_w) if name.endswith("left") else slice(w - c_w, w)
        img[ys, xs] = 0
        out[name] = img
    return out


def detect_text(prepared: np.ndarray, lung: np.ndarray | None = None) -> np.ndarray:
    """OCR-free burned-in text detector: small, bright, high-contrast blobs outside the lungs.

    A white top-hat (kernel 1/8 of the side) keeps structures brighter than their
    surroundings and smaller than the kernel in one direction (letters, markers, rulers);
    blobs must be near-white (>= 0.85; burned-in text is usually drawn at full intensity), small
    (<= 3 % of the image each, <= 1/8 of the side high)
    and outside the lung mask (so that ribs and lesions inside the lungs are never blanked).
    Returns a bool mask of the detected text, dilated by 2 px.
    """
    import cv2

    h, w = prepared.shape
    k = max(3, min(h, w) // 8)
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (k, k))
    tophat = cv2.morphologyEx(prepared.astype(np.float32), cv2.MORPH_TOPHAT, kernel)
    cand = ((tophat > 0.25) & (prepared >= 0.85)).astype(np.uint8)
    if lung is not None:
        cand[lung] = 0
    n, lab, stats, _ = cv2.connectedComponentsWithStats(cand, connectivity=8)
    keep = [i for i in range(1, n)
            if 3 <= stats[i, cv2.CC_STAT_AREA] <= 0.03 * h * w and stats[i, cv2.CC_STAT_HEIGHT] <= max(3, h // 8)]
    mask = np.isin(lab, keep).astype(np.uint8)
    if mask.any():
        mask = cv2.dilate(mask, np.ones((5, 5), np.uint8))
    return mask.astype(bool)


def border_mask(shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    m = np.zeros(shape, bool)
    b_h, b_w = max(1, int(round(BORDER * h))), max(1, int(round(BORDER * w)))
    m[:b_h], m[-b_h:], m[:, :b_w], m[:, -b_w:] = True, True, True, True
    return m


def _share(heat: np.ndarray, region: np.ndarray) -> float:
    pos = np.clip(heat, 0, None)
    total = float(pos.sum())
    return float("nan") if total <= 0 else float(pos[region].sum() / total)


# --------------------------------------------------------------------------- metrics with patient bootstrap


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, score))


def _metrics(df: pd.DataFrame, variant: str, classes: list[str]) -> dict[str, float]:
    y = df["label_idx"].to_numpy()
    pred = df[f"pred_{variant}"].to_numpy()
    res = {"accuracy": float((y == pred).mean()) if len(y) else float("nan")}
    if "COVID-19" in classes:
        pos = classes.index("COVID-19")
        res["auc_covid"] = _auc((y == pos).astype(int), df[f"p_covid_{variant}"].to_numpy())
    return res


def bootstrap_metrics(df: pd.DataFrame, variants: Sequence[str], classes: list[str], n: int = 1000,
                      seed: int = 0) -> dict[str, dict]:
    """Point estimates, patient-bootstrap 95 % CIs, and CIs of the difference from ``original``."""
    point = {v: _metrics(df, v, classes) for v in variants}
    out: dict[str, dict] = {v: {k: {"value": val} for k, val in point[v].items()} for v in variants}
    if n <= 0 or df.empty:
        return out
    rng = np.random.default_rng(seed)
    groups = [g.index.to_numpy() for _, g in df.groupby("patient_id")]
    samples: dict[str, dict[str, list[float]]] = {v: {k: [] for k in point[v]} for v in variants}
    for _ in range(n):
        pick = rng.integers(0, len(groups), len(groups))
        sub = df.loc[np.concatenate([groups[i] for i in pick])]
        for v in variants:
            for k, val in _metrics(sub, v, classes).items():
                samples[v][k].append(val)
    for v in variants:
        for k, vals in samples[v].items():
            a = np.asarray(vals, float)
            ok = a[np.isfinite(a)]
            if len(ok):
                out[v][k]["ci95"] = [float(np.percentile(ok, 2.5)), float(np.percentile(ok, 97.5))]
            if v != "original":
                d = a - np.asarray(samples["original"][k], float)
                d = d[np.isfinite(d)]
                if len(d):
                    out[v][k]["diff_vs_original"] = point[v][k] - point["original"][k]
                    out[v][k]["diff_ci95"] = [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))]
    return out


# --------------------------------------------------------------------------- main entry


def audit_model(
    model: str | os.PathLike,
    manifest: str | os.PathLike,
    *,
    split: str = "test",
    out: str | os.PathLike,
    seg_model: str | os.PathLike | None = None,
    progress: bool = True,
    methods: Sequence[str] = ("gradcam", "lrp"),
    batch_size: int = 8,
    examples: int = 6,
    bootstrap: int = 1000,
    limit: int | None = None,
    seed: int = 0,
    on_error: Callable[[str, str], None] | None = None,
) -> dict:
    """Run the audit; write ``audit.md``, ``audit.json``, ``per_image.csv`` and ``examples/`` under ``out``.

    ``seg_model``: segmenter for images without ``mask_path`` (name or checkpoint; ``None``: the
    default segmenter; ``"none"``: no segmenter). ``progress``: a progress bar on stderr.
    """
    from covidcxr.data import ManifestError, read_manifest
    from covidcxr.io import CXRReadError, read_image
    from covidcxr.models import load
    from covidcxr.preprocess import PresetError

    loaded = load(model)
    if loaded.task != "classification":
        raise PresetError(f"{model}: a {loaded.task} checkpoint; the audit needs a classification checkpoint")
    net, preset, classes = loaded.model.eval(), loaded.preset, list(loaded.classes)
    df = read_manifest(manifest)
    if split != "all":
        if "split" not in df.columns:
            raise ManifestError(f"{manifest}: no 'split' column; use --split all")
        df = df[df["split"] == split]
    if df.empty:
        raise ManifestError(f"{manifest}: no images in split {split!r}")
    if limit:
        df = df.sample(n=min(limit, len(df)), random_state=seed).sort_index()
    seg, seg_note = _segmenter(seg_model, needed=_needs_segmenter(df))
    outdir = Path(out)
    (outdir / "examples").mkdir(parents=True, exist_ok=True)
    ctx = Context(arch=loaded.arch, preset=preset)
    records: list[dict] = []
    kept: dict[int, dict] = {}  # per-record data for example overlays
    failures: list[tuple[str, str]] = []
    no_mask = 0
    rows = df.to_dict("records")
    from tqdm.auto import tqdm

    bar = tqdm(total=len(rows), desc="audit-model", unit="img", disable=not progress, leave=False)
    for start in range(0, len(rows), batch_size):
        bar.update(len(rows[start : start + batch_size]))
        items: list[_Item] = []
        for row in rows[start : start + batch_size]:
            path = str(row["path"])
            try:
                img = read_image(path)
                lung_full, source = None, "none"
                mp = row.get("mask_path")
                if isinstance(mp, str) and mp:
                    from covidcxr.segment import read_mask

                    lung_full, source = read_mask(mp, img.shape), "manifest"
                elif seg is not None:
                    lung_full, source = seg(img), f"segmenter {seg.id}"
                crop_mask = lung_full if preset.needs_lung_mask else None
                if preset.needs_lung_mask and crop_mask is None:
                    raise PresetError(f"{path}: preset {preset.name} needs a lung mask and no segmenter is "
                                      f"available ({seg_note}); pass --seg-model")
                prepared = preset.prepare(img, crop_mask)
                lung = None
                if lung_full is not None:
                    lung = to_model(lung_full.astype(np.float32), preset, crop_mask, nearest=True) > 0.5
                    if not lung.any():
                        lung, source = None, source + " (empty)"
                if lung is None:
                    no_mask += 1
                items.append(_Item(row, preset.finalize(prepared), prepared, lung, source))
            except (CXRReadError, PresetError) as err:
                reason = str(err).removeprefix(f"{path}: ")
                failures.append((path, reason))
                if on_error:
                    on_error(path, reason)
        if not items:
            continue
        x = torch.stack([it.x for it in items])
        with torch.no_grad():
            p0 = probabilities(net, x, loaded.temperature, loaded.logit_bias)
        rule = DecisionRule.from_predictor(loaded)  # the checkpoint's operating point, as predict labels
        pred = torch.as_tensor(rule.label_indices(p0.numpy(), classes), dtype=torch.long)
        heats = {m: explain(net, x, m, target=pred, ctx=ctx).cpu().numpy() for m in methods}
        for i, it in enumerate(items):
            variants = _variants(it.prepared, it.lung)
            names = list(variants)
            xv = torch.stack([preset.finalize(variants[n]) for n in names])
            with torch.no_grad():
                pv = probabilities(net, xv, loaded.temperature, loaded.logit_bias).numpy()
            k = int(pred[i])
            row = it.row
            rec = {
                "file": str(row["path"]), "patient_id": row["patient_id"], "source": row["source"],
                "label": row["label"], "label_idx": classes.index(row["label"]) if row["label"] in classes else -1,
                "mask_source": it.mask_source, "predicted": classes[k],
                "lung_area": float(it.lung.mean()) if it.lung is not None else float("nan"),
            }
            for j, n in enumerate(names):
                rec[f"pred_{n}"] = int(rule.label_indices(pv[j : j + 1], classes)[0])
                rec[f"p_pred_{n}"] = float(pv[j, k])
                if "COVID-19" in classes:
                    rec[f"p_covid_{n}"] = float(pv[j, classes.index("COVID-19")])
            if it.lung is None:
                rec.update({"pred_lung_only": -1, "p_pred_lung_only": float("nan"), "p_covid_lung_only": float("nan")})
            rec["text_delta_border"] = rec["p_pred_border_blanked"] - rec["p_pred_original"]
            rec["text_detected_share"] = float((variants["text_blanked"] != it.prepared).mean())
            rec["text_delta_detected"] = rec["p_pred_text_blanked"] - rec["p_pred_original"]
            rec["text_delta_corner_max"] = max((rec[f"p_pred_{c}"] - rec["p_pred_original"] for c in CORNERS), key=abs)
            rec["lung_only_delta"] = rec["p_pred_lung_only"] - rec["p_pred_original"]
            frame = border_mask(it.prepared.shape)
            for m in methods:
                h = heats[m][i]
                rec[f"{m}_in_lungs"] = _share(h, it.lung) if it.lung is not None else float("nan")
                rec[f"{m}_in_border"] = _share(h, frame)
            kept[len(records)] = {"image": it.prepared, "lung": it.lung, "heats": {m: heats[m][i] for m in methods}}
            records.append(rec)
    bar.close()
    if not records:
        raise ManifestError(f"{manifest}: none of the {len(rows)} images could be audited")
    per = pd.DataFrame(records)
    report = _summarise(per, classes, methods, loaded, model, manifest, split, bootstrap, seed, failures, no_mask)
    report["segmenter"] = {**(seg.segmenter.describe() if seg is not None else {"segmenter": None}),
                           "note": seg_note, "images_segmented": seg.calls if seg is not None else 0}
    report["examples"] = _examples(per, kept, methods, outdir / "examples", examples)
    per.to_csv(outdir / "per_image.csv", index=False)
    (outdir / "audit.json").write_text(json.dumps({**report, "per_image": records}, indent=2, default=_json))
    (outdir / "audit.md").write_text(_markdown(report, methods))
    return report


def _needs_segmenter(df: pd.DataFrame) -> bool:
    if "mask_path" not in df.columns:
        return True
    mp = df["mask_path"]
    return bool((mp.isna() | (mp.astype(str).str.strip() == "")).any())


def _segmenter(spec: str | os.PathLike | None, needed: bool):
    """The cached segmenter for images without a manifest mask, and a note saying which (or why none).

    A named segmenter that cannot be loaded is an error; the *default* one falling through
    (weights not found offline) leaves those images without a mask and says so in the report."""
    if spec is not None and str(spec).lower() == "none":
        return None, "disabled (--seg-model none)"
    if not needed:
        return None, "not needed (every image has a manifest mask)"
    from covidcxr.models.checkpoint import CheckpointError
    from covidcxr.models.registry import ModelError
    from covidcxr.segment import CachedSegmenter, MaskCache, load_segmenter
    from covidcxr.segment.loading import cache_dir, default_segmenter

    name = str(spec) if spec else default_segmenter()
    try:
        seg = load_segmenter(name, backend="auto")  # onnxruntime when installed: ~30 % less CPU
    except (ModelError, CheckpointError) as err:
        if spec:
            raise
        log.warning("audit-model: no lung segmenter (%s); images without a manifest mask get none", err)
        return None, f"default segmenter unavailable: {err}"
    return CachedSegmenter(seg, MaskCache(cache_dir() / "masks")), f"{seg.id} ({'named' if spec else 'default'})"


def _json(o: object) -> object:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(type(o).__name__)


def _mean(s: pd.Series) -> float:
    s = pd.to_numeric(s, errors="coerce")
    return float(s.mean()) if s.notna().any() else float("nan")


def _group_table(per: pd.DataFrame, by: str, methods: Sequence[str]) -> list[dict]:
    rows = []
    for key, g in per.groupby(by):
        lung = g[g["pred_lung_only"] >= 0]
        r = {by: key, "n": int(len(g)), "with_mask": int(len(lung)), "lung_area": _mean(g["lung_area"])}
        for m in methods:
            r[f"{m}_in_lungs"] = _mean(g[f"{m}_in_lungs"])
            r[f"{m}_in_border"] = _mean(g[f"{m}_in_border"])
        r["accuracy"] = float((g["pred_original"] == g["label_idx"]).mean())
        r["accuracy_lung_only"] = float((lung["pred_lung_only"] == lung["label_idx"]).mean()) if len(lung) else float("nan")
        r["accuracy_unmasked_same_images"] = float((lung["pred_original"] == lung["label_idx"]).mean()) if len(lung) else float("nan")
        r["changed_by_lung_only"] = float((lung["pred_lung_only"] != lung["pred_original"]).mean()) if len(lung) else float("nan")
        r["text_delta_border"] = _mean(g["text_delta_border"])
        r["abs_text_delta_border"] = _mean(g["text_delta_border"].abs())
        r["abs_text_delta_corner_max"] = _mean(g["text_delta_corner_max"].abs())
        r["changed_by_border"] = float((g["pred_border_blanked"] != g["pred_original"]).mean())
        r["text_detected"] = float((g["text_detected_share"] > 0).mean())
        r["abs_text_delta_detected"] = _mean(g["text_delta_detected"].abs())
        rows.append(r)
    return rows


def _summarise(per, classes, methods, loaded, model, manifest, split, bootstrap, seed, failures, no_mask) -> dict:
    labelled = per[per["label_idx"] >= 0]
    with_mask = labelled[labelled["pred_lung_only"] >= 0].reset_index(drop=True)
    metrics = {
        "all_images": bootstrap_metrics(labelled.reset_index(drop=True), ["original", "border_blanked"], classes,
                                        bootstrap, seed),
        "images_with_lung_mask": bootstrap_metrics(with_mask, ["original", "lung_only"], classes, bootstrap, seed)
        if len(with_mask) else {},
    }
    overall = {"n": int(len(per)), "lung_area": _mean(per["lung_area"])}
    for m in methods:
        overall[f"{m}_in_lungs"] = _mean(per[f"{m}_in_lungs"])
        overall[f"{m}_in_border"] = _mean(per[f"{m}_in_border"])
        vals = pd.to_numeric(per[f"{m}_in_lungs"], errors="coerce") - per["lung_area"]
        overall[f"{m}_share_of_images_below_lung_area"] = float((vals.dropna() < 0).mean()) if vals.notna().any() else float("nan")
    overall["abs_text_delta_border"] = _mean(per["text_delta_border"].abs())
    overall["abs_text_delta_corner_max"] = _mean(per["text_delta_corner_max"].abs())
    overall["changed_by_border"] = float((per["pred_border_blanked"] != per["pred_original"]).mean())
    overall["text_detected"] = float((per["text_detected_share"] > 0).mean())
    overall["abs_text_delta_detected"] = _mean(per["text_delta_detected"].abs())
    headline = _headline(overall, metrics, methods)
    return {
        "model": str(model), "arch": loaded.arch, "preset": preset_name(loaded), "manifest": str(manifest),
        "split": split, "classes": classes, "methods": list(methods),
        "settings": {"border": BORDER, "corner": CORNER, "bootstrap": bootstrap, "seed": seed,
                     "blank_value": "0 (black) in the preset's [0,1] image, before normalisation"},
        "mask_sources": per["mask_source"].value_counts().to_dict(), "images_without_mask": int(no_mask),
        "overall": overall, "metrics": metrics,
        "per_class": _group_table(per, "label", methods), "per_source": _group_table(per, "source", methods),
        "failures": [{"file": f, "reason": r} for f, r in failures], "headline": headline,
    }


def preset_name(loaded) -> str:
    return loaded.preset.name


def _fmt(v: float, pct: bool = False) -> str:
    if v is None or not np.isfinite(v):
        return "n/a"
    return f"{100 * v:.0f}%" if pct else f"{v:.3f}"


def _ci(d: dict, key: str = "ci95") -> str:
    ci = d.get(key)
    return f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""


def _headline(overall: dict, metrics: dict, methods: Sequence[str]) -> str:
    parts = []
    la = overall["lung_area"]
    for m in methods:
        parts.append(f"{m}: {_fmt(overall[f'{m}_in_lungs'], True)} of positive relevance inside the lungs "
                     f"(lungs cover {_fmt(la, True)} of the input)")
    lm = metrics.get("images_with_lung_mask", {})
    if lm:
        a0, a1 = lm["original"]["accuracy"], lm["lung_only"]["accuracy"]
        parts.append(f"accuracy {a0['value']:.3f} unmasked -> {a1['value']:.3f} with everything outside the "
                     f"lungs blanked (difference {a1.get('diff_vs_original', float('nan')):+.3f}, 95% CI"
                     f"{_ci(a1, 'diff_ci95')})")
    parts.append(f"blanking the border band changes p(predicted) by {_fmt(overall['abs_text_delta_border'])} on "
                 f"average and flips {_fmt(overall['changed_by_border'], True)} of predictions")
    return "; ".join(parts) + "."


def _examples(per: pd.DataFrame, kept: dict, methods: Sequence[str], folder: Path, n: int) -> list[dict]:
    """Overlays for the images whose relevance lies most outside the lungs, one class after another."""
    if n <= 0 or not methods:
        return []
    m0 = methods[0]
    order = per.assign(_s=pd.to_numeric(per[f"{m0}_in_lungs"], errors="coerce").fillna(2.0))
    picks: list[int] = []
    by_class = [g.sort_values("_s").index.tolist() for _, g in order.groupby("label")]
    while len(picks) < min(n, len(per)) and any(by_class):
        for lst in by_class:
            if lst and len(picks) < n:
                picks.append(lst.pop(0))
    out = []
    from covidcxr.explain.methods import SIGNED

    for idx in picks:
        rec, data = per.loc[idx], kept[idx]
        for m in methods:
            name = f"{idx:04d}_{Path(rec['file']).stem[:40]}_{m}.png"
            title = (f"{rec['source']} | label {rec['label']} | pred {rec['predicted']} "
                     f"(p={rec['p_pred_original']:.2f})\n{m}: {_fmt(rec[f'{m}_in_lungs'], True)} in lungs "
                     f"(area {_fmt(rec['lung_area'], True)})")
            save_overlay(folder / name, data["image"], data["heats"][m], title=title, signed=m in SIGNED,
                         contour=data["lung"])
            out.append({"file": rec["file"], "method": m, "overlay": f"examples/{name}",
                        "in_lungs": rec[f"{m}_in_lungs"], "label": rec["label"], "source": rec["source"]})
    return out


def _markdown(r: dict, methods: Sequence[str]) -> str:
    L = [f"# Shortcut audit: {Path(r['model']).name} ({r['arch']}, preset {r['preset']})", "",
         f"Data: `{r['manifest']}`, split `{r['split']}`, {r['overall']['n']} images "
         f"(lung masks: {r['mask_sources']}; without mask: {r['images_without_mask']}; segmenter: "
         f"{r.get('segmenter', {}).get('note', 'n/a')}). "
         "Research use only: these figures describe this model on this data, not clinical performance.", "",
         f"**Finding.** {r['headline']}", "",
         "## Relevance inside the lungs", "",
         "Share of positive relevance (for the predicted class) inside the lung mask, against the share of the "
         "input the lungs cover. A model that uses the lungs scores well above the lung area; at or below it, the "
         "model draws its evidence from elsewhere (borders, text, devices, the body outline).", ""]
    head = ["group", "n", "lung area"] + [f"{m} in lungs" for m in methods] + [f"{m} in border" for m in methods]
    o = r["overall"]
    for title, key in (("per class", "per_class"), ("per source", "per_source")):
        L += [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        gk = "label" if key == "per_class" else "source"
        for g in r[key] + [{**o, gk: "**all**"}]:
            cells = [str(g[gk]), str(g["n"]), _fmt(g["lung_area"], True)]
            cells += [_fmt(g[f"{m}_in_lungs"], True) for m in methods] + [_fmt(g[f"{m}_in_border"], True) for m in methods]
            L.append("| " + " | ".join(cells) + " |")
        L.append("")
    L += ["", "## Lungs only vs unmasked (images with a lung mask)", "",
          "Everything outside the lung mask is set to black. 95 % CIs: patient bootstrap; the difference CI is paired.",
          "", "| metric | unmasked | lungs only | difference [95% CI] |", "|---|---|---|---|"]
    lm = r["metrics"].get("images_with_lung_mask", {})
    for k in ("accuracy", "auc_covid"):
        if lm and k in lm.get("original", {}):
            a, b = lm["original"][k], lm["lung_only"][k]
            L.append(f"| {k} | {_fmt(a['value'])}{_ci(a)} | {_fmt(b['value'])}{_ci(b)} | "
                     f"{_fmt(b.get('diff_vs_original', float('nan')))}{_ci(b, 'diff_ci95')} |")
    L += ["", "| group | n with mask | accuracy unmasked | accuracy lungs only | predictions changed |",
          "|---|---|---|---|---|"]
    for g in r["per_class"] + r["per_source"]:
        name = g.get("label", g.get("source"))
        L.append(f"| {name} | {g['with_mask']} | {_fmt(g['accuracy_unmasked_same_images'])} | "
                 f"{_fmt(g['accuracy_lung_only'])} | {_fmt(g['changed_by_lung_only'], True)} |")
    L += ["", "## Text sensitivity", "",
          f"Change in the predicted class's probability when the border band ({int(BORDER * 100)} % of each side) "
          f"or one corner ({int(CORNER * 100)} % x {int(CORNER * 100)} %) is blanked.", "",
          "The OCR-free detector (bright, small, high-contrast blobs outside the lungs) marks likely burned-in "
          "text; its column gives the share of images where it found some and the mean abs Δp when it is blanked.",
          "",
          "| group | mean Δp border | mean abs Δp border | mean max abs Δp corner | predictions changed (border) "
          "| text detected | mean abs Δp detected text |",
          "|---|---|---|---|---|---|---|"]
    for g in r["per_class"] + r["per_source"]:
        name = g.get("label", g.get("source"))
        L.append(f"| {name} | {_fmt(g['text_delta_border'])} | {_fmt(g['abs_text_delta_border'])} | "
                 f"{_fmt(g['abs_text_delta_corner_max'])} | {_fmt(g['changed_by_border'], True)} | "
                 f"{_fmt(g['text_detected'], True)} | {_fmt(g['abs_text_delta_detected'])} |")
    am = r["metrics"].get("all_images", {})
    if am:
        L += ["", "| metric (all images) | unmasked | border blanked | difference [95% CI] |", "|---|---|---|---|"]
        for k in ("accuracy", "auc_covid"):
            if k in am.get("original", {}):
                a, b = am["original"][k], am["border_blanked"][k]
                L.append(f"| {k} | {_fmt(a['value'])}{_ci(a)} | {_fmt(b['value'])}{_ci(b)} | "
                         f"{_fmt(b.get('diff_vs_original', float('nan')))}{_ci(b, 'diff_ci95')} |")
    if r.get("examples"):
        L += ["", "## Examples (relevance most outside the lungs; green: lung mask)", ""]
        for e in r["examples"]:
            L.append(f"![{e['method']} {Path(e['file']).name}]({e['overlay']})")
    if r["failures"]:
        L += ["", "## Skipped files", ""] + [f"- `{f['file']}`: {f['reason']}" for f in r["failures"]]
    return "\n".join(L) + "\n"
