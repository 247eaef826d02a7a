"""Federated training on the real Flower engine: real server and client processes on loopback ports.

Small generated images (64 px) at three sites and MobileNetV2 from random weights keep each run to a few
rounds of seconds; every wait is bounded and every process is stopped at the end. No part of Flower is mocked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("covidcxr"))
RECIPE = str(REPO / "configs" / "transfer-mobilenet_v2.yaml")
FAST = ["model.weights=none", "data.size=64", "data.batch_size=8", "data.augment=none", "data.num_workers=0",
        "trainer.accelerator=cpu", "trainer.num_threads=1", "model.warmup_epochs=0", "trainer.progress_bar=false"]
SETS = [a for o in FAST for a in ("--set", o)]
LABELS = ["normal", "pneumonia", "COVID-19"]
BOUND = 900  # seconds: generous, the machine may be shared; a healthy run takes a fraction of it

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def make_sites(root: Path, train: dict[str, int], val: int = 3) -> Path:
    """One manifest (source = site) of small generated films; class shifts the gray level so there is signal."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for site, n_train in train.items():
        for split, n in (("train", n_train), ("val", val)):
            for i in range(n):
                lab = LABELS[i % 3]
                img = (rng.random((64, 64)) * 80 + 60 * LABELS.index(lab)).astype(np.uint8)
                name = f"{site}-{split}-{i}.png"
                Image.fromarray(img).save(root / name)
                rows.append({"patient_id": f"{site}-{split}-{i}", "path": name, "label": lab, "source": site,
                             "split": split})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


def site_manifest(manifest: Path, site: str, out: Path) -> Path:
    df = pd.read_csv(manifest)
    df = df[df["source"] == site].assign(path=lambda d: [str(manifest.parent / p) for p in d["path"]])
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    return out


def _npz(path: Path) -> list[np.ndarray]:
    with np.load(path) as z:
        return [z[f"arr_{i}"] for i in range(len(z.files))]


def _weighted_mean(updates: list[tuple[list[np.ndarray], int]]) -> list[np.ndarray]:
    total = sum(n for _, n in updates)
    return [sum(u[i].astype(np.float64) * n for u, n in updates) / total for i in range(len(updates[0][0]))]


def _wait(cond, timeout: float, what: str) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def _stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _exchanged(strategy: str) -> list[str]:
    from covidcxr.federated.params import exchanged_keys
    from covidcxr.models import build

    return exchanged_keys(build("mobilenet_v2", num_classes=3), strategy)


# ---------------------------------------------------------------------------------------------- FedAvg


def test_simulate_fedavg_is_the_row_weighted_mean_and_server_opens_no_image(tmp_path: Path) -> None:
    """`federated simulate`: 3 site processes + 1 server process, 2 rounds. Each aggregate equals the
    row-weighted mean of what the sites report having sent; the server opened no image nor manifest."""
    data = tmp_path / "data"
    manifest = make_sites(data, {"site-a": 6, "site-b": 9, "site-c": 12})
    out = tmp_path / "fed"
    r = subprocess.run([CLI, "federated", "simulate", "--config", RECIPE, "--data", str(manifest), "--site-column",
                        "source", "--rounds", "2", "--strategy", "fedavg", "--out", str(out), *SETS],
                       capture_output=True, text=True, timeout=BOUND, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert "round 1/2 done" in r.stderr and "round 2/2 done" in r.stderr  # per-round progress lines
    assert "val COVID-19 AUC per site: site-a" in r.stderr

    keys = _exchanged("fedavg")
    sites = ["site-a", "site-b", "site-c"]
    sent = {rnd: [(_npz(out / "sites" / s / "sent" / f"round-{rnd}-sent.npz"),
                   json.loads((out / "sites" / s / "sent" / f"round-{rnd}-sent.json").read_text())["num_examples"])
                  for s in sites] for rnd in (1, 2)}
    assert [n for _, n in sent[1]] == [6, 9, 12]  # each site weighs by its training rows
    assert all(len(u) == len(keys) for u, _ in sent[1])
    mean1 = _weighted_mean(sent[1])
    for s in sites:  # what every site received in round 2 is the weighted mean of the round-1 updates
        got = _npz(out / "sites" / s / "sent" / "round-2-received.npz")
        assert all(np.allclose(g, m, rtol=1e-5, atol=1e-6) for g, m in zip(got, mean1))
    # the updates were not all equal (else any mean would pass)
    assert not np.allclose(sent[1][0][0][0], sent[1][2][0][0])

    from covidcxr.models.checkpoint import load, read_bundle

    state = read_bundle(out / "last.ckpt")["state_dict"]
    mean2 = _weighted_mean(sent[2])
    assert all(np.allclose(state[k].numpy(), m, rtol=1e-5, atol=1e-6) for k, m in zip(keys, mean2))

    lm = load(out / "best.ckpt")  # an ordinary covidcxr checkpoint
    assert lm.classes == LABELS and lm.arch == "mobilenet_v2"
    fed = lm.training["federated"]
    assert fed["strategy"] == "fedavg" and fed["rounds"] == 2 and fed["dp"] is None
    assert fed["sites"] == {"site-a": {"rows_train": 6, "rows_val": 3}, "site-b": {"rows_train": 9, "rows_val": 3},
                            "site-c": {"rows_train": 12, "rows_val": 3}}
    assert [h["round"] for h in fed["rounds_log"]][:1] == [1]
    assert set(fed["rounds_log"][0]["per_site"]) == set(sites)
    assert all("val_loss" in m for m in fed["rounds_log"][0]["per_site"].values())

    opened = (out / "server-opened-files.txt").read_text().splitlines()
    assert any(p.endswith("last.ckpt") or ".last.ckpt." in p for p in opened)  # the record is live
    bad = [p for p in opened if str(data) in p or str(out / "sites") in p
           or p.lower().endswith((".png", ".jpg", ".jpeg", ".dcm", ".csv", ".tif", ".tiff"))]
    assert not bad, bad


# ---------------------------------------------------------------------------------------------- FedBN


def make_tls(folder: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for localhost / 127.0.0.1 (ca.pem, server.pem, server.key)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def cert(subject: str, key, issuer: x509.Name, signer, serial: int, ca: bool) -> x509.Certificate:
        b = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(issuer).public_key(key.public_key())
             .serial_number(serial).not_valid_before(now - dt.timedelta(minutes=5))
             .not_valid_after(now + dt.timedelta(days=1)))
        if ca:
            b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        else:
            b = b.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return b.sign(signer, hashes.SHA256())

    folder.mkdir(parents=True, exist_ok=True)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert("covidcxr-test-ca", ca_key, name("covidcxr-test-ca"), ca_key, 1, True)
    srv = cert("localhost", key, ca.subject, ca_key, 2, False)
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(srv.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def test_fedbn_keeps_batchnorm_local_refuses_a_foreign_recipe_and_survives_a_killed_site(tmp_path: Path) -> None:
    """`federated server` + 3 `federated client` processes over TLS, FedBN, 2 rounds: site-c holds another
    preset and is refused (one line, the run goes on); site-b is killed while training in round 2 and dropped."""
    from covidcxr.federated.simulation import free_port

    data = tmp_path / "data"
    # site-b has many rows so that its round-2 training lasts long enough to be killed in the middle
    manifest = make_sites(data, {"site-a": 6, "site-b": 150, "site-c": 6})
    out, logs = tmp_path / "fed", tmp_path / "logs"
    logs.mkdir()
    foreign = tmp_path / "site-c-recipe.yaml"  # site-c's own recipe: another preset than the coordinator's
    foreign.write_text("name: site-c\nmodel:\n  arch: mobilenet_v2\ndata:\n  preset: covidnet\n  size: 64\n")
    addr = f"127.0.0.1:{free_port()}"
    ca, cert, key = make_tls(tmp_path / "tls")
    procs: dict[str, subprocess.Popen] = {}
    handles = []

    def start(name: str, argv: list[str]) -> None:
        fh = open(logs / f"{name}.log", "w")
        handles.append(fh)
        procs[name] = subprocess.Popen([CLI, "federated", *argv], stdout=fh, stderr=subprocess.STDOUT, env=_env())

    def log_of(name: str) -> str:
        return (logs / f"{name}.log").read_text(errors="replace")

    try:
        start("server", ["server", "--config", RECIPE, *SETS, "--rounds", "2", "--strategy", "fedbn", "--address", addr,
                         "--out", str(out), "--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(ca),
                         "--sites", "3", "--min-sites", "1",
                         "--connect-timeout", str(BOUND)])
        for s in ("site-a", "site-b", "site-c"):
            extra = ["--config", str(foreign)] if s == "site-c" else []
            start(s, ["client", "--data", str(site_manifest(manifest, s, tmp_path / s / "manifest.csv")),
                      "--server", addr, "--site", s, "--tls-ca", str(ca), "--audit-dir", str(tmp_path / s / "sent"),
                      "--connect-timeout", str(BOUND), *extra])
        _wait(lambda: "site site-b round 2: training" in log_of("site-b") or procs["server"].poll() is not None,
              BOUND, "site-b to start round 2")
        assert not (tmp_path / "site-b" / "sent" / "round-2-sent.npz").exists()
        procs["site-b"].send_signal(signal.SIGKILL)
        _wait(lambda: procs["server"].poll() is not None, BOUND, "the server to finish")
        assert procs["server"].returncode == 0, log_of("server")[-3000:]
        _wait(lambda: procs["site-c"].poll() is not None, 120, "the refused site to exit")
    finally:
        _stop(*procs.values())
        for fh in handles:
            fh.close()

    server_log = log_of("server")
    assert f"on {addr} (TLS)" in server_log and f"site site-a: connecting to {addr} (TLS)" in log_of("site-a")
    assert "site site-c refused: preset 'covidnet' here, 'imagenet' at the coordinator" in server_log
    assert "round 2: site(s) site-b dropped for this round" in server_log
    assert "round 2/2 done" in server_log
    assert procs["site-c"].returncode == 1
    errors = [ln for ln in log_of("site-c").splitlines() if ln.startswith("covidcxr federated: error:")]
    assert len(errors) == 1 and "refused" in errors[0] and "Traceback" not in log_of("site-c")

    fedbn, fedavg = _exchanged("fedbn"), _exchanged("fedavg")
    assert len(fedbn) < len(fedavg)
    a1, b1 = (_npz(tmp_path / s / "sent" / "round-1-sent.npz") for s in ("site-a", "site-b"))
    assert len(a1) == len(b1) == len(fedbn)  # no BatchNorm tensor left either site
    with np.load(tmp_path / "site-a" / "sent" / "round-1-kept.npz") as za, \
            np.load(tmp_path / "site-b" / "sent" / "round-1-kept.npz") as zb:
        assert set(za.files) == set(zb.files) and all(".running_" in k or k.endswith((".weight", ".bias"))
                                                      for k in za.files)
        assert not all(np.allclose(za[k], zb[k]) for k in za.files)  # each site's BatchNorm is its own
    # round 1's shared tensors reached both sites equal; round 2 had only site-a: the aggregate is its update
    ra, rb = (_npz(tmp_path / s / "sent" / "round-1-received.npz") for s in ("site-a", "site-b"))
    assert all(np.array_equal(x, y) for x, y in zip(ra, rb))
    from covidcxr.models.checkpoint import read_bundle

    b = read_bundle(out / "best.ckpt")
    a2 = _npz(tmp_path / "site-a" / "sent" / "round-2-sent.npz")
    assert all(np.allclose(b["state_dict"][k].numpy(), v, atol=1e-6) for k, v in zip(fedbn, a2))
    with np.load(tmp_path / "site-a" / "sent" / "round-2-kept.npz") as za:  # the BN state released at the end
        assert all(np.allclose(b["state_dict"][k].numpy(), za[k], atol=1e-6) for k in za.files)
    fed = b["training"]["federated"]
    assert fed["strategy"] == "fedbn" and "pooled" in fed["batchnorm"]
    assert fed["refused"] == {"site-c": "preset 'covidnet' here, 'imagenet' at the coordinator"}
    assert fed["rounds_log"][1]["dropped"] == ["site-b"] and fed["rounds_log"][1]["sites_trained"] == ["site-a"]


# ---------------------------------------------------------------------------------------------- FedProx


def test_fedprox_term_pulls_weights_towards_the_global_model(tmp_path: Path) -> None:
    """The same site, data and seed: local training with the proximal term ends nearer the received weights."""
    from covidcxr.federated import Plan
    from covidcxr.federated.client import SiteClient
    from covidcxr.train import load_config

    manifest = make_sites(tmp_path / "data", {"site-a": 32})
    cfg = load_config(RECIPE, [*FAST, "data.batch_size=4", "optimizer.name=sgd", "optimizer.lr=0.05", "optimizer.body_lr_mult=1.0",
                               "scheduler.name=none"])
    plan = Plan(cfg, "fedprox", rounds=1, proximal_mu=10.0)
    conf = {"recipe": plan.recipe_json(), "strategy": "fedprox", "local_epochs": 1, "server_round": 1}

    def trained(mu: float) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
        sc = SiteClient("site-a", manifest)
        sc._setup(conf)
        start = sc.get_parameters(conf)
        end, n, _ = sc.fit(start, {**conf, "proximal_mu": mu})
        assert n == 32
        return start, end, sc.keys

    start, free, keys = trained(0.0)
    start2, prox, _ = trained(10.0)
    assert all(np.array_equal(x, y) for x, y in zip(start, start2))  # same starting point
    weights = [i for i, k in enumerate(keys) if ".running_" not in k]  # statistics are not pulled

    def dist(w: list[np.ndarray]) -> float:
        return float(np.sqrt(sum(((w[i] - start[i]) ** 2).sum() for i in weights)))

    assert dist(free) > 0
    assert dist(prox) < 0.8 * dist(free), (dist(prox), dist(free))


def test_robust_recipe_at_a_site_weighs_its_groups_and_drops_the_one_source_adversary(tmp_path: Path) -> None:
    """The group-robust recipe federated: each site's module gets its (source, class) groups, so group DRO
    runs (weights move off uniform); a site of one source has no source adversary (nothing to tell apart)."""
    from covidcxr.federated import Plan
    from covidcxr.federated.client import SiteClient
    from covidcxr.train import load_config

    manifest = make_sites(tmp_path / "data", {"site-a": 30})
    cfg = load_config(str(REPO / "configs" / "robust-mobilenet_v2.yaml"), [*FAST, "data.batch_size=6"])
    plan = Plan(cfg, "fedavg", rounds=1)
    conf = {"recipe": plan.recipe_json(), "strategy": "fedavg", "local_epochs": 1, "server_round": 1}
    sc = SiteClient("site-a", manifest)
    sc._setup(conf)
    assert sc.refused is None
    m = sc.module
    assert m.dro is not None and m.adversary is None
    assert m.sources == ["site-a"]
    q0 = m.dro.q.clone()
    _, n, metrics = sc.fit(sc.get_parameters(conf), conf)
    assert n == 30 and np.isfinite(metrics["train_loss"])
    assert not torch.allclose(m.dro.q, q0)  # the group weights were updated by the site's losses


# ---------------------------------------------------------------------------------------------- bad input


def test_unreachable_server_is_one_line(tmp_path: Path) -> None:
    from covidcxr.federated.simulation import free_port

    manifest = make_sites(tmp_path / "data", {"site-a": 3})
    t0 = time.time()
    r = subprocess.run([CLI, "federated", "client", "--data", str(manifest), "--server", f"127.0.0.1:{free_port()}",
                        "--site", "site-a", "--insecure", "--connect-timeout", "3"],
                       capture_output=True, text=True, timeout=300, env=_env())
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if "error" in ln.lower() or "fail" in ln.lower()]
    assert len(errors) == 1 and "cannot reach the federated server at 127.0.0.1:" in errors[0], r.stderr
    assert time.time() - t0 < 280
    # a name that does not resolve (yet: a coordinator not started in its compose file) is dialled again too
    r = subprocess.run([CLI, "federated", "client", "--data", str(manifest), "--server", "coordinator.invalid:9092",
                        "--site", "site-a", "--insecure", "--connect-timeout", "3"],
                       capture_output=True, text=True, timeout=300, env=_env())
    errors = [ln for ln in r.stderr.splitlines() if "error" in ln.lower() or "fail" in ln.lower()]
    assert r.returncode == 1 and len(errors) == 1, r.stderr
    assert "cannot reach the federated server at coordinator.invalid:9092 within 3 s" in errors[0], r.stderr


def test_server_short_of_sites_ends_with_one_line_while_a_site_is_connected(tmp_path: Path) -> None:
    """2 sites needed, 1 comes: the server prints one error line and its process ends (Flower's gRPC threads
    once kept it alive for ever with the site still connected, and `federated simulate` then hung)."""
    from covidcxr.federated.simulation import free_port

    manifest = make_sites(tmp_path / "data", {"site-a": 3})
    addr = f"127.0.0.1:{free_port()}"
    slog, clog = open(tmp_path / "server.log", "w"), open(tmp_path / "client.log", "w")
    # the site starts first, so this also checks that a site started before its coordinator keeps dialling; the
    # server starts once the site has imported everything, so its clock for round 1 covers only the site's
    # back-off (at most 5 s), not a loaded machine's import time (CI once saw 0 sites connect within 20 s)
    client = subprocess.Popen([CLI, "federated", "client", "--data", str(manifest), "--server", addr, "--site",
                               "site-a", "--insecure", "--connect-timeout", str(BOUND)],
                              stdout=clog, stderr=subprocess.STDOUT, env=_env())
    server = None
    try:
        _wait(lambda: "connecting to" in (tmp_path / "client.log").read_text(errors="replace")
              or client.poll() is not None, BOUND, "the site to dial the server")
        assert client.poll() is None, (tmp_path / "client.log").read_text(errors="replace")
        server = subprocess.Popen([CLI, "federated", "server", "--config", RECIPE, *SETS, "--rounds", "1",
                                   "--address", addr, "--out", str(tmp_path / "fed"), "--insecure", "--sites", "2",
                                   "--min-sites", "2", "--connect-timeout", "30"],
                                  stdout=slog, stderr=subprocess.STDOUT, env=_env())
        rc = server.wait(timeout=BOUND)
        text = (tmp_path / "server.log").read_text(errors="replace")
        assert rc == 2, text
        assert "Traceback" not in text
        errors = [ln for ln in text.splitlines() if "error" in ln.lower()]
        assert len(errors) == 1 and "only 1 site(s) connected" in errors[0], text
        # the site was connected: it says the coordinator went away, at once, not that it cannot reach it
        assert client.wait(timeout=BOUND) == 1
        ctext = (tmp_path / "client.log").read_text(errors="replace")
        cerrors = [ln for ln in ctext.splitlines() if "error" in ln.lower()]
        assert len(cerrors) == 1 and "the connection to" in cerrors[0] and "ended before the run did" in cerrors[0], ctext
        assert "Traceback" not in ctext
    finally:
        for p in (client, server):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        slog.close()
        clog.close()


# ---------------------------------------------------------------------------------------------- DP


def test_dp_clips_each_site_noises_the_mean_and_reports_epsilon(tmp_path: Path) -> None:
    """FedAvg with Flower's client-side fixed clipping: every update that left a site has norm <= C, the global
    model is their uniform mean plus Gaussian noise of std z*C/n, and the stored epsilon is the RDP accountant's."""
    import dp_accounting

    manifest = make_sites(tmp_path / "data", {"site-a": 6, "site-b": 9})
    out = tmp_path / "fed"
    z, clip, delta = 0.5, 0.25, 1e-5
    r = subprocess.run([CLI, "federated", "simulate", "--config", RECIPE, "--data", str(manifest), "--site-column",
                        "source", "--rounds", "1", "--strategy", "fedavg", "--dp-noise", str(z), "--dp-clip", str(clip),
                        "--dp-delta", str(delta), "--out", str(out), *SETS,
                        "--set", "data.hist_standardize=film"],  # the checkpoint must carry the sites' preset
                       capture_output=True, text=True, timeout=BOUND, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    sites = ["site-a", "site-b"]
    sent = [_npz(out / "sites" / s / "sent" / "round-1-sent.npz") for s in sites]
    received = _npz(out / "sites" / "site-a" / "sent" / "round-1-received.npz")
    for s, u in zip(sites, sent):
        norm = np.sqrt(sum(((a.astype(np.float64) - g) ** 2).sum() for a, g in zip(u, received)))
        assert norm <= clip * (1 + 1e-4), (s, norm)
        assert json.loads((out / "sites" / s / "sent" / "round-1-sent.json").read_text())["num_examples"] == 1
    from covidcxr.models.checkpoint import read_bundle

    b = read_bundle(out / "last.ckpt")
    from covidcxr.preprocess import NIH_CXR14_TEMPLATE

    assert tuple(b["preset"]["hist_template"]) == tuple(NIH_CXR14_TEMPLATE)  # the sites trained standardised films
    keys = _exchanged("fedavg")
    mean = _weighted_mean([(u, 1) for u in sent])
    noise = np.concatenate([(b["state_dict"][k].numpy().astype(np.float64) - m).ravel() for k, m in zip(keys, mean)
                            if not k.endswith("running_var")])  # clamped at 1e-5 after the noise
    assert abs(noise.std() / (z * clip / 2) - 1) < 0.05 and abs(noise.mean()) < 1e-3
    dp = b["training"]["federated"]["dp"]
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(z), 1)
    assert dp["epsilon"] == pytest.approx(acc.get_epsilon(delta), rel=1e-3)
    assert dp["noise_multiplier"] == z and dp["clipping_norm"] == clip and dp["releases"] == 1
    assert "DP epsilon" in r.stderr


def test_a_site_masking_with_another_lung_segmenter_is_refused() -> None:
    """A lung-mask recipe: the coordinator's checkpoint records its segmenter, so a site whose films another one
    masked must not join (inference would use the recorded segmenter on films masked differently)."""
    from covidcxr.federated.plan import segmenter_mismatch

    a = {"name": "lung-unet-vgg11", "sha256": "a" * 64}
    b = {"name": "lung-unet-local", "sha256": "b" * 64}
    assert segmenter_mismatch(a, dict(a)) is None
    assert segmenter_mismatch(None, a) is None and segmenter_mismatch(a, None) is None  # no lung masks in play
    why = segmenter_mismatch(b, a)
    assert why == ("lung segmenter 'lung-unet-local' (sha256 bbbbbbbbbbbb) here, 'lung-unet-vgg11' "
                   "(sha256 aaaaaaaaaaaa) at the coordinator")
