"""Named fault-injection points, for crash-safety tests and ``benchmarks/faults.py``.

``FEDFS_FAULTS="aggregator.before_manifest"`` (comma-separated names, each
optionally ``name@N`` to fire on the N-th time the point is reached) makes the
process die at that point with ``os._exit(137)``, as ``kill -9`` would: no
``finally`` blocks, no flushing. Unset, a point costs one dictionary lookup.

Points: ``aggregator.before_manifest`` (payload uploaded, manifest not yet
published), ``aggregator.after_manifest`` (before the latest hint),
``site.before_publish`` (update recorded locally, not yet uploaded),
``site.after_upload`` (payload uploaded, manifest not yet published),
``site.mid_training`` (before a round's training returns).
"""

from __future__ import annotations

import os
import sys

_counts: dict[str, int] = {}


def _armed() -> dict[str, int]:
    spec = os.environ.get("FEDFS_FAULTS", "")
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, nth = item.partition("@")
        out[name] = int(nth) if nth else 1
    return out


def point(name: str) -> None:
    """Die here, like kill -9, if ``name`` is armed in ``FEDFS_FAULTS`` for this occurrence."""
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
