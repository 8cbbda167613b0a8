"""The report's slips a newcomer hit (issue 15, item 10), on a small toy federation.

Before: 2D data's fingerprint spacing read "999 × 1 × 1" (nnU-Net's dummy first axis); pseudo-Dice
was said to be measured on "held-out cases" (it is the fold's validation split); nnU-Net's final
validation Dice was not shown; rounds were 1-3 in the plots and r0-r2 in the tables; an async
federation's FedAvg globals were labelled plainly "FedAvg"; and in AsymFedAvg the page said the
fingerprint was merged, then that none was.
"""

from __future__ import annotations

import re

import pytest

from fedfs.ops.history import collect_history, fingerprint_summary
from fedfs.ops.report import render_html
from fedfs.ops.status import rule_label
from fedfs.testing.toy import ToyWork, toy_federation


class ValidatingToy(ToyWork):
    """ToyWork whose finish reports a final validation Dice, as NnunetWork.finish does."""

    def finish(self, global_path: str):
        return {**super().finish(global_path), "validation_dice": 0.8125}


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    fed, aggregator, by_name = toy_federation(tmp_path_factory.mktemp("slips"), work=ValidatingToy, rounds=2)
    sites = list(by_name.values())
    for _ in range(40):
        if all(s.state.finished for s in sites):
            break
        aggregator.step()
        for s in sites:
            s.step()
    assert all(s.state.finished for s in sites)
    return collect_history(fed, layers=False)


def _page(d) -> str:
    return render_html(d, {})


def _section(page: str, sid: str) -> str:
    return page[page.index(f"<section id='{sid}'>"):].split("</section>", 1)[0]


def test_2d_spacing_drops_nnunets_dummy_axis():
    fp = {"spacings": [[999.0, 0.5, 0.5], [999.0, 0.7, 0.7]], "shapes_after_crop": [[1, 64, 64], [1, 80, 80]]}
    s = fingerprint_summary(fp, 2, ["A"])
    assert s["dims"] == 2 and s["spacing"]["median"] == [0.6, 0.6] and s["shape"]["median"] == [72.0, 72.0]
    three_d = fingerprint_summary({"spacings": [[3.0, 0.7, 0.7]], "shapes_after_crop": [[40, 64, 64]]}, 1, ["A"])
    assert three_d["dims"] == 3 and three_d["spacing"]["median"] == [3.0, 0.7, 0.7]


def test_report_shows_2d_spacing_in_plane(history):
    d = {**history, "fingerprint": fingerprint_summary(
        {"spacings": [[999.0, 0.5, 0.5]], "shapes_after_crop": [[1, 64, 64]]}, 1, ["A"])}
    fp = _section(_page(d), "fingerprint")
    assert "Median spacing (2D: in-plane)" in fp and "0.5 × 0.5" in fp and "999" not in fp


def test_pseudo_dice_is_on_the_folds_validation_split(history):
    page = _page(history)
    assert "held-out" not in page and "validation split of the site's fold" in page


def test_final_validation_dice_is_shown(history):
    sites = _section(_page(history), "sites")
    assert "Final validation Dice" in sites and sites.count("0.812") == 2  # A and B


def test_rounds_are_numbered_one_way(history):
    page = _page(history)
    tables = _section(page, "rounds") + _section(page, "updates")
    assert not re.search(r"\br\d+\b", tables), re.findall(r".{30}\br\d+\b.{10}", tables)[:3]
    assert "A (round 1, w=" in tables and "A (round 2, w=" in tables


def test_async_fedavg_globals_say_why():
    assert rule_label("FedAvg", "sync") == "FedAvg"
    assert rule_label("FedAvg", "async").startswith("FedAvg (async; every update fresh")
    assert rule_label("FedBuff", "async") == "FedBuff" and rule_label(None, "async") == "initial"


def test_async_report_names_the_rule(history):
    d = {**history, "config": {**history["config"], "aggregation": "async"}}
    assert "FedAvg (async; every update fresh at eta 1" in _section(_page(d), "rounds")


def test_each_mode_says_once_what_happens_to_the_fingerprint(history):
    ffe = _section(_page(history), "fingerprint")
    assert "are merged into one federation-wide nnU-Net fingerprint" in ffe and "no fingerprint" not in ffe
    asym = _section(_page({**history, "config": {**history["config"], "mode": "asym"}, "fingerprint": None}),
                    "fingerprint")
    assert "no fingerprint is merged" in asym and "merged into" not in asym and "merged from" not in asym
