"""What does a federation round cost beyond training? Detection latency, poll cost, bytes moved.

Training is replaced by a fixed sleep (:class:`SleepWork`, a real
:class:`fedfs.roles.site.LocalWork` whose weights have the shapes of nnU-Net's 2D
5-stage network: 7.8 M float32 parameters in 88 tensors, 29.6 MiB), so only the
federation's own cost is measured. Three sites and an aggregator each run the
real role loop, ``run_loop(role.step, make_trigger(store, watch=..., poll_interval=...))``,
as separate processes, each with its own :class:`~fedfs.federation.Federation`
opened on the bucket URL, as separate parties would. The federation is FFE,
synchronous. Backends: a folder watched with inotify, the same folder polled,
and S3 (a moto server started in this process, polled).

Every party's store is wrapped in :class:`CountingStore`: each call of the
public Store API (read_bytes, write_bytes, publish, exists, list, size, upload,
download, delete) counts as one storage request, with the payload bytes it moved.
On S3 a WSGI middleware in the moto server also counts the HTTP requests and
body bytes of each party (told apart by their access key ids): bytes on the wire.

Measured, per backend:

* ``detect_median_s`` / ``detect_max_s`` over rounds: from the moment the last
  site's update manifest is committed (site-side clock, right after ``publish``
  returns) to the moment every site has loaded the next global (read it fully,
  in ``train_round``, or in ``finish`` for the final one). The interval covers the
  aggregator noticing, aggregating, publishing, and the sites noticing and
  downloading; ``rounds_detail`` splits it up.
* ``idle_poll_requests_round1`` / ``..._round50``: storage requests of one idle
  poll (one ``step()`` returning "wait", in the steady state: the heartbeat hint was
  written by the previous poll) at global version 1 and at version 50, for the
  party whose poll costs most (the aggregator, which probes each site's next
  update). Per-party counts are under ``idle_polls``. These come from a separate
  tiny-model federation driven to version 50 in-process on the same backend kind
  (the step code is what is measured; the trigger does not change it).
* ``bytes`` (S3): per site per round, bytes uploaded and downloaded between the
  site's set-up (census, fingerprint, plans and initial weights: one-off, reported
  under ``setup``) and its last update; the final global's download is reported
  under ``finish``. Target: at most 1.05 x two model sizes (one upload, one download).

Targets: folder with inotify ``detect_median_s`` <= 0.5; polled backends
``detect_median_s`` <= ``poll_interval_s`` + 1; ``idle_poll_requests_round50`` ==
``idle_poll_requests_round1``; ``bytes.ratio_to_two_models`` <= 1.05.

``python benchmarks/round_overhead.py --json [--quick]`` prints one JSON object on
stdout; logs go to stderr. ``--quick``: 5 rounds per backend (default 10).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py: the output shape
from _common import benchmark_output, target  # noqa: E402

try:
    import fedfs  # noqa: F401
except ImportError:  # run from a checkout without an installed fedfs
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedfs import layout
from fedfs.store import Store, open_store

MB = 1024 * 1024
SITES = ("A", "B", "C")
AGGREGATOR = "agg"
CASES = {"A": 6, "B": 3, "C": 2}
INOTIFY_SAFETY_NET_S = 30.0  # the inotify trigger's polling fallback; detection must not rely on it
# Four parties share this machine's cores; in a real federation each has its own machine. One
# compute thread per party keeps OpenMP pools from spinning against each other (oversubscription
# made a 30 MiB load take 1-2 s of wall time here instead of ~0.05 s).
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- the model
def nnunet_2d_shapes(features: tuple[int, ...] = (32, 64, 128, 256, 512), in_channels: int = 1,
                     classes: int = 3) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of nnU-Net's 2D 5-stage PlainConvUNet (88 tensors, 7.77 M params).

    Written out rather than built, so the benchmark needs no dynamic_network_architectures;
    the names and shapes match ``PlainConvUNet(...).named_parameters()``.
    """
    shapes: dict[str, tuple[int, ...]] = {}

    def conv_block(prefix: str, c_in: int, c_out: int) -> None:
        for i, ci in enumerate((c_in, c_out)):
            shapes[f"{prefix}.convs.{i}.conv.weight"] = (c_out, ci, 3, 3)
            shapes[f"{prefix}.convs.{i}.conv.bias"] = (c_out,)
            shapes[f"{prefix}.convs.{i}.norm.weight"] = (c_out,)
            shapes[f"{prefix}.convs.{i}.norm.bias"] = (c_out,)

    c_in = in_channels
    for s, f in enumerate(features):
        conv_block(f"encoder.stages.{s}.0", c_in, f)
        c_in = f
    up = list(reversed(features))
    for s in range(len(features) - 1):
        conv_block(f"decoder.stages.{s}", up[s], up[s + 1])
    for s in range(len(features) - 1):
        shapes[f"decoder.transpconvs.{s}.weight"] = (up[s], up[s + 1], 2, 2)
        shapes[f"decoder.transpconvs.{s}.bias"] = (up[s + 1],)
    for s in range(len(features) - 1):
        shapes[f"decoder.seg_layers.{s}.weight"] = (classes, up[s + 1], 1, 1)
        shapes[f"decoder.seg_layers.{s}.bias"] = (classes,)
    return shapes


TINY_SHAPES = {"conv.weight": (4, 1, 3, 3), "conv.bias": (4,), "seg.weight": (3, 4, 1, 1), "seg.bias": (3,)}


def model_shapes(model: str) -> dict[str, tuple[int, ...]]:
    return nnunet_2d_shapes() if model == "nnunet2d" else dict(TINY_SHAPES)


class SleepWork:
    """A :class:`fedfs.roles.site.LocalWork` whose training is a fixed sleep.

    ``train_round`` reads the whole global (validated and loaded, as a trainer
    would), sleeps ``sleep_s``, and writes global + a small perturbation as the update.
    ``loaded_at`` holds, per global loaded (rounds, then the final one), the time
    the load finished.
    """

    def __init__(self, name: str, shapes: dict[str, tuple[int, ...]], cases: int = 4, seed: int = 0,
                 sleep_s: float = 0.5) -> None:
        self.name, self.shapes, self.cases, self.seed, self.sleep_s = name, shapes, cases, seed, sleep_s
        self.epoch = 0
        self.loaded_at: list[float] = []
        self.load_times: list[tuple[float, float, float]] = []  # (start, end, CPU seconds)
        self.global_sizes: list[int] = []

    @property
    def num_cases(self) -> int:
        return self.cases

    def census(self) -> tuple[int, int]:
        return self.cases, 1

    def fingerprint_summary(self, total_cases: int) -> dict[str, Any]:
        import numpy as np

        from fedfs.fl.fingerprint import SiteSummaryBuilder, summarize_samples

        rng = np.random.default_rng(self.seed)
        spc = int(1000 // total_cases)
        b = SiteSummaryBuilder(1, total_cases, spc)
        for _ in range(self.cases):
            samples = np.round(rng.normal(100 + self.seed, 10, spc)).astype(np.float32)
            b.add_case([1.0, 1.0], [64, 64], 1.0, [summarize_samples(samples)], "float32")
        return b.summary()

    def plan(self, global_fingerprint: dict[str, Any] | None) -> tuple[str, dict[str, Any], str]:
        import hashlib

        plans = {"plans_name": "SleepPlans", "tensors": len(self.shapes),
                 "params": sum(math.prod(s) for s in self.shapes.values())}
        return "SleepPlans", {"plans": plans}, hashlib.sha256(json.dumps(plans, sort_keys=True).encode()).hexdigest()

    def start(self, total_epochs: int) -> None:
        pass

    def initial_weights(self, path: str) -> None:
        import torch

        from fedfs.weights.tensors import save_weights

        gen = torch.Generator().manual_seed(1234)  # every site the same net, as nnU-Net's identical plans give
        save_weights(path, {k: torch.randn(s, generator=gen) * 0.05 for k, s in self.shapes.items()},
                     {"site": self.name, "init": "1"})

    def _load(self, global_path: str) -> dict[str, Any]:
        from fedfs.weights.tensors import load_weights

        t0, c0 = time.time(), time.process_time()
        tensors, _ = load_weights(global_path, expected=self.shapes)
        self.loaded_at.append(time.time())
        self.load_times.append((t0, self.loaded_at[-1], time.process_time() - c0))
        self.global_sizes.append(os.path.getsize(global_path))
        return tensors

    def train_round(self, global_path: str, epochs: int, update_path: str) -> dict[str, float]:
        from fedfs.weights.tensors import save_weights

        tensors = self._load(global_path)
        time.sleep(self.sleep_s)
        delta = 1e-3 * (self.seed + 1)
        for t in tensors.values():
            t.add_(delta)
        self.epoch += epochs
        save_weights(update_path, tensors, {"site": self.name})
        return {"train_loss": 1.0 / (1 + self.epoch), "epoch": float(self.epoch)}

    def checkpoint(self) -> None:
        pass

    def finish(self, global_path: str) -> dict[str, Any]:
        self._load(global_path)
        return {"epochs": self.epoch}


# ---------------------------------------------------------------------------- counting
class CountingStore(Store):
    """A Store that forwards to ``inner`` and counts each public call as one storage request.

    ``log`` holds ``(t_start, t_end, op, key, ok, bytes_up, bytes_down)`` per request.
    """

    def __init__(self, inner: Store) -> None:
        super().__init__(inner.url)
        self.inner = inner
        self.scheme = inner.scheme
        self.local_path = inner.local_path
        self._lock = threading.Lock()
        self.log: list[tuple[float, float, str, str, bool, int, int]] = []

    def __getattr__(self, name: str) -> Any:  # fs, root, publish_mechanism...: the backend's own
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _call(self, op: str, key: str, fn, up: int = 0, down=None):
        t0 = time.time()
        ok, result = False, None
        try:
            result = fn()
            ok = True
            return result
        finally:
            d = (down(result) if down is not None else 0) if ok else 0
            with self._lock:
                self.log.append((t0, time.time(), op, key, ok, up if ok else 0, d))

    def read_bytes(self, key: str, *, max_size: int | None = None) -> bytes:
        return self._call("read_bytes", key, lambda: self.inner.read_bytes(key, max_size=max_size), down=len)

    def write_bytes(self, key: str, data: bytes) -> None:
        self._call("write_bytes", key, lambda: self.inner.write_bytes(key, data), up=len(data))

    def publish(self, key: str, data: bytes) -> None:
        self._call("publish", key, lambda: self.inner.publish(key, data), up=len(data))

    def exists(self, key: str) -> bool:
        return self._call("exists", key, lambda: self.inner.exists(key))

    def list(self, prefix: str = "") -> list[str]:
        return self._call("list", prefix, lambda: self.inner.list(prefix))

    def size(self, key: str) -> int:
        return self._call("size", key, lambda: self.inner.size(key))

    def delete(self, key: str) -> None:
        self._call("delete", key, lambda: self.inner.delete(key))

    def upload(self, key: str, local_path: str) -> None:
        self._call("upload", key, lambda: self.inner.upload(key, local_path), up=os.path.getsize(local_path))

    def download(self, key: str, local_path: str, *, expected_sha256: str | None = None) -> str:
        return self._call("download", key, lambda: self.inner.download(key, local_path, expected_sha256=expected_sha256),
                          down=lambda _: os.path.getsize(local_path))

    def describe(self, key: str) -> str:
        return self.inner.describe(key)

    def close(self) -> None:
        self.inner.close()

    # the primitives are never reached: every public method above goes to ``inner``
    def _read(self, key, max_size):  # pragma: no cover
        raise AssertionError("CountingStore forwards public calls only")

    _write = _publish = _exists = _list = _size = _delete = _read

    # ---- summaries
    def mark(self) -> int:
        with self._lock:
            return len(self.log)

    def totals(self, start: int = 0, end: int | None = None) -> dict[str, Any]:
        with self._lock:
            entries = self.log[start:end]
        ops = Counter(e[2] for e in entries)
        return {"requests": len(entries), "ops": dict(sorted(ops.items())),
                "bytes_up": sum(e[5] for e in entries), "bytes_down": sum(e[6] for e in entries)}


class S3Meter:
    """WSGI middleware for the moto server: HTTP requests and body bytes per access key id."""

    _CRED = re.compile(r"Credential=([^/,\s]+)/")

    def __init__(self, app) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.log: list[list] = []  # [t_arrival, access key id, method, body bytes in, body bytes out]

    def __call__(self, environ, start_response):
        m = self._CRED.search(environ.get("HTTP_AUTHORIZATION", ""))
        try:
            body_in = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            body_in = 0
        # counted when the request arrives (so a client never sees its response before the count)
        method = environ.get("REQUEST_METHOD", "")
        if method == "GET" and "list-type=" in environ.get("QUERY_STRING", ""):
            method = "LIST"  # ListObjectsV2
        entry = [time.time(), m.group(1) if m else "?", method, body_in, 0]
        with self.lock:
            self.log.append(entry)
        return self._count(self.app(environ, start_response), entry)

    @staticmethod
    def _count(result, entry: list):
        try:
            for chunk in result:
                entry[4] += len(chunk)
                yield chunk
        finally:
            if hasattr(result, "close"):
                result.close()

    def window(self, who: str, t0: float = 0.0, t1: float = math.inf) -> dict[str, Any]:
        with self.lock:
            entries = [e for e in self.log if e[1] == who and t0 < e[0] <= t1]
        return {"http_requests": len(entries), "http_methods": dict(sorted(Counter(e[2] for e in entries).items())),
                "wire_bytes_up": sum(e[3] for e in entries), "wire_bytes_down": sum(e[4] for e in entries)}

    def mark(self) -> int:
        with self.lock:
            return len(self.log)

    def since(self, mark: int, who: str) -> dict[str, Any]:
        with self.lock:
            entries = [e for e in self.log[mark:] if e[1] == who]
        return {"http_requests": len(entries), "http_methods": dict(sorted(Counter(e[2] for e in entries).items()))}


class MotoS3:
    """A moto S3 server on a free loopback port with an :class:`S3Meter`; sets AWS_* variables."""

    def __enter__(self) -> MotoS3:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
        self._env = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                                     "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "coordinator")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        self.meter = S3Meter(self.server._server.app)
        self.server._server.app = self.meter  # werkzeug's handler calls server.app per request
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        os.environ["AWS_ENDPOINT_URL"] = self.endpoint
        return self

    def new_bucket(self) -> str:
        import boto3

        name = f"fedfs-bench-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=self.endpoint).create_bucket(Bucket=name)
        return f"s3://{name}/fed"

    def __exit__(self, *exc: Any) -> None:
        self.server.stop()
        for k, v in self._env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def party_options(url: str, party: str) -> dict[str, Any] | None:
    """Storage options per party: on S3 its own access key id, so the meter can tell parties apart."""
    return {"key": f"party-{party}", "secret": "testing"} if url.startswith("s3://") else None


# ---------------------------------------------------------------------------- set-up
def make_keys(folder: Path) -> Path:
    from fedfs.trust.signing import generate_keypair

    generate_keypair(AGGREGATOR, "aggregator", folder)
    for s in SITES:
        generate_keypair(s, "site", folder)
    return folder


def create_federation(url: str, keys: Path, rounds: int) -> None:
    from fedfs.federation import Federation, config_from_key_dir

    config, agg = config_from_key_dir(keys, list(SITES), aggregator=AGGREGATOR, mode="ffe", rounds=rounds)
    Federation.create(open_store(url, party_options(url, "coordinator")), config, agg)


def open_party(url: str, keys: Path, party: str):
    """The party's own Federation over its own counting store, as a separate party would open it."""
    from fedfs.federation import Federation

    store = CountingStore(open_store(url, party_options(url, party)))
    return Federation.open(store, identity=keys / f"{party}.key"), store


def make_role(fed, party: str, workdir: Path, model: str, sleep_s: float):
    from fedfs.roles.aggregator import Aggregator
    from fedfs.roles.site import Site

    if party == AGGREGATOR:
        return Aggregator(fed, workdir), None
    work = SleepWork(party, model_shapes(model), cases=CASES[party], seed=SITES.index(party), sleep_s=sleep_s)
    return Site(fed, work, workdir), work


# ---------------------------------------------------------------------------- one party's loop
def run_party(spec: dict[str, Any], stop: threading.Event | None = None) -> dict[str, Any]:
    """Run one party's real role loop to the end; return its timeline and request log."""
    from fedfs import make_trigger, run_loop

    party = spec["party"]
    fed, store = open_party(spec["url"], Path(spec["keys"]), party)
    role, work = make_role(fed, party, Path(spec["workdir"]), spec["model"], spec["sleep_s"])
    trigger = make_trigger(store, watch=spec["watch"], poll_interval=spec["poll_interval"])
    actions: list[tuple[float, str, int]] = []

    def on_result(result: Any) -> None:
        actions.append((time.time(), result.action, store.mark()))

    try:
        final = run_loop(role.step, trigger, stop=stop, on_result=on_result, max_idle_s=spec.get("max_idle_s", 180))
    finally:
        trigger.close()
    return {"party": party, "trigger": trigger.kind, "final": str(final), "actions": actions, "log": store.log,
            "loaded_at": work.loaded_at if work else [], "load_times": work.load_times if work else [],
            "global_sizes": work.global_sizes if work else []}


def run_federation(url: str, keys: Path, workdir: Path, *, rounds: int, watch: str, poll_interval: float,
                   model: str = "nnunet2d", sleep_s: float = 0.5, processes: bool = True,
                   timeout_s: float = 600) -> dict[str, dict[str, Any]]:
    """3 sites + aggregator on ``url``, each running its real loop (processes, or threads for tests)."""
    create_federation(url, keys, rounds)
    workdir.mkdir(parents=True, exist_ok=True)
    specs = {p: {"party": p, "url": url, "keys": str(keys), "workdir": str(workdir / p), "model": model,
                 "sleep_s": sleep_s, "watch": watch, "poll_interval": poll_interval}
             for p in (AGGREGATOR, *SITES)}
    return _run_processes(specs, workdir, timeout_s) if processes else _run_threads(specs, timeout_s)


def _run_threads(specs: dict[str, dict[str, Any]], timeout_s: float) -> dict[str, dict[str, Any]]:
    stop = threading.Event()
    results: dict[str, Any] = {}

    def target(p: str) -> None:
        try:
            results[p] = run_party(specs[p], stop)
        except BaseException as exc:  # noqa: BLE001 - reported below, and the other parties stopped
            results[p] = exc
            stop.set()

    threads = [threading.Thread(target=target, args=(p,), name=f"party-{p}", daemon=True) for p in specs]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stop.set()
    for p in specs:
        if not isinstance(results.get(p), dict):
            raise RuntimeError(f"party {p} did not finish: {results.get(p, 'timed out')!r}")
    return results


def _run_processes(specs: dict[str, dict[str, Any]], workdir: Path, timeout_s: float) -> dict[str, dict[str, Any]]:
    procs = {}
    for p, spec in specs.items():
        spec = {**spec, "out": str(workdir / f"{p}.result.json")}
        path = workdir / f"{p}.spec.json"
        path.write_text(json.dumps(spec))
        procs[p] = (subprocess.Popen([sys.executable, os.path.abspath(__file__), "--party", str(path)],
                                     stdout=subprocess.DEVNULL, env={**os.environ, **ONE_THREAD}), spec["out"])
    deadline = time.monotonic() + timeout_s
    failed = None
    while any(proc.poll() is None for proc, _ in procs.values()):
        for p, (proc, _) in procs.items():
            if proc.poll() not in (None, 0):
                failed = failed or f"party {p} exited with {proc.returncode}"
        if failed or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for p, (proc, _) in procs.items():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            failed = failed or f"party {p} did not finish in {timeout_s:.0f} s"
        elif proc.returncode != 0:
            failed = failed or f"party {p} exited with {proc.returncode}"
    if failed:
        raise RuntimeError(failed)
    return {p: json.loads(Path(out).read_text()) for p, (_, out) in procs.items()}


# ---------------------------------------------------------------------------- analysis
def _first_ok(entries, op: str, key: str, after: float = 0.0) -> float | None:
    times = [e[1] for e in entries if e[2] == op and e[3] == key and e[4] and e[1] >= after]
    return min(times) if times else None


def _totals(entries) -> dict[str, Any]:
    ops = Counter(e[2] for e in entries)
    return {"requests": len(entries), "ops": dict(sorted(ops.items())),
            "bytes_up": sum(e[5] for e in entries), "bytes_down": sum(e[6] for e in entries)}


def analyse(results: dict[str, dict[str, Any]], rounds: int) -> dict[str, Any]:
    """Per round: last update commit -> every site loaded the next global, and where the time went."""
    agg_log = results[AGGREGATOR]["log"]
    commit = {(s, r): _first_ok(results[s]["log"], "publish", layout.site_update(s, r))
              for s in SITES for r in range(rounds)}
    published = {v: _first_ok(agg_log, "publish", layout.global_version(v)) for v in range(rounds + 1)}
    detail = []
    for r in range(rounds):
        last = max(SITES, key=lambda s: commit[(s, r)])
        t_commit = commit[(last, r)]
        t_loaded = max(results[s]["loaded_at"][r + 1] for s in SITES)
        seen = _first_ok(agg_log, "read_bytes", layout.site_update(last, r), after=t_commit)
        site_seen = {s: _first_ok(results[s]["log"], "read_bytes", layout.global_version(r + 1)) for s in SITES}
        # whole-model downloads the aggregator made for this version (updates, and anything else)
        agg_dl = [e for e in agg_log if e[2] == "download" and e[4] and published[r] <= e[0] <= published[r + 1]]
        site_dl = [next((e[1] - e[0] for e in results[s]["log"] if e[2] == "download" and e[4] and e[0] >= site_seen[s]),
                        0.0) for s in SITES]
        detail.append({"round": r, "detect_s": t_loaded - t_commit,
                       "aggregator_notices_s": seen - t_commit,
                       "aggregates_and_publishes_s": published[r + 1] - seen,
                       "sites_notice_s": max(site_seen.values()) - published[r + 1],
                       "sites_download_and_load_s": t_loaded - max(site_seen.values()),
                       "aggregator_model_downloads": len(agg_dl),
                       "aggregator_download_s": sum(e[1] - e[0] for e in agg_dl),
                       "sites_download_s": max(site_dl),
                       "sites_load_s": max(b - a for a, b, _ in (results[s]["load_times"][r + 1] for s in SITES))})
    detect = [d["detect_s"] for d in detail]
    parts = [k for k in detail[0] if k not in ("round", "detect_s")]
    return {"detect_median_s": statistics.median(detect), "detect_max_s": max(detect), "rounds_detail": detail,
            "breakdown_median": {k: statistics.median(d[k] for d in detail) for k in parts}}


def site_bytes(result: dict[str, Any], rounds: int) -> dict[str, Any]:
    """A site's requests and bytes: set-up (until planned), rounds (to its last update), finish."""
    acts = result["actions"]
    planned = next(a for a in acts if a[1] == "planned")
    last_update = [a for a in acts if a[1] == "update"][-1]
    log_ = result["log"]
    rnd = _totals(log_[planned[2]:last_update[2]])
    return {"setup": _totals(log_[:planned[2]]), "rounds": rnd, "finish": _totals(log_[last_update[2]:]),
            "per_round_up": rnd["bytes_up"] / rounds, "per_round_down": rnd["bytes_down"] / rounds,
            "window": (planned[0], last_update[0])}


def blob_transfers(result: dict[str, Any], start: int, end: int | None = None) -> dict[str, int]:
    """Whole-model transfers (upload/download of a safetensors blob) in a slice of a party's log."""
    entries = [e for e in result["log"][start:end] if e[4] and e[3].endswith(".safetensors")]
    return {"uploads": sum(e[2] == "upload" for e in entries), "downloads": sum(e[2] == "download" for e in entries)}


# ---------------------------------------------------------------------------- idle polls
def measure_idle_polls(url: str, keys: Path, workdir: Path, *, at: tuple[int, ...] = (1, 50),
                       meter: S3Meter | None = None) -> dict[str, Any]:
    """Drive a tiny-model federation in-process to version ``max(at)``; at each version in ``at``,
    count the storage requests of one steady-state idle poll of every party.

    Idle states: the aggregator right after publishing version v (no update in yet);
    a site right after publishing its update from v (waiting for v+1). The first
    "wait" after a change also rewrites the site's heartbeat hint; the second is the
    steady state, and is the one reported (the first is under ``first_wait``).
    The aggregator is also measured with one site's update in (``aggregator_partial``).
    """
    create_federation(url, keys, rounds=max(at) + 2)
    parties = {p: open_party(url, keys, p) for p in (AGGREGATOR, *SITES)}
    roles = {p: make_role(fed, p, workdir / p, "tiny", 0.0)[0] for p, (fed, _) in parties.items()}
    agg = roles[AGGREGATOR]

    def poll(p: str, expect: str = "wait") -> dict[str, Any]:
        store = parties[p][1]
        mark, http_mark = store.mark(), meter.mark() if meter else 0
        action = roles[p].step().action
        if action != expect:
            raise RuntimeError(f"{p}: expected {expect!r}, got {action!r}")
        out = store.totals(mark)
        if meter:
            out.update(meter.since(http_mark, f"party-{p}"))
        return out

    for _ in range(20):  # set-up: census, fingerprint, plans, v0
        if agg.step().action == "v0":
            break
        for s in SITES:
            roles[s].step()
    else:
        raise RuntimeError("set-up did not reach v0")
    out: dict[str, Any] = {}
    for v in range(max(at) + 1):
        rec = out.setdefault(f"v{v}", {}) if v in at else None
        if rec is not None:
            first = poll(AGGREGATOR)
            rec[AGGREGATOR] = {**poll(AGGREGATOR), "first_wait": first["requests"]}
        for i, s in enumerate(SITES):
            poll(s, "update")
            if rec is not None and i == 0:
                poll(AGGREGATOR)  # verifies and caches A's update
                rec["aggregator_partial"] = poll(AGGREGATOR)
        if rec is not None:
            for s in SITES:
                first = poll(s)
                rec[s] = {**poll(s), "first_wait": first["requests"]}
        if agg.step().action != "aggregated":
            raise RuntimeError(f"v{v + 1} was not aggregated")
    return out


def idle_summary(polls: dict[str, Any], at: tuple[int, int]) -> dict[str, Any]:
    lo, hi = (polls[f"v{v}"] for v in at)
    per_party = {p: {f"round{at[0]}": lo[p]["requests"], f"round{at[1]}": hi[p]["requests"],
                     f"ops_round{at[1]}": hi[p]["ops"],
                     f"first_wait_round{at[0]}": lo[p].get("first_wait"),
                     f"first_wait_round{at[1]}": hi[p].get("first_wait"),
                     **({f"http_round{at[0]}": lo[p]["http_requests"], f"http_round{at[1]}": hi[p]["http_requests"],
                         f"http_methods_round{at[1]}": hi[p]["http_methods"]} if "http_requests" in lo[p] else {})}
                 for p in (AGGREGATOR, *SITES, "aggregator_partial")}
    return per_party


# ---------------------------------------------------------------------------- the benchmark
BACKENDS = (("folder-inotify", "inotify"), ("folder-poll", "poll"), ("s3-moto", "poll"))


def bench(rounds: int, poll_interval: float, sleep_s: float, idle_at: tuple[int, int], root: Path,
          backends: list[str] | None = None) -> dict[str, Any]:
    keys = make_keys(root / "keys")
    rows, idle_polls, bytes_report = [], {}, {}
    with MotoS3() as moto:
        idle_t0 = time.monotonic()
        folder_polls = measure_idle_polls(str(root / "idle-folder"), keys, root / "idle-folder-work", at=idle_at)
        idle_polls["folder"] = idle_summary(folder_polls, idle_at)
        log(f"idle polls on a folder to v{idle_at[1]}: {time.monotonic() - idle_t0:.1f} s")
        idle_t0 = time.monotonic()
        s3_polls = measure_idle_polls(moto.new_bucket(), keys, root / "idle-s3-work", at=idle_at, meter=moto.meter)
        idle_polls["s3"] = idle_summary(s3_polls, idle_at)
        log(f"idle polls on moto S3 to v{idle_at[1]}: {time.monotonic() - idle_t0:.1f} s")
        for backend, watch in BACKENDS:
            if backends and backend not in backends:
                continue
            t0, load0 = time.monotonic(), os.getloadavg()[0]
            url = moto.new_bucket() if backend.startswith("s3") else str(root / f"bucket-{backend}")
            interval = INOTIFY_SAFETY_NET_S if watch == "inotify" else poll_interval
            results = run_federation(url, keys, root / f"work-{backend}", rounds=rounds, watch=watch,
                                     poll_interval=interval, sleep_s=sleep_s)
            timing = analyse(results, rounds)
            model_bytes = results[SITES[0]]["global_sizes"][0]
            kind = "s3" if backend.startswith("s3") else "folder"
            idle = idle_polls[kind]
            worst = max((AGGREGATOR, *SITES), key=lambda p: idle[p][f"round{idle_at[1]}"])
            per_site = {s: site_bytes(results[s], rounds) for s in SITES}
            rows.append({
                "backend": backend, "model_mb": round(model_bytes / MB, 2), "sites": len(SITES), "rounds": rounds,
                "detect_median_s": round(timing["detect_median_s"], 3), "detect_max_s": round(timing["detect_max_s"], 3),
                "idle_poll_requests_round1": idle[worst][f"round{idle_at[0]}"],
                "idle_poll_requests_round50": idle[worst][f"round{idle_at[1]}"],
                "poll_interval_s": interval if watch == "poll" else None,
                "watch": results[SITES[0]]["trigger"], "sleep_s": sleep_s,
                "idle_poll_site_round1": idle[SITES[0]][f"round{idle_at[0]}"],
                "idle_poll_site_round50": idle[SITES[0]][f"round{idle_at[1]}"],
                "idle_poll_aggregator_round1": idle[AGGREGATOR][f"round{idle_at[0]}"],
                "idle_poll_aggregator_round50": idle[AGGREGATOR][f"round{idle_at[1]}"],
                "per_site_per_round_requests": round(statistics.mean(
                    per_site[s]["rounds"]["requests"] / rounds for s in SITES), 1),
                "breakdown_median": _rounded(timing["breakdown_median"]),
                "rounds_detail": [_rounded(d) for d in timing["rounds_detail"]],
                "load_avg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)],
                "wall_s": round(time.monotonic() - t0, 1),
            })
            log(f"{backend}: detect median {timing['detect_median_s']:.3f} s, max {timing['detect_max_s']:.3f} s "
                f"({rows[-1]['wall_s']} s)")
            if kind == "s3":
                bytes_report = s3_bytes(results, per_site, rounds, model_bytes, moto.meter)
    return {"rows": rows, "bytes": bytes_report, "idle_polls": idle_polls,
            "idle_poll_versions": list(idle_at)}


def _rounded(d: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in d.items()}


def s3_bytes(results, per_site, rounds: int, model_bytes: int, meter: S3Meter) -> dict[str, Any]:
    """Bytes each site moved per round on S3: through the Store API and on the wire (HTTP bodies)."""
    sites = {}
    for s in SITES:
        b = per_site[s]
        t0, t1 = b["window"]
        wire = meter.window(f"party-{s}", t0, t1)
        acts = results[s]["actions"]
        planned = next(a for a in acts if a[1] == "planned")[2]
        last = [a for a in acts if a[1] == "update"][-1][2]
        sites[s] = {
            "per_round_up": b["per_round_up"], "per_round_down": b["per_round_down"],
            "wire_per_round_up": wire["wire_bytes_up"] / rounds, "wire_per_round_down": wire["wire_bytes_down"] / rounds,
            "requests_per_round": b["rounds"]["requests"] / rounds,
            "http_requests_per_round": wire["http_requests"] / rounds,
            "http_methods_per_round": {k: v / rounds for k, v in wire["http_methods"].items()},
            "model_transfers_in_rounds": blob_transfers(results[s], planned, last),
            "setup": {"bytes_up": b["setup"]["bytes_up"], "bytes_down": b["setup"]["bytes_down"],
                      "model_transfers": blob_transfers(results[s], 0, planned)},
            "finish": {"bytes_up": b["finish"]["bytes_up"], "bytes_down": b["finish"]["bytes_down"],
                       "model_transfers": blob_transfers(results[s], last)},
        }
    up = max(x["wire_per_round_up"] for x in sites.values())
    down = max(x["wire_per_round_down"] for x in sites.values())
    ratio = max((x["wire_per_round_up"] + x["wire_per_round_down"]) / (2 * model_bytes) for x in sites.values())
    api_ratio = max((x["per_round_up"] + x["per_round_down"]) / (2 * model_bytes) for x in sites.values())
    agg = results[AGGREGATOR]
    v0 = next(a for a in agg["actions"] if a[1] == "v0")[2]
    agg_rounds = _totals(agg["log"][v0:])
    return {"backend": "s3-moto", "model_bytes": model_bytes, "rounds": rounds,
            "per_site_per_round_up": up, "per_site_per_round_down": down,
            "ratio_to_two_models": round(ratio, 4), "api_ratio_to_two_models": round(api_ratio, 4),
            "per_site": sites,
            "aggregator_per_round": {"bytes_up": agg_rounds["bytes_up"] / rounds,
                                     "bytes_down": agg_rounds["bytes_down"] / rounds,
                                     "model_transfers": blob_transfers(agg, v0)},
            "aggregator_setup": _totals(agg["log"][:v0])}


def check_targets(out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Detection within 0.5 s (inotify) or one poll interval + 1 s; idle polls as cheap late as early; bytes."""
    t = {}
    for r in out["rows"]:
        limit = 0.5 if r["watch"] == "inotify" else r["poll_interval_s"] + 1
        t[f"{r['backend']}.detect_median_s"] = target(f"detect_median_s <= {limit:g}", r["detect_median_s"],
                                                      r["detect_median_s"] <= limit)
        early = (r["idle_poll_requests_round1"], r["idle_poll_site_round1"])
        late = (r["idle_poll_requests_round50"], r["idle_poll_site_round50"])
        t[f"{r['backend']}.idle_poll_round50"] = target(
            "requests per idle poll at v50 == at v1 (aggregator, site)",
            f"aggregator {early[0]} -> {late[0]}, site {early[1]} -> {late[1]}", late == early)
    if out["bytes"]:
        ratio = out["bytes"]["ratio_to_two_models"]
        t["bytes.ratio_to_two_models"] = target("bytes per site per round / two model sizes <= 1.05", ratio,
                                                ratio <= 1.05)
    return t


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--quick", action="store_true", help="5 rounds per backend instead of 10")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--poll-interval", type=float, default=1.0)
    ap.add_argument("--sleep", type=float, default=0.5, help="seconds of 'training' per round")
    ap.add_argument("--idle-at", type=int, nargs=2, default=(1, 50), metavar=("EARLY", "LATE"))
    ap.add_argument("--backends", nargs="+", choices=[b for b, _ in BACKENDS], default=None,
                    help="measure detection on these backends only (default: all); idle polls are always "
                         "measured, bytes with s3-moto")
    ap.add_argument("--party", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.party:
        import logging

        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        # watchdog warns when a watched folder's sub-folders appear fast ("Callback ... already exists")
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"watchdog\..*")
        spec = json.loads(Path(args.party).read_text())
        result = run_party(spec)
        Path(spec["out"]).write_text(json.dumps(result))
        return 0
    rounds = args.rounds or (5 if args.quick else 10)
    t0 = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="fedfs-round-overhead-"))
    try:
        out = bench(rounds, args.poll_interval, args.sleep, tuple(args.idle_at), root, backends=args.backends)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform(),
                      "processor": _cpu_model(), "load_avg_1m_at_end": round(os.getloadavg()[0], 2)}
    out["wall_s"] = round(time.monotonic() - t0, 1)
    out = benchmark_output("round_overhead", out, check_targets(out))
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        for r in out["rows"]:
            print(f"{r['backend']:15s} model {r['model_mb']} MiB  detect median {r['detect_median_s']:.3f} s "
                  f"max {r['detect_max_s']:.3f} s  idle poll {r['idle_poll_requests_round1']} -> "
                  f"{r['idle_poll_requests_round50']} requests")
        if out["bytes"]:
            b = out["bytes"]
            print(f"S3 bytes per site per round: up {b['per_site_per_round_up'] / MB:.2f} MiB, down "
                  f"{b['per_site_per_round_down'] / MB:.2f} MiB = {b['ratio_to_two_models']:.3f} x two models")
        for name, t in out["targets"].items():
            print(f"{'ok  ' if t['met'] else 'MISS'} {name}: {t['rule']} ({t['value']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
