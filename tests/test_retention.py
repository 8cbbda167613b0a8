"""Retention (issue 15, item 6): the pure rule, a toy federation that prunes, doctor's free-space check."""

from __future__ import annotations

import shutil
from collections import namedtuple

import pytest

from fedfs import layout
from fedfs.errors import ValidationError
from fedfs.protocol.retention import oldest_kept, plan_aggregator_pruning, site_rounds_decided
from fedfs.protocol.schema import BlobRef, Contribution, FederationConfig, GlobalManifest, Party

SHA = [f"{i:064x}" for i in range(100)]
KEY = "A" * 43 + "="


def config(**kw) -> FederationConfig:
    return FederationConfig(federation_id="f", mode="ffe", configuration="2d",
                            aggregator=Party("agg", "aggregator", KEY),
                            sites=[Party("A", "site", KEY), Party("B", "site", KEY)], **kw)


def blob(i: int, site: str | None = None) -> BlobRef:
    key = layout.site_blob(site, SHA[i]) if site else layout.aggregator_blob(SHA[i])
    return BlobRef(key=key, sha256=SHA[i], size=10)


def chain(n: int, rounds: int = 20) -> dict[int, GlobalManifest]:
    """v0 (a site's initial weights) .. v(n-1); vN folds r(N-1) of A and B (payload sha 50+N, 70+N)."""
    out = {0: GlobalManifest(version=0, blob=blob(0, "A"), next_rounds={"A": 0, "B": 0})}
    for v in range(1, n):
        contrib = [Contribution(site=s, round=v - 1, key=layout.site_update(s, v - 1), sha256=SHA[base + v],
                                base_version=v - 1, staleness=0, weight=1.0) for s, base in (("A", 50), ("B", 70))]
        out[v] = GlobalManifest(version=v, blob=blob(v), contributions=contrib, next_rounds={"A": v, "B": v},
                                final=v >= rounds)
    return out


def test_retention_off_removes_nothing():
    # Prepare
    c, m = config(), chain(10)
    # Execute
    plan = plan_aggregator_pruning(c, m, 9)
    # Assert
    assert plan.bucket_keys == () and plan.cache_sha256 == ()
    assert oldest_kept(c, 9, False) == 0 and site_rounds_decided(c, "A", m[9]) == 0


def test_sync_keeps_the_last_k_and_the_newest_globals_inputs():
    # Prepare
    c, m = config(keep_globals=3), chain(10)
    # Execute
    plan = plan_aggregator_pruning(c, m, 9)
    # Assert: v7..v9 stay; v1..v6's payloads go; v0's is a site's initial weights, never the aggregator's
    assert oldest_kept(c, 9, False) == 7
    assert plan.bucket_keys == tuple(sorted(blob(v).key for v in range(1, 7)))
    # the cache drops those and the updates folded before v9; v9's inputs (r8) stay
    folded = {SHA[b + v] for v in range(1, 9) for b in (50, 70)}
    assert set(plan.cache_sha256) == {SHA[v] for v in range(1, 7)} | folded
    assert (plan.globals_below, plan.updates_below) == (7, 9)
    # each site: r0..r7 were folded before v9; r8 is v9's input
    assert site_rounds_decided(c, "A", m[9]) == 8


def test_a_later_call_looks_only_at_what_fell_out_and_shared_payloads_stay():
    # Prepare: v10 is "global unchanged" (it names v9's payload again)
    c, m = config(keep_globals=2), chain(10)
    m[10] = GlobalManifest(version=10, blob=blob(9), next_rounds={"A": 10, "B": 10})
    first = plan_aggregator_pruning(c, m, 9)
    # Execute
    plan = plan_aggregator_pruning(c, {v: m[v] for v in range(8, 11)}, 10,
                                   (first.globals_below, first.updates_below))
    # Assert: v8 falls out; v9's payload is still named by the kept v10
    assert plan.bucket_keys == (blob(8).key,)
    assert SHA[9] not in plan.cache_sha256 and SHA[50 + 9] in plan.cache_sha256
    with pytest.raises(ValueError, match="manifests of v7"):
        plan_aggregator_pruning(c, {v: m[v] for v in range(9, 11)}, 10, (7, 9))


def test_async_keeps_every_base_within_max_staleness_until_the_final_global():
    # Prepare
    c = config(keep_globals=2, aggregation="async", max_staleness=4, rounds=12)
    m = chain(13, rounds=12)
    # Execute / Assert: v5..v9 may still be a slow site's base; once v12 is final only the last 2 stay
    assert oldest_kept(c, 9, False) == 5
    assert oldest_kept(c, 12, True) == 11
    assert blob(10).key in plan_aggregator_pruning(c, m, 12).bucket_keys


def test_keep_globals_of_one_is_refused():
    with pytest.raises(ValidationError, match="keep_globals must be 0"):
        FederationConfig.from_dict({**config().to_dict(), "keep_globals": 1}, "federation.json")
    # an old federation.json without the field parses, and keeps everything
    d = config().to_dict()
    del d["keep_globals"]
    assert FederationConfig.from_dict(d, "federation.json").keep_globals == 0


# ---- a toy federation ----------------------------------------------------------------------
def _payloads(store, prefix: str) -> set[str]:
    return {k for k in store.list(prefix) if layout.parse_blob_key(k)}


@pytest.mark.parametrize("aggregation, rounds", [("sync", 6), ("async", 4)])
def test_a_toy_federation_with_k2_keeps_only_the_allowed_payloads(tmp_path, keys, aggregation, rounds):
    from fedfs.ops.bundle import export_bundle
    from fedfs.ops.export import final_manifest
    from fedfs.ops.history import collect_history
    from fedfs.ops.status import collect_status, render_status
    from fedfs.protocol.schema import PlansDocument, UpdateManifest
    from test_roles import drive, make_fed

    # Prepare
    fed, aggregator, sites = make_fed(tmp_path, keys, rounds=rounds, keep_globals=2, aggregation=aggregation,
                                      max_staleness=1)
    # Execute
    drive(aggregator, sites)
    # Assert: only v5 and v6 (final) keep aggregator payloads
    b, store = fed.bucket, fed.store
    final = final_manifest(fed)
    v = final.doc.version
    kept = {b.read(layout.global_version(x), GlobalManifest).doc.blob.key for x in (v - 1, v)}
    assert _payloads(store, "aggregator/") == kept
    assert all(store.exists(layout.global_version(x)) for x in range(v + 1))  # every manifest stays
    for s in "ABC":
        init = b.read(layout.site_plans(s), PlansDocument).doc.init_blob.key
        inputs = {c.key for c in final.doc.contributions if c.site == s}
        allowed = {init} | {b.read(k, UpdateManifest).doc.blob.key for k in inputs}
        assert _payloads(store, f"sites/{s}/") == allowed, s
        # the site's workdir: the final global only, no published update
        work = tmp_path / f"site-{s}"
        assert [p.name for p in (work / "globals").iterdir()] == [f"{final.doc.blob.sha256}.safetensors"]
        assert sorted(p.name for p in (work / "updates").iterdir()) == ["init.safetensors"]
    cache = {p.name.split(".")[0] for p in (tmp_path / "agg" / "cache").iterdir()}
    inits = {b.read(layout.site_plans(s), PlansDocument).doc.init_blob.sha256 for s in "ABC"}
    assert cache <= inits | {b.read(layout.global_version(x), GlobalManifest).doc.blob.sha256 for x in (v - 1, v)} \
        | {c.sha256 for c in final.doc.contributions}
    assert not list((tmp_path / "agg" / "out").iterdir())
    # every reader still works: status, the report's history, the final global, bundles
    status = collect_status(fed)
    assert status["global"]["version"] == v and status["global"]["final"] and not status["problems"]
    render_status(status)
    history = collect_history(fed)
    assert len(history["globals"]) == v + 1
    assert b.get_blob_file(final.doc.blob_for("A"), str(tmp_path / "final.safetensors"))
    site_a = fed.as_party(keys / "A.key")
    export_bundle(site_a, tmp_path / "from-A.tar", from_site="A", everything=True)
    export_bundle(fed.as_party(keys / "agg.key"), tmp_path / "for-A.tar", for_site="A")


def test_a_site_whose_global_was_pruned_before_it_fetched_waits_for_the_newer_one(tmp_path, keys):
    from fedfs.roles.steps import Action
    from test_roles import make_fed, setup

    # Prepare: A read v0's manifest, then v0's payload vanished (as a pruned old global would)
    fed, aggregator, sites = make_fed(tmp_path, keys, rounds=3, keep_globals=2)
    setup(fed, aggregator, sites)
    site = sites["A"]
    version, manifest = site._latest()
    ref = manifest.doc.blob_for("A")
    shutil.move(fed.store.local_path + "/" + ref.key, tmp_path / "moved")
    # Execute
    result = site._train(0, version, manifest)
    # Assert: a wait that says why, not a quarantine
    assert result.action == Action.WAIT and "pruned" in result.detail
    assert not fed.store.exists(layout.site_status("A"))  # nothing quarantined


# ---- doctor ---------------------------------------------------------------------------------
Usage = namedtuple("Usage", "total used free")


@pytest.mark.parametrize("free, verdict", [(50 * 2**30, "ok"), (2 * 2**30, "warn"), (0, "FAIL")])
def test_doctor_checks_free_space(tmp_path, monkeypatch, free, verdict):
    from fedfs.ops import doctor
    from fedfs.store.local import LocalStore

    # Prepare
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda path: Usage(100 * 2**30, 100 * 2**30 - free, free))
    store = LocalStore(str(tmp_path / "b"), str(tmp_path / "b"))
    # Execute
    report = doctor.run_doctor(store)
    # Assert
    space = [c for c in report.checks if c.name.startswith("free space")]
    assert space and all(doctor.check_state(c) == verdict for c in space)
    assert report.ok is (verdict != "FAIL")
    assert ("NOT usable" in report.render()) is (verdict == "FAIL")
