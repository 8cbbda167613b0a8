"""A synchronous round under secure aggregation (``secure_aggregation: true``), for both roles.

The site trains as in any round, then, instead of publishing an update manifest, steps the
SecAgg+ session of the global it trained from (:mod:`fedfs.privacy.secagg_rounds`): its
ephemeral keys, its encrypted shares, its masked update, its unmasking shares, one stage per
poll. The aggregator steps the same session: it publishes each stage's roster, closes a stage
with whoever is there once ``deadline_s`` has passed (dropouts are recovered from the
survivors' shares), and learns only the survivors' weighted sum, from which it publishes the
next global. Contributions name each survivor's masked-update document; their weights stay
unknown to the aggregator (recorded as 1). See docs/secure-aggregation.md.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from ..errors import NotFound, ValidationError
from ..protocol import layout
from ..protocol.schema import Census, Contribution, FingerprintSummary, GlobalManifest, PlansDocument
from ..trust.bucket import Bucket
from .steps import Action, StepResult

__all__ = ["aggregator_secure_step", "case_weights", "site_secure_step"]

log = logging.getLogger("fedfs.roles.secure_round")


def case_weights(bucket: Bucket, site: str | None) -> tuple[int, int]:
    """(this site's weight, every site's total) in the fixed-point sum: training cases from the newest
    merged census (FFE) or the sites' plans (fedavg), or 1 each with uniform weighting. A securely
    summed census (secure FFE) holds only the total: a site's own count is then its geometry's
    (the case records it published). ``site`` None: the total only (the aggregator)."""
    c = bucket.config
    assert c is not None
    if c.weighting != "cases":
        return 1, len(c.site_names)
    if c.mode == "ffe":
        newest = layout.newest_revision(layout.census_key, None, bucket.store.exists)
        if newest is None:
            raise NotFound("no merged census yet", key=layout.CENSUS)
        census = bucket.read(layout.census_key(newest), Census).doc
        if site is None:
            return 1, int(census.total_cases)
        if census.masked:
            rev = layout.newest_revision(lambda n: layout.site_fingerprint(site, n), None, bucket.store.exists)
            summary = bucket.read(layout.site_fingerprint(site, rev or 0), FingerprintSummary).doc.summary
            return int(summary["num_cases"]), int(census.total_cases)
        return int(census.sites.get(site, 1)), int(census.total_cases)
    cases = {}
    for s in c.site_names:
        n = bucket.read(layout.site_plans(s), PlansDocument).doc.summary.get("num_cases", 1)
        cases[s] = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
    return cases.get(site, 1), sum(cases.values())


def site_secure_step(site: Any, pending: dict[str, Any], global_path: str) -> StepResult | None:
    """One step of ``site``'s secure round for its pending update; None once the round is done for it."""
    from ..privacy.secagg_rounds import site_round_step

    weight, total = case_weights(site.bucket, site.name)
    what = site_round_step(site.bucket, site.identity, site.dir / "secagg", pending["base"], global_path=global_path,
                           update_path=pending["path"], weight=weight, weight_total=total)
    if what in ("done", "excluded"):
        if what == "excluded":
            log.warning("secure round from v%d closed without this site (too late, or its masked update was "
                        "refused: see the aggregator's status): its update is dropped", pending["base"])
        return None
    return StepResult(Action.WAIT, f"secure aggregation of r{pending['round']} from v{pending['base']}: {what}")


def aggregator_secure_step(agg: Any, version: int, current: Any, age_s: float) -> StepResult:
    """The aggregator's step of the secure round trained from ``version``; publishes v+1 when it is done."""
    from safetensors.numpy import load_file, save_file

    from ..privacy.secagg_documents import SecAggMasked, site_stage_key
    from ..privacy.secagg_rounds import aggregator_round_step, round_session

    c = agg.config
    glob = agg.inputs.fetch(current.doc.blob)
    _w, total = case_weights(agg.bucket, None)
    close = c.deadline_s > 0 and age_s >= c.deadline_s
    session = round_session(version)
    cache = Path(agg.work) / "secagg" / session  # the masked updates verified at the masked roster
    what, mean, state = aggregator_round_step(agg.bucket, agg.identity, version, global_path=glob,
                                              weight_total=total, close=close, cache=cache)
    for key, reason in state.rejected.items():
        agg.quarantine.reject(key, reason, [key.split("/")[1]] if key.startswith(layout.SITES + "/") else ())
    if what != "done" or mean is None:
        agg.quarantine.flush()
        return StepResult(Action.WAIT, f"secure aggregation of v{version}: {what}", version=version)
    out_dir = Path(agg.work) / "out" / f"v{version + 1:06d}"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "global.safetensors"
    tensors = {**{k: v for k, v in load_file(glob).items() if k not in mean}, **mean}
    save_file(dict(sorted(tensors.items())), str(out), metadata={"version": str(version + 1)})
    blob = agg.inputs.put_own(str(out))
    contributions = []
    for s in sorted(state.survivors):
        key = site_stage_key(s, session, "masked")
        try:
            masked = agg.bucket.read(key, SecAggMasked).doc
        except (NotFound, ValidationError) as exc:  # it was read for the sum; gone since is an attack on the record
            raise ValidationError(f"{key}: masked update unreadable after unmasking ({exc})", key=key) from None
        contributions.append(Contribution(site=s, round=current.doc.next_rounds.get(s, 0), key=key,
                                          sha256=masked.blob.sha256, base_version=version, staleness=0, weight=1.0))
    doc = GlobalManifest(
        version=version + 1, blob=blob, contributions=contributions,
        next_rounds={s: current.doc.next_rounds.get(s, 0) + 1 for s in c.site_names},
        report={"rule": "secure FedAvg", "reason": f"secure aggregation: {len(state.survivors)} site(s) unmasked"
                + (f", {', '.join(state.dropped)} dropped and recovered" if state.dropped else "")
                + (f" ({', '.join(sorted(state.refused))}: masked update refused)" if state.refused else "")},
        final=version + 1 >= c.rounds)
    agg._commit(doc)
    shutil.rmtree(cache, ignore_errors=True)  # summed and published: the masked inputs are no longer needed
    return StepResult(Action.AGGREGATED, f"v{doc.version} from {len(contributions)} masked update(s)",
                      version=doc.version, extra={"sites": [x.site for x in contributions]})
