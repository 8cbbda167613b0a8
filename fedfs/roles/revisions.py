"""Superseding set-up documents: the newest revision of a census or fingerprint, at constant cost.

Before training starts a site may supersede its census and fingerprint summary, and the
aggregator its merged census and fingerprint (docs/protocol.md, "Recoverable set-up").
Every revision is its own write-once key (``census.json``, ``census-1.json``, ...), so
nothing is ever overwritten: the newest revision that verifies wins. :class:`Revisions`
finds it by probing forward from the newest one seen before (one probe when nothing
changed), and keeps each verified document, since a published key never changes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import NotFound, ValidationError
from ..protocol import layout
from ..trust.bucket import Bucket, Signed
from .quarantine import Quarantine

__all__ = ["Revisions"]


class Revisions:
    """The newest revision of each superseding document family a party reads.

    With a ``quarantine`` (the aggregator) a revision that fails verification is recorded there
    and reads as absent; without one (a site) the ValidationError propagates to the step."""

    def __init__(self, bucket: Bucket, quarantine: Quarantine | None = None) -> None:
        self.bucket = bucket
        self.quarantine = quarantine
        self._newest: dict[str, int | None] = {}
        self._docs: dict[str, Signed[Any]] = {}

    def newest(self, key_of: Callable[[int], str]) -> int | None:
        """The newest published revision number of ``key_of``'s family (None: none yet)."""
        family = key_of(0)
        n = layout.newest_revision(key_of, self._newest.get(family), self.bucket.store.exists)
        self._newest[family] = n
        return n

    def next(self, key_of: Callable[[int], str]) -> int:
        """The revision number to publish next: after the newest one, valid or not (keys are write-once)."""
        newest = self.newest(key_of)
        return 0 if newest is None else newest + 1

    def latest(self, key_of: Callable[[int], str], cls: type) -> Signed[Any] | None:
        """The newest revision that verifies (its ``revision`` field must match its key); None if none.
        A revision that does not verify is quarantined and the one before it is tried."""
        newest = self.newest(key_of)
        for n in range(-1 if newest is None else newest, -1, -1):
            signed = self._verified(key_of(n), n, cls)
            if signed is not None:
                return signed
        return None

    def _verified(self, key: str, n: int, cls: type) -> Signed[Any] | None:
        if key not in self._docs:
            if self.quarantine is not None and key in self.quarantine:
                return None
            try:
                signed = self.bucket.read(key, cls)
                if signed.doc.revision != n:
                    raise ValidationError(f"{self.bucket.store.describe(key)}: says revision {signed.doc.revision}, "
                                          f"its key is revision {n}", key=key)
            except NotFound:
                return None
            except ValidationError as exc:
                if self.quarantine is None:
                    raise
                self.quarantine.reject(key, str(exc))
                return None
            self._docs[key] = signed
        return self._docs[key]

    @staticmethod
    def sources(doc: Any, sites: list[str]) -> dict[str, int]:
        """Which revision of each site's document a merged one was made from (revision 0 for a
        document written before revisions existed)."""
        return dict(doc.sources) if doc.sources else {s: 0 for s in sites}
