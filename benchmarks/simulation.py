"""Deterministic simulation: thousands of seeded fault schedules over the real roles, 0 invariant violations.

Each seed is one federation (3-20 sites, one or two aggregators, FFE or AsymFedAvg, sync or
async) run by :mod:`fedfs.testing.sim` with crashes at every fault point and between store
calls, failed, slow and repeated calls, writes that landed but report failure, listing lag and
clock skew, then a fault-free tail; the invariants of :mod:`fedfs.testing.sim_check` are checked
after each one (docs/simulation.md).

    python benchmarks/simulation.py --json                 # 10,000 schedules, JSON on stdout
    python benchmarks/simulation.py --json --quick         # 500 schedules (run_all's form)
    python benchmarks/simulation.py --seed 1234 --replay -v   # one schedule, its trace and verdict
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _common import benchmark_output, target  # noqa: E402

FULL, QUICK = 10_000, 500


def replay_command(seed: int, exclude: list[str], quick: bool) -> str:
    extra = "".join(f" --exclude {k}" for k in exclude) + (" --quick-schedules" if quick else "")
    return f"python benchmarks/simulation.py --seed {seed} --replay -v{extra}"


def _run(args: tuple[int, bool, tuple[str, ...]]) -> dict[str, Any]:
    seed, quick, exclude = args
    from fedfs.testing.sim import run_seed

    o = run_seed(seed, quick=quick, exclude=frozenset(exclude))
    return {"seed": seed, "scenario": o.scenario, "violations": [str(v) for v in o.violations],
            "invariants": sorted({v.invariant for v in o.violations}), "stats": o.stats, "steps": o.steps,
            "crashes": o.crashes, "wall_s": o.wall_s, "details": o.details, "trace_tail": o.trace[-12:] if o.violations else []}


def _init_worker() -> None:
    logging.disable(logging.WARNING)  # the roles log every injected outage; the verdict is in the JSON
    import torch

    torch.set_num_threads(1)


def run_many(seeds: range, quick: bool, exclude: tuple[str, ...], workers: int) -> list[dict[str, Any]]:
    jobs = [(s, quick, exclude) for s in seeds]
    if workers <= 1:
        _init_worker()
        return [_run(j) for j in jobs]
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker, maxtasksperchild=200) as pool:
        return list(pool.imap_unordered(_run, jobs, chunksize=8))


def summarize(results: list[dict[str, Any]], args: argparse.Namespace, wall_s: float) -> dict[str, Any]:
    from fedfs.roles.faults import POINTS
    from fedfs.testing.sim_store import KINDS

    stats: Counter = Counter()
    for r in results:
        stats.update(r["stats"])
    per_invariant = Counter(i for r in results for i in r["invariants"])
    failing = sorted((r for r in results if r["violations"]), key=lambda r: r["seed"])
    kinds = {k: stats.get(k, 0) for k in KINDS if k != "skew"}
    kinds["crash"] = stats.get("crash_before", 0) + stats.get("crash_after", 0)
    kinds["skew"] = sum(1 for r in results if "skew" in r["scenario"].split("faults:")[-1])
    crashed_points = {p: stats.get(f"point:{p}:-", 0) for p in POINTS}
    reached = {p: stats.get(f"reached:{p}", 0) for p in POINTS}
    between = sorted({k.split(":", 1)[1] for k in stats if k.startswith(("crash_before:", "crash_after:"))})
    n = len(results)
    wanted = QUICK if args.quick else FULL
    figures = {
        "schedules": n, "first_seed": args.start, "quick_schedules": args.quick_schedules,
        "schedules_violating": len(failing), "violations_by_invariant": dict(per_invariant),
        "failing_seeds": [{"seed": r["seed"], "replay": replay_command(r["seed"], args.exclude, args.quick_schedules),
                           "scenario": r["scenario"], "violations": r["violations"][:4], "trace_tail": r["trace_tail"]}
                          for r in failing[:20]],
        "excluded_kinds": args.exclude, "faults_injected": kinds, "fault_points_reached": reached,
        "fault_points_crashed": crashed_points, "store_calls_crashed_between": len(between),
        "crash_sites": between, "steps_total": sum(r["steps"] for r in results),
        "party_restarts": sum(r["crashes"] for r in results),
        "globals_published": sum(r["details"].get("globals", 0) for r in results),
        "updates_folded": sum(r["details"].get("folded", 0) for r in results),
        "rejections_recorded": sum(r["details"].get("rejected", 0) for r in results),
        "mean_schedule_s": round(sum(r["wall_s"] for r in results) / max(1, n), 3),
        "max_schedule_s": round(max((r["wall_s"] for r in results), default=0.0), 3),
        "wall_s": round(wall_s, 1), "workers": args.workers,
    }
    targets = {
        "schedules": target(f"at least {wanted:,} schedules run ({FULL:,} in the full form, {QUICK:,} with --quick)",
                            n, n >= wanted),
        "invariant_violations": target("0 schedules violate an invariant", len(failing), not failing),
        "every_fault_kind": target("every fault kind injected (crash, point, unavailable, unknown, lost_ack, slow, "
                                   "repeat, lag, skew), none excluded", min(kinds.values()) if kinds else 0,
                                   all(kinds.values()) and not args.exclude),
        "every_fault_point": target("a crash at every named fault point", min(crashed_points.values()),
                                    all(crashed_points.values())),
    }
    return benchmark_output("simulation", figures, targets)


def replay(args: argparse.Namespace) -> int:
    _init_worker()
    if args.verbose > 1:
        logging.disable(logging.NOTSET)
        logging.basicConfig(level=logging.WARNING, format="    log %(name)s: %(message)s")
    from fedfs.testing.sim import run_seed, scenario

    sc = scenario(args.seed, quick=args.quick_schedules, exclude=frozenset(args.exclude))
    print(sc.describe())
    o = run_seed(args.seed, quick=args.quick_schedules, exclude=frozenset(args.exclude))
    if args.verbose:
        print("\n".join(o.trace))
    print(f"{o.steps} steps, {o.crashes} restarts, {o.wall_s:.2f} s; "
          f"faults: {', '.join(f'{k} {v}' for k, v in sorted(o.stats.items()) if ':' not in k) or 'none'}")
    for v in o.violations:
        print(f"VIOLATION {v}")
    print("no invariant violated" if not o.violations else f"{len(o.violations)} violation(s)")
    return 1 if o.violations else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="run many schedules and print the JSON result")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK:,} schedules instead of {FULL:,}")
    ap.add_argument("--schedules", type=int, default=None, help="how many schedules (seeds start..start+N-1)")
    ap.add_argument("--start", type=int, default=0, help="the first seed")
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="processes")
    ap.add_argument("--seed", type=int, help="one seed (with --replay)")
    ap.add_argument("--replay", action="store_true", help="run --seed once and print its verdict")
    ap.add_argument("-v", "--verbose", action="count", default=0, help="-v: the trace; -vv: the roles' logs too")
    ap.add_argument("--exclude", action="append", default=[], metavar="KIND[:CLASS]",
                    help="turn a fault kind off, or off on one class of file (repeat:probe), to explore past a "
                         "known violation (the targets then fail)")
    ap.add_argument("--quick-schedules", action="store_true", help="the cheap schedules the test suite runs")
    args = ap.parse_args(argv)
    if args.replay or args.seed is not None:
        if args.seed is None:
            ap.error("--replay needs --seed")
        return replay(args)
    args.schedules = args.schedules or (QUICK if args.quick else FULL)
    t0 = time.perf_counter()
    results = run_many(range(args.start, args.start + args.schedules), args.quick_schedules, tuple(args.exclude),
                       args.workers)
    out = summarize(results, args, time.perf_counter() - t0)
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(f"{out['schedules']} schedules, {out['schedules_violating']} violating; targets met: "
              f"{out['all_targets_met']}")
        for f in out["failing_seeds"]:
            print(f"  {f['replay']}   # {f['violations'][0]}")
    return 0 if out["all_targets_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
