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


class GpuHandoff:
    def __init__(self, lock: Any, unload: Callable[[], None], reload: Callable[[], None],
                 log: Callable[[str], None] = lambda msg: print(f"BP Train: {msg}", flush=True)):
        self.lock = lock
        self.unload = unload
        self.reload = reload
        self.log = log
        self._mutex = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._ready = threading.Event()
        self._done = threading.Event()
        self._cancelled = False
        self._error: Optional[BaseException] = None
        self.released_at: Optional[float] = None

    @property
    def released(self) -> bool:
        """True while the GPU is lent out (the lock is held and the model is off the GPU)."""
        return self._ready.is_set() and self._thread is not None and self._thread.is_alive()

    @property
    def pending(self) -> bool:
        """True while waiting for generation to finish before the GPU can be lent."""
        t = self._thread
        return t is not None and t.is_alive() and not self._ready.is_set()

    def release(self, timeout: Optional[float] = 600.0) -> None:
        """Take the generation lock and move the model off the GPU; returns when done.

        Raises BPError when the lock is not obtained within `timeout` seconds (generation still busy).
        """
        with self._mutex:
            if self._thread is not None and self._thread.is_alive():
                if self._ready.is_set():
                    return  # already lent
                # an earlier attempt still waits for the lock (maybe timed out and cancelled): take it over
                self._cancelled = False
                self._done.clear()
                thread = self._thread
            else:
                self._ready.clear()
                self._done.clear()
                self._cancelled = False
                self._error = None
                thread = self._thread = threading.Thread(target=self._hold, name="bp-train-gpu-handoff", daemon=True)
                thread.start()
        if not self._ready.wait(timeout):
            with self._mutex:
                if not self._ready.is_set():
                    self._cancelled = True
                    self._done.set()
            if not self._ready.is_set():
                raise BPError(f"the WebUI is still busy generating after {timeout:g} s",
                              hint="start training again when the current generation has finished")
        if self._error is not None:
            error, self._error = self._error, None
            raise BPError(f"could not move the WebUI's model off the GPU: {error}",
                          hint="unload it in Settings > Actions, or restart the WebUI") from error

    def reclaim(self, timeout: Optional[float] = 600.0) -> None:
        """Move the model back to the GPU and let generation run again (no-op when not lent)."""
        with self._mutex:
            thread = self._thread
            self._done.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _hold(self) -> None:
        self.lock.acquire()
        try:
            with self._mutex:
                if self._cancelled:
                    self._thread = None  # a later release() starts a fresh attempt
                    return
            try:
                self.unload()
            except BaseException as exc:  # report to release(); hand the lock straight back
                self._error = exc
                self._ready.set()
                return
            self.released_at = time.time()
            self.log("the WebUI's model is off the GPU; generation waits until the training run ends")
            self._ready.set()
            self._done.wait()
            try:
                self.reload()
                self.log("the WebUI's model is back on the GPU")
            except BaseException as exc:
                self.log(f"could not move the model back to the GPU ({exc}); use Settings > Actions > "
                         "'Load SD checkpoint to VRAM from RAM'")
        finally:
            with self._mutex:  # forget this attempt before letting go, so a new release() starts afresh
                if self._thread is threading.current_thread():
                    self._thread = None
                    self._ready.clear()
                    self.released_at = None
            self.lock.release()


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
