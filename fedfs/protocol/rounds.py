"""What is due now: pure decisions of the site and the aggregator from bucket state.

No I/O here. The roles (:mod:`fedfs.roles.site`, :mod:`fedfs.roles.aggregator`) read the
bucket, call these functions, and act on the answer, so every rule about
rounds, barriers, staleness and termination is in one testable place.

Versions and rounds:

- Global ``v0`` is the initial model; ``v1 .. vR`` follow, R = ``config.rounds``.
  The federation is finished when ``vR`` (or a global marked ``final``) exists.
- A site's updates are numbered ``r0, r1, ...``; each names the global it was
  trained from (``base_version``). A site trains at most R updates (that is the
  epoch budget nnU-Net's poly learning rate was set up for) and never trains
  twice from the same global.
- Synchronous: ``v(n+1)`` averages the updates based on ``vn`` from every site,
  or, after ``deadline_s``, from at least ``min_sites``. A late update (based on
  an older global) is rejected as late.
- Asynchronous (FedBuff): ``v(n+1)`` folds every pending update as soon as at
  least K are pending, K capped by the number of sites that can still send one;
  updates staler than ``max_staleness`` are rejected.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .schema import FederationConfig


@dataclass(frozen=True)
class Pending:
    """A verified update not yet folded into a global."""

    site: str
    round: int
    base_version: int
    key: str


@dataclass(frozen=True)
class AggregateDecision:
    aggregate: bool
    chosen: tuple[Pending, ...] = ()
    rejected: tuple[tuple[Pending, str], ...] = ()
    final: bool = False
    reason: str = ""


def screen(config: FederationConfig, version: int, pending: list[Pending]) -> tuple[list[Pending], list[tuple[Pending, str]]]:
    """Split pending updates into usable ones and rejections (late, stale, from the future)."""
    ok, bad = [], []
    seen: set[tuple[str, int]] = set()
    for p in sorted(pending, key=lambda p: (p.site, p.round)):
        if (p.site, p.base_version) in seen:
            bad.append((p, f"a second update trained from v{p.base_version}: a site sends one per global"))
        elif p.base_version > version:
            bad.append((p, f"names base version v{p.base_version}, newer than the current v{version}"))
        elif config.aggregation == "sync" and p.base_version < version:
            bad.append((p, f"late for the synchronous round: trained from v{p.base_version}, current is v{version}"))
        elif version - p.base_version > config.max_staleness:
            bad.append((p, f"too stale: trained from v{p.base_version}, current is v{version} "
                           f"(max_staleness {config.max_staleness})"))
        elif p.round >= config.rounds:
            bad.append((p, f"update r{p.round} is beyond the federation's {config.rounds} rounds"))
        else:
            ok.append(p)
            seen.add((p.site, p.base_version))
    return ok, bad


def decide_aggregation(
    config: FederationConfig,
    version: int,
    pending: list[Pending],
    next_rounds: dict[str, int],
    age_s: float,
    rejected_sites: frozenset[str] | set[str] = frozenset(),
) -> AggregateDecision:
    """Should the aggregator publish ``v(version+1)`` now, and from which updates?

    ``next_rounds`` holds, per site, the next update number the aggregator has
    not yet seen (so ``>= rounds`` means the site has sent all it will send);
    ``age_s`` is how long ago the current global was published; ``rejected_sites``
    sent an update from the current version that was rejected (in sync mode they have
    answered: they will not train from this version again).
    """
    if version >= config.rounds:
        return AggregateDecision(False, reason="finished")
    usable, rejected = screen(config, version, pending)
    sites = config.site_names
    can_still_send = {s for s in sites if next_rounds.get(s, 0) < config.rounds}
    if config.aggregation == "sync":
        have = {p.site for p in usable}
        answered = have | (set(rejected_sites) | {p.site for p, _ in rejected if p.base_version == version})
        if answered >= set(sites):
            if not usable:
                return AggregateDecision(True, (), tuple(rejected),
                                         reason=f"every update from v{version} was rejected: global unchanged")
            return AggregateDecision(True, tuple(usable), tuple(rejected), reason="every site reported"
                                     if have >= set(sites) else f"every site reported ({len(have)} accepted)")
        need = config.min_sites or len(sites)
        if config.deadline_s and age_s >= config.deadline_s and len(have) >= max(1, need):
            return AggregateDecision(True, tuple(usable), tuple(rejected),
                                     reason=f"deadline of {config.deadline_s:g} s passed with {len(have)} site(s)")
        waiting_for = set(sites) - answered
        if usable and not (waiting_for & can_still_send):
            return AggregateDecision(True, tuple(usable), tuple(rejected),
                                     reason="the missing sites have no rounds left")
        return AggregateDecision(False, (), tuple(rejected), reason=f"waiting for {', '.join(sorted(waiting_for))}")
    # asynchronous FedBuff
    contributors = {p.site for p in usable} | can_still_send
    k = min(config.k, len(contributors))
    # "fresh": K counts updates trained from the current global; a stale one rides along (discounted)
    # but does not cut the buffer short, so sites that keep pace stay in step (docs/concepts.md).
    # "any" (FedBuff as published) counts every update; the two fallbacks below are then implied.
    fresh = sum(1 for p in usable if p.base_version == version)
    if config.buffer_trigger == "fresh":
        counted, which = fresh, f" from v{version}"
        older = f" ({len(usable) - fresh} older)"
    else:
        counted, which, older = len(usable), "", ""
    if usable and counted >= max(1, k):
        return AggregateDecision(True, tuple(usable), tuple(rejected),
                                 reason=f"{counted} update(s){which} buffered (K={k}){older}")
    if usable and {p.site for p in usable} >= contributors:
        return AggregateDecision(True, tuple(usable), tuple(rejected),
                                 reason=f"every site that can still send has an update buffered{older}")
    if usable and config.deadline_s and age_s >= config.deadline_s and len(usable) >= max(1, k):
        return AggregateDecision(True, tuple(usable), tuple(rejected),
                                 reason=f"deadline of {config.deadline_s:g} s passed with {len(usable)} "
                                        f"update(s) buffered{older}")
    if usable and not can_still_send:
        return AggregateDecision(True, tuple(usable), tuple(rejected), reason="no site has rounds left")
    if not usable and not can_still_send:
        return AggregateDecision(True, (), tuple(rejected), final=True,
                                 reason="no site can send another update: closing the federation")
    return AggregateDecision(False, (), tuple(rejected), reason=f"{counted} of K={k} update(s){which} buffered{older}")


@dataclass(frozen=True)
class SiteDecision:
    action: str  # "train", "wait", "finish", "done"
    base_version: int = -1
    round: int = -1
    reason: str = ""


def decide_site(
    config: FederationConfig,
    latest_version: int | None,
    latest_final: bool,
    updates_sent: int,
    last_base: int | None,
    finished_locally: bool,
) -> SiteDecision:
    """What a site should do once it is planned, given the newest global it can see.

    ``updates_sent`` counts its published updates; ``last_base`` is the base
    version of its last one.
    """
    if finished_locally:
        return SiteDecision("done", reason="training finished")
    if latest_version is None:
        return SiteDecision("wait", reason="waiting for the initial global model v0")
    if latest_version >= config.rounds or latest_final:
        return SiteDecision("finish", base_version=latest_version, reason=f"final global v{latest_version} is out")
    if updates_sent >= config.rounds:
        return SiteDecision("wait", reason=f"all {config.rounds} rounds sent; waiting for the final global")
    if last_base is not None and last_base >= latest_version:
        return SiteDecision("wait", reason=f"already trained from v{latest_version}; waiting for v{latest_version + 1}")
    return SiteDecision("train", base_version=latest_version, round=updates_sent,
                        reason=f"train round r{updates_sent} from v{latest_version}")


@dataclass
class SetupState:
    """What the aggregator has seen of the set-up phase (pure input to :func:`setup_due`)."""

    census_sites: set[str] = field(default_factory=set)
    census_published: bool = False
    summary_sites: set[str] = field(default_factory=set)
    fingerprint_published: bool = False
    plans_sites: set[str] = field(default_factory=set)
    v0_published: bool = False


def setup_due(config: FederationConfig, s: SetupState) -> str:
    """The aggregator's next set-up action: census, fingerprint, v0, or wait/train."""
    sites = set(config.site_names)
    if config.mode == "ffe":
        if not s.census_published:
            return "census" if s.census_sites >= sites else "wait-census"
        if not s.fingerprint_published:
            return "fingerprint" if s.summary_sites >= sites else "wait-summaries"
    if not s.v0_published:
        return "v0" if s.plans_sites >= sites else "wait-plans"
    return "rounds"
