"""The scale benchmark's set-up (a): every party its own OS process, on a moto S3 server or a folder.

Each party (N sites and the aggregator) runs the real role loop
(``run_loop(role.step, make_trigger(store, watch="poll", ...))``) in its own process,
``python benchmarks/scale.py --party SPEC`` under ``nice`` (:func:`run_party` is that entry point),
its store wrapped in ``round_overhead.CountingStore`` (each public Store call is one request). On S3
each party has its own access key id, so the moto server's WSGI meter counts HTTP requests by
party and type (:func:`s3_figures`). :func:`analyse_processes` reads the parties' step timelines and
request logs: aggregator time per version and update, the last awaited update to every waiting
site holding the next global, idle polls, requests and bytes per site per round, memory, imports.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # benchmarks/_common.py, round_overhead.py, scale_*.py
from scale_common import (AGGREGATOR, MB, ONE_THREAD, SHAPES, NumpySleepWork, create_federation,  # noqa: E402
                          draw_sleeps, ideal_wall, log, make_keys, ops_of_log, party_options, proc_status,
                          request_cost)

from fedfs.protocol import layout  # noqa: E402
from fedfs.store import open_store  # noqa: E402
from round_overhead import CountingStore, MotoS3  # noqa: E402

#: The script each party process runs (``--party SPEC``).
SCRIPT = HERE / "scale.py"


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
            **proc_status()}


def _spawn_all(specs: list[dict[str, Any]], workdir: Path, timeout_s: float) -> tuple[dict[str, Any], float]:
    procs = {}
    t0 = time.time()
    for spec in specs:
        p = spec["party"]
        spec = {**spec, "out": str(workdir / f"{p}.result.json")}
        path = workdir / f"{p}.spec.json"
        path.write_text(json.dumps(spec))
        errf = open(workdir / f"{p}.log", "w")
        procs[p] = (subprocess.Popen(["nice", "-n", "10", sys.executable, str(SCRIPT), "--party",
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



def idle_steps(steps: list, entries: list, after: float = 0.0) -> list[dict[str, Any]]:
    """The steady-state idle polls of a party once ``after`` (v0's publication) has passed: 'wait' steps
    right after another 'wait' step that moved no payload (an aggregator poll that verified a new
    update also says 'wait')."""
    out = []
    for prev, cur in zip(steps, steps[1:]):
        if cur[2] == "wait" and prev[2] == "wait" and cur[0] > after:
            ops = ops_of_log(entries[cur[3]:cur[4]])
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
        tot = ops_of_log(r["log"][planned[4]:last[4]])
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

