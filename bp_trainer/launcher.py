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

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from bp_trainer.errors import BPError
from bp_trainer.procs import SIGKILL, WINDOWS, pid_alive, signal_group
from bp_trainer.rundir import RunDir

if TYPE_CHECKING:
    from bp_trainer.train.config import RunConfig


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


def choose_precision(value: str, capability: "Tuple[int, int] | None", *, arch: str = "sd1") -> str:
    """The mixed precision a run trains in: `auto` -> bf16 on compute capability >= 8 (Ampere and newer, where
    bf16 is native), else fp16 — except for SD 2.x, whose attention overflows in fp16 (fp32 there); no GPU
    (`capability` None) -> no. An explicit fp16 on a CPU is no (fp16 autocast needs a GPU)."""
    if capability is None:
        return "no" if value in ("auto", "fp16") else value
    if value != "auto":
        return value
    if capability[0] >= 8:
        return "bf16"
    return "no" if arch == "sd2" else "fp16"


def launch_precision(value: str, use_cpu: bool) -> str:
    """What the launcher tells accelerate, decided without touching a GPU in this process: the configured value,
    or for `auto` none at all (`no`) — the trainer decides `auto` itself from its GPU (`choose_precision`)."""
    return choose_precision(value, None) if use_cpu or value == "auto" else value


def accelerate_settings(cfg: "RunConfig", *, use_cpu: Optional[bool] = None) -> Dict[str, Any]:
    """The accelerate launch settings of a run: process count, mixed precision, multi-process on CPU."""
    n = int(cfg.run.num_processes)
    if use_cpu is None:
        use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not cuda_available()
    return {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "MULTI_GPU" if n > 1 else "NO",
        "num_processes": n,
        "num_machines": 1,
        "machine_rank": 0,
        "mixed_precision": launch_precision(cfg.training.mixed_precision, bool(use_cpu)),
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


def cpu_threads_per_process(num_processes: int) -> int:
    """accelerate's `num_cpu_threads_per_process` (passed, so accelerate does not warn and guess): the CPUs
    shared between the processes, at least 1."""
    return max(1, (os.cpu_count() or 1) // max(1, num_processes))


def build_command(cfg: "RunConfig", run_dir: "str | os.PathLike[str]", *, resume: bool = False,
                  python: Optional[str] = None, use_cpu: Optional[bool] = None,
                  port: Optional[int] = None) -> Dict[str, Any]:
    """The child's argv and extra environment; writes RUN_DIR/accelerate.yaml unless the config names one.

    Returns {"argv": [...], "env": {...}, "accelerate_config": path}.
    """
    import yaml

    rd = RunDir(Path(run_dir).resolve())
    python = python or cfg.run.python or sys.executable
    env: Dict[str, str] = {"PYTHONUNBUFFERED": "1"}
    trainer = ["-m", "bp_trainer.train", str(rd.config), "--run-dir", str(rd.path)] + (["--resume"] if resume else [])
    if cfg.run.num_processes == 1 and not cfg.run.accelerate_config:
        # one process needs no launcher: the trainer's own one-line errors and exit codes reach the user as they
        # are (accelerate's launcher would wrap them in a CalledProcessError traceback)
        settings = accelerate_settings(cfg, use_cpu=use_cpu)
        env["ACCELERATE_MIXED_PRECISION"] = settings["mixed_precision"]
        if settings["use_cpu"]:
            env["ACCELERATE_USE_CPU"] = "true"
        return {"argv": [python, *trainer], "env": env, "accelerate_config": None}
    if cfg.run.accelerate_config:
        acc_path = Path(cfg.run.accelerate_config)
        argv = [python, "-m", "accelerate.commands.launch", "--config_file", str(acc_path)]
    else:
        settings = accelerate_settings(cfg, use_cpu=use_cpu)
        cpu_multi = settings.pop("_cpu_multi_process")
        acc_path = rd.accelerate
        from bp_trainer.fsutil import atomic_write_text

        atomic_write_text(acc_path, yaml.safe_dump(settings, sort_keys=True))
        argv = [python, "-m", "accelerate.commands.launch", "--config_file", str(acc_path),
                "--num_processes", str(settings["num_processes"]), "--num_machines", "1",
                "--mixed_precision", settings["mixed_precision"], "--dynamo_backend", "no",
                "--num_cpu_threads_per_process", str(cpu_threads_per_process(settings["num_processes"]))]
        if settings["num_processes"] > 1:
            argv += ["--multi_gpu", "--main_process_port", str(port or _free_port())]
        if cpu_multi:
            env["ACCELERATE_USE_CPU"] = "true"
        elif settings["use_cpu"]:
            argv += ["--cpu"]
    return {"argv": argv + trainer, "env": env, "accelerate_config": str(acc_path)}


def find_active_run(runs_dir: "str | os.PathLike[str]") -> Optional[Path]:
    """The run folder under `runs_dir` whose process is alive (the newest if several), else None."""
    active = [Path(r["run_dir"]) for r in list_runs(runs_dir) if r["active"]]
    return active[0] if active else None


_summaries: Dict[str, Tuple[Tuple[int, int], Dict[str, Any]]] = {}


def _summary(rd: RunDir) -> Dict[str, Any]:
    """The folded events of a run, re-read only when events.jsonl changed (size, mtime)."""
    from bp_trainer.train.events import read_all, summarize

    try:
        st = rd.events.stat()
        stamp = (st.st_size, st.st_mtime_ns)
    except OSError:
        stamp = (-1, -1)
    key = str(rd.path)
    cached = _summaries.get(key)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    summary = summarize(read_all(rd))
    _summaries[key] = (stamp, summary)
    return summary


def list_runs(runs_dir: "str | os.PathLike[str]") -> List[Dict[str, Any]]:
    """Run folders under `runs_dir`, newest first: {run_dir, name, active, status, step, total_steps, mtime}."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        rd = RunDir(d)
        if not rd.looks_like_run():
            continue
        active = rd.is_active()
        summary = _summary(rd)
        status = summary["status"]
        if not active and status in ("running", "starting"):
            status = "interrupted"
        mtime = max((p.stat().st_mtime for p in (rd.events, rd.config) if p.exists()), default=0)
        out.append({"run_dir": str(d), "name": d.name, "active": active, "status": status,
                    "step": summary.get("step"), "total_steps": summary.get("total_steps"), "mtime": mtime})
    out.sort(key=lambda r: r["mtime"], reverse=True)
    return out


def recorded_exit(run_dir: "str | os.PathLike[str]") -> int:
    """The exit code recorded by the process that started the run; else from the events (a re-attached
    run): 0 after `done`, 1 after `error`, -1 when the process vanished without either (killed)."""
    rd = RunDir(run_dir)
    code = rd.recorded_exit()
    if code is not None:
        return code
    from bp_trainer.train.events import read_all

    final = [e["type"] for e in read_all(rd) if e.get("type") in ("start", "done", "error")]
    if final and final[-1] == "done":
        return 0
    if final and final[-1] == "error":
        return 1
    return -1


class RunHandle:
    """A started run: its folder, its child process (when started here) and its pid.

    The run has ended only when both the launcher child and the main trainer process are gone: after a
    SIGTERM, accelerate's launcher may exit while the trainer still saves (the GPU is not free yet).
    """

    def __init__(self, run_dir: "str | os.PathLike[str]", process: Optional[subprocess.Popen] = None,
                 pid: Optional[int] = None, log: Any = None):
        self.rd = RunDir(run_dir)
        self.run_dir = self.rd.path
        self.process = process
        self.pid = process.pid if process is not None else int(pid or 0)
        self._log = log

    def _trainer_running(self) -> bool:
        pid = self.rd.trainer_pid()
        return bool(pid) and pid != self.pid and pid_alive(pid)

    def poll(self) -> Optional[int]:
        """The exit code when the run has ended, else None (re-attached runs too: -1 = unknown)."""
        if self.process is not None:
            code = self.process.poll()
            if code is None or self._trainer_running():
                return None
            self._finish(code)
            return code
        if pid_alive(self.pid) or self._trainer_running():
            return None
        return recorded_exit(self.run_dir)

    def wait(self, timeout: Optional[float] = None) -> int:
        """Wait for the run to end: its process, then a trainer that outlived it (still saving)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.process is not None:
            self.process.wait(timeout)
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
            time.sleep(0.2)
        if self.process is not None:
            return int(self.process.returncode)
        self.rd.release_lock(self.pid)  # the run has ended: its lock is stale
        return recorded_exit(self.run_dir)

    def stop(self, *, timeout: float = 0.0, force: bool = False) -> Optional[int]:
        return stop_run(self.run_dir, timeout=timeout, force=force, handle=self)

    def _finish(self, code: int) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        self.rd.record_exit(code)
        self.rd.release_lock(self.pid)


def prepare_run(cfg: "RunConfig", *, resume_dir: "str | os.PathLike[str] | None" = None,
                run_dir: "str | os.PathLike[str] | None" = None) -> Path:
    """Create (or reuse, for a resume) the run folder and freeze the config into RUN_DIR/config.yaml.

    The folder is made absolute here: the child runs inside it, so a relative `runs/NAME` would not resolve.
    """
    from bp_trainer.train.config import save_config

    if resume_dir is not None:
        target = Path(resume_dir).resolve()
        if not target.is_dir():
            raise BPError("run folder not found", path=target, hint="pass the folder of the run to resume")
    else:
        target = Path(run_dir).resolve() if run_dir else new_run_dir(cfg.run.runs_dir, cfg.run.name).resolve()
    rd = RunDir(target)
    if rd.is_active():
        # The lock may be gone while the trainer still saves (trainer.pid): name whichever pid is alive.
        raise BPError("this run is already running", path=target, hint=f"stop it first (pid {rd.live_pid()})")
    target.mkdir(parents=True, exist_ok=True)
    rd.clear_for_start()
    save_config(cfg, rd.config)
    return target


def start_run(cfg: "RunConfig", *, resume_dir: "str | os.PathLike[str] | None" = None,
              run_dir: "str | os.PathLike[str] | None" = None, python: Optional[str] = None,
              env: Optional[Dict[str, str]] = None, log_to_file: bool = True,
              use_cpu: Optional[bool] = None) -> RunHandle:
    """Start a run in a child process (its own process group) and return its handle.

    `cfg` is a validated config. With `log_to_file` the child's output goes to RUN_DIR/train.log, else it is
    inherited (a terminal shows the progress bar).
    """
    target = prepare_run(cfg, resume_dir=resume_dir, run_dir=run_dir)
    rd = RunDir(target)
    resume = resume_dir is not None
    cmd = build_command(cfg, target, resume=resume, python=python, use_cpu=use_cpu)
    child_env = dict(os.environ)
    child_env.update(cmd["env"])
    child_env.update(env or {})
    root = str(Path(__file__).resolve().parent.parent)
    child_env["PYTHONPATH"] = root + (os.pathsep + child_env["PYTHONPATH"] if child_env.get("PYTHONPATH") else "")
    log = open(rd.log, "ab") if log_to_file else None
    # Its own process group (a session on POSIX), so a stop reaches every process and the run outlives the UI.
    group = ({"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if WINDOWS  # type: ignore[attr-defined]
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
    rd.write_lock(proc.pid, command=cmd["argv"], pgid=proc.pid)
    return RunHandle(target, proc, log=log)


def attach(run_dir: "str | os.PathLike[str]") -> Optional[RunHandle]:
    """A handle on a running run started by another process (None when it is not running)."""
    pid = RunDir(run_dir).live_pid()
    return RunHandle(run_dir, pid=pid) if pid else None


def request_stop(run_dir: "str | os.PathLike[str]") -> None:
    """Ask the trainer to finish its current step, save and exit 0 (the STOP file)."""
    RunDir(run_dir).request_stop()


def stop_run(run_dir: "str | os.PathLike[str]", *, timeout: float = 0.0, force: bool = False,
             handle: Optional[RunHandle] = None) -> Optional[int]:
    """Stop a run: the STOP file first (every process of a multi-GPU run stops together at a step boundary;
    under torchrun a SIGTERM kills workers after 30 s); after `timeout` s without exit SIGTERM, then SIGKILL
    after as long again. `force` kills at once (SIGKILL to the process group). Returns the exit code when the
    run ended within the timeouts, else None (still stopping).
    """
    handle = handle or attach(run_dir)
    if handle is None:
        return recorded_exit(run_dir) if RunDir(run_dir).exit_file.exists() else None
    if force:
        signal_group(handle.pid, SIGKILL)
        try:
            return handle.wait(30)
        except subprocess.TimeoutExpired:  # not gone yet (e.g. stuck in the kernel): report "still stopping"
            return None
    request_stop(run_dir)
    if timeout <= 0:
        return handle.poll()
    for sig in (None, signal.SIGTERM, SIGKILL):
        if sig is not None:
            signal_group(handle.pid, sig)
        try:
            return handle.wait(timeout)
        except subprocess.TimeoutExpired:
            continue
    return None
