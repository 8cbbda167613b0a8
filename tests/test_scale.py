"""The scale benchmark's core, small: 30 site processes and the aggregator finish, sleeping sites load
neither torch nor nnU-Net, and an idle poll costs the same number of requests whatever N
(benchmarks/scale.py measures it with 100 processes and 1,000 simulated sites).

Each party is its own OS process (``python benchmarks/scale.py --party SPEC``: the real role loop
polling a folder, every store call counted). Only counts are asserted, never timings.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmark_module import load_benchmark

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "scale.py"


@pytest.fixture(scope="module")
def scale():
    return load_benchmark("scale")


@pytest.fixture(scope="module")
def thirty(scale, tmp_path_factory):
    """30 site processes + the aggregator on a folder, sync, 2 rounds, sleeps 0.2-4 s."""
    root = tmp_path_factory.mktemp("scale")
    return scale.run_processes("folder", 30, "sync", 2, 0.2, root, None, timeout_s=240)


@pytest.fixture(scope="module")
def small_sim(scale, tmp_path_factory):
    """5 simulated sites in this process: the idle polls at small N to compare with."""
    return scale.simulate(5, "sync", 2, 60.0, tmp_path_factory.mktemp("sim"))


@pytest.fixture(scope="module")
def folded_sim(scale, tmp_path_factory):
    """45 simulated sites (past the 40 where ``fedfs status`` folds its table), with the tools timed."""
    return scale.simulate(45, "sync", 1, 60.0, tmp_path_factory.mktemp("sim45"), report=True)


def test_thirty_processes_finish(thirty):
    assert thirty["completed"], thirty["failures"]
    assert thirty["updates_per_version"] == 30


def test_sleeping_sites_load_neither_torch_nor_nnunet(thirty):
    assert thirty["site_heavy_modules"] == []
    assert thirty["aggregator_heavy_modules"] == ["torch"]  # the aggregator combines tensors with torch


def test_site_idle_poll_is_constant(thirty, small_sim):
    polls = thirty["idle_poll_site_requests"]
    assert polls["n"] > 30  # every site polled while it waited
    assert polls["mode"] == small_sim["idle_poll_site_requests"] == 2  # the latest hint and the next version
    assert polls["max"] <= 3  # a heartbeat check at most once a minute


def test_aggregator_idle_poll_does_not_grow_with_n(thirty, small_sim):
    assert thirty["idle_poll_aggregator_requests"]["n"] > 0
    assert thirty["idle_poll_aggregator_requests"]["mode"] == small_sim["idle_poll_aggregator_requests"], (
        f"an idle aggregator poll costs {thirty['idle_poll_aggregator_requests']['mode']} requests with 30 sites, "
        f"{small_sim['idle_poll_aggregator_requests']} with 5")


def test_tools_timed_folded_all_json_and_report(folded_sim):
    tools = folded_sim["tools"]
    assert set(tools) == {"status", "status_all", "status_json", "report"}
    assert all(t["exit_code"] == 0 and t["bytes"] > 0 for t in tools.values()), tools
    # past 40 sites the text form names only the sites that stand out; --all prints a row for each
    assert tools["status"]["bytes"] < tools["status_all"]["bytes"], tools


def test_script_runs_from_another_folder(tmp_path):
    # the CLI imports its sibling modules (scale_common, scale_processes, scale_sim) from its own folder
    done = subprocess.run([sys.executable, str(BENCH), "--help"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--no-processes" in done.stdout
