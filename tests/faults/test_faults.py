"""Fault injection, the quick form of ``python benchmarks/faults.py --json --quick``.

Real federations (3 sites + aggregator as separate ``fedfs.testing.toy_party`` processes)
are crashed, cut off and attacked while they run; each must finish with no corrupt
global, no lost and no doubly applied update, and every bad input must be refused
with the right reason in the refusing party's signed status document. The full
form (both backends, every scenario, a 20 s S3 outage) is
``python benchmarks/faults.py --json``; see docs/benchmarks.md.
"""

from __future__ import annotations

import pytest

TIMEOUT_S = 150.0


def scenario(bench, name: str, backend: str = "folder"):
    return next(s for s in bench.scenarios(backend, quick=True) if s.name == name)


def assert_clean(run) -> None:
    """The federation finished, every planned fault fired, and the bucket's integrity holds."""
    assert run.completed, f"did not complete: {run.error} {run.unexpected_exits} {run.audit}"
    assert not run.faults_missed, f"planned faults that never fired: {run.faults_missed}"
    assert not run.unexpected_exits, run.unexpected_exits
    a = run.audit
    assert a["final_version"] == 3 and a["versions"] == 4
    assert a["corrupt_globals_published"] == 0, a["corrupt"]
    assert a["accepted_updates_lost"] == 0, a["lost"]
    assert a["duplicate_updates_applied"] == 0, a["duplicates"]
    assert a["contributions"] == 9  # 3 sites x 3 rounds, each folded exactly once


def test_kill_sites_and_aggregator(bench, folder, tmp_path):
    """kill -9 of A while training; B between payload and manifest; C before its upload; the aggregator
    between its payload and manifest and, restarted, right after its manifest."""
    run = bench.run_federation(folder, scenario(bench, "crashes"), tmp_path, timeout_s=TIMEOUT_S)
    assert_clean(run)
    assert sorted(run.faults_injected) == sorted([
        "A:sigkill-training", "B:site.after_upload", "C:site.before_publish",
        "agg:aggregator.before_manifest", "agg:aggregator.after_manifest"])


def test_two_aggregators_and_wrong_clocks(bench, folder, tmp_path):
    """A second aggregator (same key) from the start; B's clock 5 h behind, C's 5 h ahead."""
    run = bench.run_federation(folder, scenario(bench, "concurrency"), tmp_path, timeout_s=TIMEOUT_S)
    assert_clean(run)
    assert "agg2:concurrent-aggregator" in run.faults_injected
    assert {"B", "C"} <= {f.split(":")[0] for f in run.faults_injected if ":clock-" in f}


def test_hostile_inputs_are_refused_with_reasons(bench, folder, tmp_path):
    """A member's every update is an attack (and files in honest folders); the federation goes on."""
    run = bench.run_federation(folder, scenario(bench, "hostile"), tmp_path, timeout_s=TIMEOUT_S)
    assert_clean(run)
    kinds = {v["kind"] for v in run.hostile}
    assert len(kinds) >= 25 and kinds == set(bench.EXPECT)
    wrong = [v for v in run.hostile if not v["rejected"]]
    assert not wrong, "refused for no reason or the wrong one:\n" + "\n".join(
        f"{v['kind']} {v['key']}: {v['reason']!r} (wanted {v['expected_reason']!r})" for v in wrong)


def test_federation_json_with_path_traversal(bench, folder, tmp_path):
    verdict = bench.federation_json_traversal(folder, tmp_path)
    assert verdict["rejected"], verdict


def test_s3_outage(bench, s3, tmp_path):
    """The S3 server stopped for 5 s mid-federation and started again on the same port."""
    run = bench.run_federation(s3, scenario(bench, "outage", "s3"), tmp_path, timeout_s=TIMEOUT_S)
    assert_clean(run)
    assert any("'data_kept': True" in n for n in run.notes), run.notes


@pytest.fixture(scope="module")
def globals_probes(bench, folder, tmp_path_factory):
    return bench.site_probes(folder, tmp_path_factory.mktemp("site-probes"))


def test_sites_never_train_from_a_bad_global(globals_probes):
    """A global signed by a site, a forged one, an altered global payload: no site trains from them."""
    assert {p["kind"] for p in globals_probes} == {"global_signed_by_site", "global_forged_signature",
                                                   "global_payload_bitflip"}
    assert not [p for p in globals_probes if p["consumed"]], globals_probes


def test_sites_record_refused_globals(globals_probes):
    assert all(p["rejected"] for p in globals_probes), globals_probes


@pytest.fixture(scope="module")
def weakness(bench, folder, tmp_path_factory):
    return {p["probe"]: p for p in bench.weakness_probes(folder, tmp_path_factory.mktemp("weakness"))}


def test_identical_payloads_are_attributed_to_their_own_updates(weakness):
    """Two updates with byte-identical payloads (one copied) are each listed once under its own site."""
    assert weakness["copied_payload"]["correctly_attributed"], weakness["copied_payload"]
    assert weakness["audit_of_this_bucket"]["detail"]["duplicates"] == []


def test_a_rejected_update_still_closes_the_round_after_an_aggregator_restart(weakness):
    assert weakness["rejected_update_then_aggregator_restart"]["round_closed"], weakness


@pytest.mark.parametrize("probe", ["two_updates_from_one_global", "inflated_num_cases"])
def test_member_attacks_are_refused(weakness, probe):
    assert weakness[probe]["refused"], weakness[probe]


def test_a_forged_global_at_the_next_version_is_refused_and_skipped(weakness):
    """A site-signed "global" squatting the next version's key: recorded, and the next global lies beside it."""
    assert weakness["forged_global_at_next_version"]["refused"], weakness["forged_global_at_next_version"]
    assert "raised" not in weakness["forged_global_at_next_version"]["detail"], weakness
    # (tests/test_roles.py::test_site_quarantines_a_forged_global runs such a federation to its end)


def test_a_site_survives_garbage_at_its_next_key(weakness):
    """Garbage at B's next update key: B publishes that round beside it, under the same round number."""
    assert weakness["garbage_at_honest_site_next_key"]["site_can_continue"], weakness


def test_the_audit_sees_corruption_duplicates_and_losses(bench, folder, tmp_path):
    """Negative control: globals re-signed with the aggregator's key, but wrong, are caught by the audit."""
    from fedfs import layout
    from fedfs.roles.aggregator import Aggregator
    from fedfs.protocol.documents import canonical_json
    from fedfs.protocol.schema import GlobalManifest
    from fedfs.trust.signing import load_identity
    from fedfs.roles.site import Site
    from fedfs.testing.toy import ToyWork

    sites_ = sorted(bench.SITES)
    keys = bench.make_keys(tmp_path / "keys", sites_)
    fed = bench.create_federation(folder.new_url(tmp_path), keys, sites_, {})
    agg = Aggregator(fed.as_party(keys / "agg.key"), tmp_path / "w-agg")
    sites = {s: Site(fed.as_party(keys / f"{s}.key"), ToyWork(s, **v), tmp_path / f"w-{s}")
             for s, v in bench.SITES.items()}
    for _ in range(40):
        agg.step()
        for s in sites.values():
            s.step()
        if all(s.state.finished for s in sites.values()):
            break
    clean = bench.audit(fed, sites_)
    assert clean["finished"] and clean["corrupt_globals_published"] == 0 and clean["contributions"] == 9
    assert clean["accepted_updates_lost"] == 0 and clean["duplicate_updates_applied"] == 0

    ident = load_identity(keys / "agg.key")

    def resign(version: int, change) -> None:
        key = layout.global_version(version)
        body = fed.bucket.read(key, GlobalManifest).doc.to_dict()
        change(body)
        fed.store.delete(key)
        fed.store.publish(key, canonical_json(ident.sign(body)))

    resign(2, lambda b: b["contributions"][0].update(weight=b["contributions"][0]["weight"] * 2))
    resign(3, lambda b: b["contributions"].append(fed.bucket.read(layout.global_version(1), GlobalManifest)
                                                  .doc.to_dict()["contributions"][0]))
    resign(1, lambda b: b["contributions"].pop(1))  # B's r0 no longer listed anywhere
    bad = bench.audit(fed, sites_)
    reasons = " ".join(c["reason"] for c in bad["corrupt"])
    assert {c["version"] for c in bad["corrupt"]} == {1, 2, 3}
    assert "not the weighted mean" in reasons
    assert bad["duplicate_updates_applied"] == 1 and bad["accepted_updates_lost"] == 1
    assert bad["lost"] == [layout.site_update("B", 0)]
