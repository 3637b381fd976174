"""GpuHandoff on its own: lock held across threads, failures reported, the lock never leaked."""

from __future__ import annotations

import threading

import pytest

from bp_trainer.errors import BPError
from bp_trainer.gpu_handoff import GpuHandoff


def test_release_in_one_thread_reclaim_in_another():
    lock = threading.Lock()
    events = []
    h = GpuHandoff(lock, lambda: events.append("unload"), lambda: events.append("reload"), log=events.append)
    t = threading.Thread(target=h.release)
    t.start()
    t.join(10)
    assert lock.locked() and h.released and events[0] == "unload"
    watcher = threading.Thread(target=h.reclaim)  # e.g. the run watcher, when the trainer exits
    watcher.start()
    watcher.join(10)
    assert not lock.locked() and not h.released and "reload" in events


def test_unload_failure_is_a_user_error_and_frees_the_lock():
    lock = threading.Lock()

    def boom():
        raise RuntimeError("CUDA error: out of memory")

    h = GpuHandoff(lock, boom, lambda: None, log=lambda m: None)
    with pytest.raises(BPError, match="could not move the WebUI's model off the GPU: CUDA error"):
        h.release()
    h.reclaim()
    assert lock.acquire(timeout=5)
    lock.release()


def test_reload_failure_still_frees_the_lock():
    lock = threading.Lock()
    messages = []

    def boom():
        raise RuntimeError("device lost")

    h = GpuHandoff(lock, lambda: None, boom, log=messages.append)
    h.release()
    h.reclaim()
    assert not lock.locked() and any("device lost" in m for m in messages)


def test_reclaim_while_waiting_for_the_lock_cancels_without_unloading():
    lock = threading.Lock()
    events = []
    h = GpuHandoff(lock, lambda: events.append("unload"), lambda: events.append("reload"), log=lambda m: None)
    lock.acquire()  # a generation is running
    with pytest.raises(BPError, match="still busy"):
        h.release(timeout=0.1)
    assert h.pending is False  # the timed-out attempt is cancelled
    h.reclaim()  # nothing lent: no-op
    lock.release()
    assert lock.acquire(timeout=5)  # the cancelled holder took the lock and gave it straight back
    lock.release()
    assert events == [] and not h.released


def test_a_release_that_times_out_while_unloading_gives_the_model_and_the_lock_back():
    lock = threading.Lock()
    unloading, finish_unload = threading.Event(), threading.Event()
    events = []

    def slow_unload():  # e.g. waiting for the WebUI's start-up model load to finish
        unloading.set()
        finish_unload.wait(10)
        events.append("unload")

    h = GpuHandoff(lock, slow_unload, lambda: events.append("reload"), log=lambda m: None)
    with pytest.raises(BPError, match="still busy"):
        h.release(timeout=0.2)  # gives up while the holder is unloading; nobody will call reclaim()
    assert unloading.is_set()
    finish_unload.set()
    assert lock.acquire(timeout=5)  # not held forever by an abandoned lend
    lock.release()
    assert events == ["unload", "reload"] and not h.released


def test_many_release_reclaim_cycles_never_leak_the_lock():
    lock = threading.Lock()
    count = {"unload": 0, "reload": 0}

    def unload():
        count["unload"] += 1

    def reload():
        count["reload"] += 1

    h = GpuHandoff(lock, unload, reload, log=lambda m: None)
    for _ in range(50):
        h.release()
        assert h.released and lock.locked()
        t = threading.Thread(target=h.reclaim)
        t.start()
        t.join(10)
        assert not h.released
    assert count == {"unload": 50, "reload": 50}
    assert lock.acquire(timeout=5)
    lock.release()
