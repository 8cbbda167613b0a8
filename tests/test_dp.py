"""DP-FedAvg: the accountant against dp-accounting's reference numbers, the noise multiplier for a
budget, clipping and noise statistics at a site, and a toy federation that stops within its budget."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fedfs.errors import ConfigError, SchemaError
from fedfs.privacy import dp


# ---- the accountant -----------------------------------------------------------------
@pytest.mark.parametrize("sigma,delta", [(0.5, 1e-1), (1.0, 1e-2), (3.0, 1e-3), (3.0, 1e-5)])
def test_one_round_equals_the_analytic_gaussian(sigma, delta):
    """dp-accounting's own test checks its PLD accountant against get_epsilon_gaussian (Balle and
    Wang's exact Gaussian mechanism); ours, at its coarser discretisation, must agree too."""
    import dp_accounting as dpa

    assert dp.epsilon_of([sigma], delta) == pytest.approx(dpa.get_epsilon_gaussian(sigma, delta), rel=1e-3)


@pytest.mark.parametrize("z,rounds", [(4.0, 5), (2.0, 24)])
def test_rounds_compose_as_one_gaussian_of_z_over_sqrt_rounds(z, rounds):
    import dp_accounting as dpa

    exact = dpa.get_epsilon_gaussian(z / math.sqrt(rounds), 1e-5)  # T Gaussians of z = one of z / sqrt(T)
    assert dp.epsilon_of([z] * rounds, 1e-5) == pytest.approx(exact, rel=1e-3)
    assert dp.epsilon_of([z] * rounds, 1e-5) > dp.epsilon_of([z] * (rounds - 1), 1e-5)


def test_the_libraries_rdp_reference_is_an_upper_bound():
    """dp-accounting's RDP test: noise multiplier 4.530877117 gives exactly (1, 1e-6)-DP by RDP over a
    fine grid of orders. RDP is loose for the Gaussian; the tight PLD epsilon must lie below 1, above
    the exact value's rounding."""
    from dp_accounting import GaussianDpEvent
    from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

    orders = [0.001 * i for i in range(1000, 100000)]
    rdp = RdpAccountant(orders).compose(GaussianDpEvent(4.530877117)).get_epsilon(1e-6)
    assert rdp == pytest.approx(1.0, abs=1e-6)
    ours = dp.epsilon_of([4.530877117], 1e-6)
    assert 0.8 < ours < rdp


@pytest.mark.parametrize("eps,rounds", [(1.0, 1), (2.0, 5), (8.0, 24)])
def test_noise_multiplier_keeps_the_planned_rounds_in_budget_and_no_more(eps, rounds):
    z = dp.noise_multiplier_for(eps, 1e-5, rounds)
    assert dp.within(dp.epsilon_of([z] * rounds, 1e-5), eps)
    assert dp.epsilon_of([z * 0.99] * rounds, 1e-5) > eps  # near the smallest such z: 1 % less noise overspends
    assert dp.epsilon_of([z] * (rounds + 1), 1e-5) > eps  # one round more does not fit
    with pytest.raises(ConfigError, match="delta"):
        dp.noise_multiplier_for(eps, 0.0, rounds)


def _cfg(z: float, eps: float = 2.0, n: int = 4, rounds: int = 3):
    return SimpleNamespace(dp_noise_multiplier=z, dp_epsilon=eps, dp_delta=1e-5, dp_clip=1.0, rounds=rounds,
                           sites=[object()] * n)


def test_account_round_charges_each_round_and_stops_at_the_budget():
    z = dp.noise_multiplier_for(2.0, 1e-5, 3)
    c = _cfg(z)
    rec, spent = None, []
    for r in range(3):
        a = dp.account_round(c, rec, contributions=4)
        assert not a.exceeds and a.rounds_accounted == r + 1 and a.noise_multiplier == pytest.approx(z)
        assert a.next_fits == (r < 2)  # the third is the last the budget allows: the aggregator marks it final
        rec = a.record()
        spent.append(a.epsilon)
    assert spent == sorted(spent) and dp.within(spent[-1], 2.0)
    assert rec["epsilon_round"] == pytest.approx(dp.epsilon_of([z], 1e-5))
    assert rec["epsilon_single_update"] > spent[-1]  # one update alone carries a fraction of the noise
    over = dp.account_round(c, rec, contributions=4)
    assert over.exceeds and over.epsilon == pytest.approx(spent[-1]) and over.rounds_accounted == 3


def test_a_round_with_fewer_sites_costs_more():
    z = dp.noise_multiplier_for(2.0, 1e-5, 3)
    full, half = dp.account_round(_cfg(z), None, 4), dp.account_round(_cfg(z), None, 2)
    assert half.noise_multiplier == pytest.approx(z * math.sqrt(2 / 4))
    assert half.epsilon > full.epsilon


# ---- clipping and noise at a site ---------------------------------------------------
def _pair(tmp: Path, delta: dict[str, np.ndarray], dtype=torch.float32) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    base = {k: torch.from_numpy(rng.normal(size=v.shape)).to(dtype) for k, v in delta.items()}
    base["bn.num_batches_tracked"] = torch.tensor(3, dtype=torch.int64)
    trained = {k: (v.double() + torch.from_numpy(delta[k])).to(dtype) if k in delta else v.clone()
               for k, v in base.items()}
    trained["bn.num_batches_tracked"] = torch.tensor(8, dtype=torch.int64)
    save_file(base, str(tmp / "base.safetensors"))
    save_file(trained, str(tmp / "upd.safetensors"), {"site": "A"})
    return tmp / "base.safetensors", tmp / "upd.safetensors"


def _delta(base: Path, upd: Path) -> np.ndarray:
    b, u = load_file(str(base)), load_file(str(upd))
    return np.concatenate([(u[k].double() - b[k].double()).numpy().ravel() for k in sorted(b)
                           if b[k].is_floating_point()])


def test_an_update_above_the_clip_is_scaled_to_it(tmp_path):
    delta = {"w": np.full((10, 10), 0.3), "b": np.full((10,), -0.4)}  # norm sqrt(9 + 1.6) = 3.26
    base, upd = _pair(tmp_path, delta, torch.float64)
    stats = dp.privatize_update(upd, base, clip=1.0, noise_std=0.0)
    assert stats.norm == pytest.approx(math.sqrt(100 * 0.09 + 10 * 0.16))
    d = _delta(base, upd)
    assert np.linalg.norm(d) == pytest.approx(1.0, rel=1e-9)
    assert np.allclose(d / np.linalg.norm(d), np.r_[np.full(10, -0.4), np.full(100, 0.3)] / stats.norm)  # direction
    assert load_file(str(upd))["bn.num_batches_tracked"].item() == 8  # integer buffers untouched


def test_an_update_below_the_clip_is_unchanged(tmp_path):
    base, upd = _pair(tmp_path, {"w": np.full((4, 4), 0.01)}, torch.float64)
    before = _delta(base, upd)
    assert dp.privatize_update(upd, base, clip=1.0, noise_std=0.0).scale == 1.0
    assert np.allclose(_delta(base, upd), before, atol=1e-12)


def test_noise_has_the_sites_std_and_averages_to_the_target(tmp_path):
    # Prepare: a zero update of 200k parameters; 4 sites, z = 2, C = 0.5
    n_sites, z, clip = 4, 2.0, 0.5
    std = dp.site_noise_std(clip, z, n_sites)
    assert std == pytest.approx(z * clip / 2)
    noises = []
    for i in range(n_sites):
        d = tmp_path / f"s{i}"
        d.mkdir()
        base, upd = _pair(d, {"w": np.zeros((400, 500))})
        dp.privatize_update(upd, base, clip=clip, noise_std=std, seed=100 + i)
        noises.append(_delta(base, upd))
    # Assert: each site's noise is N(0, std^2); the mean over the sites is N(0, (z C / N)^2), DP-FedAvg's target
    for x in noises:
        assert abs(x.mean()) < 5 * std / math.sqrt(x.size) and x.std() == pytest.approx(std, rel=0.01)
    mean = np.mean(noises, axis=0)
    assert mean.std() == pytest.approx(z * clip / n_sites, rel=0.01)
    assert abs(np.corrcoef(noises[0], noises[1])[0, 1]) < 0.01  # independent seeds


def test_privatizing_is_marked_atomic_and_done_once(tmp_path):
    base, upd = _pair(tmp_path, {"w": np.ones((8, 8))}, torch.float16)
    dp.privatize_update(upd, base, clip=1.0, noise_std=0.1)
    first = upd.read_bytes()
    with safe_open(str(upd), framework="pt") as f:
        meta = f.metadata()
    assert meta["site"] == "A" and '"clip": 1.0' in meta["fedfs_dp"]  # the norm is not in the file
    assert load_file(str(upd))["w"].dtype == torch.float16
    assert dp.privatize_update(upd, base, clip=1.0, noise_std=0.1).already
    assert upd.read_bytes() == first and not list(tmp_path.glob("*.dp-tmp"))


# ---- settings at init -------------------------------------------------------------------
def _keys(tmp: Path) -> Path:
    from fedfs.trust.signing import generate_keypair

    keys = tmp / "keys"
    if not keys.exists():
        generate_keypair("agg", "aggregator", keys)
        for s in "ABC":
            generate_keypair(s, "site", keys)
    return keys


def test_init_derives_the_noise_multiplier_and_refuses_what_dp_cannot_account(tmp_path):
    from click.testing import CliRunner

    from fedfs.cli import main
    from fedfs.federation import Federation

    keys = _keys(tmp_path)
    base = ["init", str(tmp_path / "fed"), "--sites", "A,B,C", "--keys", str(keys), "--mode", "fedavg",
            "--rounds", "4"]
    out = CliRunner().invoke(main, base + ["--dp-epsilon", "3", "--clip", "0.5", "--weighting", "uniform"])
    assert out.exit_code == 0, out.output
    c = Federation.open(str(tmp_path / "fed")).config
    assert (c.dp_epsilon, c.dp_delta, c.dp_clip) == (3.0, 1e-5, 0.5)
    assert c.dp_noise_multiplier == pytest.approx(dp.noise_multiplier_for(3.0, 1e-5, 4))
    assert f"noise multiplier {c.dp_noise_multiplier:.4g}" in out.output
    for extra, reason in [([], "weighting 'uniform'"), (["--weighting", "uniform", "--rule", "median"], "sensitivity"),
                          (["--weighting", "uniform", "--aggregation", "async"], "aggregation 'sync'")]:
        bad = CliRunner().invoke(main, ["init", str(tmp_path / "bad"), *base[2:], "--dp-epsilon", "3",
                                        "--clip", "0.5", *extra])
        assert bad.exit_code != 0 and reason in f"{bad.output}{bad.exception}", (extra, bad.output, bad.exception)
    with pytest.raises(SchemaError, match="dp_clip > 0"):
        from fedfs.federation import config_from_key_dir

        config_from_key_dir(keys, list("ABC"), mode="fedavg", weighting="uniform",
                            dp_epsilon=1.0)[0].validate("federation.json")


# ---- a toy federation within its budget ---------------------------------------------------
def test_the_federation_stops_before_the_budget_is_exceeded(tmp_path):
    """Planned for 4 rounds, but the noise is calibrated for 2: v2 is the last global the budget
    allows, marked final; every global records the epsilon spent; status shows it."""
    from fedfs.ops.status import collect_status
    from fedfs.protocol import layout
    from fedfs.protocol.schema import GlobalManifest
    from fedfs.roles.loop import run_loop
    from fedfs.testing.toy import ToyWork, toy_federation

    class Quick(ToyWork):
        def __init__(self, name, **kw):
            super().__init__(name, **{**kw, "steps": 1})

    z = dp.noise_multiplier_for(4.0, 1e-5, 2)
    fed, agg, sites = toy_federation(tmp_path, "ABC", work=Quick, mode="fedavg", rounds=4, weighting="uniform",
                                     dp_epsilon=4.0, dp_delta=1e-5, dp_clip=0.5, dp_noise_multiplier=z)
    for _ in range(20):
        for p in [agg, *sites.values()]:
            run_loop(p.step)
        if all(s.state.finished for s in sites.values()):
            break
    assert all(s.state.finished and s.state.final_version == 2 for s in sites.values())
    docs = [fed.bucket.read(layout.global_version(v), GlobalManifest).doc for v in (1, 2)]
    assert not docs[0].final and docs[1].final
    assert [d.report["dp"]["rounds_accounted"] for d in docs] == [1, 2]
    assert docs[0].report["dp"]["epsilon"] < docs[1].report["dp"]["epsilon"] <= 4.0 * (1 + 1e-9)
    assert docs[1].report["dp"]["epsilon"] == pytest.approx(dp.epsilon_of([z, z], 1e-5))
    assert not fed.store.exists(layout.global_version(3))
    # each update was clipped and noised before it left its site
    for name in "ABC":
        with safe_open(str(tmp_path / name / "updates" / "r000001.safetensors"), framework="pt") as f:
            assert "fedfs_dp" in f.metadata()
    st = collect_status(fed)["privacy"]["dp"]
    assert st["rounds_accounted"] == 2 and st["epsilon"] == pytest.approx(docs[1].report["dp"]["epsilon"])
    from fedfs.privacy.dp import privacy_lines

    assert any("privacy spent: epsilon" in line and "of 4 " in line for line in privacy_lines(
        collect_status(fed)["privacy"]))
    from fedfs.ops.history import collect_history
    from fedfs.ops.report import _privacy_state, render_html

    d = collect_history(fed)
    d["privacy"] = _privacy_state(fed, d)  # what build_report adds (without its plots, which cost seconds)
    page = render_html(d, {})
    assert "Privacy and robustness" in page and "Epsilon (cumulative)" in page
    assert f"{docs[1].report['dp']['epsilon']:.4g}" in page


def test_a_crashed_dp_round_is_trained_again_not_recovered_unnoised(tmp_path):
    """A site killed after training (before its record): the trainer's checkpoint holds the round, but
    an update written from it would skip the noise, so under DP the site trains the round again."""
    from fedfs.roles import faults
    from fedfs.roles.loop import run_loop
    from fedfs.roles.site import Site
    from fedfs.testing.toy import ToyWork, toy_federation

    class Recovering(ToyWork):
        recovered = 0

        def __init__(self, name, **kw):
            super().__init__(name, **{**kw, "steps": 1})

        def recover_round(self, epoch_before, epochs, update_path):  # what NnunetWork does: from its checkpoint
            Recovering.recovered += 1
            self.initial_weights(update_path)
            return True

    fed, agg, sites = toy_federation(tmp_path, "AB", work=Recovering, mode="fedavg", rounds=1, weighting="uniform",
                                     dp_epsilon=4.0, dp_clip=0.5, dp_delta=1e-5,
                                     dp_noise_multiplier=dp.noise_multiplier_for(4.0, 1e-5, 1))

    class Crash(Exception):
        pass

    def crash(name):
        if name == "site.mid_training":
            raise Crash(name)

    for p in (sites["A"], sites["B"], agg):  # both plan, then v0
        run_loop(p.step)
    previous = faults.set_hook(crash)
    try:
        with pytest.raises(Crash):
            for _ in range(4):
                run_loop(sites["A"].step)
    finally:
        faults.set_hook(previous)
    a = Site(fed.as_party(tmp_path / "keys" / "A.key"), Recovering("A", seed=0), tmp_path / "A")  # restarted
    for _ in range(6):
        for p in (agg, a, sites["B"]):
            run_loop(p.step)
    assert a.state.finished and Recovering.recovered == 0
    with safe_open(str(tmp_path / "A" / "updates" / "r000000.safetensors"), framework="pt") as f:
        assert "fedfs_dp" in f.metadata()
