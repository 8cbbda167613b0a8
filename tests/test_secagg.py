"""Secure aggregation's math and stage documents (fedfs.privacy), pure: no bucket.

Prepare: sites with fresh session secrets run the stages by hand. Execute: the pure steps.
Assert: the properties issue 17 asks of SecAgg+: exact cancellation, dropout recovery from
t survivors, no site revealing both shares for one peer (a lying aggregator is refused), and
deterministic stages (a re-run gives identical documents and masked bytes).
"""

from __future__ import annotations

import numpy as np
import pytest

from fedfs.errors import SchemaError, SignatureError, ValidationError
from fedfs.privacy import fixedpoint, masks, secagg, shamir
from fedfs.privacy.secagg_documents import SecAggRoster, SecAggUnmask, digest

SESSION = "v000001"


def run_stages(names, inputs, *, drop_before_mask=(), degree=None, threshold=None):
    """Every stage by hand; returns (params, secrets, keys, shares, rosters, masked, unmasks)."""
    p = secagg.SessionParams.make(SESSION, names, degree=degree, threshold=threshold)
    sec = {s: secagg.SiteSecrets.new(SESSION, s) for s in names}
    keys = {s: secagg.advertise(sec[s]) for s in names}
    r_keys = secagg.make_roster(p, "keys", names, None)
    shares = {s: secagg.share_keys(p, sec[s], r_keys, keys) for s in names}
    r_shares = secagg.make_roster(p, "shares", names, r_keys)
    live = [s for s in names if s not in drop_before_mask]
    masked = {s: secagg.mask_input(p, sec[s], r_shares, keys, inputs[s]) for s in live}
    r_masked = secagg.make_roster(p, "masked", live, r_shares)
    unmasks = {}
    for s in live:
        received = secagg.receive_shares(p, sec[s], keys, {j: shares[j] for j in p.neighbours(s)})
        unmasks[s] = secagg.unmask_shares(p, sec[s], r_shares, r_masked, received)
    return p, sec, keys, shares, (r_keys, r_shares, r_masked), masked, unmasks


def random_inputs(names, seed=0):
    rng = np.random.default_rng(seed)
    return {s: {"w": rng.integers(0, 2**32, size=(17, 5), dtype=np.uint32),
                "n": rng.integers(0, 2**64, size=(3,), dtype=np.uint64)} for s in names}


def modular_sum(inputs, sites):
    return {n: np.sum([inputs[s][n] for s in sites], axis=0, dtype=inputs[sites[0]][n].dtype) for n in ("w", "n")}


def test_shamir_any_t_shares_reconstruct_and_fewer_do_not():
    secret = bytes(range(32))
    shares = shamir.split(secret, [1, 2, 3, 4, 5], 3, b"seed")
    assert shamir.reconstruct({x: shares[x] for x in (1, 3, 5)}, 3) == secret
    assert shamir.reconstruct({x: shares[x] for x in (2, 4, 5, 1)}, 3) == secret
    with pytest.raises(ValidationError, match="cannot reconstruct"):
        shamir.reconstruct({x: shares[x] for x in (1, 2)}, 3)
    # two shares fit a degree-2 polynomial through any secret: they do not pin it down
    assert shamir.split(secret, [1, 2, 3], 3, b"seed") == {x: shares[x] for x in (1, 2, 3)}  # deterministic
    altered = {x: shares[x] for x in (1, 2, 3, 4)}
    altered[4] = (altered[4] + 1) % shamir.PRIME
    with pytest.raises(ValidationError, match="altered"):
        shamir.reconstruct(altered, 3)


@pytest.mark.parametrize("names,degree", [(["A", "B", "C"], None), (list("ABCDEFGH"), 4)])
def test_masks_cancel_exactly_in_the_sum(names, degree):
    inputs = random_inputs(names)
    p, _, keys, _, rosters, masked, unmasks = run_stages(names, inputs, degree=degree)
    total = secagg.unmask_sum(p, keys, rosters[2], masked, unmasks)
    expected = modular_sum(inputs, names)
    for n in expected:
        assert total[n].dtype == expected[n].dtype
        assert np.array_equal(total[n], expected[n])  # bit for bit: integer sums are exact
    # and a masked input alone looks nothing like its input: about half its bits differ
    a = names[0]
    flips = np.unpackbits((masked[a]["w"] ^ inputs[a]["w"]).view(np.uint8)).mean()
    assert 0.45 < flips < 0.55


@pytest.mark.parametrize("names,dropped", [(["A", "B", "C"], ["C"]), (list("ABCDE"), ["B", "E"])])
def test_dropouts_after_sharing_are_recovered_from_t_survivors(names, dropped):
    inputs = random_inputs(names, seed=1)
    p, _, keys, _, rosters, masked, unmasks = run_stages(names, inputs, drop_before_mask=dropped)
    assert rosters[2].dropped == sorted(dropped)
    for u in unmasks.values():  # survivors reveal mask-key shares of the dropouts only
        assert set(u.key_shares) == set(dropped) and not set(u.self_shares) & set(dropped)
    total = secagg.unmask_sum(p, keys, rosters[2], masked, unmasks)
    live = [s for s in names if s not in dropped]
    assert all(np.array_equal(total[n], v) for n, v in modular_sum(inputs, live).items())


def test_too_few_survivors_is_refused_before_anyone_reveals():
    p = secagg.SessionParams.make(SESSION, list("ABCDE"))  # t = 3
    r_keys = secagg.make_roster(p, "keys", list("ABCDE"), None)
    r_shares = secagg.make_roster(p, "shares", list("ABCDE"), r_keys)
    with pytest.raises(ValidationError, match="below the threshold 3"):
        secagg.make_roster(p, "masked", ["A", "B"], r_shares)


def test_unmasking_needs_t_shares():
    names = list("ABCDE")
    inputs = random_inputs(names, seed=2)
    p, _, keys, _, rosters, masked, unmasks = run_stages(names, inputs)
    some = {s: unmasks[s] for s in ("A", "B")}  # 2 < t = 3
    with pytest.raises(ValidationError, match="cannot reconstruct"):
        secagg.unmask_sum(p, keys, rosters[2], masked, some)
    three = {s: unmasks[s] for s in ("A", "C", "E")}
    total = secagg.unmask_sum(p, keys, rosters[2], masked, three)
    assert all(np.array_equal(total[n], v) for n, v in modular_sum(inputs, names).items())


def test_a_lying_aggregator_that_says_a_live_site_dropped_is_refused():
    names = list("ABCD")
    inputs = random_inputs(names, seed=3)
    p, sec, keys, shares, (r_keys, r_shares, honest), masked, unmasks = run_stages(names, inputs)
    # The aggregator has every masked input, yet publishes a roster saying B dropped, hoping
    # for B's mask-key shares (to strip B's pairwise masks) on top of B's self-mask shares.
    lie = SecAggRoster(session=SESSION, stage="masked", sites=["A", "C", "D"], dropped=["B"], previous=digest(r_shares))
    received_b = secagg.receive_shares(p, sec["B"], keys, {j: shares[j] for j in p.neighbours("B")})
    with pytest.raises(ValidationError, match="says B dropped, but B published"):
        secagg.unmask_shares(p, sec["B"], r_shares, lie, received_b)
    received_a = secagg.receive_shares(p, sec["A"], keys, {j: shares[j] for j in p.neighbours("A")})
    with pytest.raises(ValidationError, match=r"claims \['B'\] dropped, but their masked inputs"):
        secagg.unmask_shares(p, sec["A"], r_shares, lie, received_a, masked_exists=lambda s: s in masked)
    # A site that cannot see B's masked input reveals B's key share, but then never B's seed share:
    # it refuses any second roster for the session (it kept the digest of the one it answered).
    answered = secagg.unmask_shares(p, sec["A"], r_shares, lie, received_a)
    assert "B" in answered.key_shares and "B" not in answered.self_shares
    with pytest.raises(ValidationError, match="already answered"):
        secagg.unmask_shares(p, sec["A"], r_shares, honest, received_a, answered=answered.roster)
    # and with key shares alone, B's input stays hidden behind its self mask
    lied = {s: secagg.unmask_shares(p, sec[s], r_shares, lie,
                                    secagg.receive_shares(p, sec[s], keys, {j: shares[j] for j in p.neighbours(s)}))
            for s in ("A", "C", "D")}
    with pytest.raises(ValidationError, match="cannot reconstruct"):
        shamir.reconstruct({p.index(s): shamir.share_from_hex(u.self_shares["B"], s)
                            for s, u in lied.items() if "B" in u.self_shares}, p.threshold)


def test_a_roster_that_isolates_a_site_is_refused():
    names = list("ABCDE")  # t = 3
    inputs = random_inputs(names, seed=6)
    p, sec, keys, shares, (r_keys, r_shares, _), masked, _ = run_stages(names, inputs)
    # a lying aggregator: "everyone but A and B dropped", so the sum would be A's and B's inputs alone
    lie = SecAggRoster(session=SESSION, stage="masked", sites=["A", "B"], dropped=["C", "D", "E"],
                       previous=digest(r_shares))
    received = secagg.receive_shares(p, sec["A"], keys, {j: shares[j] for j in p.neighbours("A")})
    with pytest.raises(ValidationError, match="keeps 2 of A's neighbourhood, below the threshold 3"):
        secagg.unmask_shares(p, sec["A"], r_shares, lie, received)
    small = SecAggRoster(session=SESSION, stage="shares", sites=["A", "B"], previous=digest(r_keys))
    with pytest.raises(ValidationError, match="below the threshold"):
        secagg.mask_input(p, sec["A"], small, keys, inputs["A"])
    r_keys_small = secagg.make_roster(p, "keys", list("ABCD"), None)
    with pytest.raises(ValidationError, match="does not follow the keys roster"):  # not the keys roster it names
        secagg.mask_input(p, sec["A"], secagg.make_roster(p, "shares", names, r_keys), keys, inputs["A"],
                          keys_roster=r_keys_small)


def test_an_unmask_document_revealing_both_shares_is_malformed():
    body = SecAggUnmask(site="A", session=SESSION, roster="0" * 64, self_shares={"B": "0" * 132},
                        key_shares={"B": "0" * 132}).to_dict()
    with pytest.raises(SchemaError, match="reveals both shares"):
        SecAggUnmask.from_dict(body, "unmask.json")
    bad_roster = SecAggRoster(session=SESSION, stage="masked", sites=["A"], dropped=["A"], previous="1" * 64).to_dict()
    with pytest.raises(SchemaError, match="both survive and drop"):
        SecAggRoster.from_dict(bad_roster, "masked.json")


def test_stages_are_deterministic_given_the_persisted_secrets():
    names = ["A", "B", "C"]
    inputs = random_inputs(names, seed=4)
    p = secagg.SessionParams.make(SESSION, names)
    sec = {s: secagg.SiteSecrets.new(SESSION, s) for s in names}
    again = {s: secagg.SiteSecrets.from_json(sec[s].to_json()) for s in names}  # a restart reads them back
    keys = {s: secagg.advertise(sec[s]) for s in names}
    assert keys == {s: secagg.advertise(again[s]) for s in names}
    r_keys = secagg.make_roster(p, "keys", names, None)
    assert secagg.share_keys(p, sec["A"], r_keys, keys) == secagg.share_keys(p, again["A"], r_keys, keys)
    r_shares = secagg.make_roster(p, "shares", names, r_keys)
    one = secagg.mask_input(p, sec["A"], r_shares, keys, inputs["A"])
    two = secagg.mask_input(p, again["A"], r_shares, keys, inputs["A"])
    assert all(np.array_equal(one[n], two[n]) for n in one)


def test_a_share_message_altered_or_misaddressed_fails_authentication():
    names = ["A", "B", "C"]
    p = secagg.SessionParams.make(SESSION, names)
    sec = {s: secagg.SiteSecrets.new(SESSION, s) for s in names}
    keys = {s: secagg.advertise(sec[s]) for s in names}
    r_keys = secagg.make_roster(p, "keys", names, None)
    shares = {s: secagg.share_keys(p, sec[s], r_keys, keys) for s in names}
    forged = dict(shares["B"].ciphertexts)
    forged["A"] = forged["C"]  # B's message to C, replayed to A
    doc = type(shares["B"])(site="B", session=SESSION, roster=shares["B"].roster, ciphertexts=forged)
    with pytest.raises(SignatureError, match="fails authentication"):
        secagg.receive_shares(p, sec["A"], keys, {"B": doc})


def test_session_parameters_refuse_unsafe_settings():
    with pytest.raises(ValidationError, match="at least 3 sites"):
        secagg.SessionParams.make(SESSION, ["A", "B"])
    with pytest.raises(ValidationError, match="strict majority"):
        secagg.SessionParams.make(SESSION, list("ABCDE"), threshold=2)
    p = secagg.SessionParams.make(SESSION, list("ABCDEFGHIJ"), degree=4)
    assert all(len(p.neighbours(s)) == 4 for s in p.sites)
    assert all(s in p.neighbours(j) for s in p.sites for j in p.neighbours(s))  # symmetric graph


def test_fixed_point_decodes_to_plain_weighted_fedavg_within_the_step():
    rng = np.random.default_rng(5)
    base = {"conv.weight": rng.normal(0, 0.1, (64, 32, 3, 3)).astype(np.float32), "bias": np.zeros(64, np.float32)}
    names, weights = ["A", "B", "C", "D"], {"A": 3, "B": 10, "C": 1, "D": 7}
    updates = {s: {n: (g + rng.normal(0, 0.01, g.shape)).astype(np.float32) for n, g in base.items()} for s in names}
    fp = fixedpoint.FixedPoint(bits=32, max_abs=4.0)
    total_w = sum(weights.values())
    encoded = {s: fixedpoint.encode_update(updates[s], base, weights[s], total_w, fp) for s in names}
    assert all(a.dtype == np.uint32 for n, a in encoded["A"].items() if n != fixedpoint.WEIGHT_TENSOR)
    p, _, keys, _, rosters, masked, unmasks = run_stages(names, encoded)
    total = secagg.unmask_sum(p, keys, rosters[2], masked, unmasks)
    plain_int = {n: np.sum([encoded[s][n] for s in names], axis=0, dtype=encoded["A"][n].dtype) for n in encoded["A"]}
    assert all(np.array_equal(total[n], plain_int[n]) for n in total)  # the unmasked sum is the integer sum
    mean, w = fixedpoint.decode_mean(total, base, total_w, fp)
    plain = fixedpoint.plain_weighted_mean(updates, weights)
    assert w == total_w
    for n in base:
        assert np.max(np.abs(mean[n].astype(np.float64) - plain[n])) <= len(names) * fp.step + 1e-7  # + float32
    flat = np.concatenate([(mean[n].astype(np.float64) - plain[n]).ravel() for n in base])
    norm = np.sqrt(sum(float(np.sum(plain[n] ** 2)) for n in base))
    assert np.linalg.norm(flat) / norm <= 1e-6
    with pytest.raises(ValidationError, match="over the secure-aggregation bound"):
        fixedpoint.encode_update({n: g + 5 for n, g in base.items()}, base, 1, total_w, fp)


def test_mask_streams_are_keyed_by_seed_and_tensor():
    a = {"x": np.zeros(1000, np.uint64), "y": np.zeros(1000, np.uint64)}
    masks.apply_mask(a, b"k" * 32, +1)
    assert not np.array_equal(a["x"], a["y"])  # each tensor its own stream
    masks.apply_mask(a, b"k" * 32, -1)
    assert not a["x"].any() and not a["y"].any()


def test_one_altered_unmask_share_is_left_out_when_enough_others_agree():
    names = list("ABCDE")  # t = 3, five holders of each seed
    inputs = random_inputs(names, seed=9)
    p, _, keys, _, rosters, masked, unmasks = run_stages(names, inputs)
    bad = unmasks["D"]
    forged = dict(bad.self_shares)
    forged["A"] = shamir.share_to_hex((shamir.share_from_hex(forged["A"], "x") + 1) % shamir.PRIME)
    unmasks["D"] = SecAggUnmask(site="D", session=SESSION, roster=bad.roster, self_shares=forged,
                                key_shares=bad.key_shares)
    total = secagg.unmask_sum(p, keys, rosters[2], masked, unmasks)
    assert all(np.array_equal(total[n], v) for n, v in modular_sum(inputs, names).items())
    secret = bytes(range(32))
    shares = shamir.split(secret, [1, 2, 3, 4], 3, b"s")
    shares[2] += 1
    with pytest.raises(ValidationError, match="altered"):  # t + 1 shares: an altered one is seen, not found
        shamir.reconstruct_robust(shares, 3)
