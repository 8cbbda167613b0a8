"""A federation's whole history as plain data, from verified bucket files only (what ``fedfs report`` shows).

:func:`collect_history` reads every global and update manifest, the fingerprint and
plans documents and the status documents, verifying each file like any reader;
files that do not verify are listed under ``problems``. Unlike ``fedfs status``
its cost grows with the history: a report is made once, not polled.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from functools import partial
from typing import TYPE_CHECKING, Any

from ..errors import FedfsError
from ..protocol import layout
from ..protocol.timestamps import parse_stamp_or_none
from .reader import VerifiedReader
from .status import age_s, aggregator_liveness, federation_summary, is_silent, pick_metrics

if TYPE_CHECKING:
    from ..federation import Federation

__all__ = ["collect_history", "fingerprint_summary"]

_MAX_INIT_BLOB = 1024**3  # a site's initial weights, read for the layer-sharing table
#: The first spacing nnU-Net gives a 2D image (read as 1 x H x W); not a physical spacing.
_DUMMY_2D_SPACING = 999.0


def collect_history(fed: Federation, *, layers: bool = True) -> dict[str, Any]:
    """Everything the report shows, as plain data (JSON-ready)."""
    from ..protocol.schema import (Census, GlobalFingerprint, GlobalManifest, Heartbeat, PlansDocument, SiteCensus,
                                   UpdateManifest)

    c = fed.config
    r = VerifiedReader(fed)
    now = time.time()
    globals_: list[dict[str, Any]] = []
    for v, g in r.documents(layout.GLOBALS_PREFIX, layout.parse_version_key, GlobalManifest):
        globals_.append({"version": v, "signed_at": g.signed_at, "t": parse_stamp_or_none(g.signed_at),
                         "final": g.doc.is_final(c.rounds), "report": g.doc.report,
                         "next_rounds": g.doc.next_rounds,
                         "contributions": [{"site": x.site, "round": x.round, "key": x.key,
                                            "base_version": x.base_version, "staleness": x.staleness,
                                            "weight": x.weight} for x in g.doc.contributions]})
    globals_.sort(key=lambda g: g["version"])
    folded = {x["key"]: (g["version"], x) for g in globals_ for x in g["contributions"]}

    rejected = r.rejections(layout.AGG_STATUS)

    updates: list[dict[str, Any]] = []
    sites: dict[str, dict[str, Any]] = {}
    for site in c.site_names:
        for _, u in r.documents(layout.site_updates_prefix(site), layout.parse_update_key, UpdateManifest):
            into = folded.get(u.key)
            reason = next((x["reason"] for x in rejected if x["key"] == u.key), None)
            updates.append({"site": site, "round": u.doc.round, "key": u.key, "base_version": u.doc.base_version,
                            "num_cases": u.doc.num_cases, "signed_at": u.signed_at, "metrics": u.doc.metrics,
                            "named": pick_metrics(u.doc.metrics),
                            "version": into[0] if into else None,
                            "staleness": into[1]["staleness"] if into else None,
                            "weight": into[1]["weight"] if into else None,
                            "state": "aggregated" if into else ("rejected" if reason else "pending"),
                            "reason": reason})
        hb = r.read(layout.site_heartbeat(site), Heartbeat)
        census = _newest(r, partial(layout.site_census, site), SiteCensus)
        plans = r.read(layout.site_plans(site), PlansDocument)
        rejected += r.rejections(layout.site_status(site), site)
        sites[site] = {
            "phase": hb.doc.phase if hb else None, "message": hb.doc.message if hb else "",
            "heartbeat_at": hb.signed_at if hb else None,
            "heartbeat_age_s": age_s(hb.signed_at if hb else None, now),
            "silent": is_silent(hb.doc.phase if hb else None, age_s(hb.signed_at if hb else None, now), False),
            "metrics": dict(hb.doc.metrics) if hb else {},
            "cases": census.doc.num_cases if census and not census.doc.masked else None,  # secure FFE: masked
            "plans": None if plans is None else {
                "identifier": plans.doc.plans_identifier, "configuration": plans.doc.configuration,
                "digest": plans.doc.digest, "summary": plans.doc.summary,
                "nnunet_version": plans.doc.nnunet_version,
                "init_blob": plans.doc.init_blob.to_dict() if plans.doc.init_blob else None},
        }
    for u in updates:  # without a census (AsymFedAvg) the update manifests say how many cases
        if sites[u["site"]]["cases"] is None:
            sites[u["site"]]["cases"] = u["num_cases"]

    census = _newest(r, layout.census_key, Census)
    gfp = _newest(r, layout.global_fingerprint_key, GlobalFingerprint)
    out = {
        "url": fed.store.url, "federation_id": c.federation_id, "federation_digest": fed.digest,
        "generated_at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "config": {**federation_summary(c), "weighting": c.weighting, "align": c.align, "buffer_size": c.k,
                   "buffer_trigger": c.buffer_trigger, "max_staleness": c.max_staleness, "created": c.created},
        "globals": globals_, "updates": updates, "sites": sites, "rejected": rejected,
        "aggregator": aggregator_liveness(
            r, c.aggregator.name, final=bool(globals_) and globals_[-1]["final"],
            global_age_s=age_s(globals_[-1]["signed_at"], now) if globals_ else None,
            waiting=[f"{u['site']}'s update r{u['round']}" for u in updates if u["state"] == "pending"], now=now),
        "census": None if census is None else {"total_cases": census.doc.total_cases,
                                               "num_channels": census.doc.num_channels, "sites": census.doc.sites},
        "fingerprint": None if gfp is None else fingerprint_summary(gfp.doc.fingerprint, gfp.doc.total_cases,
                                                                    gfp.doc.sites),
        "layers": None,
        "problems": r.problems,
    }
    if layers and c.mode == "asym":
        out["layers"] = _layer_table(fed, sites, r)
    return out


def _newest(r: VerifiedReader, key_of: Callable[[int], str], cls: type) -> Any:
    """The newest revision of a superseding set-up document (a census redone before v0), or None."""
    newest = layout.newest_revision(key_of, None, r.exists)
    return None if newest is None else r.read(key_of(newest), cls)


def fingerprint_summary(fp: dict[str, Any], total_cases: int, sites: list[str]) -> dict[str, Any]:
    """Intensity properties per channel, median and range of spacings and shapes of a merged fingerprint."""
    import numpy as np

    def stats(key: str) -> dict[str, list[float]] | None:
        rows = fp.get(key)
        try:
            a = np.asarray(rows, dtype=float)
        except (TypeError, ValueError):
            return None
        if a.ndim != 2 or not len(a):
            return None
        return {"median": np.median(a, axis=0).tolist(), "min": a.min(axis=0).tolist(), "max": a.max(axis=0).tolist()}

    spacing, shape = stats("spacings"), stats("shapes_after_crop")
    dims = len(spacing["median"]) if spacing else None
    if spacing and dims == 3 and spacing["min"][0] == spacing["max"][0] == _DUMMY_2D_SPACING:
        # nnU-Net stores 2D images as 1 x H x W with a dummy 999 first spacing: show the in-plane axes
        spacing = {k: v[1:] for k, v in spacing.items()}
        shape = {k: v[1:] for k, v in shape.items()} if shape and len(shape["median"]) == 3 else shape
        dims = 2
    channels = {}
    for ch, props in sorted((fp.get("foreground_intensity_properties_per_channel") or {}).items()):
        if isinstance(props, dict):
            channels[str(ch)] = {k: v for k, v in props.items() if isinstance(v, (int, float))}
    return {"total_cases": total_cases, "sites": sites, "cases_in_fingerprint": len(fp.get("spacings") or []),
            "spacing": spacing, "shape": shape, "dims": dims, "intensity": channels,
            "median_relative_size_after_cropping": fp.get("median_relative_size_after_cropping")}


def _layer_table(fed: Federation, sites: dict[str, Any], r: VerifiedReader) -> dict[str, Any] | None:
    """Which layers (modules) of each site's network AsymFedAvg averages with another site's."""
    from ..fl.align import align_sites
    from ..protocol.schema import BlobRef
    from ..weights.header import inspect_weights

    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    with tempfile.TemporaryDirectory(prefix="fedfs-report-") as tmp:
        for site, info in sites.items():
            ref = (info.get("plans") or {}).get("init_blob")
            if not ref or ref["size"] > _MAX_INIT_BLOB:
                continue
            try:
                path = fed.bucket.get_blob_file(BlobRef(**{k: ref[k] for k in ("key", "sha256", "size")}),
                                                os.path.join(tmp, f"{site}.safetensors"))
                shapes[site] = inspect_weights(path).shapes()  # the header only: no torch, no tensor data
            except (FedfsError, OSError, ValueError, KeyError, TypeError) as exc:
                r.problem(ref.get("key", "?"), f"initial weights of {site}: {exc}")
    if len(shapes) < 2:
        return None
    align = "level" if fed.config.align == "resolution" else "name"
    try:
        table = align_sites(shapes, align)
    except FedfsError as exc:
        r.problem("layers", str(exc))
        return None
    flags: dict[str, dict[str, list[bool]]] = {}  # module -> site -> shared? per tensor
    for members in table.values():
        for site, key in members.items():
            module = key.rsplit(".", 1)[0] if "." in key else key
            flags.setdefault(module, {}).setdefault(site, []).append(len(members) > 1)
    rows = {m: {s: "shared" if all(f) else "own" if not any(f) else "partly" for s, f in per.items()}
            for m, per in flags.items()}
    return {"sites": sorted(shapes), "align": align, "modules": dict(sorted(rows.items(), key=lambda kv: _natural(kv[0])))}


def _natural(s: str) -> list[Any]:
    """Sort key that orders ``stage10`` after ``stage9``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s)]
