"""How does a federation scale in parties? 100 processes on S3 and a folder, 1,000 simulated sites.

Training is replaced by a sleep drawn per site from a heterogeneous distribution
(:func:`draw_sleeps`: most sites ``base x U(1, 2)``, every tenth site ten times slower),
so only the federation's own cost is measured. The sites' local work,
:class:`NumpySleepWork`, is a real :class:`fedfs.roles.site.LocalWork` over a small model
(4 float32 tensors, about 18 KiB) that reads and writes safetensors with numpy and
:mod:`fedfs.weights.header` only: a sleeping site imports neither torch nor nnU-Net
(each process reports ``sys.modules`` and its RSS). Mode ``fedavg`` (no fingerprint phase),
sync FedAvg and async FedBuff (K = N/2, fresh trigger).

Two set-ups:

* **(a) processes**: N sites and the aggregator each run the real role loop
  (``run_loop(role.step, make_trigger(store, watch="poll", ...))``) as their own OS process
  (``python benchmarks/scale.py --party SPEC``, under ``nice``), on a moto S3 server started
  in this process (each party its own access key id, so a WSGI meter counts HTTP requests
  by party and type) and on a folder. Every party's store is wrapped in
  ``round_overhead.CountingStore``: each public Store call is one request.
* **(b) simulation**: N sites in one process (the real roles, each with its own counting store
  over one folder), driven round-robin on a virtual clock: a site that starts a round is held
  (its first store call of the publish raises StoreUnavailable, which a real daemon retries)
  until its sleep has passed in virtual time; the aggregator polls every ``AGG_POLL_S``
  virtual seconds (skipped when no update arrived since its last step; idle polls are
  measured separately), a site notices a new global within one site poll interval.
  Storage work is real and timed; only training and waiting are virtual.

Reported per N: the aggregator's time per version and per update; the time from the last
awaited update to every waiting site holding the next global (processes); wall time against
the ideal set by the sleeps (:func:`ideal_wall`, the same rules with zero overhead); requests
per idle poll for a site and for the aggregator (by store call and, on S3, by HTTP type);
requests and bytes per site per round; the S3 request cost per round and per day at AWS list
prices (:data:`PRICES`); peak memory; document sizes; ``fedfs status`` and ``fedfs report``
time and output size at the largest N.

``python benchmarks/scale.py --json [--quick]`` prints one JSON object on stdout (logs on
stderr). Full: 100 processes per backend and mode, simulation at N = 10, 100, 1000.
``--quick``: 20 processes per backend and mode, 2 rounds; simulation at N = 10 and 200, sync, 2 rounds.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # benchmarks/_common.py and round_overhead.py
from _common import benchmark_output, target  # noqa: E402

try:
    import fedfs  # noqa: F401
except ImportError:  # run from a checkout without an installed fedfs
    sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402

from fedfs.errors import StoreUnavailable  # noqa: E402
from fedfs.protocol import layout  # noqa: E402
from fedfs.store import open_store  # noqa: E402
from round_overhead import CountingStore, MotoS3  # noqa: E402

MB = 1024 * 1024
AGGREGATOR = "agg"
#: The model every site trains: small, so that storage requests, not payload bytes, dominate.
SHAPES = {"enc.weight": (32, 16, 3, 3), "enc.bias": (32,), "seg.weight": (2, 32, 1, 1), "seg.bias": (2,)}
#: AWS S3 Standard, US East (N. Virginia), request list prices in USD per 1,000 requests, as
#: published on https://aws.amazon.com/s3/pricing/ (unchanged since 2018; not re-checked from
#: this machine, which has no network: the date is the date of the run).
PRICES = {"source": "AWS S3 Standard, us-east-1, list prices (aws.amazon.com/s3/pricing)",
          "put_copy_post_list_per_1000": 0.005, "get_head_other_per_1000": 0.0004, "delete": 0.0}
#: Store call -> S3 request class (what the S3 backend sends: s3.py).
STORE_TO_S3 = {"read_bytes": "GET", "download": "GET", "exists": "HEAD", "size": "HEAD", "write_bytes": "PUT",
               "publish": "PUT", "upload": "PUT", "list": "LIST", "delete": "DELETE"}
AGG_POLL_S = 15.0  # simulation: the aggregator's poll interval (virtual seconds)
SITE_POLL_S = 30.0  # simulation: a site's poll interval (virtual seconds)
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- torch-free sleep work
def write_weights(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """safetensors with numpy: :func:`fedfs.weights.header.safetensors_header`, then the data."""
    from fedfs.weights.header import safetensors_header

    keys = sorted(tensors)
    header, _ = safetensors_header([(k, "F32", tuple(tensors[k].shape)) for k in keys], metadata)
    tmp = f"{path}.{os.getpid()}.incomplete"
    with open(tmp, "wb") as fh:
        fh.write(header)
        for k in keys:
            fh.write(np.ascontiguousarray(tensors[k], dtype="<f4").tobytes())
    os.replace(tmp, path)


def read_weights(path: str) -> dict[str, np.ndarray]:
    """Validated header (:func:`fedfs.weights.header.inspect_weights`), then the tensors as numpy."""
    from fedfs.weights.header import inspect_weights

    info = inspect_weights(path, expected=SHAPES)
    data = Path(path).read_bytes()
    return {k: np.frombuffer(data, dtype="<f4", count=t.numel, offset=t.start).reshape(t.shape).copy()
            for k, t in info.tensors.items()}


class Held(StoreUnavailable):
    """The simulation holds a site's publish until its training time has passed."""


class NumpySleepWork:
    """A :class:`fedfs.roles.site.LocalWork` whose round is a sleep; numpy only, no torch.

    ``train_round`` reads and validates the global, sleeps ``sleep_s`` (``sleep`` may be a no-op:
    the simulation's sleep is virtual), writes global + a small shift as the update.
    ``loads`` holds ``(time, sha256 of the global file)`` per global loaded."""

    def __init__(self, name: str, cases: int, seed: int, sleep_s: float, sleep=time.sleep) -> None:
        self.name, self.cases, self.seed, self.sleep_s, self._sleep = name, cases, seed, sleep_s, sleep
        self.epoch = 0
        self.loads: list[tuple[float, str]] = []

    @property
    def num_cases(self) -> int:
        return self.cases

    def census(self) -> tuple[int, int]:
        return self.cases, 1

    def fingerprint_summary(self, total_cases: int) -> dict[str, Any]:  # fedavg mode: never asked
        raise NotImplementedError

    def plan(self, global_fingerprint: dict[str, Any] | None) -> tuple[str, dict[str, Any], str]:
        from fedfs.fl.plans import plans_digest

        plans = {"plans_name": "SleepPlans", "shapes": {k: list(v) for k, v in SHAPES.items()}}
        return "SleepPlans", {"plans": plans, "num_cases": self.cases}, plans_digest(plans)

    def start(self, total_epochs: int) -> None:
        pass

    def initial_weights(self, path: str) -> None:
        rng = np.random.default_rng(1234)  # every site the same net, as identical plans give
        write_weights(path, {k: rng.normal(0, 0.05, s).astype(np.float32) for k, s in SHAPES.items()},
                      {"site": self.name, "init": "1"})

    def _load(self, path: str) -> dict[str, np.ndarray]:
        tensors = read_weights(path)
        self.loads.append((time.time(), Path(path).name.split(".")[0]))
        return tensors

    def train_round(self, global_path: str, epochs: int, update_path: str) -> dict[str, float]:
        tensors = self._load(global_path)
        self._sleep(self.sleep_s)
        for t in tensors.values():
            t += np.float32(1e-3 * (self.seed % 17 + 1))
        self.epoch += epochs
        write_weights(update_path, tensors, {"site": self.name})
        return {"train_loss": 1.0 / (1 + self.epoch) + 0.01 * (self.seed % 7), "epoch": float(self.epoch),
                "sleep_s": float(self.sleep_s)}

    def checkpoint(self) -> None:
        pass

    def finish(self, global_path: str) -> dict[str, Any]:
        self._load(global_path)
        return {"epochs": self.epoch}


# ---------------------------------------------------------------------------- sleeps and the ideal
def draw_sleeps(n: int, base_s: float, seed: int = 7) -> list[float]:
    """Per site: ``base x U(1, 2)``; every tenth site (at least one) ten times that."""
    rng = random.Random(seed)
    out = [base_s * rng.uniform(1.0, 2.0) for _ in range(n)]
    for i in range(0, n, 10):
        out[i] *= 10.0
    return out


def ideal_wall(sleeps: list[float], rounds: int, aggregation: str, k: int, max_staleness: int = 8) -> float:
    """Time from v0 to the final global with zero overhead, under fedfs's rules
    (:func:`fedfs.protocol.rounds.decide_site`; FedBuff with the fresh trigger)."""
    n = len(sleeps)
    if aggregation == "sync":
        return rounds * max(sleeps)
    version, t = 0, 0.0
    sent = [0] * n
    training: list[tuple[float, int, int]] = [(sleeps[i], i, 0) for i in range(n)]  # (done at, site, base)
    heapq.heapify(training)
    waiting: set[int] = set()
    buffer: list[int] = []  # bases of updates not yet folded
    while version < rounds:
        if not training:
            if not buffer:
                return math.inf
        else:
            t, i, base = heapq.heappop(training)
            sent[i] += 1
            if version - base <= max_staleness:
                buffer.append(base)
            if version > base and sent[i] < rounds:
                heapq.heappush(training, (t + sleeps[i], i, version))
            else:
                waiting.add(i)
        fresh = sum(1 for b in buffer if b == version)
        can_send = {j for _, j, _ in training}
        if fresh >= k or (buffer and not can_send):
            version, buffer = version + 1, []
            if version >= rounds:
                break
            for j in sorted(waiting):
                if sent[j] < rounds:
                    heapq.heappush(training, (t + sleeps[j], j, version))
            waiting = {j for j in waiting if sent[j] >= rounds}
    return t


# ---------------------------------------------------------------------------- set-up
def make_keys(folder: Path, n: int) -> list[str]:
    from fedfs.trust.signing import generate_keypair

    names = [f"S{i:04d}" for i in range(n)]
    folder.mkdir(parents=True, exist_ok=True)
    generate_keypair(AGGREGATOR, "aggregator", folder)
    for s in names:
        generate_keypair(s, "site", folder)
    return names


def party_options(url: str, party: str) -> dict[str, Any] | None:
    return {"key": f"party-{party}", "secret": "testing"} if url.startswith("s3://") else None


def create_federation(url: str, keys: Path, names: list[str], rounds: int, aggregation: str) -> None:
    from fedfs.federation import Federation, config_from_key_dir

    settings: dict[str, Any] = {"mode": "fedavg", "rounds": rounds, "aggregation": aggregation}
    if aggregation == "async":
        settings["buffer_size"] = max(1, len(names) // 2)
    config, agg = config_from_key_dir(keys, names, aggregator=AGGREGATOR, **settings)
    Federation.create(open_store(url, party_options(url, "coordinator")), config, agg)


# ---------------------------------------------------------------------------- (a) one party as a process
def _proc_status() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out


def run_party(spec: dict[str, Any]) -> dict[str, Any]:
    """One party's real role loop to the end; its step timeline, request log, RSS and imports."""
    from fedfs.federation import Federation
    from fedfs.roles.loop import run_loop
    from fedfs.store.watch import make_trigger

    party, keys = spec["party"], Path(spec["keys"])
    store = CountingStore(open_store(spec["url"], party_options(spec["url"], party)))
    fed = Federation.open(store, identity=keys / f"{party}.key")
    work = None
    if party == AGGREGATOR:
        from fedfs.roles.aggregator import Aggregator

        role = Aggregator(fed, spec["workdir"])
    else:
        from fedfs.roles.site import Site

        work = NumpySleepWork(party, spec["cases"], spec["seed"], spec["sleep_s"])
        role = Site(fed, work, spec["workdir"])
    steps: list[tuple[float, float, str, int, int, list[str]]] = []

    def step():
        t0, m0 = time.time(), store.mark()
        result = role.step()
        steps.append((t0, time.time(), str(result.action), m0, store.mark(), result.extra.get("sites", [])))
        return result

    trigger = make_trigger(store, watch="poll", poll_interval=spec["poll_interval"])
    try:
        final = run_loop(step, trigger, max_idle_s=spec.get("max_idle_s", 300))
    finally:
        trigger.close()
    mods = sorted(m for m in ("torch", "nnunetv2", "dynamic_network_architectures", "safetensors.torch")
                  if m in sys.modules)
    return {"party": party, "final": str(final), "steps": steps, "log": store.log,
            "loads": work.loads if work else [], "heavy_modules": mods, "modules": len(sys.modules),
            **_proc_status()}


def _spawn_all(specs: list[dict[str, Any]], workdir: Path, timeout_s: float) -> tuple[dict[str, Any], float]:
    procs = {}
    t0 = time.time()
    for spec in specs:
        p = spec["party"]
        spec = {**spec, "out": str(workdir / f"{p}.result.json")}
        path = workdir / f"{p}.spec.json"
        path.write_text(json.dumps(spec))
        errf = open(workdir / f"{p}.log", "w")
        procs[p] = (subprocess.Popen(["nice", "-n", "10", sys.executable, os.path.abspath(__file__), "--party",
                                      str(path)], stdout=subprocess.DEVNULL, stderr=errf,
                                     env={**os.environ, **ONE_THREAD}), spec["out"], errf)
    deadline = time.monotonic() + timeout_s
    while any(proc.poll() is None for proc, _, _ in procs.values()) and time.monotonic() < deadline:
        time.sleep(0.5)
    failures = {}
    for p, (proc, _, errf) in procs.items():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            failures[p] = f"did not finish in {timeout_s:.0f} s"
        elif proc.returncode:
            failures[p] = f"exit code {proc.returncode}: " + (workdir / f"{p}.log").read_text()[-400:]
        errf.close()
    results = {p: json.loads(Path(out).read_text()) for p, (_, out, _) in procs.items() if Path(out).is_file()}
    results["_failures"] = failures
    return results, t0


def _ok_log(entries: list, op: str, key: str) -> float | None:
    times = [e[1] for e in entries if e[2] == op and e[3] == key and e[4]]
    return min(times) if times else None


def _ops(entries: list) -> dict[str, Any]:
    return {"requests": len(entries), "ops": dict(sorted(Counter(e[2] for e in entries).items())),
            "bytes_up": sum(e[5] for e in entries), "bytes_down": sum(e[6] for e in entries)}


def _s3_classes(ops: dict[str, float]) -> dict[str, float]:
    out: Counter = Counter()
    for op, n in ops.items():
        out[STORE_TO_S3.get(op, op)] += n
    return dict(out)


def request_cost(by_type: dict[str, float]) -> float:
    """USD at :data:`PRICES` for requests by S3 type (PUT, POST, LIST, GET, HEAD, DELETE)."""
    put = sum(v for k, v in by_type.items() if k in ("PUT", "POST", "LIST", "COPY"))
    get = sum(v for k, v in by_type.items() if k in ("GET", "HEAD"))
    return put / 1000 * PRICES["put_copy_post_list_per_1000"] + get / 1000 * PRICES["get_head_other_per_1000"]


def idle_steps(steps: list, entries: list, after: float = 0.0) -> list[dict[str, Any]]:
    """The steady-state idle polls of a party once ``after`` (v0's publication) has passed: 'wait' steps
    right after another 'wait' step that moved no payload (an aggregator poll that verified a new
    update also says 'wait')."""
    out = []
    for prev, cur in zip(steps, steps[1:]):
        if cur[2] == "wait" and prev[2] == "wait" and cur[0] > after:
            ops = _ops(entries[cur[3]:cur[4]])
            if not {"download", "size", "upload"} & set(ops["ops"]):
                out.append({"t0": cur[0], "t1": cur[1], **ops})
    return out


def analyse_processes(res: dict[str, Any], t_spawn: float, names: list[str], sleeps: list[float], rounds: int,
                      aggregation: str, k: int, meter=None, model_bytes: int = 0) -> dict[str, Any]:
    agg = res[AGGREGATOR]
    agg_log = agg["log"]
    published = {v: _ok_log(agg_log, "publish", layout.global_version(v)) for v in range(rounds + 1)}
    sites = [res[s] for s in names if s in res]
    out: dict[str, Any] = {"completed": not res["_failures"] and all(published.values()) and len(sites) == len(names)
                           and all(r["final"].startswith(("finished", "done")) for r in sites),
                           "failures": dict(list(res["_failures"].items())[:5])}
    if not all(published.values()):
        return out
    v0, vf = published[0], published[rounds]
    out["setup_s"] = round(v0 - t_spawn, 2)
    out["wall_s"] = round(vf - v0, 2)
    out["ideal_s"] = round(ideal_wall(sleeps, rounds, aggregation, k), 2)
    out["wall_over_ideal"] = round(out["wall_s"] / out["ideal_s"], 3)
    out["all_done_s"] = round(max(r["steps"][-1][1] for r in sites) - t_spawn, 2)
    # the aggregator's steps that published a global
    ag = [s for s in agg["steps"] if s[2] == "aggregated"]
    per_version = [s[1] - s[0] for s in ag]
    per_update = [(s[1] - s[0]) / max(1, len(s[5])) for s in ag]
    out["aggregator_s_per_version"] = round(statistics.median(per_version), 4) if ag else None
    out["aggregator_s_per_update"] = round(statistics.median(per_update), 5) if ag else None
    out["updates_per_version"] = round(statistics.mean(len(s[5]) for s in ag), 1) if ag else None
    # last awaited update -> every waiting site holding the next global
    sha_of = {}
    store = open_store(res["_url"], party_options(res["_url"], "coordinator"))
    from fedfs.trust.bucket import Bucket
    from fedfs.protocol.schema import GlobalManifest

    bucket = Bucket(store)
    contributions = {}
    for v in range(1, rounds + 1):
        env = bucket.read_raw_envelope(layout.global_version(v), max_size=64 * MB)
        doc = GlobalManifest.from_dict(env["body"], layout.global_version(v))
        sha_of[doc.blob.sha256] = v
        contributions[v] = [(c.site, c.round) for c in doc.contributions]
    hold = []
    for v in range(1, rounds + 1):
        commits = [_ok_log(res[s]["log"], "publish", layout.site_update(s, r)) for s, r in contributions[v]]
        last_commit = max(c for c in commits if c is not None)
        loads = []
        for r in sites:
            t_load = next((t for t, sha in r["loads"] if sha_of.get(sha) == v), None)
            prev = [e[1] for e in r["log"] if e[2] == "publish" and "/updates/" in e[3] and e[4] and e[1] < published[v]]
            busy = any(e[0] < published[v] < e[1] for e in _training_spans(r))
            if t_load is not None and not busy and (prev or v == 0):
                loads.append(t_load)
        if loads:
            hold.append({"version": v, "last_update_to_published_s": round(published[v] - last_commit, 3),
                         "last_update_to_all_hold_s": round(max(loads) - last_commit, 3), "waiting_sites": len(loads)})
    out["hold_detail"] = hold
    if hold:
        out["last_update_to_all_hold_s_median"] = round(statistics.median(h["last_update_to_all_hold_s"] for h in hold), 3)
        out["last_update_to_published_s_median"] = round(
            statistics.median(h["last_update_to_published_s"] for h in hold), 3)
    # idle polls
    site_idle = [x for r in sites for x in idle_steps(r["steps"], r["log"], v0)]
    agg_idle = idle_steps(agg["steps"], agg_log, v0)
    out["idle_poll_site_requests"] = _dist([x["requests"] for x in site_idle])
    out["idle_poll_aggregator_requests"] = _dist([x["requests"] for x in agg_idle])
    out["idle_poll_site_ops"] = _mode_ops(site_idle)
    out["idle_poll_aggregator_ops"] = _mode_ops(agg_idle)
    # requests and bytes per site per round: from its plans to its finish
    per_site = []
    for r in sites:
        planned = next(s for s in r["steps"] if s[2] == "planned")
        last = r["steps"][-1]
        tot = _ops(r["log"][planned[4]:last[4]])
        per_site.append(tot)
    out["per_site_per_round"] = {"requests": round(statistics.mean(p["requests"] for p in per_site) / rounds, 1),
                                 "bytes_up": round(statistics.mean(p["bytes_up"] for p in per_site) / rounds),
                                 "bytes_down": round(statistics.mean(p["bytes_down"] for p in per_site) / rounds),
                                 "model_bytes": model_bytes}
    whole = Counter()
    for r in [*sites, agg]:
        for e in r["log"]:
            if v0 <= e[0] <= vf:
                whole[e[2]] += 1
    out["all_parties_per_round_store_calls"] = {k: round(v / rounds, 1) for k, v in sorted(whole.items())}
    out["rss_mb"] = {"site_median": round(statistics.median(r["VmHWM"] for r in sites), 1),
                     "site_max": round(max(r["VmHWM"] for r in sites), 1),
                     "aggregator_peak": round(agg["VmHWM"], 1)}
    out["site_heavy_modules"] = sorted({m for r in sites for m in r["heavy_modules"]})
    out["aggregator_heavy_modules"] = agg["heavy_modules"]
    if meter is not None:
        out["s3"] = s3_figures(meter, res, names, sites, agg, site_idle, agg_idle, v0, vf, rounds)
    return out


def _training_spans(r: dict[str, Any]) -> list[tuple[float, float]]:
    return [(s[0], s[1]) for s in r["steps"] if s[2] == "update"]


def _dist(xs: list[float]) -> dict[str, Any]:
    if not xs:
        return {"n": 0}
    return {"n": len(xs), "mode": Counter(xs).most_common(1)[0][0], "median": statistics.median(xs),
            "min": min(xs), "max": max(xs), "counts": dict(sorted(Counter(xs).items()))}


def _mode_ops(polls: list[dict[str, Any]]) -> dict[str, int]:
    if not polls:
        return {}
    c = Counter(json.dumps(p["ops"], sort_keys=True) for p in polls)
    return json.loads(c.most_common(1)[0][0])


def s3_figures(meter, res, names, sites, agg, site_idle, agg_idle, v0, vf, rounds) -> dict[str, Any]:
    """HTTP requests by type from the moto meter: per idle poll, per round (all parties), cost."""
    def http_of(party: str, polls: list[dict[str, Any]]) -> dict[str, Any]:
        counts = [meter.window(f"party-{party}", p["t0"] - 1e-3, p["t1"] + 1e-3) for p in polls[-20:]]
        if not counts:
            return {}
        c = Counter(json.dumps(x["http_methods"], sort_keys=True) for x in counts)
        return json.loads(c.most_common(1)[0][0])

    one_site = names[1] if len(names) > 1 else names[0]  # names[0] is a slow site
    site_polls = idle_steps(res[one_site]["steps"], res[one_site]["log"], v0)
    with meter.lock:
        entries = [e for e in meter.log if v0 <= e[0] <= vf]
    by_type = Counter(e[2] for e in entries)
    per_round = {k: round(v / rounds, 1) for k, v in sorted(by_type.items())}
    return {"idle_poll_site_http": http_of(one_site, site_polls), "idle_poll_aggregator_http": http_of(AGGREGATOR, agg_idle),
            "per_round_http_all_parties": per_round,
            "per_round_cost_usd": round(request_cost(per_round), 6)}


def run_processes(backend: str, n: int, aggregation: str, rounds: int, base_s: float, root: Path,
                  moto: MotoS3 | None, timeout_s: float) -> dict[str, Any]:
    keys = root / f"keys-{n}"
    if not (keys / f"{AGGREGATOR}.key").exists():
        make_keys(keys, n)
    names = [f"S{i:04d}" for i in range(n)]
    url = moto.new_bucket() if backend == "s3" else str(root / f"bucket-{backend}-{aggregation}-{n}")
    create_federation(url, keys, names, rounds, aggregation)
    sleeps = draw_sleeps(n, base_s)
    workdir = root / f"work-{backend}-{aggregation}-{n}"
    workdir.mkdir(parents=True)
    site_poll = max(1.0, n / 50)
    specs = [{"party": AGGREGATOR, "url": url, "keys": str(keys), "workdir": str(workdir / AGGREGATOR),
              "poll_interval": 1.0}]
    specs += [{"party": s, "url": url, "keys": str(keys), "workdir": str(workdir / s), "cases": 2 + i % 5,
               "seed": i, "sleep_s": sleeps[i], "poll_interval": site_poll} for i, s in enumerate(names)]
    log(f"processes: {n} sites + aggregator on {backend}, {aggregation}, {rounds} rounds, site poll {site_poll:g} s ...")
    load0 = os.getloadavg()[0]
    res, t_spawn = _spawn_all(specs, workdir, timeout_s)
    res["_url"] = url
    k = max(1, n // 2) if aggregation == "async" else n
    model = sum(math.prod(s) * 4 for s in SHAPES.values())
    out = {"backend": backend, "aggregation": aggregation, "n": n, "rounds": rounds, "site_poll_s": site_poll,
           "sleep_fast_s": [round(min(sleeps), 2), round(sorted(sleeps)[len(sleeps) // 2], 2)],
           "sleep_slowest_s": round(max(sleeps), 2),
           **analyse_processes(res, t_spawn, names, sleeps, rounds, aggregation, k,
                               meter=moto.meter if moto is not None and backend == "s3" else None, model_bytes=model),
           "load_avg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)]}
    log(json.dumps({k2: v for k2, v in out.items() if k2 not in ("hold_detail",)}))
    shutil.rmtree(workdir, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------- (b) simulation
class VClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class HoldingStore(CountingStore):
    """A counting store whose owner's round publish can be held (raises :class:`Held`, counted nowhere)."""

    def __init__(self, inner, site: str) -> None:
        super().__init__(inner)
        self.blob_prefix = layout.site_prefix(site) + "blobs/" if site != AGGREGATOR else None
        self.holding = False
        self.release_at: float | None = None

    def size(self, key: str) -> int:
        if self.holding and self.blob_prefix and key.startswith(self.blob_prefix):
            raise Held(f"{key}: held until the site's training time has passed")
        return super().size(key)


def simulate(n: int, aggregation: str, rounds: int, base_s: float, root: Path, *,
             report: bool = False) -> dict[str, Any]:
    """N sites + the aggregator in this process on one folder, on a virtual clock."""
    from fedfs.federation import Federation
    from fedfs.roles.aggregator import Aggregator
    from fedfs.roles.site import Site
    from fedfs.trust.signing import load_identity

    t_start = time.perf_counter()
    keys = root / f"keys-{n}"
    if not (keys / f"{AGGREGATOR}.key").exists():
        make_keys(keys, n)
    names = [f"S{i:04d}" for i in range(n)]
    url = str(root / f"sim-{aggregation}-{n}")
    create_federation(url, keys, names, rounds, aggregation)
    base = Federation.open(url)
    clock = VClock()
    sleeps = draw_sleeps(n, base_s)
    rng = random.Random(11)

    def party(name: str) -> tuple[Federation, HoldingStore]:
        store = HoldingStore(open_store(url), name)
        return Federation(store, base.config, base.digest, load_identity(keys / f"{name}.key")), store

    fa, agg_store = party(AGGREGATOR)
    agg = Aggregator(fa, root / f"simwork-{aggregation}-{n}" / AGGREGATOR, clock=clock)
    sites, stores, works = {}, {}, {}
    for i, s in enumerate(names):
        f, st = party(s)
        works[s] = NumpySleepWork(s, 2 + i % 5, i, sleeps[i], sleep=lambda _s: None)
        sites[s], stores[s] = Site(f, works[s], root / f"simwork-{aggregation}-{n}" / s), st
    t_setup = time.perf_counter()
    for s in names:
        a = sites[s].step().action
        if str(a) != "planned":
            raise RuntimeError(f"{s}: expected 'planned', got {a}")
    t_v0 = time.perf_counter()
    a = agg.step()
    if str(a.action) != "v0":
        raise RuntimeError(f"aggregator: expected v0, got {a}")
    setup = {"sites_plan_s_per_site": round((t_v0 - t_setup) / n, 5), "v0_s": round(time.perf_counter() - t_v0, 3)}
    for st in stores.values():
        st.holding = True  # from now on a site's round publish waits for its (virtual) training time
    events: list[tuple[float, int, str]] = []
    seq = 0

    def wake(name: str, at: float) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (at, seq, name))

    for s in names:
        wake(s, rng.uniform(0, SITE_POLL_S))
    waiting: set[str] = set()
    site_steps: list[tuple[str, float, int]] = []  # (action, seconds, store calls)
    agg_steps: list[dict[str, Any]] = []
    new_updates, next_agg, finished, done = 0, AGG_POLL_S, False, set()
    idle_site: dict[str, Any] = {}
    agg_idle: dict[str, Any] = {}
    idx = {s: i for i, s in enumerate(names)}
    acc = {"s": 0.0, "requests": 0, "polls": 0}  # aggregator work since its last published global
    while not (finished and len(done) == n):
        if events and events[0][0] < next_agg:
            t, _, s = heapq.heappop(events)
            clock.now = t
            st = stores[s]
            while True:
                st.holding = st.release_at is None or t < st.release_at
                m0, p0 = st.mark(), time.perf_counter()
                try:
                    res = sites[s].step()
                except Held:  # trained (from the newest global it saw); publishes when its sleep is over
                    st.release_at = t + sleeps[idx[s]]
                    site_steps.append(("train", time.perf_counter() - p0, st.mark() - m0))
                    wake(s, st.release_at)
                    break
                act = str(res.action)
                site_steps.append((act, time.perf_counter() - p0, st.mark() - m0))
                if act == "update":
                    new_updates += 1
                    st.release_at = None
                    continue  # step again now: it may train from a newer global at once (async)
                if act == "wait":
                    if not idle_site and agg_steps:
                        m1 = st.mark()
                        sites[s].step()  # the steady-state idle poll (the first wait wrote the heartbeat)
                        idle_site.update(_ops(st.log[m1:]), version=len(agg_steps))
                    waiting.add(s)
                elif act in ("finished", "done"):
                    done.add(s)
                else:
                    raise RuntimeError(f"{s}: unexpected step result {res}")
                break
        else:
            clock.now = next_agg
            next_agg += AGG_POLL_S
            if new_updates == 0 and (events or finished):
                continue  # an idle poll: measured apart, skipped here to save time
            m0, p0 = agg_store.mark(), time.perf_counter()
            res = agg.step()
            dt = time.perf_counter() - p0
            act = str(res.action)
            acc["s"] += dt
            acc["requests"] += agg_store.mark() - m0
            acc["polls"] += 1
            new_updates = 0
            if act == "aggregated":
                agg_steps.append({"version": res.version, "step_s": dt, "s": acc["s"], "polls": acc["polls"],
                                  "updates": len(res.extra.get("sites", [])), "vt": clock.now,
                                  "requests": acc["requests"], "step_ops": _ops(agg_store.log[m0:])})
                acc = {"s": 0.0, "requests": 0, "polls": 0}
                log(f"simulation N={n} {aggregation}: v{res.version} from {agg_steps[-1]['updates']} updates "
                    f"({agg_steps[-1]['s']:.2f} s of aggregator work, {time.perf_counter() - t_start:.0f} s so far)")
                if not agg_idle:
                    agg_idle["first_wait"] = _ops_of(agg, agg_store)
                    agg_idle.update(_ops_of(agg, agg_store))
                if res.version is not None and res.version >= rounds:
                    finished = True
                for s in sorted(waiting):
                    wake(s, clock.now + rng.uniform(0, SITE_POLL_S))
                waiting.clear()
            elif act == "finished":
                finished = True
            elif not events:
                raise RuntimeError(f"simulation stalled: aggregator says {res}, no site is training")
    wall = max(x["vt"] for x in agg_steps)
    per_version = [x["s"] for x in agg_steps]
    per_update = [x["s"] / max(1, x["updates"]) for x in agg_steps]
    trains = [x for x in site_steps if x[0] == "train"]
    updates = [x for x in site_steps if x[0] == "update"]
    k = max(1, n // 2) if aggregation == "async" else n
    ideal = ideal_wall(sleeps, rounds, aggregation, k)
    out = {"n": n, "aggregation": aggregation, "rounds": rounds, **setup,
           "aggregator_s_per_version": round(statistics.median(per_version), 4),
           "aggregating_step_s": round(statistics.median(x["step_s"] for x in agg_steps), 4),
           "aggregator_polls_per_version": round(statistics.mean(x["polls"] for x in agg_steps), 1),
           "aggregator_s_per_update": round(statistics.median(per_update), 6),
           "aggregator_requests_per_update": round(statistics.median(
               x["requests"] / max(1, x["updates"]) for x in agg_steps), 2),
           "updates_per_version": round(statistics.mean(x["updates"] for x in agg_steps), 1),
           "versions": len(agg_steps),
           "site_train_step_s": round(statistics.median(x[1] for x in trains), 5),
           "site_publish_step_s": round(statistics.median(x[1] for x in updates), 5),
           "site_requests_per_round": round(statistics.median(x[2] for x in trains)
                                            + statistics.median(x[2] for x in updates), 1),
           "virtual_wall_s": round(wall, 1), "ideal_s": round(ideal, 1),
           "wall_over_ideal": round(wall / ideal, 3) if ideal else None,
           "idle_poll_site": idle_site, "idle_poll_aggregator": agg_idle,
           "idle_poll_site_requests": idle_site.get("requests"),
           "idle_poll_aggregator_requests": agg_idle.get("requests"),
           "peak_rss_mb_process": round(_proc_status()["VmHWM"], 1),
           "real_s": round(time.perf_counter() - t_start, 1)}
    out["idle_poll_site_s3"] = _s3_classes(idle_site.get("ops", {}))
    out["idle_poll_aggregator_s3"] = _s3_classes(agg_idle.get("ops", {}))
    out["documents_bytes"] = document_sizes(open_store(url), names)
    if report:
        out["tools"] = time_tools(url, root)
    log(json.dumps({k2: v for k2, v in out.items() if k2 not in ("idle_poll_site", "idle_poll_aggregator")}))
    return out


def _ops_of(agg, store: CountingStore) -> dict[str, Any]:
    """One aggregator step's requests, right after it published (no update in yet)."""
    m = store.mark()
    agg.step()
    return _ops(store.log[m:])


def document_sizes(store, names: list[str]) -> dict[str, Any]:
    """Bytes of the protocol's small documents at the end of the run."""
    def size(key: str) -> int | None:
        try:
            return store.size(key)
        except Exception:  # noqa: BLE001 - a document the run did not write
            return None

    keys = store.list("")
    globals_ = sorted(k for k in keys if k.startswith("aggregator/globals/") and k.endswith(".json"))
    s = names[len(names) // 2]
    updates = sorted(k for k in keys if k.startswith(layout.site_prefix(s) + "updates/") and k.endswith(".json"))
    total_json = sum(store.size(k) for k in keys if k.endswith(".json"))
    payloads = sum(store.size(k) for k in keys if not k.endswith(".json"))
    return {"federation_json": size(layout.FEDERATION), "global_manifest_last": size(globals_[-1]) if globals_ else None,
            "update_manifest": size(updates[-1]) if updates else None,
            "aggregator_status": size(layout.AGG_STATUS), "aggregator_heartbeat": size(layout.AGG_HEARTBEAT),
            "site_heartbeat": size(layout.site_prefix(s) + "heartbeat.json"),
            "site_status": size(layout.site_prefix(s) + "status.json"),
            "bucket_files": len(keys), "bucket_json_bytes": total_json, "bucket_payload_bytes": payloads}


def time_tools(url: str, root: Path) -> dict[str, Any]:
    """``fedfs status`` (text and --json) and ``fedfs report``: wall time and output size."""
    fedfs_cli = str(Path(sys.executable).with_name("fedfs"))
    out = {}
    for name, args in (("status", ["status", url]), ("status_json", ["status", url, "--json"]),
                       ("report", ["report", url, "-o", str(root / "report.html")])):
        t0 = time.perf_counter()
        done = subprocess.run([fedfs_cli, *args], capture_output=True, text=True, check=False)
        dt = time.perf_counter() - t0
        size = len(done.stdout.encode()) if name != "report" else (
            (root / "report.html").stat().st_size if (root / "report.html").exists() else 0)
        out[name] = {"s": round(dt, 2), "bytes": size, "exit_code": done.returncode,
                     **({"stderr": done.stderr[-300:]} if done.returncode else {})}
    return out


# ---------------------------------------------------------------------------- the benchmark
def check_targets(out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    t: dict[str, dict[str, Any]] = {}
    procs = out["processes"]
    big = [r for r in procs if r["n"] == max((p["n"] for p in procs), default=0)]
    for r in big:
        t[f"processes.{r['backend']}.{r['aggregation']}.completed"] = target(
            f"{r['n']} site processes + the aggregator finish", "yes" if r["completed"] else "no", r["completed"])
        t[f"processes.{r['backend']}.{r['aggregation']}.site_imports"] = target(
            "a sleeping site imports neither torch nor nnU-Net", ", ".join(r.get("site_heavy_modules") or []) or "none",
            not r.get("site_heavy_modules"))
    sim = {(r["aggregation"], r["n"]): r for r in out["simulation"]}
    ns = sorted({n for _, n in sim})
    for mode in ("sync", "async"):
        rows = [sim[(mode, n)] for n in ns if (mode, n) in sim]
        if len(rows) < 2:
            continue
        lo, hi = rows[0], rows[-1]
        a_lo, a_hi = lo["idle_poll_aggregator_requests"], hi["idle_poll_aggregator_requests"]
        t[f"simulation.{mode}.idle_poll_aggregator"] = target(
            f"aggregator idle poll requests equal at N={lo['n']} and N={hi['n']}", f"{a_lo} -> {a_hi}", a_lo == a_hi)
        s_lo, s_hi = lo["idle_poll_site_requests"], hi["idle_poll_site_requests"]
        t[f"simulation.{mode}.idle_poll_site"] = target(
            f"site idle poll requests equal at N={lo['n']} and N={hi['n']}", f"{s_lo} -> {s_hi}", s_lo == s_hi)
        u_lo, u_hi = lo["aggregator_s_per_update"], hi["aggregator_s_per_update"]
        ratio = u_hi / u_lo if u_lo else math.inf
        t[f"simulation.{mode}.aggregator_s_per_update"] = target(
            f"aggregator seconds per update at N={hi['n']} / at N={lo['n']} within 0.7-1.3", round(ratio, 3),
            0.7 <= ratio <= 1.3)
    tools = next((r.get("tools") for r in out["simulation"] if r.get("tools")), None)
    if tools:
        st = tools["status"]
        t["tools.status_s"] = target(f"`fedfs status` at N={max(ns)} under 5 s", st["s"],
                                     st["s"] < 5 and st["exit_code"] == 0)
    return t


def bench(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"prices": {**PRICES, "date": time.strftime("%Y-%m-%d")}, "processes": [],
                           "simulation": [], "model_bytes": sum(math.prod(s) * 4 for s in SHAPES.values())}
    for mode in args.sim_modes:
        for n in args.sim_ns:
            out["simulation"].append(simulate(n, mode, args.sim_rounds, 60.0, root,
                                              report=(n == max(args.sim_ns) and mode == "sync")))
    if args.processes:
        with MotoS3() as moto:
            for backend in args.backends:
                for mode in args.process_modes:
                    out["processes"].append(run_processes(backend, args.processes, mode, args.rounds, args.base_s,
                                                          root, moto if backend == "s3" else None, args.timeout))
    out["cost"] = cost_model(out)
    out["rows"] = summary_rows(out)
    return out


def summary_rows(out: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per run (docs/benchmarks.md's table): the figures to compare across N."""
    rows = []
    for r in out["simulation"]:
        rows.append({"setup": "simulated", "backend": "folder", "mode": r["aggregation"], "n": r["n"],
                     "agg_s_per_version": r["aggregator_s_per_version"],
                     "agg_ms_per_update": round(1000 * r["aggregator_s_per_update"], 2),
                     "idle_poll_site": r["idle_poll_site_requests"], "idle_poll_agg": r["idle_poll_aggregator_requests"],
                     "site_requests_per_round": r["site_requests_per_round"],
                     "wall_over_ideal": r["wall_over_ideal"], "peak_rss_mb": r["peak_rss_mb_process"]})
    for r in out["processes"]:
        rows.append({"setup": "processes", "backend": r["backend"], "mode": r["aggregation"], "n": r["n"],
                     "completed": r["completed"], "agg_s_per_version": r.get("aggregator_s_per_version"),
                     "agg_ms_per_update": None if r.get("aggregator_s_per_update") is None
                     else round(1000 * r["aggregator_s_per_update"], 2),
                     "idle_poll_site": (r.get("idle_poll_site_requests") or {}).get("mode"),
                     "idle_poll_agg": (r.get("idle_poll_aggregator_requests") or {}).get("mode"),
                     "last_update_to_all_hold_s": r.get("last_update_to_all_hold_s_median"),
                     "wall_over_ideal": r.get("wall_over_ideal"),
                     "site_rss_mb": (r.get("rss_mb") or {}).get("site_median")})
    return rows


def cost_model(out: dict[str, Any], poll_s: float = 5.0) -> dict[str, Any]:
    """S3 request cost per round and per day at :data:`PRICES`, from the measured idle polls
    (a site and the aggregator polling every ``poll_s`` seconds all day) and the measured
    requests per site per round."""
    rows = []
    for r in out["simulation"]:
        if r["aggregation"] != "sync":
            continue
        site_poll = r["idle_poll_site_s3"]
        agg_poll = r["idle_poll_aggregator_s3"]
        polls_per_day = 86400 / poll_s
        day_idle = {k: (site_poll.get(k, 0) * r["n"] + agg_poll.get(k, 0)) * polls_per_day
                    for k in set(site_poll) | set(agg_poll)}
        round_req = r["site_requests_per_round"] * r["n"] + r["aggregator_requests_per_update"] * r["n"]
        rows.append({"n": r["n"], "poll_s": poll_s,
                     "idle_requests_per_day": round(sum(day_idle.values())),
                     "idle_cost_per_day_usd": round(request_cost(day_idle), 2),
                     "round_requests": round(round_req),
                     "round_cost_usd": round(round_req / 1000 * PRICES["put_copy_post_list_per_1000"], 4)})
    return {"assumption": f"every party polls every {poll_s:g} s (the CLI default); a round's requests priced "
                          "as PUT (an upper bound)", "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--quick", action="store_true", help="20 processes, fewer rounds")
    ap.add_argument("--processes", type=int, default=None, help="site processes per run (default 100; quick 20)")
    ap.add_argument("--backends", nargs="+", choices=["s3", "folder"], default=["s3", "folder"])
    ap.add_argument("--process-modes", nargs="+", choices=["sync", "async"], default=["sync", "async"],
                    help="modes of the process federations")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--base-s", type=float, default=None, help="fast sites sleep base x U(1, 2) s per round")
    ap.add_argument("--sim-ns", type=int, nargs="+", default=None, help="simulated N (default 10 100 1000; quick 10 200)")
    ap.add_argument("--sim-modes", nargs="+", choices=["sync", "async"], default=None,
                    help="simulated modes (default sync async; quick sync)")
    ap.add_argument("--sim-rounds", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per process federation")
    ap.add_argument("--party", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.party:
        import logging

        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        spec = json.loads(Path(args.party).read_text())
        Path(spec["out"]).write_text(json.dumps(run_party(spec)))
        return 0
    if args.processes is None:
        args.processes = 20 if args.quick else 100
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.base_s = args.base_s or (0.5 if args.quick else 1.5)
    args.sim_rounds = args.sim_rounds or (2 if args.quick else 3)
    args.sim_ns = args.sim_ns or ([10, 200] if args.quick else [10, 100, 1000])
    args.sim_modes = args.sim_modes or (["sync"] if args.quick else ["sync", "async"])
    t0 = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="fedfs-scale-"))
    try:
        out = bench(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out["wall_s"] = round(time.monotonic() - t0, 1)
    out["cpus"] = os.cpu_count()
    out = benchmark_output("scale", out, check_targets(out))
    print(json.dumps(out, indent=1 if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
