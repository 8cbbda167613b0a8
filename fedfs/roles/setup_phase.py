"""The aggregator before the first round: census, fingerprint, plans check, initial model ``v0``.

:class:`SetupPhase` reads what the sites have published so far, asks the pure
:func:`fedfs.protocol.rounds.setup_due` what is due, and does that one thing: merge the
FFE census, merge the FFE fingerprint summaries, or check that the sites' plans and
networks agree and publish ``v0``. A problem a person must fix (fingerprints that do not
merge, plans that differ) is recorded in the aggregator's status, naming the sites it
concerns (their steps report "blocked" too), and reported "blocked".

Before ``v0`` a site may supersede its census or summary (:mod:`fedfs.roles.revisions`):
a merged census or fingerprint made from older site documents is then superseded by a
new revision, and plans made from a superseded fingerprint block ``v0``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import Any

from ..errors import Conflict, NotFound, ValidationError
from ..protocol import layout
from ..protocol.rounds import SetupState, setup_due
from ..protocol.schema import (BlobRef, Census, FingerprintSummary, GlobalFingerprint, GlobalManifest, PlansDocument,
                               SiteCensus)
from ..trust.signing import Identity
from .context import FederationContext
from .inputs import VerifiedInputs
from .quarantine import Quarantine
from .revisions import Revisions
from .steps import Action, StepResult

__all__ = ["REDO", "SetupPhase"]

#: The command that supersedes a site's census and fingerprint summary (named in blocked messages).
REDO = "fedfs site fingerprint --redo"


class SetupPhase:
    """One set-up step at a time; ``commit`` publishes ``v0`` as the aggregator publishes every global."""

    def __init__(self, fed: FederationContext, identity: Identity, inputs: VerifiedInputs, quarantine: Quarantine,
                 commit: Callable[[GlobalManifest], None]) -> None:
        self.fed = fed
        self.config = fed.config
        self.bucket = fed.bucket
        self.identity = identity
        self.inputs = inputs
        self.quarantine = quarantine
        self.commit = commit
        self.revisions = Revisions(self.bucket, quarantine)

    def step(self) -> StepResult:
        """Do the set-up action that is due now, or say what it waits for."""
        c = self.config
        st = SetupState()
        if c.mode == "ffe":
            rev = self.revisions
            censuses = {s: rev.latest(partial(layout.site_census, s), SiteCensus) for s in c.site_names}
            censuses = {s: d for s, d in censuses.items() if d is not None}
            st.census_sites = set(censuses)
            merged = rev.latest(layout.census_key, Census)
            current = {s: d.doc.revision for s, d in censuses.items()}
            st.census_published = merged is not None and rev.sources(merged.doc, c.site_names) == current
            if st.census_published:
                m = merged.doc.revision
                summaries = {s: rev.latest(partial(layout.site_fingerprint, s), FingerprintSummary)
                             for s in c.site_names}
                summaries = {s: d for s, d in summaries.items() if d is not None and d.doc.census_revision == m}
                st.summary_sites = set(summaries)
                gfp = rev.latest(layout.global_fingerprint_key, GlobalFingerprint)
                wanted = {s: d.doc.revision for s, d in summaries.items()}
                st.fingerprint_published = (gfp is not None and st.summary_sites >= set(c.site_names)
                                            and rev.sources(gfp.doc, c.site_names) == wanted)
        if c.mode != "ffe" or st.fingerprint_published:
            plans = self._read_all(layout.site_plans, PlansDocument)
            st.plans_sites = set(plans)
        due = setup_due(c, st)
        if due == "census":
            return self._publish_census({s: d.doc for s, d in censuses.items()},
                                        0 if merged is None else merged.doc.revision + 1)
        if due == "fingerprint":
            return self._publish_fingerprint({s: d.doc for s, d in summaries.items()}, merged.doc,
                                             0 if gfp is None else gfp.doc.revision + 1)
        if due == "v0":
            return self._publish_v0(plans, gfp.doc.revision if c.mode == "ffe" else 0)
        return StepResult(Action.WAIT, due.replace("wait-", "waiting for site ") if due.startswith("wait") else due)

    def _read_all(self, key_fn: Callable[[str], str], cls: type) -> dict[str, Any]:
        """Each site's verified document at ``key_fn(site)``, for the sites that have published one."""
        out = {}
        for site in self.config.site_names:
            key = key_fn(site)
            if key in self.quarantine:
                continue
            try:
                out[site] = self.bucket.read(key, cls).doc
            except NotFound:
                continue
            except ValidationError as exc:
                self.quarantine.reject(key, str(exc))
        return out

    def _problem(self, what: str, message: str, sites: list[str] | tuple[str, ...] = ()) -> StepResult:
        """Record a problem a person must fix in the aggregator's status, naming the ``sites`` whose
        documents cause it (their steps then report "blocked" too); report "blocked"."""
        self.quarantine.reject(f"{layout.AGG_PREFIX}problems/{what}", message, sites)
        self.quarantine.flush()
        return StepResult(Action.BLOCKED, message)

    def _resolved(self, *whats: str) -> None:
        """The problems ``whats`` are behind us (a later set-up document fixed them)."""
        for what in whats:
            self.quarantine.resolve(f"{layout.AGG_PREFIX}problems/{what}")
        self.quarantine.flush()

    def _publish_census(self, censuses: dict[str, SiteCensus], revision: int) -> StepResult:
        """Merge the censuses into revision ``revision`` (the one after the newest this step saw)."""
        from ..fl.fingerprint import census_mismatch, merge_census

        mismatch = census_mismatch({s: {"num_channels": d.num_channels, "labels": d.labels,
                                        "channel_names": d.channel_names} for s, d in censuses.items()})
        if mismatch:
            sites, why = mismatch
            return self._problem("census", f"{why}. Correct the wrong site's dataset, then run "
                                           f"`{REDO}` there", sites)
        if getattr(self.config, "secure_aggregation", False):  # the counts are summed under masking
            from .secure_setup import aggregator_census

            return aggregator_census(self, censuses, revision)
        masked = sorted(s for s, d in censuses.items() if d.masked)
        if masked:
            return self._problem("census", f"site(s) {', '.join(masked)} published a masked census (secure FFE), but "
                                           "this federation does not use secure aggregation", masked)
        over = {s: self.config.case_claim_problem(s, d.num_cases) for s, d in censuses.items()}
        over = {s: why for s, why in over.items() if why}
        if over:
            return self._problem("census", "; ".join(over[s] for s in sorted(over)) + f". Correct the count, then run "
                                           f"`{REDO}` there", sorted(over))
        merged = merge_census({s: {"num_cases": d.num_cases, "num_channels": d.num_channels}
                               for s, d in censuses.items()})
        first = censuses[min(censuses)]
        doc = Census(total_cases=merged["total_cases"], num_channels=merged["num_channels"], sites=merged["sites"],
                     revision=revision, sources={s: d.revision for s, d in censuses.items()},
                     labels=first.labels, channel_names=first.channel_names)
        published = self._publish_revision(layout.census_key, doc)
        if published is None:
            return StepResult(Action.WAIT, f"another aggregator run published census revision {revision} first")
        revision = published.revision
        self._resolved("census")
        what = "superseding census" if revision else "census"
        return StepResult(Action.CENSUS, f"{what}: {doc.total_cases} cases over {len(doc.sites)} sites")

    def _publish_fingerprint(self, summaries: dict[str, FingerprintSummary], census: Census,
                             revision: int) -> StepResult:
        """Merge the summaries into revision ``revision`` (the one after the newest this step saw)."""
        from ..fl.fingerprint import merge_summaries

        if census.masked:  # secure FFE: geometries in the clear, intensity histograms summed under masking
            from .secure_setup import aggregator_fingerprint

            return aggregator_fingerprint(self, summaries, census, revision)
        for s, d in sorted(summaries.items()):
            n = d.summary.get("num_cases")
            if isinstance(n, int) and n != census.sites[s]:
                return self._problem("fingerprint", f"site {s}'s fingerprint summary has {n} cases, its census said "
                                                    f"{census.sites[s]}: its dataset changed after the census. On "
                                                    f"site {s}, run `{REDO}` (with its usual options) to supersede "
                                                    "both, before training starts", [s])
        try:
            fp = merge_summaries({s: d.summary for s, d in summaries.items()},
                                 {"total_cases": census.total_cases, "num_channels": census.num_channels,
                                  "sites": census.sites})
        except ValidationError as exc:
            self._problem("fingerprint", str(exc), sorted(summaries))
            return StepResult(Action.BLOCKED, f"cannot merge fingerprints: {exc}")
        doc = GlobalFingerprint(fingerprint=fp, sites=sorted(summaries), total_cases=census.total_cases,
                                revision=revision, sources={s: d.revision for s, d in summaries.items()})
        published = self._publish_revision(layout.global_fingerprint_key, doc)
        if published is None:
            return StepResult(Action.WAIT, f"another aggregator run published fingerprint revision {revision} first")
        revision = published.revision
        self._resolved("census", "fingerprint")
        what = "superseding merged fingerprint" if revision else "merged fingerprint"
        return StepResult(Action.FINGERPRINT, f"{what} of {len(summaries)} sites published")

    def _publish_revision(self, key_of: Callable[[int], str], doc: Any) -> Any | None:
        """Publish a merged revision at the number the step's own view gave it (``doc.revision``).

        A second aggregator run that merged the same inputs wrote the same body there: that is
        success (the publish is idempotent). A valid document with another body means the inputs
        moved on meanwhile: None, step again. A file there that does not verify is skipped (the
        next number is tried). Taking the next free number at publish time instead let a
        concurrent run supersede an identical revision, which blocked v0 for good."""
        for _ in range(8):
            key = key_of(doc.revision)
            try:
                self.bucket.publish(key, doc, self.identity)
                return doc
            except Conflict:
                try:
                    self.bucket.read(key, type(doc))
                    return None
                except ValidationError as exc:
                    self.quarantine.reject(key, str(exc))
                    doc = dataclasses.replace(doc, revision=doc.revision + 1)
        return None

    def _shared_init(self, sites: list[str], plans: dict[str, PlansDocument]) -> dict[str, BlobRef]:
        """AsymFedAvg's v0: every site's own initial weights, except that each tensor AsymFedAvg will
        average is the first site's. Averaging layers initialised independently would average unrelated
        networks (conv channels have no common order). A pure function of the inputs, so a re-run
        publishes the same bytes."""
        from ..fl.aggregate import FedAvg, Update
        from ..weights.combine import aggregate, extract_site

        align = "level" if self.config.align == "resolution" else "name"
        out = self.inputs.cache.parent / "out" / "v000000"
        out.mkdir(parents=True, exist_ok=True)
        first = sites[0]
        union = aggregate([Update(first, self.inputs.fetch(plans[first].init_blob), num_cases=1)],
                          out / "union.safetensors", rule=FedAvg(weighting="uniform"), align=align).path
        blobs = {first: plans[first].init_blob}
        for s in sites[1:]:
            path = out / f"{s}.safetensors"
            extract_site(union, self.inputs.site_shapes(s), path, align=align,
                         fallback_path=self.inputs.fetch(plans[s].init_blob), metadata={"site": s, "init": "1"})
            blobs[s] = self.inputs.put_own(str(path))
        return blobs

    def _plans_differ(self, plans: dict[str, PlansDocument]) -> tuple[list[str], str]:
        """The sites whose plans are not identical and why (([], "") when they are), field by field."""
        sites = self.config.site_names
        digests = {s: plans[s].digest for s in sites}
        if len(set(digests.values())) <= 1:
            return [], ""
        from ..fl.plans import diff_plans

        ref = sites[0]
        problems, named = [], [ref]
        for s in sites[1:]:
            if digests[s] != digests[ref]:
                fields = diff_plans(plans[ref].summary.get("plans", plans[ref].summary),
                                    plans[s].summary.get("plans", plans[s].summary))
                problems.append(f"{s} differs from {ref} in {', '.join(fields[:8]) or 'unknown fields'}")
                named.append(s)
        return named, (f"{self.config.mode.upper()} sites hold different plans (nnU-Net version, planner or "
                       "options differ): " + "; ".join(problems))

    def _stale_plans(self, plans: dict[str, PlansDocument], fingerprint_revision: int) -> StepResult | None:
        """FFE: plans made from a merged fingerprint superseded since cannot start this federation."""
        stale = sorted(s for s, p in plans.items() if p.fingerprint_revision != fingerprint_revision)
        if not stale:
            return None
        return self._problem("plans", f"site(s) {', '.join(stale)} planned from a merged fingerprint that was "
                                      f"superseded since (revision {fingerprint_revision} is current); plans are "
                                      "write-once, so this federation cannot start: create a new federation "
                                      "(`fedfs init` on a new folder) with the corrected datasets", stale)

    def _publish_v0(self, plans: dict[str, PlansDocument], fingerprint_revision: int = 0) -> StepResult:
        c = self.config
        sites = c.site_names
        if c.mode == "ffe":
            stale = self._stale_plans(plans, fingerprint_revision)
            if stale is not None:
                return stale
        if c.mode != "asym":
            named, differ = self._plans_differ(plans)
            if differ:
                return self._problem("plans", differ, named)
        for s in sites:  # nnU-Net sites say which planner they ran: it must be the federation's (federation.json)
            planner = plans[s].summary.get("planner")
            want = getattr(c, "plans_name", "")
            if planner is not None and (planner != getattr(c, "planner", planner)
                                        or (want and plans[s].plans_identifier != want)):
                return self._problem("plans", f"site {s} planned {plans[s].plans_identifier} with {planner}; the "
                                              f"federation trains {want or 'the plans of'} {c.planner} "
                                              "(federation.json planner / plans_identifier)", [s])
            if plans[s].init_blob is None:
                self.quarantine.reject(layout.site_plans(s), "plans document names no initial weights")
                return StepResult(Action.BLOCKED, f"site {s} published no initial weights")
            try:
                self.inputs.site_shapes(s, plans[s])
            except ValidationError as exc:
                self.quarantine.reject(layout.site_plans(s), str(exc))
                return StepResult(Action.BLOCKED, f"initial weights of site {s} rejected: {exc}")
        if c.mode != "asym":
            first = sites[0]
            ref_shapes = self.inputs.site_shapes(first)
            for s in sites[1:]:
                if self.inputs.site_shapes(s) != ref_shapes:
                    return self._problem("plans", f"site {s}'s network differs from {first}'s although their "
                                                  "plans are identical")
            doc = GlobalManifest(version=0, blob=plans[first].init_blob, next_rounds={s: 0 for s in sites},
                                 report={"init": f"initial weights of site {first}"})
        else:
            doc = GlobalManifest(version=0, site_blobs=self._shared_init(sites, plans),
                                 next_rounds={s: 0 for s in sites},
                                 report={"init": f"each site's own initial weights, the layers AsymFedAvg shares "
                                                 f"taken from site {sites[0]}'s"})
        self.commit(doc)
        self._resolved("")
        return StepResult(Action.V0, "initial global published; training can start", version=0)
