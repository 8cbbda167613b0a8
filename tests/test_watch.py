"""When a role steps again: inotify events on a local folder, and polling when the watcher dies."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from fedfs.store import open_store
from fedfs.store.watch import InotifyTrigger, Trigger, make_trigger


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
