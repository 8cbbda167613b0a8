"""Time stamps as the protocol writes them: UTC, ISO 8601, microseconds, a trailing ``Z``.

One format for every party (envelopes' ``signed_at``, rejection records, status), and one
parser, so a stamp written anywhere reads the same everywhere. Pure: no I/O.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

from ..errors import SchemaError

__all__ = ["STAMP_FORMAT", "format_stamp", "utcnow", "parse_stamp", "parse_stamp_or_none"]

STAMP_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def format_stamp(posix: float) -> str:
    """A POSIX time as a protocol stamp, e.g. ``2026-12-01T10:30:19.123456Z``."""
    return datetime.fromtimestamp(posix, timezone.utc).strftime(STAMP_FORMAT)


def utcnow() -> str:
    """Now, as a protocol stamp (read from ``time.time``, so a test may shift every party's clock)."""
    return format_stamp(time.time())


def parse_stamp(stamp: object, where: str = "time stamp") -> float:
    """A protocol stamp as a POSIX time; :class:`~fedfs.errors.SchemaError` naming ``where`` if it is not one."""
    if not isinstance(stamp, str):
        raise SchemaError(f"{where}: expected a time stamp string, got {type(stamp).__name__}")
    try:
        return datetime.strptime(stamp, STAMP_FORMAT).replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        raise SchemaError(f"{where}: {stamp[:40]!r} is not a UTC time stamp like 2026-01-31T12:00:00.000000Z") from None


def parse_stamp_or_none(stamp: object) -> float | None:
    """As :func:`parse_stamp`, None for anything that is not a stamp (for display code)."""
    try:
        return parse_stamp(stamp)
    except SchemaError:
        return None
