"""What secure aggregation costs over the bucket, against plain FedAvg (issue 17, items 1 and 5).

For an nnU-Net-sized model (the 2D 5-stage network's 88 parameter shapes, 7.8 M float32,
29.6 MiB; ``--quick``: a 1 M-parameter stand-in) and N = 3, 8, 20 sites on a folder bucket:

* ``agg_s`` / ``plain_agg_s``: the aggregator's secure session (three rosters, reading and
  unmasking the masked inputs, decoding the mean, writing it) against plain FedAvg (download
  the N updates, :func:`fedfs.weights.combine.aggregate`, output written);
* ``site_s`` / ``plain_site_s``: one site's four stages (encode, mask, publish) against saving
  and publishing its plain update;
* ``site_bytes`` / ``plain_site_bytes``: bytes one site writes per round (masked payload and
  its manifest; the per-peer stage files separately), and ``*_round_trips``: storage requests
  per round (every read, probe and write);
* ``rel_error``: ||decoded - plain weighted FedAvg|| / ||plain|| (float64 reference);
* recovery from one and two dropouts (sites killed after sharing) at N = 8.

Targets: aggregator time <= 2x plain at N = 8; bytes per site <= 1.1x plain, per-peer files
aside; relative error <= 1e-6; one and two dropouts recovered. ``secagg_section()`` returns the
figures and targets as a dict (benchmarks/privacy.py includes it); ``python
benchmarks/privacy_secagg.py --json [--quick]`` prints them in the one benchmark shape.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # benchmarks/_common.py: the output shape
from _common import benchmark_output, target  # noqa: E402

MB = 1024 * 1024


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


class CountingStore:
    """A store that counts requests and bytes written, per party (``who``)."""

    def __init__(self, store: Any) -> None:
        self._store, self.who = store, "?"
        self.requests: dict[str, int] = {}
        self.written: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if name in ("read_bytes", "exists", "size", "download", "publish", "write_bytes", "upload", "list"):
            def counted(*args: Any, **kw: Any) -> Any:
                self.requests[self.who] = self.requests.get(self.who, 0) + 1
                if name in ("publish", "write_bytes"):
                    self.written[self.who] = self.written.get(self.who, 0) + len(args[1])
                if name == "upload":
                    self.written[self.who] = self.written.get(self.who, 0) + os.path.getsize(args[1])
                return attr(*args, **kw)
            return counted
        return attr


def model(quick: bool, seed: int = 0) -> dict[str, Any]:
    import numpy as np

    if quick:
        shapes = {f"layer{i}.weight": (64, 64, 3, 3) for i in range(27)} | {f"layer{i}.bias": (64,) for i in range(27)}
    else:
        from aggregation import model_shapes

        shapes = model_shapes("2d")
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0, 0.05, s).astype(np.float32) for k, s in shapes.items()}


def federation(root: Path, n: int) -> tuple[Any, dict[str, Any]]:
    from fedfs.testing.toy import toy_federation
    from fedfs.trust.signing import load_identity

    names = [f"S{i:02d}" for i in range(n)]
    fed, _, _ = toy_federation(root, names, mode="fedavg", secure_aggregation=True)
    ids = {s: load_identity(root / "keys" / f"{s}.key") for s in [*names, "agg"]}
    return fed, ids


def plain_round(fed: Any, ids: dict[str, Any], base: dict, updates: dict, weights: dict, root: Path,
                store: CountingStore, rnd: int = 0) -> dict[str, Any]:
    """Plain FedAvg: each site saves and publishes its update; the aggregator downloads and combines."""
    from safetensors.numpy import save_file

    from fedfs.fl.aggregate import Update
    from fedfs.protocol import layout
    from fedfs.protocol.schema import UpdateManifest
    from fedfs.trust.bucket import Bucket
    from fedfs.weights.combine import aggregate

    bucket = Bucket(store, fed.config)
    site_s = {}
    for s, upd in updates.items():
        store.who = s
        t = time.perf_counter()
        path = root / f"plain-{s}.safetensors"
        save_file(upd, str(path), metadata={"num_cases": str(weights[s])})
        ref = bucket.put_blob_file(lambda sha, ext: layout.site_blob(s, sha, ext), str(path))
        bucket.publish(layout.site_update(s, rnd), UpdateManifest(site=s, round=rnd, base_version=0, blob=ref,
                                                                num_cases=weights[s]), ids[s])
        site_s[s] = time.perf_counter() - t
    store.who = "agg"
    t = time.perf_counter()
    files = []
    for s in updates:
        doc = bucket.read(layout.site_update(s, rnd), UpdateManifest).doc
        files.append(Update(s, bucket.get_blob_file(doc.blob, str(root / f"agg-{s}.safetensors")), doc.num_cases))
    aggregate(files, root / "plain-out.safetensors")
    agg_s = time.perf_counter() - t
    return {"site_s": max(site_s.values()), "agg_s": agg_s}


def secure_round(fed: Any, ids: dict[str, Any], base: dict, updates: dict, weights: dict, root: Path,
                 store: CountingStore, session: str, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """One secure session; sites in ``drop`` die after sharing their keys' shares."""
    import numpy as np
    from safetensors.numpy import save_file

    from fedfs.privacy import fixedpoint
    from fedfs.privacy.secagg_rounds import SecureAggregator, SecureSite, session_params
    from fedfs.trust.bucket import Bucket

    fp = fixedpoint.FixedPoint(bits=32, max_abs=4.0)
    bucket = Bucket(store, fed.config)
    params = session_params(fed.config, session)
    total_w = sum(weights.values())
    sites = {s: SecureSite(bucket, ids[s], root / f"w-{s}", params) for s in updates}
    agg = SecureAggregator(bucket, ids["agg"], params)
    site_s = dict.fromkeys(updates, 0.0)
    agg_s = 0.0
    polls: dict[str, int] = {}  # requests of one step that found nothing to do (a daemon's idle poll)
    alive = set(updates)

    def encoded(s: str):
        return lambda: fixedpoint.encode_update(updates[s], base, weights[s], total_w, fp)

    for _ in range(20):
        moved = False
        for s in sorted(alive):
            store.who = s
            while True:
                t, before = time.perf_counter(), store.requests.get(s, 0)
                what = sites[s].step(encoded(s))
                site_s[s] += time.perf_counter() - t
                if what in ("waiting", "done", "excluded"):
                    idle = store.requests[s] - before
                    store.requests[s] = before  # idle polls are counted apart
                    polls["site"] = max(polls.get("site", 0), idle)
                    break
                moved = True
                if what == "shared" and s in drop:
                    alive.discard(s)
                    break
        store.who = "agg"
        t, before = time.perf_counter(), store.requests.get("agg", 0)
        what = agg.step(close=not moved)
        if what == "waiting":
            polls["agg"] = max(polls.get("agg", 0), store.requests["agg"] - before)
            store.requests["agg"] = before
        if what == "done":
            mean, _ = fixedpoint.decode_mean(agg.result, base, total_w, fp)
            save_file(mean, str(root / f"secure-{session}.safetensors"))
        agg_s += time.perf_counter() - t
        if what == "done":
            break
    survivors = [s for s in updates if s not in drop]
    plain = fixedpoint.plain_weighted_mean({s: updates[s] for s in survivors}, weights)
    err = np.sqrt(sum(float(np.sum((mean[k].astype(np.float64) - plain[k]) ** 2)) for k in base))
    norm = np.sqrt(sum(float(np.sum(plain[k] ** 2)) for k in base))
    return {"site_s": max(site_s[s] for s in survivors), "agg_s": agg_s, "rel_error": err / norm,
            "recovered": bool(agg.dropped == sorted(drop) and err / norm <= 1e-6), "step": fp.step,
            "poll_requests": polls}


def idle_poll_requests(fed: Any, ids: dict[str, Any], store: CountingStore) -> int:
    """Storage requests of one aggregator step that finds a session's first stage incomplete."""
    from fedfs.privacy.secagg_rounds import SecureAggregator, session_params
    from fedfs.trust.bucket import Bucket

    store.who = "idle"
    SecureAggregator(Bucket(store, fed.config), ids["agg"], session_params(fed.config, "idle")).step()
    return store.requests.pop("idle")


def measure(n: int, quick: bool, drops: tuple[tuple[str, ...], ...] = (), repeats: int = 3) -> dict[str, Any]:
    import numpy as np

    from fedfs.privacy.secagg_documents import site_stage_key
    from fedfs.protocol import layout

    root = Path(tempfile.mkdtemp(prefix=f"fedfs-secagg-{n}-"))
    try:
        fed, ids = federation(root, n)
        base = model(quick)
        rng = np.random.default_rng(n)
        names = sorted(s for s in ids if s != "agg")
        updates = {s: {k: (g + rng.normal(0, 0.01, g.shape)).astype(np.float32) for k, g in base.items()}
                   for s in names}
        weights = {s: 5 + 3 * i for i, s in enumerate(names)}
        store = CountingStore(fed.store)
        plains, secures = [], []
        for r in range(repeats):  # interleaved repeats, the minimum of each: the machine is shared
            store.requests.clear()
            store.written.clear()
            first = sorted(base)[0]  # a fresh payload each repeat (content-addressed blobs are written once)
            fresh = {s: {**u, first: u[first] + np.float32(r * 1e-6)} for s, u in updates.items()}
            plains.append(plain_round(fed, ids, base, fresh, weights, root, store, rnd=r))
            plain_req, plain_bytes = dict(store.requests), store.written[names[0]]
            store.requests.clear()
            secures.append(secure_round(fed, ids, base, updates, weights, root, store, f"t{r:06d}"))
        plain = {k: min(p[k] for p in plains) for k in ("site_s", "agg_s")}
        secure = {**secures[-1], **{k: min(p[k] for p in secures) for k in ("site_s", "agg_s")}}
        s0 = names[0]
        masked_doc = fed.bucket.read_raw_envelope(site_stage_key(s0, f"t{repeats - 1:06d}", "masked"))["body"]
        masked_bytes = masked_doc["blob"]["size"] + fed.store.size(site_stage_key(s0, f"t{repeats - 1:06d}", "masked"))
        peer_bytes = sum(fed.store.size(site_stage_key(s0, f"t{repeats - 1:06d}", st))
                         for st in ("keys", "shares", "unmask"))
        row = {"n": n, "model_mib": round(sum(a.nbytes for a in base.values()) / MB, 1),
               "plain_agg_s": round(plain["agg_s"], 3), "agg_s": round(secure["agg_s"], 3),
               "agg_ratio": round(secure["agg_s"] / plain["agg_s"], 2),
               "plain_site_s": round(plain["site_s"], 3), "site_s": round(secure["site_s"], 3),
               "plain_site_bytes": plain_bytes, "site_bytes": masked_bytes, "site_peer_file_bytes": peer_bytes,
               "bytes_ratio": round(masked_bytes / plain_bytes, 4),
               "plain_site_round_trips": plain_req[s0], "site_round_trips": store.requests[s0],
               "plain_agg_round_trips": plain_req["agg"], "agg_round_trips": store.requests["agg"],
               "site_idle_poll_requests": secure["poll_requests"].get("site", 0),
               "agg_idle_poll_requests": idle_poll_requests(fed, ids, store),
               "rel_error": float(f"{secure['rel_error']:.3g}"), "fixed_point_step": secure["step"]}
        for i, drop in enumerate(drops):
            d = secure_round(fed, ids, base, updates, weights, root, store, f"d{i:06d}", drop=drop)
            row[f"dropouts_{len(drop)}"] = {"dropped": list(drop), "recovered": d["recovered"],
                                             "rel_error": float(f"{d['rel_error']:.3g}"),
                                             "agg_s": round(d["agg_s"], 3)}
        log(json.dumps(row))
        return row
    finally:
        shutil.rmtree(root, ignore_errors=True)


def secagg_section(quick: bool = False, sizes: tuple[int, ...] = (3, 8, 20)) -> dict[str, Any]:
    """The secure-aggregation figures and targets (a section of benchmarks/privacy.py)."""
    rows = [measure(n, quick, (("S01",), ("S02", "S05")) if n == 8 else ()) for n in sizes]
    at8 = next((r for r in rows if r["n"] == 8), None)
    worst_err = max(r["rel_error"] for r in rows)
    worst_bytes = max(r["bytes_ratio"] for r in rows)
    targets = {
        "agg_time_n8": target("aggregator time with secure aggregation <= 2x plain FedAvg at N=8",
                              at8 and at8["agg_ratio"], bool(at8) and at8["agg_ratio"] <= 2.0),
        "site_bytes": target("bytes per site per round <= 1.1x plain (per-peer stage files aside)",
                             worst_bytes, worst_bytes <= 1.1),
        "rel_error": target("||unmasked mean - plain weighted FedAvg|| / ||plain|| <= 1e-6", worst_err,
                            worst_err <= 1e-6),
        "dropouts": target("one and two dropouts (after sharing) recovered at N=8",
                           "yes" if at8 and at8["dropouts_1"]["recovered"] and at8["dropouts_2"]["recovered"]
                           else "no",
                           bool(at8) and at8["dropouts_1"]["recovered"] and at8["dropouts_2"]["recovered"]),
    }
    return {"secagg": {"model": "1M-parameter stand-in" if quick else "nnU-Net 2D 5-stage (7.8 M float32)",
                       "rows": rows}, "targets": targets}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the JSON object (always printed)")
    ap.add_argument("--quick", action="store_true", help="a 1 M-parameter model instead of the 29.6 MiB one")
    args = ap.parse_args()
    section = secagg_section(quick=args.quick)
    out = benchmark_output("privacy_secagg", {"secagg": section["secagg"]}, section["targets"])
    print(json.dumps(out, indent=2))
    sys.exit(0 if out["all_targets_met"] else 1)


if __name__ == "__main__":
    main()
