"""covidcxr site check | calibrate: a model at a new hospital."""

from __future__ import annotations

import argparse
import math
from typing import Any, Callable

from covidcxr.cli import float_between, int_at_least


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("site", help="a model at a new hospital: check its films, calibrate on local cases")
    ssub = p.add_subparsers(dest="site_command", metavar="ACTION")

    c = ssub.add_parser(
        "check", help="do these films look like the training data? (no labels; exit 0)",
        description="Distance of the films' features to the training sources (the summary stored in the checkpoint "
                    "at training time), the predicted-label mix, and a one-line verdict. Writes OUT/site_check.json "
                    "and OUT/site_check_images.csv. Research use only.")
    c.add_argument("inputs", nargs="+", metavar="IMG|DIR|MANIFEST", help="image files, folders (recursive) or CSV manifests")
    c.add_argument("--model", required=True, help="classifier checkpoint (covidcxr train's best.ckpt)")
    c.add_argument("--out", required=True, help="report folder")
    c.add_argument("--reference-data", metavar="MANIFEST",
                   help="the training manifest, for a checkpoint saved without a training-feature summary "
                        "(its train rows fit the distribution, its val rows give each source's spread)")
    c.add_argument("--batch-size", type=int_at_least(1), default=16)
    c.add_argument("--workers", type=int_at_least(0), default=0, help="decoding processes")
    c.set_defaults(func=_guard(cmd_check))

    k = ssub.add_parser(
        "calibrate", help="fit temperature, threshold, conformal sets (and AdaBN) on local labelled cases",
        description="Writes a new site checkpoint whose temperature/threshold are fitted on the local cases and whose "
                    "records carry class-conditional conformal prediction sets. Before/after figures are cross-fitted "
                    "by patient. Research use only.")
    k.add_argument("--model", required=True, help="classifier checkpoint to calibrate (never overwritten)")
    k.add_argument("--data", required=True, metavar="LOCAL_MANIFEST",
                   help="local labelled cases: a `covidcxr data build` manifest or a CSV with path,label,patient_id")
    k.add_argument("--out", required=True, metavar="SITE_CKPT", help="the site checkpoint to write")
    k.add_argument("--coverage", type=float_between(0, 1, low_open=True), default=0.9,
                   help="per-class coverage of the prediction sets (default 0.9)")
    k.add_argument("--adapt-bn", action="store_true",
                   help="re-estimate BatchNorm statistics on the local images (AdaBN)")
    k.add_argument("--bias", action="store_true",
                   help="bias-corrected temperature scaling: fit one logit bias per class with the temperature, "
                        "softmax(z / T + b), so the model follows the site's class mix (the threshold and sets are "
                        "then fitted on these probabilities); an L2 penalty keeps the bias of a class with no local "
                        "films finite: that class becomes rarer, never impossible")
    k.add_argument("--bias-l2", type=float, default=None, metavar="W",
                   help="weight W of the L2 penalty W * ||b||^2 added to the summed local NLL (default 0.5, a "
                        "Gaussian prior of sd 1 on each bias); larger keeps the biases nearer 0")
    k.add_argument("--site", help="site name recorded in the checkpoint (default: the manifest's file name)")
    k.add_argument("--recalibrate", action="store_true", help="calibrate a checkpoint that is already site-calibrated")
    k.add_argument("--folds", type=int_at_least(2), default=5, help="cross-fitting folds, by patient (default 5)")
    k.add_argument("--target-sensitivity", type=float_between(0, 1, low_open=True),
                   help="COVID-19 sensitivity the local threshold must reach (default: the checkpoint's, else 0.95)")
    k.add_argument("--bootstrap", type=int_at_least(0), default=1000, help="patient-bootstrap resamples for the CIs")
    k.add_argument("--batch-size", type=int_at_least(1), default=16)
    k.add_argument("--workers", type=int_at_least(0), default=0, help="decoding processes")
    k.add_argument("--seed", type=int, default=0)
    k.set_defaults(func=_guard(cmd_calibrate))
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn the site package's typed errors into the CLI's one-line UserError."""

    def run(args: argparse.Namespace) -> int:
        from covidcxr.cli import UserError
        from covidcxr.site.check import SiteError
        from covidcxr.site.sets import SiteCalibrationError

        try:
            return fn(args)
        except (SiteError, SiteCalibrationError) as err:
            raise UserError(str(err)) from None

    return run


def cmd_check(args: argparse.Namespace) -> int:
    from covidcxr.site.check import check_site

    r = check_site(args.model, args.inputs, args.out, reference_data=args.reference_data,
                   batch_size=args.batch_size, num_workers=args.workers)
    print(f"{r['n_images']} film(s) checked against {len(r['training_sources'])} training source(s) "
          f"({', '.join(r['training_sources'])}; summary {r['summary_from']})")
    if r["n_unreadable"]:
        print(f"{r['n_unreadable']} file(s) could not be read, e.g. {r['unreadable'][0]['path']}: "
              f"{r['unreadable'][0]['error']}")
    for name, s in r["per_source"].items():
        print(f"  {name}: {s['fraction_beyond_own_q95']:.0%} beyond its own 95th percentile "
              f"(spread from {s['n_spread']} {s['spread_from']} images)")
    mix = ", ".join(f"{c} {n}" for c, n in r["predicted_label_mix"].items())
    print(f"predicted labels: {mix}")
    print(f"verdict: {r['verdict_line']}")
    print(f"report: {args.out}/site_check.json")
    return 0


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def cmd_calibrate(args: argparse.Namespace) -> int:
    from covidcxr.cli import UserError
    from covidcxr.site.calibrate import calibrate_site

    if args.bias_l2 is not None and not args.bias:
        raise UserError("--bias-l2 needs --bias (it weighs the penalty on the logit biases)")
    info = calibrate_site(args.model, args.data, args.out, coverage=args.coverage, adapt_bn=args.adapt_bn,
                          site=args.site, recalibrate=args.recalibrate, folds=args.folds,
                          target_sensitivity=args.target_sensitivity, batch_size=args.batch_size,
                          num_workers=args.workers, seed=args.seed, n_boot=args.bootstrap, bias=args.bias,
                          **({} if args.bias_l2 is None else {"bias_l2": args.bias_l2}))
    n = ", ".join(f"{c} {k}" for c, k in info["n_per_class"].items())
    print(f"site {info['site']!r}: {info['n_images']} local images of {info['n_patients']} patients ({n})")
    print(f"temperature {info['temperature']:.3f} (parent {info['parent']['temperature']:.3f}); "
          f"{info['threshold_rule']}: threshold {_fmt(info['threshold'])} (parent {_fmt(info['parent']['threshold'])})"
          + (f"; BatchNorm statistics re-estimated in {info['bn_layers_adapted']} layers" if info["adapt_bn"] else ""))
    if info.get("logit_bias") is not None:
        print("logit bias (softmax(z / T + b), L2 weight " f"{info['bias']['l2']:g}): "
              + ", ".join(f"{c} {v:+.3f}" for c, v in zip(info["conformal"]["classes"], info["logit_bias"])))
    conf = info["conformal"]
    for c in conf["always_in"]:
        need = math.floor(round(1 / (1 - info["coverage"]), 9))  # (n + 1) * alpha > 1
        print(f"note: {c} is always in the prediction set: {conf['n'][c]} local cases are too few for "
              f"{info['coverage']:.0%} coverage (a class needs at least {need} cases to be left out of a set)")
    m = info["metrics"]
    b, a = m["before"], m["after"]
    print(f"cross-fitted on {m['data']}, {m['folds']} folds by patient:")
    pb = (m.get("paired_bootstrap") or {}).get("metrics", {})
    for key, label in (("macro_sensitivity", "macro sensitivity"), ("covid_auc", "COVID-19 AUC")):
        row = pb.get("auc" if key == "covid_auc" else key) or {}
        ci = (f" (difference {row['diff']:+.3f}, 95% CI [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}], patient bootstrap)"
              if row.get("ci_low") is not None else "")
        print(f"  {label}: before {_fmt(b.get(key))}, after {_fmt(a.get(key))}{ci}")
    for c in info["n_per_class"]:
        print(f"  {c}: sensitivity before {_fmt(b['sensitivity'][c])}, after {_fmt(a['sensitivity'][c])}; "
              f"set coverage {_fmt(a['set_coverage'][c])} (nominal {info['coverage']:.2f})")
    print(f"  mean set size {a['mean_set_size']:.2f}; {a['fraction_uncertain']:.0%} of sets 'uncertain: refer'")
    print(f"site checkpoint: {args.out}")
    return 0
