"""Secure aggregation wired into the roles: a toy federation (three sites, fedavg, sync) whose
aggregator only ever sees masked updates finishes, and its globals equal plain FedAvg's within
the fixed-point step; a site killed after masking is recovered from the survivors' shares, and
the next round closes without it at the deadline."""

from __future__ import annotations

import torch

from fedfs import layout
from fedfs.protocol.schema import GlobalManifest
from fedfs.testing.toy import drive, toy_federation
from fedfs.weights.tensors import load_weights


def final_weights(fed, tmp_path, version):
    m = fed.bucket.read(layout.global_version(version), GlobalManifest).doc
    return m, load_weights(fed.bucket.get_blob_file(m.blob, str(tmp_path / f"v{version}.safetensors")))[0]


def test_a_secure_federation_finishes_and_matches_plain_fedavg(tmp_path):
    # Prepare: the same three toy sites, once plain and once with secure aggregation
    plain, p_agg, p_sites = toy_federation(tmp_path / "plain", "ABC", mode="fedavg", rounds=2)
    secure, s_agg, s_sites = toy_federation(tmp_path / "secure", "ABC", mode="fedavg", rounds=2,
                                            secure_aggregation=True)
    # Execute
    drive(p_agg, p_sites, max_steps=80)
    drive(s_agg, s_sites, max_steps=80)
    # Assert: no update manifest was ever published; v1 (same inputs: v0 and one round) equals plain FedAvg
    assert not any("/updates/" in k for k in secure.store.list(layout.SITES))
    m1, w1 = final_weights(secure, tmp_path / "secure", 1)
    _, p1 = final_weights(plain, tmp_path / "plain", 1)
    assert sorted(c.site for c in m1.contributions) == ["A", "B", "C"] and "secure" in m1.report["rule"]
    for k, t in p1.items():
        assert torch.allclose(w1[k].double(), t.double(), rtol=1e-5, atol=1e-5), k
    m2, _ = final_weights(secure, tmp_path, 2)
    assert m2.final and all(s.state.final_version == 2 for s in s_sites.values())


def test_a_site_killed_after_masking_is_recovered_and_the_federation_finishes(tmp_path):
    import time

    # Prepare: C dies right after publishing its masked update of round 0
    fed, agg, sites = toy_federation(tmp_path, "ABC", mode="fedavg", rounds=2, secure_aggregation=True,
                                     deadline_s=1.0, min_sites=2)
    dead = False
    # Execute
    for _ in range(120):
        if all(sites[n].state.finished for n in "AB"):
            break
        agg.step()
        for n, s in sites.items():
            if n == "C" and dead:
                continue
            r = s.step()
            if n == "C" and ": masked" in r.detail:
                dead = True  # kill -9: C never steps again
        time.sleep(0.05)
    # Assert
    assert dead, "C never masked"
    # v1 holds C's masked update (its self-mask recovered from A's and B's shares); v2 goes on without C
    m1 = fed.bucket.read(layout.global_version(1), GlobalManifest).doc
    m2 = fed.bucket.read(layout.global_version(2), GlobalManifest).doc
    assert sorted(c.site for c in m1.contributions) == ["A", "B", "C"]
    assert sorted(c.site for c in m2.contributions) == ["A", "B"] and m2.final
    assert all(sites[n].state.final_version == 2 for n in "AB")
