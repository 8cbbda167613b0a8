"""Named fault-injection points, for crash-safety tests, ``benchmarks/faults.py`` and the simulator.

``FEDFS_FAULTS="aggregator.before_manifest"`` (comma-separated names, each
optionally ``name@N`` to fire on the N-th time the point is reached) makes the
process die at that point with ``os._exit(137)``, as ``kill -9`` would: no
``finally`` blocks, no flushing. Unset, a point costs one dictionary lookup.

In one process, :func:`set_hook` installs a callable that every point calls with its
name (the deterministic simulator, :mod:`fedfs.testing.sim`, raises its crash from
there); it replaces nothing else, and ``set_hook(None)`` removes it.

Points: ``aggregator.before_manifest`` (payload uploaded, manifest not yet
published), ``aggregator.after_manifest`` (before the latest hint),
``site.before_publish`` (update recorded locally, not yet uploaded),
``site.after_upload`` (payload uploaded, manifest not yet published),
``site.mid_training`` (before a round's training returns).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

__all__ = ["POINTS", "point", "set_hook"]

#: Every named point (the simulator checks it reached each).
POINTS = ("aggregator.before_manifest", "aggregator.after_manifest", "site.before_publish", "site.after_upload",
          "site.mid_training")

_counts: dict[str, int] = {}
_hook: Callable[[str], None] | None = None


def set_hook(hook: Callable[[str], None] | None) -> Callable[[str], None] | None:
    """Call ``hook(name)`` at every point from now on (None: no hook); returns the previous hook."""
    global _hook
    previous, _hook = _hook, hook
    return previous


def _armed() -> dict[str, int]:
    spec = os.environ.get("FEDFS_FAULTS", "")
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, nth = item.partition("@")
        out[name] = int(nth) if nth else 1
    return out


def point(name: str) -> None:
    """Call the in-process hook, if set; then die here, like kill -9, if ``name`` is armed in
    ``FEDFS_FAULTS`` for this occurrence."""
    if _hook is not None:
        _hook(name)
    if "FEDFS_FAULTS" not in os.environ:
        return
    armed = _armed()
    if name not in armed:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == armed[name]:
        sys.stderr.write(f"fedfs: fault injected at {name}\n")
        sys.stderr.flush()
        os._exit(137)
