"""A file costs a rejection, never a party (issue: hardening): bounded influence, dtype-bound
architectures, payloads bound to their writer's folder, and each party's durable memory of
what it rejected. Toy federations on a folder bucket; squatting is in tests/test_slots.py.
"""

from __future__ import annotations

import torch

from fedfs import layout
from fedfs.federation import Federation, config_from_key_dir
from fedfs.ops.status import collect_status
from fedfs.protocol.schema import BlobRef, GlobalManifest, UpdateManifest
from fedfs.roles.aggregator import Aggregator
from fedfs.roles.quarantine import MAX_RECORDS
from fedfs.roles.site import Site
from fedfs.testing.toy import ToyWork, drive, step_all
from fedfs.trust.signing import generate_keypair
from fedfs.weights.tensors import load_weights, save_weights


def make_fed(root, cases=(6, 3, 1), **settings):
    keys = root / "keys"
    generate_keypair("agg", "aggregator", keys)
    names = ["A", "B", "C"][:len(cases)]
    for s in names:
        generate_keypair(s, "site", keys)
    config, agg = config_from_key_dir(keys, names, **settings)
    fed, _ = Federation.create(str(root / "bucket"), config, agg)
    aggregator = Aggregator(fed.as_party(keys / "agg.key"), root / "agg")
    sites = {s: Site(fed.as_party(keys / f"{s}.key"), ToyWork(s, cases=n, seed=i + 1), root / f"site-{s}")
             for i, (s, n) in enumerate(zip(names, cases))}
    return fed, keys, aggregator, sites


def test_a_site_claiming_implausible_cases_is_refused_at_the_census(tmp_path):
    # Prepare: C claims 10**12 cases (its weight share would be 0.99999999999)
    fed, _keys, aggregator, sites = make_fed(tmp_path, cases=(6, 3, 10**12), max_cases=10_000)
    # Execute
    results = step_all(aggregator, sites, times=3)
    # Assert: the aggregator publishes no census and names C and the bound; nobody crashed
    assert not fed.store.exists(layout.CENSUS)
    blocked = [r for r in results if r.action == "blocked"]
    assert blocked and "site C claims 1000000000000 training cases" in blocked[-1].detail
    assert "max_cases" in blocked[-1].detail


def test_status_shows_each_sites_weight_share_before_training(tmp_path):
    fed, _keys, aggregator, sites = make_fed(tmp_path)  # 6, 3 and 1 cases
    for _ in range(6):
        step_all(aggregator, sites)
        if fed.store.exists(layout.CENSUS):
            break
    d = collect_status(fed)
    assert {s: d["sites"][s]["cases"] for s in "ABC"} == {"A": 6, "B": 3, "C": 1}
    assert {s: round(d["sites"][s]["weight_share"], 6) for s in "ABC"} == {"A": 0.6, "B": 0.3, "C": 0.1}


def test_an_update_in_another_dtype_is_refused_alone(tmp_path):
    # Prepare: C sends its weights as float64 with finite values far beyond float32's range
    fed, _keys, aggregator, sites = make_fed(tmp_path, rounds=2)
    real = sites["C"].work.train_round

    def wider(global_path, epochs, update_path):
        metrics = real(global_path, epochs, update_path)
        tensors, _ = load_weights(update_path)
        save_weights(update_path, {k: (t.double() * 1e300 if t.is_floating_point() else t) for k, t in tensors.items()})
        return metrics

    sites["C"].work.train_round = wider
    # Execute
    drive(aggregator, sites)
    # Assert: C's updates are refused with the reason; the globals are finite and made of A and B
    reason = aggregator.quarantine.reason(layout.site_update("C", 0))
    assert reason and "F64" in reason and "declared architecture says F32" in reason
    final = fed.bucket.read(layout.global_version(2), GlobalManifest).doc
    assert {c.site for c in final.contributions} == {"A", "B"}
    path = fed.bucket.get_blob_file(final.blob, str(tmp_path / "final.safetensors"))
    assert all(torch.isfinite(t).all() for t in load_weights(path)[0].values())


def test_a_payload_must_lie_in_the_signers_folder_even_when_cached(tmp_path):
    # Prepare: after round 0, C signs an update naming A's r0 payload by sha256 under C's folder, never uploaded
    fed, keys, aggregator, sites = make_fed(tmp_path, rounds=2)
    for _ in range(8):  # until v1 is out, before any site trains from it
        aggregator.step()
        if fed.bucket.published(layout.global_version(1), GlobalManifest):
            break
        for s in sites.values():
            s.step()
    a0 = fed.bucket.read(layout.site_update("A", 0), UpdateManifest).doc
    assert (aggregator.work / "cache" / f"{a0.blob.sha256}.safetensors").exists()  # the aggregator holds it
    c = fed.as_party(keys / "C.key")
    ghost = BlobRef(key=layout.site_blob("C", a0.blob.sha256), sha256=a0.blob.sha256, size=a0.blob.size)
    c.bucket.publish(layout.site_update("C", 1), UpdateManifest(site="C", round=1, base_version=1, blob=ghost,
                                                                num_cases=1), c.identity)
    c.store.write_bytes(layout.inbox_marker("C", 1), b"")  # as a site does after publishing (the poll's hint)
    sites["C"].state.updates_sent = 2  # the real C does not send r1 itself
    sites["C"].state.last_base = 1
    # Execute
    for _ in range(3):
        step_all(aggregator, {s: sites[s] for s in "AB"})
    # Assert
    reason = aggregator.quarantine.reason(layout.site_update("C", 1))
    assert reason and "is not in site C's folder" in reason
    v2 = fed.bucket.published(layout.global_version(2), GlobalManifest)
    assert v2 is not None and "C" not in {x.site for x in v2.doc.contributions}


def test_rejections_survive_a_restart_beyond_the_status_documents_cap(tmp_path):
    # Prepare: more rejections than the status document keeps, and then the status document overwritten
    fed, keys, aggregator, _sites = make_fed(tmp_path)
    n = MAX_RECORDS + 100
    for i in range(n):
        aggregator.quarantine.reject(f"sites/A/updates/r{i:06d}.json", f"reason {i}")
    aggregator.quarantine.flush()
    fed.store.write_bytes(layout.AGG_STATUS, b"{not json")
    # Execute: a restart of the aggregator on the same workdir
    again = Aggregator(fed.as_party(keys / "agg.key"), tmp_path / "agg")
    # Assert: every rejection, with its reason, from the local journal
    assert all(again.quarantine.reason(f"sites/A/updates/r{i:06d}.json") == f"reason {i}" for i in range(n))


def test_known_junk_costs_no_read_after_a_restart(tmp_path):
    fed, keys, aggregator, sites = make_fed(tmp_path)
    fed.store.publish(layout.site_plans("C"), b"\x00 junk where C's plans belong")
    drive(aggregator, sites)  # C publishes its plans beside the junk; the federation finishes
    assert fed.bucket.read(layout.site_plans("C"), type(aggregator.inputs.plans_of("C"))).key.endswith("plans.a1.json")
    again = Aggregator(fed.as_party(keys / "agg.key"), tmp_path / "agg")
    reads = []
    real = again.fed.store.read_bytes
    again.fed.store.read_bytes = lambda key, **kw: (reads.append(key), real(key, **kw))[1]
    again.inputs.plans_of("C")
    assert layout.site_plans("C") not in reads and layout.slot_candidate(layout.site_plans("C"), 1) in reads


class IgnoresIfNoneMatch:
    """A store whose publish overwrites, as an S3 server ignoring ``If-None-Match`` does (npm's s3rver,
    which needs node: this in-memory stand-in behaves as it does at the one call that matters)."""

    @staticmethod
    def make():
        from fedfs.store.memory import MemoryStore

        class Lax(MemoryStore):
            probe_exclusive = True

            def _publish(self, key, data):
                self._write(key, data)

        return Lax({}, name="lax")


def test_init_and_every_party_refuse_a_store_without_exclusive_publish(tmp_path):
    import pytest

    from fedfs.errors import ConfigError

    keys = tmp_path / "keys"
    generate_keypair("agg", "aggregator", keys)
    generate_keypair("A", "site", keys)
    config, agg = config_from_key_dir(keys, ["A"])
    lax = IgnoresIfNoneMatch.make()
    with pytest.raises(ConfigError, match="does not honour put-if-absent"):
        Federation.create(lax, config, agg)
    assert not lax.exists(layout.FEDERATION) and lax.list() == []  # nothing written, the probe cleaned up
    # a federation.json that got there anyway (an older fedfs): each party refuses at start
    fed, _ = Federation.create(str(tmp_path / "bucket"), config, agg)
    lax.publish(layout.FEDERATION, fed.store.read_bytes(layout.FEDERATION))
    on_lax = Federation(lax, fed.config, fed.digest)
    with pytest.raises(ConfigError, match="fedfs doctor"):
        Aggregator(on_lax.as_party(keys / "agg.key"), tmp_path / "agg")
    with pytest.raises(ConfigError, match="does not honour put-if-absent"):
        Site(on_lax.as_party(keys / "A.key"), ToyWork("A"), tmp_path / "A")


def test_an_update_that_would_overflow_the_global_is_refused_alone(tmp_path):
    # Prepare: FedBuff with a server learning rate of 2 extrapolates; C (10 of 12 cases) sends finite float32
    # values near the dtype's max, so 2 x 10/12 x 3e38 overflows float32 (every input is finite)
    fed, _keys, aggregator, sites = make_fed(tmp_path, cases=(1, 1, 10), rounds=2, eta=2.0, aggregation="async")
    real = sites["C"].work.train_round

    def huge(global_path, epochs, update_path):
        metrics = real(global_path, epochs, update_path)
        if "r000000" not in update_path:  # only its first round is hostile
            return metrics
        tensors, _ = load_weights(update_path)
        save_weights(update_path, {k: (torch.full_like(t, 3e38) if t.is_floating_point() else t)
                                   for k, t in tensors.items()})
        return metrics

    sites["C"].work.train_round = huge
    # Execute
    drive(aggregator, sites)
    # Assert: C alone is refused, named, and every global is finite
    reason = aggregator.quarantine.reason(layout.site_update("C", 0))
    assert reason and "make the aggregate overflow" in reason
    final = fed.bucket.latest_version()
    for v in range(1, final + 1):
        m = fed.bucket.read(layout.global_version(v), GlobalManifest).doc
        assert layout.site_update("C", 0) not in {c.key for c in m.contributions}
        path = fed.bucket.get_blob_file(m.blob, str(tmp_path / f"v{v}.safetensors"))
        assert all(torch.isfinite(t).all() for t in load_weights(path)[0].values())


def test_an_overwritten_global_payload_is_named_by_sites_and_restored_by_the_aggregator(tmp_path):
    # Prepare: v1 is out; someone with write access rewrites its payload in place (same size)
    fed, _keys, aggregator, sites = make_fed(tmp_path, rounds=2)
    for _ in range(8):
        aggregator.step()
        if fed.bucket.published(layout.global_version(1), GlobalManifest):
            break
        for s in sites.values():
            s.step()
    v1 = fed.bucket.read(layout.global_version(1), GlobalManifest).doc
    good = fed.store.read_bytes(v1.blob.key)
    bad = bytearray(good)
    bad[-3] ^= 0x01
    fed.store.write_bytes(v1.blob.key, bytes(bad))
    # Execute / Assert: a site says which file fails, and trains nothing from it
    r = sites["A"].step()
    assert r.action == "blocked" and v1.blob.key in r.detail and "sha256" in r.detail
    aggregator.audit.hash_every_s = 0  # the periodic full check is due now
    aggregator.step()
    assert fed.store.read_bytes(v1.blob.key) == good
    assert "restored" in aggregator.quarantine.reason(v1.blob.key)
    drive(aggregator, sites)  # and the federation finishes


def test_hostile_files_at_predictable_keys_cost_rejections_never_a_party(tmp_path):
    # Prepare: before any round, files nobody needs a key to write, at keys the parties will use
    fed, _keys, aggregator, sites = make_fed(tmp_path, rounds=2)
    deep = b"[" * 100_000 + b"]" * 100_000
    huge_int = b'{"body": {"round": ' + b"9" * 50_000 + b'}, "signature": "x"}'
    planted = {
        layout.site_update("A", 0): deep,  # deeply nested JSON at A's first update key
        layout.site_update("B", 0): huge_int,  # an integer literal 50,000 digits long
        layout.slot_candidate(layout.site_update("B", 0), 1): b"\xff\xfe not utf-8",
        layout.site_update("C", 1): b"",  # empty, at C's second update key
        layout.global_version(2): b'{"version": 2}',  # unsigned, where v2 belongs
    }
    for key, data in planted.items():
        fed.store.publish(key, data)
    fed.store.write_bytes(layout.LATEST, b'{"version": "v1", ' * 1000)  # a malformed latest hint
    # Execute: nobody crashes, and the federation finishes
    drive(aggregator, sites)
    # Assert: every planted file is recorded by someone with a reason; every round kept its number
    rejected = {r.key for r in aggregator.quarantine.records()}
    for s in sites.values():
        rejected |= {r.key for r in s.quarantine.records()}
    assert set(planted) <= rejected, set(planted) - rejected
    final = fed.bucket.read(layout.global_version(2), GlobalManifest)
    assert final.key == layout.slot_candidate(layout.global_version(2), 1) and final.doc.final
    assert sorted((c.site, c.round) for c in final.doc.contributions) == [("A", 1), ("B", 1), ("C", 1)]


def test_asym_v0_gives_every_site_the_first_sites_initial_values_for_shared_layers(tmp_path):
    # Prepare: AsymFedAvg, B one level deeper than A (toy networks initialised at random, each its own)
    keys = tmp_path / "keys"
    generate_keypair("agg", "aggregator", keys)
    for s in "AB":
        generate_keypair(s, "site", keys)
    config, agg = config_from_key_dir(keys, ["A", "B"], mode="asym", rounds=1)
    fed, _ = Federation.create(str(tmp_path / "bucket"), config, agg)
    aggregator = Aggregator(fed.as_party(keys / "agg.key"), tmp_path / "agg")
    sites = {s: Site(fed.as_party(keys / f"{s}.key"), ToyWork(s, cases=2, seed=i + 1, depth=2 + i), tmp_path / s)
             for i, s in enumerate("AB")}
    # Execute
    for _ in range(6):
        step_all(aggregator, sites)
        if fed.bucket.published(layout.global_version(0), GlobalManifest):
            break
    v0 = fed.bucket.read(layout.global_version(0), GlobalManifest).doc
    a = load_weights(fed.bucket.get_blob_file(v0.blob_for("A"), str(tmp_path / "a")))[0]
    b = load_weights(fed.bucket.get_blob_file(v0.blob_for("B"), str(tmp_path / "b")))[0]
    b_own = load_weights(str(tmp_path / "B" / "updates" / "init.safetensors"))[0]
    # Assert: the tensors the two share by name and shape start equal (A's); B's own deeper layers stay its own
    shared = [k for k in a if k in b and a[k].shape == b[k].shape]
    assert shared and all(torch.equal(a[k], b[k]) for k in shared)
    only_b = [k for k in b if k not in a or a[k].shape != b[k].shape]
    assert only_b and all(torch.equal(b[k], b_own[k]) for k in only_b)
    assert "taken from site A's" in v0.report["init"]
