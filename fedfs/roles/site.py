"""The site role: fingerprint, plan, then train a round whenever a new global appears.

:meth:`Site.step` reads the bucket, decides (pure, :mod:`fedfs.protocol.rounds`) and
does at most one thing: publish the FFE census, publish the fingerprint
summary, plan and preprocess, train one round and publish the update, or
finish. The local work (nnU-Net or any other trainer) sits behind
:class:`LocalWork`, so the role is the same for nnU-Net and for plain PyTorch.

Crash safety: a trained update is first written to ``workdir/updates`` and
recorded in ``workdir/state.json``, then the trainer checkpoints, then the
update is uploaded and its manifest published. A site killed at any point and
started again either republishes the recorded update (idempotent) or retrains
the round from its last checkpoint; it never sends two updates for one round.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import faults
from ..protocol import layout
from ..errors import ConfigError, FedfsError, NotFound, ValidationError
from ..protocol.rounds import decide_site
from ..protocol.schema import (
    BlobRef,
    GlobalManifest,
    PlansDocument,
    UpdateManifest,
)
from .context import FederationContext
from .installation import Installation
from .heartbeat import HEARTBEAT_EVERY_S, HeartbeatWriter
from .quarantine import Quarantine
from .site_setup import SiteSetup
from .retention import SiteRetention
from .steps import Action, StepResult

__all__ = ["HEARTBEAT_EVERY_S", "LocalWork", "Site", "SiteState"]

log = logging.getLogger("fedfs.roles.site")



class LocalWork(Protocol):
    """What a site does locally. :class:`fedfs.nnunet.work.NnunetWork` is the nnU-Net one."""

    def census(self) -> tuple[int, int]:
        """(training cases, image channels), after checking the dataset is complete. Optional
        ``census_names()``: {"labels": ..., "channel_names": ...} as dataset.json has them."""

    def fingerprint_summary(self, total_cases: int) -> dict[str, Any]:
        """FFE phase 2: the mergeable summary, sampled as for ``total_cases`` federation cases."""

    def plan(self, global_fingerprint: dict[str, Any] | None) -> tuple[str, dict[str, Any], str]:
        """Plan (from the global fingerprint in FFE, the local one otherwise) and preprocess.
        Returns (plans identifier, plans summary to publish, plans digest)."""

    def start(self, total_epochs: int) -> None:
        """Build or resume the trainer for ``total_epochs`` epochs in all."""

    def initial_weights(self, path: str) -> None:
        """Write the untrained network's weights (safetensors) to ``path``."""

    def train_round(self, global_path: str, epochs: int, update_path: str) -> dict[str, float]:
        """Load ``global_path``, train ``epochs`` epochs, write the result to ``update_path``; return metrics."""

    def checkpoint(self) -> None:
        """Persist the trainer's own state (epoch, optimizer, logger) for a restart."""

    # Optional: ``follow_progress(epoch)``, called before each ``train_round`` with the
    # federation's progress in epochs (base version x local epochs), for trainers whose
    # learning-rate schedule depends on progress (nnU-Net's poly schedule).

    def finish(self, global_path: str) -> dict[str, Any]:
        """Load the final global, run the trainer's final steps; return a summary."""

    @property
    def num_cases(self) -> int: ...


def drop_marker(store: Any, site: str, round_: int) -> None:
    """Tell the aggregator's poll where to look (``layout.inbox_marker``); only a hint, so best effort."""
    try:
        store.write_bytes(layout.inbox_marker(site, round_), b"")
    except FedfsError as exc:  # e.g. a policy that denies inbox/: the aggregator's periodic full scan finds it
        log.warning("inbox marker not written (%s); the aggregator finds the update at its next full scan", exc)


@dataclass
class SiteState:
    """The site's local memory, in ``workdir/state.json`` (written atomically)."""

    planned: bool = False
    plans_digest: str = ""
    updates_sent: int = 0
    last_base: int | None = None
    training: dict[str, Any] | None = None  # the round being trained (for crash recovery)
    pending: dict[str, Any] | None = None  # a trained, not yet published update
    finished: bool = False
    final_version: int | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    init_digest: str = ""  # the plans digest updates/init.safetensors was made for (kept across a crash)

    @classmethod
    def load(cls, path: Path) -> SiteState:
        if not path.exists():
            return cls()
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{path}: unreadable site state ({exc}); move it away to start this site afresh") from None

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True))
        os.replace(tmp, path)


class Site:
    """One site of a federation; ``work`` does the local computing."""

    def __init__(self, fed: FederationContext, work: LocalWork, workdir: str | os.PathLike[str]) -> None:
        self.fed = fed
        self.identity = fed.require_identity("site")
        self.name = self.identity.name
        self.config = fed.config
        self.bucket = fed.bucket
        self.work = work
        self.dir = Path(workdir)
        (self.dir / "updates").mkdir(parents=True, exist_ok=True)
        (self.dir / "globals").mkdir(parents=True, exist_ok=True)
        fed.store.check_exclusive(layout.site_prefix(self.name) + "doctor")  # write-once needs put-if-absent
        self.installation = Installation(self.dir, self.name)  # which machine this is (two with one key stop)
        self.identity = self.installation.sign_as(self.identity)
        self.state_path = self.dir / "state.json"
        self.state = SiteState.load(self.state_path)
        self._started = False
        self.quarantine = Quarantine(self.bucket, layout.site_status(self.name), self.identity, logger=log,
                                     journal=self.dir / "rejections.jsonl")
        self.setup = SiteSetup(self)
        self.retention = SiteRetention(self.config, self.bucket, self.name, self.dir)
        self.liveness = HeartbeatWriter(self.bucket, layout.site_heartbeat(self.name), self.identity)

    @property
    def total_epochs(self) -> int:
        return self.config.rounds * self.config.local_epochs

    def _save(self) -> None:
        self.state.save(self.state_path)

    def heartbeat(self, phase: str, message: str = "", **kw: Any) -> None:
        """Write the heartbeat hint when the phase or message changes, else at most once a minute
        (see :class:`~fedfs.roles.heartbeat.HeartbeatWriter`)."""
        self.installation.check_heartbeat(self.bucket)  # another machine writing it? then stop (Blocked)
        self.liveness.beat(phase, message, **kw)

    def run(self, **kw: Any) -> StepResult | None:
        """Step until this site has finished, waking on new files (see :func:`fedfs.roles.loop.run_role`)."""
        from .loop import run_role

        with self.liveness.alive():
            return run_role(self.step, self.fed.store, **kw)

    # ---- the step ---------------------------------------------------------------
    def step(self) -> StepResult:
        """Do whatever is due now (at most one long action) and return what was done.

        A file from the bucket that fails verification (a forged or corrupt global, say) is
        never used: it is recorded with the reason in this site's signed status document
        (``sites/<S>/status.json``) and the step reports "blocked"; the site keeps polling.
        """
        self.installation.check_once(self.bucket)  # another machine publishing as this site? then stop (Blocked)
        try:
            with self.liveness.alive():  # a long round or final validation still shows signs of life
                result = self._step()
            self.quarantine.flush()  # files passed over on the way (junk, a bad revision): in the status, if any
            return result
        except ValidationError as exc:
            self.quarantine.reject(exc.key or "-", str(exc))
            self.quarantine.flush()
            self.heartbeat("blocked", str(exc)[:300])
            return StepResult(Action.BLOCKED, str(exc))

    def _step(self) -> StepResult:
        if self.state.finished:
            return StepResult(Action.DONE, f"finished with global v{self.state.final_version}")
        if not self.state.planned:
            return self._setup_step()
        if self.state.pending is None and self.state.training is not None:
            self._recover_training()
        if self.state.pending is not None:
            return self._publish_pending()
        version, manifest = self._latest()
        d = decide_site(self.config, version, bool(manifest and manifest.doc.final), self.state.updates_sent,
                        self.state.last_base, self.state.finished)
        if d.action == "train":
            return self._train(d.round, d.base_version, manifest)
        if d.action == "finish":
            return self._finish(version, manifest)
        if version is None:  # planned, before v0: say "blocked" if the aggregator is blocked on this site
            return self.setup.wait(d.reason)
        self.heartbeat("waiting", d.reason, round=self.state.updates_sent, base_version=self.state.last_base or -1)
        return StepResult(Action.WAIT, d.reason)

    def _latest(self):
        v = self.bucket.latest_version()
        if v is None:
            return None, None
        if getattr(self, "_manifest", None) is None or self._manifest.doc.version != v:
            self._manifest = self.bucket.read(layout.global_version(v), GlobalManifest)
            self.retention.after_global(self._manifest.doc, self.state.updates_sent)
        return v, self._manifest

    # ---- set-up --------------------------------------------------------------------
    def _setup_step(self) -> StepResult:
        gfp, gfp_revision = None, 0
        if self.config.mode == "ffe":
            due = self.setup.step()  # census, summary (each superseded on request), or the merged fingerprint
            if isinstance(due, StepResult):
                return due
            gfp_revision, gfp = due
        self.heartbeat("planning", "planning and preprocessing")
        identifier, summary, digest = self.work.plan(gfp)
        self.work.start(self.total_epochs)
        self._started = True
        init = self.dir / "updates" / "init.safetensors"
        if not (init.exists() and self.state.init_digest == digest):
            # made once per plans: a restart after publishing must publish the same document again (an untrained
            # network is random, so a fresh one would conflict with the write-once plans.json for good)
            self.work.initial_weights(str(init))
            self.state.init_digest = digest
            self._save()
        ref = self.bucket.put_blob_file(lambda sha, ext: layout.site_blob(self.name, sha, ext), str(init))
        doc = PlansDocument(site=self.name, plans_identifier=identifier, configuration=self.config.configuration,
                            digest=digest, summary=summary, init_blob=ref, nnunet_version=summary.get("nnunet_version", ""),
                            fingerprint_revision=gfp_revision)
        self.bucket.publish(layout.site_plans(self.name), doc, self.identity)
        self.state.planned, self.state.plans_digest = True, digest
        self._save()
        self.heartbeat("planned", f"plans {digest[:12]}")
        return StepResult(Action.PLANNED, f"plans {identifier} ({digest[:12]}) and initial weights published")

    # ---- rounds ---------------------------------------------------------------------
    def _fetch_global(self, manifest) -> str:
        ref: BlobRef | None = manifest.doc.blob_for(self.name)
        if ref is None:
            raise ValidationError(f"{manifest.key}: names no weights for site {self.name}", key=manifest.key)
        path = self.dir / "globals" / f"{ref.sha256}.safetensors"
        if not path.exists():
            self.bucket.get_blob_file(ref, str(path))
        self.retention.keep_global(str(path))
        return str(path)

    def _ensure_started(self) -> None:
        if not self._started:
            self.work.start(self.total_epochs)
            self._started = True

    def _train(self, round_: int, base: int, manifest) -> StepResult:
        self._ensure_started()
        try:
            gpath = self._fetch_global(manifest)
        except NotFound:  # retention removed it after a newer global came out: train from that one
            return StepResult(Action.WAIT, f"v{base}'s weights were pruned meanwhile; a newer global is out")
        self.heartbeat("training", f"round r{round_} from v{base}", round=round_, base_version=base)
        out = self.dir / "updates" / f"r{round_:06d}.safetensors"
        t0 = time.time()
        epochs = self.config.local_epochs
        self.state.training = {"round": round_, "base": base, "epoch_before": int(getattr(self.work, "epoch", 0))}
        self._save()
        follow = getattr(self.work, "follow_progress", None)
        if follow is not None:
            follow(base * epochs)
        metrics = self.work.train_round(gpath, epochs, str(out))
        if self.config.dp_noise_multiplier > 0:  # DP-FedAvg: clip (trained - base) to C, add this site's noise
            from ..privacy.dp import privatize_site_update

            privatize_site_update(self.config, gpath, str(out))
        faults.point("site.mid_training")
        # a diverged round's loss may be inf or NaN: JSON cannot carry it, and the update itself is what is judged
        metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        metrics.setdefault("round_time_s", time.time() - t0)
        self.state.pending = {"round": round_, "base": base, "path": str(out), "metrics": metrics}
        self.state.training = None
        self._save()
        self.work.checkpoint()
        return self._publish_pending()

    def _recover_training(self) -> None:
        """A crash during a round: if the trainer's checkpoint already holds the trained round,
        record it as the pending update (with its original base); otherwise train again."""
        prior = self.state.training
        self.state.training = None
        recover = getattr(self.work, "recover_round", None) if not self.config.dp_noise_multiplier else None
        # (under DP the round is trained again: an update written from the checkpoint would go out unnoised)
        if recover is None:
            self._save()
            return
        self._ensure_started()
        out = self.dir / "updates" / f"r{prior['round']:06d}.safetensors"
        if recover(prior["epoch_before"], self.config.local_epochs, str(out)):
            log.info("round r%d was trained before a crash; publishing it from the trainer's checkpoint", prior["round"])
            self.state.pending = {"round": prior["round"], "base": prior["base"], "path": str(out),
                                  "metrics": {"recovered": 1.0}}
        self._save()

    def _publish_pending(self) -> StepResult:
        p = self.state.pending
        assert p is not None
        if getattr(self.config, "secure_aggregation", False):  # no update manifest: the masked sum's stages
            from .secure_round import site_secure_step

            base = self.bucket.read(layout.global_version(p["base"]), GlobalManifest)
            waiting = site_secure_step(self, p, self._fetch_global(base))
            if waiting is not None:
                self.heartbeat("waiting", waiting.detail[:300], round=p["round"], base_version=p["base"])
                return waiting
            self.state.updates_sent, self.state.last_base, self.state.pending = p["round"] + 1, p["base"], None
            self._save()
            self.heartbeat("published", f"secure update r{p['round']} from v{p['base']}", round=p["round"],
                           base_version=p["base"], metrics=p["metrics"])
            return StepResult(Action.UPDATE, f"r{p['round']} from v{p['base']} summed securely")
        faults.point("site.before_publish")
        ref = self.bucket.put_blob_file(lambda sha, ext: layout.site_blob(self.name, sha, ext), p["path"])
        faults.point("site.after_upload")
        doc = UpdateManifest(site=self.name, round=p["round"], base_version=p["base"], blob=ref,
                             num_cases=self.work.num_cases, plans_digest=self.state.plans_digest, metrics=p["metrics"])
        self.bucket.publish(layout.site_update(self.name, p["round"]), doc, self.identity)
        drop_marker(self.fed.store, self.name, p["round"])
        self.state.updates_sent = p["round"] + 1
        self.state.last_base = p["base"]
        self.state.pending = None
        self._save()
        self.retention.published(p["path"])
        self.heartbeat("published", f"update r{p['round']} from v{p['base']}", round=p["round"],
                       base_version=p["base"], metrics=p["metrics"])
        return StepResult(Action.UPDATE, f"r{p['round']} from v{p['base']} published "
                                  + ", ".join(f"{k}={v:.4g}" for k, v in sorted(p["metrics"].items())))

    def _finish(self, version: int, manifest) -> StepResult:
        self._ensure_started()
        gpath = self._fetch_global(manifest)
        self.heartbeat("finishing", f"final global v{version}")
        summary = self.work.finish(gpath)
        self.state.finished, self.state.final_version, self.state.summary = True, version, summary
        self._save()
        self.heartbeat("done", f"finished with v{version}", metrics={k: float(v) for k, v in summary.items()
                                                                     if isinstance(v, (int, float))})
        return StepResult(Action.FINISHED, f"final global v{version} loaded; {summary}")
