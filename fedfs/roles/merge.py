"""The aggregator's round: fold the chosen updates into the next global manifest.

:func:`next_global` picks the rule (FedAvg, or FedBuff for stale updates in async
rounds), runs the streaming aggregation over the verified local copies, uploads the
outputs (one global, or in asym mode the union and each site's extraction) and returns
the :class:`~fedfs.protocol.schema.GlobalManifest` to publish. Its output is a pure
function of the verified inputs, sorted by site, so a re-run after a crash produces the
same bytes. Publishing the manifest is the caller's (:meth:`Aggregator._commit`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ..protocol.rounds import AggregateDecision, Pending
from ..protocol.schema import BlobRef, Contribution, FederationConfig, GlobalManifest
from .inputs import VerifiedInputs
from .quarantine import Quarantine

__all__ = ["next_global", "choose_rule"]

#: The federation's staleness names -> the aggregation rule's.
_STALENESS_NAMES = {"inverse_sqrt": "sqrt", "constant": "constant", "polynomial": "polynomial", "hinge": "hinge"}


def choose_rule(config: FederationConfig, updates: list[Any], version: int) -> Any:
    """The federation's robust rule if it has one; else FedAvg for synchronous rounds (and async rounds
    of fresh updates at eta 1), FedBuff otherwise."""
    from ..fl.aggregate import FedAvg, FedBuff, Staleness

    c = config
    if c.rule != "fedavg":  # a robust rule (synchronous only, FederationConfig.validate): fedfs.fl.robust
        from ..fl.robust import rule_named

        return rule_named(c.rule, c.trim_fraction)
    all_fresh = all(u.base_version == version for u in updates)
    if c.aggregation == "sync" or (all_fresh and c.eta == 1.0):
        return FedAvg(weighting=c.weighting)
    staleness = Staleness(_STALENESS_NAMES[c.staleness], c.staleness_a, c.staleness_b)
    return FedBuff(eta=c.eta, staleness=staleness, max_staleness=c.max_staleness, weighting=c.weighting)


def _updates(chosen: list[Pending], local: dict[str, tuple], version: int, inputs: VerifiedInputs,
             out_dir: Path) -> tuple[list[Any], dict[str, str]]:
    """The engine's inputs, and per pending key the file it reads (one name per update)."""
    from ..fl.aggregate import Update

    updates = []
    src: dict[str, str] = {}
    for p in chosen:
        doc, path = local[p.key]
        if path in src.values():  # two updates with one payload (the cache is by sha256): contributions
            alias = out_dir / f"input-{p.site}-r{p.round:06d}{Path(path).suffix}"  # are told apart by path
            shutil.copyfile(path, alias)
            path = str(alias)
        src[p.key] = path
        base_ref = inputs.manifest(doc.base_version).doc.blob_for(p.site) if doc.base_version != version else None
        updates.append(Update(site=p.site, path=path, num_cases=float(doc.num_cases), base_version=doc.base_version,
                              base_path=inputs.fetch(base_ref) if base_ref is not None else None,
                              expected=inputs.site_shapes(p.site)))
    return updates, src


def next_global(config: FederationConfig, version: int, decision: AggregateDecision, local: dict[str, tuple],
                cursor: dict[str, int], inputs: VerifiedInputs, quarantine: Quarantine,
                out_dir: Path) -> GlobalManifest:
    """The manifest of ``version + 1`` from the updates ``decision`` chose (payloads uploaded, manifest not)."""
    from ..fl.aggregate import FedBuff
    from ..weights.combine import aggregate, extract_site

    c = config
    current = inputs.manifest(version).doc
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    chosen = list(decision.chosen)
    updates, src = _updates(chosen, local, version, inputs, out_dir)
    rule = choose_rule(c, updates, version)
    meta = {"federation": c.federation_id, "version": str(version + 1), "producer": "fedfs-aggregator"}
    final = decision.final or version + 1 >= c.rounds
    if not updates:  # nothing acceptable (or nothing more will come): the same weights, a new version
        return GlobalManifest(version=version + 1, blob=current.blob, site_blobs=current.site_blobs,
                              next_rounds=cursor, report={"reason": decision.reason, **_dp_carried(current)},
                              final=final)
    glob = inputs.fetch(current.blob) if current.blob is not None else None
    site_blobs: dict[str, BlobRef] = {}
    sharing: dict[str, Any] = {}
    dp = None
    if c.mode != "asym":
        res = aggregate(updates, out_dir / "global.safetensors", rule=rule, global_path=glob, version=version,
                        metadata=meta)
        dp = _dp_account(c, current, len(res.contributions))
        if dp is not None and dp.exceeds:  # over the DP budget: nothing new is released, and the federation ends
            return GlobalManifest(version=version + 1, blob=current.blob, site_blobs=current.site_blobs,
                                  next_rounds=cursor, report={"reason": _dp_refusal(c, dp, version),
                                                              **_dp_carried(current)}, final=True)
        blob = inputs.put_own(res.path)
    else:
        align = "level" if c.align == "resolution" else "name"
        res = aggregate(updates, out_dir / "union.safetensors", rule=rule,
                        global_path=glob if isinstance(rule, FedBuff) else None, version=version, align=align,
                        metadata=meta)
        blob = inputs.put_own(res.path)
        own = {x.site: x.path for x in res.contributions}
        for site in c.site_names:
            fallback = own.get(site) or inputs.fetch(current.blob_for(site))
            out = out_dir / f"{site}.safetensors"
            extract_site(res.path, inputs.site_shapes(site), out, align=align, fallback_path=fallback,
                         metadata={**meta, "site": site})
            site_blobs[site] = inputs.put_own(str(out))
        sharing = {s: vars(v) for s, v in res.sharing.items()}
    for r in res.rejected:
        key = next((k for k, path in src.items() if path == r.path), r.path)
        quarantine.reject(key, r.reason)
    by_path = {src[p.key]: p for p in chosen}
    contributions = []
    for x in res.contributions:
        p = by_path[x.path]
        d = local[p.key][0]
        contributions.append(Contribution(site=p.site, round=p.round, key=p.key, sha256=d.blob.sha256,
                                          base_version=d.base_version, staleness=x.staleness,
                                          weight=float(x.weight) * float(x.scale)))
    return GlobalManifest(
        version=version + 1,
        blob=blob,
        site_blobs=site_blobs,
        contributions=contributions,
        next_rounds=cursor,
        report={"rule": res.rule, "reason": decision.reason, "tensors": res.tensors, "params": res.params,
                "sharing": sharing, **({"dp": dp.record()} if dp is not None else {})},
        final=final or (dp is not None and not dp.next_fits),  # DP: the last global the budget allows is final
    )


def _dp_account(config: FederationConfig, current: GlobalManifest, contributions: int) -> Any:
    """DP-FedAvg's accountant charging this round (:func:`fedfs.privacy.dp.account_round`); None without DP."""
    if not config.dp_noise_multiplier:
        return None
    from ..privacy.dp import account_round

    return account_round(config, current.report.get("dp"), contributions)


def _dp_carried(current: GlobalManifest) -> dict[str, Any]:
    """A global that releases nothing new (the same weights) carries its predecessor's DP record."""
    return {"dp": current.report["dp"]} if isinstance(current.report.get("dp"), dict) else {}


def _dp_refusal(config: FederationConfig, dp: Any, version: int) -> str:
    return (f"differential privacy budget: one more round of {dp.contributions} update(s) would bring epsilon "
            f"above {config.dp_epsilon:g} (delta {config.dp_delta:g}); v{version}'s weights are final")
