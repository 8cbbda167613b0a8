"""Site and aggregator roles end to end on a folder bucket with a toy PyTorch model.

The same code paths as the nnU-Net federation, minus nnU-Net: set-up (census,
fingerprint, plans, v0), synchronous and asynchronous rounds, AsymFedAvg,
crash recovery, and the aggregation math checked against hand computation.
"""

from __future__ import annotations

import pytest
import torch

from fedfs import layout
from fedfs.roles.aggregator import Aggregator
from fedfs.federation import Federation, config_from_key_dir
from fedfs.errors import ValidationError
from fedfs.protocol.schema import BlobRef, GlobalManifest, UpdateManifest
from fedfs.roles.site import Site
from fedfs.testing.toy import ToyWork
from fedfs.weights.tensors import load_weights


def make_fed(tmp_path, keys, **settings):
    config, agg = config_from_key_dir(keys, ["A", "B", "C"], **settings)
    fed, _ = Federation.create(str(tmp_path / "bucket"), config, agg)
    aggregator = Aggregator(fed.as_party(keys / "agg.key"), tmp_path / "agg")
    works = {s: ToyWork(s, cases=c, seed=i + 1, depth=d)
             for i, (s, c, d) in enumerate([("A", 6, 2), ("B", 3, 2 if settings.get("mode") != "asym" else 3),
                                            ("C", 1, 2)])}
    sites = {s: Site(fed.as_party(keys / f"{s}.key"), works[s], tmp_path / f"site-{s}") for s in works}
    return fed, aggregator, sites


def drive(aggregator, sites, order=None, max_steps=200):
    """Round-robin steps until every site is done; returns the aggregator's actions."""
    actions = []
    for _ in range(max_steps):
        if all(s.state.finished for s in sites.values()):
            return actions
        actions.append(str(aggregator.step()))
        for name in order or sorted(sites):
            sites[name].step()
    raise AssertionError(f"federation did not finish: {actions[-5:]}")


def setup(fed, aggregator, sites):
    """Step until v0 is out (nobody has trained yet)."""
    for _ in range(10):
        aggregator.step()
        if fed.store.exists(layout.global_version(0)):
            return
        for s in sites.values():
            s.step()
    raise AssertionError("set-up did not finish")


def test_sync_ffe_federation_and_fedavg_math(tmp_path, keys):
    # Prepare
    fed, aggregator, sites = make_fed(tmp_path, keys, rounds=3)
    # Execute
    actions = drive(aggregator, sites)
    # Assert: the set-up ran in order, then exactly 3 aggregations
    assert [a.split(":")[0] for a in actions if not a.startswith("wait")][:4] == ["census", "fingerprint", "v0", "aggregated"]
    assert sum(a.startswith("aggregated") for a in actions) == 3
    b = fed.bucket
    v1 = b.read(layout.global_version(1), GlobalManifest).doc
    assert [c.site for c in v1.contributions] == ["A", "B", "C"]
    assert [c.weight for c in v1.contributions] == [6.0, 3.0, 1.0]
    # the global is the case-weighted mean of the three updates, tensor by tensor
    ups = [load_weights(aggregator.inputs.fetch(b.read(layout.site_update(s, 0), UpdateManifest).doc.blob))[0] for s in "ABC"]
    g1 = load_weights(aggregator.inputs.fetch(v1.blob))[0]
    for k in g1:
        expected = (6 * ups[0][k] + 3 * ups[1][k] + 1 * ups[2][k]) / 10
        torch.testing.assert_close(g1[k], expected, rtol=1e-6, atol=1e-7)
    v3 = b.read(layout.global_version(3), GlobalManifest).doc
    assert v3.final and v3.next_rounds == {"A": 3, "B": 3, "C": 3}
    assert all(s.state.final_version == 3 and s.state.updates_sent == 3 for s in sites.values())
    # one update per site per round, each trained from the version of its round
    for s in "ABC":
        assert [b.read(layout.site_update(s, r), UpdateManifest).doc.base_version for r in range(3)] == [0, 1, 2]
    assert aggregator.step().action == "finished"


def test_async_fedbuff_slow_site_never_blocks(tmp_path, keys):
    fed, aggregator, sites = make_fed(tmp_path, keys, rounds=4, aggregation="async", buffer_size=2, max_staleness=3)
    # C is slow: what it trains reaches the bucket only every fourth of its steps
    tick = {"n": 0}
    c = sites["C"]
    publish = c._publish_pending

    def slow_publish():
        tick["n"] += 1
        return publish() if tick["n"] % 4 == 0 else None

    c._publish_pending = slow_publish
    drive(aggregator, sites)
    versions = [fed.bucket.read(layout.global_version(v), GlobalManifest).doc for v in range(1, 5)]
    staleness = [c.staleness for v in versions for c in v.contributions]
    assert any(s > 0 for s in staleness), "the slow site's updates should arrive stale"
    assert versions[-1].final
    assert sites["A"].state.updates_sent <= 4


@pytest.mark.parametrize("trigger", ["fresh", "any"])
def test_async_fresh_trigger_keeps_fast_sites_in_step(tmp_path, keys, trigger):
    """A and B publish one step after they train (training takes time), C (slow) every third step;
    the aggregator wakes after every single site step, so C's stale update is already pending
    when A's fresh one lands, while B's is still "in training"."""
    fed, aggregator, sites = make_fed(tmp_path, keys, rounds=6, aggregation="async", buffer_size=2,
                                      max_staleness=6, buffer_trigger=trigger)

    def deferred(site, every):
        publish, tick = site._publish_pending, {"n": 0}

        def later():
            tick["n"] += 1
            return publish() if tick["n"] % every == 0 else None
        site._publish_pending = later

    deferred(sites["A"], 2)
    deferred(sites["B"], 2)
    deferred(sites["C"], 3)
    for _ in range(300):
        if all(s.state.finished for s in sites.values()):
            break
        for name in ("C", "A", "B"):
            sites[name].step()
            aggregator.step()
    assert all(s.state.finished for s in sites.values())
    versions = [fed.bucket.read(layout.global_version(v), GlobalManifest).doc for v in range(1, 7)]
    fast = [x.staleness for v in versions for x in v.contributions if x.site in "AB"]
    slow = [x.staleness for v in versions for x in v.contributions if x.site == "C"]
    assert slow and max(slow) > 0, "C's updates should arrive stale"
    if trigger == "fresh":  # every fast update is folded into the version right after the one it came from
        assert fast == [0] * 12
    else:  # a stale update fills the buffer first: B's lands a version late, and A and B stay out of step
        assert max(fast) > 0


def test_asym_federation_shares_matching_layers(tmp_path, keys):
    fed, aggregator, sites = make_fed(tmp_path, keys, rounds=2, mode="asym", align="name")
    drive(aggregator, sites)
    v1 = fed.bucket.read(layout.global_version(1), GlobalManifest).doc
    assert set(v1.site_blobs) == {"A", "B", "C"}
    share = v1.report["sharing"]
    assert share["A"]["shared_tensors"] == share["A"]["tensors"]  # A's layers all exist at C (same depth)
    assert share["B"]["shared_tensors"] < share["B"]["tensors"]  # B is deeper: its extra layer stays its own
    # each site got back weights with its own keys and shapes
    for s in "ABC":
        w = load_weights(aggregator.inputs.fetch(v1.site_blobs[s]))[0]
        assert {k: tuple(t.shape) for k, t in w.items()} == aggregator.inputs.site_shapes(s)


def test_site_crash_after_training_republishes_once(tmp_path, keys):
    fed, aggregator, sites = make_fed(tmp_path, keys, rounds=2)
    setup(fed, aggregator, sites)
    a = sites["A"]
    # crash between recording the trained update and publishing it
    a.bucket.publish, real = (lambda *x, **k: (_ for _ in ()).throw(KeyboardInterrupt())), a.bucket.publish
    with pytest.raises(KeyboardInterrupt):
        a.step()
    a.bucket.publish = real
    assert a.state.pending is not None
    restarted = Site(fed.as_party(keys / "A.key"), a.work, tmp_path / "site-A")
    sites["A"] = restarted
    assert restarted.step().action == "update"
    assert restarted.state.updates_sent == 1
    drive(aggregator, sites)
    assert fed.store.list("sites/A/updates/") == [layout.site_update("A", 0), layout.site_update("A", 1)]


def test_aggregator_crash_between_payload_and_manifest(tmp_path, keys):
    fed, aggregator, sites = make_fed(tmp_path, keys, rounds=2)
    setup(fed, aggregator, sites)
    for s in sites.values():
        s.step()  # round 0 trained and published
    real = aggregator.bucket.publish
    aggregator.bucket.publish = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        aggregator.step()
    aggregator.bucket.publish = real
    blobs_before = set(fed.store.list("aggregator/blobs/"))
    assert not fed.store.exists(layout.global_version(1))
    fresh = Aggregator(fed.as_party(keys / "agg.key"), tmp_path / "agg")
    assert fresh.step().action == "aggregated"
    v1 = fed.bucket.read(layout.global_version(1), GlobalManifest).doc
    assert v1.blob.key in blobs_before  # the same bytes as the interrupted run
    drive(fresh, sites)


def test_an_aggregator_behind_another_does_not_reject_updates_from_the_newer_global(tmp_path, keys):
    """Two aggregators (a standby with the same key): one publishes v2 and site B trains from it
    while the other still looks at v1. B's update is not "from the future" for good: the lagging
    aggregator catches up and folds it, so v3 averages all three sites."""
    # Prepare: v2 out from the first aggregator, B's r2 (trained from v2) published
    fed, first, sites = make_fed(tmp_path, keys, rounds=3)
    standby = Aggregator(fed.as_party(keys / "agg.key"), tmp_path / "agg2")
    setup(fed, first, sites)
    for v in (1, 2):
        for s in sites.values():
            s.step()
        assert first.step().version == v
    sites["B"].step()
    assert fed.bucket.read(layout.site_update("B", 2), UpdateManifest).doc.base_version == 2
    # Execute: the standby steps with the view it had before v2 appeared
    lagging = standby._round_step(1)
    # Assert: it waits and catches up instead of rejecting; v3 holds every site
    assert lagging.action == "wait" and "catching up" in lagging.detail
    assert layout.site_update("B", 2) not in standby.quarantine
    drive(standby, sites)
    v3 = fed.bucket.read(layout.global_version(3), GlobalManifest).doc
    assert [c.site for c in v3.contributions] == ["A", "B", "C"]


def test_update_norm_plausibility_check(tmp_path, keys):
    fed, aggregator, sites = make_fed(tmp_path, keys, rounds=2, update_norm_limit=1.0)
    setup(fed, aggregator, sites)
    # site C posts a "boosted" update: 100 x its real weights (a classic model-replacement attack)
    from fedfs.weights.tensors import save_weights

    orig = sites["C"].work.train_round

    def boosted(gpath, epochs, out):
        m = orig(gpath, epochs, out)
        tensors = load_weights(out)[0]
        save_weights(out, {k: t * 100 for k, t in tensors.items()})
        return m

    sites["C"].work.train_round = boosted
    for s in sites.values():
        s.step()
    result = aggregator.step()
    assert result.action == "aggregated" and result.extra["sites"] == ["A", "B"]  # C answered, rejected
    reason = aggregator.quarantine.reason(layout.site_update("C", 0))
    assert "implausible update" in reason and "limit 1" in reason
    drive(aggregator, sites)  # the federation goes on without the rejected update
    v1 = fed.bucket.read(layout.global_version(1), GlobalManifest).doc
    assert [c.site for c in v1.contributions] == ["A", "B"]


def test_site_quarantines_a_forged_global(tmp_path, keys):
    from fedfs.protocol.schema import StatusDocument
    from fedfs.trust.signing import load_identity

    fed, aggregator, sites = make_fed(tmp_path, keys, rounds=2)
    setup(fed, aggregator, sites)
    # a site key signs a "global" v1 in the aggregator's folder (a hostile member)
    v0 = fed.bucket.read(layout.global_version(0), GlobalManifest)
    forged = load_identity(keys / "A.key").sign(GlobalManifest(version=1, blob=v0.doc.blob).to_dict())
    fed.store.publish(layout.global_version(1), __import__("json").dumps(forged).encode())
    r = sites["B"].step()
    # the forged file is junk where v1 belongs: B records it and trains its round from v0, as due
    assert r.action == "update" and "r0 from v0" in r.detail, r
    st = fed.bucket.read(layout.site_status("B"), StatusDocument).doc
    assert st.rejected[0].key == layout.global_version(1) and "only the aggregator may write here" in st.rejected[0].reason
    # nor does it stop the aggregator: v1 is published beside the squatted key and the federation finishes
    drive(aggregator, sites)
    v1 = fed.bucket.read(layout.global_version(1), GlobalManifest)
    assert v1.key == layout.slot_candidate(layout.global_version(1), 1) and v1.signer == "agg"
    assert all(s.state.final_version == 2 for s in sites.values())


def test_a_traversal_blob_key_is_refused_even_when_its_sha256_is_cached(tmp_path, keys):
    fed, aggregator, sites = make_fed(tmp_path, keys, rounds=1)
    setup(fed, aggregator, sites)
    real = fed.bucket.read(layout.global_version(0), GlobalManifest).doc.blob_for("A")
    aggregator.inputs.fetch(real)  # the payload is now in the aggregator's cache under its sha256
    sneaky = BlobRef(key=f"sites/A/blobs/../../{real.key}", sha256=real.sha256, size=real.size)
    with pytest.raises(ValidationError, match="unsafe segment"):
        aggregator.inputs.fetch(sneaky)


class TypoWork(ToyWork):
    """A site whose plans lack the federation's configuration (a typo such as "2d_typo"), planned as
    NnunetWork plans: nnU-Net's plans, then the summary of the configuration the federation trains."""

    plans_made = 0

    def plan(self, global_fingerprint):
        from fedfs.fl.plans import plans_summary

        self.plans_made += 1
        plans = {"plans_name": "ToyPlans", "configurations": {"2d": {"patch_size": [64, 64]}}}
        plans_summary(plans, "2d_typo")  # raises: plans have no configuration '2d_typo'


def test_a_blocked_site_ends_a_cron_step_after_one_attempt(tmp_path, keys):
    """The trial's bug: a site that cannot plan re-planned in a loop under cron's lock. The cron step
    (the one loop, no trigger) now returns at the first blocked result; the reason is on record."""
    from fedfs.protocol.schema import StatusDocument
    from fedfs.roles.loop import run_loop

    # Prepare: a fedavg federation (sites plan at once) whose site A cannot plan
    config, agg = config_from_key_dir(keys, ["A", "B"], mode="fedavg", configuration="2d_typo",
                                      custom_configuration=True)
    fed, _ = Federation.create(str(tmp_path / "bucket"), config, agg)
    site = Site(fed.as_party(keys / "A.key"), TypoWork("A"), tmp_path / "site-A")
    # Execute
    result = run_loop(site.step)
    # Assert
    assert result.action.blocked and "no configuration '2d_typo'" in result.detail
    assert site.work.plans_made == 1 and not site.state.planned
    st = fed.bucket.read(layout.site_status("A"), StatusDocument).doc
    assert [r.key for r in st.rejected] == ["-"] and "2d_typo" in st.rejected[0].reason


def test_one_quarantine_caps_its_record_and_reads_it_back(tmp_path, keys):
    from fedfs.protocol.schema import StatusDocument
    from fedfs.roles.quarantine import MAX_RECORDS, Quarantine

    # Prepare
    fed, aggregator, _ = make_fed(tmp_path, keys)
    q = aggregator.quarantine
    # Execute: more rejections than a status document keeps, one of them recorded twice
    for i in range(MAX_RECORDS + 5):
        q.reject(f"sites/A/updates/r{i:06d}.json", f"reason {i}")
    assert q.reject("sites/A/updates/r000000.json", "reason 0") is False  # the same record: nothing new
    q.flush()
    # Assert: the newest MAX_RECORDS are on record, and a restarted party reads them back
    st = fed.bucket.read(layout.AGG_STATUS, StatusDocument).doc
    assert len(st.rejected) == MAX_RECORDS and st.rejected[-1].reason == f"reason {MAX_RECORDS + 4}"
    again = Quarantine(fed.bucket, layout.AGG_STATUS, aggregator.identity)
    assert f"sites/A/updates/r{MAX_RECORDS + 4:06d}.json" in again and "sites/A/updates/r000000.json" not in again
