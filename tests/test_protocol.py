"""Bad input on the protocol layer: each case a clear error naming the key, nothing written.

Prepare / Execute / Assert on a folder bucket (the conformance suite shows the
backends behave alike, so the protocol's checks are backend-independent).
"""

from __future__ import annotations

import json

import pytest

from fedfs import layout
from fedfs.protocol.documents import canonical_json
from fedfs.errors import ConfigError, Conflict, IntegrityError, InvalidName, NotFound, SchemaError, SignatureError, TooLarge
from fedfs.federation import Federation, config_from_key_dir
from fedfs.protocol.schema import BlobRef, SiteCensus, UpdateManifest
from fedfs.trust.signing import generate_keypair, load_identity
from fedfs.store import open_store


@pytest.fixture
def fed(tmp_path, keys):
    config, agg = config_from_key_dir(keys, ["A", "B", "C"])
    fed, _ = Federation.create(str(tmp_path / "bucket"), config, agg)
    return fed


def _census(site="A", n=3):
    return SiteCensus(site=site, num_cases=n, num_channels=1)


def _put_raw(fed, key, obj_or_bytes):
    data = obj_or_bytes if isinstance(obj_or_bytes, bytes) else json.dumps(obj_or_bytes).encode()
    fed.store.publish(key, data)


KEY = layout.site_census("A")


def test_malformed_json(fed):
    _put_raw(fed, KEY, b'{"envelope": "fedfs-signed-v1", "body": {')
    with pytest.raises(SchemaError, match=r"census\.json: malformed or truncated JSON"):
        fed.bucket.read(KEY, SiteCensus)


def test_truncated_signed_document(fed, keys):
    a = load_identity(keys / "A.key")
    data = canonical_json(a.sign(_census().to_dict()))
    _put_raw(fed, KEY, data[: len(data) // 2])
    with pytest.raises(SchemaError, match="truncated"):
        fed.bucket.read(KEY, SiteCensus)


def test_unknown_schema_version(fed, keys):
    a = load_identity(keys / "A.key")
    body = _census().to_dict() | {"schema_version": 99}
    _put_raw(fed, KEY, a.sign(body))
    with pytest.raises(SchemaError, match="unknown schema_version 99"):
        fed.bucket.read(KEY, SiteCensus)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b.pop("num_cases"), "missing field 'num_cases'"),
        (lambda b: b.update(num_cases="3"), "must be an integer"),
        (lambda b: b.update(num_cases=0), "num_cases must be >= 1"),
        (lambda b: b.update(extra=1), "unknown field"),
    ],
)
def test_wrong_fields(fed, keys, mutate, message):
    a = load_identity(keys / "A.key")
    body = _census().to_dict()
    mutate(body)
    _put_raw(fed, KEY, a.sign(body))
    with pytest.raises(SchemaError, match=message):
        fed.bucket.read(KEY, SiteCensus)


def test_missing_signature(fed, keys):
    env = load_identity(keys / "A.key").sign(_census().to_dict())
    del env["signature"]
    _put_raw(fed, KEY, env)
    with pytest.raises(SignatureError, match="not signed"):
        fed.bucket.read(KEY, SiteCensus)


def test_forged_signature_altered_body(fed, keys):
    env = load_identity(keys / "A.key").sign(_census(n=3).to_dict())
    env["body"]["num_cases"] = 300
    _put_raw(fed, KEY, env)
    with pytest.raises(SignatureError, match="does not verify"):
        fed.bucket.read(KEY, SiteCensus)


def test_signature_by_outsider(fed, tmp_path):
    generate_keypair("A", "site", tmp_path / "mallory")  # same name, different key
    env = load_identity(tmp_path / "mallory" / "A.key").sign(_census().to_dict())
    _put_raw(fed, KEY, env)
    with pytest.raises(SignatureError, match="does not verify"):
        fed.bucket.read(KEY, SiteCensus)


def test_signature_by_wrong_role(fed, keys):
    # the aggregator's valid signature on a site's census is still refused
    env = load_identity(keys / "agg.key").sign(_census().to_dict())
    _put_raw(fed, KEY, env)
    with pytest.raises(SignatureError, match="only site 'A' may write here"):
        fed.bucket.read(KEY, SiteCensus)


def test_role_claim_must_match_federation(fed, keys):
    env = load_identity(keys / "A.key").sign(_census().to_dict())
    env["role"] = "aggregator"
    _put_raw(fed, layout.CENSUS, env)
    with pytest.raises(SignatureError, match="signed as role 'aggregator' but is a 'site'"):
        fed.bucket.read(layout.CENSUS, SiteCensus)


def test_sha256_mismatch(fed, keys):
    a = fed.as_party(keys / "A.key")
    ref = a.bucket.put_blob_bytes(lambda sha, ext: layout.site_blob("A", sha, ext), b"weights" * 100)
    bad = BlobRef(key=ref.key, sha256="f" * 64, size=ref.size)
    with pytest.raises(IntegrityError, match="does not match"):
        fed.bucket.get_blob_bytes(bad, max_size=1 << 20)
    with pytest.raises(IntegrityError, match="over the"):
        fed.bucket.get_blob_bytes(ref, max_size=10)


def test_update_replayed_at_another_round_is_refused(fed, keys):
    a = fed.as_party(keys / "A.key")
    ref = a.bucket.put_blob_bytes(lambda sha, ext: layout.site_blob("A", sha, ext), b"w")
    upd = UpdateManifest(site="A", round=1, base_version=1, blob=ref, num_cases=3)
    a.bucket.publish(layout.site_update("A", 1), upd, a.identity)
    raw = fed.store.read_bytes(layout.site_update("A", 1))
    fed.store.publish(layout.site_update("A", 7), raw)  # copy the valid, signed file elsewhere
    assert fed.bucket.read(layout.site_update("A", 1), UpdateManifest).doc.round == 1
    # r7 is a slot: the replayed copy is junk there (recorded with the reason), so r7 reads as not published
    with pytest.raises(NotFound):
        fed.bucket.read(layout.site_update("A", 7), UpdateManifest)
    assert "replayed" in fed.bucket.junk[layout.site_update("A", 7)]


def test_oversized_document(fed):
    _put_raw(fed, KEY, b" " * 100 + b"{}")
    with pytest.raises(TooLarge, match="census.json"):
        fed.bucket.read(KEY, SiteCensus, max_size=50)


@pytest.mark.parametrize("name", ["..", "../x", "a/b", "/etc", "", "x" * 65, "a\\b", ".hidden", "sites"])
def test_bad_site_names(tmp_path, keys, name):
    with pytest.raises((InvalidName, ConfigError)):
        layout.site_census(name)
    with pytest.raises((InvalidName, ConfigError)):
        config_from_key_dir(keys, ["A", name])
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_bad_names_in_federation_json_are_refused(tmp_path, keys):
    config, agg = config_from_key_dir(keys, ["A", "B"])
    body = config.to_dict()
    body["sites"][0]["name"] = "../../etc"
    body["federation_id"] = "x"
    store = open_store(str(tmp_path / "b"))
    store.publish(layout.FEDERATION, canonical_json(agg.sign(body)))
    with pytest.raises(InvalidName, match="path separator"):
        Federation.open(store)


def test_federation_pin_and_forgery(fed, keys, tmp_path):
    assert Federation.open(fed.store, pin=fed.digest).digest == fed.digest
    with pytest.raises(IntegrityError, match="pinned"):
        Federation.open(fed.store, pin="0" * 64)
    # federation.json signed by a site key is refused
    config, _ = config_from_key_dir(keys, ["A", "B"])
    other = open_store(str(tmp_path / "other"))
    other.publish(layout.FEDERATION, canonical_json(load_identity(keys / "A.key").sign(config.to_dict())))
    with pytest.raises(SchemaError, match="must be signed by its aggregator"):
        Federation.open(other)


def test_second_init_identical_or_conflict(tmp_path, keys):
    url = str(tmp_path / "bucket")
    config, agg = config_from_key_dir(keys, ["A", "B"], rounds=3)
    _, created = Federation.create(url, config, agg)
    again, created2 = Federation.create(url, config_from_key_dir(keys, ["A", "B"], rounds=3)[0], agg)
    assert created and not created2
    with pytest.raises(Conflict, match="differs in rounds"):
        Federation.create(url, config_from_key_dir(keys, ["A", "B"], rounds=4)[0], agg)


def test_party_key_must_match_federation(fed, tmp_path):
    generate_keypair("A", "site", tmp_path / "other")
    with pytest.raises(ConfigError, match="does not match its public key"):
        fed.as_party(tmp_path / "other" / "A.key")
