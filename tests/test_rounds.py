"""Pure round logic: barriers, deadlines, staleness, FedBuff's K, termination, site decisions."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fedfs.errors import SchemaError
from fedfs.protocol.rounds import Pending, SetupState, decide_aggregation, decide_site, screen, setup_due
from fedfs.protocol.schema import FederationConfig, Party


def cfg(**kw) -> FederationConfig:
    base = dict(federation_id="f", mode="ffe", configuration="2d",
                aggregator=Party("agg", "aggregator", "k"),
                sites=[Party(s, "site", "k") for s in ("A", "B", "C")], rounds=3)
    base.update(kw)
    return FederationConfig(**base)


def p(site, rnd, base):
    return Pending(site, rnd, base, f"sites/{site}/updates/r{rnd:06d}.json")


def test_sync_barrier_waits_for_every_site():
    # Prepare
    c = cfg()
    # Execute
    d = decide_aggregation(c, 1, [p("A", 1, 1), p("B", 1, 1)], {"A": 2, "B": 2, "C": 1}, age_s=5)
    # Assert
    assert not d.aggregate and "waiting for C" in d.reason
    d = decide_aggregation(c, 1, [p("A", 1, 1), p("B", 1, 1), p("C", 1, 1)], {"A": 2, "B": 2, "C": 2}, age_s=5)
    assert d.aggregate and [x.site for x in d.chosen] == ["A", "B", "C"]


def test_sync_deadline_with_min_sites():
    c = cfg(deadline_s=60, min_sites=2)
    pend = [p("A", 0, 0), p("B", 0, 0)]
    assert not decide_aggregation(c, 0, pend, {"A": 1, "B": 1, "C": 0}, age_s=59).aggregate
    d = decide_aggregation(c, 0, pend, {"A": 1, "B": 1, "C": 0}, age_s=61)
    assert d.aggregate and "deadline" in d.reason
    assert not decide_aggregation(c, 0, pend[:1], {"A": 1, "B": 0, "C": 0}, age_s=100).aggregate


def test_sync_rejects_late_updates():
    c = cfg()
    ok, bad = screen(c, 2, [p("A", 1, 1), p("B", 2, 2)])
    assert [x.site for x in ok] == ["B"] and "late" in bad[0][1]


def test_async_buffer_k_and_staleness():
    c = cfg(aggregation="async", buffer_size=2, max_staleness=1, rounds=5, buffer_trigger="any")
    nr = {"A": 1, "B": 1, "C": 0}
    assert not decide_aggregation(c, 0, [p("A", 0, 0)], nr, 0).aggregate
    d = decide_aggregation(c, 3, [p("A", 1, 2), p("B", 1, 3), p("C", 0, 1)], {"A": 2, "B": 2, "C": 1}, 0)
    assert d.aggregate and [x.site for x in d.chosen] == ["A", "B"]
    assert d.rejected[0][0].site == "C" and "too stale" in d.rejected[0][1]
    # the fresh trigger (default) waits for a second update trained from v3: A's is one behind
    fresh = replace(c, buffer_trigger="fresh")
    d = decide_aggregation(fresh, 3, [p("A", 1, 2), p("B", 1, 3)], {"A": 2, "B": 2, "C": 1}, 0)
    assert not d.aggregate


def test_async_fresh_trigger_lets_a_stale_update_ride_along():
    # A is slow: its update from v2 is pending while B, C and D train from v4
    c = cfg(aggregation="async", buffer_size=3, rounds=10, sites=[Party(s, "site", "k") for s in "ABCD"])
    nr = {s: 5 for s in "ABCD"}
    d = decide_aggregation(c, 4, [p("A", 2, 2), p("B", 4, 4), p("C", 4, 4)], nr, 0)
    assert not d.aggregate and "2 of K=3 update(s) from v4" in d.reason and "1 older" in d.reason
    d = decide_aggregation(c, 4, [p("A", 2, 2), p("B", 4, 4), p("C", 4, 4), p("D", 4, 4)], nr, 0)
    assert d.aggregate and [x.site for x in d.chosen] == ["A", "B", "C", "D"]
    # classic FedBuff: the stale update fills the buffer, and D's lands one version behind
    d = decide_aggregation(replace(c, buffer_trigger="any"), 4, [p("A", 2, 2), p("B", 4, 4), p("C", 4, 4)], nr, 0)
    assert d.aggregate and [x.site for x in d.chosen] == ["A", "B", "C"]


def test_async_fresh_trigger_never_waits_on_a_site_that_already_answered():
    # K = every site: the slow site's stale update is its answer for this version
    c = cfg(aggregation="async", rounds=10)
    d = decide_aggregation(c, 4, [p("A", 2, 2), p("B", 4, 4), p("C", 4, 4)], {s: 5 for s in "ABC"}, 0)
    assert d.aggregate and "every site that can still send" in d.reason
    # with a deadline, K updates of any age suffice once it has passed
    c = cfg(aggregation="async", buffer_size=2, rounds=10, deadline_s=30)
    pend, nr = [p("A", 2, 2), p("B", 4, 4)], {s: 5 for s in "ABC"}
    assert not decide_aggregation(c, 4, pend, nr, age_s=29).aggregate
    d = decide_aggregation(c, 4, pend, nr, age_s=31)
    assert d.aggregate and "deadline of 30 s" in d.reason


def test_buffer_trigger_is_validated():
    with pytest.raises(SchemaError, match="buffer_trigger must be one of"):
        cfg(aggregation="async", buffer_trigger="sometimes").validate("federation.json")


def test_async_k_capped_by_sites_that_can_still_send():
    c = cfg(aggregation="async", buffer_size=3)
    # A and B are done (3 rounds each); only C's one pending update can come
    d = decide_aggregation(c, 2, [p("C", 2, 2)], {"A": 3, "B": 3, "C": 3}, 0)
    assert d.aggregate
    d = decide_aggregation(c, 2, [], {"A": 3, "B": 3, "C": 3}, 0)
    assert d.aggregate and d.final and d.chosen == ()


def test_finished_federation_does_nothing():
    assert decide_aggregation(cfg(), 3, [p("A", 2, 2)], {}, 0).reason == "finished"


def test_update_from_the_future_is_rejected():
    _, bad = screen(cfg(aggregation="async"), 1, [p("A", 0, 5)])
    assert "newer than the current" in bad[0][1]


def test_site_decisions():
    c = cfg()
    assert decide_site(c, None, False, 0, None, False).action == "wait"
    d = decide_site(c, 0, False, 0, None, False)
    assert (d.action, d.round, d.base_version) == ("train", 0, 0)
    assert decide_site(c, 0, False, 1, 0, False).action == "wait"  # never twice from one global
    assert decide_site(c, 2, False, 1, 0, False).base_version == 2  # jumps to the newest global
    assert decide_site(c, 2, False, 3, 1, False).action == "wait"  # budget spent
    assert decide_site(c, 3, False, 3, 2, False).action == "finish"
    assert decide_site(c, 1, True, 1, 0, False).action == "finish"
    assert decide_site(c, 3, False, 3, 2, True).action == "done"


def test_setup_sequence():
    c = cfg()
    s = SetupState(census_sites={"A", "B"})
    assert setup_due(c, s) == "wait-census"
    s.census_sites.add("C")
    assert setup_due(c, s) == "census"
    s.census_published = True
    assert setup_due(c, s) == "wait-summaries"
    s.summary_sites = {"A", "B", "C"}
    assert setup_due(c, s) == "fingerprint"
    s.fingerprint_published = True
    s.plans_sites = {"A", "B", "C"}
    assert setup_due(c, s) == "v0"
    s.v0_published = True
    assert setup_due(c, s) == "rounds"
    assert setup_due(cfg(mode="asym"), SetupState(plans_sites={"A", "B", "C"})) == "v0"


def test_sync_rejected_sites_count_as_answered():
    c = cfg()
    d = decide_aggregation(c, 1, [p("A", 1, 1), p("B", 1, 1)], {"A": 2, "B": 2, "C": 2}, 0, rejected_sites={"C"})
    assert d.aggregate and [x.site for x in d.chosen] == ["A", "B"]
    d = decide_aggregation(c, 1, [], {"A": 2, "B": 2, "C": 2}, 0, rejected_sites={"A", "B", "C"})
    assert d.aggregate and d.chosen == () and "unchanged" in d.reason
