"""The aggregator role: read bucket state, decide (pure, :mod:`fedfs.protocol.rounds`), act.

One :meth:`Aggregator.step` does whatever is due now and returns what it did:
merge the FFE census and fingerprint, check that FFE sites hold identical
plans, publish the initial model ``v0`` (:mod:`fedfs.roles.setup_phase`), and fold
pending site updates, verified by :mod:`fedfs.roles.inputs`, into the next global
(:mod:`fedfs.roles.merge`). Every action is idempotent: the output of an aggregation
is a pure function of its verified inputs, so a step killed at any point and run
again publishes the same bytes, or finds the work done.

Polling cost is constant in the number of rounds: the ``latest`` hint, one
probe for the next version, and per site one probe for its next update.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import faults
from ..errors import Conflict, ValidationError
from ..protocol import layout
from ..protocol.rounds import decide_aggregation
from ..protocol.schema import GlobalManifest, LatestHint
from ..protocol.timestamps import parse_stamp
from ..trust.bucket import Signed
from .audit import PayloadAudit
from .context import FederationContext
from .heartbeat import HeartbeatWriter
from .inputs import MAX_WEIGHTS_BYTES, VerifiedInputs
from .merge import next_global
from .quarantine import Quarantine
from .retention import AggregatorRetention
from .setup_phase import SetupPhase
from .steps import Action, StepResult

__all__ = ["Aggregator", "MAX_WEIGHTS_BYTES"]

log = logging.getLogger("fedfs.roles.aggregator")


class Aggregator:
    """The aggregator of one federation; ``workdir`` holds a cache of verified payloads."""

    def __init__(self, fed: FederationContext, workdir: str | os.PathLike[str], *,
                 clock: Callable[[], float] = time.time) -> None:
        self.fed = fed
        self.identity = fed.require_identity("aggregator")
        self.config = fed.config
        self.bucket = fed.bucket
        self.work = Path(workdir)
        self.clock = clock
        fed.store.check_exclusive(layout.AGG_PREFIX + "doctor")  # write-once needs put-if-absent
        self.quarantine = Quarantine(self.bucket, layout.AGG_STATUS, self.identity, logger=log,
                                     journal=self.work / "rejections.jsonl")
        self.inputs = VerifiedInputs(fed, self.work / "cache", self.quarantine)
        self.retention = AggregatorRetention(self.config, self.fed.store, self.work / "cache", self.work)
        self.setup = SetupPhase(fed, self.identity, self.inputs, self.quarantine, self._commit)
        self.liveness = HeartbeatWriter(self.bucket, layout.AGG_HEARTBEAT, self.identity)
        self.audit = PayloadAudit(self.fed.store, self.work / "cache", self.quarantine)

    # ---- reading state ----------------------------------------------------------
    def latest_version(self) -> int | None:
        """Newest published global (constant cost when the hint is current)."""
        return self.bucket.latest_version()

    def manifest(self, version: int) -> Signed[GlobalManifest]:
        return self.inputs.manifest(version)

    # ---- the step ---------------------------------------------------------------
    def step(self) -> StepResult:
        """Do whatever is due now; never blocks waiting for sites. Its heartbeat (refreshed during a
        long merge) lets ``fedfs status`` tell a waiting aggregator from a dead one."""
        with self.liveness.alive():
            latest = self.latest_version()
            result = self.setup.step() if latest is None else self._round_step(latest)
            newest = result.version if result.version is not None else latest
            if newest is not None:
                self.audit.run(self.manifest(newest).doc)  # overwritten payloads: restored
            self.quarantine.flush()  # anything recorded and not yet in the status (a failed write is retried here)
        phase = "waiting" if result.action is Action.WAIT else result.action.value
        self.liveness.beat(phase, result.detail[:300], base_version=-1 if result.version is None else result.version)
        return result

    def run(self, **kw: Any) -> StepResult | None:
        """Step until the final global is out, waking on new files (see :func:`fedfs.roles.loop.run_role`)."""
        from .loop import run_role

        with self.liveness.alive():
            return run_role(self.step, self.fed.store, **kw)

    def _round_step(self, version: int) -> StepResult:
        c = self.config
        current = self.manifest(version)
        if current.doc.is_final(c.rounds):
            return StepResult(Action.FINISHED, f"v{version} is the final global", version=version)
        if getattr(c, "secure_aggregation", False):  # the masked sum's stages instead of update manifests
            from .secure_round import aggregator_secure_step

            return aggregator_secure_step(self, version, current,
                                          max(0.0, self.clock() - parse_stamp(current.signed_at, current.key)))
        pending, cursor, local = self.inputs.scan(current.doc.next_rounds)
        age = max(0.0, self.clock() - parse_stamp(current.signed_at, current.key))
        decision = decide_aggregation(c, version, pending, cursor, age, self.inputs.rejected_sites(version))
        if any(p.base_version > version for p, _ in decision.rejected) \
                and self.bucket.published(layout.global_version(version + 1), GlobalManifest) is not None:
            # an update from a newer global than ours: our view is behind (another aggregator
            # published v(version+1) meanwhile), not the site wrong. Rejecting would be for good.
            return StepResult(Action.WAIT, f"v{version + 1} was published meanwhile: catching up", version=version)
        for p, reason in decision.rejected:
            self.quarantine.reject(p.key, reason)
        if not decision.aggregate:
            self.quarantine.flush()
            return StepResult(Action.WAIT, decision.reason, version=version)
        out_dir = self.work / "out" / f"v{version + 1:06d}"
        new = next_global(c, version, decision, local, cursor, self.inputs, self.quarantine, out_dir)
        self._commit(new)
        return StepResult(Action.AGGREGATED,
                          f"v{new.version} from {len(new.contributions)} update(s): {decision.reason}",
                          version=new.version, extra={"sites": [x.site for x in new.contributions]})

    def _commit(self, doc: GlobalManifest) -> None:
        """Publish the manifest exclusively, then the hint and the status (both only hints)."""
        faults.point("aggregator.before_manifest")
        key = layout.global_version(doc.version)
        try:
            self.bucket.publish(key, doc, self.identity)
        except Conflict:
            try:  # a concurrent run of this aggregator is fine; anything else occupying the key is not
                self.bucket.read(key, GlobalManifest)
            except ValidationError as exc:
                raise ValidationError(f"{self.fed.store.describe(key)} is occupied by a file that does not verify "
                                      f"({exc}); remove it (see docs/security.md) and run the aggregator again",
                                      key=key) from None
            log.warning("v%d was already published by another aggregator run; keeping that one", doc.version)
        self.inputs.forget_manifest(doc.version)
        faults.point("aggregator.after_manifest")
        self.bucket.write_mutable(layout.LATEST, LatestHint(version=doc.version), self.identity)
        self.quarantine.flush()
        self.inputs.forget_folded([x.key for x in doc.contributions])
        self.retention.after_commit(doc.version, self.inputs.manifest, self.inputs.protected_sha256())
