"""The simulator's world: a simulated clock, a seeded fault plan, and a store that injects faults.

:class:`FaultStore` wraps one shared :class:`~fedfs.store.memory.MemoryStore` for one party
(each party sees the bucket through its own); every primitive asks the :class:`FaultPlan`
what happens to this call, and the plan answers from the seed alone: a hash of (seed, party,
incarnation, operation, key, how often this party's incarnation made that call), so the same
seed injects the same faults whatever order threads or set iteration take. Kinds:

- ``crash``: a :class:`Crash` (kill -9) before the call or after it took effect;
- ``point``: a :class:`Crash` at a named fault point (:mod:`fedfs.roles.faults`);
- ``unavailable``: :class:`~fedfs.errors.StoreUnavailable`, nothing done;
- ``unknown``: a write reports :class:`~fedfs.errors.StateUnknown` and did not happen;
- ``lost_ack``: a write happened but reports :class:`~fedfs.errors.StateUnknown`;
- ``slow``: the simulated clock jumps (seconds to minutes) before the call;
- ``repeat``: the call runs twice (a transport retry), the caller sees the second answer;
- ``lag``: ``exists`` and ``list`` miss what other parties wrote in the last few steps;
- ``skew``: each party's wall clock is off by its own offset (:class:`SimClock`).
"""

from __future__ import annotations

import hashlib
import re
import time as _real_time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..errors import StateUnknown, StoreUnavailable
from ..store.base import Store
from ..store.memory import MemoryStore

__all__ = ["Crash", "FaultPlan", "FaultStore", "KINDS", "Rates", "SimClock", "TimeShim", "key_class"]

#: Every fault kind the simulator injects (``skew`` is per party, the others per call or point).
KINDS = ("crash", "point", "unavailable", "unknown", "lost_ack", "slow", "repeat", "lag", "skew")
_WRITES = frozenset({"write", "publish", "delete"})
EPOCH = 1_800_000_000.0  # the simulated wall clock starts here (2027-01-15), whatever the real one says


class Crash(BaseException):
    """A simulated ``kill -9`` of one party: not an ``Exception``, so nothing in fedfs catches it;
    the driver does, and rebuilds the party from its workdir."""


@dataclass(frozen=True)
class Rates:
    """Per-call probabilities of each kind while faults are on (``point`` per fault point)."""

    crash: float = 0.0
    point: float = 0.0
    unavailable: float = 0.0
    unknown: float = 0.0
    lost_ack: float = 0.0
    slow: float = 0.0
    repeat: float = 0.0
    lag: float = 0.0

    def without(self, kinds: tuple[str, ...] | frozenset[str]) -> Rates:
        return Rates(**{k: (0.0 if k in kinds else v) for k, v in vars(self).items()})


class SimClock:
    """Simulated time: one wall clock advanced by the driver, each party's reading of it off by its skew."""

    def __init__(self, skew: dict[str, float] | None = None) -> None:
        self.now = EPOCH
        self.skew = dict(skew or {})
        self.current = ""  # the party stepping now

    def time(self) -> float:
        return self.now + self.skew.get(self.current, 0.0)

    def monotonic(self) -> float:
        return self.now - EPOCH

    def sleep(self, seconds: float) -> None:
        self.now += max(0.0, float(seconds))

    def advance(self, seconds: float) -> None:
        self.now += seconds


class TimeShim:
    """Stands in for the ``time`` module inside fedfs's modules during a run: ``time``,
    ``monotonic`` and ``sleep`` are the simulated clock's (a retry's back-off costs no real time),
    anything else is the real module's."""

    def __init__(self, clock: SimClock) -> None:
        self._clock = clock
        self.time, self.monotonic, self.sleep = clock.time, clock.monotonic, clock.sleep

    def __getattr__(self, name: str) -> Any:
        return getattr(_real_time, name)


_CLASSES = [(re.compile(p), c) for p, c in (
    (r"/blobs/", "blob"), (r"^aggregator/globals/", "global"), (r"/updates/", "update"),
    (r"latest", "latest"), (r"status\.json$", "status"), (r"heartbeat\.json$", "heartbeat"),
    (r"plans\.json$", "plans"), (r"census", "census"), (r"summary|fingerprint/global", "fingerprint"),
    (r"^federation\.json$", "federation"), (r"probe", "probe"))]


_RANDOM_PART = re.compile(r"[0-9a-f]{12,32}(?=\.json)")


def stable(key: str) -> str:
    """``key`` without a random name part (the exclusivity probe's ``exclusive-probe-<hex>.json``), so a
    fault decided for it, and the trace line, are the same in every run; content names (64 hex) stay."""
    return _RANDOM_PART.sub("*", key) if "probe" in key else key


def key_class(key: str) -> str:
    """What kind of file ``key`` is (for coverage counts): blob, global, update, latest, status, ..."""
    return next((c for rx, c in _CLASSES if rx.search(key)), "other")


@dataclass
class FaultPlan:
    """Which faults fire, decided from ``seed``; records each one in ``trace`` and counts them in ``stats``."""

    seed: int
    rates: Rates
    clock: SimClock
    lag_steps: int = 2
    slow_s: float = 120.0
    active: bool = True
    tick: int = 0
    trace: list[str] = field(default_factory=list)
    stats: Counter = field(default_factory=Counter)
    incarnation: Counter = field(default_factory=Counter)
    written: dict[str, tuple[int, str]] = field(default_factory=dict)  # key -> (tick, writer)
    spare: frozenset[str] = frozenset()  # "kind:key class" pairs not injected (``repeat:probe``)
    _calls: Counter = field(default_factory=Counter)

    def chance(self, party: str, op: str, key: str) -> float:
        """A uniform number in [0, 1) for this party incarnation's n-th ``op`` on ``key``."""
        key = stable(key)
        n = self._calls[party, op, key] = self._calls[party, op, key] + 1
        text = f"{self.seed}|{party}|{self.incarnation[party]}|{op}|{key}|{n}".encode()
        return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big") / 2.0 ** 64

    def record(self, party: str, kind: str, what: str, key: str = "") -> None:
        key = stable(key)
        self.trace.append(f"t{self.tick} {party}: {kind} {what} {key}".rstrip())
        self.stats[kind] += 1
        self.stats[f"{kind}:{what}:{key_class(key) if key else '-'}"] += 1

    def crash(self, party: str, why: str, key: str = "") -> Crash:
        self.incarnation[party] += 1
        return Crash(f"{party}: {why} {stable(key)}".rstrip())

    def decide(self, party: str, op: str, key: str) -> tuple[str | None, bool]:
        """(the exclusive fault for this call or None, whether it is also slow)."""
        if not self.active:
            return None, False
        u = self.chance(party, op, key)
        r = self.rates
        slow = u < r.slow  # independent of the others: the upper end of the same number decides them
        v = 1.0 - u
        for kind in ("crash", "unavailable", "unknown", "lost_ack", "repeat"):
            p = getattr(r, kind)
            if kind in ("unknown", "lost_ack") and op not in _WRITES:
                continue
            if v < p:
                return (None if f"{kind}:{key_class(key)}" in self.spare else kind), slow
            v -= p
        return None, slow

    def point(self, party: str, name: str) -> None:
        """The fault-point hook: crash ``party`` here with probability ``rates.point``."""
        self.stats[f"reached:{name}"] += 1
        if self.active and self.chance(party, "point", name) < self.rates.point:
            self.record(party, "point", name)
            raise self.crash(party, f"killed at {name}")

    def lags(self, party: str, key: str) -> bool:
        """Whether ``party``'s exists/list misses ``key`` now (another party wrote it within ``lag_steps``)."""
        w = self.written.get(key)
        return w is not None and w[1] != party and self.tick - w[0] < self.lag_steps


class FaultStore(Store):
    """One party's view of a shared memory bucket, with the faults its :class:`FaultPlan` decides."""

    scheme = "memory"
    publish_mechanism = "lock"
    kind = "a simulated bucket"

    def __init__(self, inner: MemoryStore, plan: FaultPlan, party: str) -> None:
        super().__init__(inner.url)
        self.inner, self.plan, self.party = inner, plan, party
        self.dead = False

    def describe(self, key: str) -> str:
        return self.inner.describe(key)

    def _call(self, op: str, key: str, fn: Any, *args: Any) -> Any:
        plan, party = self.plan, self.party
        if self.dead:  # a killed process makes no more calls (a finally block or thread that tries is stopped)
            raise Crash(f"{party} is dead")
        fault, slow = plan.decide(party, op, key)
        if slow:
            plan.clock.advance(plan.slow_s)
            plan.record(party, "slow", op, key)
        if fault == "crash" and plan.chance(party, "crash-side", key) < 0.5:
            return self._die("crash_before", op, key)
        if fault == "unavailable":
            plan.record(party, "unavailable", op, key)
            raise StoreUnavailable(f"{self.describe(key)}: simulated outage ({op})", key=key)
        if fault == "unknown":
            plan.record(party, "unknown", op, key)
            raise StateUnknown(f"{self.describe(key)}: simulated lost connection before {op} landed", key=key)
        result = fn(*args)
        if op in _WRITES:
            if op == "delete":
                plan.written.pop(key, None)
            else:
                plan.written[key] = (plan.tick, party)
        if fault == "repeat":
            plan.record(party, "repeat", op, key)
            result = fn(*args)  # may raise what a retried request meets (the key exists now, or is gone)
        if fault == "lost_ack":
            plan.record(party, "lost_ack", op, key)
            raise StateUnknown(f"{self.describe(key)}: simulated lost answer after {op} landed", key=key)
        if fault == "crash":
            return self._die("crash_after", op, key)
        return result

    def _die(self, kind: str, op: str, key: str) -> Any:
        self.dead = True
        self.plan.record(self.party, kind, op, key)
        raise self.plan.crash(self.party, f"{kind} {op}", key)

    def _lagging(self) -> bool:
        return self.plan.active and self.plan.rates.lag > 0

    # ---- primitives ------------------------------------------------------------------
    def _read(self, key: str, max_size: int | None) -> bytes:
        return self._call("read", key, self.inner._read, key, max_size)

    def _write(self, key: str, data: bytes) -> None:
        return self._call("write", key, self.inner._write, key, data)

    def _publish(self, key: str, data: bytes) -> None:
        return self._call("publish", key, self.inner._publish, key, data)

    def _exists(self, key: str) -> bool:
        found = self._call("exists", key, self.inner._exists, key)
        if found and self._lagging() and self.plan.lags(self.party, key) \
                and self.plan.chance(self.party, "lag", key) < self.plan.rates.lag:
            self.plan.record(self.party, "lag", "exists", key)
            return False
        return found

    def _list(self, prefix: str) -> list[str]:
        keys = self._call("list", prefix or "/", self.inner._list, prefix)
        if self._lagging() and self.plan.chance(self.party, "lag", prefix or "/") < self.plan.rates.lag:
            hidden = [k for k in keys if self.plan.lags(self.party, k)]
            if hidden:
                self.plan.record(self.party, "lag", "list", prefix or "/")
                keys = [k for k in keys if k not in set(hidden)]
        return keys

    def _size(self, key: str) -> int:
        return self._call("size", key, self.inner._size, key)

    def _delete(self, key: str) -> None:
        return self._call("delete", key, self.inner._delete, key)
