"""The ``fedfs`` command: thin click commands over :mod:`fedfs.ops` and :mod:`fedfs.roles`."""

from __future__ import annotations

from .app import main, run

__all__ = ["main", "run"]
