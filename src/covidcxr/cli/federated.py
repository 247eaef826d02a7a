"""covidcxr federated simulate | server | client."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from covidcxr.cli import UserError, float_between, int_at_least

_STRATEGIES = ("fedavg", "fedprox", "fedbn")


def _plan_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="recipe YAML or name (configs/transfer-mobilenet_v2.yaml); every "
                   "site trains with it")
    p.add_argument("--rounds", type=int_at_least(1), required=True, help="federated rounds")
    p.add_argument("--strategy", choices=_STRATEGIES, default="fedavg",
                   help="fedavg: row-weighted mean of all weights; fedprox: fedavg plus a proximal term in each "
                        "site's loss (--proximal-mu); fedbn: BatchNorm parameters and statistics stay at the sites")
    p.add_argument("--local-epochs", type=int_at_least(1), default=1,
                   help="passes over its training rows each site makes per round (default 1); the recipe's "
                        "schedules and head warm-up run over rounds x local epochs")
    p.add_argument("--proximal-mu", type=float_between(0.0), default=0.01, help="FedProx mu (default 0.01)")
    p.add_argument("--dp-noise", type=float_between(0.0, low_open=True), metavar="Z",
                   help="differential privacy: Flower's client-side fixed clipping, Gaussian noise multiplier Z "
                        "on the mean update (needs --dp-clip); the accountant's epsilon is logged and stored")
    p.add_argument("--dp-clip", type=float_between(0.0, low_open=True), metavar="C",
                   help="DP clipping norm of each site's update (L2 over the exchanged weights)")
    p.add_argument("--dp-delta", type=float_between(0.0, 1.0, low_open=True), default=1e-5,
                   help="delta at which epsilon is reported (default 1e-5)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, as in covidcxr train (--set data.size=128)")


def register(sub: argparse._SubParsersAction) -> None:
    f = sub.add_parser(
        "federated",
        help="federated training across hospitals on Flower: images stay at each site",
        description="Federated training on Flower (flwr). `server` runs the coordinator, `client` runs at each "
        "hospital with its own manifest, `simulate` runs every site of one manifest on this machine as real "
        "server and client processes on loopback. Only weights, row counts and validation figures leave a site. "
        "The result RUN/best.ckpt is an ordinary covidcxr checkpoint (evaluate, predict, export, serve, site "
        "calibrate). See docs/federated.md.",
    )
    fs = f.add_subparsers(dest="fed_command", metavar="SUBCOMMAND")

    s = fs.add_parser("simulate", help="run every site of one manifest on this machine",
                      description="Splits --data by --site-column into OUT/sites/NAME/manifest.csv, starts one "
                      "server process and one client process per site on a free loopback port (Flower's deployment "
                      "engine, insecure: nothing leaves the machine) and waits for the rounds to end. Writes "
                      "OUT/best.ckpt, OUT/last.ckpt, OUT/history.json (per-round, per-site figures), OUT/logs/ "
                      "and OUT/sites/NAME/sent/ (what each site sent).")
    _plan_options(s)
    s.add_argument("--data", required=True, help="manifest CSV with a split column")
    s.add_argument("--site-column", default="source", help="column naming each row's site (default source)")
    s.add_argument("--out", required=True, help="run folder")
    s.set_defaults(func=cmd_simulate)

    v = fs.add_parser("server", help="run the coordinator (Flower server)",
                      description="Waits for --sites sites (up to --connect-timeout seconds), then runs --rounds "
                      "rounds. The server holds the recipe and the model only; it is never given a data path. "
                      "Writes OUT/best.ckpt (best round by the recipe's checkpoint.monitor, row-weighted over the "
                      "sites' validation figures; FedBN: the last round), OUT/last.ckpt, OUT/history.json and "
                      "OUT/server-opened-files.txt (every file the process opened).")
    _plan_options(v)
    v.add_argument("--address", default="0.0.0.0:9092", help="HOST:PORT to listen on (default 0.0.0.0:9092)")
    v.add_argument("--out", required=True, help="run folder")
    v.add_argument("--sites", type=int_at_least(1), default=2, help="sites round 1 waits for (default 2)")
    v.add_argument("--min-sites", type=int_at_least(1),
                   help="later rounds go on with at least this many connected sites (default min(2, --sites))")
    v.add_argument("--connect-timeout", type=float_between(0.0, low_open=True), default=600.0,
                   help="seconds to wait for sites (default 600)")
    v.add_argument("--round-timeout", type=float_between(0.0, low_open=True), default=3600.0,
                   help="seconds a round waits for its sites; a late site is dropped for that round (default 3600)")
    tls = v.add_mutually_exclusive_group(required=True)
    tls.add_argument("--tls-cert", metavar="CERT.pem", help="server certificate (with --tls-key and --tls-ca)")
    tls.add_argument("--insecure", action="store_true", help="no TLS (loopback or a trusted network only)")
    v.add_argument("--tls-key", metavar="KEY.pem", help="server private key")
    v.add_argument("--tls-ca", metavar="CA.pem", help="certificate authority that signed --tls-cert")
    v.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    v.set_defaults(func=cmd_server)

    c = fs.add_parser("client", help="join a run as one hospital (Flower client)",
                      description="Trains the coordinator's recipe on the train rows of --data and reports "
                      "validation figures on its val rows. Only weights, row counts and validation figures leave "
                      "this process. Exits when the coordinator ends the run.")
    c.add_argument("--data", required=True, help="this site's manifest CSV (train and val rows)")
    c.add_argument("--server", required=True, help="coordinator HOST:PORT")
    c.add_argument("--site", required=True, help="this site's name, as the coordinator logs it")
    ctls = c.add_mutually_exclusive_group(required=True)
    ctls.add_argument("--tls-ca", metavar="CA.pem", help="certificate authority of the coordinator's certificate")
    ctls.add_argument("--insecure", action="store_true", help="no TLS (loopback or a trusted network only)")
    c.add_argument("--config", help="this site's copy of the recipe: the site refuses a run whose classes, preset or "
                   "architecture differ from it")
    c.add_argument("--audit-dir", help="keep a copy of everything this site sends (per round .npz and .json)")
    c.add_argument("--connect-timeout", type=float_between(0.0, low_open=True), default=60.0,
                   help="keep dialling a server that is not up yet for this many seconds, then give up (default 60)")
    c.set_defaults(func=cmd_client)


def _plan(args: argparse.Namespace):
    from covidcxr.federated import DPSettings, FederatedError, Plan
    from covidcxr.train import ConfigError, load_config
    from covidcxr.train.runner import resolve_config_path

    if (args.dp_noise is None) != (args.dp_clip is None):
        raise UserError("--dp-noise and --dp-clip go together")
    try:
        cfg = load_config(resolve_config_path(args.config), list(args.overrides))
        dp = DPSettings(args.dp_noise, args.dp_clip, args.dp_delta) if args.dp_noise is not None else None
        return Plan(cfg, args.strategy, args.rounds, local_epochs=args.local_epochs,
                    proximal_mu=args.proximal_mu if args.strategy == "fedprox" else 0.0, dp=dp)
    except (ConfigError, FederatedError) as err:
        raise UserError(str(err)) from None


def _plan_argv(args: argparse.Namespace) -> list[str]:
    argv = ["--config", str(Path(args.config).resolve()) if Path(args.config).is_file() else args.config,
            "--strategy", args.strategy, "--local-epochs", str(args.local_epochs),
            "--proximal-mu", str(args.proximal_mu), "--dp-delta", str(args.dp_delta)]
    if args.dp_noise is not None:
        argv += ["--dp-noise", str(args.dp_noise), "--dp-clip", str(args.dp_clip)]
    for o in args.overrides:
        argv += ["--set", o]
    return argv


def _report(fed: dict, out: Path) -> None:
    print(f"best checkpoint: {out / 'best.ckpt'} (round {fed.get('best_round')})")
    print(f"last checkpoint: {out / 'last.ckpt'}")
    print(f"history:         {out / 'history.json'}")
    if fed.get("refused"):
        print("refused sites:   " + "; ".join(f"{s}: {r}" for s, r in fed["refused"].items()))
    dp = fed.get("dp") or {}
    if "epsilon" in dp:
        print(f"DP: epsilon {dp['epsilon']:.3f} at delta {dp['delta']:g} per site over {dp['releases']} round(s)")


def cmd_simulate(args: argparse.Namespace) -> int:
    from covidcxr.federated.simulation import simulate
    from covidcxr.federated import FederatedError

    _plan(args)  # a bad recipe or option fails here, before any process starts
    try:
        fed = simulate(_plan_argv(args), args.data, args.site_column, args.out, rounds=args.rounds,
                       verbose=bool(getattr(args, "verbose", False)))
    except FederatedError as err:
        raise UserError(str(err)) from None
    _report(fed, Path(args.out))
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    from covidcxr.federated import FederatedError, run_server

    plan = _plan(args)
    certs = None
    if args.tls_cert:
        if not (args.tls_key and args.tls_ca):
            raise UserError("--tls-cert needs --tls-key and --tls-ca")
        try:
            certs = (Path(args.tls_ca).read_bytes(), Path(args.tls_cert).read_bytes(), Path(args.tls_key).read_bytes())
        except OSError as err:
            raise UserError(f"{err.filename}: cannot read ({err.strerror})") from None
    try:
        fed = run_server(plan, args.address, args.out, sites=args.sites, min_sites=args.min_sites,
                         certificates=certs, connect_timeout=args.connect_timeout, round_timeout=args.round_timeout,
                         overwrite=args.overwrite, record_opens=True, verbose=bool(getattr(args, "verbose", False)))
    except FederatedError as err:
        print(f"covidcxr federated: error: {err}", file=sys.stderr, flush=True)
        return 2
    _report(fed, Path(args.out))
    return 0


def cmd_client(args: argparse.Namespace) -> int:
    from covidcxr.federated import FederatedError, run_client

    local = None
    if args.config:
        from covidcxr.train import ConfigError, load_config
        from covidcxr.train.runner import resolve_config_path

        try:
            local = load_config(resolve_config_path(args.config), [])
        except ConfigError as err:
            raise UserError(str(err)) from None
    try:
        run_client(args.site, args.data, args.server, insecure=args.insecure, tls_ca=args.tls_ca,
                   local_config=local, audit_dir=args.audit_dir, connect_timeout=args.connect_timeout,
                   verbose=bool(getattr(args, "verbose", False)))
    except FederatedError as err:
        raise UserError(str(err)) from None
    print(f"site {args.site}: run finished")
    return 0
