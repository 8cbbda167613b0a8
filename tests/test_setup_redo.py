"""Recoverable set-up (issue 15, items 1 and 2): a wrong census is superseded before v0, sites
with different labels are refused naming both, the blocked party's counterpart says "blocked",
``fedfs init`` checks the configuration name, and a missing label file is caught before the census.

Toy federations (fedfs.testing.toy.ToyWork) on a folder bucket; one real nnU-Net dataset check.
"""

from __future__ import annotations

import pytest

from fedfs import layout
from fedfs.errors import ConfigError
from fedfs.federation import Federation, config_from_key_dir
from fedfs.protocol.schema import Census, GlobalManifest, PlansDocument, SiteCensus, StatusDocument
from fedfs.roles.aggregator import Aggregator
from fedfs.roles.site import Site
from fedfs.testing.toy import ToyWork

REDO = "fedfs site fingerprint --redo"


def toy_federation(tmp_path, keys, labels=None, **settings):
    config, agg = config_from_key_dir(keys, ["A", "B", "C"], rounds=1, **settings)
    fed, _ = Federation.create(str(tmp_path / "bucket"), config, agg)
    aggregator = Aggregator(fed.as_party(keys / "agg.key"), tmp_path / "agg")
    labels = labels or {}
    sites = {s: Site(fed.as_party(keys / f"{s}.key"),
                     ToyWork(s, cases=c, seed=i + 1, labels=labels.get(s)),
                     tmp_path / f"site-{s}")
             for i, (s, c) in enumerate([("A", 6), ("B", 3), ("C", 1)])}
    return fed, aggregator, sites


def step_sites(sites):
    return {name: sites[name].step() for name in sorted(sites)}


def finish(aggregator, sites, max_steps=40):
    for _ in range(max_steps):
        if all(s.state.finished for s in sites.values()):
            return
        aggregator.step()
        step_sites(sites)
    raise AssertionError("the federation did not finish")


def test_a_wrong_census_blocks_naming_the_site_and_the_command_and_a_redo_recovers(tmp_path, keys):
    """The trial's trap: site A's dataset shrank after its census (6 -> 5 cases). The aggregator was
    blocked, A said "waiting", and only a new federation helped. Now A's step says blocked with the
    aggregator's reason, `fedfs site fingerprint --redo` supersedes the census, and the federation ends."""
    # Prepare: censuses out and merged; then A's engineer removes a case
    fed, aggregator, sites = toy_federation(tmp_path, keys)
    step_sites(sites)
    assert str(aggregator.step()).startswith("census")
    sites["A"].work.cases = 5
    step_sites(sites)  # summaries: A's has 5 cases
    # Execute
    blocked = aggregator.step()
    a, b = sites["A"].step(), sites["B"].step()
    # Assert: the aggregator names the site and the command; A's counterpart step is blocked too, B waits
    assert blocked.action.blocked and "site A" in blocked.detail and REDO in blocked.detail
    assert "5 cases, its census said 6" in blocked.detail
    assert a.action.blocked and REDO in a.detail and a.detail.startswith("the aggregator is blocked on this site")
    assert b.action == "wait"
    # Execute: A supersedes its census; the federation then goes on to the end
    said = sites["A"].setup.redo()
    assert "superseding census (revision 1)" in said and "was 6 cases" in said
    assert sites["A"].step().action == "wait"  # the old problem is answered: A waits for the new census
    finish(aggregator, sites)
    # Assert: write-once kept (revision 0 still there), the newest revisions won
    store, bucket = fed.store, fed.bucket
    assert store.exists(layout.site_census("A")) and store.exists(layout.site_census("A", 1))
    census = bucket.read(layout.census_key(1), Census).doc
    assert census.sites == {"A": 5, "B": 3, "C": 1} and census.sources == {"A": 1, "B": 0, "C": 0}
    assert all(store.exists(layout.site_fingerprint(s, 1)) for s in "ABC")  # every site answered the new census
    v1 = bucket.read(layout.global_version(1), GlobalManifest).doc
    assert [c.weight for c in v1.contributions] == [5.0, 3.0, 1.0]
    assert not fed.bucket.read(layout.AGG_STATUS, StatusDocument).doc.rejected  # the problem is resolved
    # the report and bundles see the newest revisions
    from fedfs.ops.bundle_export import files_from_site
    from fedfs.ops.bundle_format import document_class
    from fedfs.ops.history import collect_history

    history = collect_history(fed, layers=False)
    assert history["sites"]["A"]["cases"] == 5
    assert layout.site_census("A", 1) in files_from_site(fed, "A", everything=True)
    assert document_class(layout.site_census("A", 1)) is SiteCensus


def test_a_redo_after_the_merged_fingerprint_supersedes_it(tmp_path, keys):
    """Before any site planned, a superseded census also supersedes the merged fingerprint."""
    # Prepare: the merged fingerprint is out; no site has planned yet
    fed, aggregator, sites = toy_federation(tmp_path, keys)
    for _ in range(2):
        step_sites(sites)
        aggregator.step()
    assert fed.store.exists(layout.GLOBAL_FINGERPRINT)
    # Execute
    sites["B"].work.cases = 4
    sites["B"].setup.redo()
    finish(aggregator, sites)
    # Assert
    assert fed.store.exists(layout.global_fingerprint_key(1))
    assert {fed.bucket.read(layout.site_plans(s), PlansDocument).doc.fingerprint_revision for s in "ABC"} == {1}


def test_a_redo_after_v0_says_a_new_federation_is_needed(tmp_path, keys):
    # Prepare
    fed, aggregator, sites = toy_federation(tmp_path, keys)
    for _ in range(4):
        aggregator.step()
        step_sites(sites)
    assert fed.store.exists(layout.global_version(0))
    # Execute / Assert
    with pytest.raises(ConfigError, match="new federation"):
        sites["A"].setup.redo()


def test_an_unchanged_census_redo_publishes_a_new_summary(tmp_path, keys):
    # Prepare
    fed, aggregator, sites = toy_federation(tmp_path, keys)
    step_sites(sites)
    aggregator.step()
    step_sites(sites)
    # Execute
    said = sites["C"].setup.redo()
    result = sites["C"].step()
    # Assert
    assert "census unchanged" in said and "superseding summary (revision 1)" in str(result)
    assert not fed.store.exists(layout.site_census("C", 1))


def test_sites_with_different_labels_are_refused_naming_both(tmp_path, keys):
    # Prepare: B's dataset.json calls label 1 "tumour", the others "foreground"
    fed, aggregator, sites = toy_federation(tmp_path, keys, labels={"B": {"background": 0, "tumour": 1}})
    step_sites(sites)
    # Execute
    result = aggregator.step()
    counterparts = step_sites(sites)
    # Assert: both sites and both values named; A and B blocked, C (not concerned) waits
    assert result.action.blocked and "sites A and B have different labels" in result.detail
    assert "'foreground': 1" in result.detail and "'tumour': 1" in result.detail and REDO in result.detail
    assert counterparts["A"].action.blocked and counterparts["B"].action.blocked
    assert counterparts["C"].action == "wait"
    # Execute: B corrects its dataset.json and supersedes its census
    sites["B"].work.labels = {"background": 0, "foreground": 1}
    sites["B"].setup.redo()
    finish(aggregator, sites)
    # Assert
    census = fed.bucket.read(layout.census_key(0), Census).doc
    assert census.labels == {"background": 0, "foreground": 1} and census.sources["B"] == 1


def test_plans_that_differ_block_the_sites_they_concern(tmp_path, keys):
    """The counterpart of a blocked aggregator before v0: a site whose plans differ says "blocked"
    (was "waiting", exit 0), with one read of the aggregator's status per idle step."""
    # Prepare: a fedavg federation (sites plan at once) where C's network is deeper
    config, agg = config_from_key_dir(keys, ["A", "B", "C"], mode="fedavg", rounds=1)
    fed, _ = Federation.create(str(tmp_path / "bucket"), config, agg)
    aggregator = Aggregator(fed.as_party(keys / "agg.key"), tmp_path / "agg")
    sites = {s: Site(fed.as_party(keys / f"{s}.key"), ToyWork(s, depth=3 if s == "C" else 2), tmp_path / s)
             for s in "ABC"}
    step_sites(sites)
    assert aggregator.step().action.blocked
    reads = []
    real_read = fed.store.read_bytes
    for s in sites.values():
        s.fed.store.read_bytes = lambda key, **kw: reads.append(key) or real_read(key, **kw)
    # Execute
    results = step_sites(sites)
    # Assert
    assert results["C"].action.blocked and "different plans" in results["C"].detail
    assert results["A"].action.blocked  # A is the reference C is compared with
    assert results["B"].action == "wait"
    assert reads.count(layout.AGG_STATUS) <= 3  # one read per idle step


def test_old_census_documents_still_parse():
    doc = SiteCensus.from_dict({"kind": "site-census", "schema_version": 1, "site": "A", "num_cases": 3,
                                "num_channels": 1, "nnunet_version": ""}, "old census")
    assert doc.revision == 0 and doc.labels == {}


def test_init_refuses_a_configuration_typo_with_a_did_you_mean(tmp_path, keys):
    with pytest.raises(ConfigError, match="did you mean '3d_fullres'"):
        config_from_key_dir(keys, ["A", "B"], configuration="3d_fulres")
    config, _ = config_from_key_dir(keys, ["A", "B"], configuration="3d_fulres", custom_configuration=True)
    assert config.configuration == "3d_fulres"


def test_cli_init_refuses_a_configuration_typo(tmp_path, keys):
    import subprocess
    import sys
    from pathlib import Path

    fedfs = str(Path(sys.executable).with_name("fedfs"))
    init = [fedfs, "init", str(tmp_path / "bucket"), "--sites", "A,B", "--keys", str(keys), "-c", "3d_fulres"]
    refused = subprocess.run(init, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "did you mean '3d_fullres'" in refused.stderr
    assert "--custom-configuration" in refused.stderr
    assert not (tmp_path / "bucket" / layout.FEDERATION).exists()
    custom = subprocess.run(init + ["--custom-configuration"], capture_output=True, text=True, timeout=120)
    assert custom.returncode == 0, custom.stderr


@pytest.mark.nnunet
def test_a_missing_label_file_is_caught_before_the_census(tmp_path, monkeypatch):
    from fedfs.errors import NnunetError
    from fedfs.nnunet.work import NnunetOptions, NnunetWork
    from fedfs.testing.synthetic import make_site

    raw = tmp_path / "raw"
    monkeypatch.setenv("nnUNet_raw", str(raw))
    site = make_site(raw, 612, "A", n_train=3, n_test=0, test_root=tmp_path / "heldout")
    work = NnunetWork(NnunetOptions(dataset=str(site.dataset_id)))
    assert work.census() == (3, 1) and work.census_names()["labels"]
    missing = site.dataset_dir / "labelsTr" / "A_001.nii.gz"
    missing.unlink()
    with pytest.raises(NnunetError, match=f"{missing} is missing"):
        work.census()


def test_a_revision_that_does_not_verify_is_passed_over(tmp_path, keys):
    """The newest *valid* revision wins: a corrupt census-1 of A is quarantined by the aggregator, which
    merges A's census.json; A's own step passes over it too (recording it in its status) and goes on."""
    # Prepare
    fed, aggregator, sites = toy_federation(tmp_path, keys)
    step_sites(sites)
    bad = layout.site_census("A", 1)
    fed.store.write_bytes(bad, b"{not json")
    # Execute
    merged = aggregator.step()
    a = sites["A"].step()
    # Assert
    assert merged.action == "census" and fed.bucket.read(layout.CENSUS, Census).doc.sources["A"] == 0
    assert bad in [r.key for r in fed.bucket.read(layout.AGG_STATUS, StatusDocument).doc.rejected]
    assert a.action == "fingerprint", a  # junk costs a rejection, never the party
    assert bad in [r.key for r in fed.bucket.read(layout.site_status("A"), StatusDocument).doc.rejected]


def test_a_corrupt_merged_census_is_superseded_by_the_aggregator(tmp_path, keys):
    """The aggregator passes over its own census that does not verify and publishes the next revision;
    a site passes over the bad one (waiting for one that verifies) and goes on from the new one."""
    # Prepare
    fed, aggregator, sites = toy_federation(tmp_path, keys)
    step_sites(sites)
    fed.store.write_bytes(layout.CENSUS, b"\x00 not json")
    assert sites["A"].step().action == "wait"
    # Execute
    result = aggregator.step()
    # Assert
    assert result.action == "census" and fed.store.exists(layout.census_key(1))
    assert sites["A"].step().action == "fingerprint"
