"""Hostile inputs for every decoder of bucket bytes (issue 14, total parsing).

Each :class:`Target` is one decoder as a party runs it (the verified bucket read and what
the party does next with the document), with *seeds*: valid inputs produced by the real code
(documents signed by real keys, headers written by :func:`fedfs.weights.header.safetensors_header`
and by the ``safetensors`` library). :func:`make_input` turns a seed into a hostile input with a
``random.Random``: bit flips, truncation, splicing, inserted tokens at the byte level; type swaps,
deleted and unknown fields, big and non-finite numbers, deep nesting, huge arrays and strings at the
JSON level; and the same body mutations *signed* by the right party, so the schema checks behind
the signature are reached too. :func:`run_input` feeds one input to a decoder and says whether
anything but a :class:`~fedfs.errors.ValidationError` escaped (for the ``latest`` hint: anything
at all), how long it took and how much memory it allocated at peak.

``tests/test_fuzz.py`` drives these with hypothesis; ``benchmarks/fuzz.py`` with a seeded PRNG,
100,000 inputs per decoder.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import NotFound, ValidationError
from ..protocol import layout
from ..protocol.documents import canonical_json
from ..trust import signing

__all__ = ["Target", "Outcome", "targets", "make_input", "run_input", "hostile_value", "mutate_bytes"]

FIXED_TIME = "2026-01-01T00:00:00Z"


@dataclass
class Target:
    """One decoder: its name, valid seeds, how to decode, who signs its body (None: unsigned)."""

    name: str
    seeds: list[bytes]
    decode: Callable[[bytes], Any]
    signer: Any = None  # the Identity whose signature the decoder accepts
    header: bool = False  # a safetensors file (8-byte length, JSON header, data), not a JSON document
    allowed: tuple[type[BaseException], ...] = (ValidationError,)


@dataclass
class Outcome:
    """What one input did: the escaped exception (None: success or a ValidationError), time, peak memory."""

    escaped: str | None
    seconds: float
    peak_bytes: int = 0
    rejected: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- seeds made by the real code

def _identity(name: str, role: str) -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"fedfs-fuzz {name}".encode()).digest())
    return signing.Identity(name=name, role=role, private_key=key)


def sign(identity: Any, body: dict[str, Any]) -> dict[str, Any]:
    """``identity.sign(body)`` with a fixed writer token and time, so seeds are the same every run."""
    env = identity.sign(body, writer_token="0" * 32)
    env["signed_at"] = FIXED_TIME
    del env["signature"]
    import base64

    env["signature"] = base64.b64encode(identity.private_key.sign(signing._DOMAIN + canonical_json(env))).decode()
    return env


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _summaries() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Two sites' real FFE summaries (SiteSummaryBuilder) and their merged census."""
    import numpy as np

    from ..fl.fingerprint import SiteSummaryBuilder, merge_census, summarize_samples

    cases = {"A": 3, "B": 2}
    census = merge_census({s: {"num_cases": n, "num_channels": 1} for s, n in cases.items()})
    out = {}
    rng = np.random.default_rng(0)
    for s, n in cases.items():
        b = SiteSummaryBuilder(1, census["total_cases"], 20)
        for i in range(n):
            samples = np.round(rng.normal(100, 20, 20)).astype(np.float32)
            b.add_case([1.0, 0.8 + 0.1 * i], [64, 60 + i], 0.5, [summarize_samples(samples)], "float32")
        out[s] = b.summary()
    return out["A"], out["B"], census


def targets() -> dict[str, Target]:
    """Every decoder of bucket bytes, with seeds; deterministic."""
    from ..federation import Federation
    from ..fl.fingerprint import census_mismatch, merge_census, merge_summaries, validate_federation_census
    from ..ops.bundle_format import BundleFile, BundleManifest
    from ..ops.bundle_import import _verify_manifest
    from ..protocol import schema as s
    from ..store.memory import MemoryStore
    from ..trust.bucket import Bucket
    from ..weights.header import parse_header, safetensors_header

    agg, site_a, site_b = _identity("agg", "aggregator"), _identity("A", "site"), _identity("B", "site")
    config = s.FederationConfig(
        federation_id="f" * 32, mode="ffe", configuration="2d",
        aggregator=s.Party("agg", "aggregator", agg.public_key_b64),
        sites=[s.Party("A", "site", site_a.public_key_b64), s.Party("B", "site", site_b.public_key_b64)],
        rounds=5, created=FIXED_TIME, options={"note": "fuzz"})
    fed_bytes = canonical_json(sign(agg, config.to_dict()))
    fed = Federation(MemoryStore({layout.FEDERATION: fed_bytes}, name="fuzz"), config,
                     hashlib.sha256(fed_bytes).hexdigest())

    sum_a, sum_b, census = _summaries()
    blob_a = s.BlobRef(layout.site_blob("A", _sha("a")), _sha("a"), 120)
    blob_g = s.BlobRef(layout.aggregator_blob(_sha("g")), _sha("g"), 120)
    docs: dict[str, tuple[str, Any, Any]] = {  # target -> (key, document, signer)
        "update": (layout.site_update("A", 1), s.UpdateManifest("A", 1, 1, blob_a, 3, _sha("plans"), {"loss": 0.5}),
                   site_a),
        "global": (layout.global_version(2), s.GlobalManifest(
            2, blob_g, {}, [s.Contribution("A", 1, layout.site_update("A", 1), _sha("a"), 1, 0, 0.6)],
            {"A": 2, "B": 2}, {"note": "r1"}), agg),
        "latest": (layout.LATEST, s.LatestHint(2), agg),
        "site_census": (layout.site_census("A"), s.SiteCensus("A", 3, 1, "2.8.1", 0, {"background": 0, "tumor": 1},
                                                              {"0": "CT"}), site_a),
        "census": (layout.CENSUS, s.Census(census["total_cases"], 1, census["sites"], {}, 0, {"A": 0, "B": 0},
                                           {"background": 0, "tumor": 1}, {"0": "CT"}), agg),
        "fingerprint_summary": (layout.site_fingerprint("A"), s.FingerprintSummary("A", "ffe", 5, sum_a), site_a),
        "global_fingerprint": (layout.GLOBAL_FINGERPRINT, s.GlobalFingerprint(
            merge_summaries({"A": sum_a, "B": sum_b}, census), ["A", "B"], 5, 0, {"A": 0, "B": 0}), agg),
        "plans": (layout.site_plans("A"), s.PlansDocument(
            "A", "nnUNetPlans", "2d", _sha("plans"), {"patch_size": [64, 64], "batch_size": 2,
                                                     "architecture": {"n_stages": 5, "features": [32, 64, 128]}},
            "2.8.1", blob_a, 0), site_a),
        "heartbeat": (layout.site_heartbeat("A"), s.Heartbeat("A", "training", 1, 1, "round r1", {"dice": 0.8}),
                      site_a),
        "status": (layout.AGG_STATUS, s.StatusDocument("agg", [s.Rejection(
            layout.site_update("B", 3), "signature does not verify", FIXED_TIME, ["B"])]), agg),
    }

    def reader(key: str, cls: type, then: Callable[[Any], Any] | None = None) -> Callable[[bytes], Any]:
        def decode(data: bytes) -> Any:
            doc = Bucket(MemoryStore({key: data}, name="fuzz", read_only=True), config).read(key, cls).doc
            return then(doc) if then else doc
        return decode

    def summary_then(doc: Any) -> Any:  # what the aggregator does with a summary it read
        return merge_summaries({"A": doc.summary, "B": sum_b}, census)

    def census_then(doc: Any) -> Any:
        other = {"num_cases": 2, "num_channels": 1, "labels": {"background": 0, "tumor": 1}}
        mine = {"num_cases": doc.num_cases, "num_channels": doc.num_channels, "labels": doc.labels}
        census_mismatch({"A": mine, "B": other})
        return merge_census({"A": mine, "B": other})

    def merged_census_then(doc: Any) -> Any:
        return validate_federation_census({"total_cases": doc.total_cases, "num_channels": doc.num_channels,
                                           "sites": doc.sites}, "census")

    thens = {"fingerprint_summary": summary_then, "site_census": census_then, "census": merged_census_then,
             "global": lambda d: (d.blob_for("A"), d.is_final(config.rounds))}
    out: dict[str, Target] = {}
    for name, (key, doc, who) in docs.items():
        seed = canonical_json(sign(who, doc.to_dict()))
        is_slot = getattr(layout, "is_slot", None)  # a slot's reader skips junk: "no valid document here"
        slot = bool(is_slot and is_slot(key))
        out[name] = Target(name, [seed], reader(key, type(doc), thens.get(name)), who,
                           allowed=(ValidationError, NotFound) if slot else (ValidationError,))

    globals_present = {layout.global_version(v): canonical_json(sign(agg, s.GlobalManifest(
        v, blob_g, {}, [], {"A": v, "B": v}).to_dict())) for v in range(3)}

    def latest(data: bytes) -> Any:  # a hint: whatever it holds, the probe answers (never raises)
        store = MemoryStore({layout.LATEST: data, **globals_present}, name="fuzz", read_only=True)
        return Bucket(store, config).latest_version()

    out["latest"] = Target("latest", out["latest"].seeds, latest, agg, allowed=())

    out["federation"] = Target("federation", [fed_bytes], lambda data: Federation.open(
        MemoryStore({layout.FEDERATION: data}, name="fuzz", read_only=True)).config, agg)

    manifest = BundleManifest(config.federation_id, fed.digest, "from", "A", FIXED_TIME,
                              [BundleFile(layout.site_update("A", 1), _sha("u"), 900),
                               BundleFile(blob_a.key, blob_a.sha256, blob_a.size)])
    out["bundle_manifest"] = Target("bundle_manifest", [canonical_json(sign(site_a, manifest.to_dict()))],
                                    lambda data: _verify_manifest(data, fed, "fuzz.tar"), site_a)

    headers = []
    for entries in ([("conv.weight", "F32", (4, 2, 3, 3)), ("conv.bias", "F32", (4,)),
                     ("bn.num_batches_tracked", "I64", ())],
                    [("a", "F16", (2, 3)), ("b", "BF16", (5,)), ("c", "F64", (1, 1))]):
        head, _ = safetensors_header(entries, {"format": "pt", "fedfs": "fuzz"})
        size = sum(max(1, _numel(sh)) * {"F32": 4, "I64": 8, "F16": 2, "BF16": 2, "F64": 8}[dt]
                   for _, dt, sh in entries)
        headers.append(head + bytes(size))
    try:
        import numpy as np
        from safetensors.numpy import save

        headers.append(save({"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.zeros(1, np.int64)},
                            metadata={"format": "np"}))
    except ImportError:  # pragma: no cover - safetensors ships with fedfs's dependencies
        pass
    out["safetensors_header"] = Target("safetensors_header", headers,
                                       lambda data: parse_header(data, len(data), "fuzz.safetensors"), header=True)

    pool = [seed for t in out.values() if not t.header for seed in t.seeds]
    out["json"] = Target("json", pool + [b'{"a":[1,2.5,"x",null,true,{"b":[]}]}', b"[]", b'"s"', b"0"],
                         lambda data: _loads(data))
    return dict(sorted(out.items()))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _loads(data: bytes) -> Any:
    from ..protocol.documents import loads_strict

    return loads_strict(data, "fuzz.json")


# ---------------------------------------------------------------- mutations

class _Raw(str):
    """JSON text spliced in as is (what json.dumps cannot write: NaN, 5000-digit numbers, lone surrogates)."""


_RAW_TOKENS = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "9" * 5000, "-" + "9" * 400, "1" + "0" * 101,
               "0." + "0" * 200 + "1", "1e-400", '"\\ud800"', '"\\udfff\\ud800"', '"\\u0000"', "-0", "01", "0x10",
               "1.", ".5", "+1", "tru", "nul", '"\\x"', "[" * 65 + "]" * 65, "{" * 3 + "}" * 3,
               '"' + "\\\\" * 50 + '"', "[" * 2000 + "]" * 2000, '{"a":1,"a":2}']
_INTERESTING_INTS = [0, 1, -1, 2, 7, 255, 2**31 - 1, 2**31, 2**53, 2**53 + 1, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1,
                     2**64, 10**18, 10**99, -(10**99)]
_INTERESTING_FLOATS = [0.0, -0.0, 0.5, 1e-310, 5e-324, 1e308, -1e308, 1.7976931348623157e308, 1e100, 1e101, 1e300,
                       3.14159]
_INTERESTING_STRINGS = ["", "A", "B", "agg", "..", "../../etc/passwd", "/abs", "a/b", "sites/A/blobs/" + "0" * 64 +
                        ".safetensors", "0" * 64, "F" * 64, "aggregator", "site", "ffe", "fedfs-signed-v1", "\x00",
                        "é\u2028", "\U0001f600", "x" * 513, "v000001", "F32", "I64", "BOOL", "float64", "float16"]


def hostile_value(rng: random.Random, depth: int = 0) -> Any:
    """One hostile JSON value: an edge number, string, type, container, deep nesting, a huge array or a raw token."""
    r = rng.random()
    if r < 0.2:
        return rng.choice(_INTERESTING_INTS)
    if r < 0.3:
        return rng.choice(_INTERESTING_FLOATS)
    if r < 0.45:
        return rng.choice(_INTERESTING_STRINGS)
    if r < 0.52:
        return rng.choice([None, True, False])
    if r < 0.62:
        return _Raw(rng.choice(_RAW_TOKENS))
    if r < 0.72 and depth < 3:
        return [hostile_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if r < 0.8 and depth < 3:
        return {rng.choice(_INTERESTING_STRINGS + ["k", "kind", "schema_version", "body"]): hostile_value(rng, depth + 1)
                for _ in range(rng.randint(0, 3))}
    if r < 0.87:
        v: Any = rng.choice([0, "x", None, {}])
        for _ in range(rng.choice([2, 10, 63, 64, 65, 100, 200])):  # deeper: the raw tokens
            v = [v] if rng.random() < 0.7 else {"a": v}
        return v
    big = rng.random() < 0.05  # the megabyte-sized ones are rare: they cost milliseconds each
    if r < 0.93:
        n = 100_000 if big else rng.choice([10, 100, 1000])
        return rng.choice([[0] * n, [0.5] * n, ["a"] * n, [[]] * n, list(range(n))])
    if r < 0.97:
        return "x" * (1_000_000 if big else rng.choice([100, 1000, 10_000]))
    return {f"k{i}": i for i in range(10_000 if big else 100)}


def _paths(value: Any, prefix: tuple = (), out: list | None = None, depth: int = 0) -> list[tuple]:
    out = [] if out is None else out
    out.append(prefix)
    if depth > 8:
        return out
    if isinstance(value, dict):
        for k, v in list(value.items())[:40]:
            _paths(v, prefix + (k,), out, depth + 1)
    elif isinstance(value, list):
        for i, v in list(enumerate(value))[:12]:
            _paths(v, prefix + (i,), out, depth + 1)
    return out


def _swap(value: Any, rng: random.Random) -> Any:
    """The same content in another type: 3 -> "3", 3.0, true, [3]; "x" -> ["x"], {"x": ...}; ..."""
    if isinstance(value, bool):
        return rng.choice([int(value), str(value).lower(), None])
    if isinstance(value, int):
        return rng.choice([str(value), float(value), value != 0, [value], -value, value + 1, value * 2**40])
    if isinstance(value, float):
        return rng.choice([int(value) if abs(value) < 1e18 else 0, str(value), [value], -value, value * 1e300])
    if isinstance(value, str):
        return rng.choice([[value], {value: value}, value[:-1], value + value, value.upper(), len(value), None])
    if isinstance(value, list):
        return rng.choice([{"0": value}, value[:1], value * 3, list(reversed(value)), [value], None, len(value)])
    if isinstance(value, dict):
        return rng.choice([list(value.values()), list(value), {}, {**value, "extra": 1}, None, [value]])
    return rng.choice([0, "", [], {}])


def mutate_value(value: Any, rng: random.Random, ops: int | None = None) -> Any:
    """A copy of a parsed JSON ``value`` with 1-3 structural mutations at random places."""
    value = json.loads(json.dumps(value))
    for _ in range(ops or rng.choice([1, 1, 1, 2, 3])):
        paths = _paths(value)
        path = rng.choice(paths)
        if not path:
            value = hostile_value(rng) if rng.random() < 0.5 else _swap(value, rng)
            continue
        parent = value
        for p in path[:-1]:
            parent = parent[p]
        last = path[-1]
        op = rng.random()
        if op < 0.4:
            parent[last] = hostile_value(rng)
        elif op < 0.7:
            parent[last] = _swap(parent[last], rng)
        elif op < 0.85:
            del parent[last]
        elif isinstance(parent, dict):
            parent[rng.choice(["extra", "kind", "schema_version", "signature", "", "é"])] = hostile_value(rng)
        else:
            parent.insert(last, hostile_value(rng))
    return value


def dumps_hostile(value: Any, rng: random.Random | None = None) -> bytes:
    """JSON bytes of ``value`` with every :class:`_Raw` spliced in as raw text."""
    raws: list[str] = []

    def walk(v: Any) -> Any:
        if isinstance(v, _Raw):
            raws.append(str(v))
            return f"\x00raw{len(raws) - 1}\x00"
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        return v

    text = json.dumps(walk(value), ensure_ascii=False, separators=(",", ":"), allow_nan=True)
    for i, raw in enumerate(raws):
        text = text.replace(json.dumps(f"\x00raw{i}\x00"), raw)
    return text.encode("utf-8", "surrogatepass")


_BYTE_TOKENS = [b"{", b"}", b"[", b"]", b'"', b"\\", b",", b":", b"0", b"-", b"e", b"\x00", b"\xff", b"\xc3",
                b"\xed\xa0\x80", b"\xef\xbb\xbf", b"null", b"true", b"NaN", b"1e999", b"9" * 5000, b"[" * 10_000,
                b"{\"a\":" * 500, b'"\\ud800"', b" " * 1000, b"\\u0000"]


def mutate_bytes(data: bytes, rng: random.Random, pool: list[bytes]) -> bytes:
    """1-4 byte-level mutations: bit flips, byte sets, truncation, deletion, insertion, splicing, repeats."""
    buf = bytearray(data)
    for _ in range(rng.choice([1, 1, 2, 3, 4])):
        n = len(buf)
        pos = rng.randrange(n + 1)
        op = rng.random()
        if op < 0.2 and n:
            i = rng.randrange(n)
            buf[i] ^= 1 << rng.randrange(8)
        elif op < 0.3 and n:
            buf[rng.randrange(n)] = rng.choice(b'{}[]",:0-e\x00\xff\\ ')
        elif op < 0.42:
            del buf[pos:]
        elif op < 0.52:
            del buf[pos:pos + rng.randint(1, 64)]
        elif op < 0.67:
            buf[pos:pos] = rng.choice(_BYTE_TOKENS)
        elif op < 0.75:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif op < 0.87 and pool:
            other = rng.choice(pool)
            j = rng.randrange(len(other) + 1)
            buf = buf[:pos] + bytearray(other[j:] if rng.random() < 0.5 else other[:j])
        elif n:
            i = rng.randrange(n)
            chunk = buf[i:i + rng.randint(1, 32)]
            buf[pos:pos] = chunk * rng.choice([2, 10, 1000])
    return bytes(buf)


def _envelope_or_none(seed: bytes) -> dict[str, Any] | None:
    try:
        env = json.loads(seed)
    except ValueError:
        return None
    return env if isinstance(env, dict) and isinstance(env.get("body"), dict) else None


def _header_parts(seed: bytes) -> tuple[Any, bytes]:
    n = int.from_bytes(seed[:8], "little")
    return json.loads(seed[8:8 + n]), seed[8 + n:]


def make_input(target: Target, rng: random.Random, pool: list[bytes] | None = None) -> bytes:
    """One hostile input for ``target``: a seed mutated at the byte level, at the JSON level, re-signed,
    or generated from nothing."""
    seed = rng.choice(target.seeds)
    pool = pool or target.seeds
    mode = rng.random()
    if mode < 0.05:
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
    if mode < 0.1:
        return dumps_hostile(hostile_value(rng))
    if mode < 0.45:
        return mutate_bytes(seed, rng, pool)
    if target.header:
        header, data = _header_parts(seed)
        raw = dumps_hostile(mutate_value(header, rng))
        if rng.random() < 0.2:
            raw = mutate_bytes(raw, rng, [])
        n = len(raw) if rng.random() < 0.9 else rng.choice([0, 1, len(raw) + 1, 2**63, 2**64 - 1])
        return n.to_bytes(8, "little") + raw + (data if rng.random() < 0.8 else data[: rng.randrange(len(data) + 1)])
    env = _envelope_or_none(seed)
    if env is not None and target.signer is not None and mode < 0.75:
        body = mutate_value(env["body"], rng)
        if isinstance(body, dict) and not _has_raw(body) and rng.random() < 0.9:
            try:
                return canonical_json(sign(target.signer, body))
            except (ValueError, TypeError, RecursionError):  # a body json cannot write (a lone surrogate)
                pass
        return dumps_hostile({**env, "body": body})
    return dumps_hostile(mutate_value(json.loads(seed), rng))


def _has_raw(value: Any) -> bool:
    if isinstance(value, _Raw):
        return True
    if isinstance(value, dict):
        return any(_has_raw(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_raw(v) for v in value)
    return False


def run_input(target: Target, data: bytes, *, trace_memory: bool = False) -> Outcome:
    """Decode ``data`` with ``target``; report what escaped (None: success or an allowed rejection)."""
    if trace_memory:
        tracemalloc.start()
    t0 = time.perf_counter()
    escaped, rejected = None, False
    try:
        target.decode(data)
    except target.allowed:
        rejected = True
    except BaseException as exc:  # noqa: BLE001 - the point: nothing else may escape
        if isinstance(exc, KeyboardInterrupt):
            raise
        escaped = f"{type(exc).__name__}: {str(exc)[:300]}"
    seconds = time.perf_counter() - t0
    peak = 0
    if trace_memory:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return Outcome(escaped, seconds, peak, rejected)
