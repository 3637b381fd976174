"""Lend the host's GPU to a training run and take it back, holding the host's generation lock meanwhile.

In the WebUI every generation runs under `modules.call_queue.queue_lock` (a FIFO lock). While a training
run owns the GPU, BP Train holds that lock, so generation requests wait in line instead of running out of
memory, and moves the WebUI's model to system RAM. `release()` is called by the Start handler and
`reclaim()` by the thread that watches the run end: two different threads, and the lock must be held
for the whole run in between. So the lock is taken and released by one dedicated holder thread:

    release():  start holder -> holder acquires the lock (waits for a running generation to finish)
                -> unloads the model -> signals "ready"; release() returns
    reclaim():  signals the holder -> it moves the model back to the GPU -> releases the lock

No request thread ever blocks on the lock itself, so a handler that happens to run under the lock cannot
deadlock the UI; `release()` has a timeout and then gives up cleanly (the pending acquire is cancelled
and the lock released as soon as it is obtained). Both calls are idempotent. No WebUI import here: the lock
and the two model functions are passed in (see `scripts/bp_train.py`).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional

from bp_trainer.errors import BPError


class _Attempt:
    """One lend of the GPU: its holder thread and what happened (never reused, never reset)."""

    def __init__(self) -> None:
        self.thread: Optional[threading.Thread] = None
        self.ready = threading.Event()  # set when lent, when unloading failed, or when the attempt ended
        self.done = threading.Event()  # set by reclaim(): give the GPU back
        self.cancelled = False  # release() gave up waiting for the lock
        self.lent = False  # the lock is held and the model is off the GPU
        self.finished = False
        self.error: Optional[BaseException] = None
        self.since: Optional[float] = None


class GpuHandoff:
    def __init__(self, lock: Any, unload: Callable[[], None], reload: Callable[[], None],
                 log: Callable[[str], None] = lambda msg: print(f"BP Train: {msg}", flush=True),
                 has_gpu: Callable[[], bool] = lambda: True):
        self.lock = lock
        self.unload = unload
        self.reload = reload
        self.log = log
        self.has_gpu = has_gpu  # only the wording of the log lines depends on it
        self._mutex = threading.Lock()
        self._attempt: Optional[_Attempt] = None

    @property
    def released(self) -> bool:
        """True while the GPU is lent out (the lock is held and the model is off the GPU)."""
        a = self._attempt
        return a is not None and a.lent

    @property
    def pending(self) -> bool:
        """True while waiting for generation to finish before the GPU can be lent."""
        a = self._attempt
        return a is not None and not a.lent and not a.finished and not a.cancelled

    def release(self, timeout: Optional[float] = 600.0) -> None:
        """Take the generation lock and move the model off the GPU; returns when done.

        Raises BPError when the lock is not obtained within `timeout` seconds (generation still busy), or when
        the model cannot be moved.
        """
        with self._mutex:
            a = self._attempt
            if a is not None and not a.finished:
                if a.lent:
                    return  # already lent
                a.cancelled = False  # an earlier attempt still waits for the lock (maybe timed out): take it over
            else:
                a = self._attempt = _Attempt()
                a.thread = threading.Thread(target=self._hold, args=(a,), name="bp-train-gpu-handoff", daemon=True)
                a.thread.start()
        if not a.ready.wait(timeout):
            with self._mutex:
                if not a.ready.is_set():
                    a.cancelled = True  # the holder lets go as soon as it gets the lock
            if not a.ready.is_set():
                raise BPError(f"the WebUI is still busy generating after {timeout:g} s",
                              hint="start training again when the current generation has finished")
        if a.error is not None:
            raise BPError(f"could not move the WebUI's model off the GPU: {a.error}",
                          hint="unload it in Settings > Actions, or restart the WebUI") from a.error
        if not a.lent:
            raise BPError("handing the GPU to the training run was cancelled", hint="start training again")

    def reclaim(self, timeout: Optional[float] = 600.0) -> None:
        """Move the model back to the GPU and let generation run again (no-op when not lent; a release that
        still waits for the lock is cancelled)."""
        with self._mutex:
            a = self._attempt
            if a is None or a.finished:
                return
            if not a.lent:
                a.cancelled = True
                return
            a.done.set()
        if a.thread is not None and a.thread is not threading.current_thread():
            a.thread.join(timeout)

    def _hold(self, a: _Attempt) -> None:
        self.lock.acquire()
        try:
            with self._mutex:
                if a.cancelled:
                    return
            try:
                self.unload()
            except BaseException as exc:  # reported by release(); the lock goes straight back
                a.error = exc
                return
            with self._mutex:
                # release() may have given up (timeout) or reclaim() cancelled while the model was unloading:
                # nobody would reclaim this lend, so give the model and the lock straight back.
                abandoned = a.cancelled
                if not abandoned:
                    a.lent = True
                    a.since = time.time()
            if abandoned:
                self._give_back()
                return
            self.log("the WebUI's model is off the GPU; generation waits until the training run ends" if self.has_gpu()
                     else "generation waits until the training run ends")
            a.ready.set()
            a.done.wait()
            self._give_back()
        finally:
            with self._mutex:  # end this attempt before letting go, so a new release() starts afresh
                a.lent = False
                a.finished = True
                if self._attempt is a:
                    self._attempt = None
            a.ready.set()
            self.lock.release()

    def _give_back(self) -> None:
        try:
            self.reload()
            self.log("the WebUI's model is back on the GPU" if self.has_gpu() else "the training run ended; generation "
                     "may run again")
        except BaseException as exc:
            self.log(f"could not move the model back to the GPU ({exc}); use Settings > Actions > "
                     "'Load SD checkpoint to VRAM from RAM'")


_shared: dict = {}
_shared_lock = threading.Lock()


def shared_handoff(key: str, factory: Callable[[], GpuHandoff]) -> GpuHandoff:
    """One hand-off per key for the life of the process: the WebUI's "Reload UI" re-runs `scripts/`, but a
    run that holds the GPU must still be given back by the object that took it."""
    with _shared_lock:
        h = _shared.get(key)
        if h is None:
            h = _shared[key] = factory()
        return h
