"""Total parsing (issue 14, item 1): every decoder of bucket bytes either decodes an input or rejects
it with a ValidationError naming the file; nothing else escapes, and hostile inputs stay small in memory.

The decoders and the mutation engine are :mod:`fedfs.testing.fuzz` (seeds made by the real code:
documents signed by real keys, safetensors headers from fedfs's writer and the safetensors library).
hypothesis draws inputs four ways per decoder: the shared mutation engine (byte-level and JSON-level
mutations, re-signed bodies), raw bytes, hypothesis-chosen byte edits of a seed, and hypothesis JSON
values planted at a field of a seed's body (signed by the right key, so the schema checks behind the
signature are reached). Deterministic (derandomized, no example database); 1,000 inputs per decoder,
under a minute in all.
``benchmarks/fuzz.py`` runs 100,000 inputs per decoder and reports time and memory per input.
"""

from __future__ import annotations

import json
import logging
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedfs.errors import SchemaError, ValidationError
from fedfs.protocol import layout
from fedfs.protocol.documents import MAX_JSON_DEPTH, canonical_json, loads_strict
from fedfs.testing import fuzz

TARGETS = fuzz.targets()
EXAMPLES_PER_DECODER = 1000

FUZZ = settings(max_examples=EXAMPLES_PER_DECODER, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck), print_blob=True)

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)
_tokens = st.sampled_from([b"[" * 70, b"9" * 5000, b"1e999", b"NaN", b'"\\ud800"', b"\xff", b"\x00", b'"', b"}",
                           b",", b"true", b"-0", b"{\"a\":1,\"a\":2}"])


@st.composite
def hostile_inputs(draw: st.DrawFn, target: fuzz.Target) -> bytes:
    seed = draw(st.sampled_from(target.seeds))
    how = draw(st.integers(0, 3))
    if how == 0:  # the shared engine, its randomness drawn (and shrunk) by hypothesis
        return fuzz.make_input(target, draw(st.randoms(use_true_random=False)))
    if how == 1:
        return draw(st.binary(max_size=300))
    if how == 2:  # byte edits at hypothesis-chosen places
        data = bytearray(seed)
        for _ in range(draw(st.integers(1, 3))):
            pos = draw(st.integers(0, len(data)))
            op = draw(st.sampled_from(["insert", "replace", "truncate"]))
            chunk = draw(_tokens | st.binary(min_size=1, max_size=8))
            if op == "truncate":
                del data[pos:]
            elif op == "insert":
                data[pos:pos] = chunk
            else:
                data[pos:pos + len(chunk)] = chunk
        return bytes(data)
    if target.header:  # a JSON value at a field of the header, the length prefix kept right
        header, payload = fuzz._header_parts(seed)
        path = draw(st.sampled_from(fuzz._paths(header)[1:]))
        _set(header, path, draw(_json_values))
        raw = json.dumps(header).encode()
        return len(raw).to_bytes(8, "little") + raw + payload
    env = json.loads(seed)
    if not (isinstance(env, dict) and isinstance(env.get("body"), dict)):  # a plain JSON seed
        env = {"body": env}
    body = env["body"]
    paths = fuzz._paths(body)[1:]
    if not paths:
        return json.dumps(draw(_json_values)).encode()
    _set(body, draw(st.sampled_from(paths)), draw(_json_values))
    if target.signer is not None and isinstance(body, dict) and draw(st.booleans()):
        return canonical_json(fuzz.sign(target.signer, body))
    return json.dumps(env).encode()


def _set(value, path, new):
    for p in path[:-1]:
        value = value[p]
    value[path[-1]] = new


@pytest.fixture(autouse=True)
def _quiet():
    """Readers log each file they skip; tens of thousands of hostile files need no log lines."""
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


def test_every_seed_decodes():
    # Assert: the seeds are valid, so a rejection below is the mutation's doing
    for name, target in TARGETS.items():
        for seed in target.seeds:
            outcome = fuzz.run_input(target, seed)
            assert outcome.escaped is None and not outcome.rejected, name


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_decoder_is_total(name):
    target = TARGETS[name]
    seen = {"rejected": 0, "decoded": 0}

    @FUZZ
    @given(data=hostile_inputs(target))
    def check(data):
        # Execute
        outcome = fuzz.run_input(target, data)
        # Assert: a value or an allowed rejection, never another exception
        assert outcome.escaped is None, f"{name}: {outcome.escaped} for input {data[:200]!r}"
        if name == "latest":  # a hint never fails and never misleads: the probe finds v2 (v0..v2 published)
            assert target.decode(data) == 2
        seen["rejected" if outcome.rejected else "decoded"] += 1

    check()
    assert seen["decoded"] + seen["rejected"] >= EXAMPLES_PER_DECODER
    assert seen["rejected"] > 0 or name == "latest"  # the inputs are hostile: some are refused


KNOWN_ESCAPES = {  # what the hostile-bucket trial planted, as bytes at a document's key
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "deep nesting in a body": b'{"envelope":"fedfs-signed-v1","body":' + b'{"a":' * 5000 + b"1" + b"}" * 5001,
    "5000-digit integer": b'{"version":' + b"9" * 5000 + b"}",
    "overflowing float": b'{"version":1e999}',
    "NaN": b'{"version":NaN}',
    "lone surrogate": b'{"envelope":"fedfs-signed-v1","signer":"\\ud800"}',
    "not UTF-8": b"\xff\xfe{}",
    "duplicate keys": b'{"body":{},"body":{}}',
    "truncated": b'{"envelope":"fedfs-signed-v1","bo',
}


@pytest.mark.parametrize("kind", sorted(KNOWN_ESCAPES))
def test_known_escapes_are_schema_errors_naming_the_file(kind):
    # Prepare: the heartbeat decoder, a key whose reader has no slot to skip to
    target = TARGETS["heartbeat"]
    data = KNOWN_ESCAPES[kind]
    # Execute / Assert: a SchemaError whose key and message name the file
    with pytest.raises(SchemaError) as info:
        target.decode(data)
    assert info.value.key == layout.site_heartbeat("A")
    assert layout.site_heartbeat("A") in str(info.value)


@pytest.mark.parametrize("kind", sorted(KNOWN_ESCAPES))
def test_a_malformed_latest_hint_falls_back_to_probing(kind):
    # Execute: the hint the aggregator and every site read first, with globals v0..v2 published
    version = TARGETS["latest"].decode(KNOWN_ESCAPES[kind])
    # Assert: the junk is ignored, the probe finds the newest global
    assert version == 2


def test_a_negative_signed_hint_is_ignored():
    # Prepare: a validly signed hint with version -5
    body = json.loads(TARGETS["latest"].seeds[0])["body"] | {"version": -5}
    data = canonical_json(fuzz.sign(TARGETS["latest"].signer, body))
    # Execute / Assert
    assert TARGETS["latest"].decode(data) == 2


@pytest.mark.parametrize("text, reason", [
    (b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), "nested 65 levels"),
    (b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH, None),
    (b'["[[[[[[[[[[' + b"[" * 100 + b'"]', None),  # brackets inside a string do not nest
    (b"1" * 101, "integer literal of 101 digits"),
    (b"-" + b"1" * 99, None),  # the sign counts
    (b"1e999", "overflows to infinity"),
    (b"-Infinity", "constant -Infinity"),
    (b'"\\ud83d\\ude00"', None),  # a surrogate pair is one character
    (b'"\\udc00"', "lone UTF-16 surrogate"),
    (b'{"a":1,"a":1}', "duplicate JSON key 'a'"),
    (b"\xef\xbb\xbf{}", "BOM"),
])
def test_strict_decoder_limits(text, reason):
    # Execute / Assert: exactly the limits, each with its reason
    if reason is None:
        loads_strict(text, "k.json")
    else:
        with pytest.raises(SchemaError, match=reason):
            loads_strict(text, "k.json")


def test_bool_and_float_are_not_integers_in_documents():
    # Prepare: a signed heartbeat whose round is true, then 1.0, then 2**63
    target = TARGETS["heartbeat"]
    body = json.loads(target.seeds[0])["body"]
    for bad in (True, 1.0, 2**63, "1"):
        data = canonical_json(fuzz.sign(target.signer, {**body, "round": bad}))
        # Execute / Assert
        with pytest.raises(ValidationError, match="heartbeat.round"):
            target.decode(data)
    schema_true = canonical_json(fuzz.sign(target.signer, {**body, "schema_version": True}))
    with pytest.raises(SchemaError, match="unknown schema_version True"):
        target.decode(schema_true)


@pytest.mark.parametrize("kind", ["deep", "long number", "wide array", "long string", "many keys"])
def test_memory_per_hostile_input_is_bounded(kind):
    # Prepare: about a megabyte of each shape at a document's key
    data = {"deep": b"[" * 500_000 + b"]" * 500_000,
            "long number": b'{"a":' + b"7" * 1_000_000 + b"}",
            "wide array": b"[" + b"0," * 500_000 + b"0]",
            "long string": b'["' + b"x" * 1_000_000 + b'"]',
            "many keys": b"{" + b",".join(b'"k%d":0' % i for i in range(80_000)) + b"}"}[kind]
    # Execute
    outcome = fuzz.run_input(TARGETS["heartbeat"], data, trace_memory=True)
    # Assert: refused, allocating at most a few times the input (a parsed list costs ~8 bytes an item)
    assert outcome.escaped is None and outcome.rejected
    assert outcome.peak_bytes < 24 * len(data) + (4 << 20), outcome.peak_bytes


def test_mutation_engine_is_deterministic():
    # Assert: the same seed gives the same inputs (a failing benchmark input replays)
    target = TARGETS["update"]
    a = [fuzz.make_input(target, random.Random(f"update:{i}")) for i in range(50)]
    b = [fuzz.make_input(target, random.Random(f"update:{i}")) for i in range(50)]
    assert a == b
