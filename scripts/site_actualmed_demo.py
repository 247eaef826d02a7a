"""A hospital the model never saw, in miniature: train without actualmed, then `site check` and `site calibrate`
on actualmed's films (cross-fitted by patient inside actualmed), with and without --adapt-bn.

    COVIDCXR_WEIGHTS_DIR=../shared/weights .venv/bin/python scripts/site_actualmed_demo.py [--size 128] [--epochs 3]

Training data: the shared dev set without its actualmed rows (cohen + figure1; seed-62 patient split),
an ImageNet MobileNetV2 linear probe (configs/linear-probe-mobilenet_v2.yaml) at --size px. The local site:
every actualmed film of the dev set (COVID-19 and normal; no pneumonia). Small numbers: research use only.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from covidcxr.cli import main as cli
from covidcxr.data import build_manifest, read_manifest
from covidcxr.shared import data_dir
from covidcxr.train import fit
from covidcxr.train.config import load_config

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="work folder (default: a new temporary one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.out or tempfile.mkdtemp(prefix="site-actualmed-"))
    build_manifest(sources=[("csv", str(data_dir() / "covid-cxr-dev" / "metadata.csv"))], out=work / "dev", seed=62)
    df = read_manifest(work / "dev" / "manifest.csv")
    df[df["source"] != "actualmed"].to_csv(work / "train.csv", index=False)
    site = df[df["source"] == "actualmed"]
    site[["path", "label", "patient_id"]].to_csv(work / "actualmed.csv", index=False)
    print(f"training rows {int((df['source'] != 'actualmed').sum())}; actualmed {site['label'].value_counts().to_dict()}, "
          f"{site['patient_id'].nunique()} patients")
    cfg = load_config(REPO / "configs" / "linear-probe-mobilenet_v2.yaml", [
        f"data.size={args.size}", "data.num_workers=0", "trainer.accelerator=cpu", "trainer.devices=1",
        "trainer.progress_bar=false", f"trainer.num_threads={args.threads}", f"trainer.max_epochs={args.epochs}"])
    fit(cfg, data=work / "train.csv", out=work / "run")
    ckpt = work / "run" / "best.ckpt"
    cli(["site", "check", str(work / "actualmed.csv"), "--model", str(ckpt), "--out", str(work / "check")])
    for extra in ([], ["--adapt-bn"]):
        out = work / f"site{'-adabn' if extra else ''}.ckpt"
        cli(["site", "calibrate", "--model", str(ckpt), "--data", str(work / "actualmed.csv"), "--out", str(out),
             "--site", "actualmed", *extra])
    print(json.dumps(json.loads((work / "check" / "site_check.json").read_text())["per_source"], indent=1))
    print(f"work folder: {work}")


if __name__ == "__main__":
    main()
