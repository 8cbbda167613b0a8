"""Secure FFE over the bucket: the census and fingerprint-summary merges as secure-aggregation
sessions (``ffe-census``, ``ffe-summary``; ``-N`` for set-up revision N), one step at a time,
for the set-up phase of the site and aggregator roles to call.

A site's geometry (per-case spacings, shapes, relative sizes, sample dtype) still travels in
the clear: the site publishes :func:`~.secagg_ffe.summary_input`'s first part where it publishes
its summary today, and the aggregator passes the sites' geometries to
:func:`aggregator_summary_step`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from ..trust.bucket import Bucket
from ..trust.signing import Identity
from . import secagg_ffe
from .secagg_rounds import SecureAggregator, SecureSite, session_params

__all__ = ["census_session", "summary_session", "site_census_step", "aggregator_census_step",
           "site_summary_step", "aggregator_summary_step", "forget"]


def census_session(revision: int = 0) -> str:
    return "ffe-census" if revision == 0 else f"ffe-census-{revision}"


def summary_session(revision: int = 0) -> str:
    return "ffe-summary" if revision == 0 else f"ffe-summary-{revision}"


def _site(bucket: Bucket, identity: Identity, workdir: str | os.PathLike[str], session: str) -> SecureSite:
    assert bucket.config is not None
    return SecureSite(bucket, identity, workdir, session_params(bucket.config, session))


def _aggregator(bucket: Bucket, identity: Identity, session: str) -> SecureAggregator:
    assert bucket.config is not None
    return SecureAggregator(bucket, identity, session_params(bucket.config, session))


def _step(agg: SecureAggregator, close: bool, on_rejected: Callable[[str, str], None] | None) -> str:
    """Every roster due now, then the sum when it is due (as a training round's step does)."""
    what = agg.step(close=close)
    while what.startswith("roster") and not close:
        after = agg.step()
        if after == "waiting":
            break
        what = after
    if on_rejected is not None:
        for key, reason in sorted(agg.rejected.items()):
            on_rejected(key, reason)
    return what


def site_census_step(bucket: Bucket, identity: Identity, workdir: str | os.PathLike[str], num_cases: int,
                     num_channels: int, revision: int = 0) -> str:
    """One step of a site's masked census (its case count and channel count are summed)."""
    return _site(bucket, identity, workdir, census_session(revision)).step(
        secagg_ffe.census_input(num_cases, num_channels))


def aggregator_census_step(bucket: Bucket, identity: Identity, *, close: bool = False, revision: int = 0,
                           on_rejected: Callable[[str, str], None] | None = None
                           ) -> tuple[str, dict[str, Any] | None]:
    """One step of the aggregator's census session (every roster due now); on ``done``, the pooled
    census (``total_cases``, ``num_channels``, ``survivors``), else None. ``on_rejected(key, reason)``:
    each stage document or masked input the step refused."""
    agg = _aggregator(bucket, identity, census_session(revision))
    what = _step(agg, close, on_rejected)
    if what != "done":
        return what, None
    assert agg.result is not None
    return what, {**secagg_ffe.pooled_census(agg.result, agg.survivors), "survivors": list(agg.survivors)}


def site_summary_step(bucket: Bucket, identity: Identity, workdir: str | os.PathLike[str],
                      summary: Mapping[str, Any] | Callable[[], Mapping[str, Any]],
                      grid: secagg_ffe.IntegerGrid = secagg_ffe.IntegerGrid(), revision: int = 0) -> str:
    """One step of a site's masked fingerprint summary (its per-channel histograms are summed).
    ``summary`` may be a callable: it is called only when the masked stage is due."""
    def arrays() -> Mapping[str, Any]:
        return secagg_ffe.summary_input(summary() if callable(summary) else summary, grid,
                                        f"site {identity.name}'s fingerprint summary")[1]

    return _site(bucket, identity, workdir, summary_session(revision)).step(arrays)


def forget(identity: Identity, workdir: str | os.PathLike[str], revision: int = 0) -> None:
    """Delete a site's secrets of both set-up sessions (once the merged fingerprint is out)."""
    import shutil

    for session in (census_session(revision), summary_session(revision)):
        shutil.rmtree(os.path.join(os.fspath(workdir), "secagg", session), ignore_errors=True)


def aggregator_summary_step(bucket: Bucket, identity: Identity, geometries: Mapping[str, Mapping[str, Any]],
                            census: Mapping[str, Any], grid: secagg_ffe.IntegerGrid = secagg_ffe.IntegerGrid(), *,
                            close: bool = False, revision: int = 0,
                            on_rejected: Callable[[str, str], None] | None = None
                            ) -> tuple[str, dict[str, Any] | None]:
    """One step of the aggregator's summary session (every roster due now); on ``done``, the pooled
    ``dataset_fingerprint.json`` (from the survivors' geometry), else None."""
    agg = _aggregator(bucket, identity, summary_session(revision))
    what = _step(agg, close, on_rejected)
    if what != "done":
        return what, None
    assert agg.result is not None
    return what, secagg_ffe.merge_secure_fingerprint({s: geometries[s] for s in agg.survivors}, agg.result, grid,
                                                     census)
