"""A site's FFE set-up: its census and fingerprint summary, superseded on request before ``v0``.

:class:`SiteSetup` publishes the site's census (case and channel counts, label and
channel names), then, once the aggregator's merged census includes it, the fingerprint
summary that answers that census, and hands the merged fingerprint to the planner.
Every document is a write-once revision (:mod:`fedfs.roles.revisions`): ``redo``
(``fedfs site fingerprint --redo``) measures the dataset again and publishes a
superseding census, or a new summary when the census is unchanged; a new merged census
makes every site answer it with a new summary, automatically.

While it waits, the site reads the aggregator's status (one read per idle step, before
``v0`` only): if the aggregator is blocked on this site's documents, the site's step
reports "blocked" with the aggregator's reason, not "waiting".
"""

from __future__ import annotations

from functools import partial
from typing import Any

from ..errors import ConfigError, FedfsError
from ..protocol import layout
from ..protocol.schema import Census, FingerprintSummary, GlobalFingerprint, SiteCensus, StatusDocument
from ..protocol.timestamps import parse_stamp_or_none
from .revisions import Revisions
from .steps import Action, StepResult

__all__ = ["SiteSetup"]

PROBLEMS = layout.AGG_PREFIX + "problems/"


class SiteSetup:
    """The set-up documents of one site (``site``: a :class:`fedfs.roles.site.Site`)."""

    def __init__(self, site: Any) -> None:
        self.site = site
        self.name = site.name
        self.bucket = site.bucket
        # no quarantine here: a file that fails verification raises, and the site's step records it
        # and reports "blocked" (the aggregator passes over a bad revision and supersedes its own)
        self.revisions = Revisions(site.bucket, site.quarantine)  # junk at a newer revision is skipped, not fatal
        self.redo_summary = False  # publish a new summary even if the current one answers the census
        self.secure = bool(getattr(site.config, "secure_aggregation", False))  # secure FFE (roles/secure_setup.py)
        self._measured: dict[str, Any] | None = None
        self._summary: tuple[int, dict[str, Any]] | None = None

    def _own_census(self) -> Any:
        return self.revisions.latest(partial(layout.site_census, self.name), SiteCensus)

    def _own_summary(self) -> Any:
        return self.revisions.latest(partial(layout.site_fingerprint, self.name), FingerprintSummary)

    def measured(self) -> dict[str, Any]:
        """:meth:`measure`, once per process (a secure session's masked input is asked for more than once)."""
        if self._measured is None:
            self._measured = self.measure()
        return self._measured

    def summary_for(self, total_cases: int) -> dict[str, Any]:
        """The fingerprint summary for ``total_cases``, computed once per process (deterministic)."""
        if self._summary is None or self._summary[0] != total_cases:
            self._summary = (total_cases, self.site.work.fingerprint_summary(total_cases))
        return self._summary[1]

    def measure(self) -> dict[str, Any]:
        """The census fields of the dataset as it is now (the local work checks its integrity)."""
        work = self.site.work
        n, ch = work.census()
        names = work.census_names() if hasattr(work, "census_names") else {}
        return {"num_cases": n, "num_channels": ch, "labels": dict(names.get("labels", {})),
                "channel_names": dict(names.get("channel_names", {}))}

    # ---- the step --------------------------------------------------------------------
    def step(self) -> StepResult | tuple[int, dict[str, Any]]:
        """Publish what is due, or wait; once the merged fingerprint answers this site's newest
        summary, return (its revision, the fingerprint) for planning."""
        own = self._own_census()
        if own is None:
            fields = self.measured() if self.secure else self.measure()
            return self._publish_census(fields, self._next(layout.site_census))
        if self.secure:  # our count goes into the masked sum (its session is done once we revealed our shares)
            from . import secure_setup

            progress = secure_setup.site_census(self)
            if progress is not None:
                return progress
        sites = self.site.config.site_names
        merged = self.revisions.latest(layout.census_key, Census)
        if merged is None or Revisions.sources(merged.doc, sites).get(self.name) != own.doc.revision:
            return self.wait("waiting for the aggregator's census" if merged is None else
                             f"waiting for the aggregator's census of revision {own.doc.revision} of ours")
        summary = self._own_summary()
        if summary is None or summary.doc.census_revision != merged.doc.revision or self.redo_summary:
            if self.secure:
                from . import secure_setup

                return secure_setup.site_geometry(self, merged.doc, self._next(layout.site_fingerprint))
            return self._publish_summary(merged.doc, self._next(layout.site_fingerprint))
        if self.secure:
            from . import secure_setup

            progress = secure_setup.site_summary(self, merged.doc)
            if progress is not None:
                return progress
        gfp = self.revisions.latest(layout.global_fingerprint_key, GlobalFingerprint)
        if gfp is None or Revisions.sources(gfp.doc, sites).get(self.name) != summary.doc.revision:
            return self.wait("waiting for the merged fingerprint")
        if self.secure:
            from . import secure_setup

            secure_setup.forget(self)  # both sums are out: the sessions' secrets are no longer needed
        return gfp.doc.revision, gfp.doc.fingerprint

    def _next(self, key_fn: Any) -> int:
        return self.revisions.next(partial(key_fn, self.name))

    def _publish_census(self, fields: dict[str, Any], revision: int) -> StepResult:
        if self.secure:  # the count goes into the masked census sum, not into this document
            fields = {**fields, "num_cases": 0, "masked": True}
        doc = SiteCensus(site=self.name, revision=revision, **fields)
        self.bucket.publish(layout.site_census(self.name, revision), doc, self.site.identity)
        cases = "case count masked" if self.secure else f"{doc.num_cases} cases"
        self.site.heartbeat("census", cases)
        what = f"superseding census (revision {revision})" if revision else "published"
        return StepResult(Action.CENSUS, f"{what}: {cases}, {doc.num_channels} channel(s)")

    def _publish_summary(self, census: Census, revision: int) -> StepResult:
        summary = self.site.work.fingerprint_summary(census.total_cases)
        doc = FingerprintSummary(site=self.name, mode="ffe", total_cases=census.total_cases, summary=summary,
                                 revision=revision, census_revision=census.revision)
        self.bucket.publish(layout.site_fingerprint(self.name, revision), doc, self.site.identity)
        self.redo_summary = False
        self.site.heartbeat("fingerprint", "summary published")
        what = f"superseding summary (revision {revision})" if revision else "summary published"
        return StepResult(Action.FINGERPRINT, f"{what} ({census.total_cases} federation cases)")

    # ---- superseding ---------------------------------------------------------------
    def redo(self) -> str:
        """Measure the dataset again and supersede the census (or, unchanged, the summary); before
        ``v0`` and before this site planned only. ConfigError saying why not otherwise."""
        if self.secure:
            from .secure_setup import REDO_REFUSED

            raise ConfigError(REDO_REFUSED)
        if self.bucket.latest_version() is not None:
            raise ConfigError("training has started (the initial global v0 is out): the census and fingerprint "
                              "can no longer be superseded; create a new federation (`fedfs init` on a new "
                              "folder) with the corrected dataset")
        if self.bucket.store.exists(layout.site_plans(self.name)):
            raise ConfigError(f"site {self.name} has planned from the merged fingerprint already "
                              f"({layout.site_plans(self.name)}); plans are write-once, so a corrected dataset "
                              "needs a new federation (`fedfs init` on a new folder)")
        fresh = self.measure()
        own = self._own_census()
        if own is None:
            return str(self._publish_census(fresh, self._next(layout.site_census)))
        if all(getattr(own.doc, k) == v for k, v in fresh.items()):
            self.redo_summary = True
            return f"census unchanged ({fresh['num_cases']} cases): the fingerprint summary is computed again"
        before = own.doc.num_cases
        return f"{self._publish_census(fresh, self._next(layout.site_census))} (was {before} cases)"

    # ---- the counterpart -----------------------------------------------------------
    def wait(self, reason: str) -> StepResult:
        """WAIT with ``reason``, or BLOCKED with the aggregator's reason if it is blocked on this site."""
        blocked = self.aggregator_blocked()
        if blocked:
            self.site.heartbeat("blocked", blocked[:300])
            return StepResult(Action.BLOCKED, blocked)
        self.site.heartbeat("waiting", reason)
        return StepResult(Action.WAIT, reason)

    def aggregator_blocked(self) -> str | None:
        """Why the aggregator cannot go on because of this site, from its status (one read), or None:
        a rejection of this site's current census, summary or plans, or a problem naming this site
        recorded after this site's newest census or summary (an older one is answered already)."""
        try:
            status = self.bucket.read(layout.AGG_STATUS, StatusDocument).doc
        except FedfsError:
            return None
        mine = {layout.site_plans(self.name)}
        since = None
        if self.site.config.mode == "ffe":
            for signed in (self._own_census(), self._own_summary()):
                if signed is not None:
                    mine.add(signed.key)
                    at = parse_stamp_or_none(signed.signed_at)
                    since = at if since is None or (at is not None and at > since) else since
        for r in reversed(status.rejected):
            if r.key in mine:
                return f"the aggregator rejected {r.key}: {r.reason}"
            at = parse_stamp_or_none(r.at)
            if r.key.startswith(PROBLEMS) and self.name in r.sites and (since is None or (at or 0) >= since):
                return f"the aggregator is blocked on this site: {r.reason}"
        return None
