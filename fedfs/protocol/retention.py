"""Retention: which payloads may be removed, as pure functions of published manifests.

With ``FederationConfig.keep_globals`` K > 0 (0 keeps everything) the federation keeps:

- the payloads of the last K globals (the newest, which is the final one at the end, among them);
- in asynchronous mode, until the final global is out, also every global a site may still be
  training from: ``max_staleness`` versions behind the newest (the aggregator needs that base
  for FedBuff's delta, and a slow site may not have downloaded it yet);
- ``v0``: its payload is the sites' initial weights (``sites/<S>/blobs``), which nobody deletes;
- the payloads of updates folded into the newest global (its inputs: a concurrent or re-run
  aggregation of it still finds them), and of every update not yet decided.

Everything else may go: payloads named only by older globals (the aggregator deletes those,
under ``aggregator/``), and payloads of updates decided before the newest global, i.e. folded
into an older one or rejected (each site deletes its own). Manifests always stay. The rule is
in docs/protocol.md ("Retention"); the roles delete (:mod:`fedfs.roles.retention`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .layout import AGG_PREFIX
from .schema import MIN_KEEP_GLOBALS as MIN_KEEP
from .schema import BlobRef, FederationConfig, GlobalManifest

__all__ = ["MIN_KEEP", "AggregatorPruning", "oldest_kept", "payload_refs", "plan_aggregator_pruning",
           "site_rounds_decided"]


def oldest_kept(config: FederationConfig, latest: int, latest_final: bool) -> int:
    """The oldest global version whose payloads are kept, given the newest one (``latest``)."""
    if config.keep_globals <= 0:
        return 0
    lo = latest - max(config.keep_globals, MIN_KEEP) + 1
    if config.aggregation == "async" and not latest_final:
        lo = min(lo, latest - config.max_staleness)
    return max(0, lo)


def payload_refs(manifest: GlobalManifest) -> list[BlobRef]:
    """Every payload a global names: its one blob and, in AsymFedAvg, each site's."""
    return ([manifest.blob] if manifest.blob is not None else []) + list(manifest.site_blobs.values())


@dataclass(frozen=True)
class AggregatorPruning:
    """What the aggregator may remove after publishing a global.

    ``bucket_keys``: its own payloads (under ``aggregator/``) that no kept global names.
    ``cache_sha256``: payloads its local cache may drop (those keys, and updates folded before
    the newest global), never one a kept global or the newest global's inputs name.
    ``globals_below`` / ``updates_below``: the versions now done, for the next call's ``done``.
    """

    bucket_keys: tuple[str, ...] = ()
    cache_sha256: tuple[str, ...] = ()
    globals_below: int = 0
    updates_below: int = 0


def plan_aggregator_pruning(config: FederationConfig, manifests: Mapping[int, GlobalManifest], latest: int,
                            done: tuple[int, int] = (0, 0)) -> AggregatorPruning:
    """The aggregator's pruning once ``latest`` is published.

    ``manifests`` must hold every version from ``min(done)`` to ``latest``; ``done`` is what an
    earlier call returned (globals below ``done[0]`` and updates folded below ``done[1]`` were
    handled), so each call looks only at what newly fell out of the window."""
    newest = manifests[latest]
    lo = oldest_kept(config, latest, newest.is_final(config.rounds))
    if config.keep_globals <= 0:
        return AggregatorPruning(globals_below=done[0], updates_below=done[1])
    missing = [v for v in range(min(*done, lo), latest + 1) if v not in manifests]
    if missing:
        raise ValueError(f"retention needs the manifests of v{missing[0]}..v{latest}")
    kept_refs = [ref for v in range(lo, latest + 1) for ref in payload_refs(manifests[v])]
    keep_keys = {ref.key for ref in kept_refs}
    keep_sha = {ref.sha256 for ref in kept_refs} | {c.sha256 for c in newest.contributions}
    gone = {ref.key: ref.sha256 for v in range(done[0], lo) for ref in payload_refs(manifests[v])
            if ref.key.startswith(AGG_PREFIX) and ref.key not in keep_keys}
    folded = {c.sha256 for v in range(done[1], latest) for c in manifests[v].contributions}
    cache = (set(gone.values()) | folded) - keep_sha
    return AggregatorPruning(tuple(sorted(gone)), tuple(sorted(cache)), max(done[0], lo), max(done[1], latest))


def site_rounds_decided(config: FederationConfig, site: str, newest: GlobalManifest) -> int:
    """Rounds of ``site`` below the returned number were decided before ``newest``: folded into an
    older global or rejected. Their payloads may go (0 when retention is off).

    ``newest.next_rounds[site]`` is how far the aggregator had read when it published ``newest``;
    every update it read was then folded or rejected, and an update folded into ``newest`` itself
    is one of its inputs, so it stays."""
    if config.keep_globals <= 0:
        return 0
    cursor = newest.next_rounds.get(site, 0)
    return min([cursor] + [c.round for c in newest.contributions if c.site == site])
