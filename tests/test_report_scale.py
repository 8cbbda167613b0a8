"""The report past 30 sites: aggregated views first, the sites that stand out named, per-site detail folded.

A history dict in the shape :func:`fedfs.ops.history.collect_history` returns is built here for 64
sites, 3 rounds, async (so some updates are stale), with one site far worse than the others
(``S0013``: high loss, low pseudo-Dice), one far slower (``S0042``: an hour from each global to its
update, and one update fewer), one silent and one with a rejected file. Building it directly, not
from a bucket, keeps the test to a second and lets it name the outliers; the page is then rendered
by the real :func:`fedfs.ops.report.render_html` and :func:`fedfs.ops.plots.make_plots`.
"""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser

import pytest

from fedfs.ops.plots import make_plots
from fedfs.ops.report import render_html
from fedfs.ops.report_scale import SCALE_SITES, at_scale, phase_counts, round_summary, site_stats, standouts
from fedfs.protocol.timestamps import format_stamp

N = 64
T0 = 1_780_000_000.0
WORST, SLOW, SILENT, REJECTED = "S0013", "S0042", "S0007", "S0021"


def _history(n: int = N) -> dict:
    sites = [f"S{i:04d}" for i in range(n)]
    rounds = 3
    globals_ = []
    for v in range(rounds + 1):
        globals_.append({"version": v, "signed_at": format_stamp(T0 + 600 * v), "t": T0 + 600 * v,
                         "final": v == rounds, "report": {"rule": "FedBuff" if v else None, "reason": "K reached"},
                         "next_rounds": {}, "contributions": []})
    updates = []
    for i, s in enumerate(sites):
        sent = rounds - 1 if s == SLOW else rounds
        for r in range(sent):
            base = r
            delay = 3600.0 if s == SLOW else 60.0 + i
            loss = 0.5 / (r + 1) + 0.001 * i + (2.0 if s == WORST else 0.0)
            dice = 0.2 if s == WORST else 0.8 + 0.001 * (i % 50)
            version = min(rounds, base + 1 + (1 if i % 9 == 0 else 0))
            key = f"sites/{s}/updates/r{r:06d}.json"
            stale = version - 1 - base
            updates.append({"site": s, "round": r, "key": key, "base_version": base, "num_cases": 2 + i % 5,
                            "signed_at": format_stamp(T0 + 600 * base + delay), "metrics": {},
                            "named": {"train_loss": loss, "pseudo_dice": dice, "epoch_time": 1.0},
                            "version": version, "staleness": stale, "weight": 1.0 / (1 + stale) ** 0.5,
                            "state": "aggregated", "reason": None})
            globals_[version]["contributions"].append({"site": s, "round": r, "key": key, "base_version": base,
                                                       "staleness": stale, "weight": 1.0 / (1 + stale) ** 0.5})
    site_info = {}
    for i, s in enumerate(sites):
        phase = "done" if i % 4 else "waiting"
        site_info[s] = {"phase": phase, "message": "", "heartbeat_at": format_stamp(T0 + 2400),
                        "heartbeat_age_s": 30.0 if s != SILENT else 7200.0, "silent": s == SILENT, "metrics": {},
                        "cases": 2 + i % 5,
                        "plans": {"identifier": "SleepPlans", "configuration": "2d", "digest": "d" * 64,
                                  "summary": {"plans": {"plans_name": "SleepPlans"}}, "nnunet_version": "",
                                  "init_blob": None}}
    return {
        "url": "/tmp/bucket", "federation_id": "f" * 32, "federation_digest": "0" * 64,
        "generated_at": "2026-12-01 12:00 UTC",
        "config": {"mode": "fedavg", "aggregation": "async", "configuration": "2d", "rounds": rounds,
                   "local_epochs": 1, "aggregator": "agg", "sites": sites, "weighting": "cases", "align": "resolution",
                   "buffer_size": n // 2, "buffer_trigger": "fresh", "max_staleness": 8, "created": ""},
        "globals": globals_, "updates": updates, "sites": site_info,
        "rejected": [{"key": f"sites/{REJECTED}/updates/r000009.json", "by": "agg", "reason": "bad signature",
                      "at": format_stamp(T0 + 900)}],
        "aggregator": {"name": "agg", "phase": "finished", "heartbeat_at": format_stamp(T0 + 2400),
                       "heartbeat_age_s": 30.0, "dead": False, "waiting_on_it": [], "activity_age_s": 30.0},
        "census": None, "fingerprint": None, "layers": None, "problems": [],
    }


class _Page(HTMLParser):
    """Which <details> are open, the text inside and outside them, the images."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0
        self.details: list[dict] = []
        self.outside: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "details":
            self.depth += 1
            self.details.append({"id": a.get("id"), "open": "open" in a})
        if tag == "img":
            self.images.append(a.get("src", ""))

    def handle_endtag(self, tag):
        if tag == "details":
            self.depth -= 1

    def handle_data(self, data):
        if self.depth == 0:
            self.outside.append(data)


@pytest.fixture(scope="module")
def page():
    d = _history()
    html = render_html(d, make_plots(d))
    p = _Page()
    p.feed(html)
    return d, html, p


def test_the_history_is_past_the_threshold():
    d = _history()
    assert at_scale(d) and len(d["config"]["sites"]) > SCALE_SITES
    assert not at_scale(_history(SCALE_SITES))


def test_site_stats_find_the_outliers():
    d = _history()
    stats = site_stats(d)
    assert stats[WORST]["last_loss"] == max(st["last_loss"] for st in stats.values())
    assert stats[SLOW]["turnaround_s"] == 3600.0 and stats[SLOW]["updates"] == 2
    assert stats[REJECTED]["rejected"] == 1 and stats["S0000"]["rejected"] == 0
    picks = standouts(d, stats)
    assert picks["worst"][0][0] == WORST  # highest last loss first
    assert WORST in [s for s, why in picks["worst"] if "pseudo-Dice" in why]
    assert picks["slowest"][0][0] == SLOW
    attention = dict(picks["attention"])
    assert "silent" in attention[SILENT] and "rejected" in attention[REJECTED]
    assert phase_counts(d) == {"done": 48, "waiting": 16}


def test_round_summary_counts_each_round():
    rows = round_summary(_history())
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert [r["updates"] for r in rows] == [N, N, N - 1]  # the slow site sent one update fewer
    assert all(r["aggregated"] == r["updates"] for r in rows)
    assert rows[0]["stale_updates"] == sum(1 for i in range(N) if i % 9 == 0)
    assert rows[0]["loss_q10"] < rows[0]["loss_median"] < rows[0]["loss_q90"]


def test_page_leads_with_aggregates_and_folds_per_site_detail(page):
    d, html, p = page
    visible = " ".join(p.outside)
    assert "Sites by phase" in visible and "Needs attention" in visible and "Slowest" in visible
    for site in (WORST, SLOW, SILENT, REJECTED):
        assert site in visible, f"{site} is not named outside the folded sections"
    folded = {x["id"]: x["open"] for x in p.details}
    assert folded.get("all-sites") is False and folded.get("all-updates") is False
    # the visible text names only the standouts, not every site: per-site rows live in <details>
    named = set(re.findall(r"S\d{4}", visible))
    assert len(named) < 30, sorted(named)
    # the folded tables still hold every site and every update
    assert all(f">{s}<" in html or f" {s}<" in html for s in d["config"]["sites"])
    assert html.count("<tr>") >= len(d["updates"]) + N


def test_versions_are_summarised_not_listed(page):
    d, html, p = page
    visible = " ".join(p.outside)
    assert re.search(r"\d+ updates from \d+ sites; \d+ fresh, \d+ stale \(max \d+\)", visible)


def test_plots_are_quantile_views(page):
    d, html, p = page
    pngs = [src for src in p.images if src.startswith("data:image/png;base64,")]
    assert len(pngs) == 5  # loss, pseudo-Dice, durations, staleness, cases
    for src in pngs:
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(html) < 2_000_000
