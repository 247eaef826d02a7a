"""covidcxr train | evaluate | compare."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from covidcxr.cli import add_trust_checkpoint, float_between, int_at_least

log = logging.getLogger("covidcxr")
_probability = float_between(0.0, 1.0)  # thresholds and target sensitivities


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser(
        "train",
        help="train a classifier from a recipe (configs/*.yaml) on a manifest",
        description="Train with PyTorch Lightning. The recipe YAML sets model, optimiser, schedule, sampler and "
        "where the run happens (accelerator, devices, strategy, precision); options below override it. "
        "Writes RUN/best.ckpt (the best epoch by the recipe's checkpoint.monitor, with the COVID-19 threshold "
        "chosen on val; only what inference needs), RUN/last.ckpt (full state for --resume) and logs under RUN/. "
        "A recipe with stages: (twice transfer) trains them first into RUN/stages/NAME/. Catalogue weights are "
        "found offline through COVIDCXR_WEIGHTS_DIR.",
    )
    add_trust_checkpoint(t)
    t.add_argument("--config", required=True, help="recipe YAML (configs/deepcovid-resnet18.yaml) or a recipe name (deepcovid-resnet18)")
    t.add_argument("--data", required=True, help="manifest CSV with a split column (covidcxr data build)")
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--max-epochs", type=int, help="override trainer.max_epochs")
    t.add_argument("--weights", "--init", dest="weights",
                   help="initial weights (overrides the recipe): none | imagenet | a catalogue name "
                        "(mobilenet_v2-imagenet, efficientnet_lite0-imagenet; `covidcxr weights list`) | xrv-nih | "
                        "xrv-all | PATH, e.g. another run's best.ckpt (its matching output neurons are kept)")
    t.add_argument("--resume", action="store_true", help="continue from RUN/last.ckpt (same config)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the trained run already in --out (its best.ckpt and tuned threshold); "
                        "without it such a folder is refused")
    t.add_argument("--seed", type=int, help="override seed")
    t.add_argument("--batch-size", type=int, help="override data.batch_size")
    t.add_argument("--size", type=int, help="override the preset's input size (e.g. 224 for covidnet)")
    t.add_argument("--accelerator", help="cpu | gpu | auto (override trainer.accelerator)")
    t.add_argument("--devices", help="number of devices or 'auto' (override trainer.devices)")
    t.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override any config key with a YAML value, e.g. --set optimizer.lr=1e-3 --set trainer.precision=bf16-mixed",
    )
    t.set_defaults(func=cmd_train)

    e = sub.add_parser(
        "evaluate",
        help="evaluate a checkpoint on a manifest split: metrics with CIs, report, predictions",
        description="Writes OUT/metrics.json, OUT/report.html, OUT/report.md, OUT/predictions.csv and PNG figures. "
        "Confidence intervals are 95% bootstrap intervals over patients. Beside the AUC: a source x class "
        "sensitivity table, the worst-group sensitivity (cells of >= 5 images) and the non-dominant-source "
        "specificity (normal/pneumonia films from a source other than the one supplying most training films "
        "of that class, not called COVID-19), with a warning for a class coming >= 90% from one source.",
    )
    add_trust_checkpoint(e)
    e.add_argument("--model", required=True, help="checkpoint (RUN/best.ckpt)")
    e.add_argument("--data", required=True, help="manifest CSV")
    e.add_argument("--split", default="test", choices=["test", "val", "train", "all"])
    e.add_argument("--out", required=True, help="report folder")
    e.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates (default 1000)")
    e.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    e.add_argument("--target-sensitivity", type=_probability, default=0.95,
                   help="COVID-19 operating point (default 0.95)")
    e.add_argument("--threshold", type=_probability,
                   help="COVID-19 decision threshold (default: the checkpoint's, else argmax)")
    e.add_argument("--calibrate", action="store_true",
                   help="fit a temperature on the manifest's val split and store it in the checkpoint")
    e.add_argument("--set-threshold", action="store_true",
                   help="choose the COVID-19 threshold reaching --target-sensitivity on the val split and store it "
                        "in the checkpoint; this run's report is computed at it, as predict, explain and serve use it")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--workers", type=int, default=0, help="data loader workers")
    e.set_defaults(func=cmd_evaluate)

    c = sub.add_parser(
        "compare",
        help="compare checkpoints on one split: params, MACs, CPU latency, metrics with CIs",
        description="Writes OUT/compare.md, OUT/compare.csv and OUT/compare.json.",
    )
    c.add_argument("checkpoints", nargs="+", help="checkpoints to compare")
    c.add_argument("--data", required=True, help="manifest CSV")
    c.add_argument("--split", default="test", choices=["test", "val", "train", "all"])
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--names", nargs="+", help="row names, one per checkpoint (default: RUN/FILE)")
    c.add_argument("--n-boot", type=int, default=1000)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--latency-repeats", type=int, default=10, help="batch-1 forward passes timed per model")
    c.add_argument("--threads", type=int, default=1,
                   help="torch threads for the CPU latency (default 1: stable on a shared machine)")
    c.set_defaults(func=cmd_compare)

    q = sub.add_parser(
        "qat",
        help="quantization-aware fine-tuning, so that a classifier's INT8 export agrees with its fp32 one",
        description="Folds BatchNorm into the convolutions and fine-tunes on the manifest's train split with "
        "onnxruntime's INT8 rounding simulated (int8 per-channel weights, uint8 per-tensor activations), pulling "
        "the simulated-INT8 logits towards the fp32 ones and the fp32 ones towards the input model's. Writes a checkpoint of the "
        "same architecture with training.qat recorded. Then choose the threshold again on val (covidcxr "
        "evaluate --calibrate --set-threshold) and export with --quantize int8, whose parity gate decides. "
        "The train images are held in memory (about 0.6 MB each at 224 px, twice that while they load). MobileNetV2 only. Research use only.",
    )
    add_trust_checkpoint(q)
    q.add_argument("--model", required=True, metavar="CKPT", help="covidcxr checkpoint, or 'reference'")
    q.add_argument("--data", required=True, metavar="MANIFEST", help="split manifest; only its train rows are read")
    q.add_argument("--out", required=True, metavar="OUT.ckpt", help="checkpoint to write (never the input)")
    q.add_argument("--epochs", type=int_at_least(1), default=3, help="passes over the train split (default: 3)")
    q.add_argument("--lr", type=float_between(0, 1, low_open=True), default=2e-5,
                   help="Adam learning rate, cosine decay (default: 2e-5; 1e-4 moved the fp32 model too far)")
    q.add_argument("--batch-size", type=int_at_least(1), default=16, help="default: 16")
    q.add_argument("--calibration-count", type=int_at_least(1), default=128,
                   help="train images spread over the split that set the activation ranges (default: 128, as the "
                        "export's --calibration-count)")
    q.add_argument("--keep-fp32", type=int_at_least(0), default=0, metavar="N",
                   help="the first N convolutions are not rounded (default: 0); give the N that the INT8 export will "
                        "keep fp32 (its --keep-fp32; 'auto' there reports what it chose)")
    q.add_argument("--boundary-weight", type=float_between(0), default=0.0, metavar="W",
                   help="weigh the INT8-vs-fp32 term of an image by 1 + W exp(-margin / 0.5), the margin being how far "
                        "(in logits) the trained model is from changing that image's label (default: 0, all alike)")
    q.add_argument("--cache-dir", help="prepared-image cache (as data.cache_dir of a recipe)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--threads", type=int_at_least(1), help="torch threads (default: torch's)")
    q.set_defaults(func=cmd_qat)


def _user_error(err: Exception):
    from covidcxr.cli import UserError

    return UserError(str(err))


def cmd_train(args: argparse.Namespace) -> int:
    from covidcxr.train import ConfigError, fit, load_config
    from covidcxr.train.runner import resolve_config_path

    over = list(args.overrides)
    for key, val in (("trainer.max_epochs", args.max_epochs), ("model.weights", args.weights), ("seed", args.seed),
                     ("data.batch_size", args.batch_size), ("data.size", args.size),
                     ("trainer.accelerator", args.accelerator), ("trainer.devices", args.devices)):
        if val is not None:
            over.append(f"{key}={val}")
    try:
        cfg = load_config(resolve_config_path(args.config), over)
        run = fit(cfg, data=args.data, out=args.out, resume=args.resume, overwrite=args.overwrite)
    except ConfigError as err:
        raise _user_error(err) from None
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank != 0:  # DDP: one process reports
        return 0
    summary = _read_summary(run)
    best_epoch = (summary.get("best_epoch") if summary else None)
    print(f"best checkpoint: {run / 'best.ckpt'}"
          + (f" (epoch {best_epoch}, {summary.get('monitor')} {summary.get('best_score'):.4f})"
             if summary and best_epoch is not None and summary.get("best_score") is not None else ""))
    if summary and summary.get("threshold") is not None:
        op = summary.get("operating_point") or {}
        print(f"COVID-19 threshold {summary['threshold']:.4f} (sensitivity >= {op.get('target_sensitivity')} "
              "on val) stored in best.ckpt")
    print(f"last checkpoint: {run / 'last.ckpt'}")
    print(f"logs:            {run / 'logs'}")
    return 0


def _read_summary(run: Path) -> dict | None:
    import json

    try:
        return json.loads((run / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def cmd_evaluate(args: argparse.Namespace) -> int:
    from covidcxr.evaluate import EvaluateConfig, MetricsError, evaluate_checkpoint
    from covidcxr.predict import PredictorError

    config = EvaluateConfig(split=args.split, n_boot=args.n_boot, seed=args.seed,
                            target_sensitivity=args.target_sensitivity, calibrate=args.calibrate,
                            set_threshold=args.set_threshold, threshold=args.threshold, batch_size=args.batch_size,
                            num_workers=args.workers)
    try:
        res = evaluate_checkpoint(args.model, args.data, config, out=args.out)
    except (MetricsError, PredictorError) as err:
        raise _user_error(err) from None
    from covidcxr.evaluate.report import _fmt_ci

    m = res["metrics"]
    print(f"decision rule: {res['decision_rule']['text']}")
    print(f"{m['n_images']} images / {m['n_patients']} patients ({args.split}); "
          f"accuracy {_fmt_ci(m['accuracy'])}" + (" [95% CI, bootstrap over patients]" if args.n_boot else ""))
    for cname, pc in m["per_class"].items():
        print(f"  {cname:>10}: sensitivity {_fmt_ci(pc['sensitivity'])}  AUC {_fmt_ci(pc.get('auc'))}")
    from covidcxr.evaluate.report import summary_lines

    for line in summary_lines(res):  # worst-group sensitivity, non-dominant-source specificity, source x class
        print(line)
    if res.get("failures"):
        print(f"skipped {len(res['failures'])} unreadable image(s):")
        for f in res["failures"]:
            print(f"  {f['error']}")
    if args.calibrate:
        print(f"temperature {res['calibration']['temperature_fitted']:.3f} stored in {args.model}")
    if args.set_threshold:
        op = res["stored_threshold"]
        print(f"COVID-19 threshold {op['threshold']:.4f} (sensitivity >= {op['target_sensitivity']} on val) "
              f"stored in {args.model}")
    out = Path(args.out)
    print(f"report: {out / 'report.html'} (also report.md, metrics.json, predictions.csv)")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from covidcxr.evaluate import MetricsError, compare
    from covidcxr.predict import PredictorError

    import torch

    torch.set_num_threads(max(1, args.threads))
    try:
        compare(args.checkpoints, args.data, args.split, args.out, n_boot=args.n_boot, seed=args.seed,
                latency_repeats=args.latency_repeats, names=args.names)
    except (MetricsError, PredictorError) as err:
        raise _user_error(err) from None
    out = Path(args.out)
    print((out / "compare.md").read_text(encoding="utf-8"))
    print(f"written: {out / 'compare.md'}, {out / 'compare.csv'}, {out / 'compare.json'}")
    return 0


def cmd_qat(args: argparse.Namespace) -> int:
    import torch

    from covidcxr.outpaths import OverwriteError, refuse_overwrite
    from covidcxr.reference_models import model_files
    from covidcxr.train.qat import QATError, qat_checkpoint

    try:
        refuse_overwrite([args.out], [*model_files(args.model), args.data], "covidcxr qat")
    except OverwriteError as err:
        raise _user_error(err) from None
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        rep = qat_checkpoint(args.model, args.data, args.out, epochs=args.epochs, lr=args.lr,
                             batch_size=args.batch_size, calibration_count=args.calibration_count,
                             fp32_convs=args.keep_fp32, boundary_weight=args.boundary_weight, cache_dir=args.cache_dir, seed=args.seed, progress=log.info)
    except QATError as err:
        raise _user_error(err) from None
    b, a = rep.before, rep.after
    print(f"wrote {args.out} ({rep.steps} steps on {rep.train_images} train images, {rep.seconds:.0f} s)\n"
          f"on the train images, against the input model: simulated INT8 logit error {b['int8_simulated_logit_error']:.3f}"
          f" -> {a['int8_simulated_logit_error']:.3f}, labels {b['int8_simulated_label_agreement']:.1%} -> "
          f"{a['int8_simulated_label_agreement']:.1%}; fp32 logit error {a['fp32_logit_error']:.3f}, labels "
          f"{a['fp32_label_agreement']:.1%}\n"
          "next: covidcxr evaluate --calibrate --set-threshold on val, then covidcxr export --quantize int8 (its gate decides)")
    return 0
