"""The round-overhead benchmark's core, small: idle polls cost the same at any version, and each
site moves one model each way per round (benchmarks/round_overhead.py measures it at nnU-Net size)."""

from __future__ import annotations

import pytest

from benchmark_module import load_benchmark


@pytest.fixture(scope="module")
def ro():
    return load_benchmark("round_overhead")


def test_idle_poll_cost_does_not_grow_with_history(ro, tmp_path, keys):
    # Prepare / Execute: a tiny-model federation driven to v12, idle polls counted at v1 and v12
    polls = ro.measure_idle_polls(str(tmp_path / "bucket"), keys, tmp_path / "work", at=(1, 12))
    early, late = polls["v1"], polls["v12"]
    # Assert: the same requests, op by op, for every party, and a small constant
    for party in (ro.AGGREGATOR, *ro.SITES, "aggregator_partial"):
        assert late[party]["ops"] == early[party]["ops"], party
        assert late[party]["requests"] == early[party]["requests"], party
        assert "download" not in late[party]["ops"], party
        # sites never list; the aggregator lists the inbox once (1,000 markers a request), whatever N is
        assert late[party]["ops"].get("list", 0) == (0 if party in ro.SITES else 1), party
        assert late[party]["bytes_up"] == 0, f"{party}: a steady idle poll writes nothing"
    for site in ro.SITES:
        assert early[site]["requests"] <= 3  # the latest hint and a probe of the next version
    for party in (ro.AGGREGATOR, "aggregator_partial"):  # hint, next version, the inbox: no probe per site
        assert early[party]["requests"] <= 3, (party, early[party])


def test_each_site_uploads_one_update_and_downloads_one_global_per_round(ro, tmp_path, keys):
    # Prepare / Execute: 3 sites + aggregator, each its real run_loop in a thread, polling a folder
    rounds = 3
    results = ro.run_federation(str(tmp_path / "bucket"), keys, tmp_path / "work", rounds=rounds, watch="poll",
                                poll_interval=0.05, model="tiny", sleep_s=0.0, processes=False, timeout_s=60)
    # Assert: between set-up and each update, exactly one model up and one down
    for site in ro.SITES:
        acts = results[site]["actions"]
        planned = next(a[2] for a in acts if a[1] == "planned")
        updates = [a[2] for a in acts if a[1] == "update"]
        assert len(updates) == rounds
        bounds = [planned, *updates]
        for r in range(rounds):
            assert ro.blob_transfers(results[site], bounds[r], bounds[r + 1]) == {"uploads": 1, "downloads": 1}, \
                f"site {site} round {r}"
        assert ro.blob_transfers(results[site], 0, planned) == {"uploads": 1, "downloads": 0}  # initial weights
        assert ro.blob_transfers(results[site], updates[-1]) == {"uploads": 0, "downloads": 1}  # the final global
        assert len(results[site]["loaded_at"]) == rounds + 1
    timing = ro.analyse(results, rounds)
    assert len(timing["rounds_detail"]) == rounds
    assert all(d["detect_s"] > 0 for d in timing["rounds_detail"])
