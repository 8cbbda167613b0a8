"""``fedfs simulate``: the aggregator and N sites as separate processes on one machine.

Each party is a real ``fedfs ... run`` daemon (``python -m fedfs``) with its own
key, work folder and log file; they share nothing but the bucket, exactly as
in a real federation. Progress is read from the bucket (the ``latest`` hint
and the sites' heartbeats), never from the processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..protocol import layout
from ..errors import FedfsError, NotFound
from ..federation import Federation, config_from_key_dir
from ..protocol.schema import Heartbeat, LatestHint
from ..trust.signing import generate_keypair


@dataclass
class SimulationSpec:
    """Who takes part and how they train."""

    datasets: dict[str, str]  # site name -> nnU-Net dataset id or name
    mode: str = "ffe"
    rounds: int = 2
    local_epochs: int = 1
    aggregation: str = "sync"
    buffer_size: int = 0
    buffer_trigger: str = "fresh"  # async: what counts toward K, see FederationConfig
    max_staleness: int = 8
    staleness: str = "inverse_sqrt"  # FedBuff's staleness weight (async), see FederationConfig
    staleness_a: float = 0.5
    staleness_b: float = 4.0
    configuration: str = "2d"
    fold: str = "0"
    trainer: str = "nnUNetTrainer"
    iterations_per_epoch: int | None = None
    val_iterations: int | None = None
    final_validation: bool = True
    site_args: dict[str, list[str]] = field(default_factory=dict)  # extra CLI args per site
    poll_interval: float = 1.0
    watch: str = "auto"
    config: dict[str, Any] = field(default_factory=dict)  # more FederationConfig fields (secure_aggregation, dp_*)


def nnunet_environment(root: str | os.PathLike[str], extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """nnU-Net's folders under ``root`` (kept if already set), fedfs's trainers on ``nnUNet_extTrainer``,
    and single-process data augmentation (fastest on small CPUs)."""
    from ..nnunet.build import trainer_search_path

    root = Path(root)
    env = {
        "nnUNet_raw": os.environ.get("nnUNet_raw", str(root / "nnUNet_raw")),
        "nnUNet_preprocessed": os.environ.get("nnUNet_preprocessed", str(root / "nnUNet_preprocessed")),
        "nnUNet_results": os.environ.get("nnUNet_results", str(root / "nnUNet_results")),
        "nnUNet_n_proc_DA": os.environ.get("nnUNet_n_proc_DA", "0"),
        "nnUNet_def_n_proc": os.environ.get("nnUNet_def_n_proc", "1"),
    }
    ext = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    env["nnUNet_extTrainer"] = os.pathsep.join(ext + [trainer_search_path()])
    env.update(extra or {})
    return env


def simulate(
    spec: SimulationSpec,
    *,
    workdir: str | os.PathLike[str] | None = None,
    bucket: str | None = None,
    env: Mapping[str, str] | None = None,
    echo: Callable[[str], None] | None = print,
    timeout_s: float = 3600.0,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run a whole federation; return a summary. Raises FedfsError with the failing log's tail."""
    say = echo or (lambda _m: None)
    root = Path(workdir or tempfile.mkdtemp(prefix="fedfs-sim-"))
    keys, logs = root / "keys", root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    url = bucket or str(root / "bucket")
    sites = sorted(spec.datasets)
    if not (keys / "aggregator.key").exists():
        generate_keypair("aggregator", "aggregator", keys)
    for s in sites:
        if not (keys / f"{s}.key").exists():
            generate_keypair(s, "site", keys)
    config, agg = config_from_key_dir(
        keys, sites, mode=spec.mode, configuration=spec.configuration, rounds=spec.rounds,
        local_epochs=spec.local_epochs, aggregation=spec.aggregation, buffer_size=spec.buffer_size,
        buffer_trigger=spec.buffer_trigger, max_staleness=spec.max_staleness, staleness=spec.staleness,
        staleness_a=spec.staleness_a, staleness_b=spec.staleness_b, fold=str(spec.fold), **spec.config)
    fed, created = Federation.create(url, config, agg, storage_options=storage_options)
    say(f"federation {'created' if created else 'resumed'} at {url}: {spec.mode}, {spec.aggregation}, "
        f"{len(sites)} sites, {spec.rounds} rounds")
    proc_env = {**os.environ, **(env or {})}
    threads = str(max(1, (os.cpu_count() or 1) // len(sites)))
    proc_env.setdefault("FEDFS_TORCH_THREADS", threads)  # parties share the cores: don't oversubscribe
    proc_env.setdefault("OMP_NUM_THREADS", threads)
    if storage_options:
        proc_env["FEDFS_STORAGE_OPTIONS"] = json.dumps(storage_options)
    base = [sys.executable, "-m", "fedfs"]
    common = ["--poll-interval", str(spec.poll_interval), "--watch", spec.watch]
    cmds = {"aggregator": base + ["aggregator", "run", url, "--key", str(keys / "aggregator.key"),
                                  "--workdir", str(root / "work" / "aggregator")] + common}
    for s in sites:
        args = ["site", "run", url, "--key", str(keys / f"{s}.key"), "--workdir", str(root / "work" / s),
                "-d", str(spec.datasets[s]), "-c", spec.configuration, "-f", str(spec.fold), "-tr", spec.trainer,
                "-np", "1", "-npfp", "1"] + common
        if spec.iterations_per_epoch:
            args += ["--iterations-per-epoch", str(spec.iterations_per_epoch)]
        if spec.val_iterations:
            args += ["--val-iterations", str(spec.val_iterations)]
        if not spec.final_validation:
            args += ["--no-final-validation"]
        cmds[s] = base + args + spec.site_args.get(s, [])
    procs: dict[str, subprocess.Popen] = {}
    started = time.monotonic()
    try:
        for name, cmd in cmds.items():
            fh = open(logs / f"{name}.log", "ab")
            procs[name] = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=proc_env,
                                           start_new_session=True)
        _monitor(fed, procs, logs, say, started, timeout_s)
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
    wall = time.monotonic() - started
    states = {s: json.loads((root / "work" / s / "state.json").read_text()) for s in sites}
    latest = fed.bucket.read(layout.LATEST, LatestHint).doc.version
    say(f"federation finished: global v{latest} after {wall:.0f} s")
    return {"bucket": url, "workdir": str(root), "mode": spec.mode, "aggregation": spec.aggregation,
            "sites": sites, "rounds": spec.rounds, "final_version": latest, "wall_s": round(wall, 1),
            "site_summaries": {s: states[s].get("summary", {}) for s in sites}, "keys": str(keys)}


def _monitor(fed: Federation, procs: dict[str, subprocess.Popen], logs: Path, say: Callable[[str], None],
             started: float, timeout_s: float) -> None:
    seen: dict[str, str] = {}
    while True:
        for name, p in procs.items():
            rc = p.poll()
            if rc not in (None, 0):
                tail = (logs / f"{name}.log").read_text(errors="replace")[-3000:]
                raise FedfsError(f"{name} exited with code {rc}; the end of {logs / f'{name}.log'}:\n{tail}")
        lines = _progress(fed)
        for key, line in lines.items():
            if seen.get(key) != line:
                seen[key] = line
                say(f"[{time.monotonic() - started:6.0f} s] {line}")
        if all(p.poll() == 0 for p in procs.values()):
            return
        if time.monotonic() - started > timeout_s:
            raise FedfsError(f"the simulation did not finish within {timeout_s:.0f} s (logs in {logs})")
        time.sleep(1.0)


def _progress(fed: Federation) -> dict[str, str]:
    out = {}
    try:
        out["global"] = f"global model v{fed.bucket.read(layout.LATEST, LatestHint).doc.version}"
    except (NotFound, FedfsError):
        pass
    for s in fed.config.site_names:
        try:
            hb = fed.bucket.read(layout.site_heartbeat(s), Heartbeat).doc
        except (NotFound, FedfsError):
            continue
        metrics = ", ".join(f"{k}={v:.3g}" for k, v in sorted(hb.metrics.items())
                            if k in ("train_loss", "pseudo_dice", "validation_dice"))
        said = hb.message if hb.message.startswith(hb.phase) else f"{hb.phase}: {hb.message}".strip(": ")
        out[s] = f"site {s}: {said}" + (f" ({metrics})" if metrics else "")
    return out
