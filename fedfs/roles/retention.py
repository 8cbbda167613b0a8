"""Retention in the roles: delete what :mod:`fedfs.protocol.retention` says may go.

Only the writer of a file deletes it: the aggregator its payloads under ``aggregator/`` and
its workdir cache, each site its own update payloads and workdir copies. A deletion that
fails (no delete permission, storage trouble) is logged and never fails a step; what is
left is only disk, and the next prune tries again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from ..errors import FedfsError, NotFound
from ..protocol import layout
from ..protocol.retention import plan_aggregator_pruning, site_rounds_decided
from ..protocol.schema import FederationConfig, GlobalManifest, PlansDocument, UpdateManifest
from ..store import Store
from ..trust.bucket import Bucket

__all__ = ["AggregatorRetention", "SiteRetention"]

log = logging.getLogger("fedfs.roles.retention")


def _delete(store: Store, key: str, writer: tuple[str, str]) -> bool:
    """Delete ``key`` if ``writer`` wrote it; True when it is gone."""
    if layout.writer_of(key) != writer:  # never another party's file, whatever a manifest names
        return False
    try:
        store.delete(key)
    except NotFound:
        pass
    except FedfsError as exc:
        log.warning("retention: %s not removed (%s); it stays, which costs only disk", store.describe(key), exc)
        return False
    return True


def _unlink(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("retention: %s not removed (%s)", path, exc)


class AggregatorRetention:
    """After each published global: remove old global payloads, the cache copies and old outputs."""

    def __init__(self, config: FederationConfig, store: Store, cache: Path, work: Path) -> None:
        self.config, self.store, self.cache, self.work = config, store, cache, work
        self.marker = work / "retention.json"

    def _done(self) -> tuple[int, int]:
        try:
            d = json.loads(self.marker.read_text())
            return int(d["globals_below"]), int(d["updates_below"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0, 0

    def after_commit(self, latest: int, manifest, protected: set[str]) -> None:
        """Prune once ``latest`` is out; ``manifest(v)`` reads a verified global; ``protected``
        holds sha256s the aggregator still needs locally (sites' initial weights, pending updates)."""
        if self.config.keep_globals <= 0:
            return
        try:
            self._prune(latest, manifest, protected)
        except FedfsError as exc:  # the global is out; pruning is tried again after the next one
            log.warning("retention after v%d not done: %s", latest, exc)

    def _prune(self, latest: int, manifest, protected: set[str]) -> None:
        done = self._done()
        first = min(done)
        manifests: dict[int, GlobalManifest] = {}
        for v in range(first, latest + 1):
            manifests[v] = manifest(v).doc
        plan = plan_aggregator_pruning(self.config, manifests, latest, done)
        removed = [key for key in plan.bucket_keys if _delete(self.store, key, ("aggregator", ""))]
        for sha in set(plan.cache_sha256) - protected:
            for path in self.cache.glob(f"{sha}.*"):
                _unlink(path)
        out = self.work / "out"
        if out.is_dir():  # outputs of published globals: the cache holds what is still needed
            for d in out.iterdir():
                if d.name <= f"v{latest:06d}":
                    shutil.rmtree(d, ignore_errors=True)
        tmp = self.marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({"globals_below": plan.globals_below, "updates_below": plan.updates_below}))
        os.replace(tmp, self.marker)
        if removed:
            log.info("retention: removed %d payload(s) of globals older than the kept ones", len(removed))


class SiteRetention:
    """A site's pruning: its decided updates' payloads in the bucket, and its workdir copies."""

    def __init__(self, config: FederationConfig, bucket: Bucket, site: str, workdir: Path) -> None:
        self.config, self.bucket, self.site, self.dir = config, bucket, site, workdir
        self._below = 0  # rounds below this were pruned by this process (a restart looks again once)

    @property
    def on(self) -> bool:
        return self.config.keep_globals > 0

    def after_global(self, newest: GlobalManifest, updates_sent: int) -> None:
        """Remove the payloads of this site's updates decided before ``newest``."""
        below = min(site_rounds_decided(self.config, self.site, newest), updates_sent)
        if below <= self._below:
            return
        keep = {self._init_key()}
        for r in range(below, updates_sent):  # a later update with the same bytes shares the key
            keep.add(self._blob_key(r))
        for r in range(self._below, below):
            key = self._blob_key(r)
            if key and key not in keep:
                _delete(self.bucket.store, key, ("site", self.site))
        self._below = below

    def _init_key(self) -> str | None:
        """The site's initial weights (v0's payload): never removed."""
        try:
            init = self.bucket.read(layout.site_plans(self.site), PlansDocument).doc.init_blob
        except FedfsError:
            return None
        return init.key if init is not None else None

    def _blob_key(self, round_: int) -> str | None:
        try:
            return self.bucket.read(layout.site_update(self.site, round_), UpdateManifest).doc.blob.key
        except (NotFound, FedfsError):
            return None

    def keep_global(self, path: str) -> None:
        """Workdir: keep only the global just fetched (a restart trains from the newest one)."""
        if not self.on:
            return
        for p in (self.dir / "globals").glob("*.safetensors"):
            if str(p) != path:
                _unlink(p)

    def published(self, path: str) -> None:
        """Workdir: a published update's local file is needed by nothing (a restart republishes only
        an unpublished one)."""
        if self.on:
            _unlink(Path(path))
