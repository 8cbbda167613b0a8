"""When to step again: file-system events on local folders, constant-cost polling elsewhere.

A :class:`Trigger` is woken by "something may have changed" and otherwise
times out after ``poll_interval``. Local folders use watchdog's inotify
observer; network mounts (NFS, CIFS/SMB, sshfs...), where inotify does not see
other machines' writes, use polling (as watchdog's own README advises), and so
do ``s3://`` and ``smb://``. A poll is one role step, whose reads do not grow
with the number of rounds (the ``latest`` hint plus direct probes of the next
expected files). The loop that steps a role and waits on a trigger is
:func:`fedfs.roles.loop.run_loop`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

from . import Store

log = logging.getLogger("fedfs.store.watch")


class _ShutdownRace(logging.Filter):
    """Drops watchdog's ERROR "queue_events() called when the thread is inactive": its emitter
    thread reading one last event while ``stop`` tears it down, after every clean finish."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in str(record.msg)


def _quiet_watchdog() -> None:
    """Silence watchdog's two harmless noises (watchdog 6-7), once per process: the shutdown race
    above, and a RuntimeWarning "Callback with id ... already exists" when a folder appears while
    the recursive watch is being set up (a site's first files), whose text embeds the repr of the
    whole watch tree (several kB per folder)."""
    inotify_log = logging.getLogger("watchdog.observers.inotify")
    if not any(isinstance(f, _ShutdownRace) for f in inotify_log.filters):
        inotify_log.addFilter(_ShutdownRace())
    warnings.filterwarnings("ignore", message="Callback with id", category=RuntimeWarning, module=r"watchdog\.")

NETWORK_FS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "fuse.sshfs", "9p", "afs", "ceph", "glusterfs",
              "fuse.glusterfs", "lustre", "gpfs", "beegfs", "fuse.s3fs", "fuse.rclone", "fuse.gcsfuse"}


def mount_type(path: str) -> str:
    """The file-system type of the mount holding ``path`` (Linux /proc/mounts; '' elsewhere)."""
    try:
        with open("/proc/mounts") as fh:
            mounts = [line.split()[1:3] for line in fh if len(line.split()) >= 3]
    except OSError:
        return ""
    path = os.path.realpath(path)
    best, kind = "", ""
    for mnt, fstype in mounts:
        mnt = mnt.replace("\\040", " ")
        if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, kind = mnt, fstype
    return kind


class Trigger:
    """Polling: wake on the next multiple of ``poll_interval`` of the wall clock (or when
    :meth:`poke` is called).

    Polls fall on a shared grid (Unix time divisible by the interval) rather than one
    interval after each party's last step. With clocks kept by NTP, every party polls at
    the same instants, so a global the aggregator publishes within an interval of seeing
    the last update reaches every site at the next tick: one interval plus the work,
    instead of the aggregator's wait plus each site's own phase, which in synchronous
    rounds tends to lock just behind the aggregator's publication. A skewed clock only
    shifts that party's phase: it polls as often as before.
    """

    kind = "poll"

    def __init__(self, poll_interval: float, *, clock: Callable[[], float] = time.time) -> None:
        self.poll_interval = poll_interval
        self._clock = clock
        self._event = threading.Event()

    def next_delay(self) -> float:
        """Seconds to the next tick of the grid."""
        if self.poll_interval <= 0:
            return 0.0
        return max(0.001, self.poll_interval - self._clock() % self.poll_interval)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until poked or ``timeout`` (default: the next tick); True if poked."""
        fired = self._event.wait(self.next_delay() if timeout is None else timeout)
        self._event.clear()
        return fired

    def poke(self) -> None:
        self._event.set()

    def close(self) -> None:
        pass


class InotifyTrigger(Trigger):
    """Wake on any file created or moved into the bucket folder (watchdog), with a polling fallback.

    ``poll_interval`` is the safety net between events. If watchdog's threads die (an
    exception inside the observer, e.g. a clock stepped under it), the trigger says so
    once and polls every ``fallback_interval`` instead, so the role keeps its pace
    rather than waiting out the safety net each time."""

    kind = "inotify"

    def __init__(self, root: str, poll_interval: float, fallback_interval: float | None = None) -> None:
        super().__init__(poll_interval)
        self.fallback_interval = poll_interval if fallback_interval is None else fallback_interval
        self.degraded = False
        _quiet_watchdog()
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        trigger = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                # a file landing is the news; its folder's "modified" event and .tmp files are not
                if event.event_type in ("created", "moved", "modified", "closed") and not event.is_directory:
                    name = os.path.basename(getattr(event, "dest_path", "") or event.src_path)
                    if not name.endswith(".tmp"):
                        trigger.poke()

        self._observer = Observer()
        self._observer.schedule(Handler(), root, recursive=True)
        self._observer.daemon = True
        self._observer.start()

    def watching(self) -> bool:
        """True while the observer and every emitter thread are alive."""
        return self._observer.is_alive() and all(e.is_alive() for e in self._observer.emitters)

    def wait(self, timeout: float | None = None) -> bool:
        """As :meth:`Trigger.wait`; the watcher's health is checked every ``fallback_interval``
        meanwhile (thread liveness, no I/O), so a watcher dying mid-wait costs one interval."""
        if self.degraded:
            return super().wait(timeout)
        deadline = time.monotonic() + (self.next_delay() if timeout is None else timeout)
        while self.watching():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self._event.wait(min(left, max(0.05, self.fallback_interval))):
                self._event.clear()
                return True
        self.degraded = True
        self.poll_interval = self.fallback_interval
        log.warning("file-system events stopped (the watcher thread died); polling every %.1f s",
                    self.poll_interval)
        fired = self._event.is_set()
        self._event.clear()
        return fired

    def close(self) -> None:
        self._observer.stop()
        self._observer.join(timeout=5)


def make_trigger(store: Store, *, watch: str = "auto", poll_interval: float = 5.0) -> Trigger:
    """``watch``: "auto" (inotify on local disks, polling on network mounts and remote stores),
    "inotify" or "poll"."""
    root = getattr(store, "local_path", None)
    if watch == "poll" or root is None:
        return Trigger(poll_interval)
    fstype = mount_type(root)
    if watch == "auto" and fstype in NETWORK_FS:
        log.info("%s is on a %s mount: polling every %.1f s (inotify misses other machines' writes)",
                 root, fstype, poll_interval)
        return Trigger(poll_interval)
    try:
        # on a local disk, events are the trigger; the timeout is only a safety net
        return InotifyTrigger(root, max(poll_interval, 30.0) if watch == "auto" else poll_interval, poll_interval)
    except Exception as exc:  # noqa: BLE001 - inotify limits, unsupported platform
        log.warning("file-system events unavailable (%s); polling every %.1f s", exc, poll_interval)
        return Trigger(poll_interval)

