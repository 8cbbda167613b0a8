"""Secure-aggregation sessions over a real (folder) bucket: signed write-once stage files,
a site killed after masking, dropouts recovered, and every stage resumed after a kill.

The kills are raised from a store wrapper at chosen publishes (a process killed there leaves
exactly that bucket state; the next step runs with a fresh party object on the same workdir).
"""

from __future__ import annotations

import numpy as np
import pytest

from fedfs.errors import ValidationError
from fedfs.privacy import fixedpoint
from fedfs.privacy.secagg_documents import roster_key, site_stage_key
from fedfs.privacy.secagg_rounds import SecureAggregator, SecureSite, run_session, session_params
from fedfs.testing.toy import toy_federation
from fedfs.trust.bucket import Bucket
from fedfs.trust.signing import load_identity

FP = fixedpoint.FixedPoint(bits=32, max_abs=4.0)


class Killed(Exception):
    """The party's process died here."""


class KillingStore:
    """The federation's store, but the publish of ``key`` dies (before or after it lands)."""

    def __init__(self, store, key, after=False):
        self._store, self.key, self.after, self.fired = store, key, after, False

    def __getattr__(self, name):
        return getattr(self._store, name)

    def publish(self, key, data):
        if key == self.key and not self.fired:
            self.fired = True
            if self.after:
                self._store.publish(key, data)
            raise Killed(key)
        return self._store.publish(key, data)


@pytest.fixture
def federation(tmp_path):
    def make(names, **settings):
        fed, _, _ = toy_federation(tmp_path, names, mode="fedavg", **settings)
        ids = {n: load_identity(tmp_path / "keys" / f"{n}.key") for n in [*names, "agg"]}
        return fed, ids
    return make


def model_round(names, seed=0):
    rng = np.random.default_rng(seed)
    base = {"conv.weight": rng.normal(0, 0.1, (16, 8, 3, 3)).astype(np.float32),
            "conv.bias": rng.normal(0, 0.1, 16).astype(np.float32)}
    updates = {s: {n: (g + rng.normal(0, 0.02, g.shape)).astype(np.float32) for n, g in base.items()} for s in names}
    weights = {s: i + 2 for i, s in enumerate(names)}
    return base, updates, weights


def parties(fed, ids, tmp_path, names, session, store=None):
    bucket = Bucket(store or fed.store, fed.config)
    params = session_params(fed.config, session)
    sites = {s: SecureSite(bucket, ids[s], tmp_path / f"w-{s}", params) for s in names}
    return sites, SecureAggregator(bucket, ids["agg"], params)


def check_mean(total, base, updates, weights, survivors):
    w_total = sum(weights.values())
    mean, w = fixedpoint.decode_mean(total, base, w_total, FP)
    assert w == sum(weights[s] for s in survivors)
    plain = fixedpoint.plain_weighted_mean({s: updates[s] for s in survivors}, weights)
    for n in base:
        assert np.max(np.abs(mean[n] - plain[n])) <= len(survivors) * FP.step + 1e-7


def test_a_round_with_a_site_killed_after_masking_finishes(federation, tmp_path):
    names = ["A", "B", "C"]
    fed, ids = federation(names)
    base, updates, weights = model_round(names)
    inputs = {s: fixedpoint.encode_update(updates[s], base, weights[s], sum(weights.values()), FP) for s in names}
    sites, agg = parties(fed, ids, tmp_path, names, "v000001")
    total = run_session(sites, agg, inputs, stop_after={"C": "masked"})
    assert agg.survivors == names and agg.dropped == []  # C masked, so it is summed: its seed comes from A and B
    check_mean(total, base, updates, weights, names)
    assert not fed.store.exists(site_stage_key("C", "v000001", "unmask"))
    sites["A"].forget()  # the round is over: the secrets go, and a later step has nothing to do
    assert not (tmp_path / "w-A" / "secagg" / "v000001").exists()
    assert sites["A"].step(inputs["A"]) == "done"
    for s in ("A", "B"):  # every stage is a signed write-once file in the writer's own folder
        for stage in ("keys", "shares", "masked", "unmask"):
            assert fed.bucket.read_raw_envelope(site_stage_key(s, "v000001", stage))["signer"] == s
    assert fed.bucket.read_raw_envelope(roster_key("v000001", "masked"))["signer"] == "agg"


@pytest.mark.parametrize("names,dropped,degree", [(["A", "B", "C", "D"], ["D"], None),
                                                  (list("ABCDE"), ["A", "D"], None),
                                                  (list("ABCDEFGH"), ["B", "G"], 4)])  # SecAgg+'s sparse graph
def test_sites_that_drop_before_masking_are_recovered(federation, tmp_path, names, dropped, degree):
    fed, ids = federation(names, options={} if degree is None else {"secagg_degree": degree})
    assert session_params(fed.config, "v000002").degree == (degree or len(names) - 1)
    base, updates, weights = model_round(names, seed=1)
    inputs = {s: fixedpoint.encode_update(updates[s], base, weights[s], sum(weights.values()), FP) for s in names}
    sites, agg = parties(fed, ids, tmp_path, names, "v000002")
    total = run_session(sites, agg, inputs, stop_after={d: "shared" for d in dropped})
    assert agg.dropped == dropped
    check_mean(total, base, updates, weights, [s for s in names if s not in dropped])


STAGE_KILLS = [("site", "keys", False), ("site", "shares", True), ("site", "masked", False),
               ("site", "masked", True), ("site", "unmask", False), ("agg", "shares", False), ("agg", "masked", True)]


@pytest.mark.parametrize("who,stage,after", STAGE_KILLS)
def test_a_stage_killed_anywhere_resumes(federation, tmp_path, who, stage, after):
    names = ["A", "B", "C"]
    fed, ids = federation(names)
    base, updates, weights = model_round(names, seed=2)
    inputs = {s: fixedpoint.encode_update(updates[s], base, weights[s], sum(weights.values()), FP) for s in names}
    key = site_stage_key("B", "v000003", stage) if who == "site" else roster_key("v000003", stage)
    store = KillingStore(fed.store, key, after=after)
    sites, agg = parties(fed, ids, tmp_path, names, "v000003", store=store)
    with pytest.raises(Killed):
        run_session(sites, agg, inputs)
    assert store.fired
    sites, agg = parties(fed, ids, tmp_path, names, "v000003")  # restarted processes, same workdirs
    total = run_session(sites, agg, inputs)
    check_mean(total, base, updates, weights, names)


def test_a_site_that_lost_its_secrets_cannot_publish_other_keys(federation, tmp_path):
    names = ["A", "B", "C"]
    fed, ids = federation(names)
    sites, agg = parties(fed, ids, tmp_path, names, "v000004")
    assert sites["A"].step() == "advertised"
    (tmp_path / "w-A" / "secagg" / "v000004" / "secrets.json").unlink()  # the workdir was wiped
    with pytest.raises(FileExistsError, match="different content"):
        sites["A"].step()


def test_refuses_a_federation_of_two(federation, tmp_path):
    fed, _ = federation(["A", "B"])
    with pytest.raises(ValidationError, match="at least 3 sites"):
        session_params(fed.config, "v000001")


@pytest.mark.parametrize("settings,reason", [({"mode": "asym"}, "cannot be used with mode 'asym'"),
                                             ({"aggregation": "async"}, "needs aggregation 'sync'"),
                                             ({"update_norm_limit": 2.0}, "cannot measure its norm")])
def test_federation_config_refuses_secure_aggregation_where_it_cannot_work(tmp_path, settings, reason):
    from fedfs.errors import SchemaError

    with pytest.raises(SchemaError, match=reason):
        toy_federation(tmp_path, ["A", "B", "C"], secure_aggregation=True, **settings)
    with pytest.raises(SchemaError, match="at least 3 sites"):
        toy_federation(tmp_path / "two", ["A", "B"], secure_aggregation=True)


def test_round_helpers_over_update_files_finish_with_a_site_killed_after_masking(federation, tmp_path):
    """The hooks the site and aggregator roles call: safetensors files in, the weighted mean out."""
    from safetensors.numpy import save_file

    from fedfs.privacy.secagg_rounds import aggregator_round_step, site_round_step

    names = ["A", "B", "C", "D"]
    fed, ids = federation(names)
    base, updates, weights = model_round(names, seed=7)
    base["counter"] = np.asarray([3], np.int64)  # an integer buffer survives as one
    save_file(base, str(tmp_path / "global.safetensors"))
    for s in names:
        save_file({**updates[s], "counter": np.asarray([4], np.int64)}, str(tmp_path / f"{s}.safetensors"))
    total_w = sum(weights.values())
    for s in names:  # ahead of training: keys and shares
        assert site_round_step(fed.bucket, ids[s], tmp_path / f"w-{s}", 5) == "advertised"
    assert aggregator_round_step(fed.bucket, ids["agg"], 5, global_path=str(tmp_path / "global.safetensors"),
                                 weight_total=total_w)[0] == "roster keys"
    done, mean = set(), None
    for _ in range(10):
        for s in names:
            if s == "D" and "D-masked" in done:
                continue  # D was killed after masking
            what = site_round_step(fed.bucket, ids[s], tmp_path / f"w-{s}", 5,
                                   global_path=str(tmp_path / "global.safetensors"),
                                   update_path=str(tmp_path / f"{s}.safetensors"), weight=weights[s],
                                   weight_total=total_w)
            if what == "masked" and s == "D":
                done.add("D-masked")
        what, mean, agg = aggregator_round_step(fed.bucket, ids["agg"], 5, weight_total=total_w, close=True,
                                                global_path=str(tmp_path / "global.safetensors"))
        if mean is not None:
            break
    assert mean is not None and agg.survivors == names
    plain = fixedpoint.plain_weighted_mean(updates, weights)
    for n in plain:
        assert mean[n].dtype == np.float32
        assert np.max(np.abs(mean[n] - plain[n])) <= len(names) * FP.step + 1e-7
    assert mean["counter"].dtype == np.int64 and int(mean["counter"][0]) == 4


def test_a_masked_payload_is_read_strictly():
    import json as _json

    from safetensors.numpy import save

    from fedfs.privacy.secagg_rounds import decode_masked

    good = save({"a": np.arange(6, dtype=np.uint32).reshape(2, 3), "b": np.arange(2, dtype=np.uint64)})
    arrays = decode_masked(good, "m")
    assert arrays["a"].shape == (2, 3) and int(arrays["b"][1]) == 1
    with pytest.raises(ValidationError, match="not a uint32/uint64 entry"):
        decode_masked(save({"a": np.zeros(3, np.float32)}), "m")

    def forged(header, body=b""):
        raw = _json.dumps(header).encode()
        return len(raw).to_bytes(8, "little") + raw + body

    with pytest.raises(ValidationError, match="do not tile"):  # overlapping ranges
        decode_masked(forged({"a": {"dtype": "U32", "shape": [2], "data_offsets": [0, 8]},
                              "b": {"dtype": "U32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)), "m")
    with pytest.raises(ValidationError, match="bytes for"):
        decode_masked(forged({"a": {"dtype": "U64", "shape": [10 ** 9], "data_offsets": [0, 8]}}, bytes(8)), "m")
    with pytest.raises(ValidationError, match="header length"):
        decode_masked(b"\xff" * 16, "m")


class NoPeerReads:
    """The store as a site sees it under least-privilege permissions: other sites' folders unreadable."""

    def __init__(self, store, site):
        self._store, self.site = store, site

    def __getattr__(self, name):
        return getattr(self._store, name)

    def read_bytes(self, key, **kw):
        if key.startswith("sites/") and not key.startswith(f"sites/{self.site}/") and "/masked.json" in key:
            from fedfs.errors import StoreUnavailable

            raise StoreUnavailable(f"{key}: access denied")
        return self._store.read_bytes(key, **kw)


def test_over_the_bucket_a_roster_saying_a_live_site_dropped_is_refused(federation, tmp_path):
    from fedfs.privacy.secagg_documents import SecAggRoster, SecAggUnmask, digest

    names = ["A", "B", "C", "D"]
    fed, ids = federation(names)
    base, updates, weights = model_round(names, seed=8)
    inputs = {s: fixedpoint.encode_update(updates[s], base, weights[s], sum(weights.values()), FP) for s in names}
    sites, agg = parties(fed, ids, tmp_path, names, "v000009")
    for i in range(3):  # keys, shares, masked: everyone masks; the aggregator closes keys and shares
        for s in names:
            while sites[s].step(inputs[s]) not in ("waiting",):
                pass
        if i < 2:
            agg.step()
    assert all(fed.store.exists(site_stage_key(s, "v000009", "masked")) for s in names)
    r_shares = fed.bucket.read(roster_key("v000009", "shares"), SecAggRoster).doc
    lie = SecAggRoster(session="v000009", stage="masked", sites=["A", "C", "D"], dropped=["B"],
                       previous=digest(r_shares))
    fed.bucket.publish(roster_key("v000009", "masked"), lie, ids["agg"])
    with pytest.raises(ValidationError, match="says B dropped, but B published its masked input"):
        sites["B"].step(inputs["B"])
    with pytest.raises(ValidationError, match=r"claims \['B'\] dropped, but their masked inputs are in the bucket"):
        sites["C"].step(inputs["C"])
    assert not fed.store.exists(site_stage_key("B", "v000009", "unmask"))
    assert not fed.store.exists(site_stage_key("C", "v000009", "unmask"))
    # a site that may not read other sites' folders cannot tell, and reveals B's mask-key share only
    blind = SecureSite(Bucket(NoPeerReads(fed.store, "A"), fed.config), ids["A"], tmp_path / "w-A",
                       session_params(fed.config, "v000009"))
    assert blind.step(inputs["A"]) == "unmasked"
    doc = fed.bucket.read(site_stage_key("A", "v000009", "unmask"), SecAggUnmask).doc
    assert "B" in doc.key_shares and "B" not in doc.self_shares


def test_a_share_message_a_site_cannot_read_costs_that_share_not_the_round(federation, tmp_path):
    from fedfs.privacy.secagg_documents import SecAggKeys, SecAggRoster, SecAggShares, SecAggUnmask

    names = list("ABCDE")
    fed, ids = federation(names)
    base, updates, weights = model_round(names, seed=10)
    inputs = {s: fixedpoint.encode_update(updates[s], base, weights[s], sum(weights.values()), FP) for s in names}
    sites, agg = parties(fed, ids, tmp_path, names, "v000011")
    for s in names:
        assert sites[s].step() == "advertised"
    assert agg.step() == "roster keys"
    # B's shares document carries, for A, its message to C (a buggy or hostile B): A cannot read it
    from fedfs.privacy import secagg

    r_keys = fed.bucket.read(roster_key("v000011", "keys"), SecAggRoster).doc
    keys = {s: fed.bucket.read(site_stage_key(s, "v000011", "keys"), SecAggKeys).doc for s in names}
    honest = secagg.share_keys(sites["B"].params, sites["B"].secrets(), r_keys, keys)
    bad = SecAggShares(site="B", session="v000011", roster=honest.roster,
                       ciphertexts={**honest.ciphertexts, "A": honest.ciphertexts["C"]})
    fed.bucket.publish(site_stage_key("B", "v000011", "shares"), bad, ids["B"])
    total = run_session(sites, agg, inputs)
    check_mean(total, base, updates, weights, names)
    unmask_a = fed.bucket.read(site_stage_key("A", "v000011", "unmask"), SecAggUnmask).doc
    assert "B" not in unmask_a.self_shares and site_stage_key("B", "v000011", "shares") in sites["A"].rejected
