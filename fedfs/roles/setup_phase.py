"""The aggregator before the first round: census, fingerprint, plans check, initial model ``v0``.

:class:`SetupPhase` reads what the sites have published so far, asks the pure
:func:`fedfs.protocol.rounds.setup_due` what is due, and does that one thing: merge the
FFE census, merge the FFE fingerprint summaries, or check that the sites' plans and
networks agree and publish ``v0``. A problem a person must fix (fingerprints that do not
merge, plans that differ) is recorded in the aggregator's status and reported "blocked".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import NotFound, ValidationError
from ..protocol import layout
from ..protocol.rounds import SetupState, setup_due
from ..protocol.schema import Census, FingerprintSummary, GlobalFingerprint, GlobalManifest, PlansDocument, SiteCensus
from ..trust.signing import Identity
from .context import FederationContext
from .inputs import VerifiedInputs
from .quarantine import Quarantine
from .steps import Action, StepResult

__all__ = ["SetupPhase"]


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

    def step(self) -> StepResult:
        """Do the set-up action that is due now, or say what it waits for."""
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
            return self._publish_census(censuses)
        if due == "fingerprint":
            return self._publish_fingerprint(summaries)
        if due == "v0":
            return self._publish_v0(plans)
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

    def _problem(self, what: str, message: str) -> StepResult:
        """Record a problem a person must fix in the aggregator's status; report "blocked"."""
        self.quarantine.reject(f"{layout.AGG_PREFIX}problems/{what}", message)
        self.quarantine.flush()
        return StepResult(Action.BLOCKED, message)

    def _publish_census(self, censuses: dict[str, SiteCensus]) -> StepResult:
        from ..fl.fingerprint import merge_census

        merged = merge_census({s: {"num_cases": d.num_cases, "num_channels": d.num_channels}
                               for s, d in censuses.items()})
        doc = Census(total_cases=merged["total_cases"], num_channels=merged["num_channels"], sites=merged["sites"])
        self.bucket.publish(layout.CENSUS, doc, self.identity)
        return StepResult(Action.CENSUS, f"{doc.total_cases} cases over {len(doc.sites)} sites")

    def _publish_fingerprint(self, summaries: dict[str, FingerprintSummary]) -> StepResult:
        from ..fl.fingerprint import merge_summaries

        census = self.bucket.read(layout.CENSUS, Census).doc
        try:
            fp = merge_summaries({s: d.summary for s, d in summaries.items()},
                                 {"total_cases": census.total_cases, "num_channels": census.num_channels,
                                  "sites": census.sites})
        except ValidationError as exc:
            self._problem("fingerprint", str(exc))
            return StepResult(Action.BLOCKED, f"cannot merge fingerprints: {exc}")
        doc = GlobalFingerprint(fingerprint=fp, sites=sorted(summaries), total_cases=census.total_cases)
        self.bucket.publish(layout.GLOBAL_FINGERPRINT, doc, self.identity)
        return StepResult(Action.FINGERPRINT, f"merged fingerprint of {len(summaries)} sites published")

    def _plans_differ(self, plans: dict[str, PlansDocument]) -> str:
        """Why the sites' plans are not identical ("" when they are), field by field."""
        sites = self.config.site_names
        digests = {s: plans[s].digest for s in sites}
        if len(set(digests.values())) <= 1:
            return ""
        from ..fl.plans import diff_plans

        ref = sites[0]
        problems = []
        for s in sites[1:]:
            if digests[s] != digests[ref]:
                fields = diff_plans(plans[ref].summary.get("plans", plans[ref].summary),
                                    plans[s].summary.get("plans", plans[s].summary))
                problems.append(f"{s} differs from {ref} in {', '.join(fields[:8]) or 'unknown fields'}")
        return (f"{self.config.mode.upper()} sites hold different plans (nnU-Net version, planner or options "
                "differ): " + "; ".join(problems))

    def _publish_v0(self, plans: dict[str, PlansDocument]) -> StepResult:
        c = self.config
        sites = c.site_names
        if c.mode != "asym":
            differ = self._plans_differ(plans)
            if differ:
                return self._problem("plans", differ)
        for s in sites:
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
            doc = GlobalManifest(version=0, site_blobs={s: plans[s].init_blob for s in sites},
                                 next_rounds={s: 0 for s in sites}, report={"init": "each site's own initial weights"})
        self.commit(doc)
        return StepResult(Action.V0, "initial global published; training can start", version=0)
