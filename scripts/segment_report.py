#!/usr/bin/env python
"""Lung segmenters measured across sources, and the plausibility check measured on real and generated images.

Re-run (outputs under --out; per-image CSVs are resumed, masks cached by image hash under --out/masks):

    COVIDCXR_WEIGHTS_DIR=../shared/weights OMP_NUM_THREADS=1 .venv/bin/python scripts/segment_report.py \\
        --shared ../shared/data --manifest RUN/dev/manifest.csv \\
        --scratch RUN/scratch128/segmenter.pt --finetuned RUN/ft256/segmenter.pt \\
        --out benchmarks/results/segment_report [--steps dice,sources,generated,sheet,summary] \\
        [--segmenters scratch,finetuned,pretrained,pretrained@256] [--sample-512 30]

Steps:
  dice       Dice of each segmenter on the manifest's test-split masks (held-out patients), 95 % CI from
             1000 patient-bootstrap resamples -> dice.csv, dice.json (rows/entries of segmenters not named
             in --segmenters are kept)
  sources    every image of every shared source (cohen, figure1, actualmed from covid-cxr-dev; nih;
             hannover): lung fraction, left/right balance, plausibility verdict per segmenter ->
             per_image_<segmenter>.csv, in a seeded random order (an interrupted run is a random sample;
             a re-run resumes). The 512-px pretrained U-Net (3 CPU-s/image) runs on --sample-512 images
             per source; the others on every image (or --per-source).
  reassess   re-judge the per-image CSVs with the current rules from the cached masks (after a rule change)
  generated  plausibility check (pretrained U-Net at 256 px, the check's default) on generated non-CXR
             images -> generated.csv
  rotated    the check on --rotated real films turned 90/180/270 degrees, films that neither the generated
             set nor the threshold setting used -> rotated.csv
  sheet      contact sheet: one image per source (rows) x segmenter (columns) -> contact_sheet.png
  summary    tables -> report.md, summary.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

SOURCES = ("cohen", "figure1", "actualmed", "nih", "hannover")
#: the plausibility check's intensity measurements, kept per image next to the mask's
INTENSITY = ("bottom_minus_top", "below_minus_above", "on_its_side", "frontal_signature", "shape_rule_waived")


def list_images(shared: Path) -> pd.DataFrame:
    rows = []
    dev = shared / "covid-cxr-dev"
    meta = pd.read_csv(dev / "metadata.csv")
    for r in meta.itertuples():
        rows.append({"path": str(dev / "images" / r.filename), "source": r.source, "patient": r.patient_id})
    nih = pd.read_csv(shared / "nih-cxr14-subset" / "Data_Entry_2017_v2020.csv")
    for r in nih.itertuples():
        rows.append({"path": str(shared / "nih-cxr14-subset" / "images" / r[1]), "source": "nih",
                     "patient": f"nih-{r[4]}"})
    han = pd.read_csv(shared / "hannover-covid" / "data.csv", dtype=str)
    for r in han.itertuples():
        rows.append({"path": str(shared / "hannover-covid" / "png" / f"{r.image_id}.png"), "source": "hannover",
                     "patient": f"hannover-{r.patient_id}"})
    df = pd.DataFrame(rows)
    return df[df["path"].map(lambda p: Path(p).is_file())].reset_index(drop=True)


def segmenters(args) -> dict[str, tuple[str, int | None]]:
    s = {"pretrained": ("lung-unet-vgg11", None), "pretrained@256": ("lung-unet-vgg11", 256)}
    if args.scratch:
        s["scratch"] = (args.scratch, None)
    if args.finetuned:
        s["finetuned"] = (args.finetuned, None)
    wanted = [x for x in args.segmenters.split(",") if x] if args.segmenters else list(s)
    return {k: s[k] for k in wanted if k in s}


def _cached(spec, size, out: Path):
    from covidcxr.segment import CachedSegmenter, MaskCache, load_segmenter

    return CachedSegmenter(load_segmenter(spec, size=size), MaskCache(out / "masks"))


def step_dice(args, segs, out: Path) -> None:
    from covidcxr.data import read_manifest
    from covidcxr.io import read_image
    from covidcxr.segment import dice, read_mask, summarize_dice

    df = read_manifest(args.manifest)
    df = df[(df["split"] == "test") & df["mask_path"].notna()].reset_index(drop=True)
    pairs = []
    for r in df.itertuples():
        img = read_image(r.path)
        pairs.append((img, read_mask(r.mask_path, img.shape)))
    rows, summary = [], {}
    for name, (spec, size) in segs.items():
        seg = _cached(spec, size, out)
        t = time.time()
        masks = seg.segment_many([im for im, _ in pairs])
        d = [dice(m, gt) for m, (_, gt) in zip(masks, pairs)]
        summary[name] = {**summarize_dice(d, df["patient_id"].astype(str).tolist()), "segmenter": seg.id,
                         "seconds": round(time.time() - t, 1)}
        rows += [{"segmenter": name, "path": p, "patient_id": pid, "dice": v}
                 for p, pid, v in zip(df["path"], df["patient_id"], d)]
        print(f"dice {name}: {summary[name]['mean']:.4f} {summary[name]['ci95']} ({summary[name]['seconds']}s)",
              flush=True)
    new = pd.DataFrame(rows)
    if (out / "dice.csv").is_file():  # keep the rows of segmenters not re-run this time
        old_rows = pd.read_csv(out / "dice.csv")
        new = pd.concat([old_rows[~old_rows["segmenter"].isin(list(segs))], new], ignore_index=True)
    new.to_csv(out / "dice.csv", index=False)
    old = json.loads((out / "dice.json").read_text()) if (out / "dice.json").is_file() else {}
    (out / "dice.json").write_text(json.dumps({**old, **summary, "_data": f"{args.manifest} split test: "
                                               f"{len(df)} masked images, {df['patient_id'].nunique()} patients"},
                                              indent=2))


def step_sources(args, segs, out: Path) -> None:
    from covidcxr.io import CXRReadError, read_image
    from covidcxr.segment.plausibility import assess

    images = list_images(Path(args.shared))
    keep = ("fraction", "components", "balance", "left_fraction", "right_fraction", "cx", "cy", "side_by_side",
            "apex_base_ratio", "aspect", "intensity_std", *INTENSITY)
    for name, (spec, size) in segs.items():
        # a seeded shuffle: stopped at any point, the images done so far are a random sample of each source
        sel = images.sample(frac=1.0, random_state=0)
        cap = args.sample_512 if name == "pretrained" else args.per_source
        if cap:
            sel = sel.groupby("source", group_keys=False).head(cap)
        f = out / f"per_image_{name.replace('@', '_')}.csv"
        done = set(pd.read_csv(f)["path"]) if f.is_file() else set()
        todo = sel[~sel["path"].isin(done)]
        print(f"sources {name}: {len(todo)} of {len(sel)} images to segment", flush=True)
        if todo.empty:
            continue
        seg = _cached(spec, size, out)
        t0 = time.time()
        for start in range(0, len(todo), 8):
            chunk = todo.iloc[start : start + 8]
            imgs, recs = [], []
            for r in chunk.itertuples():
                try:
                    imgs.append(read_image(r.path))
                    recs.append(r)
                except CXRReadError as err:
                    print(f"  skip {err}", file=sys.stderr)
            rows = []
            for r, img, m in zip(recs, imgs, seg.segment_many(imgs)):
                v = assess(m, img, seg.id)
                rows.append({"path": r.path, "source": r.source, "patient": r.patient, "segmenter": name,
                             "plausible": v.plausible, "rule": v.rule or "",
                             **{k: v.measurements.get(k) for k in keep}})
            new = pd.DataFrame(rows)
            if f.is_file() and list(pd.read_csv(f, nrows=0).columns) != list(new.columns):
                new = pd.concat([pd.read_csv(f), new], ignore_index=True)  # columns changed: rewrite the file
                new.to_csv(f, index=False)
            else:
                new.to_csv(f, mode="a", header=not f.is_file(), index=False)
            n = start + len(chunk)
            print(f"  {name}: {n}/{len(todo)} ({(time.time() - t0) / n:.2f} s/image)", flush=True)


def step_reassess(args, segs, out: Path) -> None:
    """Re-judge every row of the per-image CSVs with the current rules, from the cached masks (no
    segmentation unless a mask is missing from the cache)."""
    from covidcxr.io import read_image
    from covidcxr.segment.plausibility import assess

    keep = ("fraction", "components", "balance", "left_fraction", "right_fraction", "cx", "cy", "side_by_side",
            "apex_base_ratio", "aspect", "intensity_std", *INTENSITY)
    for name, (spec, size) in segs.items():
        f = out / f"per_image_{name.replace('@', '_')}.csv"
        if not f.is_file():
            continue
        df = pd.read_csv(f).drop_duplicates("path")
        seg = _cached(spec, size, out)
        rows = []
        for r in df.itertuples():
            img = read_image(r.path)
            v = assess(seg(img), img, seg.id)
            rows.append({"path": r.path, "source": r.source, "patient": r.patient, "segmenter": name,
                         "plausible": v.plausible, "rule": v.rule or "", **{k: v.measurements.get(k) for k in keep}})
        pd.DataFrame(rows).to_csv(f, index=False)
        print(f"reassess {name}: {len(rows)} rows, {seg.calls} segmented", flush=True)


def step_generated(args, out: Path) -> None:
    from covidcxr.io import read_image
    from covidcxr.segment.negatives import generated_set
    from covidcxr.segment.plausibility import check_many

    images = list_images(Path(args.shared))
    films = [read_image(p) for p in images.groupby("source").head(2)["path"]]  # 2 real films per source
    gen = generated_set(films, seeds=3)
    lateral = Path(args.shared) / "source-samples" / "cohen" / "images" / "000002-7.png"  # a real lateral view
    if lateral.is_file():
        gen.append(("real_lateral", read_image(lateral)))
    # the check's own segmenter (pretrained at 256 px, onnxruntime when installed), masks cached under --out
    from covidcxr.segment import CachedSegmenter, MaskCache, load_segmenter
    from covidcxr.segment.plausibility import SIZE

    seg = CachedSegmenter(load_segmenter("lung-unet-vgg11", size=SIZE, backend="auto"), MaskCache(out / "masks"))
    verdicts = check_many([im for _, im in gen], segmenter=seg)
    print(f"generated: {seg.calls} of {len(gen)} images segmented (the rest from the mask cache)", flush=True)
    rows = [{"kind": k, "caught": not v.plausible, "rule": v.rule or "", "reason": v.reason}
            for (k, _), v in zip(gen, verdicts)]
    pd.DataFrame(rows).to_csv(out / "generated.csv", index=False)
    d = pd.DataFrame(rows)
    print(f"generated: {d['caught'].mean():.3f} caught of {len(d)}", flush=True)
    print(d.groupby("kind")["caught"].mean().to_string(), flush=True)


def step_rotated(args, out: Path) -> None:
    """Films turned by 90, 180 and 270 degrees, from --rotated real films that neither the generated set
    nor the 60 films looked at while setting the intensity thresholds (seeded draw 7) used -> rotated.csv."""
    from covidcxr.io import read_image
    from covidcxr.segment import CachedSegmenter, MaskCache, load_segmenter
    from covidcxr.segment.negatives import from_cxr
    from covidcxr.segment.plausibility import SIZE, check_many

    images = list_images(Path(args.shared))
    measured = set(images.groupby("source").head(2)["path"])
    pool = [p for p in images["path"] if p not in measured]
    design = set(np.random.default_rng(7).choice(pool, 60, replace=False))
    fresh = [p for p in pool if p not in design]
    picks = np.random.default_rng(11).choice(fresh, min(args.rotated, len(fresh)), replace=False)
    seg = CachedSegmenter(load_segmenter("lung-unet-vgg11", size=SIZE, backend="auto"), MaskCache(out / "masks"))
    rows = []
    for path in picks:
        film = read_image(path)
        kinds = ("rot90", "rot180", "rot270")
        for kind, v in zip(kinds, check_many([from_cxr(film, k) for k in kinds], segmenter=seg)):
            rows.append({"path": path, "kind": kind, "caught": not v.plausible, "rule": v.rule or ""})
    d = pd.DataFrame(rows)
    d.to_csv(out / "rotated.csv", index=False)
    print(f"rotated: {d['caught'].mean():.3f} caught of {len(d)} ({seg.calls} segmented)", flush=True)
    print(d.groupby("kind")["caught"].mean().to_string(), flush=True)


def step_sheet(args, segs, out: Path) -> None:
    import cv2

    from covidcxr.io import read_image
    from covidcxr.segment import overlay

    images = list_images(Path(args.shared))
    rng = np.random.default_rng(3)
    picks = [g.iloc[int(rng.integers(len(g)))] for _, g in images.groupby("source")]
    picks = sorted(picks, key=lambda r: SOURCES.index(r["source"]))
    tile = args.tile
    rows = []
    order = [s for s in ("scratch", "pretrained", "finetuned") if s in segs]
    for r in picks:
        img = read_image(r["path"])
        cells = []
        for name in order:
            spec, size = segs[name]
            m = _cached(spec, size, out)(img)
            ov = cv2.resize(overlay(img, m), (tile, tile), interpolation=cv2.INTER_AREA)
            cv2.putText(ov, f"{r['source']} / {name}", (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 255, 255), 1)
            cells.append(ov)
        rows.append(np.hstack(cells))
    sheet = np.vstack(rows)
    cv2.imwrite(str(out / "contact_sheet.png"), sheet, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    (out / "contact_sheet.txt").write_text("\n".join(f"{r['source']}: {r['path']}" for r in picks) + "\n")
    print(f"contact sheet: {out / 'contact_sheet.png'} ({(out / 'contact_sheet.png').stat().st_size // 1024} KB)")


def _q(s: pd.Series) -> str:
    s = pd.to_numeric(s, errors="coerce").dropna()
    if s.empty:
        return "n/a"
    return f"{s.median():.2f} [{s.quantile(0.05):.2f}, {s.quantile(0.95):.2f}]"


def _wilson(k: int, n: int) -> str:
    if n == 0:
        return "n/a"
    z = 1.96
    p = k / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return f"{100 * p:.1f}% ({k}/{n}) [{100 * max(0, c - h):.1f}, {100 * min(1, c + h):.1f}]"


def step_summary(args, segs, out: Path) -> None:
    L = ["# Lung segmenters across sources (scripts/segment_report.py)", ""]
    summary: dict = {}
    if (out / "dice.json").is_file():
        d = json.loads((out / "dice.json").read_text())
        L += [f"## Dice on held-out patients ({d.get('_data', '')})", "",
              "| segmenter | id | Dice mean [95% CI] | median | min | s |", "|---|---|---|---|---|---|"]
        for k, v in d.items():
            if k.startswith("_"):
                continue
            L.append(f"| {k} | `{v['segmenter']}` | {v['mean']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}] | "
                     f"{v['median']:.3f} | {v['min']:.3f} | {v['seconds']} |")
        summary["dice"] = d
        L.append("")
    per = [pd.read_csv(f) for f in sorted(out.glob("per_image_*.csv"))]
    if per:
        allp = pd.concat(per)
        L += ["## Per source: lung fraction, left/right balance (median [5th, 95th percentile]), share failing "
              "the plausibility rules (95% Wilson CI)", "",
              "| source | segmenter | n | lung fraction | balance (smaller/larger) | left / right lung fraction | "
              "implausible | failed rules |", "|---|---|---|---|---|---|---|---|"]
        summary["sources"] = []
        for src in SOURCES:
            for name in ("scratch", "pretrained", "pretrained@256", "finetuned"):
                g = allp[(allp["source"] == src) & (allp["segmenter"] == name)]
                if g.empty:
                    continue
                bad = int((~g["plausible"].astype(bool)).sum())
                rules = g.loc[~g["plausible"].astype(bool), "rule"].value_counts().to_dict()
                L.append(f"| {src} | {name} | {len(g)} | {_q(g['fraction'])} | {_q(g['balance'])} | "
                         f"{_q(g['left_fraction'])} / {_q(g['right_fraction'])} | {_wilson(bad, len(g))} | "
                         f"{', '.join(f'{k} {v}' for k, v in rules.items()) or '-'} |")
                summary["sources"].append({"source": src, "segmenter": name, "n": len(g), "implausible": bad,
                                           "rules": rules, "fraction_median": float(g["fraction"].median()),
                                           "balance_median": float(g["balance"].median())})
        L.append("")
        L += ["## All real images, per segmenter", "", "| segmenter | n | implausible (95% Wilson CI) |", "|---|---|---|"]
        for name, g in allp.groupby("segmenter"):
            bad = int((~g["plausible"].astype(bool)).sum())
            L.append(f"| {name} | {len(g)} | {_wilson(bad, len(g))} |")
        L.append("")
    if (out / "generated.csv").is_file():
        g = pd.read_csv(out / "generated.csv")
        k = int(g["caught"].sum())
        L += [f"## Generated non-CXR images: caught {_wilson(k, len(g))}", "", "| kind | n | caught | rules |",
              "|---|---|---|---|"]
        for kind, h in g.groupby("kind", sort=False):
            L.append(f"| {kind} | {len(h)} | {int(h['caught'].sum())} | "
                     f"{', '.join(f'{a} {b}' for a, b in h['rule'].value_counts().items() if a) or '-'} |")
        summary["generated"] = {"n": len(g), "caught": k}
        L.append("")
    if (out / "rotated.csv").is_file():
        g = pd.read_csv(out / "rotated.csv")
        k = int(g["caught"].sum())
        L += [f"## Turned films ({g['path'].nunique()} real films not used to set thresholds): caught "
              f"{_wilson(k, len(g))}", "", "| kind | n | caught (95% Wilson CI) | rules |", "|---|---|---|---|"]
        for kind, h in g.groupby("kind"):
            L.append(f"| {kind} | {len(h)} | {_wilson(int(h['caught'].sum()), len(h))} | "
                     f"{', '.join(f'{a} {b}' for a, b in h['rule'].value_counts().items() if isinstance(a, str) and a) or '-'} |")
        summary["rotated"] = {"n": len(g), "caught": k}
        L.append("")
    (out / "report.md").write_text("\n".join(L) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print("\n".join(L))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default="../shared/data")
    ap.add_argument("--manifest", help="dev manifest with a patient-level split and mask_path (data build, seed 62)")
    ap.add_argument("--scratch", help="segment train checkpoint trained from scratch")
    ap.add_argument("--finetuned", help="segment train --init lung-unet-vgg11 checkpoint")
    ap.add_argument("--out", default="benchmarks/results/segment_report")
    ap.add_argument("--steps", default="dice,sources,generated,sheet,summary")
    ap.add_argument("--segmenters", default="", help="comma-separated subset of scratch,pretrained,pretrained@256,finetuned")
    ap.add_argument("--sample-512", type=int, default=30, help="images per source for the 512-px pretrained U-Net (0: all)")
    ap.add_argument("--per-source", type=int, default=0, help="at most this many images per source (0: all)")
    ap.add_argument("--tile", type=int, default=180, help="contact-sheet tile side in px")
    ap.add_argument("--rotated", type=int, default=40, help="real films turned 90/180/270 degrees (step rotated)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    segs = segmenters(args)
    steps = args.steps.split(",")
    if "dice" in steps:
        step_dice(args, {k: v for k, v in segs.items()}, out)
    if "sources" in steps:
        step_sources(args, segs, out)
    if "reassess" in steps:
        step_reassess(args, segs, out)
    if "generated" in steps:
        step_generated(args, out)
    if "rotated" in steps:
        step_rotated(args, out)
    if "sheet" in steps:
        step_sheet(args, segs, out)
    if "summary" in steps:
        step_summary(args, segs, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
