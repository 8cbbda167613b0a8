"""Verified reads for the shells that show a federation (``fedfs status``, ``fedfs report``).

A file that does not verify must never stop a status table or a report: it is one
more row under *problems*. :class:`VerifiedReader` reads through the verified
bucket like any party and turns every failure but "not there" into such a row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import FedfsError, NotFound

if TYPE_CHECKING:
    from ..federation import Federation

__all__ = ["VerifiedReader"]

P = TypeVar("P")


class VerifiedReader:
    """Verified reads, listings and probes that record problems instead of raising."""

    def __init__(self, fed: Federation) -> None:
        self.fed = fed
        #: ``{"key", "error"}`` for every file (or listing) that did not verify or could not be read.
        self.problems: list[dict[str, str]] = []
        if fed.bucket.on_junk is None:  # junk skipped where a write-once manifest belongs is a problem too
            fed.bucket.on_junk = self.problem

    def problem(self, key: str, error: str) -> None:
        """Record a problem with ``key`` (also for checks of the caller's own)."""
        self.problems.append({"key": key, "error": error})

    def failed(self, key: str) -> bool:
        """Whether a read of ``key`` was recorded as a problem."""
        return any(p["key"] == key for p in self.problems)

    def read(self, key: str, cls: type) -> Any:
        """The verified document at ``key`` (a :class:`~fedfs.trust.bucket.Signed`), None if absent or bad."""
        try:
            return self.fed.bucket.read(key, cls)
        except NotFound:
            return None
        except FedfsError as exc:
            self.problem(key, str(exc))
            return None

    def list(self, prefix: str) -> list[str]:
        """The keys under ``prefix``; empty if there are none or the listing fails."""
        try:
            return self.fed.store.list(prefix)
        except NotFound:
            return []
        except FedfsError as exc:
            self.problem(prefix, str(exc))
            return []

    def exists(self, key: str) -> bool:
        """Whether ``key`` exists; False (and a problem) if the store cannot say."""
        try:
            return self.fed.store.exists(key)
        except FedfsError as exc:
            self.problem(key, str(exc))
            return False

    def rejections(self, key: str, by: str | None = None) -> list[dict[str, str]]:
        """The rejection records of the status document at ``key``, each with who rejected the file
        (``by``, else the document's signer); empty if it is absent or does not verify."""
        from ..protocol.schema import StatusDocument

        status = self.read(key, StatusDocument)
        if status is None:
            return []
        return [{"key": x.key, "reason": x.reason, "at": x.at, "by": by or status.signer} for x in status.doc.rejected]

    def documents(self, prefix: str, parse: Callable[[str], P | None], cls: type) -> Iterator[tuple[P, Any]]:
        """``(parse(key), signed)`` for each key under ``prefix`` that ``parse`` accepts and that verifies."""
        for key in self.list(prefix):
            parsed = parse(key)
            if parsed is None:
                continue
            signed = self.read(key, cls)
            if signed is not None:
                yield parsed, signed
