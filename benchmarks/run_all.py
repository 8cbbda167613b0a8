"""Run every benchmark in its quick form, keep each JSON, and write docs/benchmarks.md (``make bench``).

Each benchmark is a script in this folder that prints one JSON object on stdout (logs on
stderr), in the one shape of ``benchmarks/_common.py``: its figures, and ``targets`` as
``{name: {rule, value, met}}``. This runner starts each one as a subprocess with this interpreter, stores what it
printed under ``benchmarks/results/<name>.json`` (and ``<name>.log``: its stderr), records
the command, exit code and wall time in ``benchmarks/results/run_all.json``, and renders
``docs/benchmarks.md``: the machine, one section per benchmark with its tables and the command
that made them, after ``benchmarks/notes.md`` (hand-written remarks: repeats, variance, caveats).
A script that does not exist yet is listed as missing; one that fails, prints no JSON or
prints it in another shape is listed with the end of its stderr; neither stops the run.

    python benchmarks/run_all.py                   # all, quick forms (what `make bench` runs)
    python benchmarks/run_all.py --only quality    # one (repeatable); the others' stored results stay on the page
    python benchmarks/run_all.py --render-only     # rewrite docs/benchmarks.md from benchmarks/results/
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # benchmarks/_common.py: the output shape
from _common import shape_problems  # noqa: E402

ROOT = HERE.parent
RESULTS = HERE / "results"
PAGE = ROOT / "docs" / "benchmarks.md"
NOTES = HERE / "notes.md"  # included in the page as written

#: name, script, quick arguments, what it measures
BENCHMARKS: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("aggregation", "aggregation.py", ("--json", "--quick"),
     "aggregation time and peak memory vs the time to read the inputs, and vs the reference approach"),
    ("round_overhead", "round_overhead.py", ("--json", "--quick"),
     "time from the last update to every site holding the next global; storage requests per idle poll; "
     "bytes per site per round on S3"),
    ("ffe_fidelity", "ffe_fidelity.py", ("--json",),
     "merged fingerprint and plans vs nnU-Net on the pooled data, and vs the reference weighted-average merge"),
    ("faults", "faults.py", ("--json", "--quick"),
     "crashes (kill -9), storage outages, concurrent aggregators, skewed clocks and hostile inputs: "
     "what got through"),
    ("disk", "disk.py", ("--json",),
     "disk used after 20 rounds (bucket, aggregator and site workdirs), retention off and on"),
    ("cli_startup", "cli_startup.py", ("--json",),
     "how fast `fedfs --help` answers, and that it loads neither torch nor nnU-Net"),
    ("scale", "scale.py", ("--json", "--quick"),
     "site processes on moto S3 and a folder, and 1,000 simulated sites, with heterogeneous sleeps for training: "
     "aggregator time per update, requests per idle poll, wall time vs ideal, S3 cost, memory, status/report time"),
    ("simulation", "simulation.py", ("--json", "--quick"),
     "seeded fault schedules (crashes, failed, slow and repeated calls, listing lag, clock skew) over the real "
     "roles: invariant violations"),
    ("privacy", "privacy.py", ("--json",),
     "robust rules (median, trimmed mean) against a poisoner and their memory; DP-FedAvg's Dice at three epsilons "
     "(toy federation)"),
    ("quality", "quality.py", ("--json",),
     "Dice and HD95 of local, centralized, FFE, AsymFedAvg and async FedBuff nnU-Net on a synthetic "
     "multi-site task with an external test site"),
    ("fuzz", "fuzz.py", ("--json", "--quick"),
     "hostile inputs to every decoder of bucket bytes (documents, hints, headers, manifests): unhandled "
     "exceptions, time and peak memory per input"),
)


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ the machine

def machine() -> dict[str, Any]:
    """CPU model, cores, RAM, GPU, and the versions that matter for the figures."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram_gb = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gb = round(int(line.split()[1]) / 1024 ** 2, 1)
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for pkg in ("torch", "nnunetv2", "fedfs"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    gpu = None
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": ram_gb, "gpu": gpu,
            "python": platform.python_version(), **versions, "os": platform.platform(),
            "load_avg_1m": round(os.getloadavg()[0], 2)}


# ------------------------------------------------------------------ running

def _parse_json(stdout: str) -> Any:
    """The JSON object a benchmark printed: all of stdout, or else its last line that parses."""
    text = stdout.strip()
    if not text:
        raise ValueError("no output on stdout")
    with contextlib.suppress(ValueError):
        return json.loads(text)
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                return json.loads(line)
    raise ValueError(f"stdout is not JSON (ends with {text[-200:]!r})")


def run_one(name: str, script: str, args: Sequence[str], timeout_s: float) -> dict[str, Any]:
    """Run one benchmark; store its JSON and stderr; return its record for run_all.json."""
    path = HERE / script
    command = f"python benchmarks/{script} {' '.join(args)}".strip()
    record: dict[str, Any] = {"name": name, "command": command,
                              "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    if not path.is_file():
        log(f"{name}: benchmarks/{script} does not exist (yet): reported as missing")
        return {**record, "status": "missing"}
    log(f"{name}: {command} ...")
    t0 = time.monotonic()
    log_file = RESULTS / f"{name}.log"
    with open(log_file, "w") as err:
        try:
            proc = subprocess.run([sys.executable, str(path), *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=err,
                                  text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            proc = subprocess.CompletedProcess(exc.cmd, returncode=None, stdout=out)
    record["wall_s"] = round(time.monotonic() - t0, 1)
    record["returncode"] = proc.returncode
    try:
        data = _parse_json(proc.stdout or "")
        problems = shape_problems(data)
        if problems:
            raise ValueError("output not in the shape of benchmarks/_common.py: " + "; ".join(problems))
    except ValueError as exc:
        why = "timed out" if proc.returncode is None else f"exit code {proc.returncode}"
        tail = log_file.read_text(errors="replace")[-1500:]
        log(f"{name}: FAILED ({why}; {exc})")
        return {**record, "status": "failed", "error": f"{why}; {exc}", "stderr_tail": tail}
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    log(f"{name}: done in {record['wall_s']:.0f} s (exit code {proc.returncode})")
    return {**record, "status": "ok"}


# ------------------------------------------------------------------ rendering helpers

def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, float):
        a = abs(v)
        if v != v or a == 0:
            return "nan" if v != v else "0"
        if a >= 1e6 or a < 1e-3:
            return f"{v:.3e}"
        return f"{v:,.0f}" if a >= 1e4 else f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v) if all(not isinstance(x, (dict, list)) for x in v) else f"[{len(v)} items]"
    if isinstance(v, dict):
        return f"{{{len(v)} keys}}"
    s = str(v).replace("|", "\\|").replace("\n", " ")
    return s if len(s) <= 120 else s[:117] + "..."


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(c.replace("|", "\\|") if isinstance(c, str) else _fmt(c) for c in r) + " |"
            for r in rows]
    return out


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str)) or (
        isinstance(v, (list, tuple)) and len(v) <= 8 and all(isinstance(x, (bool, int, float, str)) for x in v))


def flat_scalars(data: Mapping[str, Any], skip: Sequence[str] = (), depth: int = 2, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) for the scalar fields of ``data``, nested dicts up to ``depth`` levels."""
    out = []
    for k, v in data.items():
        if k in skip:
            continue
        key = f"{prefix}{k}"
        if _scalar(v):
            out.append((key, v))
        elif isinstance(v, dict) and depth > 1:
            out += flat_scalars(v, (), depth - 1, key + ".")
    return out


def rows_table(rows: Sequence[Mapping[str, Any]], max_cols: int = 12) -> list[str]:
    """A table of a list of flat dicts: the scalar columns, in first-seen order."""
    cols: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k not in cols and _scalar(v):
                cols.append(k)
    cols = cols[:max_cols]
    return table(cols, [[r.get(c) for c in cols] for r in rows])


def targets_table(data: Mapping[str, Any]) -> list[str]:
    """The benchmark's ``targets``, which must be in the one shape (``benchmarks/_common.py``)."""
    problems = shape_problems(data)
    if problems:
        raise ValueError("; ".join(problems))
    targets = data["targets"]
    rows = [[f"`{name}`", t["rule"], t["value"], t["met"]] for name, t in targets.items()]
    met = sum(t["met"] for t in targets.values())
    return [f"Targets: {met} of {len(rows)} met.", ""] + table(["target", "rule", "value", "met"], rows) + [""]


def targets_summary(name: str) -> str:
    """``met/total`` for the summary table, from the stored result ('' when there is none)."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
        targets = json.loads((RESULTS / f"{name}.json").read_text())["targets"]
        return f"{sum(bool(t['met']) for t in targets.values())}/{len(targets)}"
    return ""


# ------------------------------------------------------------------ per-benchmark sections

def render_generic(data: Mapping[str, Any]) -> list[str]:
    lines = targets_table(data)
    rows = data.get("rows")
    if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
        lines += rows_table(rows) + [""]
    scalars = flat_scalars(data, skip=("benchmark", "targets", "all_targets_met", "rows", "machine"))
    if scalars:
        lines += table(["field", "value"], [[f"`{k}`", v] for k, v in scalars[:60]]) + [""]
    return lines


def render_quality(data: Mapping[str, Any]) -> list[str]:
    rows, means = data.get("rows", []), data.get("means", {})
    sites = list(dict.fromkeys(r["site"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["site"]): r for r in rows}
    b = data.get("budget", {})
    lines = [
        f"Dice / HD95 (mm) per test site, mean over its held-out cases; `External` trains nowhere. "
        f"Budget per nnU-Net training run: {b.get('rounds')} rounds x {b.get('local_epochs')} epochs x "
        f"{b.get('iterations')} iterations (batch from nnU-Net's plans), `{b.get('configuration')}`, "
        f"fold {b.get('fold')}, {b.get('device')}, test-time mirroring {'on' if b.get('tta') else 'off'}; "
        f"async: FedBuff K={b.get('buffer_size')} ({b.get('buffer_trigger', 'any')} trigger), "
        f"{b.get('slow_site')} {b.get('slow_factor')}x slower, "
        f"staleness weight {b.get('staleness')} (a={b.get('staleness_a')}).", ""]
    header = ["method"] + sites + ["mean Dice", "mean HD95"]
    body = []
    for m in methods:
        vals = [f"{cell[m, s]['dice']:.3f} / {cell[m, s]['hd95']:.1f}" if (m, s) in cell else "" for s in sites]
        mm = means.get(m, {})
        body.append([f"`{m}`"] + vals + [f"**{mm.get('dice', float('nan')):.3f}**", f"{mm.get('hd95', float('nan')):.1f}"])
    lines += table(header, body) + [""]
    lines += targets_table(data)
    wall, ev = data.get("wall_s", {}), data.get("eval_s", {})
    extra = data.get("arms", {})
    arm_rows = []
    for m in methods:
        e = extra.get(m, {})
        folded = e.get("updates_folded_per_site")
        arm_rows.append([f"`{m}`", wall.get(m), ev.get(m),
                         ", ".join(f"{k} {v}" for k, v in folded.items()) if folded else ""])
    lines += table(["arm", "training s", "evaluation s", "updates folded per site"], arm_rows) + [""]
    for arm, err in (data.get("errors") or {}).items():
        lines += [f"Arm `{arm}` failed: `{_fmt(err)}`", ""]
    lines += [f"Total wall time {_fmt(data.get('total_wall_s'))} s."]
    return lines + [""]


def render_faults(data: Mapping[str, Any]) -> list[str]:
    keys = ("federations_run", "federations_completed", "faults_injected", "faults_missed", "unexpected_exits",
            "corrupt_globals_published", "accepted_updates_lost", "duplicate_updates_applied", "bad_inputs_tried",
            "bad_inputs_rejected", "bad_input_kinds", "duration_s", "clock_skew_mechanism")
    lines = targets_table(data)
    lines += table(["metric", "value"], [[f"`{k}`", data.get(k)] for k in keys if k in data]) + [""]
    runs = [{"backend": b, **{k: r.get(k) for k in ("scenario", "completed", "duration_s", "faults_injected", "error")}}
            for b, pb in (data.get("per_backend") or {}).items() for r in pb.get("runs", [])]
    if runs:
        lines += rows_table(runs) + [""]
    if data.get("not_rejected"):
        lines += ["Bad inputs that were not rejected:", ""] + rows_table(data["not_rejected"]) + [""]
    probes = data.get("weakness_probes") or []
    if probes:
        lines += ["Weakness probes (attacks with a member's own valid key that fedfs does not refuse yet):", ""]
        lines += rows_table(probes) + [""]
    return lines


def render_privacy(data: Mapping[str, Any]) -> list[str]:
    """The targets, then each section's own rows (robust rules, their memory, DP) and its scalar figures."""
    lines = targets_table(data)
    for name, sec in data.items():
        if not isinstance(sec, dict) or name in ("targets", "errors"):
            continue
        lines += [f"Section `{name}`:", ""]
        if isinstance(sec.get("rows"), list) and sec["rows"]:
            lines += rows_table(sec["rows"]) + [""]
        scalars = flat_scalars(sec, skip=("rows",))
        if scalars:
            lines += table(["field", "value"], [[f"`{k}`", v] for k, v in scalars[:30]]) + [""]
    for name, err in (data.get("errors") or {}).items():
        lines += [f"Section `{name}` failed: `{_fmt(err)}`", ""]
    return lines


RENDERERS: dict[str, Callable[[Mapping[str, Any]], list[str]]] = {"quality": render_quality, "faults": render_faults,
                                                                  "privacy": render_privacy}


def render_page(records: Mapping[str, Mapping[str, Any]], mach: Mapping[str, Any]) -> str:
    when = records.get("_meta", {}).get("finished") or dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    lines = [
        "# Benchmarks", "",
        "Figures measured by the scripts in `benchmarks/` (each prints one JSON object, its targets as "
        "`{name: {rule, value, met}}`: `benchmarks/_common.py`). `make bench` "
        "(`python benchmarks/run_all.py`) runs them all in their quick forms, stores each JSON under "
        "`benchmarks/results/` and rewrites this page; `python benchmarks/run_all.py --only NAME` reruns one.", "",
        f"Last run finished {when} on this machine:", "",
    ]
    lines += table(["CPU", "cores", "RAM", "GPU", "python", "torch", "nnunetv2", "load avg (1 min) at start"],
                   [[mach.get("cpu"), mach.get("cores"), f"{mach.get('ram_gb')} GiB", mach.get("gpu") or "none",
                     mach.get("python"), mach.get("torch"), mach.get("nnunetv2"), mach.get("load_avg_1m")]]) + [""]
    if not mach.get("gpu"):
        lines += ["GPU figures are still to come: no GPU was available where these were measured "
                  "(`python benchmarks/quality.py --json --full` is the GPU run).", ""]
    if (mach.get("load_avg_1m") or 0) > (mach.get("cores") or 1):
        lines += ["The machine was shared with other work while these ran (load average above the core "
                  "count), so wall times are upper bounds.", ""]
    if NOTES.is_file():  # hand-written: what a run alone does not show (repeats, variance, caveats)
        lines += [NOTES.read_text().strip(), ""]
    summary = []
    for name, script, args, what in BENCHMARKS:
        r = records.get(name, {})
        command = r.get("command") or f"python benchmarks/{script} {' '.join(args)}".strip()
        summary.append([f"[{name}](#{name.replace('_', '-')})", f"`{command}`",
                        r.get("status", "not run"), r.get("wall_s"), targets_summary(name), what])
    lines += table(["benchmark", "command", "status", "wall s", "targets met", "what it measures"], summary) + [""]
    for name, script, _args, _what in BENCHMARKS:
        r = records.get(name, {})
        lines += [f"## {name}", ""]
        status = r.get("status", "not run")
        if status == "missing":
            lines += [f"`benchmarks/{script}` does not exist yet: no figures.", ""]
            continue
        result_file = RESULTS / f"{name}.json"
        if status == "failed":
            lines += [f"`{r.get('command')}` failed: {_fmt(r.get('error'))}.", "", "```",
                      *(r.get("stderr_tail") or "").splitlines()[-15:], "```", ""]
            if result_file.is_file():
                lines += ["Figures from the previous successful run:", ""]
            else:
                continue
        if not result_file.is_file():
            lines += ["Not run yet.", ""]
            continue
        data = json.loads(result_file.read_text())
        lines += [f"Made by `{r.get('command', f'python benchmarks/{script}')}`"
                  + (f" in {_fmt(r.get('wall_s'))} s" if r.get("wall_s") is not None else "")
                  + (f" (exit code {r.get('returncode')})" if r.get("returncode") not in (0, None) else "")
                  + f"; JSON in `benchmarks/results/{name}.json`.", ""]
        try:
            lines += RENDERERS.get(name, render_generic)(data)
        except Exception as exc:  # noqa: BLE001 - a schema change must not lose the page
            lines += [f"(could not render the tables: {type(exc).__name__}: {exc}; see the JSON)", ""]
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------ main

def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = [b[0] for b in BENCHMARKS]
    ap.add_argument("--only", action="append", choices=names, help="run only this benchmark (repeatable)")
    ap.add_argument("--skip", action="append", choices=names, default=[], help="do not run this benchmark")
    ap.add_argument("--render-only", action="store_true", help="rewrite the page from benchmarks/results/ only")
    ap.add_argument("--timeout", type=float, default=5400.0, help="seconds per benchmark (default 5400)")
    args = ap.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta_file = RESULTS / "run_all.json"
    records: dict[str, Any] = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    mach = records.get("_meta", {}).get("machine") or machine()
    if not args.render_only:
        mach = machine()
        chosen = [b for b in BENCHMARKS if (not args.only or b[0] in args.only) and b[0] not in args.skip]
        for name, script, bench_args, _what in chosen:
            record = run_one(name, script, bench_args, args.timeout)
            # re-read: another run_all (--only another benchmark) may have recorded its own meanwhile
            records = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
            records[name] = record
            records["_meta"] = {"machine": mach,
                                "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
            meta_file.write_text(json.dumps(records, indent=1) + "\n")
            PAGE.write_text(render_page(records, mach))  # after every benchmark: a crash keeps what ran
    PAGE.write_text(render_page(records, mach))
    log(f"wrote {PAGE} and {RESULTS}")
    failed = [n for n, r in records.items() if n != "_meta" and r.get("status") == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
