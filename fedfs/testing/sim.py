"""Deterministic simulation of a whole federation: the real roles, one process, one seed.

After FoundationDB's simulator and TigerBeetle's VOPR: :func:`scenario` draws from a seed the
federation (3 to 20 sites, one or two aggregators, FFE or AsymFedAvg, sync or async, 1 to 3
rounds) and its faults (:mod:`fedfs.testing.sim_store`: crashes between any two store calls and
at every fault point, failed, slow and repeated calls, calls that landed but report failure,
listing lag, clock skew). :class:`Simulation` runs the real :class:`~fedfs.roles.site.Site` and
:class:`~fedfs.roles.aggregator.Aggregator` (toy work) over one in-memory bucket, each party
through its own fault-injecting view; a scheduler driven by the same seed picks who steps
next. A crashed party is rebuilt from its workdir, as after ``kill -9``. After the faulty
steps comes a fault-free tail, and then :func:`~fedfs.testing.sim_check.check_federation`
checks the invariants. The same seed gives the same trace::

    python benchmarks/simulation.py --seed 1234 --replay -v

While a run lasts, fedfs's modules read a simulated clock (their ``time`` is a
:class:`~fedfs.testing.sim_store.TimeShim`), thread pools run their work in the calling thread
(so store calls come in one order), and :func:`fedfs.roles.faults.set_hook` is the fault plan's.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import random
import shutil
import sys
import tempfile
import time
import types
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..errors import StateUnknown, StoreUnavailable
from ..federation import Federation
from ..protocol import layout
from ..protocol.schema import FederationConfig, Party
from ..protocol.timestamps import format_stamp
from ..roles import faults
from ..roles.aggregator import Aggregator
from ..roles.site import Site, SiteState
from ..store.memory import MemoryStore
from ..trust.bucket import Bucket
from ..trust.signing import Identity
from .sim_check import Violation, check_federation, read_globals, status_rejections
from .sim_store import EPOCH, KINDS, Crash, FaultPlan, FaultStore, Rates, SimClock, TimeShim, stable
from .toy import ToyWork

__all__ = ["Outcome", "Scenario", "SimWork", "Simulation", "run_seed", "scenario"]

STEP_S = 5.0  # simulated seconds per step (a poll interval)
_LOW = {"crash": 0.01, "point": 0.15, "unavailable": 0.02, "unknown": 0.01, "lost_ack": 0.02, "slow": 0.03,
        "repeat": 0.02, "lag": 0.5}
_HIGH = {"crash": 0.04, "point": 0.5, "unavailable": 0.08, "unknown": 0.05, "lost_ack": 0.08, "slow": 0.1,
         "repeat": 0.08, "lag": 1.0}


@dataclass(frozen=True)
class Scenario:
    """One schedule's federation and faults, all drawn from ``seed``."""

    seed: int
    sites: int
    aggregators: int
    mode: str
    aggregation: str
    rounds: int
    settings: dict[str, Any]
    rates: Rates
    skew: dict[str, float]
    fault_steps: int
    lag_steps: int
    reinit: bool = False  # a restarted site's untrained network differs (nnU-Net's random init)
    spare: frozenset[str] = frozenset()  # "kind:key class" pairs not injected (to explore past a known finding)

    def describe(self) -> str:
        on = [k for k, v in vars(self.rates).items() if v] + (["skew"] if any(self.skew.values()) else []) \
            + (["reinit"] if self.reinit else []) + [f"not {k}" for k in sorted(self.spare)]
        return (f"seed {self.seed}: {self.sites} sites, {self.aggregators} aggregator(s), {self.mode} "
                f"{self.aggregation}, {self.rounds} round(s), {self.fault_steps} faulty steps, "
                f"faults: {', '.join(on) or 'none'}")


def scenario(seed: int, *, quick: bool = False, exclude: frozenset[str] | set[str] = frozenset()) -> Scenario:
    """The schedule ``seed`` stands for; ``quick`` keeps it cheap (3-4 sites, 1-2 rounds, fewer faulty steps);
    ``exclude`` turns fault kinds off, or ``kind:key class`` pairs (``repeat:probe``), to explore past a
    known violation."""
    rng = random.Random(seed)
    sites = rng.choice((3, 3, 4)) if quick else rng.choice((3, 3, 3, 4, 4, 5, 6, 8, 12, 20))
    rounds = rng.choice((1, 2, 2)) if quick or sites > 8 else rng.choice((1, 2, 2, 3))
    aggregation = rng.choice(("sync", "async"))
    settings: dict[str, Any] = {"max_staleness": rng.choice((1, 1, 2, 8))}
    if aggregation == "async":
        settings.update(buffer_size=rng.randint(0, sites), buffer_trigger=rng.choice(("fresh", "any")))
    elif rng.random() < 0.5:  # a deadline makes late updates, which are rejected
        settings.update(deadline_s=rng.choice((30.0, 120.0, 600.0)), min_sites=rng.randint(1, sites))
    rates = Rates(**{k: rng.choice((0.0, _LOW[k], _HIGH[k])) for k in _LOW})
    names = [f"s{i:02d}" for i in range(sites)]
    aggregators = rng.choice((1, 1, 2))
    parties = names + [f"agg{i + 1}" for i in range(aggregators)]
    skew = {p: rng.choice((0.0, rng.uniform(-3600, 3600))) for p in parties} if rng.random() < 0.5 else {}
    sc = Scenario(seed=seed, sites=sites, aggregators=aggregators, mode=rng.choice(("ffe", "asym")),
                  aggregation=aggregation, rounds=rounds, settings=settings, rates=rates.without(frozenset(exclude)),
                  spare=frozenset(k for k in exclude if ":" in k),
                  skew={} if "skew" in exclude else skew,
                  fault_steps=rng.randint(3, 8 if quick else 12) * len(parties),
                  lag_steps=rng.randint(1, 4), reinit=rng.random() < 0.5 and "reinit" not in exclude)
    return sc


class SimWork(ToyWork):
    """:class:`~fedfs.testing.toy.ToyWork` that notes the sha256 of every weights file it loads.

    ``init_seed`` seeds the untrained network; the driver gives each restart its own when the
    scenario says ``reinit`` (as nnU-Net, whose initial weights are random in every process).
    The initial weights carry one metadata entry: safetensors writes several in an arbitrary
    order, so their bytes (and every blob key after them) would differ from run to run."""

    def __init__(self, name: str, consumed: list[str], init_seed: int = 0, **kw: Any) -> None:
        super().__init__(name, **kw)
        self.consumed, self.init_seed = consumed, init_seed

    def initial_weights(self, path: str) -> None:
        from ..weights.tensors import save_weights

        save_weights(path, self.model, {"init": f"{self.name}-{self.init_seed}"})

    def _build(self):
        import torch

        torch.default_generator.manual_seed(self.init_seed)  # as ToyWork, without queueing CUDA seeding
        layers = [torch.nn.Conv2d(1, self.width, 3, padding=1)]
        for _ in range(self.depth - 1):
            layers += [torch.nn.ReLU(), torch.nn.Conv2d(self.width, self.width, 3, padding=1)]
        return torch.nn.Sequential(*layers, torch.nn.ReLU(), torch.nn.Conv2d(self.width, 2, 1))

    def _load(self, path: str) -> None:
        self.consumed.append(hashlib.sha256(Path(path).read_bytes()).hexdigest())
        super()._load(path)


def _identity(name: str, role: str) -> Identity:
    """A key derived from the name: the same bytes in every run."""
    seed = hashlib.sha256(f"fedfs-sim|{name}".encode()).digest()
    return Identity(name, role, Ed25519PrivateKey.from_private_bytes(seed))


class _SerialExecutor:
    """A ThreadPoolExecutor that runs each task at once in the calling thread (deterministic order)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        pass

    def submit(self, fn: Any, *args: Any, **kw: Any) -> Future:
        f: Future = Future()
        try:
            f.set_result(fn(*args, **kw))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever asks for the result, as a pool does
            f.set_exception(exc)
        return f

    def map(self, fn: Any, *iterables: Any, **kw: Any) -> Iterator[Any]:
        return iter([fn(*args) for args in zip(*iterables)])

    def shutdown(self, *args: Any, **kw: Any) -> None:
        pass

    def __enter__(self) -> _SerialExecutor:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


class _IdleThread:
    """The heartbeat's refresh thread, not started: it would write only after a real minute, and a
    schedule takes a fraction of a second (starting one per step was a fifth of the run time)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        pass

    def start(self) -> None:
        pass

    def join(self, timeout: float | None = None) -> None:
        pass


@contextlib.contextmanager
def _simulated(clock: SimClock, plan: FaultPlan) -> Iterator[None]:
    """fedfs reads the simulated clock, pools run serially, heartbeat threads stay idle, fault points
    ask the plan."""
    shim = TimeShim(clock)  # modules imported later keep the real clock: sim.py imports the roles first
    patched = [(m, m.time) for n, m in list(sys.modules.items())
               if n.startswith("fedfs.") and isinstance(getattr(m, "time", None), types.ModuleType)
               and m.time is time]
    for m, _ in patched:
        m.time = shim  # type: ignore[attr-defined]
    real_pool = concurrent.futures.ThreadPoolExecutor
    concurrent.futures.ThreadPoolExecutor = _SerialExecutor  # type: ignore[misc,assignment]
    from ..roles import heartbeat
    from ..weights import combine

    threads, combine._THREADS = combine._THREADS, 1  # the same bytes with any thread count; no thread starts
    real_threading = heartbeat.threading
    heartbeat.threading = types.SimpleNamespace(Thread=_IdleThread, Event=real_threading.Event,  # type: ignore
                                                Lock=real_threading.Lock)
    previous = faults.set_hook(lambda name: plan.point(clock.current, name))
    try:
        yield
    finally:
        faults.set_hook(previous)
        heartbeat.threading = real_threading  # type: ignore[attr-defined]
        combine._THREADS = threads
        concurrent.futures.ThreadPoolExecutor = real_pool  # type: ignore[misc]
        for m, t in patched:
            m.time = t  # type: ignore[attr-defined]


@dataclass
class Outcome:
    """What one schedule did: its violations, trace, fault counts and size."""

    seed: int
    scenario: str
    violations: list[Violation]
    trace: list[str]
    stats: dict[str, int]
    steps: int
    crashes: int
    wall_s: float
    details: dict[str, Any] = field(default_factory=dict)


class Simulation:
    """One schedule of :class:`Scenario` ``sc`` in the folder ``root`` (workdirs, checker files)."""

    def __init__(self, sc: Scenario, root: str | Path) -> None:
        self.sc, self.root = sc, Path(root)
        self.rng = random.Random(f"schedule-{sc.seed}")
        self.clock = SimClock(sc.skew)
        self.plan = FaultPlan(sc.seed, sc.rates, self.clock, lag_steps=sc.lag_steps, spare=sc.spare)
        self.names = [f"s{i:02d}" for i in range(sc.sites)]
        self.aggs = [f"agg{i + 1}" for i in range(sc.aggregators)]
        self.ids = {n: _identity(n, "site") for n in self.names}
        self.agg_id = _identity("agg", "aggregator")
        self.config = FederationConfig(
            federation_id=f"sim-{sc.seed}", mode=sc.mode, configuration="2d", rounds=sc.rounds,
            aggregation=sc.aggregation, created=format_stamp(EPOCH),
            aggregator=Party("agg", "aggregator", self.agg_id.public_key_b64),
            sites=[Party(n, "site", self.ids[n].public_key_b64) for n in self.names], **sc.settings)
        self.inner = MemoryStore(name=f"sim-{sc.seed}")
        fed, _ = Federation.create(self.inner, self.config, self.agg_id)
        self.digest = fed.digest
        self.parties: dict[str, Any] = dict.fromkeys(self.names + self.aggs)
        self.done: dict[str, bool] = dict.fromkeys(self.parties, False)
        self.consumed: dict[str, list[str]] = {n: [] for n in self.names}
        self.escapes: list[Violation] = []
        self.seen_rejections: set[str] = set()
        self.trace = self.plan.trace
        self.steps = self.crashes = 0

    # ---- parties -------------------------------------------------------------------
    def _view(self, name: str, identity: Identity) -> Federation:
        return Federation(FaultStore(self.inner, self.plan, name), self.config, self.digest, identity)

    def _build(self, name: str) -> Any:
        if name in self.aggs:
            return Aggregator(self._view(name, self.agg_id), self.root / name, clock=self.clock.time)
        i = self.names.index(name)
        depth = 1 + (i % 2 if self.sc.mode == "asym" else 0)
        init_seed = i + 1000 * self.plan.incarnation[name] if self.sc.reinit else i
        work = SimWork(name, self.consumed[name], init_seed=init_seed, cases=2 + i % 3, seed=i, depth=depth,
                       width=2, steps=1)
        return Site(self._view(name, self.ids[name]), work, self.root / name)

    def step(self, name: str) -> None:
        """Step party ``name`` once (building it first if it is not running), as its daemon would."""
        self.clock.current, self.plan.tick = name, self.steps
        self.steps += 1
        self.clock.advance(STEP_S)
        try:
            if self.parties[name] is None:
                self.parties[name] = self._build(name)
            result = self.parties[name].step()
        except Crash as exc:
            self.parties[name] = None
            self.crashes += 1
            self.trace.append(stable(f"t{self.plan.tick} {name}: died ({exc}); restarts from its workdir"))
            return
        except (StoreUnavailable, StateUnknown) as exc:  # a daemon logs these and retries
            self.trace.append(stable(f"t{self.plan.tick} {name}: retries after {type(exc).__name__}: {exc}"))
            return
        except Exception as exc:  # noqa: BLE001 - a daemon would exit here: a finding, then restart it
            self.parties[name] = None
            self.escapes.append(Violation("no_escape", stable(f"t{self.plan.tick} {name}'s step raised "
                                                             f"{type(exc).__name__}: {exc}")))
            self.trace.append(stable(f"t{self.plan.tick} {name}: step raised {type(exc).__name__}: {exc}"))
            return
        self.done[name] = result.action.terminal
        self.trace.append(f"t{self.plan.tick} {name}: {result.action} {result.detail[:120]}")
        if name in self.aggs:
            self.seen_rejections.update(status_rejections(Bucket(self.inner, self.config)))

    def run(self, tail_sweeps: int = 40) -> Outcome:
        t0 = time.perf_counter()
        everyone = list(self.parties)
        with _simulated(self.clock, self.plan):
            self.plan.active = True
            for _ in range(self.sc.fault_steps):
                self.step(self.rng.choice(everyone))
            self.plan.active = False
            self.trace.append(f"t{self.steps} faults stop")
            for _ in range(tail_sweeps):
                todo = [n for n in everyone if not self.done[n]]
                if not todo:
                    break
                for n in todo:
                    self.step(n)
            violations = self.escapes + self.check()
        return Outcome(self.sc.seed, self.sc.describe(), violations, self.trace, dict(self.plan.stats),
                       self.steps, self.crashes, time.perf_counter() - t0, self.summary())

    def summary(self) -> dict[str, int]:
        """How much the schedule did: globals published, updates folded, rejections recorded."""
        bucket = Bucket(self.inner, self.config)
        globals_ = read_globals(bucket)
        return {"globals": len(globals_), "folded": sum(len(g.contributions) for g in globals_.values()),
                "rejected": len(status_rejections(bucket))}

    def finished_versions(self) -> dict[str, int | None]:
        """Each site's final version from its workdir's state (None: not finished)."""
        out: dict[str, int | None] = {}
        for n in self.names:
            st = SiteState.load(self.root / n / "state.json")
            out[n] = st.final_version if st.finished else None
        return out

    def check(self) -> list[Violation]:
        """The invariants on the bucket as it is now (:func:`~fedfs.testing.sim_check.check_federation`)."""
        work = self.root / "check"
        shutil.rmtree(work, ignore_errors=True)
        return check_federation(self.inner, self.config, work, consumed=self.consumed,
                                finished=self.finished_versions(), seen_rejections=self.seen_rejections)


def run_seed(seed: int, *, quick: bool = False, exclude: frozenset[str] | set[str] = frozenset(),
             root: str | Path | None = None) -> Outcome:
    """Run the schedule of ``seed`` in a fresh temporary folder (removed afterwards) and check it."""
    base = Path(root) if root else Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(prefix=f"fedfs-sim-{seed}-", dir=base) as tmp:
        sim = Simulation(scenario(seed, quick=quick, exclude=exclude), tmp)
        return sim.run()


assert set(KINDS) >= set(asdict(Rates()))  # every per-call rate is a kind the docs and counts know
