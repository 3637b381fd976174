"""A run folder and every name in it. The launcher, the trainer, the run controller, the UI and the API all
go through `RunDir`; no other module spells a run folder's file names.

    RUN_DIR/
      config.yaml        the frozen run config           accelerate.yaml  the launch settings
      events.jsonl       progress (append-only)          train.log        the child's output (UI runs)
      run.lock           the launcher child's pid        trainer.pid      the main trainer process's pid
      STOP               a graceful stop request         exit.json        the exit code seen by the starter
      state/step-N/      resumable states                checkpoints/     WebUI/EMA/diffusers outputs
      samples/           sample PNGs                     logs/            TensorBoard
      embeddings/        trained tag embeddings          batches-rankN.jsonl  recorded batches (tests)

Importable without torch (the WebUI process uses it).
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from bp_trainer.procs import pid_alive


@dataclass(frozen=True)
class RunDir:
    path: Path

    CONFIG = "config.yaml"
    ACCELERATE = "accelerate.yaml"
    EVENTS = "events.jsonl"
    LOG = "train.log"
    LOCK = "run.lock"
    TRAINER_PID = "trainer.pid"
    STOP = "STOP"
    EXIT = "exit.json"
    STATE = "state"
    CHECKPOINTS = "checkpoints"
    SAMPLES = "samples"
    LOGS = "logs"
    EMBEDDINGS = "embeddings"

    def __init__(self, path: "str | os.PathLike[str] | RunDir"):
        object.__setattr__(self, "path", Path(path.path if isinstance(path, RunDir) else path))

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    # ------------------------------------------------------------------------------------------ files
    config = property(lambda self: self.path / self.CONFIG)
    accelerate = property(lambda self: self.path / self.ACCELERATE)
    events = property(lambda self: self.path / self.EVENTS)
    log = property(lambda self: self.path / self.LOG)
    lock_file = property(lambda self: self.path / self.LOCK)
    trainer_pid_file = property(lambda self: self.path / self.TRAINER_PID)
    stop_file = property(lambda self: self.path / self.STOP)
    exit_file = property(lambda self: self.path / self.EXIT)
    state_dir = property(lambda self: self.path / self.STATE)
    checkpoints = property(lambda self: self.path / self.CHECKPOINTS)
    samples = property(lambda self: self.path / self.SAMPLES)
    logs = property(lambda self: self.path / self.LOGS)
    embeddings = property(lambda self: self.path / self.EMBEDDINGS)

    def batches(self, rank: int) -> Path:
        return self.path / f"batches-rank{rank}.jsonl"

    def looks_like_run(self) -> bool:
        return self.path.is_dir() and (self.config.exists() or self.events.exists())

    # ------------------------------------------------------------------------------------------ processes
    def read_lock(self) -> Optional[Dict[str, Any]]:
        from bp_trainer.fsutil import read_json_object

        return read_json_object(self.lock_file)

    def write_lock(self, pid: int, **extra: Any) -> None:
        from bp_trainer.fsutil import atomic_write_text

        data = {"pid": pid, "started": time.time(), "host": socket.gethostname(), **extra}
        atomic_write_text(self.lock_file, json.dumps(data, indent=1))

    def lock_pid(self) -> int:
        try:
            return int((self.read_lock() or {}).get("pid", 0))
        except (TypeError, ValueError):
            return 0

    def release_lock(self, pid: int) -> None:
        """Remove run.lock if it still names `pid` (a newer start's lock is left alone)."""
        if self.lock_pid() == pid:
            self.lock_file.unlink(missing_ok=True)

    def trainer_pid(self) -> int:
        """The pid of the run's main training process while it runs (written by the trainer itself), else 0."""
        try:
            return int(self.trainer_pid_file.read_text(encoding="utf-8").strip() or 0)
        except (OSError, ValueError):
            return 0

    def write_trainer_pid(self, pid: int) -> None:
        from bp_trainer.fsutil import atomic_write_text

        atomic_write_text(self.trainer_pid_file, str(pid))

    def live_pid(self) -> int:
        """The launcher's pid while alive, else the trainer's while alive (still saving after a SIGTERM), else 0."""
        for pid in (self.lock_pid(), self.trainer_pid()):
            if pid and pid_alive(pid):
                return pid
        return 0

    def is_active(self) -> bool:
        return bool(self.live_pid())

    # ------------------------------------------------------------------------------------------ stop / exit
    def request_stop(self) -> None:
        """Ask the trainer to finish its current step, save and exit 0."""
        from bp_trainer.fsutil import atomic_write_text

        atomic_write_text(self.stop_file, str(time.time()))

    def stop_requested(self) -> bool:
        return self.stop_file.exists()

    def clear_for_start(self) -> None:
        """Forget a previous start's stop request and exit code (a resume starts afresh)."""
        for stale in (self.stop_file, self.exit_file):
            stale.unlink(missing_ok=True)

    def record_exit(self, code: int) -> None:
        from bp_trainer.fsutil import atomic_write_text

        if not self.exit_file.exists():
            atomic_write_text(self.exit_file, json.dumps({"exit_code": code, "time": time.time()}))

    def recorded_exit(self) -> Optional[int]:
        """The exit code recorded by the process that started the run (None when it recorded none)."""
        try:
            return int(json.loads(self.exit_file.read_text())["exit_code"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
