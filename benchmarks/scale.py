"""How does a federation scale in parties? 100 processes on S3 and a folder, 1,000 simulated sites.

Training is replaced by a sleep drawn per site from a heterogeneous distribution
(:func:`scale_common.draw_sleeps`: most sites ``base x U(1, 2)``, every tenth site ten times slower),
so only the federation's own cost is measured. The sites' local work,
:class:`scale_common.NumpySleepWork`, is a real :class:`fedfs.roles.site.LocalWork` over a small model
(4 float32 tensors, about 18 KiB) that reads and writes safetensors with numpy and
:mod:`fedfs.weights.header` only: a sleeping site imports neither torch nor nnU-Net
(each process reports ``sys.modules`` and its RSS). Mode ``fedavg`` (no fingerprint phase),
sync FedAvg and async FedBuff (K = N/2, fresh trigger).

Two set-ups:

* **(a) processes** (``scale_processes.py``): N sites and the aggregator each run the real role loop
  (``run_loop(role.step, make_trigger(store, watch="poll", ...))``) as their own OS process
  (``python benchmarks/scale.py --party SPEC``, under ``nice``), on a moto S3 server started
  in this process (each party its own access key id, so a WSGI meter counts HTTP requests
  by party and type) and on a folder. Every party's store is wrapped in
  ``round_overhead.CountingStore``: each public Store call is one request.
* **(b) simulation** (``scale_sim.py``): N sites in one process (the real roles, each with its own counting store
  over one folder), driven round-robin on a virtual clock: a site that starts a round is held
  (its first store call of the publish raises StoreUnavailable, which a real daemon retries)
  until its sleep has passed in virtual time; the aggregator polls every ``AGG_POLL_S``
  virtual seconds (skipped when no update arrived since its last step; idle polls are
  measured separately), a site notices a new global within one site poll interval.
  Storage work is real and timed; only training and waiting are virtual.

Reported per N: the aggregator's time per version and per update; the time from the last
awaited update to every waiting site holding the next global (processes); wall time against
the ideal set by the sleeps (:func:`scale_common.ideal_wall`, the same rules with zero overhead); requests
per idle poll for a site and for the aggregator (by store call and, on S3, by HTTP type);
requests and bytes per site per round; the S3 request cost per round and per day at AWS list
prices (:data:`scale_common.PRICES`); peak memory; document sizes; ``fedfs status`` (its folded
form past 40 sites), ``fedfs status --all`` (every row), ``--json`` and ``fedfs report``: time and
output size at the largest N.

This file is the CLI: the runs (:func:`bench`), the targets, the summary rows and the cost model;
``scale_common.py`` holds what both set-ups share (the sleep work, sleeps, the ideal, keys, request
accounting). It puts its own folder on ``sys.path``, so it runs from any working directory.

``python benchmarks/scale.py --json [--quick]`` prints one JSON object on stdout (logs on
stderr). Full: 100 processes per backend and mode, simulation at N = 10, 100, 1000.
``--quick``: 20 processes per backend and mode, 2 rounds; simulation at N = 10 and 200, sync, 2 rounds.
``--no-processes`` (or ``--processes 0``) runs the simulation alone; the 1,000-site run stored in
``benchmarks/results/scale-full/``::

    python benchmarks/scale.py --json --no-processes --sim-modes sync --sim-ns 10 100 1000 --sim-rounds 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # benchmarks/_common.py, round_overhead.py, scale_*.py
from _common import benchmark_output, target  # noqa: E402
from scale_common import PRICES, SHAPES, request_cost  # noqa: E402
from scale_processes import run_party, run_processes  # noqa: E402
from scale_sim import simulate  # noqa: E402
from round_overhead import MotoS3  # noqa: E402

__all__ = ["bench", "check_targets", "cost_model", "main", "run_party", "run_processes", "simulate",
           "summary_rows"]


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
    ap.add_argument("--processes", type=int, default=None, help="site processes per run (default 100; quick 20; 0: none)")
    ap.add_argument("--no-processes", action="store_true", help="run the simulation only (as --processes 0)")
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
    if args.no_processes:
        args.processes = 0
    elif args.processes is None:
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
