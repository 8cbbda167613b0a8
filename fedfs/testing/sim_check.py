"""The simulator's invariants, checked on a federation's bucket after a schedule.

:func:`check_federation` reads the bucket through a fault-free, verifying view and returns
every :class:`Violation` of:

- ``folded_once``: every update the aggregator read (below the final global's cursor) is
  folded into exactly one global, under the sha256 and base version its manifest names, or
  rejected; none is folded twice, or folded and rejected;
- ``rejection_recorded``: every update read but not folded has a rejection record with a
  reason in the aggregator's status, and no rejection seen during the run was forgotten;
- ``global_recomputed``: every global's payloads equal, byte for byte, what the library's own
  aggregation entry points (:mod:`fedfs.weights.combine`) make of the inputs its manifest lists;
- ``verified_only``: every global's payloads match its manifest, every folded update is a
  verified one, and every weights file a site loaded is the payload of a verified global for it;
- ``finished``: the final global is out and every site finished from it.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import FedfsError, NotFound, ValidationError
from ..protocol import layout
from ..protocol.schema import (BlobRef, FederationConfig, GlobalManifest, PlansDocument, StatusDocument,
                               UpdateManifest)
from ..store.base import Store
from ..trust.bucket import Bucket

__all__ = ["INVARIANTS", "Violation", "check_federation", "read_globals", "recompute_global", "status_rejections"]

INVARIANTS = ("folded_once", "rejection_recorded", "global_recomputed", "verified_only", "finished", "no_escape")


@dataclass(frozen=True)
class Violation:
    """One broken invariant: which, and what exactly."""

    invariant: str
    detail: str

    def __str__(self) -> str:
        return f"{self.invariant}: {self.detail}"


def _primary(key: str) -> str:
    """A slot candidate's primary key (``v000003.a1.json`` -> ``v000003.json``); other keys unchanged."""
    is_slot = getattr(layout, "is_slot", None)
    return layout.slot_primary(key) if is_slot is not None and is_slot(key) else key


def read_globals(bucket: Bucket) -> dict[int, GlobalManifest]:
    """Every published global manifest, v0 on: each slot's verified value (junk is skipped by the reader)."""
    out: dict[int, GlobalManifest] = {}
    v = 0
    while (signed := bucket.published(layout.global_version(v), GlobalManifest)) is not None:
        out[v] = signed.doc
        v += 1
    return out


def status_rejections(bucket: Bucket, key: str = layout.AGG_STATUS) -> dict[str, str]:
    """The rejections (primary key -> reason) in the status document at ``key`` (none when absent)."""
    try:
        doc = bucket.read(key, StatusDocument).doc
    except (NotFound, ValidationError):
        return {}
    return {_primary(r.key): r.reason for r in doc.rejected}


class _Files:
    """Verified local copies of the bucket's payloads, by sha256."""

    def __init__(self, bucket: Bucket, folder: Path) -> None:
        self.bucket, self.folder = bucket, folder
        folder.mkdir(parents=True, exist_ok=True)
        self._shapes: dict[str, dict] = {}

    def get(self, ref: BlobRef) -> str:
        path = self.folder / f"{ref.sha256}.safetensors"
        if not path.exists():
            self.bucket.get_blob_file(ref, str(path))
        return str(path)

    def shapes(self, site: str) -> dict:
        if site not in self._shapes:
            from ..weights.tensors import validate_update

            plans = self.bucket.read(layout.site_plans(site), PlansDocument).doc
            self._shapes[site] = dict(validate_update(self.get(plans.init_blob)).shapes())
        return self._shapes[site]


def _sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def recompute_global(config: FederationConfig, globals_: Mapping[int, GlobalManifest],
                     updates: Mapping[str, UpdateManifest], v: int, files: _Files, out: Path) -> dict[str, str]:
    """sha256 of each payload ``v`` should hold ("" for the one global or asym union, else per
    site), recomputed from the inputs its manifest lists with the library's own entry points."""
    from ..fl.aggregate import FedAvg, Update
    from ..roles.merge import choose_rule
    from ..weights.combine import aggregate, extract_site

    doc, prev = globals_[v], globals_[v - 1]
    if not doc.contributions:
        want = {"": prev.blob.sha256 if prev.blob else ""}
        want.update({s: b.sha256 for s, b in prev.site_blobs.items()})
        return want
    out.mkdir(parents=True, exist_ok=True)
    ups = []
    for c in doc.contributions:
        u = updates[_primary(c.key)]
        base = None if u.base_version == v - 1 else files.get(globals_[u.base_version].blob_for(c.site))
        ups.append(Update(site=c.site, path=files.get(u.blob), num_cases=float(u.num_cases),
                          base_version=u.base_version, base_path=base, expected=files.shapes(c.site)))
    rule = choose_rule(config, ups, v - 1)
    meta = {"federation": config.federation_id, "version": str(v), "producer": "fedfs-aggregator"}
    glob = files.get(prev.blob) if prev.blob is not None else None
    if config.mode != "asym":
        res = aggregate(ups, out / "global.safetensors", rule=rule, global_path=glob, version=v - 1, metadata=meta)
        return {"": _sha(res.path)}
    align = "level" if config.align == "resolution" else "name"
    res = aggregate(ups, out / "union.safetensors", rule=rule, global_path=glob if not isinstance(rule, FedAvg)
                    else None, version=v - 1, align=align, metadata=meta)
    want = {"": _sha(res.path)}
    own = {x.site: x.path for x in res.contributions}
    for site in config.site_names:
        fallback = own.get(site) or files.get(prev.blob_for(site))
        path = out / f"{site}.safetensors"
        extract_site(res.path, files.shapes(site), path, align=align, fallback_path=fallback,
                     metadata={**meta, "site": site})
        want[site] = _sha(str(path))
    return want


def _site_updates(bucket: Bucket, site: str) -> dict[str, UpdateManifest]:
    """A site's published updates (primary key -> verified manifest), r0 on, until the first missing one."""
    good = {}
    r = 0
    while (signed := bucket.published(layout.site_update(site, r), UpdateManifest)) is not None:
        good[layout.site_update(site, r)] = signed.doc
        r += 1
    return good


def check_federation(store: Store, config: FederationConfig, work: Path, *,
                     consumed: Mapping[str, Iterable[str]] = {}, finished: Mapping[str, int | None] = {},
                     seen_rejections: Iterable[str] = ()) -> list[Violation]:
    """Every violation of the invariants on the federation in ``store``: ``consumed`` holds the sha256
    of each file a site loaded, ``finished`` each site's final version (None: not finished),
    ``seen_rejections`` the rejected keys the aggregator's status showed during the run."""
    bucket = Bucket(store, config)
    found: list[Violation] = []
    globals_ = read_globals(bucket)
    rejected = status_rejections(bucket)
    updates: dict[str, UpdateManifest] = {}
    for site in config.site_names:
        updates.update(_site_updates(bucket, site))
    folded: Counter = Counter()
    for v, g in sorted(globals_.items()):
        for c in g.contributions:
            folded[_primary(c.key)] += 1
            u = updates.get(_primary(c.key))
            if u is None:
                found.append(Violation("verified_only", f"v{v} folds {c.key}, which is not a verified update"))
            elif c.sha256 != u.blob.sha256 or c.base_version != u.base_version:
                found.append(Violation("folded_once", f"v{v} folds {c.key} as sha256 {c.sha256[:12]} from "
                                       f"v{c.base_version}; its manifest says {u.blob.sha256[:12]} from v{u.base_version}"))
    final = max(globals_) if globals_ else None
    cursor = globals_[final].next_rounds if final is not None else {}
    for key in sorted(updates):
        site, r = layout.parse_update_key(key)  # type: ignore[misc]
        n = folded[key]
        if n > 1:
            found.append(Violation("folded_once", f"{key} is folded into {n} globals"))
        elif n == 1 and key in rejected:
            found.append(Violation("folded_once", f"{key} is folded and also rejected ({rejected[key]})"))
        elif n == 0 and r < cursor.get(site, 0) and not rejected.get(key):
            found.append(Violation("rejection_recorded", f"{key} was read (cursor r{cursor.get(site, 0)}) but neither "
                                   "folded nor rejected with a reason"))
    for key in sorted(set(seen_rejections) - set(rejected)):
        if not key.startswith(layout.AGG_PREFIX + "problems/") and folded[key] == 0:
            found.append(Violation("rejection_recorded", f"{key}'s rejection was recorded, then forgotten"))
    files = _Files(bucket, work / "files")
    for v, g in sorted(globals_.items()):
        for part, ref in [("global", g.blob)] + sorted(g.site_blobs.items()):
            try:
                if ref is not None:
                    files.get(ref)
            except ValidationError as exc:
                found.append(Violation("verified_only", f"v{v}'s {part} payload does not match its manifest: {exc}"))
            except NotFound:
                found.append(Violation("verified_only", f"v{v}'s {part} payload {ref.key} is missing"))
    for v in sorted(globals_):
        if v == 0 or v - 1 not in globals_:
            continue
        try:
            want = recompute_global(config, globals_, updates, v, files, work / f"v{v}")
        except (FedfsError, KeyError) as exc:
            found.append(Violation("global_recomputed", f"v{v} cannot be recomputed from its inputs: {exc}"))
            continue
        g = globals_[v]
        have = {"": g.blob.sha256 if g.blob else ""}
        have.update({s: b.sha256 for s, b in g.site_blobs.items()})
        for part, sha in sorted(want.items()):
            if have.get(part) != sha:
                found.append(Violation("global_recomputed", f"v{v}'s {part or 'global'} payload is "
                                       f"{str(have.get(part))[:12]}, recomputed {sha[:12]}"))
    verified = {s: {b.sha256 for g in globals_.values() for b in [g.blob_for(s)] if b is not None}
                for s in config.site_names}
    for site, shas in consumed.items():
        for sha in shas:
            if sha not in verified.get(site, set()):
                found.append(Violation("verified_only", f"site {site} loaded weights {sha[:12]}, the payload of no "
                                       "verified global"))
    if final is None or not globals_[final].is_final(config.rounds):
        found.append(Violation("finished", f"no final global (newest: {'none' if final is None else f'v{final}'})"))
    for site in config.site_names:
        if finished.get(site) is None:
            found.append(Violation("finished", f"site {site} did not finish"))
        elif final is not None and finished[site] != final:
            found.append(Violation("finished", f"site {site} finished with v{finished[site]}, the final is v{final}"))
    return found
