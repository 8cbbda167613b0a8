"""What the scale benchmark's set-ups share: the torch-free sleep work, the sleeps, the ideal wall time,
the federation's keys and creation, and request accounting.

A sleeping site's local work, :class:`NumpySleepWork`, is a real :class:`fedfs.roles.site.LocalWork`
over a small model (:data:`SHAPES`, about 18 KiB) that reads and writes safetensors with numpy and
:mod:`fedfs.weights.header` only, so a site imports neither torch nor nnU-Net. Training is a
sleep drawn by :func:`draw_sleeps`; :func:`ideal_wall` is the same rules with zero overhead.
Used by ``scale_processes.py``, ``scale_sim.py`` and ``scale.py`` (the CLI).
"""

from __future__ import annotations

import heapq
import math
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # benchmarks/_common.py, round_overhead.py, scale_*.py

try:
    import fedfs  # noqa: F401
except ImportError:  # run from a checkout without an installed fedfs
    sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402

from fedfs.store import open_store  # noqa: E402

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



def proc_status() -> dict[str, float]:
    """This process's resident memory now and at its peak (``VmRSS``, ``VmHWM``), in MB."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out


def ops_of_log(entries: list) -> dict[str, Any]:
    """Requests, by store call, and bytes up and down, of a slice of a CountingStore log."""
    return {"requests": len(entries), "ops": dict(sorted(Counter(e[2] for e in entries).items())),
            "bytes_up": sum(e[5] for e in entries), "bytes_down": sum(e[6] for e in entries)}


def s3_classes(ops: dict[str, float]) -> dict[str, float]:
    """Store calls by name -> S3 requests by type (:data:`STORE_TO_S3`)."""
    out: Counter = Counter()
    for op, n in ops.items():
        out[STORE_TO_S3.get(op, op)] += n
    return dict(out)


def request_cost(by_type: dict[str, float]) -> float:
    """USD at :data:`PRICES` for requests by S3 type (PUT, POST, LIST, GET, HEAD, DELETE)."""
    put = sum(v for k, v in by_type.items() if k in ("PUT", "POST", "LIST", "COPY"))
    get = sum(v for k, v in by_type.items() if k in ("GET", "HEAD"))
    return put / 1000 * PRICES["put_copy_post_list_per_1000"] + get / 1000 * PRICES["get_head_other_per_1000"]

