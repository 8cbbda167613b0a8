"""A party's quarantine: the bucket files it refused and why, in its signed status document.

Protocol invariant 8: a file can cost a rejection, never a party. Whatever a reader
refuses is recorded here (key, reason, when) and the party keeps stepping. The record
is a hint (``sites/<S>/status.json``, ``aggregator/status.json``), rewritten whole by
:meth:`Quarantine.flush` when it changed; writing it is best effort, the refusal itself
stands. Both roles use this one type: the aggregator also reads it back after a restart,
so an update it rejected before is not downloaded and judged again.

The status document is overwritable and keeps the newest :data:`MAX_RECORDS`, so it is not
the party's memory. That is ``rejections.jsonl`` in the party's workdir: one line per
rejection (or resolution), appended and flushed as it happens, read back at start (a torn
last line is skipped). It also remembers which slot candidates were junk (files that did
not verify where a write-once manifest belongs), which the party's bucket then skips without
a request.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

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
                 logger: logging.Logger = log, journal: str | os.PathLike[str] | None = None) -> None:
        self.bucket = bucket
        self.status_key = status_key
        self.identity = identity
        self.log = logger
        self.journal = Path(journal) if journal is not None else None
        self._resolved: set[str] = set()  # keys resolved by this run (not adopted back from the status)
        self._records: dict[str, Rejection] = self._load()
        self._dirty = self._pending_write
        for key, reason in self._junk_keys.items():
            bucket.junk.setdefault(key, reason)
        bucket.on_junk = self._junk

    def _load(self) -> dict[str, Rejection]:
        """The records of an earlier run: the status document's, then the local journal's."""
        records: dict[str, Rejection] = {}
        try:
            records = {r.key: r for r in self.bucket.read(self.status_key, StatusDocument).doc.rejected}
        except FedfsError:
            pass
        in_status = set(records)
        self._junk_keys: dict[str, str] = {}
        for entry in self._journal_lines():
            key = entry["key"]
            if entry.get("resolved"):
                records.pop(key, None)
                continue
            records[key] = Rejection(key=key, reason=str(entry.get("reason", "")), at=str(entry.get("at", "")),
                                     sites=[str(s) for s in entry.get("sites", []) if isinstance(s, str)])
            if entry.get("junk"):
                self._junk_keys[key] = records[key].reason
        # journalled but not in the status (its write failed, or the party died first): write it at the next flush
        self._pending_write = bool(set(records) - in_status)
        return records

    def _journal_lines(self) -> list[dict]:
        if self.journal is None or not self.journal.exists():
            return []
        out = []
        with open(self.journal, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except ValueError:  # a line torn by a crash, or damaged: the others stand
                    continue
                if isinstance(entry, dict) and isinstance(entry.get("key"), str):
                    out.append(entry)
        return out

    def _append(self, entry: dict) -> None:
        if self.journal is None:
            return
        try:
            self.journal.parent.mkdir(parents=True, exist_ok=True)
            with open(self.journal, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:  # the refusal stands; only the memory of it is lost
            self.log.warning("rejection not journalled in %s: %s", self.journal, exc)

    def _junk(self, key: str, reason: str) -> None:
        """The bucket found junk where a write-once manifest belongs: record it, remember it is junk."""
        if self.reject(key, f"not a valid document, skipped: {reason}", _junk=True):
            self.flush()

    def __contains__(self, key: str) -> bool:
        return key in self._records

    def reason(self, key: str) -> str | None:
        """Why ``key`` was refused, or None if it was not."""
        record = self._records.get(key)
        return None if record is None else record.reason

    def reject(self, key: str, reason: str, sites: tuple[str, ...] | list[str] = (), *, _junk: bool = False) -> bool:
        """Record that ``key`` is refused for ``reason`` (``sites``: whose files cause it, so their
        steps report "blocked" too); False if exactly that is recorded already."""
        if self.reason(key) == reason:
            return False
        self.log.warning("rejected %s: %s", key, reason)
        record = Rejection(key=key, reason=reason, at=utcnow(), sites=sorted(sites))
        self._records[key] = record
        self._append({"key": key, "reason": reason, "at": record.at, "sites": record.sites, "junk": _junk})
        self._dirty = True
        return True

    def resolve(self, prefix: str) -> None:
        """Drop the records whose key starts with ``prefix`` (problems fixed since)."""
        gone = [k for k in self._records if k.startswith(prefix)]
        for k in gone:
            del self._records[k]
            self._resolved.add(k)
            self._append({"key": k, "resolved": True})
        self._dirty = self._dirty or bool(gone)

    def _adopt_others(self) -> None:
        """Keep what another run of this party (a second aggregator with the same key) recorded in the
        status document since we read it: it is rewritten whole, so a blind write would drop those."""
        try:
            theirs = self.bucket.read(self.status_key, StatusDocument)
        except FedfsError:
            return
        if theirs.signer != self.identity.name:
            return
        for r in theirs.doc.rejected:
            if r.key not in self._records and r.key not in self._resolved:
                self._records[r.key] = r

    def records(self) -> list[Rejection]:
        """The newest :data:`MAX_RECORDS` records, oldest first."""
        return sorted(self._records.values(), key=lambda r: (r.at, r.key))[-MAX_RECORDS:]

    def flush(self) -> None:
        """Rewrite the status document if a record changed since the last flush."""
        if not self._dirty:
            return
        self._adopt_others()
        doc = StatusDocument(party=self.identity.name, rejected=self.records())
        try:
            self.bucket.write_mutable(self.status_key, doc, self.identity)
        except Exception as exc:  # noqa: BLE001 - the record is best effort; the refusal itself stands
            self.log.warning("status not written (will retry): %s", exc)
            return
        self._dirty = False
