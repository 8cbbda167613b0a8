"""What one role step did: :class:`StepResult`, with an :class:`Action` that knows its kind.

Every step of a site or of the aggregator returns a ``StepResult``. The loop that
drives the roles (:func:`fedfs.roles.loop.run_loop`) reads only the action's kind:
*terminal* (the role has nothing more to do), *idle* (nothing due now: sleep until the
bucket changes), *blocked* (a file or setting needs a person: a daemon keeps polling, a
cron step exits with :class:`fedfs.errors.Blocked`'s code), or progress (step again).

``Action`` is a ``str`` enum, so ``result.action == "wait"`` and ``str(result)``
("action: detail") read as they did when actions were plain strings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

__all__ = ["Action", "StepResult"]


class Action(str, Enum):
    """What a step did. Set-up and round actions are progress; the other four end a cron step."""

    CENSUS = "census"  # a site's case count, or the aggregator's merged census, published
    FINGERPRINT = "fingerprint"  # a site's FFE summary, or the merged fingerprint, published
    PLANNED = "planned"  # a site planned, preprocessed and published its plans and initial weights
    V0 = "v0"  # the aggregator published the initial global
    UPDATE = "update"  # a site trained a round and published its update
    AGGREGATED = "aggregated"  # the aggregator published the next global
    WAIT = "wait"  # nothing due now
    BLOCKED = "blocked"  # cannot go on until a person acts (the detail says why)
    FINISHED = "finished"  # the final global is out (aggregator) or loaded (site)
    DONE = "done"  # a site that finished before: nothing more to do

    def __str__(self) -> str:
        return self.value

    @property
    def terminal(self) -> bool:
        """The role has nothing more to do, ever."""
        return self in (Action.DONE, Action.FINISHED)

    @property
    def idle(self) -> bool:
        """Nothing is due until another party writes something."""
        return self is Action.WAIT

    @property
    def blocked(self) -> bool:
        """Nothing is due until a person acts."""
        return self is Action.BLOCKED

    @property
    def settled(self) -> bool:
        """Stepping again now would not get further: terminal, idle or blocked (where a cron step ends)."""
        return self.terminal or self.idle or self.blocked


@dataclass
class StepResult:
    """One step's outcome: the action, a line of detail, the global version it concerns, extras."""

    action: Action
    detail: str = ""
    version: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.action = Action(self.action)

    def __str__(self) -> str:
        return f"{self.action}: {self.detail}" if self.detail else str(self.action)
