"""Secure FFE wired into the set-up phase: the same toy data federated once with plain FFE and
once with secure aggregation give the same merged fingerprint, while the secure federation's
bucket holds no site's case count (census) or intensity table; sites and the aggregator killed
mid-session resume; data an integer grid cannot hold is refused naming the site."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedfs import layout
from fedfs.errors import ConfigError
from fedfs.protocol.schema import Census, FingerprintSummary, GlobalFingerprint, GlobalManifest, SiteCensus
from fedfs.roles.aggregator import Aggregator
from fedfs.roles.site import Site
from fedfs.testing.toy import ToyWork, drive, step_all, toy_federation
from fedfs.weights.tensors import load_weights

CASES = {"A": 2, "B": 3, "C": 5}


def federation(root, **settings):
    fed, agg, sites = toy_federation(root, "ABC", mode="ffe", rounds=1, **settings)
    for s, site in sites.items():
        site.work.cases = CASES[s]
    return fed, agg, sites


def merged(fed):
    return fed.bucket.read(layout.GLOBAL_FINGERPRINT, GlobalFingerprint).doc


def assert_same_fingerprint(secure, plain):
    secure, plain = dict(secure), dict(plain)
    ps = secure.pop("foreground_intensity_properties_per_channel")
    pp = plain.pop("foreground_intensity_properties_per_channel")
    assert secure == plain  # spacings, shapes after crop, median relative size: identical
    assert sorted(ps) == sorted(pp)
    for c in ps:
        for k in ("median", "min", "max", "percentile_00_5", "percentile_99_5"):
            assert ps[c][k] == pp[c][k], (c, k)  # order statistics: bit for bit
        for k in ("mean", "std"):  # the secure value is the correctly rounded exact one; plain's float merge
            assert ps[c][k] == pytest.approx(pp[c][k], rel=1e-13, abs=0), (c, k)  # may differ in the last bits


def test_secure_ffe_federation_gives_plain_ffe_fingerprint_and_hides_counts(tmp_path):
    # Prepare: the same three toy sites (2, 3 and 5 cases), plain and secure
    plain, p_agg, p_sites = federation(tmp_path / "plain")
    secure, s_agg, s_sites = federation(tmp_path / "secure", secure_aggregation=True)
    # Execute
    drive(p_agg, p_sites)
    drive(s_agg, s_sites)
    # Assert: the merged fingerprint is plain FFE's
    assert_same_fingerprint(merged(secure).fingerprint, merged(plain).fingerprint)
    assert merged(secure).total_cases == merged(plain).total_cases == 10
    # ... the merged census holds the total only, each site's census no count, each summary no intensity table
    census = secure.bucket.read(layout.CENSUS, Census).doc
    assert census.masked and census.sites == {} and census.total_cases == 10 and census.num_channels == 1
    for s in CASES:
        sc = secure.bucket.read(layout.site_census(s), SiteCensus).doc
        assert sc.masked and sc.num_cases == 0 and sc.labels == {"background": 0, "foreground": 1}
        summary = secure.bucket.read(layout.site_fingerprint(s), FingerprintSummary).doc.summary
        assert "channels" not in summary and summary["num_cases"] == CASES[s]  # geometry only (one record a case)
        assert not (tmp_path / "secure" / s / "secagg").exists() or not any(
            (tmp_path / "secure" / s / "secagg").glob("ffe-*"))  # set-up secrets forgotten once the merge is out
    for session in ("ffe-census", "ffe-summary"):
        assert secure.store.exists(f"aggregator/secagg/{session}/masked.json")
    # ... and the secure round weighs each site by its own case count: v1 equals plain FFE's case-weighted v1
    w = {}
    for name, fed in (("plain", plain), ("secure", secure)):
        m = fed.bucket.read(layout.global_version(1), GlobalManifest).doc
        w[name] = load_weights(fed.bucket.get_blob_file(m.blob, str(tmp_path / f"{name}.safetensors")))[0]
    for k, t in w["plain"].items():
        assert torch.allclose(w["secure"][k].double(), t.double(), rtol=0, atol=1e-6), k


def test_secure_ffe_resumes_after_crashes_mid_session(tmp_path):
    # Prepare: C is killed after masking its census and after sharing in the summary merge; the aggregator
    # is killed after the census roster of the masked stage; each comes back as a new process on its workdir
    plain, p_agg, p_sites = federation(tmp_path / "plain")
    drive(p_agg, p_sites)
    fed, agg, sites = federation(tmp_path / "secure", secure_aggregation=True)
    keys = tmp_path / "secure" / "keys"
    crashes = []

    def on_step(name, r):
        if name == "C" and r.detail in ("secure census: masked", "secure fingerprint merge: shared"):
            work = ToyWork("C", cases=CASES["C"], seed=2)
            sites["C"] = Site(fed.as_party(keys / "C.key"), work, tmp_path / "secure" / "C")
            crashes.append(r.detail)

    # Execute
    for _ in range(6):
        agg.step()
        for name in list(sites):
            on_step(name, sites[name].step())
    agg = Aggregator(fed.as_party(keys / "agg.key"), tmp_path / "secure" / "agg")
    drive(agg, sites, on_step=on_step)
    # Assert
    assert crashes == ["secure census: masked", "secure fingerprint merge: shared"]
    assert_same_fingerprint(merged(fed).fingerprint, merged(plain).fingerprint)


class RealValued(ToyWork):
    """A site whose intensities are not integers (say, MRI stored as float)."""

    def fingerprint_summary(self, total_cases):
        from fedfs.fl.fingerprint import SiteSummaryBuilder, summarize_samples

        rng = np.random.default_rng(self.seed)
        spc = int(1000 // total_cases)
        b = SiteSummaryBuilder(1, total_cases, spc)
        for _ in range(self.cases):
            b.add_case([1.0, 1.0], [64, 64], 1.0, [summarize_samples(rng.normal(0.5, 0.1, spc).astype(np.float32))],
                       "float32")
        return b.summary()


def test_secure_ffe_refuses_real_valued_intensities_and_redo(tmp_path):
    fed, agg, sites = toy_federation(tmp_path, "ABC", mode="ffe", rounds=1, secure_aggregation=True,
                                     work=RealValued)
    with pytest.raises(ConfigError, match="cannot be superseded"):
        sites["A"].setup.redo()
    with pytest.raises(ConfigError, match=r"site A's fingerprint summary, channel 0: secure FFE needs integer "
                                          r"intensities.*not all integers.*without --secure-aggregation"):
        for _ in range(12):
            agg.step()
            for s in sites.values():
                s.step()
    assert not fed.store.exists(layout.site_fingerprint("A"))  # nothing of its intensities was published


def test_secure_ffe_with_nnunet_gives_plain_ffe_fingerprint(tmp_path, monkeypatch):
    """Real nnU-Net sampling (three small CT-like sites): a secure federation's set-up phase up to the
    merged fingerprint (planning is tests/test_ffe_bucket.py's) gives what plain FFE's aggregator merges
    from the very summaries the sites computed (nnU-Net's sampling costs ~13 s a site, so once)."""
    from fedfs.federation import Federation, config_from_key_dir
    from fedfs.fl.fingerprint import merge_census, merge_summaries
    from fedfs.nnunet.work import NnunetOptions, NnunetWork
    from fedfs.trust.signing import generate_keypair
    from test_ffe_nnunet import SITES, _case, _write

    # Prepare
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))
    rs = np.random.RandomState(3)
    for site, (ds_id, n, spacing, hu) in SITES.items():
        _write(str(tmp_path / "nnUNet_raw"), ds_id, f"Site{site}", [(f"{site}{i}", *_case(rs, spacing, hu))
                                                                     for i in range(n)])
    keys = tmp_path / "keys"
    generate_keypair("agg", "aggregator", keys)
    for s in SITES:
        generate_keypair(s, "site", keys)
    config, agg_key = config_from_key_dir(keys, list(SITES), mode="ffe", rounds=1, secure_aggregation=True)
    fed, _ = Federation.create(str(tmp_path / "bucket"), config, agg_key)
    agg = Aggregator(fed.as_party(keys / "agg.key"), tmp_path / "agg")
    sites = {s: Site(fed.as_party(keys / f"{s}.key"), NnunetWork(NnunetOptions(
        dataset=str(ds), num_processes=1, num_processes_fingerprint=1)), tmp_path / s)
        for s, (ds, *_) in SITES.items()}
    # Execute: step until the merged fingerprint is out (before anyone plans)
    for _ in range(20):
        agg.step()
        if fed.store.exists(layout.GLOBAL_FINGERPRINT):
            break
        for site in sites.values():
            site.step()
    # Assert: plain FFE's merge of the sites' own (full) summaries, which never left them
    summaries = {s: site.setup.summary_for(merged(fed).total_cases) for s, site in sites.items()}
    census = merge_census({s: {"num_cases": SITES[s][1], "num_channels": 1} for s in SITES})
    plain = merge_summaries(json_trip(summaries), census)
    assert_same_fingerprint(merged(fed).fingerprint, plain)
    assert summaries["A"]["channels"][0]["mantissa_bits"] is None  # exact tables: real CT-like integers
    assert len(plain["spacings"]) == census["total_cases"] == 12


def json_trip(doc):
    import json

    return json.loads(json.dumps(doc, allow_nan=False))


def test_secure_ffe_checks_max_cases_on_the_case_records(tmp_path):
    # Prepare: C has 5 cases, the federation's bound is 4 (its census count is masked; its geometry is not)
    fed, agg, sites = federation(tmp_path, secure_aggregation=True, max_cases=4)
    # Execute
    results = step_all(agg, sites, 12)
    # Assert: the aggregator is blocked before the fingerprint merge, naming C; C's step says so too
    assert results[-1].action == "blocked" and "site C claims 5 training cases" in results[-1].detail
    assert not fed.store.exists(layout.GLOBAL_FINGERPRINT)
    assert sites["C"].step().action == "blocked" and sites["A"].step().action == "wait"


def test_a_corrupt_masked_census_blocks_the_set_up_naming_the_site(tmp_path):
    from test_secure_hardening import corrupt_blob

    # Prepare: B's masked census input is altered in the bucket before the aggregator closes the masked stage
    fed, agg, sites = federation(tmp_path, secure_aggregation=True)
    key = "sites/B/secagg/ffe-census/masked.json"
    results = []
    for _ in range(12):
        results.append(agg.step())
        for s in sites.values():
            s.step()
        if fed.store.exists(key) and not fed.store.exists("aggregator/secagg/ffe-census/masked.json"):
            corrupt_blob(fed, key)
    # Assert: the census is not published; the aggregator says why, naming B, and records the refusal
    assert not fed.store.exists(layout.CENSUS)
    assert results[-1].action == "blocked" and "without B" in results[-1].detail
    assert key in agg.quarantine and "sha256" in agg.quarantine.reason(key)
    assert sites["B"].step().action == "blocked"


def test_secure_ffe_set_up_with_every_party_restarted_before_every_step(tmp_path):
    # Prepare: a new process for every party at every step (state only in workdirs and the bucket)
    plain, p_agg, p_sites = federation(tmp_path / "plain")
    drive(p_agg, p_sites)
    fed, _, _ = federation(tmp_path / "secure", secure_aggregation=True)
    root, keys = tmp_path / "secure", tmp_path / "secure" / "keys"
    # Execute
    for _ in range(40):
        if fed.store.exists(layout.global_version(0)):
            break
        Aggregator(fed.as_party(keys / "agg.key"), root / "agg").step()
        for i, s in enumerate(CASES):
            Site(fed.as_party(keys / f"{s}.key"), ToyWork(s, cases=CASES[s], seed=i), root / s).step()
    # Assert
    assert fed.store.exists(layout.global_version(0))
    assert_same_fingerprint(merged(fed).fingerprint, merged(plain).fingerprint)
