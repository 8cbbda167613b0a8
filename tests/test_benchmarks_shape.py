"""Every stored benchmark result has the one output shape, and run_all.py renders each of them.

The shape (``benchmarks/_common.py``): ``{"benchmark": NAME, ..., "targets": {name: {"rule": str,
"value": number | str, "met": bool}}, "all_targets_met": bool}``. No benchmark runs here: the
stored JSON under ``benchmarks/results/`` is what ``docs/benchmarks.md`` is rendered from.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmark_module import load_benchmark

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
RESULTS = sorted(p for p in (BENCH / "results").glob("*.json") if p.name != "run_all.json")


@pytest.fixture(scope="module")
def run_all():
    return load_benchmark("run_all")


def test_every_benchmark_has_a_stored_result(run_all):
    assert {p.stem for p in RESULTS} == {b[0] for b in run_all.BENCHMARKS}


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.stem)
def test_stored_result_has_the_one_shape(path):
    # Prepare
    data = json.loads(path.read_text())
    # Assert: named, a non-empty targets map, each target exactly {rule, value, met}
    assert data["benchmark"] == path.stem
    targets = data["targets"]
    assert isinstance(targets, dict) and targets
    for name, t in targets.items():
        assert set(t) == {"rule", "value", "met"}, name
        assert isinstance(t["rule"], str) and t["rule"], name
        assert isinstance(t["value"], (int, float, str)) and not isinstance(t["value"], bool), name
        assert isinstance(t["met"], bool), name
    assert data["all_targets_met"] is all(t["met"] for t in targets.values())


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.stem)
def test_run_all_renders_each_result(run_all, path):
    # Prepare
    data = json.loads(path.read_text())
    # Execute: the section renderer run_all.py uses for this benchmark
    lines = run_all.RENDERERS.get(path.stem, run_all.render_generic)(data)
    # Assert: the targets table is there, one row per target
    text = "\n".join(lines)
    met = sum(t["met"] for t in data["targets"].values())
    assert f"Targets: {met} of {len(data['targets'])} met." in text
    for name in data["targets"]:
        assert f"| `{name}` |" in text, name


def test_the_page_renders_every_section(run_all):
    # Prepare
    records = json.loads((BENCH / "results" / "run_all.json").read_text())
    # Execute
    page = run_all.render_page(records, records["_meta"]["machine"])
    # Assert: no section fell back to "see the JSON"
    assert "could not render" not in page
    for name, *_ in run_all.BENCHMARKS:
        assert f"## {name}" in page


@pytest.mark.parametrize("targets", [
    {"detect_median_s<=0.5": True},                      # a map of booleans
    {"t": {"rule": "x <= 1", "value": 0.5}},             # no met
    {"t": {"rule": "x <= 1", "value": 0.5, "met": None}},  # met not a boolean
    {"t": {"rule": "x <= 1", "value": True, "met": True}},  # value not a number or a string
    {},                                                  # nothing to judge
])
def test_run_all_refuses_other_shapes(run_all, targets):
    data = {"benchmark": "x", "targets": targets, "all_targets_met": True}
    with pytest.raises(ValueError):
        run_all.targets_table(data)


def test_a_bare_all_targets_met_is_not_the_shape(run_all):
    with pytest.raises(ValueError):
        run_all.targets_table({"benchmark": "x", "all_targets_met": True})
