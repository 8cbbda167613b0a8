"""``fedfs doctor``: does this bucket work from this machine?

Runs real operations under a private probe prefix and reports each check:
write, list, read back, exclusive publish (a second publish must fail, and of
several concurrent publishers exactly one may win), a sha256 round trip of a
1 MiB payload, the latency of small writes and reads, and, if the bucket holds
a federation, whether ``federation.json`` verifies. Probe files are removed
afterwards where the credentials allow it. First it checks the free space of the
folders this machine writes to (a folder bucket, the temp folder, a workdir): a warning
below :data:`LOW_SPACE_BYTES` or :data:`LOW_SPACE_FRACTION` of the disk, not usable
below :data:`FULL_BYTES` (a full disk fails every write, often half-way).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import statistics
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..protocol import layout
from ..errors import Conflict, FedfsError
from ..store import Store

__all__ = ["Check", "DoctorReport", "FULL_BYTES", "LOW_SPACE_BYTES", "LOW_SPACE_FRACTION", "check_state",
           "run_doctor", "space_checks"]

#: Free space below which doctor warns (bytes), or below this fraction of the disk.
LOW_SPACE_BYTES = 5 * 1024**3
LOW_SPACE_FRACTION = 0.10
#: Free space below which a folder is not usable: not even a manifest or the probes fit.
FULL_BYTES = 16 * 1024**2


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    warn: bool = False  # usable, but someone should look (low free space)


def check_state(c: Check) -> str:
    """"ok", "warn" or "FAIL", as the report prints it."""
    return "FAIL" if not c.ok else "warn" if c.warn else "ok"


@dataclass
class DoctorReport:
    url: str
    backend: str
    publish_mechanism: str
    checks: list[Check] = field(default_factory=list)
    latency_ms: dict[str, float] = field(default_factory=dict)
    federation: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    def render(self) -> str:
        lines = [f"fedfs doctor: {self.url}", f"  backend: {self.backend} (exclusive publish by {self.publish_mechanism})"]
        for c in self.checks:
            lines.append(f"  [{check_state(c)}] {c.name}: {c.detail}")
        if self.latency_ms:
            lines.append(
                "  latency: small write {write_ms:.1f} ms, small read {read_ms:.1f} ms (median of {n:.0f})".format(**self.latency_ms)
            )
        if self.federation:
            f = self.federation
            lines.append(f"  federation: {f['mode']} {f['configuration']}, sites {', '.join(f['sites'])}, "
                         f"aggregator {f['aggregator']}, sha256 {f['digest'][:16]}...")
        warned = "; ".join(f"{c.name}: {c.detail}" for c in self.checks if c.ok and c.warn)
        lines.append("  verdict: " + (("usable" + (f" (warning: {warned})" if warned else "")) if self.ok
                                      else "NOT usable: " + "; ".join(
            f"{c.name}: {c.detail}" for c in self.checks if not c.ok)))
        return "\n".join(lines)


def _gib(n: float) -> str:
    return f"{n / 1024**3:.1f} GiB"


def space_checks(folders: list[str]) -> list[Check]:
    """Free space of each folder's disk (once per disk); a folder not yet made counts as its parent."""
    out: list[Check] = []
    seen: set[int] = set()
    for folder in folders:
        p = Path(folder).absolute()
        while not p.exists() and p != p.parent:
            p = p.parent
        try:
            dev = p.stat().st_dev
            if dev in seen:
                continue
            seen.add(dev)
            total, _used, free = shutil.disk_usage(p)
        except OSError as exc:
            out.append(Check(f"free space {folder}", False, f"cannot read the disk's usage: {exc}"))
            continue
        pct = 100.0 * free / total if total else 0.0
        detail = f"{_gib(free)} free of {_gib(total)} ({pct:.0f} %)"
        if free < FULL_BYTES:
            out.append(Check(f"free space {folder}", False, f"{detail}: the disk is full; free space there "
                                                            "(old globals: see `fedfs init --keep-globals`)"))
        elif free < LOW_SPACE_BYTES or free < LOW_SPACE_FRACTION * total:
            out.append(Check(f"free space {folder}", True, f"{detail}: low (below {_gib(LOW_SPACE_BYTES)} or "
                                                           f"{LOW_SPACE_FRACTION:.0%}); a round needs a few "
                                                           "model sizes", warn=True))
        else:
            out.append(Check(f"free space {folder}", True, detail))
    return out


def run_doctor(store: Store, *, probe_prefix: str | None = None, racers: int = 4, samples: int = 5,
               folders: tuple[str, ...] = ()) -> DoctorReport:
    """Exercise ``store`` and return a report; never raises for a failing check. ``folders``:
    local folders whose free space to check besides a folder bucket and the temp folder."""
    prefix = probe_prefix or f"doctor/{_safe(socket.gethostname())}-{uuid.uuid4().hex[:12]}"
    layout.check_key(prefix)
    report = DoctorReport(url=store.url, backend=type(store).__name__, publish_mechanism=getattr(store, "publish_mechanism", "?"))
    written: list[str] = []

    def check(name: str, fn: Any) -> Any:
        try:
            ok, detail, value = fn()
        except FedfsError as exc:
            ok, detail, value = False, str(exc), None
        except Exception as exc:  # a doctor reports, it does not crash
            ok, detail, value = False, f"{type(exc).__name__}: {exc}", None
        report.checks.append(Check(name, ok, detail))
        return value

    local = getattr(store, "local_path", None)
    report.checks.extend(space_checks(([local] if isinstance(local, str) else []) + [tempfile.gettempdir(),
                                                                                    *folders]))
    probe = f"{prefix}/probe.txt"
    payload = f"fedfs doctor {uuid.uuid4().hex}".encode()

    def do_write():
        store.write_bytes(probe, payload)
        written.append(probe)
        return True, f"wrote {probe}", None

    def do_list():
        keys = store.list(prefix + "/")
        ok = probe in keys
        return ok, f"listed {len(keys)} key(s) under {prefix}/" if ok else f"{probe} missing from listing {keys}", None

    def do_read():
        data = store.read_bytes(probe)
        return data == payload, "read back identical bytes" if data == payload else "read back different bytes", None

    def do_exclusive():
        key = f"{prefix}/exclusive.json"
        store.publish(key, b'{"first":true}')
        written.append(key)
        try:
            store.publish(key, b'{"second":true}')
            return False, "a second publish of the same key succeeded: publish is NOT exclusive", None
        except Conflict:
            pass
        kept = store.read_bytes(key) == b'{"first":true}'
        if not kept:
            return False, "the second publish overwrote the first", None
        return True, "second publish refused, first content kept", None

    def do_race():
        key = f"{prefix}/race.json"
        wins, conflicts, errors = [], [], []
        barrier = threading.Barrier(racers)

        def racer(i: int) -> None:
            barrier.wait()
            try:
                store.publish(key, f'{{"writer":{i}}}'.encode())
                wins.append(i)
            except Conflict:
                conflicts.append(i)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(f"{type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=racer, args=(i,)) for i in range(racers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        written.append(key)
        ok = len(wins) == 1 and len(conflicts) == racers - 1
        if ok:
            ok = store.read_bytes(key) == f'{{"writer":{wins[0]}}}'.encode()
        detail = f"{racers} concurrent publishers: {len(wins)} won, {len(conflicts)} refused"
        if errors:
            detail += f", errors: {errors[0]}"
        return ok, detail, None

    def do_sha():
        key = f"{prefix}/blob.bin"
        data = os.urandom(1024 * 1024)
        store.write_bytes(key, data)
        written.append(key)
        back = store.read_bytes(key)
        same = hashlib.sha256(back).hexdigest() == hashlib.sha256(data).hexdigest()
        return same, "1 MiB sha256 round trip matches" if same else "1 MiB payload came back different", None

    def do_latency():
        key = f"{prefix}/latency.txt"
        w, r = [], []
        for i in range(samples):
            t0 = time.perf_counter()
            store.write_bytes(key, str(i).encode())
            t1 = time.perf_counter()
            store.read_bytes(key)
            r.append(time.perf_counter() - t1)
            w.append(t1 - t0)
        written.append(key)
        report.latency_ms = {"write_ms": statistics.median(w) * 1e3, "read_ms": statistics.median(r) * 1e3, "n": samples}
        return True, f"median small write {report.latency_ms['write_ms']:.1f} ms, read {report.latency_ms['read_ms']:.1f} ms", None

    check("write", do_write)
    if not report.checks[-1].ok:  # unreachable or read-only: the other checks would only repeat it
        report.checks.append(Check("other checks", False, "not run: the bucket cannot be written"))
        return report
    check("list", do_list)
    check("read back", do_read)
    check("exclusive publish", do_exclusive)
    check("concurrent exclusive publish", do_race)
    check("sha256 round trip", do_sha)
    check("latency", do_latency)
    report.publish_mechanism = getattr(store, "publish_mechanism", report.publish_mechanism)
    _federation_check(store, report)
    for key in written:
        try:
            store.delete(key)
        except Exception:  # noqa: BLE001 - a site may lack delete rights; probes are harmless
            pass
    return report


def _federation_check(store: Store, report: DoctorReport) -> None:
    try:
        exists = store.exists(layout.FEDERATION)
    except FedfsError:
        return
    if not exists:
        report.checks.append(Check("federation.json", True, "none yet (run `fedfs init`)"))
        return
    from ..federation import Federation

    try:
        fed = Federation.open(store)
    except FedfsError as exc:
        report.checks.append(Check("federation.json", False, str(exc)))
        return
    c = fed.config
    report.federation = {"mode": c.mode, "configuration": c.configuration, "sites": c.site_names,
                         "aggregator": c.aggregator.name, "digest": fed.digest}
    report.checks.append(Check("federation.json", True, "signature verifies"))


def _safe(name: str) -> str:
    out = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in name).strip(".-") or "host"
    return out[:40]
