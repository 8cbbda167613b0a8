"""The one loop that drives every role: daemons, cron steps, the toy party.

:func:`run_loop` calls a role's ``step`` until a result says to stop. With a
:class:`~fedfs.store.watch.Trigger` it is a daemon: after an idle or blocked result it
sleeps until the bucket changes (or the next poll), and storage trouble that a retry may
cure is logged and retried. Without one it is a cron step: everything due now, then
return at the first idle, blocked or terminal result, letting errors propagate.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ..errors import StateUnknown, StoreUnavailable
from ..store import Store
from ..store.watch import Trigger, make_trigger
from .steps import Action, StepResult

__all__ = ["OUTAGE_LOG_EVERY_S", "Outage", "run_loop", "run_role"]

log = logging.getLogger("fedfs.roles.loop")

#: During a storage outage a daemon says "still unreachable" this often (seconds).
OUTAGE_LOG_EVERY_S = 60.0

Step = Callable[[], "StepResult | None"]


def _terminal(result: StepResult) -> bool:
    return result.action.terminal


class Outage:
    """Logs a storage outage at its first failure, then every ``every_s``, and once when it ends
    (a warning per poll would flood the log; silence would hide that the daemon is stuck)."""

    def __init__(self, every_s: float = OUTAGE_LOG_EVERY_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s, self.clock = every_s, clock
        self.since: float | None = None
        self._logged = 0.0

    def failed(self, exc: BaseException) -> None:
        now = self.clock()
        if self.since is None:
            self.since = self._logged = now
            log.warning("storage unreachable, retrying: %s", exc)
        elif now - self._logged >= self.every_s:
            self._logged = now
            log.warning("storage still unreachable (%.0f s): %s", now - self.since, exc)

    def recovered(self) -> None:
        if self.since is not None:
            log.warning("storage reachable again after %.0f s", self.clock() - self.since)
            self.since = None


def run_loop(step: Step, trigger: Trigger | None = None, *, until: Callable[[StepResult], bool] | None = None,
             stop: threading.Event | None = None, on_result: Callable[[StepResult], None] | None = None,
             max_idle_s: float | None = None) -> StepResult | None:
    """Call ``step`` until ``until(result)`` (default: the action is terminal); return the last result.

    With ``trigger`` (a daemon), an idle or blocked result sleeps on it, and errors from a
    step that a retry may cure (storage unavailable, state unknown) are logged and retried
    after a wait; ``max_idle_s`` raises TimeoutError after that long without progress.
    Without ``trigger`` (a cron step), the loop also returns at the first idle or blocked
    result, and every error propagates. A step that returns None counts as idle.
    """
    until = until or _terminal
    stop = stop or threading.Event()
    idle_since = time.monotonic()
    outage = Outage()
    result = None
    while not stop.is_set():
        try:
            result = step()
        except (StoreUnavailable, StateUnknown) as exc:
            if trigger is None:
                raise
            outage.failed(exc)
            trigger.wait()
            continue
        outage.recovered()
        if result is not None:
            if on_result is not None:
                on_result(result)
            if until(result):
                return result
        action = Action.WAIT if result is None else result.action
        if not (action.idle or action.blocked):
            idle_since = time.monotonic()
            continue
        if trigger is None:
            return result
        if max_idle_s is not None and time.monotonic() - idle_since > max_idle_s:
            raise TimeoutError(f"nothing happened for {max_idle_s:.0f} s (last: {result})")
        trigger.wait()
    return result


def run_role(step: Step, store: Store, *, watch: str = "auto", poll_interval: float = 5.0,
             stop: threading.Event | None = None, on_result: Callable[[StepResult], None] | None = None,
             max_idle_s: float | None = None) -> StepResult | None:
    """A role's daemon: :func:`run_loop` on the trigger :func:`~fedfs.store.watch.make_trigger` picks for ``store``."""
    trigger = make_trigger(store, watch=watch, poll_interval=poll_interval)
    try:
        return run_loop(step, trigger, stop=stop, on_result=on_result, max_idle_s=max_idle_s)
    finally:
        trigger.close()
