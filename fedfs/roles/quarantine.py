"""A party's quarantine: the bucket files it refused and why, in its signed status document.

Protocol invariant 8: a file can cost a rejection, never a party. Whatever a reader
refuses is recorded here (key, reason, when) and the party keeps stepping. The record
is a hint (``sites/<S>/status.json``, ``aggregator/status.json``), rewritten whole by
:meth:`Quarantine.flush` when it changed; writing it is best effort, the refusal itself
stands. Both roles use this one type: the aggregator also reads it back after a restart,
so an update it rejected before is not downloaded and judged again.
"""

from __future__ import annotations

import logging

from ..errors import FedfsError
from ..protocol.schema import Rejection, StatusDocument
from ..protocol.timestamps import utcnow
from ..trust.bucket import Bucket
from ..trust.signing import Identity

__all__ = ["MAX_RECORDS", "Quarantine"]

log = logging.getLogger("fedfs.roles.quarantine")

#: Records a status document keeps; a flood of rejections evicts the oldest, not other files' recent ones.
MAX_RECORDS = 500


class Quarantine:
    """The rejections of one party, kept in the status document at ``status_key``; ``logger``
    (the role's own) says each new one."""

    def __init__(self, bucket: Bucket, status_key: str, identity: Identity, *,
                 logger: logging.Logger = log) -> None:
        self.bucket = bucket
        self.status_key = status_key
        self.identity = identity
        self.log = logger
        self._records: dict[str, Rejection] = self._load()
        self._dirty = False

    def _load(self) -> dict[str, Rejection]:
        """The records of an earlier run (none if the document is missing or does not verify)."""
        try:
            doc = self.bucket.read(self.status_key, StatusDocument).doc
        except FedfsError:
            return {}
        return {r.key: r for r in doc.rejected}

    def __contains__(self, key: str) -> bool:
        return key in self._records

    def reason(self, key: str) -> str | None:
        """Why ``key`` was refused, or None if it was not."""
        record = self._records.get(key)
        return None if record is None else record.reason

    def reject(self, key: str, reason: str, sites: tuple[str, ...] | list[str] = ()) -> bool:
        """Record that ``key`` is refused for ``reason`` (``sites``: whose files cause it, so their
        steps report "blocked" too); False if exactly that is recorded already."""
        if self.reason(key) == reason:
            return False
        self.log.warning("rejected %s: %s", key, reason)
        self._records[key] = Rejection(key=key, reason=reason, at=utcnow(), sites=sorted(sites))
        self._dirty = True
        return True

    def resolve(self, prefix: str) -> None:
        """Drop the records whose key starts with ``prefix`` (problems fixed since)."""
        gone = [k for k in self._records if k.startswith(prefix)]
        for k in gone:
            del self._records[k]
        self._dirty = self._dirty or bool(gone)

    def records(self) -> list[Rejection]:
        """The newest :data:`MAX_RECORDS` records, oldest first."""
        return sorted(self._records.values(), key=lambda r: (r.at, r.key))[-MAX_RECORDS:]

    def flush(self) -> None:
        """Rewrite the status document if a record changed since the last flush."""
        if not self._dirty:
            return
        doc = StatusDocument(party=self.identity.name, rejected=self.records())
        try:
            self.bucket.write_mutable(self.status_key, doc, self.identity)
        except Exception as exc:  # noqa: BLE001 - the record is best effort; the refusal itself stands
            self.log.warning("status not written (will retry): %s", exc)
            return
        self._dirty = False
