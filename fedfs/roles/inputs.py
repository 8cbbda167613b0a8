"""What the aggregator reads, verified once and cached: globals, plans, architectures, updates.

:class:`VerifiedInputs` holds the aggregator's view of the bucket: the global manifests
it has read, each site's plans, declared case count and architecture (the keys and
shapes of its verified initial weights), and a local cache of verified payloads named
by sha256. :meth:`VerifiedInputs.scan` reads every site's updates from its cursor on
and checks each new one (plans digest, size, location, case count, dtypes and shapes,
finite values, and optionally its norm against its base), concurrently when several
land together. A refused update goes to the :class:`~fedfs.roles.quarantine.Quarantine`.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import FedfsError, NotFound, ValidationError
from ..protocol import layout
from ..protocol.rounds import Pending
from ..protocol.schema import BlobRef, Census, GlobalManifest, PlansDocument, UpdateManifest
from ..trust.bucket import Signed
from .context import FederationContext
from .quarantine import Quarantine

__all__ = ["MAX_WEIGHTS_BYTES", "VerifiedInputs"]

#: Largest weights payload the aggregator downloads (bytes).
MAX_WEIGHTS_BYTES = 4 * 1024**3

#: (site, round, key, verified manifest) of one update found by a scan.
_Found = tuple[str, int, str, Signed[UpdateManifest]]

log = logging.getLogger("fedfs.roles.inputs")

#: How often the aggregator probes every site's next update regardless of the inbox (a marker lost to a
#: crash between a site's manifest and its marker, or to a policy that denies ``inbox/``, only delays).
FULL_SCAN_EVERY_S = 300.0


class VerifiedInputs:
    """The aggregator's verified reads of one federation, with payloads cached under ``cache``."""

    def __init__(self, fed: FederationContext, cache: Path, quarantine: Quarantine) -> None:
        self.fed = fed
        self.config = fed.config
        self.bucket = fed.bucket
        self.cache = cache
        self.cache.mkdir(parents=True, exist_ok=True)
        self.quarantine = quarantine
        self._manifests: dict[int, Signed[GlobalManifest]] = {}
        self._shapes: dict[str, dict[str, tuple[int, ...]]] = {}
        self._dtypes: dict[str, dict[str, str]] = {}  # site -> tensor -> declared dtype (its initial weights)
        self._plans: dict[str, PlansDocument] = {}
        self._cases: dict[str, int | None] = {}
        self._rejected_bases: dict[str, tuple[str, int]] = {}  # rejected update key -> (site, base version)
        self._verified: dict[str, tuple[str, str]] = {}  # update key -> (manifest sha256, verified local file)
        self._fetch_locks: dict[str, threading.Lock] = {}
        self._missing: dict[str, int] = {}  # site -> the round found missing at its last probe
        self._full_at: float | None = None  # when every site was last probed (None: never)
        self._seen_markers: set[str] = set()  # the inbox at the last poll (a site is due for a new marker)
        self._fetch_locks_guard = threading.Lock()

    # ---- globals, plans, architectures --------------------------------------------
    def manifest(self, version: int) -> Signed[GlobalManifest]:
        """The verified global manifest of ``version`` (read once)."""
        if version not in self._manifests:
            self._manifests[version] = self.bucket.read(layout.global_version(version), GlobalManifest)
        return self._manifests[version]

    def forget_manifest(self, version: int) -> None:
        """Read ``version`` again next time (it was just published, by us or a concurrent run)."""
        self._manifests.pop(version, None)

    def plans_of(self, site: str) -> PlansDocument:
        if site not in self._plans:
            self._plans[site] = self.bucket.read(layout.site_plans(site), PlansDocument).doc
        return self._plans[site]

    def site_shapes(self, site: str, plans: PlansDocument | None = None) -> dict[str, tuple[int, ...]]:
        """The site's declared architecture: keys and shapes of its verified initial weights."""
        if site not in self._shapes:
            from ..weights.tensors import validate_update

            plans = plans or self.plans_of(site)
            path = self.fetch(plans.init_blob)
            info = validate_update(path)
            self._shapes[site] = dict(info.shapes())
            self._dtypes[site] = {k: t.dtype for k, t in info.tensors.items()}
        return self._shapes[site]

    def declared_cases(self, site: str) -> int | None:
        """The case count a site committed to before training (FFE census, or its plans document);
        an update's weight must match it, so a site cannot inflate its influence later."""
        if site not in self._cases:
            n = None
            if self.config.mode == "ffe":
                newest = layout.newest_revision(layout.census_key, None, self.fed.store.exists)  # superseding ones
                try:
                    census = None if newest is None else self.bucket.read(layout.census_key(newest), Census).doc
                except NotFound:
                    census = None
                n = None if census is None else census.sites.get(site)
            else:
                v = self.plans_of(site).summary.get("num_cases")
                n = v if isinstance(v, int) and not isinstance(v, bool) else None
            self._cases[site] = n
        return self._cases[site]

    # ---- payloads ------------------------------------------------------------------
    def fetch(self, ref: BlobRef) -> str:
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

    def put_own(self, path: str) -> BlobRef:
        """Upload an aggregator output and keep it in the cache, so the next round does not download it back."""
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

    def protected_sha256(self) -> set[str]:
        """Payloads needed locally whatever retention says: the sites' initial weights (their
        architectures) and the verified updates not yet folded into a global."""
        shas = {Path(path).name.split(".")[0] for _sha, path in self._verified.values()}
        for site in self.config.site_names:
            try:
                init = self.plans_of(site).init_blob
            except (NotFound, ValidationError):
                continue
            if init is not None:
                shas.add(init.sha256)
        return shas

    def forget_folded(self, keys: list[str]) -> None:
        """Updates just folded into a published global: their cursor has moved past them."""
        for key in keys:
            self._verified.pop(key, None)

    # ---- updates --------------------------------------------------------------------
    def rejected_sites(self, version: int) -> set[str]:
        """Sites with an update from ``version`` that was rejected (they answered this version)."""
        return {site for site, base in self._rejected_bases.values() if base == version}

    def scan(self, next_rounds: dict[str, int]) -> tuple[list[Pending], dict[str, int], dict[str, tuple]]:
        """Verify every update from each site's cursor on; stop at the first missing one.

        Returns the acceptable updates, each site's next unread round, and per update key its
        (manifest, verified local file). Manifests are read site by site; the payloads new since
        the last poll are then downloaded and checked concurrently (hashing, copying and the NaN
        scan release the GIL), so several updates landing together cost about one update's time."""
        found: list[_Found] = []
        cursor: dict[str, int] = {}
        due, markers = self._due_sites()
        for site in self.config.site_names:
            r = next_rounds.get(site, 0)
            while True:
                if site not in due and r >= self._missing.get(site, -1) >= 0:
                    break  # known missing at the last probe, and no marker since: no request
                try:  # the slot's value: junk at the key is recorded and skipped, the round stays r
                    signed = self.bucket.read(layout.site_update(site, r), UpdateManifest)
                except NotFound:
                    self._missing[site] = r
                    break
                key = signed.key
                if key in self.quarantine:  # a valid manifest whose update was refused (before a restart, say)
                    self._rejected_bases.setdefault(key, (site, signed.doc.base_version))
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
                    self.quarantine.reject(key, str(result))
                    self._rejected_bases[key] = (site, signed.doc.base_version)
                    continue
                self._verified[key] = (signed.raw_sha256, result)
            pending.append(Pending(site, r, signed.doc.base_version, key))
            local[key] = (signed.doc, self._verified[key][1])
        self._clear(markers, next_rounds)
        return pending, cursor, local

    def _due_sites(self) -> tuple[set[str], list[str]]:
        """The sites to probe this poll, and the inbox markers read: one listing of ``inbox/`` (constant
        cost); a site is due when a marker of it is new to this aggregator (markers stay until a published
        global folds their update, so a second aggregator sees them too); every site at the first scan
        and every ``FULL_SCAN_EVERY_S`` (a marker may be lost)."""
        markers: list[str] = []
        try:
            markers = self.fed.store.list(layout.INBOX)
        except FedfsError as exc:  # no inbox (denied, or a backend error): probe everyone
            log.debug("inbox not listed: %s", exc)
            self._full_at = None
        now = time.monotonic()
        new = [m for m in markers if m not in self._seen_markers]
        self._seen_markers = set(markers)
        if self._full_at is None or now - self._full_at >= FULL_SCAN_EVERY_S:
            self._full_at = now
            return set(self.config.site_names), markers
        names = set(self.config.site_names)
        return {p[0] for p in map(layout.parse_inbox_marker, new) if p is not None and p[0] in names}, markers

    def _clear(self, markers: list[str], folded: dict[str, int]) -> None:
        """Delete the markers whose update a published global has folded (``folded``: its next rounds),
        and junk ones; best effort, and idempotent between two aggregators."""
        names = set(self.config.site_names)
        for key in markers:
            parsed = layout.parse_inbox_marker(key)
            if parsed is not None and parsed[0] in names and parsed[1] >= folded.get(parsed[0], 0):
                continue  # not folded yet: another aggregator may still need it
            try:
                self.fed.store.delete(key)
            except FedfsError as exc:
                log.debug("inbox marker %s not deleted: %s", key, exc)

    def _verify_all(self, todo: list[tuple[str, str, Any]]) -> dict[str, str | ValidationError]:
        """Verify updates (concurrently when there are several): key -> local path, or the
        ValidationError that rejects it. Other errors (storage trouble) propagate."""
        for site in sorted({site for site, _k, _s in todo}):  # warm the per-site caches on this thread
            try:
                self.plans_of(site)
                self.declared_cases(site)
                self.site_shapes(site)
            except ValidationError:
                pass  # raised again, per update, by verify_update below

        def one(item: tuple[str, str, Any]) -> str | ValidationError:
            site, _key, signed = item
            try:
                return self.verify_update(site, signed.doc)
            except ValidationError as exc:
                return exc

        if len(todo) < 2:
            return {key: one((site, key, signed)) for site, key, signed in todo}
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(len(todo), max(2, os.cpu_count() or 2), 4),
                                thread_name_prefix="fedfs-verify") as pool:
            results = list(pool.map(one, todo))
        return {key: res for (_site, key, _signed), res in zip(todo, results)}

    def verify_update(self, site: str, upd: UpdateManifest) -> str:
        """Check one update of ``site`` against what the site declared; return its verified local file."""
        from ..weights.tensors import relative_change, validate_update

        plans = self.plans_of(site)
        if upd.plans_digest and upd.plans_digest != plans.digest:
            raise ValidationError(f"update trained with plans {upd.plans_digest[:12]}, site published {plans.digest[:12]}")
        if upd.blob.size > MAX_WEIGHTS_BYTES:
            raise ValidationError(f"payload of {upd.blob.size} bytes exceeds the {MAX_WEIGHTS_BYTES}-byte limit")
        if not upd.blob.key.startswith(layout.site_prefix(site)):
            raise ValidationError(f"payload {upd.blob.key} lies outside site {site}'s folder")
        try:  # the payload must lie in the signer's folder now: a cached copy of another's is no shortcut
            present = self.fed.store.size(upd.blob.key)
        except NotFound:
            present = None
        if present is None:
            raise ValidationError(f"payload {upd.blob.key} is not in site {site}'s folder")
        if present != upd.blob.size:
            raise ValidationError(f"payload {upd.blob.key} is {present} bytes in site {site}'s folder, "
                                  f"but the manifest says {upd.blob.size}")
        declared = self.declared_cases(site)
        bound = self.config.case_claim_problem(site, upd.num_cases if declared is None else declared)
        if bound:
            raise ValidationError(bound)
        if declared is not None and upd.num_cases != declared:
            raise ValidationError(f"update claims {upd.num_cases} training cases; site {site} declared {declared}")
        path = self.fetch(upd.blob)
        try:
            info = validate_update(path, expected=self.site_shapes(site))
        except ValidationError as exc:  # name the bucket file, not this machine's cache path
            raise type(exc)(str(exc).replace(path, self.fed.store.describe(upd.blob.key))) from None
        declared_dtypes = self._dtypes.get(site, {})
        wrong = sorted(k for k, t in info.tensors.items() if k in declared_dtypes and t.dtype != declared_dtypes[k])
        if wrong:  # dtypes are part of the declared architecture (a wider one could overflow the global)
            k = wrong[0]
            raise ValidationError(f"{self.fed.store.describe(upd.blob.key)}: tensor {k!r} is {info.tensors[k].dtype}, "
                                  f"the site's declared architecture says {declared_dtypes[k]}"
                                  + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""))
        limit = self.config.update_norm_limit
        if limit > 0:
            try:
                base_ref = self.manifest(upd.base_version).doc.blob_for(site)
            except NotFound:
                raise ValidationError(f"update names base version v{upd.base_version}, which does not exist") from None
            try:
                base_path = self.fetch(base_ref)
            except NotFound:
                raise ValidationError(f"update names base version v{upd.base_version}, whose weights were "
                                      "removed under the federation's retention (too old)") from None
            ratio = relative_change(path, base_path)
            if ratio > limit:
                raise ValidationError(f"implausible update: it moves the model by {ratio:.3g} x the norm of "
                                      f"v{upd.base_version} (limit {limit:g})")
        return path
