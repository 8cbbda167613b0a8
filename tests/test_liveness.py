"""Liveness: heartbeat ages, silent sites, a dead aggregator, outage logging (issue 15, item 9).

Before: a site killed mid-training showed "training" with no warning an hour later, a dead
aggregator was not flagged, and a daemon logged one warning per poll during an outage (or
nothing between them). A toy federation on a folder (ToyWork, seconds) is stopped half-way
and looked at "an hour later" by passing ``now``.
"""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import pytest
from rich.console import Console

from fedfs import layout
from fedfs.errors import StoreUnavailable
from fedfs.federation import Federation, config_from_key_dir
from fedfs.ops.history import collect_history
from fedfs.ops.report import render_html
from fedfs.ops.status import SILENT_AFTER_S, collect_status, render_status
from fedfs.protocol.schema import Heartbeat
from fedfs.roles.aggregator import Aggregator
from fedfs.roles.heartbeat import HeartbeatWriter
from fedfs.roles.loop import Outage, run_loop
from fedfs.roles.site import Site
from fedfs.roles.steps import Action, StepResult
from fedfs.testing.toy import ToyWork, toy_federation
from fedfs.trust.signing import generate_keypair

HOUR = 3600.0
_NOW = time.time()


@pytest.fixture(scope="module")
def half_way(tmp_path_factory):
    """v0 out, then every site publishes its r0 update and everything stops: the aggregator 'died'."""
    fed, aggregator, sites = toy_federation(tmp_path_factory.mktemp("live"), rounds=3)
    for _ in range(30):  # the aggregator runs until v0 is out, the sites until each sent r0
        if aggregator.latest_version() is None:
            aggregator.step()
        for s in sites.values():
            if s.state.updates_sent == 0:
                s.step()
    assert aggregator.latest_version() == 0 and all(s.state.updates_sent == 1 for s in sites.values())
    sites["A"].heartbeat("training", "round r1 from v0")  # A was killed in its next round
    return fed


def _text(d) -> str:
    console = Console(width=200, record=True)
    console.print(render_status(d))
    return console.export_text()


def test_fresh_parties_are_not_flagged(half_way):
    d = collect_status(half_way)
    assert not any(s["silent"] for s in d["sites"].values())
    a = d["aggregator"]
    assert a["name"] == "agg" and a["phase"] and a["heartbeat_age_s"] < 60 and not a["dead"]
    assert a["waiting_on_it"] == ["A's update r0", "B's update r0"]
    text = _text(d)
    assert "SILENT" not in text and "DEAD" not in text and "Aggregator agg:" in text


def test_an_hour_later_sites_are_silent_and_the_aggregator_dead(half_way):
    d = collect_status(half_way, now=time.time() + HOUR)
    a_site = d["sites"]["A"]
    assert a_site["phase"] == "training" and a_site["heartbeat_age_s"] > HOUR - 60 and a_site["silent"]
    assert d["sites"]["B"]["silent"] and d["silent_after_s"] == SILENT_AFTER_S
    assert d["aggregator"]["dead"]
    text = _text(d)
    assert "60m ago SILENT" in text
    assert "Site A is silent: its last heartbeat (training) is 60m ago" in text
    assert "DEAD? no sign of the aggregator for 60m (over 10m)" in text and "A's update r0" in text


def test_report_flags_silent_sites_and_a_dead_aggregator(half_way, monkeypatch):
    import fedfs.ops.history as history

    monkeypatch.setattr(history.time, "time", lambda: _NOW + HOUR)
    page = render_html(collect_history(half_way, layers=False), {})
    assert page.count(">silent</span>") == 2
    assert "aggregator silent" in page and "fedfs aggregator run" in page


def test_a_finished_federation_flags_nothing(tmp_path):
    keys = tmp_path / "keys"
    generate_keypair("agg", "aggregator", keys)
    generate_keypair("A", "site", keys)
    config, agg = config_from_key_dir(keys, ["A"], rounds=1)
    fed, _ = Federation.create(str(tmp_path / "bucket"), config, agg)
    aggregator = Aggregator(fed.as_party(keys / "agg.key"), tmp_path / "agg")
    site = Site(fed.as_party(keys / "A.key"), ToyWork("A", cases=2), tmp_path / "A")
    for _ in range(20):
        aggregator.step()
        if site.step().action == "finished":
            break
    assert aggregator.step().action == "finished"
    d = collect_status(fed, now=time.time() + HOUR)
    assert d["global"]["final"] and d["sites"]["A"]["phase"] == "done"
    assert not d["sites"]["A"]["silent"] and not d["aggregator"]["dead"]
    hb = fed.bucket.read(layout.AGG_HEARTBEAT, Heartbeat)
    assert hb.doc.party == "agg" and hb.doc.phase == "finished"


class _Recorder:
    def __init__(self) -> None:
        self.docs: list[Heartbeat] = []

    def write_mutable(self, key, doc, identity) -> None:
        self.docs.append(doc)


def test_heartbeat_is_refreshed_during_a_long_step():
    """Before: one heartbeat at the start of a round; a 40-minute nnU-Net round looked dead."""
    rec = _Recorder()
    w = HeartbeatWriter(rec, "sites/A/heartbeat.json", SimpleNamespace(name="A"), every_s=0.05)  # type: ignore[arg-type]
    w.beat("training", "round r1 from v0", round=1, base_version=0)
    w.beat("training", "round r1 from v0", round=1, base_version=0)  # unchanged, too soon: not written
    assert len(rec.docs) == 1
    with w.alive():
        with w.alive():  # nested: one thread
            time.sleep(0.4)
    n = len(rec.docs)
    assert 4 <= n <= 10 and all(d.phase == "training" and d.round == 1 for d in rec.docs)
    time.sleep(0.15)
    assert len(rec.docs) == n  # the thread stopped with the step


def test_outage_logs_first_then_every_minute_then_recovery(caplog):
    clock = [0.0]
    o = Outage(every_s=60, clock=lambda: clock[0])
    with caplog.at_level(logging.WARNING, "fedfs.roles.loop"):
        for t in range(0, 150, 5):
            clock[0] = float(t)
            o.failed(StoreUnavailable("s3://b/fed/aggregator/latest.json: EndpointConnectionError"))
        clock[0] = 152.0
        o.recovered()
        o.recovered()
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs[0].startswith("storage unreachable, retrying: s3://b/fed")
    assert [m.split(":")[0] for m in msgs[1:3]] == ["storage still unreachable (60 s)",
                                                    "storage still unreachable (120 s)"]
    assert msgs[3] == "storage reachable again after 152 s" and len(msgs) == 4


def test_run_loop_retries_through_an_outage(caplog):
    calls = iter([StoreUnavailable("down"), StoreUnavailable("down"), StepResult(Action.FINISHED, "done")])

    def step():
        x = next(calls)
        if isinstance(x, Exception):
            raise x
        return x

    trigger = SimpleNamespace(wait=lambda timeout=None: False)
    with caplog.at_level(logging.WARNING, "fedfs.roles.loop"):
        assert run_loop(step, trigger).action == "finished"  # type: ignore[arg-type]
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs[0] == "storage unreachable, retrying: down" and msgs[-1].startswith("storage reachable again")
    assert len(msgs) == 2


def test_a_cli_daemon_refreshes_its_heartbeat_between_polls():
    """`fedfs site run` / `aggregator run`: the heartbeat is refreshed every minute while the daemon
    lives, whatever its --poll-interval, not only when a step happens to run."""
    from fedfs.cli.roles import _daemon
    from fedfs.store import MemoryStore

    rec = _Recorder()
    liveness = HeartbeatWriter(rec, "sites/A/heartbeat.json", SimpleNamespace(name="A"), every_s=0.05)  # type: ignore[arg-type]
    liveness.beat("waiting", "waiting for v1")
    results = iter([StepResult(Action.WAIT, "waiting for v1")] * 3 + [StepResult(Action.FINISHED, "done")])
    role = SimpleNamespace(fed=SimpleNamespace(store=MemoryStore()), liveness=liveness, step=lambda: next(results))
    _daemon(role, watch="poll", poll_interval=0.2, who="site A", logger="fedfs.test")  # 3 polls: over 0.4 s
    assert len(rec.docs) >= 5 and {d.phase for d in rec.docs} == {"waiting"}
