"""The aggregator's audit of its own published payloads: an overwritten global is restored.

Write-once is a rule for honest parties; a party with write access to ``aggregator/`` can
still rewrite a global's payload in place. Every site would then fail verification at every
poll, forever. The aggregator keeps a verified copy of each payload it published (its cache),
so its audit compares the newest global's payloads with those copies and, where the bucket's
bytes no longer match, uploads the copy again (the key is the aggregator's own; the content is
the one the signed manifest names, so nothing write-once changes).

Cost: a size probe per payload at every ``check_every_s``, and a full hash of each (one
download) every ``hash_every_s``; both constant in history (only the newest global counts,
as every site trains from it).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import FedfsError, NotFound
from ..protocol.schema import BlobRef, GlobalManifest
from ..store import Store, sha256_file
from .quarantine import Quarantine

__all__ = ["PayloadAudit"]

log = logging.getLogger("fedfs.roles.audit")


class PayloadAudit:
    """Checks the newest global's payloads against the aggregator's cached copies, and restores them."""

    def __init__(self, store: Store, cache: Path, quarantine: Quarantine, *, check_every_s: float = 60.0,
                 hash_every_s: float = 900.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.cache = cache
        self.quarantine = quarantine
        self.check_every_s, self.hash_every_s = check_every_s, hash_every_s
        self.clock = clock
        self._checked: dict[str, float] = {}  # payload key -> when its size was last checked
        self._hashed: dict[str, float] = {}  # payload key -> when its bytes were last hashed

    def run(self, manifest: GlobalManifest, *, force: bool = False) -> list[str]:
        """Audit ``manifest``'s payloads that are due (all with ``force``); return the keys restored."""
        restored = []
        now = self.clock()
        refs = {r.key: r for r in [manifest.blob, *manifest.site_blobs.values()] if r is not None}
        for key, ref in sorted(refs.items()):
            size_due = force or now - self._checked.get(key, -1e18) >= self.check_every_s
            hash_due = force or now - self._hashed.get(key, -1e18) >= self.hash_every_s
            if not (size_due or hash_due):
                continue
            try:
                if self._intact(ref, full=hash_due):
                    continue
                if self._restore(ref):
                    restored.append(key)
            except FedfsError as exc:  # storage trouble: try again at the next audit
                log.warning("audit of %s not done: %s", self.store.describe(key), exc)
                continue
            finally:
                self._checked[key] = now
                if hash_due:
                    self._hashed[key] = now
        return restored

    def _intact(self, ref: BlobRef, *, full: bool) -> bool:
        try:
            if self.store.size(ref.key) != ref.size:
                return False
        except NotFound:
            return False
        if not full:
            return True
        with tempfile.TemporaryDirectory(prefix="fedfs-audit-") as tmp:
            path = str(Path(tmp) / "payload")
            try:
                return self.store.download(ref.key, path) == ref.sha256
            except NotFound:
                return False

    def _restore(self, ref: BlobRef) -> bool:
        """Upload the cached copy of ``ref`` (verified again first); False if there is none."""
        cached = self.cache / f"{ref.sha256}{Path(ref.key).suffix}"
        if not cached.exists() or sha256_file(str(cached)) != ref.sha256:
            log.error("%s no longer matches its manifest and this aggregator holds no copy to restore it from",
                      self.store.describe(ref.key))
            self.quarantine.reject(ref.key, "payload altered in the bucket; no local copy to restore it from")
            return False
        self.store.upload(ref.key, str(cached))
        log.warning("restored %s: its bytes no longer matched the manifest (overwritten in the bucket)",
                    self.store.describe(ref.key))
        self.quarantine.reject(ref.key, f"payload altered in the bucket (sha256 no longer {ref.sha256[:12]}); "
                                        "restored from the aggregator's copy")
        return True
