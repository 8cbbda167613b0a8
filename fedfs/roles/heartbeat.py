"""A party's heartbeat hint: written when its phase changes, refreshed while it lives.

A heartbeat is a signed mutable hint (``sites/<S>/heartbeat.json``, ``aggregator/heartbeat.json``)
that ``fedfs status`` and ``fedfs report`` read to tell a live party from a silent one: its
``signed_at`` is the party's last sign of life. :class:`HeartbeatWriter` writes one when the phase
or message changes and otherwise at most every :data:`HEARTBEAT_EVERY_S`; :meth:`HeartbeatWriter.alive`
keeps refreshing the last one from a thread for a daemon's whole life and during each step (an
nnU-Net round, the final validation, preprocessing, a cron step), so a party at work or waiting is
never mistaken for a dead one, whatever its poll interval, while a killed party's heartbeat ages and
is flagged (``fedfs.ops.status.SILENT_AFTER_S``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from ..protocol.schema import Heartbeat
from ..trust.bucket import Bucket
from ..trust.signing import Identity

__all__ = ["HEARTBEAT_EVERY_S", "HeartbeatWriter"]

log = logging.getLogger("fedfs.roles.heartbeat")

#: A party refreshes its heartbeat at most this often while nothing changes, and at least this
#: often while it runs a long step (seconds).
HEARTBEAT_EVERY_S = 60.0


class HeartbeatWriter:
    """Writes one party's heartbeat hint at ``key``; a failed write is logged, never raised."""

    def __init__(self, bucket: Bucket, key: str, identity: Identity, *, every_s: float = HEARTBEAT_EVERY_S) -> None:
        self.bucket, self.key, self.identity, self.every_s = bucket, key, identity, every_s
        self._last: tuple[str, str, dict[str, Any]] | None = None
        self._last_t = 0.0
        self._lock = threading.Lock()
        self._alive = 0  # nesting depth of alive(): one refreshing thread however deep

    def beat(self, phase: str, message: str = "", *, force: bool = False, **kw: Any) -> None:
        """Write the heartbeat when the phase or message changes (or ``force``), else at most every ``every_s``."""
        with self._lock:
            now = time.monotonic()
            same = self._last is not None and self._last[:2] == (phase, message)
            if same and not force and now - self._last_t < self.every_s:
                return
            self._last, self._last_t = (phase, message, kw), now
        try:
            doc = Heartbeat(party=self.identity.name, phase=phase, message=message, **kw)
            self.bucket.write_mutable(self.key, doc, self.identity)
        except Exception as exc:  # noqa: BLE001 - a heartbeat is a hint, never a reason to fail a step
            log.warning("heartbeat not written: %s", exc)

    def refresh(self) -> None:
        """Write the last heartbeat again (a sign of life with nothing new to say)."""
        if self._last is not None:
            phase, message, kw = self._last
            self.beat(phase, message, force=True, **kw)

    @contextlib.contextmanager
    def alive(self) -> Iterator[None]:
        """Refresh the heartbeat every ``every_s`` from a thread while the body runs (a daemon's whole
        life, or one long step); nested uses share the outer one's thread."""
        self._alive += 1
        if self._alive > 1:
            try:
                yield
            finally:
                self._alive -= 1
            return
        done = threading.Event()

        def loop() -> None:
            while not done.wait(self.every_s):
                self.refresh()

        thread = threading.Thread(target=loop, name=f"heartbeat-{self.identity.name}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            self._alive -= 1
            done.set()
            thread.join(timeout=5)
