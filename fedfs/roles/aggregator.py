"""The aggregator role: read bucket state, decide (pure, :mod:`fedfs.protocol.rounds`), act.

One :meth:`Aggregator.step` does whatever is due now and returns what it did:
merge the FFE census and fingerprint, check that FFE sites hold identical
plans, publish the initial model ``v0``, and fold pending site updates into the
next global. Every action is idempotent: the output of an aggregation is a pure
function of its verified inputs, so a step killed at any point and run again
publishes the same bytes, or finds the work done.

Polling cost is constant in the number of rounds: the ``latest`` hint, one
probe for the next version, and per site one probe for its next update.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import faults
from ..protocol import layout
from ..errors import Conflict, FedfsError, NotFound, ValidationError
from ..federation import Federation
from ..protocol.rounds import Pending, SetupState, decide_aggregation, setup_due
from ..protocol.schema import (
    BlobRef,
    Census,
    Contribution,
    FingerprintSummary,
    GlobalFingerprint,
    GlobalManifest,
    LatestHint,
    PlansDocument,
    Rejection,
    SiteCensus,
    StatusDocument,
    UpdateManifest,
)
from ..protocol.timestamps import parse_stamp, utcnow

log = logging.getLogger("fedfs.roles.aggregator")

#: Largest weights payload the aggregator downloads (bytes).
MAX_WEIGHTS_BYTES = 4 * 1024**3
_STALENESS_NAMES = {"inverse_sqrt": "sqrt", "constant": "constant", "polynomial": "polynomial", "hinge": "hinge"}


@dataclass
class StepResult:
    action: str
    detail: str = ""
    version: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.action}: {self.detail}" if self.detail else self.action


def relative_change(path: str, base_path: str) -> float:
    """||x - base|| / ||base|| over the float tensors both files hold, one tensor at a time."""
    from safetensors import safe_open

    from ..weights.tensors import torch_single_thread

    num = den = 0.0
    with safe_open(path, framework="pt") as fx, safe_open(base_path, framework="pt") as fb, torch_single_thread():
        base_keys = set(fb.keys())
        for k in fx.keys():
            if k not in base_keys:
                continue
            x, b = fx.get_tensor(k), fb.get_tensor(k)
            if not x.is_floating_point() or x.shape != b.shape:
                continue
            x, b = x.double(), b.double()
            num += float(((x - b) ** 2).sum())
            den += float((b**2).sum())
    return (num ** 0.5) / max(den ** 0.5, 1e-12)


class Aggregator:
    """The aggregator of one federation; ``workdir`` holds a cache of verified payloads."""

    def __init__(self, fed: Federation, workdir: str | os.PathLike[str], *, clock=time.time) -> None:
        self.fed = fed
        self.identity = fed.require_identity("aggregator")
        self.config = fed.config
        self.bucket = fed.bucket
        self.work = Path(workdir)
        self.cache = self.work / "cache"
        self.cache.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self._manifests: dict[int, Any] = {}
        self._shapes: dict[str, dict[str, tuple[int, ...]]] = {}
        self._plans: dict[str, PlansDocument] = {}
        self._rejected: dict[str, str] = self._load_rejections()
        self._rejected_bases: dict[str, tuple[str, int]] = {}
        self._verified: dict[str, tuple[str, str]] = {}  # update key -> (manifest sha256, verified local file)
        self._cases: dict[str, int | None] = {}
        self._fetch_locks: dict[str, threading.Lock] = {}
        self._fetch_locks_guard = threading.Lock()

    # ---- reading state ----------------------------------------------------------
    def latest_version(self) -> int | None:
        """Newest published global (constant cost when the hint is current)."""
        return self.bucket.latest_version()

    def manifest(self, version: int):
        if version not in self._manifests:
            self._manifests[version] = self.bucket.read(layout.global_version(version), GlobalManifest)
        return self._manifests[version]

    # ---- the step ---------------------------------------------------------------
    def step(self) -> StepResult:
        """Do whatever is due now; never blocks waiting for sites."""
        latest = self.latest_version()
        if latest is None:
            return self._setup_step()
        return self._round_step(latest)

    def run(self, **kw: Any) -> StepResult:
        """Step until the final global is out, waking on new files (see :func:`fedfs.store.watch.run_role`)."""
        from ..store.watch import run_role

        return run_role(self.step, self.fed.store, **kw)

    # ---- set-up: census, fingerprint, plans check, v0 ------------------------------
    def _setup_step(self) -> StepResult:
        c = self.config
        st = SetupState()
        store = self.fed.store
        if c.mode == "ffe":
            st.census_published = store.exists(layout.CENSUS)
            if not st.census_published:
                censuses = self._read_all(layout.site_census, SiteCensus)
                st.census_sites = set(censuses)
            else:
                st.fingerprint_published = store.exists(layout.GLOBAL_FINGERPRINT)
                if not st.fingerprint_published:
                    summaries = self._read_all(layout.site_fingerprint, FingerprintSummary)
                    st.summary_sites = set(summaries)
        if c.mode != "ffe" or st.fingerprint_published:
            plans = self._read_all(layout.site_plans, PlansDocument)
            st.plans_sites = set(plans)
        due = setup_due(c, st)
        if due == "census":
            from ..fl.fingerprint import merge_census

            merged = merge_census({s: {"num_cases": d.num_cases, "num_channels": d.num_channels}
                                   for s, d in censuses.items()})
            doc = Census(total_cases=merged["total_cases"], num_channels=merged["num_channels"], sites=merged["sites"])
            self.bucket.publish(layout.CENSUS, doc, self.identity)
            return StepResult("census", f"{doc.total_cases} cases over {len(doc.sites)} sites")
        if due == "fingerprint":
            from ..fl.fingerprint import merge_summaries

            census = self.bucket.read(layout.CENSUS, Census).doc
            try:
                fp = merge_summaries({s: d.summary for s, d in summaries.items()},
                                     {"total_cases": census.total_cases, "num_channels": census.num_channels,
                                      "sites": census.sites})
            except ValidationError as exc:
                self._note_problem("fingerprint", str(exc))
                return StepResult("blocked", f"cannot merge fingerprints: {exc}")
            doc = GlobalFingerprint(fingerprint=fp, sites=sorted(summaries), total_cases=census.total_cases)
            self.bucket.publish(layout.GLOBAL_FINGERPRINT, doc, self.identity)
            return StepResult("fingerprint", f"merged fingerprint of {len(summaries)} sites published")
        if due == "v0":
            return self._publish_v0(plans)
        return StepResult("wait", due.replace("wait-", "waiting for site ") if due.startswith("wait") else due)

    def _read_all(self, key_fn, cls) -> dict[str, Any]:
        out = {}
        for site in self.config.site_names:
            key = key_fn(site)
            if key in self._rejected:
                continue
            try:
                out[site] = self.bucket.read(key, cls).doc
            except NotFound:
                continue
            except ValidationError as exc:
                self._reject(key, str(exc))
        return out

    def _publish_v0(self, plans: dict[str, PlansDocument]) -> StepResult:
        c = self.config
        sites = c.site_names
        if c.mode != "asym":
            digests = {s: plans[s].digest for s in sites}
            if len(set(digests.values())) > 1:
                from ..fl.plans import diff_plans

                ref = sites[0]
                problems = []
                for s in sites[1:]:
                    if digests[s] != digests[ref]:
                        fields = diff_plans(plans[ref].summary.get("plans", plans[ref].summary),
                                            plans[s].summary.get("plans", plans[s].summary))
                        problems.append(f"{s} differs from {ref} in {', '.join(fields[:8]) or 'unknown fields'}")
                msg = f"{c.mode.upper()} sites hold different plans (nnU-Net version, planner or options differ): " + "; ".join(problems)
                self._note_problem("plans", msg)
                return StepResult("blocked", msg)
        for s in sites:
            if plans[s].init_blob is None:
                self._reject(layout.site_plans(s), "plans document names no initial weights")
                return StepResult("blocked", f"site {s} published no initial weights")
            try:
                self._site_shapes(s, plans[s])
            except ValidationError as exc:
                self._reject(layout.site_plans(s), str(exc))
                return StepResult("blocked", f"initial weights of site {s} rejected: {exc}")
        if c.mode != "asym":
            first = sites[0]
            ref_shapes = self._shapes[first]
            for s in sites[1:]:
                if self._shapes[s] != ref_shapes:
                    msg = f"site {s}'s network differs from {first}'s although their plans are identical"
                    self._note_problem("plans", msg)
                    return StepResult("blocked", msg)
            doc = GlobalManifest(version=0, blob=plans[first].init_blob, next_rounds={s: 0 for s in sites},
                                 report={"init": f"initial weights of site {first}"})
        else:
            doc = GlobalManifest(version=0, site_blobs={s: plans[s].init_blob for s in sites},
                                 next_rounds={s: 0 for s in sites}, report={"init": "each site's own initial weights"})
        self._commit(doc)
        return StepResult("v0", "initial global published; training can start", version=0)

    def _site_shapes(self, site: str, plans: PlansDocument | None = None) -> dict[str, tuple[int, ...]]:
        """The site's declared architecture: keys and shapes of its verified initial weights."""
        if site not in self._shapes:
            from ..weights.tensors import validate_update

            plans = plans or self._plans_of(site)
            path = self._fetch(plans.init_blob)
            self._shapes[site] = dict(validate_update(path).shapes())
        return self._shapes[site]

    def _plans_of(self, site: str) -> PlansDocument:
        if site not in self._plans:
            self._plans[site] = self.bucket.read(layout.site_plans(site), PlansDocument).doc
        return self._plans[site]

    # ---- rounds ---------------------------------------------------------------------
    def _round_step(self, version: int) -> StepResult:
        c = self.config
        current = self.manifest(version)
        if version >= c.rounds or current.doc.final:
            return StepResult("finished", f"v{version} is the final global", version=version)
        pending, cursor, local = self._scan_updates(current.doc.next_rounds)
        age = max(0.0, self.clock() - parse_stamp(current.signed_at, current.key))
        rejected_sites = {site for site, base in self._rejected_bases.values() if base == version}
        decision = decide_aggregation(c, version, pending, cursor, age, rejected_sites)
        if any(p.base_version > version for p, _ in decision.rejected) \
                and self.fed.store.exists(layout.global_version(version + 1)):
            # an update from a newer global than ours: our view is behind (another aggregator
            # published v(version+1) meanwhile), not the site wrong. Rejecting would be for good.
            return StepResult("wait", f"v{version + 1} was published meanwhile: catching up", version=version)
        for p, reason in decision.rejected:
            self._reject(p.key, reason)
        if not decision.aggregate:
            self._flush_status()
            return StepResult("wait", decision.reason, version=version)
        new = self._aggregate(version, list(decision.chosen), local, cursor, decision)
        return StepResult("aggregated", f"v{new.version} from {len(new.contributions)} update(s): {decision.reason}",
                          version=new.version, extra={"sites": [x.site for x in new.contributions]})

    def _scan_updates(self, next_rounds: dict[str, int]) -> tuple[list[Pending], dict[str, int], dict[str, tuple]]:
        """Verify every update from each site's cursor on; stop at the first missing one.

        Manifests are read site by site; the payloads new since the last poll are then
        downloaded and checked concurrently (hashing, copying and the NaN scan release the
        GIL), so several updates landing together cost about one update's time."""
        found: list[tuple[str, int, str, Any]] = []  # (site, round, key, signed manifest)
        cursor: dict[str, int] = {}
        for site in self.config.site_names:
            r = next_rounds.get(site, 0)
            while True:
                key = layout.site_update(site, r)
                if key in self._rejected:
                    if key not in self._rejected_bases:  # rejected before a restart: which version it answered
                        self._rejected_bases[key] = (site, self._base_of(key))
                    r += 1
                    continue
                try:
                    signed = self.bucket.read(key, UpdateManifest)
                except NotFound:
                    break
                except ValidationError as exc:
                    self._reject(key, str(exc))
                    r += 1
                    continue
                found.append((site, r, key, signed))
                r += 1
            cursor[site] = r
        fresh = [(site, key, signed) for site, _r, key, signed in found
                 if self._verified.get(key, ("",))[0] != signed.raw_sha256]
        outcome = self._verify_all(fresh)
        pending: list[Pending] = []
        local: dict[str, tuple] = {}
        for site, r, key, signed in found:
            if key in outcome:
                result = outcome[key]
                if isinstance(result, ValidationError):
                    self._reject(key, str(result))
                    self._rejected_bases[key] = (site, signed.doc.base_version)
                    continue
                self._verified[key] = (signed.raw_sha256, result)
            pending.append(Pending(site, r, signed.doc.base_version, key))
            local[key] = (signed.doc, self._verified[key][1])
        return pending, cursor, local

    def _verify_all(self, todo: list[tuple[str, str, Any]]) -> dict[str, str | ValidationError]:
        """Verify updates (concurrently when there are several): key -> local path, or the
        ValidationError that rejects it. Other errors (storage trouble) propagate."""
        for site in sorted({site for site, _k, _s in todo}):  # warm the per-site caches on this thread
            try:
                self._plans_of(site)
                self._declared_cases(site)
                self._site_shapes(site)
            except ValidationError:
                pass  # raised again, per update, by _verify_update below

        def one(item: tuple[str, str, Any]) -> str | ValidationError:
            site, _key, signed = item
            try:
                return self._verify_update(site, signed.doc)
            except ValidationError as exc:
                return exc

        if len(todo) < 2:
            return {key: one((site, key, signed)) for site, key, signed in todo}
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(len(todo), max(2, os.cpu_count() or 2), 4),
                                thread_name_prefix="fedfs-verify") as pool:
            results = list(pool.map(one, todo))
        return {key: res for (_site, key, _signed), res in zip(todo, results)}

    def _declared_cases(self, site: str) -> int | None:
        """The case count a site committed to before training (FFE census, or its plans document);
        an update's weight must match it, so a site cannot inflate its influence later."""
        if site not in self._cases:
            n = None
            if self.config.mode == "ffe":
                try:
                    n = self.bucket.read(layout.CENSUS, Census).doc.sites.get(site)
                except NotFound:
                    n = None
            else:
                v = self._plans_of(site).summary.get("num_cases")
                n = v if isinstance(v, int) and not isinstance(v, bool) else None
            self._cases[site] = n
        return self._cases[site]

    def _base_of(self, key: str) -> int:
        """The base version a rejected update names (-1 if its manifest itself was refused)."""
        try:
            return self.bucket.read(key, UpdateManifest).doc.base_version
        except (NotFound, ValidationError):
            return -1

    def _verify_update(self, site: str, upd: UpdateManifest) -> str:
        from ..weights.tensors import validate_update

        plans = self._plans_of(site)
        if upd.plans_digest and upd.plans_digest != plans.digest:
            raise ValidationError(f"update trained with plans {upd.plans_digest[:12]}, site published {plans.digest[:12]}")
        if upd.blob.size > MAX_WEIGHTS_BYTES:
            raise ValidationError(f"payload of {upd.blob.size} bytes exceeds the {MAX_WEIGHTS_BYTES}-byte limit")
        if not upd.blob.key.startswith(layout.site_prefix(site)):
            raise ValidationError(f"payload {upd.blob.key} lies outside site {site}'s folder")
        declared = self._declared_cases(site)
        if declared is not None and upd.num_cases != declared:
            raise ValidationError(f"update claims {upd.num_cases} training cases; site {site} declared {declared}")
        path = self._fetch(upd.blob)
        try:
            validate_update(path, expected=self._site_shapes(site))
        except ValidationError as exc:  # name the bucket file, not this machine's cache path
            raise type(exc)(str(exc).replace(path, self.fed.store.describe(upd.blob.key))) from None
        limit = self.config.update_norm_limit
        if limit > 0:
            try:
                base_ref = self.manifest(upd.base_version).doc.blob_for(site)
            except NotFound:
                raise ValidationError(f"update names base version v{upd.base_version}, which does not exist") from None
            ratio = relative_change(path, self._fetch(base_ref))
            if ratio > limit:
                raise ValidationError(f"implausible update: it moves the model by {ratio:.3g} x the norm of "
                                      f"v{upd.base_version} (limit {limit:g})")
        return path

    def _fetch(self, ref: BlobRef) -> str:
        """A verified local copy of a blob (cached by sha256; safe to call from several threads)."""
        # Embedded documents are not validated by from_dict: the sha256 must be hex before it names a local
        # file, or "../out/v000001/global.safetensors" would make a file already on disk pass as the payload;
        # and the key must be safe even when the cache already holds its sha256 (no download to refuse it).
        ref.validate(self.fed.store.describe(ref.key))
        path = self.cache / f"{ref.sha256}{Path(ref.key).suffix}"
        if not path.exists():
            with self._fetch_locks_guard:
                lock = self._fetch_locks.setdefault(str(path), threading.Lock())
            with lock:  # one download per blob, however many threads want it
                if not path.exists():
                    self.bucket.get_blob_file(ref, str(path))
        return str(path)

    def _aggregate(self, version: int, chosen: list[Pending], local: dict[str, tuple], cursor: dict[str, int], decision):
        from ..fl import aggregate as agg

        c = self.config
        current = self.manifest(version).doc
        out_dir = self.work / "out" / f"v{version + 1:06d}"
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        updates = []
        src: dict[str, str] = {}  # pending key -> the file aggregate() reads for it, one name per update
        for p in chosen:
            doc, path = local[p.key]
            if path in src.values():  # two updates with one payload (the cache is by sha256): contributions
                alias = out_dir / f"input-{p.site}-r{p.round:06d}{Path(path).suffix}"  # are told apart by path
                shutil.copyfile(path, alias)
                path = str(alias)
            src[p.key] = path
            base_ref = self.manifest(doc.base_version).doc.blob_for(p.site) if doc.base_version != version else None
            updates.append(agg.Update(site=p.site, path=path, num_cases=float(doc.num_cases),
                                      base_version=doc.base_version,
                                      base_path=self._fetch(base_ref) if base_ref is not None else None,
                                      expected=self._site_shapes(p.site)))
        staleness = agg.Staleness(_STALENESS_NAMES[c.staleness], c.staleness_a, c.staleness_b)
        all_fresh = all(u.base_version == version for u in updates)
        if c.aggregation == "sync" or (all_fresh and c.eta == 1.0):
            rule = agg.FedAvg(weighting=c.weighting)
        else:
            rule = agg.FedBuff(eta=c.eta, staleness=staleness, max_staleness=c.max_staleness, weighting=c.weighting)
        meta = {"federation": c.federation_id, "version": str(version + 1), "producer": "fedfs-aggregator"}
        final = decision.final or version + 1 >= c.rounds
        if not updates:  # nothing acceptable (or nothing more will come): the same weights, a new version
            doc = GlobalManifest(version=version + 1, blob=current.blob, site_blobs=current.site_blobs,
                                 next_rounds=cursor, report={"reason": decision.reason}, final=final)
            self._commit(doc)
            return doc
        glob = self._fetch(current.blob) if current.blob is not None else None
        if c.mode != "asym":
            res = agg.aggregate(updates, out_dir / "global.safetensors", rule=rule, global_path=glob, version=version,
                                metadata=meta)
            blob = self._put_own(res.path)
            site_blobs: dict[str, BlobRef] = {}
            sharing = {}
        else:
            align = "level" if c.align == "resolution" else "name"
            res = agg.aggregate(updates, out_dir / "union.safetensors", rule=rule, global_path=glob if not isinstance(rule, agg.FedAvg) else None,
                                version=version, align=align, metadata=meta)
            blob = self._put_own(res.path)
            own = {x.site: x.path for x in res.contributions}
            site_blobs = {}
            for site in c.site_names:
                fallback = own.get(site) or self._fetch(current.blob_for(site))
                out = out_dir / f"{site}.safetensors"
                agg.extract_site(res.path, self._site_shapes(site), out, align=align, fallback_path=fallback,
                                 metadata={**meta, "site": site})
                site_blobs[site] = self._put_own(str(out))
            sharing = {s: vars(v) for s, v in res.sharing.items()}
        for r in res.rejected:
            key = next((k for k, path in src.items() if path == r.path), r.path)
            self._reject(key, r.reason)
        by_path = {src[p.key]: p for p in chosen}
        contributions = []
        for x in res.contributions:
            p = by_path[x.path]
            d = local[p.key][0]
            contributions.append(Contribution(site=p.site, round=p.round, key=p.key, sha256=d.blob.sha256,
                                              base_version=d.base_version, staleness=x.staleness,
                                              weight=float(x.weight) * float(x.scale)))
        doc = GlobalManifest(
            version=version + 1,
            blob=blob,
            site_blobs=site_blobs,
            contributions=contributions,
            next_rounds=cursor,
            report={"rule": res.rule, "reason": decision.reason, "tensors": res.tensors, "params": res.params,
                    "sharing": sharing},
            final=final,
        )
        self._commit(doc)
        return doc

    def _put_own(self, path: str) -> BlobRef:
        """Upload an output and keep it in the cache, so the next round does not download it back."""
        ref = self.bucket.put_blob_file(layout.aggregator_blob, path)
        cached = self.cache / f"{ref.sha256}{Path(ref.key).suffix}"
        if not cached.exists():
            tmp = cached.with_name(cached.name + ".incomplete")
            tmp.unlink(missing_ok=True)
            try:
                os.link(path, tmp)  # the output is never modified: a hard link is a free copy
            except OSError:
                shutil.copyfile(path, tmp)
            os.replace(tmp, cached)
        return ref

    def _commit(self, doc: GlobalManifest) -> None:
        """Publish the manifest exclusively, then the hint and the status (both only hints)."""
        faults.point("aggregator.before_manifest")
        try:
            self.bucket.publish(layout.global_version(doc.version), doc, self.identity)
        except Conflict:
            key = layout.global_version(doc.version)
            try:  # a concurrent run of this aggregator is fine; anything else occupying the key is not
                self.bucket.read(key, GlobalManifest)
            except ValidationError as exc:
                raise ValidationError(f"{self.fed.store.describe(key)} is occupied by a file that does not verify "
                                      f"({exc}); remove it (see docs/security.md) and run the aggregator again") from None
            log.warning("v%d was already published by another aggregator run; keeping that one", doc.version)
        self._manifests.pop(doc.version, None)
        faults.point("aggregator.after_manifest")
        self.bucket.write_mutable(layout.LATEST, LatestHint(version=doc.version), self.identity)
        self._flush_status()

    # ---- quarantine -------------------------------------------------------------------
    def _load_rejections(self) -> dict[str, str]:
        self._rejected_at: dict[str, str] = {}
        try:
            st = self.bucket.read(layout.AGG_STATUS, StatusDocument).doc
        except (NotFound, FedfsError):
            return {}
        self._rejected_at = {r.key: r.at for r in st.rejected}
        return {r.key: r.reason for r in st.rejected}

    def _reject(self, key: str, reason: str) -> None:
        if self._rejected.get(key) != reason:
            log.warning("rejected %s: %s", key, reason)
            self._rejected[key] = reason
            self._rejected_at[key] = utcnow()
            self._status_dirty = True

    def _note_problem(self, what: str, message: str) -> None:
        self._reject(f"{layout.AGG_PREFIX}problems/{what}", message)
        self._flush_status()

    def _flush_status(self) -> None:
        if not getattr(self, "_status_dirty", False):
            return
        # newest last; a flood of rejections evicts the oldest records, not other sites' recent ones
        entries = sorted(self._rejected.items(), key=lambda kv: (self._rejected_at.get(kv[0], ""), kv[0]))
        doc = StatusDocument(party=self.identity.name,
                             rejected=[Rejection(key=k, reason=r, at=self._rejected_at.get(k, "")) for k, r in entries][-500:])
        self.bucket.write_mutable(layout.AGG_STATUS, doc, self.identity)
        self._status_dirty = False
