"""The DICOM node against a real Orthanc on loopback: C-STORE -> SR in Orthanc, latency and throughput.

Starts Orthanc (Debian package ``orthanc``, generated configuration, free ports, storage in a tmp dir)
and ``covidcxr dicom listen`` in a subprocess forwarding to it. Every image is the RSNA sample (CR,
1024 x 1024) with +-1 grey-level noise added, stored uncompressed, under a fresh SOP Instance UID: the same
work per image in every phase, and neither the duplicate check nor the mask cache (keyed by pixel hash) helps.
Two warm-up images (model load, first-call costs) are not counted.

* **latency**: ``--images`` images one at a time; for each, the time from the start of the C-STORE to the
  node until its SR is stored in Orthanc (seen by polling Orthanc's ``/changes`` every 20 ms, so figures
  carry up to ~20 ms of polling delay). p50, p95, mean.
* **throughput**: for each ``--concurrency`` k, ``--images`` images sent back to back over k associations
  at once; images per second = images / (first C-STORE start -> last SR in Orthanc). Also the C-STORE
  answer time (what the PACS waits for) and the end-to-end time per image, which includes queueing.

    .venv/bin/python benchmarks/dicom_node.py [--model CKPT] [--images 50] [--concurrency 1 4]
        [--workers 1] [--threads 1] [--no-plausibility] [--out FILE.json]

Without --model a random-weight resnet18 checkpoint at 224 px is made (speed does not depend on the
weights). Prints a table and writes benchmarks/results/dicom_node.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _models import random_resnet18  # benchmarks/ is the script's folder: sys.path[0]

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def _summary(values: list[float]) -> dict[str, float | None]:
    return {"n": len(values), "p50_ms": _pct(values, 0.5), "p95_ms": _pct(values, 0.95),
            "mean_ms": statistics.fmean(values) if values else None, "max_ms": max(values) if values else None}


class SrWatcher(threading.Thread):
    """Polls Orthanc's /changes; records when the SR for each source SOP Instance UID arrived."""

    def __init__(self, pacs, sr_uid_to_source: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.pacs, self.map = pacs, sr_uid_to_source
        self.arrived: dict[str, float] = {}
        self.since = int(pacs.get("/changes?last")["Last"])
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            changes = self.pacs.get(f"/changes?since={self.since}&limit=500")
            now = time.perf_counter()
            for ch in changes["Changes"]:
                if ch["ChangeType"] == "NewInstance":
                    uid = self.pacs.tags(ch["ID"]).get("SOPInstanceUID")
                    if uid in self.map:
                        self.arrived.setdefault(self.map[uid], now)
            self.since = changes["Last"]
            if changes["Done"]:
                time.sleep(0.02)

    def wait(self, uids: list[str], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(u in self.arrived for u in uids):
                return True
            time.sleep(0.02)
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--images", type=int, default=50)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--workers", type=int, default=1, help="node analysis threads")
    ap.add_argument("--threads", type=int, default=1, help="node intra-op threads")
    ap.add_argument("--no-plausibility", action="store_true", help="run the node without the plausibility check")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for all SRs of one run")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "dicom_node.json")
    args = ap.parse_args()

    import pydicom
    from pynetdicom import AE, _config
    from pynetdicom.sop_class import SecondaryCaptureImageStorage, Verification

    from covidcxr.dicom.common import derived_uid, quiet_dicom_libraries
    from covidcxr.testing.orthanc import Orthanc, OrthancUnavailable, free_port, orthanc_binary
    from covidcxr.predict import file_sha256
    from covidcxr.shared import data_dir

    quiet_dicom_libraries()
    try:
        orthanc_binary()
    except OrthancUnavailable as err:
        print(f"dicom_node benchmark: {err}", file=sys.stderr)
        return 2
    sample = data_dir() / "samples" / "rsna-pneumonia-sample.dcm"
    if not sample.is_file():
        print(f"dicom_node benchmark: {sample} not found (shared data)", file=sys.stderr)
        return 2
    source = pydicom.dcmread(sample)
    ts = str(source.file_meta.TransferSyntaxUID)

    tmp = Path(tempfile.mkdtemp(prefix="covidcxr-dicom-bench-"))
    model = args.model or random_resnet18(tmp)
    sha = file_sha256(model)
    pacs = Orthanc(tmp / "orthanc").start()
    port = free_port()
    exe = Path(sys.executable).parent / "covidcxr"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "import sys; from covidcxr.cli import main; sys.exit(main())"]
    cmd += ["dicom", "listen", "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
            "--forward", f"ORTHANC@127.0.0.1:{pacs.dicom_port}", "--allow", "BENCH@127.0.0.1",
            "--store", str(tmp / "store"), "--workers", str(args.workers), "--threads", str(args.threads),
            "--max-pending", str(10 * args.images)] + (["--no-plausibility"] if args.no_plausibility else [])
    # a fresh mask cache: masks cached by earlier runs over the same images would hide the segmenter's cost
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "COVIDCXR_CACHE": str(tmp / "cache")}
    weights = data_dir().parent / "weights"
    if not args.no_plausibility and "COVIDCXR_WEIGHTS_DIR" not in env and (weights / "README.md").is_file():
        env["COVIDCXR_WEIGHTS_DIR"] = str(weights)  # the lung U-Net of the plausibility check
    plausibility = "off" if args.no_plausibility else (
        "on (lung U-Net)" if env.get("COVIDCXR_WEIGHTS_DIR") else "on, but no weights: records 'unchecked'")
    node_log = open(tmp / "node.log", "wb")
    node = subprocess.Popen(cmd, stdout=node_log, stderr=subprocess.STDOUT, env=env)

    ae = AE(ae_title="BENCH")
    ae.add_requested_context(Verification)
    ae.add_requested_context(SecondaryCaptureImageStorage, ts)
    ae.add_requested_context(SecondaryCaptureImageStorage, pydicom.uid.ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    _config.STORE_SEND_CHUNKED_DATASET = True

    import numpy as np

    base = source.pixel_array.astype(np.int16)  # the RSNA image, decoded once
    rng = np.random.default_rng(0)

    def wrap() -> pydicom.Dataset:
        """The RSNA image with +-1 grey-level noise (new pixel hash: no mask cache helps), uncompressed 8-bit."""
        arr = np.clip(base + rng.integers(-1, 2, base.shape), 0, 255).astype(np.uint8)
        ds = pydicom.dcmread(sample, stop_before_pixels=True)
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        for kw in ("LossyImageCompression", "LossyImageCompressionMethod"):
            if kw in ds:
                delattr(ds, kw)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
        ds.PixelData = arr.tobytes()
        ds["PixelData"].VR = "OB"  # read from an encapsulated file, the element's VR is still ambiguous
        return ds

    def fresh_files(n: int, tag: str) -> list[tuple[str, Path]]:
        """n distinct images (different pixels, so no per-image cache helps), each with a new SOP Instance UID."""
        out = []
        d = tmp / tag
        d.mkdir()
        for i in range(n):
            ds = wrap()
            ds.SOPInstanceUID = pydicom.uid.generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            p = d / f"{i}.dcm"
            ds.save_as(p, enforce_file_format=True)
            out.append((str(ds.SOPInstanceUID), p))
        return out

    def assoc():
        a = ae.associate("127.0.0.1", port, ae_title="COVIDCXR")
        if not a.is_established:
            raise RuntimeError("no association with the node")
        return a

    results: dict = {}
    watcher = None
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 120:
            a = ae.associate("127.0.0.1", port, ae_title="COVIDCXR")
            if a.is_established:
                a.release()
                break
            if node.poll() is not None:
                raise RuntimeError(f"the node exited; see {tmp / 'node.log'}")
            time.sleep(0.5)
        all_files = {"latency": fresh_files(args.images, "latency")}
        for k in args.concurrency:
            all_files[f"c{k}"] = fresh_files(args.images, f"c{k}")
        sr_map = {derived_uid(uid, sha, "sr"): uid for files in all_files.values() for uid, _ in files}
        watcher = SrWatcher(pacs, sr_map)
        watcher.start()

        # warm-up (first-call costs: model, highdicom's tables), not counted
        warm = fresh_files(2, "warm")
        sr_map.update({derived_uid(uid, sha, "sr"): uid for uid, _ in warm})
        a = assoc()
        for _, p in warm:
            a.send_c_store(p)
        a.release()
        watcher.wait([u for u, _ in warm], args.timeout)

        # latency: one image at a time
        lat, ack = [], []
        a = assoc()
        for uid, p in all_files["latency"]:
            t = time.perf_counter()
            st = a.send_c_store(p)
            ack.append((time.perf_counter() - t) * 1e3)
            assert int(st.Status) == 0, hex(int(st.Status))
            if not watcher.wait([uid], args.timeout):
                raise RuntimeError("SR did not arrive")
            lat.append((watcher.arrived[uid] - t) * 1e3)
        a.release()
        results["latency"] = {"images": len(lat), "cstore_to_sr_in_orthanc": _summary(lat),
                              "cstore_answer": _summary(ack)}
        print(f"latency (1 image at a time, {len(lat)} images): C-STORE -> SR in Orthanc "
              f"p50 {results['latency']['cstore_to_sr_in_orthanc']['p50_ms']:.0f} ms, "
              f"p95 {results['latency']['cstore_to_sr_in_orthanc']['p95_ms']:.0f} ms", flush=True)

        # throughput: k associations at once
        for k in args.concurrency:
            files = all_files[f"c{k}"]
            starts: dict[str, float] = {}
            acks: list[float] = []
            errors: list[str] = []

            def client(chunk: list[tuple[str, Path]]) -> None:
                try:
                    c = assoc()
                    for uid, p in chunk:
                        t = time.perf_counter()
                        starts[uid] = t
                        st = c.send_c_store(p)
                        acks.append((time.perf_counter() - t) * 1e3)
                        if int(st.Status) != 0:
                            errors.append(hex(int(st.Status)))
                    c.release()
                except Exception as err:  # counted, reported
                    errors.append(f"{type(err).__name__}: {err}")

            chunks = [files[i::k] for i in range(k)]
            t_start = time.perf_counter()
            threads = [threading.Thread(target=client, args=(ch,)) for ch in chunks]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            ok = watcher.wait([u for u, _ in files], args.timeout)
            uids = [u for u, _ in files if u in watcher.arrived]
            t_end = max(watcher.arrived[u] for u in uids) if uids else time.perf_counter()
            e2e = [(watcher.arrived[u] - starts[u]) * 1e3 for u in uids if u in starts]
            results[f"concurrency_{k}"] = {
                "associations": k, "images": len(files), "srs_arrived": len(uids), "complete": ok,
                "errors": errors, "wall_s": t_end - t_start, "images_per_s": len(uids) / (t_end - t_start),
                "cstore_answer": _summary(acks), "cstore_to_sr_in_orthanc": _summary(e2e)}
            r = results[f"concurrency_{k}"]
            print(f"throughput, {k} association(s): {r['images_per_s']:.2f} images/s ({len(uids)}/{len(files)} SRs in "
                  f"{r['wall_s']:.1f} s); C-STORE answered p50 {r['cstore_answer']['p50_ms']:.0f} ms; "
                  f"end to end p50 {r['cstore_to_sr_in_orthanc']['p50_ms']:.0f} ms, "
                  f"p95 {r['cstore_to_sr_in_orthanc']['p95_ms']:.0f} ms; errors {len(errors)}", flush=True)
    finally:
        if watcher is not None:
            watcher.halt.set()
        node.terminate()
        try:
            node.wait(timeout=60)
        except subprocess.TimeoutExpired:
            node.kill()
        node_log.close()
        pacs.stop()

    # the node's own time per image (decode excluded: predict, plausibility, Grad-CAM, SR + SC), in arrival order
    import re

    per_image = [float(m) for m in re.findall(r"\((\d+) ms\)", (tmp / "node.log").read_text())]
    phases = ["warm-up"] + ["latency"] + [f"concurrency_{k}" for k in args.concurrency]
    sizes = [2] + [args.images] * (1 + len(args.concurrency))
    i = 0
    for name, n in zip(phases, sizes):
        if name in results:
            results[name]["node_analysis"] = _summary(per_image[i:i + n])
        i += n
    out = {
        "benchmark": "dicom_node",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_avg_1m_at_end": os.getloadavg()[0]},
        "model": "resnet18 random weights, deepcovid preset 224 px" if not args.model else str(args.model),
        "node": {"workers": args.workers, "threads": args.threads, "heatmaps": "Grad-CAM (torch backend)",
                 "plausibility": plausibility},
        "image": "RSNA sample (CR 1024x1024) + random +-1 grey-level noise per image, uncompressed 8-bit, "
                 "a new SOP Instance UID per send",
        "orthanc": "Debian package orthanc 1.10.1, loopback",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
