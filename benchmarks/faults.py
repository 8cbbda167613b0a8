"""Fault injection: real tiny federations that are crashed, cut off and attacked, then audited.

Every federation is three honest sites (A, B, C) and an aggregator, each its own
process (``python -m fedfs.testing.toy_party``: the real roles, triggers and bucket code
over a toy PyTorch model), sharing only the bucket: a folder, or S3 served by a
moto server started in this process. FFE mode, synchronous FedAvg, 3 rounds,
case-weighted. While they run, this runner injects faults; a party that dies is
started again, as ``systemd``'s ``Restart=on-failure`` would.

Faults (scenario names in brackets):

* kill -9 of a site during training [crashes]: site A sleeps inside each round's
  training (``--delay-s``); when its heartbeat says ``training`` round 1, its
  process group gets SIGKILL.
* kill -9 of a site between payload and manifest, and before its upload
  [crashes]: ``FEDFS_FAULTS=site.after_upload@2`` (B), ``site.before_publish@1`` (C).
  On S3 also a kill *during* the upload [upload_kill]: a WSGI middleware in the
  moto server holds site A's blob PUT for a few seconds and the runner kills A
  while the request is in flight; likewise the aggregator's global payload PUT.
* kill -9 of the aggregator between payload and manifest and after the manifest
  [crashes]: ``aggregator.before_manifest@2``, then after the restart
  ``aggregator.after_manifest@1``.
* the S3 server stopped for 20 s (``--quick``: 5 s) and started again on the same
  port with the same data [outage] (moto keeps its state in memory in this
  process; the runner checks an object written before the stop is still there).
* a second aggregator, same key, own work folder, running concurrently from the
  start [concurrency]: both must finish; one manifest per version wins.
* site clocks hours off [concurrency]: C runs under ``faketime -f +5h`` when
  libfaketime is installed; B always (and C without libfaketime) gets
  ``FEDFS_TOY_CLOCK_OFFSET_S`` = -5 h, which only ``fedfs.testing.toy_party`` honours: it
  shifts ``time.time`` and the ``signed_at`` of what the party signs, not the
  kernel clock.

Hostile inputs [hostile] come from a fourth member, M, whose key the attacker
holds: M's set-up (census, fingerprint, plans) is honest, so the federation
waits for it, then every update M posts is an attack, one kind per update key,
plus files written with the bare store into honest sites' folders and files
signed with an honest site's real key where the attack is "a valid signature".
A federation.json naming a site ``../evil`` is offered to a party separately,
and bad globals (written into ``aggregator/`` with a site's key, or a global's
payload altered) are offered to a site in process ([site_probes]). Every bad
input must be refused with a human-readable reason in the refusing party's
signed status document (``aggregator/status.json`` or ``sites/<S>/status.json``,
:class:`fedfs.protocol.schema.StatusDocument`) that matches the kind (for federation.json,
where no trusted status exists yet, the party's refusal to start with the reason).

Integrity metrics, computed from the bucket after each federation:

* ``corrupt_globals_published``: global manifests (v0..final) that fail signature
  verification, whose payload fails sha256 or :func:`fedfs.weights.tensors.validate_update`
  against v0's layout, that list a contribution whose update manifest is missing,
  unverifiable or names another sha256, or whose tensors are not the weighted
  average ``sum(w_i x_i) / sum(w_i)`` (float64, rtol 1e-5) of the contributions'
  payloads with the weights the manifest lists; plus versions published after a
  final one.
* ``accepted_updates_lost``: update manifests of the honest sites that verify
  (signature, schema, binding), are not recorded as rejected in
  ``aggregator/status.json``, and are listed in no global, although the
  federation finished.
* ``duplicate_updates_applied``: (site, round) pairs listed in more than one global.

Attacks a member can make with its own valid key that fedfs does not refuse (yet)
are measured in process by :func:`weakness_probes` and reported under
``weakness_probes``, not counted as bad inputs: a copied payload, two updates
from one global, an inflated case count, a forged manifest squatting the next
global's key, garbage squatting a site's next update key, and a rejected update
followed by an aggregator restart.

Output, one JSON object: ``benchmark``, ``federations_run``, ``federations_completed``,
``faults_injected`` (faults that demonstrably fired: a crash point's message in
the party's log, a SIGKILL sent, the outage done, the second aggregator or the
skewed clock running), ``faults_missed`` (planned, never fired),
``unexpected_exits`` (party exits that were not injected), the three integrity
counts, ``bad_inputs_tried``, ``bad_inputs_rejected`` (refused *with the
expected reason*), ``bad_input_kinds``, ``rejections`` [{kind, key, reason, by,
rejected}], ``not_rejected``, ``per_backend`` (per scenario: faults, notes,
audit), ``weakness_probes``, and ``targets`` (``benchmarks/_common.py``'s shape): every
federation completed, no corrupt global, no lost and no doubly applied update, every bad input
refused with the expected reason. Exit status 0 when every target holds.

``python benchmarks/faults.py --json [--quick]`` prints it on stdout (logs on
stderr). ``--quick`` (what ``tests/faults`` runs, about 2 minutes on 2 cores):
the folder backend's three combined scenarios and the in-process probes, plus a
5 s S3 outage. The full run (about 6 minutes): both backends, every scenario
(S3 adds ``upload_kill``), a 20 s outage. ``--backend`` and ``--only`` select.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pickle  # only to *write* a hostile payload; nothing here or in fedfs ever unpickles
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedfs import layout  # noqa: E402
from fedfs.protocol.documents import canonical_json  # noqa: E402
from fedfs.errors import FedfsError, NotFound, ValidationError  # noqa: E402
from fedfs.federation import Federation, config_from_key_dir  # noqa: E402
from fedfs.protocol.schema import (  # noqa: E402
    BlobRef,
    GlobalManifest,
    Heartbeat,
    StatusDocument,
    UpdateManifest,
)
from fedfs.trust.signing import generate_keypair, load_identity  # noqa: E402
from fedfs.store import open_store  # noqa: E402

if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))  # benchmarks/_common.py: the output shape
from _common import benchmark_output, target  # noqa: E402

ROUNDS = 3
SITES = {"A": {"cases": 6, "seed": 1}, "B": {"cases": 3, "seed": 2}, "C": {"cases": 1, "seed": 3}}
HOSTILE_SITE = "M"
POLL_S = 0.3
CLOCK_OFFSET_S = 5 * 3600
FAULT_EXIT = 137
NORM_LIMIT = 5.0


def log(*args: Any) -> None:
    print("[faults]", *args, file=sys.stderr, flush=True)


# ---- backends -------------------------------------------------------------------
class Stall:
    """WSGI middleware for the moto server: holds matching PUTs so a test can kill the uploader mid-request."""

    def __init__(self, app) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.rules: list[dict[str, Any]] = []

    def arm(self, path_part: str, seconds: float) -> threading.Event:
        hit = threading.Event()
        with self.lock:
            self.rules.append({"part": path_part, "seconds": seconds, "hit": hit})
        return hit

    def __call__(self, environ, start_response):
        if environ.get("REQUEST_METHOD") == "PUT":
            path = environ.get("PATH_INFO", "")
            with self.lock:
                rule = next((r for r in self.rules if r["part"] in path), None)
                if rule is not None:
                    self.rules.remove(rule)
            if rule is not None:
                rule["hit"].set()
                time.sleep(rule["seconds"])
        return self.app(environ, start_response)


class MotoS3:
    """moto's ThreadedMotoServer on 127.0.0.1 in this process; can be stopped and started on the same port."""

    def __init__(self) -> None:
        self.server = None
        self.port = 0
        self.stall: Stall | None = None

    def start(self) -> None:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.stall = Stall(self.server._server.app)
        self.server._server.app = self.stall  # werkzeug calls server.app per request
        self.port = self.server.get_host_and_port()[1]

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def new_bucket(self) -> str:
        import boto3

        name = f"fedfs-faults-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=self.endpoint).create_bucket(Bucket=name)
        return f"s3://{name}/fed"


@dataclass
class Backend:
    name: str  # "folder" or "s3"
    moto: MotoS3 | None = None

    def new_url(self, root: Path) -> str:
        if self.name == "folder":
            return str(root / "bucket")
        assert self.moto is not None
        return self.moto.new_bucket()

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"endpoint_url": self.moto.endpoint} if self.moto else {}

    def env(self) -> dict[str, str]:
        env = {"FEDFS_STORAGE_OPTIONS": json.dumps(self.storage_options)} if self.moto else {}
        return env


def aws_env() -> None:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


@contextlib.contextmanager
def backend(name: str):
    """A ready backend; for S3 a moto server that lives as long as the context."""
    if name == "folder":
        yield Backend("folder")
        return
    aws_env()
    moto = MotoS3()
    moto.start()
    try:
        yield Backend("s3", moto)
    finally:
        moto.stop()


def outage(moto: MotoS3, seconds: float) -> dict[str, Any]:
    """Stop the S3 server for ``seconds`` and start it again on the same port; check the data survived."""
    import boto3

    client = boto3.client("s3", endpoint_url=moto.endpoint)
    probe_bucket = f"fedfs-probe-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=probe_bucket)
    client.put_object(Bucket=probe_bucket, Key="before-outage", Body=b"still here")
    moto.stop()
    t0 = time.time()
    time.sleep(seconds)
    moto.start()
    kept = client.get_object(Bucket=probe_bucket, Key="before-outage")["Body"].read() == b"still here"
    return {"down_s": round(time.time() - t0, 1), "data_kept": kept}


# ---- federation set-up ------------------------------------------------------------
def make_keys(folder: Path, sites: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, role in [("agg", "aggregator")] + [(s, "site") for s in sites]:
        if not (folder / f"{name}.key").exists():
            generate_keypair(name, role, folder)
    return folder


def create_federation(url: str, keys: Path, sites: list[str], opts: dict[str, Any], **settings: Any) -> Federation:
    config, agg = config_from_key_dir(keys, sites, rounds=ROUNDS, **settings)
    fed, _ = Federation.create(url, config, agg, storage_options=opts)
    return fed


# ---- parties as processes ------------------------------------------------------------
@dataclass
class Party:
    name: str
    cmd: list[str]
    faults: list[str]  # FEDFS_FAULTS for the 1st, 2nd... start ("" = none)
    log_path: Path
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    starts: int = 0
    exits: list[int] = field(default_factory=list)
    finished: bool = False

    def start(self) -> None:
        spec = self.faults[self.starts] if self.starts < len(self.faults) else ""
        env = {**self.env, "FEDFS_FAULTS": spec} if spec else dict(self.env)
        if not spec:
            env.pop("FEDFS_FAULTS", None)
        with open(self.log_path, "ab") as fh:
            fh.write(f"--- start {self.starts + 1} FEDFS_FAULTS={spec!r}\n".encode())
            self.proc = subprocess.Popen(self.cmd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                         start_new_session=True, cwd=str(ROOT))
        self.starts += 1

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def tail(self, n: int = 2500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def party_command(role: str, url: str, key: Path, workdir: Path, *, prefix: list[str] | None = None,
                  **opts: Any) -> list[str]:
    cmd = list(prefix or []) + [sys.executable, "-m", "fedfs.testing.toy_party", role, url, "--key", str(key),
                                "--workdir", str(workdir), "--poll-interval", str(POLL_S)]
    for k, v in opts.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    return cmd


# ---- scenarios -------------------------------------------------------------------------
@dataclass
class Scenario:
    name: str
    kill_training: str | None = None  # site SIGKILLed when its heartbeat says training round 1
    site_faults: dict[str, str] = field(default_factory=dict)
    agg_faults: list[str] = field(default_factory=list)
    delay_s: dict[str, float] = field(default_factory=dict)
    second_aggregator: bool = False
    clock: dict[str, str] = field(default_factory=dict)  # site -> "faketime" | "env"
    outage_s: float = 0.0
    upload_kill: bool = False  # S3: kill site A and the aggregator while their payload PUT is held
    hostile: bool = False
    settings: dict[str, Any] = field(default_factory=dict)  # federation.json settings


def scenarios(backend_name: str, quick: bool) -> list[Scenario]:
    clock = {"B": "env", "C": "faketime" if shutil.which("faketime") else "env"}
    crashes = Scenario("crashes", kill_training="A", delay_s={"A": 1.0},
                       site_faults={"B": "site.after_upload@2", "C": "site.before_publish@1"},
                       agg_faults=["aggregator.before_manifest@2", "aggregator.after_manifest@1"])
    concurrency = Scenario("concurrency", second_aggregator=True, clock=clock)
    # rounds slow enough for phase two; the update-norm plausibility check on (honest toy rounds move < 1 x)
    hostile = Scenario("hostile", hostile=True, delay_s={"C": 1.0}, settings={"update_norm_limit": NORM_LIMIT})
    if backend_name == "folder":
        return [crashes, concurrency, hostile]
    outage_s = 5.0 if quick else 20.0
    if quick:
        return [Scenario("outage", outage_s=outage_s, delay_s={"A": 0.5})]
    return [crashes, concurrency, hostile, Scenario("outage", outage_s=outage_s, delay_s={"A": 0.5}),
            Scenario("upload_kill", upload_kill=True)]


@dataclass
class RunResult:
    backend: str
    scenario: str
    completed: bool = False
    duration_s: float = 0.0
    faults_injected: list[str] = field(default_factory=list)
    faults_missed: list[str] = field(default_factory=list)
    unexpected_exits: list[dict[str, Any]] = field(default_factory=list)
    audit: dict[str, Any] = field(default_factory=dict)
    hostile: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str = ""


def _status_rejections(fed: Federation, key: str) -> dict[str, str]:
    try:
        st = fed.bucket.read(key, StatusDocument).doc
    except (NotFound, ValidationError):
        return {}
    return {r.key: r.reason for r in st.rejected}


def run_federation(be: Backend, sc: Scenario, root: Path, *, timeout_s: float) -> RunResult:
    """Run one federation under scenario ``sc``; return what happened and the audit."""
    res = RunResult(be.name, sc.name)
    t_start = time.time()
    root.mkdir(parents=True, exist_ok=True)
    sites = sorted(SITES) + ([HOSTILE_SITE] if sc.hostile else [])
    keys = make_keys(root / "keys", sites)
    url = be.new_url(root)
    opts = be.storage_options
    fed = create_federation(url, keys, sites, opts, **sc.settings)
    env = {**os.environ, **be.env(), "FEDFS_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    parties: dict[str, Party] = {}
    agg_names = ["agg"] + (["agg2"] if sc.second_aggregator else [])
    for a in agg_names:
        parties[a] = Party(a, party_command("aggregator", url, keys / "agg.key", root / f"w-{a}"),
                           list(sc.agg_faults) if a == "agg" else [], root / f"{a}.log", env)
    for s, spec in SITES.items():
        prefix, penv = None, dict(env)
        if sc.clock.get(s) == "faketime":
            prefix = ["faketime", "-f", f"+{CLOCK_OFFSET_S // 3600}h"]
            penv["FAKETIME_DONT_FAKE_MONOTONIC"] = "1"
        elif sc.clock.get(s) == "env":
            penv["FEDFS_TOY_CLOCK_OFFSET_S"] = str(-CLOCK_OFFSET_S if s == "B" else CLOCK_OFFSET_S)
        parties[s] = Party(s, party_command("site", url, keys / f"{s}.key", root / f"w-{s}", prefix=prefix,
                                            cases=spec["cases"], seed=spec["seed"],
                                            delay_s=sc.delay_s.get(s, 0.0)),
                           [sc.site_faults[s]] if s in sc.site_faults else [], root / f"{s}.log", penv)
    planned = [f"{p.name}:{f.split('@')[0]}" for p in parties.values() for f in p.faults if f]
    planned += [f"{sc.kill_training}:sigkill-training"] if sc.kill_training else []
    planned += ["agg2:concurrent-aggregator"] if sc.second_aggregator else []
    planned += [f"{s}:clock-{how}" for s, how in sc.clock.items()]
    planned += [f"s3:outage-{sc.outage_s:g}s"] if sc.outage_s else []
    planned += ["A:sigkill-during-upload", "agg:sigkill-during-upload"] if sc.upload_kill else []
    injected: list[str] = []
    for s, how in sc.clock.items():
        injected.append(f"{s}:clock-{how}")
    if sc.second_aggregator:
        injected.append("agg2:concurrent-aggregator")

    hostile = Hostile(fed, keys, root / "hostile") if sc.hostile else None
    outage_result: dict[str, Any] = {}
    outage_thread: threading.Thread | None = None
    upload_hits: dict[str, threading.Event] = {}
    if sc.upload_kill and be.moto is not None:
        upload_hits["A"] = be.moto.stall.arm("/fed/sites/A/blobs/", 4.0)
        upload_hits["agg"] = be.moto.stall.arm("/fed/aggregator/blobs/", 4.0)  # v0 reuses A's init: 1st = v1
    killed_training = False
    restarts_left = {n: 6 for n in parties}
    try:
        for p in parties.values():
            p.start()
        if hostile is not None:
            hostile.start_setup()
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            # scheduled faults and attacks, driven by what the bucket shows
            if sc.kill_training and not killed_training:
                hb = _read_quiet(fed, layout.site_heartbeat(sc.kill_training), Heartbeat)
                if hb is not None and hb.phase == "training" and hb.round == 1:
                    time.sleep(0.3)
                    parties[sc.kill_training].kill()
                    injected.append(f"{sc.kill_training}:sigkill-training")
                    killed_training = True
            for who, hit in list(upload_hits.items()):
                if hit.is_set():
                    time.sleep(0.5)
                    parties[who].kill()
                    injected.append(f"{who}:sigkill-during-upload")
                    upload_hits.pop(who)
            if sc.outage_s and outage_thread is None and _exists_quiet(fed, layout.global_version(1)):
                def do_outage() -> None:
                    outage_result.update(outage(be.moto, sc.outage_s))

                outage_thread = threading.Thread(target=do_outage, daemon=True)
                outage_thread.start()
                injected.append(f"s3:outage-{sc.outage_s:g}s")
            if hostile is not None:
                hostile.advance()
            # supervise: restart what died (an injected crash, or anything else, as systemd would)
            for name, p in parties.items():
                rc = p.proc.poll() if p.proc else None
                if p.finished or rc is None:
                    continue
                if rc == 0:
                    p.finished = True
                    continue
                p.exits.append(rc)
                text = p.tail(6000).rsplit("--- start", 1)[-1]
                if rc == FAULT_EXIT and "fault injected at " in text:
                    injected.append(f"{name}:{text.rsplit('fault injected at ', 1)[-1].split()[0]}")
                elif rc != -signal.SIGKILL:  # our own SIGKILLs are counted where they are sent
                    res.unexpected_exits.append({"party": name, "rc": rc, "log": _last_error(text)})
                if restarts_left[name] <= 0:
                    raise RuntimeError(f"{name} keeps failing: {_last_error(text)}")
                restarts_left[name] -= 1
                p.start()
            if all(p.finished for p in parties.values()) and (hostile is None or hostile.done()):
                break
            time.sleep(0.1)
        else:
            res.error = "timeout: " + "; ".join(f"{n}: {_last_error(p.tail())}" for n, p in parties.items()
                                                if p.proc and p.proc.poll() is None)
    except Exception as exc:  # noqa: BLE001 - report, never hang the suite
        res.error = f"{type(exc).__name__}: {exc}"
    finally:
        for p in parties.values():
            p.kill()
        if hostile is not None:
            hostile.stop()
        if outage_thread is not None:
            outage_thread.join(timeout=sc.outage_s + 30)
    res.duration_s = round(time.time() - t_start, 1)
    logs = {n: p.tail(10**7) for n, p in parties.items()}
    retried = sum(t.count("storage trouble, will retry") for t in logs.values())
    if retried:
        res.notes.append(f"storage errors retried by the parties' run loops: {retried}")
    if sc.second_aggregator:
        res.notes.append("aggregations each aggregator ran (the loser's identical publish is a no-op): "
                         + ", ".join(f"{a}={logs[a].count('aggregated: v')}" for a in agg_names))
    if outage_result:
        res.notes.append(f"S3 outage: {outage_result}")
        if not outage_result.get("data_kept"):
            res.error = res.error or "the restarted moto server lost its data"
    res.faults_injected = injected
    res.faults_missed = [f for f in planned if f not in injected]
    res.audit = audit(fed, honest_sites=sorted(SITES))
    res.completed = not res.error and res.audit["finished"] and all(p.finished for p in parties.values())
    if hostile is not None:
        res.hostile = hostile.verdicts(_status_rejections(fed, layout.AGG_STATUS), res.audit)
    return res


def _read_quiet(fed: Federation, key: str, cls):
    try:
        return fed.bucket.read(key, cls).doc
    except Exception:  # noqa: BLE001 - not written yet, or the store is down: ask again later
        return None


def _exists_quiet(fed: Federation, key: str) -> bool:
    try:
        return fed.store.exists(key)
    except Exception:  # noqa: BLE001
        return False


def _last_error(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    errs = [ln for ln in lines if "Error" in ln or "error" in ln or "Traceback" in ln]
    return (errs[-1] if errs else (lines[-1] if lines else ""))[-400:]


# ---- the audit ---------------------------------------------------------------------------
def audit(fed: Federation, honest_sites: list[str]) -> dict[str, Any]:
    """Integrity of what the federation left in the bucket (see the module docstring)."""
    import torch

    from fedfs.weights.tensors import load_weights, validate_update

    from fedfs.trust.bucket import Bucket

    store = fed.store
    b = Bucket(store, fed.config)  # a fresh view: what the bucket holds now, nothing remembered
    tmp = Path(tempfile.mkdtemp(prefix="fedfs-audit-"))
    corrupt: list[dict[str, Any]] = []
    manifests: dict[int, GlobalManifest] = {}
    try:
        versions = sorted({v for v in (layout.parse_version_key(k) for k in store.list(layout.GLOBALS_PREFIX))
                           if v is not None})  # a slot's alternatives share its version
        final_at = None
        ref_shapes = None
        for v in versions:
            try:
                m = b.read(layout.global_version(v), GlobalManifest).doc
            except NotFound:  # only junk at that version's slot (recorded in b.junk): no global there
                continue
            except ValidationError as exc:
                corrupt.append({"version": v, "reason": f"manifest does not verify: {exc}"})
                continue
            manifests[v] = m
            if final_at is not None:
                corrupt.append({"version": v, "reason": f"published after the final v{final_at}"})
            if m.final and final_at is None:
                final_at = v
        blobs: dict[str, str] = {}

        def fetch(ref: BlobRef) -> str:
            if ref.sha256 not in blobs:
                blobs[ref.sha256] = b.get_blob_file(ref, str(tmp / f"{ref.sha256}.safetensors"))
            return blobs[ref.sha256]

        for v, m in sorted(manifests.items()):
            try:
                path = fetch(m.blob)
                info = validate_update(path, expected=ref_shapes)
                if ref_shapes is None:
                    ref_shapes = info.shapes()
                if v == 0:
                    continue
                if not m.contributions:
                    prev = manifests.get(v - 1)
                    if prev is None or prev.blob.sha256 != m.blob.sha256:
                        corrupt.append({"version": v, "reason": "no contributions, yet not the previous global"})
                    continue
                got, _ = load_weights(path)
                acc: dict[str, torch.Tensor] = {}
                total = 0.0
                for c in m.contributions:
                    upd = b.read(c.key, UpdateManifest).doc
                    if (upd.site, upd.round, upd.blob.sha256) != (c.site, c.round, c.sha256):
                        raise ValidationError(f"contribution {c.key} names {c.sha256[:12]}, the update {upd.blob.sha256[:12]}")
                    x, _ = load_weights(fetch(upd.blob))
                    total += c.weight
                    for k, t in x.items():
                        acc[k] = acc.get(k, 0) + c.weight * t.double()
                for k, t in got.items():
                    expect = acc[k] / total
                    if not torch.allclose(t.double(), expect, rtol=1e-5, atol=1e-6):
                        diff = float((t.double() - expect).abs().max())
                        raise ValidationError(f"tensor {k!r} is not the weighted mean of its contributions "
                                              f"(max abs diff {diff:.3g})")
            except (ValidationError, KeyError, OSError, FedfsError) as exc:
                corrupt.append({"version": v, "reason": str(exc)[:300]})
        applied = Counter((c.site, c.round) for m in manifests.values() for c in m.contributions)
        duplicates = sorted(f"{s}/r{r}" for (s, r), n in applied.items() if n > 1)
        rejected = _status_rejections(fed, layout.AGG_STATUS)
        listed_keys = {c.key for m in manifests.values() for c in m.contributions}
        lost, published = [], 0
        for site in honest_sites:
            slots = {layout.slot_primary(k) for k in store.list(layout.site_updates_prefix(site))
                     if layout.parse_update_key(k) is not None}
            for slot in sorted(slots):
                try:
                    key = b.read(slot, UpdateManifest).key  # the slot's value (junk beside it is skipped)
                except (NotFound, ValidationError):
                    continue  # no valid update there (hostile files only): the rejection check covers them
                published += 1
                if key not in listed_keys and key not in rejected:
                    lost.append(key)
        final = manifests.get(final_at) if final_at is not None else None
        return {
            "finished": final is not None and final.version == ROUNDS,
            "final_version": final_at,
            "versions": len(manifests),
            "corrupt_globals_published": len(corrupt),
            "corrupt": corrupt,
            "accepted_updates_lost": len(lost),
            "lost": lost,
            "duplicate_updates_applied": len(duplicates),
            "duplicates": duplicates,
            "updates_published": published,
            "contributions": sum(applied.values()),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- hostile inputs ---------------------------------------------------------------------------
# kind -> substring the rejection reason must contain (case-insensitive): the *right* reason, not any
EXPECT: dict[str, tuple[str, ...]] = {
    "wrong_dtype_kind": ("is I64",),
    "nan_tensor": ("contains NaN",),
    "inf_tensor": ("contains Inf",),
    "wrong_shape": ("has shape",),
    "wrong_dtype": ("has dtype 'I32'",),
    "extra_tensor": ("unexpected tensor",),
    "missing_tensor": ("missing tensor",),
    "truncated_payload": ("truncated",),
    "truncated_size": ("the manifest says",),
    "bitflip_payload": ("does not match",),
    "digest_mismatch": ("/blobs/<its sha256>", "does not match"),
    "digest_mismatch_content": ("does not match",),
    "forged_signature": ("does not verify",),
    "unsigned": ("not signed",),
    "wrong_party": ("only site 'M' may write here",),
    "wrong_role": ("signed as role 'aggregator'",),
    "unknown_schema_version": ("unknown schema_version 2",),
    "oversized_json": ("byte limit",),
    "oversized_header": ("exceeds",),
    "pickle_as_safetensors": ("pickle",),
    "torch_save_as_safetensors": ("zip archive",),
    "traversal_blob_key": ("unsafe segment",),
    "traversal_blob_sha": ("sha256",),
    "traversal_site_field": ("path separator",),
    "implausible_norm": ("implausible update",),
    "future_base_version": ("newer than the current", "does not exist", "not found"),
    "nan_in_json": ("NaN",),
    "duplicate_json_key": ("duplicate JSON key",),
    "replay_round": ("replayed",),
    "replay_stale_base": ("late",),
    "replay_round_site_key": ("replayed",),
    "store_garbage_in_site_folder": ("malformed",),
    # found by the hostile-bucket trial (issue: hardening); each once stopped a party
    "deep_nesting_json": ("levels deep", "too deep"),
    "huge_integer_literal": ("digits",),
    "wider_dtype_huge": ("declared architecture says",),
    "payload_not_in_own_folder": ("is not in site 'M'", "is not in site M's folder"),
}


class Hostile:
    """The attacker: holds M's key (and, for "valid signature" attacks, uses real keys), writes with the bare store."""

    def __init__(self, fed: Federation, keys: Path, workdir: Path) -> None:
        self.fed = fed
        self.store = fed.store
        self.bucket = fed.bucket
        self.keys = keys
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.M = load_identity(keys / f"{HOSTILE_SITE}.key")
        self.tried: list[dict[str, str]] = []  # {kind, key}
        self.phase = 0
        self.next_round, self.next_alt = 0, 0  # M's next update slot and alternative
        self._stop = threading.Event()
        self._setup: threading.Thread | None = None
        self._setup_error = ""

    # M's honest set-up, in a thread: the federation waits for M's census, fingerprint and plans
    def start_setup(self) -> None:
        from fedfs.roles.site import Site
        from fedfs.testing.toy import ToyWork

        def run() -> None:
            try:
                site = Site(self.fed.as_party(self.keys / f"{HOSTILE_SITE}.key"),
                            ToyWork(HOSTILE_SITE, cases=2, seed=9), self.dir / "site-M")
                while not self._stop.is_set() and not site.state.planned:
                    if site.step().action == "wait":
                        time.sleep(POLL_S)
            except Exception as exc:  # noqa: BLE001
                self._setup_error = f"{type(exc).__name__}: {exc}"

        self._setup = threading.Thread(target=run, daemon=True)
        self._setup.start()

    def stop(self) -> None:
        self._stop.set()
        if self._setup is not None:
            self._setup.join(timeout=30)

    def done(self) -> bool:
        return self.phase >= 2

    def advance(self) -> None:
        """Phase 1 once v0 is out: M's update chain. Phase 2 once v1 is out: stale and replayed updates."""
        if self._setup_error:
            raise RuntimeError(f"the hostile site's set-up failed: {self._setup_error}")
        if self.phase == 0 and _exists_quiet(self.fed, layout.global_version(0)):
            self.phase_one()
            self.phase = 1
        elif self.phase == 1 and _exists_quiet(self.fed, layout.global_version(1)):
            self.phase_two()
            self.phase = 2

    # -- helpers
    def _identity(self, name: str):
        return load_identity(self.keys / f"{name}.key")

    def _blob(self, data: bytes, sha: str | None = None) -> BlobRef:
        sha = sha or hashlib.sha256(data).hexdigest()
        key = layout.site_blob(HOSTILE_SITE, sha)
        self.store.write_bytes(key, data)
        return BlobRef(key=key, sha256=sha, size=len(data))

    def _update_body(self, blob: BlobRef | dict[str, Any], *, round_: int, base: int = 0, **over: Any) -> dict[str, Any]:
        body = {"kind": "update", "schema_version": 1, "site": HOSTILE_SITE, "round": round_, "base_version": base,
                "blob": {"key": blob.key, "sha256": blob.sha256, "size": blob.size} if isinstance(blob, BlobRef) else blob, "num_cases": 2, "plans_digest": "",
                "metrics": {"train_loss": 0.5}}
        body.update(over)
        return body

    def _post(self, kind: str, data: bytes, key: str | None = None) -> str:
        """Publish ``data`` at ``key``, by default M's next update slot. As the protocol has it, a file that
        is not a valid manifest does not take the round: M's next file goes to that slot's next alternative."""
        own = key is None
        key = key or layout.slot_candidate(layout.site_update(HOSTILE_SITE, self.next_round), self.next_alt)
        self.store.publish(key, data)
        parsed = layout.parse_update_key(key)
        if parsed is not None:  # as a site does, so the aggregator's poll looks there (layout.INBOX)
            self.store.write_bytes(layout.inbox_marker(*parsed), b"")
        if own:
            try:
                self.bucket.read_exact(key, UpdateManifest)
                self.next_round, self.next_alt = self.next_round + 1, 0
            except ValidationError:
                self.next_alt += 1
        self.tried.append({"kind": kind, "key": key})
        return key

    def _signed(self, kind: str, body: dict[str, Any], who: str = HOSTILE_SITE, role: str | None = None) -> str:
        ident = self._identity(who)
        if role is not None:
            from dataclasses import replace

            ident = replace(ident, role=role)
        return self._post(kind, canonical_json(ident.sign(body)))

    def _tensors(self) -> dict[str, Any]:
        from fedfs.weights.tensors import load_weights

        v0 = self.bucket.read(layout.global_version(0), GlobalManifest).doc
        path = self.bucket.get_blob_file(v0.blob, str(self.dir / "v0.safetensors"))
        return load_weights(path)[0]

    @staticmethod
    def _st(tensors: dict[str, Any]) -> bytes:
        from safetensors.torch import save

        return save({k: v.contiguous() for k, v in tensors.items()}, metadata={"site": HOSTILE_SITE})

    def phase_one(self) -> None:
        import torch

        # first, so the aggregator meets it well before the federation's last round (B's keys past its last)
        self._post("store_garbage_in_site_folder", b"\x00\x01garbage{", key=layout.site_update("B", ROUNDS))

        base = self._tensors()
        k0 = sorted(base)[0]
        # r0 must be the one that passes every per-file check, so it is chosen for v1 and refused by the
        # aggregation itself (a float tensor sent as integers)
        t = dict(base)
        t[k0] = torch.zeros_like(base[k0], dtype=torch.int64)
        self._signed("wrong_dtype_kind", self._update_body(self._blob(self._st(t)), round_=self.next_round))

        def variant(kind: str, change: Callable[[dict[str, Any]], None]) -> None:
            x = {k: v.clone() for k, v in base.items()}
            change(x)
            self._signed(kind, self._update_body(self._blob(self._st(x)), round_=self.next_round))

        variant("nan_tensor", lambda x: x[k0].view(-1).__setitem__(0, float("nan")))
        variant("inf_tensor", lambda x: x[k0].view(-1).__setitem__(0, float("inf")))
        variant("wrong_shape", lambda x: x.__setitem__(k0, torch.zeros(x[k0].numel() + 1)))
        variant("wrong_dtype", lambda x: x.__setitem__(k0, torch.zeros_like(x[k0], dtype=torch.int32)))
        variant("implausible_norm", lambda x: [v.mul_(1000.0) for v in x.values()])
        variant("extra_tensor", lambda x: x.__setitem__("extra.weight", torch.zeros(3)))
        variant("wider_dtype_huge", lambda x: x.__setitem__(k0, x[k0].double() * 1e300))
        variant("missing_tensor", lambda x: x.pop(k0))

        good = self._st({k: v * 1.01 for k, v in base.items()})
        half = good[: len(good) // 2]
        self._signed("truncated_payload", self._update_body(self._blob(half), round_=self.next_round))
        other = self._st({k: v * 1.02 for k, v in base.items()})
        sha_other = hashlib.sha256(other).hexdigest()
        ref = self._blob(other[: len(other) - 64], sha=sha_other)  # stored truncated under the full file's name
        self._signed("truncated_size", self._update_body({"key": ref.key, "sha256": sha_other, "size": len(other)},
                                                         round_=self.next_round))
        third = self._st({k: v * 1.03 for k, v in base.items()})
        flipped = bytearray(third)
        flipped[-5] ^= 0x10
        ref = self._blob(bytes(flipped), sha=hashlib.sha256(third).hexdigest())
        self._signed("bitflip_payload", self._update_body(ref, round_=self.next_round))
        real = self._blob(good)
        wrong = hashlib.sha256(b"another file").hexdigest()
        self._signed("digest_mismatch", self._update_body({"key": real.key, "sha256": wrong, "size": real.size},
                                                          round_=self.next_round))
        ref = self._blob(good, sha=wrong)
        self._signed("digest_mismatch_content", self._update_body(ref, round_=self.next_round))

        env = self._identity(HOSTILE_SITE).sign(self._update_body(real, round_=self.next_round))
        env["body"]["num_cases"] = 1000
        self._post("forged_signature", canonical_json(env))
        env = self._identity(HOSTILE_SITE).sign(self._update_body(real, round_=self.next_round))
        env.pop("signature")
        self._post("unsigned", canonical_json(env))
        self._signed("wrong_party", self._update_body(real, round_=self.next_round, site="A"), who="A")
        self._signed("wrong_role", self._update_body(real, round_=self.next_round), role="aggregator")
        body = self._update_body(real, round_=self.next_round)
        body["schema_version"] = 2
        self._signed("unknown_schema_version", body)
        doc = canonical_json(self._identity(HOSTILE_SITE).sign(self._update_body(real, round_=self.next_round)))
        self._post("oversized_json", doc[:-1] + b" " * (17 * 1024 * 1024) + doc[-1:])
        header = json.dumps({"__metadata__": {"pad": "x" * (17 * 1024 * 1024)}}).encode()
        self._signed("oversized_header", self._update_body(
            self._blob(len(header).to_bytes(8, "little") + header), round_=self.next_round))
        self._signed("pickle_as_safetensors", self._update_body(
            self._blob(pickle.dumps({k: v.tolist() for k, v in base.items()}, protocol=4)), round_=self.next_round))
        buf = self.dir / "torch_save.pt"
        torch.save(base, buf)
        self._signed("torch_save_as_safetensors", self._update_body(self._blob(buf.read_bytes()),
                                                                    round_=self.next_round))
        self._signed("traversal_blob_key", self._update_body(
            {"key": f"sites/{HOSTILE_SITE}/blobs/../../A/blobs/{real.sha256}.safetensors", "sha256": real.sha256,
             "size": real.size}, round_=self.next_round))
        self._signed("traversal_site_field", self._update_body(real, round_=self.next_round, site="../A"))
        self._signed("future_base_version", self._update_body(real, round_=self.next_round, base=999))
        raw = canonical_json(self._identity(HOSTILE_SITE).sign(self._update_body(real, round_=self.next_round)))
        self._post("nan_in_json", raw.replace(b'"train_loss":0.5', b'"train_loss":NaN'))
        self._post("duplicate_json_key", raw.replace(b'{"body"', b'{"role":"site","body"', 1))
        self._post("deep_nesting_json", b"[" * 100_000 + b"]" * 100_000)
        self._post("huge_integer_literal", raw.replace(b'"num_cases":2', b'"num_cases":' + b"9" * 5000, 1))
        ghost = self._st({k: v * 1.04 for k, v in base.items()})  # never uploaded: named from M's folder
        self._signed("payload_not_in_own_folder", self._update_body(
            {"key": layout.site_blob(HOSTILE_SITE, hashlib.sha256(ghost).hexdigest()),
             "sha256": hashlib.sha256(ghost).hexdigest(), "size": len(ghost)}, round_=self.next_round))
        # a valid signed file from M (r0), copied byte for byte to a newer round's key
        self._post("replay_round", self.store.read_bytes(layout.site_update(HOSTILE_SITE, 0)))

    def phase_two(self) -> None:
        """With v1 out: a valid, correctly bound update from M that names v0 (stale), and A's r0 re-posted
        at A's first unused round key by the bare store."""
        init = self.dir / "site-M" / "updates" / "init.safetensors"
        x = init.read_bytes()
        ref = self._blob(x)
        self._signed("replay_stale_base", self._update_body(ref, round_=self.next_round, base=0))
        # a sha256 field that is a relative path: a reader that names local files after it without checking
        # it is hex would take a file already on its own disk (here the aggregator's own v1 output) as M's update
        self._signed("traversal_blob_sha", self._update_body(
            {"key": f"sites/{HOSTILE_SITE}/blobs/none", "sha256": "../out/v000001/global.safetensors", "size": 1},
            round_=self.next_round, base=1))
        a0 = self.store.read_bytes(layout.site_update("A", 0))
        key = layout.site_update("A", ROUNDS)  # never used by A itself: it sends rounds 0..ROUNDS-1
        self._post("replay_round_site_key", a0, key=key)

    def verdicts(self, rejections: dict[str, str], audit_result: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        for t in self.tried:
            reason = rejections.get(t["key"], "")
            want = EXPECT[t["kind"]]
            out.append({"kind": t["kind"], "key": t["key"], "by": "aggregator", "reason": reason,
                        "rejected": any(w.lower() in reason.lower() for w in want),
                        "expected_reason": " or ".join(want)})
        return out


# ---- federation.json with a path traversal in a site name ------------------------------------
def federation_json_traversal(be: Backend, root: Path) -> dict[str, Any]:
    """A federation.json (validly signed) naming a site ``../evil``: a party must refuse to start."""
    from fedfs.protocol.schema import FederationConfig, Party

    keys = make_keys(root / "keys", sorted(SITES))
    url = be.new_url(root)
    agg = load_identity(keys / "agg.key")
    a = load_identity(keys / "A.key")
    config = FederationConfig(federation_id="evil", mode="ffe", configuration="2d",
                              aggregator=Party(name="agg", role="aggregator", public_key=agg.public_key_b64),
                              sites=[Party(name="A", role="site", public_key=a.public_key_b64),
                                     Party(name="../evil", role="site", public_key=a.public_key_b64)])
    store = open_store(url, be.storage_options)
    store.publish(layout.FEDERATION, canonical_json(agg.sign(config.to_dict())))  # unvalidated, on purpose
    env = {**os.environ, **be.env(), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(party_command("site", url, keys / "A.key", root / "w-A", max_idle_s=5), env=env,
                          capture_output=True, text=True, timeout=120, cwd=str(ROOT))
    reason = next((ln for ln in proc.stderr.splitlines() if "error" in ln.lower()), proc.stderr[-300:])
    wrote = [k for k in store.list("") if k != layout.FEDERATION]
    ok = proc.returncode != 0 and "path separator" in reason and not wrote
    return {"kind": "traversal_federation_json", "key": layout.FEDERATION, "by": "site A (refused to start)",
            "reason": reason.strip(), "rejected": ok, "expected_reason": "path separator",
            "exit_code": proc.returncode, "files_written": wrote}


# ---- bad globals offered to a site (in process) ----------------------------------------------
def in_process_federation(be: Backend, root: Path, until_version: int) -> tuple[Any, Path, Any, dict[str, Any]]:
    """The honest sites and an aggregator in this process, stepped in turn until global
    ``until_version`` is published: ``(federation, keys folder, aggregator, {site: Site})``."""
    from fedfs.roles.aggregator import Aggregator
    from fedfs.roles.site import Site
    from fedfs.testing.toy import ToyWork

    keys = make_keys(root / "keys", sorted(SITES))
    fed = create_federation(be.new_url(root), keys, sorted(SITES), be.storage_options)
    agg = Aggregator(fed.as_party(keys / "agg.key"), root / "w-agg")
    sites = {s: Site(fed.as_party(keys / f"{s}.key"), ToyWork(s, cases=v["cases"], seed=v["seed"]), root / f"w-{s}")
             for s, v in SITES.items()}
    for _ in range(12):
        agg.step()
        if fed.store.exists(layout.global_version(until_version)):
            return fed, keys, agg, sites
        for s in sites.values():
            s.step()
    raise RuntimeError(f"the probe federation did not reach v{until_version}")


def site_probes(be: Backend, root: Path) -> list[dict[str, Any]]:
    """Bad globals written into aggregator/ by a party holding a site key or bucket access.

    A small federation is driven in process to v1 with B not yet trained from it; then
    each probe writes one bad thing, steps a copy of site B, and checks that B neither
    trained from it nor crashed without saying why: the key and a reason must be in
    ``sites/B/status.json``. The bad file is removed again before the next probe.
    """
    from fedfs.roles.site import Site
    from fedfs.testing.toy import ToyWork

    fed, keys, _agg, _sites = in_process_federation(be, root, until_version=1)
    store, b = fed.store, fed.bucket
    v1 = b.read(layout.global_version(1), GlobalManifest)
    v1_raw = store.read_bytes(layout.global_version(1))
    out = []

    def probe(kind: str, key: str, write: Callable[[], None], undo: Callable[[], None], expect: str,
              bad_version: int) -> None:
        work = root / f"probe-{kind}"
        shutil.copytree(root / "w-B", work)
        for f in (work / "globals").glob("*"):
            f.unlink()
        write()
        site = Site(fed.as_party(keys / "B.key"), ToyWork("B", cases=3, seed=2), work)
        before = store.list(layout.site_updates_prefix("B"))
        error = ""
        try:
            for _ in range(2):
                site.step()
        except Exception as exc:  # noqa: BLE001 - what the site does with it is the result
            error = f"{type(exc).__name__}: {exc}"
        new = [k for k in store.list(layout.site_updates_prefix("B")) if k not in before]
        # trained from the bad global? (B may train from the newest *valid* one: junk at v2's key is no global)
        trained = any(b.read_exact(k, UpdateManifest).doc.base_version == bad_version for k in new)
        recorded = _status_rejections(fed, layout.site_status("B")).get(key, "")
        undo()
        for k in store.list(layout.site_updates_prefix("B")):
            if k not in before:
                store.delete(k)
        out.append({"kind": kind, "key": key, "by": "site B", "reason": recorded,
                    "rejected": not trained and expect.lower() in recorded.lower(), "expected_reason": expect,
                    "consumed": trained, "site_error": error[:300]})

    v2 = layout.global_version(2)
    body = GlobalManifest(version=2, blob=v1.doc.blob, next_rounds={s: 2 for s in SITES}).to_dict()
    probe("global_signed_by_site", v2,
          lambda: store.publish(v2, canonical_json(load_identity(keys / "A.key").sign(body))),
          lambda: store.delete(v2), "only the aggregator may write here", 2)
    env = json.loads(v1_raw)
    env["body"]["version"] = 2
    probe("global_forged_signature", v2, lambda: store.publish(v2, canonical_json(env)),
          lambda: store.delete(v2), "does not verify", 2)
    blob_key = v1.doc.blob.key
    good = store.read_bytes(blob_key)
    flipped = bytearray(good)
    flipped[-3] ^= 0x01
    probe("global_payload_bitflip", blob_key, lambda: store.write_bytes(blob_key, bytes(flipped)),
          lambda: store.write_bytes(blob_key, good), "sha256", 1)
    return out


# ---- attacks by a member that fedfs does not (yet) refuse: reported, not counted as bad inputs --------
def weakness_probes(be: Backend, root: Path) -> list[dict[str, Any]]:
    """What a member holding its own valid key can still do, measured in process.

    After v0, M posts two updates trained "from v0": r0 is a byte copy of B's r0
    payload (free riding), r1 valid weights claiming 10**6 cases. Then a manifest
    signed by a site is put at the next global version's key before the aggregator
    publishes it. Each probe says whether fedfs refused it (``refused``) and what happened.
    """
    from fedfs.roles.aggregator import Aggregator
    from fedfs.roles.site import Site
    from fedfs.testing.toy import ToyWork

    names = sorted(SITES) + [HOSTILE_SITE]
    keys = make_keys(root / "keys", names)
    url = be.new_url(root)
    fed = create_federation(url, keys, names, be.storage_options)
    agg = Aggregator(fed.as_party(keys / "agg.key"), root / "w-agg")
    specs = {**SITES, HOSTILE_SITE: {"cases": 2, "seed": 9}}
    sites = {s: Site(fed.as_party(keys / f"{s}.key"), ToyWork(s, cases=v["cases"], seed=v["seed"]), root / f"w-{s}")
             for s, v in specs.items()}
    store, b = fed.store, fed.bucket
    for _ in range(12):
        agg.step()
        if store.exists(layout.global_version(0)):
            break
        for s in sites.values():
            s.step()
    for s in SITES:
        sites[s].step()  # r0 from v0, published
    m = load_identity(keys / f"{HOSTILE_SITE}.key")
    b_r0 = b.read(layout.site_update("B", 0), UpdateManifest).doc
    data = store.read_bytes(b_r0.blob.key)
    copy = BlobRef(key=layout.site_blob(HOSTILE_SITE, b_r0.blob.sha256), sha256=b_r0.blob.sha256, size=len(data))
    store.write_bytes(copy.key, data)
    b.publish(layout.site_update(HOSTILE_SITE, 0), UpdateManifest(site=HOSTILE_SITE, round=0, base_version=0, blob=copy,
                                                                  num_cases=2), m)
    own = root / "w-M" / "updates" / "init.safetensors"
    ref = b.put_blob_file(lambda sha, ext: layout.site_blob(HOSTILE_SITE, sha, ext), str(own))
    b.publish(layout.site_update(HOSTILE_SITE, 1), UpdateManifest(site=HOSTILE_SITE, round=1, base_version=0, blob=ref,
                                                                  num_cases=10**6), m)
    for r in (0, 1):  # the aggregator's poll looks where markers say (fedfs.protocol.layout.INBOX)
        store.write_bytes(layout.inbox_marker(HOSTILE_SITE, r), b"")
    agg.step()
    v1 = b.read(layout.global_version(1), GlobalManifest).doc
    listed = [(c.site, c.round, round(c.weight, 3)) for c in v1.contributions]
    rejected = _status_rejections(fed, layout.AGG_STATUS)
    total = sum(c.weight for c in v1.contributions)
    m_share = sum(c.weight for c in v1.contributions if c.site == HOSTILE_SITE) / total
    out = [
        {"probe": "copied_payload", "refused": layout.site_update(HOSTILE_SITE, 0) in rejected,
         "correctly_attributed": ("B", 0) in {(s, r) for s, r, _ in listed}
         and ("M", 0) in {(s, r) for s, r, _ in listed} and len(listed) == len(set((s, r) for s, r, _ in listed)),
         "detail": f"v1 lists {listed}: M's r0 is a byte copy of B's r0 payload"},
        {"probe": "two_updates_from_one_global", "refused": sum(s == HOSTILE_SITE for s, _, _ in listed) <= 1,
         "detail": f"M's r0 and r1 both name v0; v1 lists M {sum(s == HOSTILE_SITE for s, _, _ in listed)} time(s)"},
        {"probe": "inflated_num_cases", "refused": layout.site_update(HOSTILE_SITE, 1) in rejected,
         "detail": f"M's census says 2 cases, its r1 claims 10**6: M holds {m_share:.6f} of v1's weight"},
    ]
    # a manifest signed by a site at the next global's key, before the aggregator gets there
    for s in SITES:
        sites[s].step()
    v2 = layout.global_version(2)
    store.publish(v2, canonical_json(load_identity(keys / "A.key").sign(
        GlobalManifest(version=2, blob=v1.blob, next_rounds={}).to_dict())))
    steps = []
    for _ in range(2):
        try:
            steps.append(str(agg.step())[:160])
        except Exception as exc:  # noqa: BLE001
            steps.append(f"raised {type(exc).__name__}: {str(exc)[-160:]}")
    out.append({"probe": "forged_global_at_next_version", "refused": v2 in _status_rejections(fed, layout.AGG_STATUS),
                "detail": f"aggregator steps: {steps}"})
    out.append({"probe": "audit_of_this_bucket", "refused": None,
                "detail": {k: v for k, v in audit(fed, honest_sites=sorted(SITES)).items()
                           if k in ("corrupt", "lost", "duplicates")}})
    out += _restart_and_squat_probes(be, root / "restart")
    return out


def _restart_and_squat_probes(be: Backend, root: Path) -> list[dict[str, Any]]:
    """(1) C's update is rejected (NaN), the aggregator restarts before A and B report: does the sync
    round still close? (2) Garbage written with the bare store at B's next update key: can B go on?"""
    from fedfs.roles.aggregator import Aggregator
    from fedfs.weights.tensors import load_weights, save_weights

    fed, keys, agg, sites = in_process_federation(be, root, until_version=0)
    work_c = sites["C"].work
    real_train = work_c.train_round

    def diverged(global_path: str, epochs: int, update_path: str) -> dict[str, float]:
        metrics = real_train(global_path, epochs, update_path)
        t, _ = load_weights(update_path)
        next(iter(t.values())).view(-1)[0] = float("nan")
        save_weights(update_path, t)
        return metrics

    work_c.train_round = diverged
    sites["C"].step()
    first = str(agg.step())
    agg2 = Aggregator(fed.as_party(keys / "agg.key"), root / "w-agg")  # the restart
    sites["A"].step()
    sites["B"].step()
    after = [str(agg2.step())[:140] for _ in range(2)]
    closed = fed.store.exists(layout.global_version(1))
    out = [{"probe": "rejected_update_then_aggregator_restart", "refused": None, "round_closed": closed,
            "detail": f"before the restart: {first[:140]!r}; after: {after}"}]
    # (2) squatting: B's next key taken by garbage before B publishes r1
    if closed:
        fed.store.publish(layout.site_update("B", 1), b"not json")
        try:
            res = str(sites["B"].step())
        except Exception as exc:  # noqa: BLE001
            res = f"raised {type(exc).__name__}: {str(exc)[-200:]}"
        from fedfs.protocol.schema import UpdateManifest

        landed = fed.bucket.published(layout.site_update("B", 1), UpdateManifest)
        out.append({"probe": "garbage_at_honest_site_next_key", "refused": None,
                    "site_can_continue": not res.startswith("raised") and landed is not None
                    and landed.doc.round == 1 and landed.key != layout.site_update("B", 1),
                    "detail": f"site B step: {res}; r1 lies at {landed.key if landed else None}"})
    return out


# ---- the whole suite ----------------------------------------------------------------------------
def summarize(runs: list[RunResult], extra_rejections: list[dict[str, Any]],
              weaknesses: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    verdicts = [h for r in runs for h in r.hostile] + extra_rejections
    per_backend: dict[str, Any] = {}
    for r in runs:
        pb = per_backend.setdefault(r.backend, {"federations_run": 0, "federations_completed": 0, "faults_injected": 0,
                                                "corrupt_globals_published": 0, "accepted_updates_lost": 0,
                                                "duplicate_updates_applied": 0, "runs": []})
        pb["federations_run"] += 1
        pb["federations_completed"] += int(r.completed)
        pb["faults_injected"] += len(r.faults_injected)
        for k in ("corrupt_globals_published", "accepted_updates_lost", "duplicate_updates_applied"):
            pb[k] += r.audit.get(k, 0)
        pb["runs"].append({
            "scenario": r.scenario, "completed": r.completed, "duration_s": r.duration_s,
            "faults_injected": r.faults_injected, "faults_missed": r.faults_missed,
            "unexpected_exits": r.unexpected_exits, "error": r.error, "notes": r.notes,
            "audit": {k: v for k, v in r.audit.items()},
        })
    return {
        "federations_run": len(runs),
        "federations_completed": sum(r.completed for r in runs),
        "faults_injected": sum(len(r.faults_injected) for r in runs),
        "faults_missed": sum(len(r.faults_missed) for r in runs),
        "unexpected_exits": sum(len(r.unexpected_exits) for r in runs),
        "corrupt_globals_published": sum(r.audit.get("corrupt_globals_published", 0) for r in runs),
        "accepted_updates_lost": sum(r.audit.get("accepted_updates_lost", 0) for r in runs),
        "duplicate_updates_applied": sum(r.audit.get("duplicate_updates_applied", 0) for r in runs),
        "bad_inputs_tried": len(verdicts),
        "bad_inputs_rejected": sum(bool(v["rejected"]) for v in verdicts),
        "bad_input_kinds": len({v["kind"] for v in verdicts}),
        "rejections": [{k: v[k] for k in ("kind", "key", "reason", "by", "rejected")} for v in verdicts],
        "not_rejected": [v for v in verdicts if not v["rejected"]],
        "per_backend": per_backend,
        "weakness_probes": weaknesses or [],
    }


def run_suite(*, quick: bool, root: Path | None = None, backends: tuple[str, ...] | None = None,
              only: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Every scenario of the (quick) suite; returns the summary JSON object."""
    root = Path(root or tempfile.mkdtemp(prefix="fedfs-faults-"))
    backends = backends or ("folder", "s3")
    timeout_s = 150.0 if quick else 300.0
    runs: list[RunResult] = []
    extra: list[dict[str, Any]] = []
    weaknesses: list[dict[str, Any]] = []
    t0 = time.time()
    for name in backends:
        with backend(name) as be:
            for sc in scenarios(name, quick):
                if only and sc.name not in only:
                    continue
                log(f"{name}/{sc.name} ...")
                r = run_federation(be, sc, root / name / sc.name, timeout_s=timeout_s)
                log(f"{name}/{sc.name}: completed={r.completed} in {r.duration_s} s, faults {r.faults_injected}"
                    + (f", ERROR {r.error}" if r.error else ""))
                runs.append(r)
            if name == "folder" or not quick:
                if not only or "federation_json" in only:
                    extra.append(federation_json_traversal(be, root / name / "federation_json"))
                if not only or "site_probes" in only:
                    extra += site_probes(be, root / name / "site_probes")
                if not only or "weakness_probes" in only:
                    weaknesses += [{"backend": name, **w} for w in weakness_probes(be, root / name / "weakness")]
    out = summarize(runs, extra, weaknesses)
    out["quick"] = quick
    out["duration_s"] = round(time.time() - t0, 1)
    out["clock_skew_mechanism"] = "faketime (libfaketime) and FEDFS_TOY_CLOCK_OFFSET_S" if shutil.which(
        "faketime") else "FEDFS_TOY_CLOCK_OFFSET_S only (libfaketime not installed)"
    return benchmark_output("faults", out, check_targets(out))


def check_targets(out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every federation finished, the bucket's integrity held, and every bad input was refused for its reason."""
    def zero(name: str) -> dict[str, Any]:
        return target(f"{name} == 0", out[name], out[name] == 0)

    return {
        "federations_completed": target(f"federations_completed == federations_run ({out['federations_run']})",
                                        out["federations_completed"],
                                        out["federations_completed"] == out["federations_run"]),
        **{name: zero(name) for name in ("corrupt_globals_published", "accepted_updates_lost",
                                         "duplicate_updates_applied")},
        "bad_inputs_rejected": target(
            f"bad inputs refused with the expected reason == bad_inputs_tried ({out['bad_inputs_tried']})",
            out["bad_inputs_rejected"], out["bad_inputs_rejected"] == out["bad_inputs_tried"]),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--quick", action="store_true", help="the folder backend's combined scenarios and a 5 s S3 outage")
    p.add_argument("--backend", action="append", choices=["folder", "s3"], help="only this backend (repeatable)")
    p.add_argument("--only", action="append", help="only this scenario (repeatable)")
    p.add_argument("--keep", default=None, help="work folder to keep (default: a temporary one, removed)")
    args = p.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fedfs-faults-"))
    try:
        out = run_suite(quick=args.quick, root=root, backends=tuple(args.backend) if args.backend else None,
                        only=tuple(args.only) if args.only else None)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    text = json.dumps(out, indent=None if args.json else 2, sort_keys=False)
    print(text)
    return 0 if out["all_targets_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
