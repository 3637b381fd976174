"""Start, follow, stop and re-attach to a training run that runs in a child process.

A run is a folder (RUN_DIR) holding `config.yaml` (the frozen config), `accelerate.yaml` (the launch
settings), `events.jsonl` (progress), `run.lock` (the child's pid while it runs), `train.log` (its
output when not shown in a terminal), `state/` (resumable states) and the outputs. The child is
`PYTHON -m accelerate.commands.launch --config_file RUN_DIR/accelerate.yaml -m bp_trainer.train
RUN_DIR/config.yaml --run-dir RUN_DIR`, started in its own process group, so a UI that restarts can find
the run again (`find_active_run`) and stop it (`stop_run`), and the child survives the UI.

Stopping is graceful first: a `STOP` file in the run folder, which the trainer checks after every step
(it saves and exits 0); then SIGTERM to the process group (the trainer also saves); SIGKILL last.

Importable without torch/diffusers/accelerate (the WebUI process uses it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from bp_trainer.errors import BPError

LOCK_FILE = "run.lock"
STOP_FILE = "STOP"
CONFIG_FILE = "config.yaml"
ACCELERATE_FILE = "accelerate.yaml"
LOG_FILE = "train.log"
EXIT_FILE = "exit.json"


def new_run_dir(runs_dir: "str | os.PathLike[str]", name: str) -> Path:
    """RUNS_DIR/NAME-YYYYmmdd-HHMMSS (with a suffix if that exists)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-.") or "run"
    base = Path(runs_dir) / f"{safe}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cuda_available() -> bool:
    """Whether torch here sees a CUDA GPU (False when torch is missing)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is always present where training runs
        return False
    return bool(torch.cuda.is_available())


def resolve_mixed_precision(value: str, use_cpu: bool) -> str:
    """`auto` -> bf16 on a GPU that supports it, fp16 on older GPUs, no on a CPU; fp16 on a CPU -> no."""
    if use_cpu:
        return "no" if value in ("auto", "fp16") else value
    if value != "auto":
        return value
    try:
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    except Exception:  # noqa: BLE001 - no usable CUDA: let accelerate decide at fp32
        return "no"


def accelerate_settings(cfg: Dict[str, Any], *, use_cpu: Optional[bool] = None) -> Dict[str, Any]:
    """The accelerate launch settings of a run: process count, mixed precision, multi-process on CPU."""
    n = int(cfg["run"]["num_processes"])
    if use_cpu is None:
        use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not cuda_available()
    return {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "MULTI_GPU" if n > 1 else "NO",
        "num_processes": n,
        "num_machines": 1,
        "machine_rank": 0,
        "mixed_precision": resolve_mixed_precision(cfg["training"]["mixed_precision"], bool(use_cpu)),
        "use_cpu": bool(use_cpu and n == 1),
        "dynamo_config": {},
        "rdzv_backend": "static",
        "same_network": True,
        "main_training_function": "main",
        "downcast_bf16": "no",
        "debug": False,
        # Several processes on a CPU: accelerate needs MULTI_GPU + ACCELERATE_USE_CPU (gloo); `--cpu` or
        # MULTI_CPU without MPI silently run one process.
        "_cpu_multi_process": bool(use_cpu and n > 1),
    }


def build_command(cfg: Dict[str, Any], run_dir: "str | os.PathLike[str]", *, resume: bool = False,
                  python: Optional[str] = None, use_cpu: Optional[bool] = None,
                  port: Optional[int] = None) -> Dict[str, Any]:
    """The child's argv and extra environment; writes RUN_DIR/accelerate.yaml unless the config names one.

    Returns {"argv": [...], "env": {...}, "accelerate_config": path}.
    """
    import yaml

    run_dir = Path(run_dir)
    python = python or cfg["run"].get("python") or sys.executable
    env: Dict[str, str] = {"PYTHONUNBUFFERED": "1"}
    user_config = cfg["run"].get("accelerate_config")
    if user_config:
        acc_path = Path(user_config)
        argv = [python, "-m", "accelerate.commands.launch", "--config_file", str(acc_path)]
    else:
        settings = accelerate_settings(cfg, use_cpu=use_cpu)
        cpu_multi = settings.pop("_cpu_multi_process")
        acc_path = run_dir / ACCELERATE_FILE
        from bp_trainer.fsutil import atomic_write_text

        atomic_write_text(acc_path, yaml.safe_dump(settings, sort_keys=True))
        argv = [python, "-m", "accelerate.commands.launch", "--config_file", str(acc_path),
                "--num_processes", str(settings["num_processes"]), "--num_machines", "1",
                "--mixed_precision", settings["mixed_precision"], "--dynamo_backend", "no"]
        if settings["num_processes"] > 1:
            argv += ["--multi_gpu", "--main_process_port", str(port or _free_port())]
        if cpu_multi:
            env["ACCELERATE_USE_CPU"] = "true"
        elif settings["use_cpu"]:
            argv += ["--cpu"]
    argv += ["-m", "bp_trainer.train", str(run_dir / CONFIG_FILE), "--run-dir", str(run_dir)]
    if resume:
        argv.append("--resume")
    return {"argv": argv, "env": env, "accelerate_config": str(acc_path)}


_WINDOWS = os.name == "nt"
SIGKILL = getattr(signal, "SIGKILL", 9)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` is running (a zombie, exited but not yet reaped, is not)."""
    if pid <= 0:
        return False
    if _WINDOWS:  # os.kill(pid, 0) would terminate the process on Windows: ask the kernel instead
        import ctypes

        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        try:
            code = ctypes.c_ulong()
            return bool(kernel32.GetExitCodeProcess(handle, ctypes.byref(code))) and code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) is not running.
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
        return state != b"Z"
    except (OSError, IndexError):
        return True


def read_lock(run_dir: "str | os.PathLike[str]") -> Optional[Dict[str, Any]]:
    from bp_trainer.fsutil import read_json_object

    return read_json_object(Path(run_dir) / LOCK_FILE)


TRAINER_PID_FILE = "trainer.pid"


def trainer_pid(run_dir: "str | os.PathLike[str]") -> int:
    """The pid of the run's main training process while it runs (written by the trainer itself), else 0."""
    try:
        return int((Path(run_dir) / TRAINER_PID_FILE).read_text(encoding="utf-8").strip() or 0)
    except (OSError, ValueError):
        return 0


def is_active(run_dir: "str | os.PathLike[str]") -> bool:
    """True while the run's process (run.lock) or its main training process (trainer.pid) is alive.

    The trainer is checked too: after a SIGTERM the `accelerate launch` process may be gone while the
    trainer still finishes its step and saves.
    """
    lock = read_lock(run_dir)
    if lock and pid_alive(int(lock.get("pid", 0))):
        return True
    pid = trainer_pid(run_dir)
    return bool(pid) and pid_alive(pid)


def write_lock(run_dir: "str | os.PathLike[str]", pid: int, **extra: Any) -> None:
    from bp_trainer.fsutil import atomic_write_text

    data = {"pid": pid, "started": time.time(), "host": socket.gethostname(), **extra}
    atomic_write_text(Path(run_dir) / LOCK_FILE, json.dumps(data, indent=1))


def find_active_run(runs_dir: "str | os.PathLike[str]") -> Optional[Path]:
    """The run folder under `runs_dir` whose process is alive (the newest if several), else None."""
    runs = list_runs(runs_dir)
    active = [Path(r["run_dir"]) for r in runs if r["active"]]
    return active[0] if active else None


def list_runs(runs_dir: "str | os.PathLike[str]") -> List[Dict[str, Any]]:
    """Run folders under `runs_dir`, newest first: {run_dir, name, active, status, step}."""
    from bp_trainer.train.events import read_all, summarize

    root = Path(runs_dir)
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        if not d.is_dir() or not ((d / CONFIG_FILE).exists() or (d / "events.jsonl").exists()):
            continue
        active = is_active(d)
        summary = summarize(read_all(d))
        status = summary["status"]
        if not active and status in ("running", "starting"):
            status = "interrupted"
        mtime = max((p.stat().st_mtime for p in (d / "events.jsonl", d / CONFIG_FILE) if p.exists()), default=0)
        out.append({"run_dir": str(d), "name": d.name, "active": active, "status": status,
                    "step": summary.get("step"), "total_steps": summary.get("total_steps"), "mtime": mtime})
    out.sort(key=lambda r: r["mtime"], reverse=True)
    return out


class RunHandle:
    """A started run: its folder, its child process (when started here) and its pid."""

    def __init__(self, run_dir: Path, process: Optional[subprocess.Popen] = None, pid: Optional[int] = None,
                 log: Any = None):
        self.run_dir = Path(run_dir)
        self.process = process
        self.pid = process.pid if process is not None else int(pid or 0)
        self._log = log

    def poll(self) -> Optional[int]:
        """The exit code when the run has ended, else None (works for re-attached runs too: -1 = unknown)."""
        if self.process is not None:
            code = self.process.poll()
            if code is not None:
                self._finish(code)
            return code
        return None if pid_alive(self.pid) else _recorded_exit(self.run_dir)

    def wait(self, timeout: Optional[float] = None) -> int:
        """Wait for the run to end: its process, then a trainer that outlived it (still saving)."""
        deadline = None if timeout is None else time.monotonic() + timeout

        def wait_for(pid: int) -> None:
            while pid and pid_alive(pid):
                if deadline is not None and time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired(str(pid), timeout or 0)
                time.sleep(0.2)

        if self.process is not None:
            code = self.process.wait(timeout)
            wait_for(trainer_pid(self.run_dir))
            self._finish(code)
            return code
        wait_for(self.pid)
        wait_for(trainer_pid(self.run_dir))
        lock = read_lock(self.run_dir)
        if lock and int(lock.get("pid", 0)) == self.pid:
            (self.run_dir / LOCK_FILE).unlink(missing_ok=True)  # the run has ended: its lock is stale
        return _recorded_exit(self.run_dir)

    def stop(self, *, timeout: float = 0.0, force: bool = False) -> Optional[int]:
        return stop_run(self.run_dir, timeout=timeout, force=force, handle=self)

    def _finish(self, code: int) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        from bp_trainer.fsutil import atomic_write_text

        exit_path = self.run_dir / EXIT_FILE
        if not exit_path.exists():
            atomic_write_text(exit_path, json.dumps({"exit_code": code, "time": time.time()}))
        lock = read_lock(self.run_dir)
        if lock and int(lock.get("pid", 0)) == self.pid:
            (self.run_dir / LOCK_FILE).unlink(missing_ok=True)


def _recorded_exit(run_dir: Path) -> int:
    """The exit code recorded by the process that started the run; else from the events (a re-attached
    run): 0 after `done`, 1 after `error`, -1 when the process vanished without either (killed)."""
    try:
        return int(json.loads((Path(run_dir) / EXIT_FILE).read_text())["exit_code"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    from bp_trainer.train.events import read_all

    final = [e["type"] for e in read_all(run_dir) if e.get("type") in ("start", "done", "error")]
    if final and final[-1] == "done":
        return 0
    if final and final[-1] == "error":
        return 1
    return -1


def prepare_run(cfg: Dict[str, Any], *, resume_dir: "str | os.PathLike[str] | None" = None,
                run_dir: "str | os.PathLike[str] | None" = None) -> Path:
    """Create (or reuse, for a resume) the run folder and freeze the config into RUN_DIR/config.yaml."""
    from bp_trainer.train.config import save_config

    if resume_dir is not None:
        target = Path(resume_dir)
        if not target.is_dir():
            raise BPError("run folder not found", path=target, hint="pass the folder of the run to resume")
    else:
        target = Path(run_dir) if run_dir else new_run_dir(cfg["run"]["runs_dir"], cfg["run"]["name"])
    if is_active(target):
        # The lock may be gone while the trainer still saves (trainer.pid): name whichever pid is alive.
        pid = (read_lock(target) or {}).get("pid") or trainer_pid(target)
        raise BPError("this run is already running", path=target, hint=f"stop it first (pid {pid})")
    target.mkdir(parents=True, exist_ok=True)
    for stale in (STOP_FILE, EXIT_FILE):
        (target / stale).unlink(missing_ok=True)
    save_config(cfg, target / CONFIG_FILE)
    return target


def start_run(cfg: Dict[str, Any], *, resume_dir: "str | os.PathLike[str] | None" = None,
              run_dir: "str | os.PathLike[str] | None" = None, python: Optional[str] = None,
              env: Optional[Dict[str, str]] = None, log_to_file: bool = True,
              use_cpu: Optional[bool] = None) -> RunHandle:
    """Start a run in a child process (its own process group) and return its handle.

    `cfg` is a validated config (`bp_trainer.train.config`). With `log_to_file` the child's output goes to
    RUN_DIR/train.log, else it is inherited (a terminal shows the progress bar).
    """
    target = prepare_run(cfg, resume_dir=resume_dir, run_dir=run_dir)
    resume = resume_dir is not None
    cmd = build_command(cfg, target, resume=resume, python=python, use_cpu=use_cpu)
    child_env = dict(os.environ)
    child_env.update(cmd["env"])
    child_env.update(env or {})
    root = str(Path(__file__).resolve().parent.parent)
    child_env["PYTHONPATH"] = root + (os.pathsep + child_env["PYTHONPATH"] if child_env.get("PYTHONPATH") else "")
    log = open(target / LOG_FILE, "ab") if log_to_file else None
    # Its own process group (a session on POSIX), so a stop reaches every process and the run outlives the UI.
    group = ({"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if _WINDOWS  # type: ignore[attr-defined]
             else {"start_new_session": True})
    try:
        proc = subprocess.Popen(cmd["argv"], env=child_env, cwd=str(target), stdin=subprocess.DEVNULL,
                                stdout=log if log is not None else None,
                                stderr=subprocess.STDOUT if log is not None else None, **group)
    except OSError as exc:  # e.g. the trainer's Python does not exist: no half-made run folder is left behind
        if log is not None:
            log.close()
        if not resume:
            shutil.rmtree(target, ignore_errors=True)
        raise BPError(f"cannot start the trainer: {exc.strerror or exc}", path=cmd["argv"][0],
                      hint="check the trainer's Python (run.python, or Settings > BP Train > Trainer Python)") from exc
    write_lock(target, proc.pid, command=cmd["argv"], pgid=proc.pid)
    return RunHandle(target, proc, log=log)


def attach(run_dir: "str | os.PathLike[str]") -> Optional[RunHandle]:
    """A handle on a running run started by another process (None when it is not running)."""
    lock = read_lock(run_dir)
    if lock and pid_alive(int(lock.get("pid", 0))):
        return RunHandle(Path(run_dir), pid=int(lock["pid"]))
    pid = trainer_pid(run_dir)  # the launcher process is gone but the trainer still runs (saving)
    if pid and pid_alive(pid):
        return RunHandle(Path(run_dir), pid=pid)
    return None


def request_stop(run_dir: "str | os.PathLike[str]") -> None:
    """Ask the trainer to finish its current step, save and exit 0 (the STOP file)."""
    (Path(run_dir) / STOP_FILE).write_text(str(time.time()), encoding="utf-8")


def _signal_group(pid: int, sig: int) -> None:
    """Send `sig` to the run's whole process group (the launcher and every trainer process).

    On Windows a graceful signal is CTRL_BREAK (the trainer handles SIGBREAK like SIGTERM) and SIGKILL is
    `taskkill /T /F` (the process tree).
    """
    if _WINDOWS:
        if sig == SIGKILL:
            subprocess.run(["taskkill", "/T", "/F", "/PID", str(pid)], capture_output=True, check=False)
        else:
            try:
                os.kill(pid, signal.CTRL_BREAK_EVENT)  # type: ignore[attr-defined]
            except OSError:
                pass
        return
    try:
        os.killpg(os.getpgid(pid), sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


signal_group = _signal_group  # public name: send a signal to a run's whole process group


def stop_run(run_dir: "str | os.PathLike[str]", *, timeout: float = 0.0, force: bool = False,
             handle: Optional[RunHandle] = None) -> Optional[int]:
    """Stop a run: STOP file; after `timeout` s without exit SIGTERM, then SIGKILL after as long again.

    `force` kills at once (SIGKILL to the process group). Returns the exit code when the run ended within
    the timeouts, else None (still stopping).
    """
    handle = handle or attach(run_dir)
    if handle is None:
        return _recorded_exit(Path(run_dir)) if (Path(run_dir) / EXIT_FILE).exists() else None
    if force:
        _signal_group(handle.pid, SIGKILL)
        try:
            return handle.wait(30)
        except subprocess.TimeoutExpired:  # not gone yet (e.g. stuck in the kernel): report "still stopping"
            return None
    request_stop(run_dir)
    if timeout <= 0:
        return handle.poll()
    for sig in (None, signal.SIGTERM, SIGKILL):
        if sig is not None:
            _signal_group(handle.pid, sig)
        try:
            return handle.wait(timeout)
        except subprocess.TimeoutExpired:
            continue
    return None
