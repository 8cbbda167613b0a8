"""When a role steps again: the one loop (daemon and cron step), inotify events on a local
folder, and polling when the watcher dies."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from fedfs.errors import StoreUnavailable
from fedfs.roles.loop import run_loop
from fedfs.roles.steps import Action, StepResult
from fedfs.store import open_store
from fedfs.store.watch import InotifyTrigger, Trigger, make_trigger


class Script:
    """A role whose steps return (or raise) the given outcomes in turn, recording how often it was stepped."""

    def __init__(self, *outcomes):
        self.outcomes = list(outcomes)
        self.calls = 0

    def step(self):
        self.calls += 1
        out = self.outcomes.pop(0)
        if isinstance(out, Exception):
            raise out
        return None if out is None else StepResult(out, f"step {self.calls}")


class CountingTrigger:
    """A trigger that never sleeps and counts the waits."""

    kind = "test"

    def __init__(self):
        self.waits = 0

    def wait(self, timeout=None):
        self.waits += 1
        return False


def test_action_kinds():
    assert [a.value for a in Action if a.terminal] == ["finished", "done"]
    assert [a for a in Action if a.idle] == [Action.WAIT] and [a for a in Action if a.blocked] == [Action.BLOCKED]
    assert {a.value for a in Action if a.settled} == {"wait", "blocked", "finished", "done"}
    # the action is a str: old comparisons and the printed form are unchanged
    r = StepResult("wait", "waiting for site census")
    assert r.action is Action.WAIT and r.action == "wait" and r.action in ("wait", "done")
    assert str(r) == "wait: waiting for site census" and str(StepResult(Action.V0)) == "v0"
    with pytest.raises(ValueError):
        StepResult("dance")


@pytest.mark.parametrize("last", ["wait", "blocked", "finished", "done"])
def test_a_cron_step_does_everything_due_then_returns_at_the_first_settled_result(last):
    # Prepare: progress twice, then a settled result, then more that must not run
    role = Script("planned", "update", last, "update")
    seen = []
    # Execute: the loop without a trigger
    result = run_loop(role.step, on_result=seen.append)
    # Assert
    assert result.action == last and role.calls == 3
    assert [str(r.action) for r in seen] == ["planned", "update", last]


def test_a_cron_step_stops_where_until_says_and_lets_storage_errors_through():
    role = Script("census", "planned", "update")
    assert run_loop(role.step, until=lambda r: r.action not in ("census", "fingerprint")).action == "planned"
    assert run_loop(Script(None).step) is None  # a step with nothing to report counts as idle
    with pytest.raises(StoreUnavailable):
        run_loop(Script(StoreUnavailable("bucket down")).step)


def test_a_daemon_waits_on_idle_and_blocked_and_retries_storage_trouble():
    # Prepare
    role = Script("wait", "blocked", StoreUnavailable("bucket down"), None, "aggregated", "finished", "wait")
    trigger = CountingTrigger()
    # Execute
    result = run_loop(role.step, trigger)
    # Assert: one wait after each idle, blocked, failed or empty step; returned at the terminal one
    assert result.action == "finished" and role.calls == 6 and trigger.waits == 4


def test_a_daemon_gives_up_after_max_idle_and_stops_when_told():
    with pytest.raises(TimeoutError, match="nothing happened"):
        run_loop(Script(*["wait"] * 5).step, CountingTrigger(), max_idle_s=-1)
    stop = threading.Event()
    role = Script("wait", "wait", "wait")
    trigger = CountingTrigger()
    trigger.wait = lambda timeout=None: stop.set()
    assert run_loop(role.step, trigger, stop=stop).action == "wait" and role.calls == 1


def test_auto_on_a_local_folder_wakes_on_a_new_file(tmp_path):
    # Prepare: the trigger a role picks for a plain folder (safety net: 30 s between events)
    trigger = make_trigger(open_store(str(tmp_path)), watch="auto", poll_interval=0.5)
    try:
        assert isinstance(trigger, InotifyTrigger) and trigger.poll_interval == 30.0
        # Execute: another party publishes a file (write then rename, as the stores do)
        (tmp_path / "x.json.tmp").write_text("{}")
        (tmp_path / "x.json.tmp").rename(tmp_path / "x.json")
        # Assert: woken by the event, not by the 30 s safety net
        assert trigger.wait() is True
    finally:
        trigger.close()


def _crash_emitter(trigger, folder):
    """Make the trigger's watchdog emitter thread die as it does when the clock is stepped under
    its delayed queue ("OSError: [Errno 22] Invalid argument"); return the emitter."""
    emitter = next(iter(trigger._observer.emitters))

    def crash(timeout):
        raise OSError(22, "Invalid argument")

    emitter.queue_events = crash
    (folder / "wake.tmp").write_text("")  # the blocked read returns (no poke: a .tmp), the next one raises
    emitter.join(timeout=10)
    return emitter


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the crash is the point
def test_a_dead_watcher_falls_back_to_polling_at_the_configured_interval(tmp_path, caplog):
    # Prepare: an inotify trigger (30 s safety net) whose emitter thread has died
    trigger = make_trigger(open_store(str(tmp_path)), watch="auto", poll_interval=0.05)
    try:
        emitter = _crash_emitter(trigger, tmp_path)
        assert not emitter.is_alive() and not trigger.watching()
        # Execute
        with caplog.at_level(logging.WARNING, logger="fedfs.store.watch"):
            trigger.wait()
        # Assert: it noticed, said so, and now polls every 0.05 s instead of every 30 s
        assert trigger.degraded and trigger.poll_interval == 0.05
        assert "file-system events stopped" in caplog.text
        assert trigger.wait() is False  # a plain poll tick, no event
    finally:
        trigger.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_watcher_dying_during_a_wait_ends_that_wait(tmp_path):
    # Prepare: a role blocked in wait() (next wake-up: the 30 s safety net)
    trigger = make_trigger(open_store(str(tmp_path)), watch="auto", poll_interval=0.05)
    try:
        waiter = threading.Thread(target=trigger.wait, daemon=True)
        waiter.start()
        time.sleep(0.2)
        # Execute: the watcher dies under it
        _crash_emitter(trigger, tmp_path)
        # Assert: the wait ends well before the safety net, in polling mode
        waiter.join(timeout=10)
        assert not waiter.is_alive() and trigger.degraded
    finally:
        trigger.close()


def test_polling_grid_is_shared_by_every_party():
    # two parties whose clocks read 0.3 s and 1.3 s past a tick wait for the same next tick
    t1, t2 = Trigger(2.0, clock=lambda: 100.3), Trigger(2.0, clock=lambda: 101.3)
    assert abs(t1.next_delay() - 1.7) < 1e-9 and abs(t2.next_delay() - 0.7) < 1e-9


def test_watchdog_is_quiet_at_start_and_after_a_clean_finish(tmp_path, caplog):
    """Before: folders appearing while the recursive watch was set up (a site's first files) gave
    RuntimeWarnings embedding the whole watch tree's repr (kBs each), and stopping the observer
    logged an inotify ERROR ("queue_events() called when the thread is inactive") after a clean finish."""
    import warnings

    store = open_store(str(tmp_path))

    def writer():
        for i in range(300):
            store.write_bytes(f"sites/S{i % 7}/d{i}/updates/r{i:06d}.json", b"{}")

    with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        thread = threading.Thread(target=writer)
        thread.start()
        triggers = [make_trigger(store, watch="inotify", poll_interval=0.1) for _ in range(5)]
        thread.join()
        for t in triggers:
            t.close()
        for k in range(30):
            t = make_trigger(store, watch="inotify", poll_interval=0.1)
            store.write_bytes(f"x{k}.json", b"1")
            t.close()
    assert not [w for w in seen if "watchdog" in w.filename], [str(w.message)[:200] for w in seen][:3]
    assert not [r for r in caplog.records if r.name.startswith("watchdog")], caplog.text[:500]
