"""``fedfs status`` past 40 sites: counts by phase and the sites that stand out, not one row per site.

A real toy federation of 45 sites on a folder (ToyWork, one round) is run to its end; one site's
update slot was squatted by a junk file before it published, so the aggregator rejects that file
with a reason and the site must be shown. ``--all`` still lists every site; ``--json`` is unchanged.
"""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner
from rich.console import Console

from fedfs import layout
from fedfs.cli import main
from fedfs.ops.status import collect_status, render_status
from fedfs.ops.status_scale import STATUS_ROWS, TOP_SITES, notable_sites, phase_line
from fedfs.testing.toy import toy_federation

N = 45
NAMES = [f"S{i:02d}" for i in range(N)]
SQUATTED = "S17"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    fed, aggregator, sites = toy_federation(tmp_path_factory.mktemp("big"), NAMES, rounds=1)
    fed.store.publish(layout.site_update(SQUATTED, 0), b"not a signed document")  # junk at its r0 slot
    for _ in range(40):
        aggregator.step()
        for s in sites.values():
            s.step()
        if aggregator.latest_version() == 1 and all(s.state.finished for s in sites.values()):
            break
    assert aggregator.latest_version() == 1
    return fed


def _text(d, **kw) -> str:
    console = Console(width=250, record=True)
    console.print(render_status(d, **kw))
    return console.export_text()


def _rows(text: str) -> set[str]:
    return set(re.findall(r"^│ (S\d\d) ", text, flags=re.M))


def test_past_forty_sites_only_the_sites_that_stand_out_are_listed(finished):
    assert N > STATUS_ROWS
    d = collect_status(finished)
    why = notable_sites(d)
    assert "rejected files" in why[SQUATTED]
    assert 0 < len(why) <= 2 + 4 * TOP_SITES < N
    assert not any("stalest" in w for w in why.values())  # sync: every site equally stale, none stands out
    text = _text(d)
    assert phase_line(d) in text and phase_line(d).startswith(f"{N} sites: ")
    assert f"Sites that stand out ({len(why)} of {N};" in text and "fedfs status --all" in text
    assert _rows(text) == set(why)
    assert re.search(rf"│ {SQUATTED} .*rejected files", text)
    assert f"{N} updates; staleness min / median / max 0 / 0 / 0" in text  # contributions, folded


def test_all_lists_every_site(finished):
    text = _text(collect_status(finished), all_sites=True)
    assert _rows(text) == set(NAMES)
    assert "Sites that stand out" not in text and "Contributions to v1" in text


def test_cli_status_folds_by_default_and_all_unfolds(finished):
    url = finished.store.root  # the bucket folder
    runner = CliRunner()
    short = runner.invoke(main, ["status", url])
    full = runner.invoke(main, ["status", url, "--all"])
    assert short.exit_code == 0, short.output
    assert full.exit_code == 0, full.output
    assert len(_rows(short.output)) < N and _rows(full.output) == set(NAMES)
    as_json = runner.invoke(main, ["status", url, "--json"])
    assert set(json.loads(as_json.output)["sites"]) == set(NAMES)
