"""The scale benchmark's set-up (b): N sites and the aggregator simulated in one process, on a virtual clock.

The real roles, each with its own counting store over one folder, are driven round-robin: a site
that starts a round is held (:class:`HoldingStore`: its first store call of the publish raises
:class:`Held`, a StoreUnavailable, which a real daemon retries) until its sleep has passed in
virtual time; the aggregator polls every :data:`AGG_POLL_S` virtual seconds (skipped when no update
arrived since its last step; idle polls are measured apart), a site notices a new global within
one :data:`SITE_POLL_S`. Storage work is real and timed; only training and waiting are virtual.
At the largest N, :func:`time_tools` times ``fedfs status`` (folded past 40 sites), ``--all``,
``--json`` and ``fedfs report`` on the simulated federation's folder.
"""

from __future__ import annotations

import heapq
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # benchmarks/_common.py, round_overhead.py, scale_*.py
from scale_common import (AGGREGATOR, NumpySleepWork, create_federation, draw_sleeps, ideal_wall, log,  # noqa: E402
                          make_keys, ops_of_log, proc_status, s3_classes)

from fedfs.errors import StoreUnavailable  # noqa: E402
from fedfs.protocol import layout  # noqa: E402
from fedfs.store import open_store  # noqa: E402
from round_overhead import CountingStore  # noqa: E402

AGG_POLL_S = 15.0  # simulation: the aggregator's poll interval (virtual seconds)
SITE_POLL_S = 30.0  # simulation: a site's poll interval (virtual seconds)


class Held(StoreUnavailable):
    """The simulation holds a site's publish until its training time has passed."""

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
                        idle_site.update(ops_of_log(st.log[m1:]), version=len(agg_steps))
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
                                  "requests": acc["requests"], "step_ops": ops_of_log(agg_store.log[m0:])})
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
           "peak_rss_mb_process": round(proc_status()["VmHWM"], 1),
           "real_s": round(time.perf_counter() - t_start, 1)}
    out["idle_poll_site_s3"] = s3_classes(idle_site.get("ops", {}))
    out["idle_poll_aggregator_s3"] = s3_classes(agg_idle.get("ops", {}))
    out["documents_bytes"] = document_sizes(open_store(url), names)
    if report:
        out["tools"] = time_tools(url, root)
    log(json.dumps({k2: v for k2, v in out.items() if k2 not in ("idle_poll_site", "idle_poll_aggregator")}))
    return out


def _ops_of(agg, store: CountingStore) -> dict[str, Any]:
    """One aggregator step's requests, right after it published (no update in yet)."""
    m = store.mark()
    agg.step()
    return ops_of_log(store.log[m:])


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
    """``fedfs status`` (text: folded past 40 sites; ``--all``: every row; ``--json``) and ``fedfs report``:
    wall time and output size."""
    fedfs_cli = str(Path(sys.executable).with_name("fedfs"))
    out = {}
    for name, args in (("status", ["status", url]), ("status_all", ["status", url, "--all"]),
                       ("status_json", ["status", url, "--json"]),
                       ("report", ["report", url, "-o", str(root / "report.html")])):
        t0 = time.perf_counter()
        done = subprocess.run([fedfs_cli, *args], capture_output=True, text=True, check=False)
        dt = time.perf_counter() - t0
        size = len(done.stdout.encode()) if name != "report" else (
            (root / "report.html").stat().st_size if (root / "report.html").exists() else 0)
        out[name] = {"s": round(dt, 2), "bytes": size, "exit_code": done.returncode,
                     **({"stderr": done.stderr[-300:]} if done.returncode else {})}
        if name == "status":  # what the folded form shows, in the log
            lines = done.stdout.splitlines()
            log("\n".join([f"`fedfs status` ({len(lines)} lines; `--all` prints every site):", *lines[:60]]))
    return out

