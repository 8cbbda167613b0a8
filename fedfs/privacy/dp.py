"""DP-FedAvg at site level: clip each update, add Gaussian noise at the site, account (epsilon, delta).

The mechanism (McMahan et al., ICLR 2018, with every site in every round: sampling rate 1):

- At a site, after local training, the update ``delta = trained - base`` (every float tensor,
  buffers included) is clipped to L2 norm ``C`` (``dp_clip``) and Gaussian noise is added,
  std ``z * C / sqrt(N)`` per coordinate (``z`` = ``dp_noise_multiplier``, ``N`` = the
  federation's sites): :func:`privatize_update` rewrites the site's update file as
  ``base + clip(delta) + noise``.
- The aggregator's uniform mean of the ``N`` updates then carries noise of std ``z * C / N``,
  DP-FedAvg's target for the mean, whose sensitivity to one site is ``C / N``: each published
  global is a Gaussian mechanism with noise multiplier ``z``. With ``m < N`` contributions
  (a deadline fallback) the mean carries ``z * C / sqrt(N m)`` against a sensitivity of ``C / m``:
  multiplier ``z * sqrt(m / N)``, and the accountant charges that round so.
- Assumptions: every contributing site adds its noise (a site that skips it lowers the
  aggregate's noise, not only its own privacy); the mean is uniform (``weighting`` "uniform")
  over all sites' whole models (not AsymFedAvg), synchronous; neighbouring federations differ
  in one site's data (site-level DP). Against whoever sees a single update (the aggregator
  without secure aggregation, a bucket reader) only the site's own noise protects it:
  multiplier ``z / sqrt(N)`` per round (:func:`single_update_epsilon`).

The accountant is dp-accounting's PLD accountant (Google's privacy loss distributions: tight
for the Gaussian mechanism). ``fedfs init`` derives ``z`` (:func:`noise_multiplier_for`) so
that the planned rounds stay within (epsilon, delta); the aggregator accounts each round as it
publishes (:func:`account_round`), refuses a version that would exceed the budget and marks the
last one that fits final.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import ConfigError, ValidationError

__all__ = ["ACCOUNTANT", "within", "DpStats", "RoundAccount", "site_noise_std", "noise_multiplier_for", "epsilon_of",
           "single_update_epsilon", "account_round", "privatize_update", "privatize_site_update", "describe",
           "DEFAULT_DELTA", "privacy_status", "privacy_lines"]

ACCOUNTANT = "dp-accounting PLD"
#: The PLD accountant's discretisation of the privacy loss (pessimistic, so epsilon is an upper bound):
#: 1e-3 gives the epsilon of 1e-4 (its default) to about 1e-6 relative for these Gaussians, ten times faster.
VALUE_DISCRETIZATION = 1e-3
#: Relative slack when comparing an epsilon with the budget (the accountant's last digits).
SLACK = 1e-9


def within(epsilon: float, budget: float) -> bool:
    """Whether ``epsilon`` stays within ``budget`` (up to the accountant's rounding, :data:`SLACK`)."""
    return epsilon <= budget * (1 + SLACK)
#: ``fedfs init``'s delta when only an epsilon is given: far below 1 / (number of sites).
DEFAULT_DELTA = 1e-5
#: The safetensors metadata key a privatized update carries (its clip and noise std: never data-dependent).
MARKER = "fedfs_dp"


# ---- accounting ----------------------------------------------------------------
def _event(multipliers: Sequence[float]) -> Any:
    import dp_accounting as dpa

    counts = sorted(Counter(float(z) for z in multipliers).items())  # one self-composition per distinct z
    return dpa.ComposedDpEvent([dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(z), n) for z, n in counts])


def epsilon_of(multipliers: Sequence[float], delta: float) -> float:
    """The epsilon at ``delta`` of one Gaussian mechanism per round, with these noise multipliers
    (sensitivity 1, sampling rate 1), composed by the PLD accountant. 0 for no rounds."""
    if not multipliers:
        return 0.0
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

    accountant = PLDAccountant(value_discretization_interval=VALUE_DISCRETIZATION)
    return float(accountant.compose(_event(multipliers)).get_epsilon(delta))


def noise_multiplier_for(epsilon: float, delta: float, rounds: int) -> float:
    """The noise multiplier ``z`` with which ``rounds`` rounds stay within (``epsilon``, ``delta``).

    Start from dp-accounting's analytic Gaussian calibration for one release (``rounds`` Gaussian
    releases of multiplier z compose to one of z / sqrt(rounds)), then check it with the PLD
    accountant and raise it by 0.1 % steps until the accountant agrees (its discretisation)."""
    if not (epsilon > 0 and math.isfinite(epsilon) and 0 < delta < 1 and rounds >= 1):
        raise ConfigError(f"a DP budget needs epsilon > 0, 0 < delta < 1 and rounds >= 1, got {epsilon}, {delta}, "
                          f"{rounds}")
    import dp_accounting as dpa

    z = float(dpa.get_sigma_gaussian(epsilon, delta)) * math.sqrt(rounds)
    for _ in range(200):
        if within(epsilon_of([z] * rounds, delta), epsilon):
            return z
        z *= 1.001
    raise ConfigError(f"no noise multiplier found for epsilon {epsilon}, delta {delta} over {rounds} rounds")


def site_noise_std(clip: float, noise_multiplier: float, n_sites: int) -> float:
    """Each site's noise std, so that the uniform mean over ``n_sites`` carries ``z * C / n_sites``."""
    return noise_multiplier * clip / math.sqrt(n_sites)


def single_update_epsilon(config: Any, rounds: int) -> float:
    """The epsilon that protects a site's individual updates over ``rounds`` rounds against whoever
    reads them (the aggregator without secure aggregation): its own noise alone, multiplier z / sqrt(N)."""
    z = config.dp_noise_multiplier / math.sqrt(len(config.sites))
    return epsilon_of([z] * rounds, config.dp_delta) if rounds else 0.0


@dataclass(frozen=True)
class RoundAccount:
    """What the aggregator records in a global's ``report["dp"]``, and whether it may publish it."""

    epsilon: float  # cumulative, this round included
    epsilon_round: float  # this round alone, at the same delta
    delta: float
    budget: float  # the federation's dp_epsilon
    noise_multiplier: float  # this round's effective z: z * sqrt(contributions / sites)
    contributions: int
    rounds_accounted: int
    multipliers: list[float] = field(default_factory=list)  # every published round's z, oldest first
    next_fits: bool = True  # one more full round would stay within the budget
    exceeds: bool = False  # publishing this round would exceed the budget: refused
    epsilon_single_update: float = 0.0  # a site's own updates over these rounds, against whoever reads them

    def record(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("exceeds")
        d["accountant"] = ACCOUNTANT
        return d


def account_round(config: Any, previous: Mapping[str, Any] | None, contributions: int) -> RoundAccount:
    """Charge one round of ``contributions`` clipped, noised updates on top of ``previous`` (the current
    global's ``report["dp"]``, or None before the first round)."""
    history = [float(z) for z in (previous or {}).get("multipliers", [])]
    n = len(config.sites)
    z_eff = config.dp_noise_multiplier * math.sqrt(max(1, contributions) / n)
    delta, budget = config.dp_delta, config.dp_epsilon
    eps = epsilon_of(history + [z_eff], delta)
    exceeds = not within(eps, budget)
    if exceeds:  # the record stays the previous one: nothing more is released
        prior = epsilon_of(history, delta)
        return RoundAccount(prior, 0.0, delta, budget, z_eff, contributions, len(history), history, False, True)
    nxt = within(epsilon_of(history + [z_eff, config.dp_noise_multiplier], delta), budget)
    return RoundAccount(eps, epsilon_of([z_eff], delta), delta, budget, z_eff, contributions, len(history) + 1,
                        history + [z_eff], nxt, False, single_update_epsilon(config, len(history) + 1))


# ---- the site's clipping and noise ----------------------------------------------
@dataclass(frozen=True)
class DpStats:
    """What :func:`privatize_update` did (kept at the site: the norm is data-dependent)."""

    norm: float  # L2 norm of trained - base before clipping
    scale: float  # min(1, C / norm)
    noise_std: float
    params: int
    already: bool = False  # the file was privatized before (a re-run): left as it was


def privatize_update(update_path: str | os.PathLike[str], base_path: str | os.PathLike[str], *, clip: float,
                     noise_std: float, seed: int | None = None) -> DpStats:
    """Rewrite ``update_path`` (full weights) as ``base + clip(update - base, clip) + N(0, noise_std^2)``.

    Every float tensor counts towards the norm and gets noise; integer buffers stay as they are.
    The file is replaced atomically and marked (metadata ``fedfs_dp``), so a second call leaves
    it alone. ``seed`` None draws the noise seed from the operating system (``secrets``)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    if not (clip > 0 and noise_std >= 0):
        raise ConfigError(f"clip must be > 0 and noise std >= 0, got {clip}, {noise_std}")
    path = os.fspath(update_path)
    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata() or {})
        if MARKER in meta:
            return DpStats(float("nan"), float("nan"), noise_std, 0, already=True)
        trained = {k: f.get_tensor(k) for k in f.keys()}
    with safe_open(os.fspath(base_path), framework="pt") as f:
        base = {k: f.get_tensor(k) for k in f.keys() if k in trained}
    floats = sorted(k for k, t in trained.items() if t.is_floating_point())
    for k in floats:
        if k not in base or base[k].shape != trained[k].shape:
            raise ValidationError(f"{path}: tensor {k!r} has no counterpart of its shape in the base global "
                                  f"{os.fspath(base_path)}; the update cannot be clipped", key=path)
    deltas = {k: trained[k].double() - base[k].double() for k in floats}
    norm = math.sqrt(sum(float(d.pow(2).sum()) for d in deltas.values()))
    scale = 1.0 if norm <= clip else clip / norm
    gen = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)
    out = dict(trained)
    for k in floats:
        noise = torch.randn(deltas[k].shape, generator=gen, dtype=torch.float64) * noise_std
        out[k] = (base[k].double() + deltas[k] * scale + noise).to(trained[k].dtype).contiguous()
    meta[MARKER] = json.dumps({"clip": clip, "noise_std": noise_std}, sort_keys=True)
    tmp = f"{path}.dp-tmp"
    save_file(out, tmp, meta)
    os.replace(tmp, path)
    return DpStats(norm, scale, noise_std, sum(deltas[k].numel() for k in floats))


def privatize_site_update(config: Any, base_path: str, update_path: str) -> DpStats:
    """The site's hook after training: clip and noise its update by the federation's DP settings."""
    std = site_noise_std(config.dp_clip, config.dp_noise_multiplier, len(config.sites))
    return privatize_update(update_path, base_path, clip=config.dp_clip, noise_std=std)


def describe(config: Any) -> str:
    """One line on the federation's rule and DP settings, for ``fedfs init`` and ``fedfs status``."""
    parts = []
    if config.rule != "fedavg":
        parts.append(f"rule {config.rule}" + (f" (trim {config.trim_fraction:g} at each end)"
                                               if config.rule == "trimmed_mean" else ""))
    if config.dp_noise_multiplier > 0:
        std = site_noise_std(config.dp_clip, config.dp_noise_multiplier, len(config.sites))
        parts.append(f"DP-FedAvg budget (epsilon {config.dp_epsilon:g}, delta {config.dp_delta:g}) over "
                     f"{config.rounds} rounds: clip {config.dp_clip:g}, noise multiplier "
                     f"{config.dp_noise_multiplier:.4g} (noise std {std:.4g} at each site)")
    return "; ".join(parts) or "rule fedavg, no differential privacy"


def privacy_status(config: Any, report: Mapping[str, Any] | None) -> dict[str, Any]:
    """The rule and DP state for ``fedfs status`` and the report: the settings, and the accountant's
    record in the newest global's ``report["dp"]`` (read, never recomputed: status stays cheap)."""
    out: dict[str, Any] = {"rule": config.rule, "trim_fraction": config.trim_fraction if config.rule == "trimmed_mean"
                           else None, "dp": None, "summary": describe(config)}
    if config.dp_noise_multiplier > 0:
        rec = (report or {}).get("dp") if isinstance((report or {}).get("dp"), dict) else {}
        out["dp"] = {"epsilon_budget": config.dp_epsilon, "delta": config.dp_delta, "clip": config.dp_clip,
                     "noise_multiplier": config.dp_noise_multiplier,
                     "site_noise_std": site_noise_std(config.dp_clip, config.dp_noise_multiplier, len(config.sites)),
                     "accountant": ACCOUNTANT, "rounds_planned": config.rounds,
                     "epsilon": rec.get("epsilon", 0.0), "epsilon_last_round": rec.get("epsilon_round"),
                     "rounds_accounted": rec.get("rounds_accounted", 0),
                     "epsilon_single_update": rec.get("epsilon_single_update")}
    return out


def privacy_lines(p: Mapping[str, Any]) -> list[str]:
    """``privacy_status`` in words, one line each (nothing for a plain FedAvg federation without DP)."""
    if p["rule"] == "fedavg" and p["dp"] is None:
        return []
    lines = [p["summary"]]
    d = p["dp"]
    if d is not None:
        last = "" if d["epsilon_last_round"] is None else f", last round {d['epsilon_last_round']:.3g}"
        lines.append(f"privacy spent: epsilon {d['epsilon']:.4g} of {d['epsilon_budget']:g} (delta {d['delta']:g}) "
                     f"after {d['rounds_accounted']} of {d['rounds_planned']} round(s){last}; {d['accountant']}")
        if d["epsilon_single_update"] is not None:
            lines.append(f"  a single site's updates, to whoever reads them (the aggregator without secure "
                         f"aggregation): epsilon {d['epsilon_single_update']:.4g}")
    return lines
