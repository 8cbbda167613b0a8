"""Secure FFE set-up (``secure_aggregation: true``, mode ``ffe``), for both roles.

The census and the fingerprint merge run as secure-aggregation sessions
(:mod:`fedfs.privacy.secagg_ffe_rounds`: ``ffe-census``, ``ffe-summary``), so the aggregator
learns the federation's total case count and the pooled intensity histograms, never one
site's. What still travels in the clear, as signed write-once documents where plain FFE
publishes them:

* the site's census (``sites/<S>/fingerprint/census.json``) with ``masked: true`` and
  ``num_cases: 0``: its channel count, label and channel names, which the aggregator compares
  across sites before the sum (a mismatch names both sites, as in plain FFE);
* the site's case geometry (``sites/<S>/fingerprint/summary.json``, its ``summary`` holding
  only ``num_cases``, ``total_cases``, ``samples_per_case``, ``sample_dtype`` and ``cases``):
  nnU-Net's planner needs the multiset of spacings and shapes, which a masked sum cannot
  carry. It shows the aggregator the site's case count (one record per case);
* the merged census (``masked: true``: the total, no site's count) and the merged fingerprint,
  which is plain FFE's (docs/privacy.md, section 2b).

Set-up waits for every site, as plain FFE's does (``v0`` needs every site's plans), so no
stage is closed early: a site that crashes resumes its session from its workdir. The
sessions are not superseded: ``fedfs site fingerprint --redo`` is refused in a secure
federation (a new federation starts afresh).
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError, ValidationError
from ..fl.fingerprint_schema import validate_summary
from ..privacy import secagg_ffe, secagg_ffe_rounds as ffe
from ..protocol import layout
from ..protocol.schema import Census, FingerprintSummary, GlobalFingerprint, SiteCensus
from .steps import Action, StepResult

__all__ = ["GEOMETRY_KEYS", "GRID", "REDO_REFUSED", "aggregator_census", "aggregator_fingerprint", "check_geometry",
           "site_census", "site_geometry", "site_summary"]

#: The histogram grid every site shares (one bin per integer intensity, 16-bit range).
GRID = secagg_ffe.IntegerGrid()

#: What a site's geometry document holds (its summary without the intensity tables).
GEOMETRY_KEYS = ("num_cases", "total_cases", "samples_per_case", "sample_dtype", "cases")

REDO_REFUSED = ("this federation uses secure aggregation: its census and fingerprint are each one secure "
                "sum of every site, which cannot be superseded; create a new federation (`fedfs init` on a new "
                "folder) with the corrected dataset")

_EMPTY_CHANNEL = {"count": 0, "values": [], "counts": [], "mantissa_bits": None}


def check_geometry(geometry: Any, where: str) -> dict[str, Any]:
    """A site's published geometry, checked as a summary's case records are (SchemaError naming ``where``)."""
    if not isinstance(geometry, dict) or sorted(geometry) != sorted(GEOMETRY_KEYS):
        raise ValidationError(f"{where}: a secure FFE geometry holds exactly {', '.join(GEOMETRY_KEYS)}")
    validate_summary({**geometry, "channels": [_EMPTY_CHANNEL]}, where)
    return geometry


# ---- the aggregator ----------------------------------------------------------------------
def aggregator_census(phase: Any, censuses: dict[str, SiteCensus], revision: int) -> StepResult:
    """Step the census session (``phase``: the :class:`~fedfs.roles.setup_phase.SetupPhase`);
    once it is summed, publish the merged census: the total, no site's count."""
    plain = sorted(s for s, d in censuses.items() if not d.masked)
    if plain:
        return phase._problem("census", f"site(s) {', '.join(plain)} published a plain census (their case count in "
                                        "the clear) in a secure federation: their fedfs predates secure FFE; "
                                        "upgrade it there, and create a new federation", plain)
    try:
        what, pooled = ffe.aggregator_census_step(phase.bucket, phase.identity, on_rejected=phase.quarantine.reject)
    except ValidationError as exc:
        return phase._problem("census", f"the secure census cannot be summed: {exc}", sorted(censuses))
    if pooled is None:
        return StepResult(Action.WAIT, f"secure census: {what}")
    missing = sorted(set(censuses) - set(pooled["survivors"]))
    first = censuses[min(censuses)]
    if missing or pooled["num_channels"] != first.num_channels:
        why = (f"the secure census was summed without {', '.join(missing)} (masked input refused: see the "
               "rejections)" if missing else f"the masked channel count {pooled['num_channels']} differs from the "
                                             f"censuses' {first.num_channels}")
        return phase._problem("census", f"{why}; the set-up cannot go on: create a new federation", missing)
    doc = Census(total_cases=pooled["total_cases"], num_channels=pooled["num_channels"], sites={}, masked=True,
                 revision=revision, sources={s: d.revision for s, d in censuses.items()},
                 labels=first.labels, channel_names=first.channel_names)
    if phase._publish_revision(layout.census_key, doc) is None:
        return StepResult(Action.WAIT, f"another aggregator run published census revision {revision} first")
    phase._resolved("census")
    return StepResult(Action.CENSUS, f"secure census: {doc.total_cases} cases over {len(censuses)} sites "
                                     "(no site's count known)")


def aggregator_fingerprint(phase: Any, summaries: dict[str, FingerprintSummary], census: Census,
                           revision: int) -> StepResult:
    """Check the sites' geometries, step the summary session; once it is summed, publish the merged fingerprint."""
    geometries = {}
    for s, d in sorted(summaries.items()):
        key = layout.site_fingerprint(s, d.revision)
        try:
            geometries[s] = check_geometry(d.summary, phase.bucket.store.describe(key))
        except ValidationError as exc:
            phase.quarantine.reject(key, str(exc), [s])
            return phase._problem("fingerprint", f"site {s}'s geometry is refused: {exc}", [s])
        claim = phase.config.case_claim_problem(s, geometries[s]["num_cases"])
        if claim:
            return phase._problem("fingerprint", f"{claim} (its case records)", [s])
    pooled_census = {"total_cases": census.total_cases, "num_channels": census.num_channels}
    try:
        what, fp = ffe.aggregator_summary_step(phase.bucket, phase.identity, geometries, pooled_census, GRID,
                                               on_rejected=phase.quarantine.reject)
    except ValidationError as exc:
        phase._problem("fingerprint", f"the secure fingerprint merge failed: {exc}", sorted(summaries))
        return StepResult(Action.BLOCKED, f"cannot merge fingerprints: {exc}")
    if fp is None:
        return StepResult(Action.WAIT, f"secure fingerprint merge: {what}")
    doc = GlobalFingerprint(fingerprint=fp, sites=sorted(summaries), total_cases=census.total_cases,
                            revision=revision, sources={s: d.revision for s, d in summaries.items()})
    if phase._publish_revision(layout.global_fingerprint_key, doc) is None:
        return StepResult(Action.WAIT, f"another aggregator run published fingerprint revision {revision} first")
    phase._resolved("census", "fingerprint")
    return StepResult(Action.FINGERPRINT, f"merged fingerprint of {len(summaries)} sites published "
                                          "(intensities summed securely)")


# ---- the site ----------------------------------------------------------------------------
def _progress(setup: Any, action: Action, what: str, session: str) -> StepResult | None:
    """A site's session step as a step result (None once its part is done)."""
    if what == "done":
        return None
    if what == "excluded":
        return StepResult(Action.BLOCKED, f"the secure {session} went on without this site (its masked input "
                                          "was refused: see the aggregator's status); create a new federation")
    if what.startswith("waiting"):
        return setup.wait(f"secure {session}: {what}")
    setup.site.heartbeat("census" if action is Action.CENSUS else "fingerprint", f"secure {session}: {what}")
    return StepResult(action, f"secure {session}: {what}")


def site_census(setup: Any) -> StepResult | None:
    """One step of this site's part in the census session (its count and channels, masked)."""
    site = setup.site
    fields = setup.measured()
    what = ffe.site_census_step(site.bucket, site.identity, site.dir, fields["num_cases"], fields["num_channels"])
    return _progress(setup, Action.CENSUS, what, "census")


def site_geometry(setup: Any, census: Census, revision: int) -> StepResult:
    """Publish this site's geometry (its summary without the intensity tables), after checking that
    its intensities fit the shared integer grid (else it is refused, naming the site and the reason)."""
    site = setup.site
    summary = setup.summary_for(census.total_cases)
    where = f"site {site.name}'s fingerprint summary"
    validate_summary(summary, where)  # a malformed local summary is no reason to name the grid
    try:
        geometry, _ = secagg_ffe.summary_input(summary, GRID, where)
    except ValidationError as exc:
        raise ConfigError(f"{exc}. Secure FFE sums integer histograms, exactly; this site's data cannot take part "
                          "in a secure federation (use one without --secure-aggregation)") from None
    doc = FingerprintSummary(site=site.name, mode="ffe", total_cases=census.total_cases, summary=geometry,
                             revision=revision, census_revision=census.revision)
    site.bucket.publish(layout.site_fingerprint(site.name, revision), doc, site.identity)
    site.heartbeat("fingerprint", "geometry published; intensities go into the secure sum")
    return StepResult(Action.FINGERPRINT, f"geometry published ({census.total_cases} federation cases); "
                                          "intensities go into the secure sum")


def site_summary(setup: Any, census: Census) -> StepResult | None:
    """One step of this site's part in the summary session (its histograms on the shared grid, masked)."""
    site = setup.site
    what = ffe.site_summary_step(site.bucket, site.identity, site.dir, lambda: setup.summary_for(census.total_cases),
                                 GRID)
    return _progress(setup, Action.FINGERPRINT, what, "fingerprint merge")


def forget(setup: Any) -> None:
    """The merged fingerprint is out: delete this site's secrets of both sessions."""
    ffe.forget(setup.site.identity, setup.site.dir)
