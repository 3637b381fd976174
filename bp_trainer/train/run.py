"""One training process: the accelerator, the events, the run folder's pid/lock, the stop flag, and a
`TrainLoop` (bp_trainer/train/loop.py) that does the training.

Run it with `accelerate launch -m bp_trainer.train RUN.yaml` (any accelerate config: several GPUs, machines,
DeepSpeed) or through `bp-train train` (which launches that for you).
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from typing import Any, Callable, Dict, Optional

import torch

from bp_trainer.errors import BPError
from bp_trainer.rundir import RunDir
from bp_trainer.train import state as state_mod
from bp_trainer.train.config import RunConfig
from bp_trainer.train.events import EventWriter

# rank 0 may save and sample for minutes while the others wait in a collective: longer than NCCL's default
# (10 min on torch >= 2.2) so a slow save on a big model does not kill the run
COLLECTIVE_TIMEOUT = timedelta(hours=2)


class Progress:
    """tqdm in a terminal (main process), nothing otherwise."""

    def __init__(self, total: int, initial: int):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, loss: float, lr: float) -> None:
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        self.bar.update(1)

    def write(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()


def gpu_capability() -> "tuple[int, int] | None":
    """This process's GPU's compute capability (None without CUDA)."""
    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability())  # type: ignore[return-value]


def avoid_cpu_flash_attention(device: Any, version: str = torch.__version__) -> bool:
    """torch 2.1's CPU flash-attention kernel corrupts memory in a bf16 backward pass at SD 1.5's head sizes (the
    process dies with "double free or corruption"; found with the full-size UNet in the WebUI's trainer environment,
    torch 2.1.2; torch 2.13 is fine). On a CPU with torch < 2.2, SDPA takes its math path instead: the CPU kernel
    obeys CUDA's flash switch. True when it did so. (The memory estimate never runs kernels and keeps the flash
    path's O(n) memory.)"""
    major, minor = (int(x) for x in version.split(".")[:2])
    if getattr(device, "type", "cpu") != "cpu" or (major, minor) >= (2, 2):
        return False
    torch.backends.cuda.enable_flash_sdp(False)
    return True


def make_accelerator(cfg: RunConfig, rd: RunDir) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration

    from bp_trainer.launcher import choose_precision

    log_with = None
    if cfg.logging.tensorboard:
        try:
            import tensorboard  # noqa: F401

            log_with = "tensorboard"
        except ImportError:
            log_with = None
    from bp_trainer.train.base_check import base_model_arch

    mixed = choose_precision(cfg.training.mixed_precision, gpu_capability(), arch=base_model_arch(cfg.model.base))
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 on Ampere+ (no effect elsewhere)
        torch.backends.cudnn.allow_tf32 = True
    # a run in a process that trained before (tests, a foreground UI run) chooses its own precision; the
    # distributed state (PartialState: the process group) is kept
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=mixed, log_with=log_with,
                       project_config=ProjectConfiguration(project_dir=str(rd.path), logging_dir=str(rd.logs)),
                       kwargs_handlers=[InitProcessGroupKwargs(timeout=COLLECTIVE_TIMEOUT),
                                        # gradients live in DDP's buckets: no second gradient copy per process
                                        DistributedDataParallelKwargs(gradient_as_bucket_view=True)])


def train(cfg: RunConfig, run_dir: "str | os.PathLike[str]", *, resume: bool = False,
          on_event: Optional[Callable[[Dict[str, Any]], None]] = None, install_signals: bool = True) -> Dict[str, Any]:
    """Run (or resume) one training run in RUN_DIR; returns {"reason", "step", "outputs", "files"}."""
    from bp_trainer.train.loop import TrainLoop

    rd = RunDir(os.path.abspath(run_dir))
    accelerator = make_accelerator(cfg, rd)
    avoid_cpu_flash_attention(accelerator.device)
    main = accelerator.is_main_process
    if main:
        rd.path.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    bar = cfg.logging.progress_bar
    use_bar = main and (bar == "true" or (bar == "auto" and sys.stderr.isatty()))
    events = EventWriter(rd, enabled=main, echo="human" if use_bar else ("json" if main else "none"))
    if on_event is not None and main:
        events.listeners.append(on_event)
    if cfg.training.mixed_precision == "fp16" and accelerator.mixed_precision == "no":
        events.emit("warning", message="mixed precision fp16 needs a GPU; training in fp32")
    lock_owned = main and _claim_run_dir(rd)
    stop = state_mod.StopFlag(rd, install_signals=install_signals)
    try:
        progress = None
        cfg, plan = resolve_memory_plan(cfg, rd, accelerator)
        loop = TrainLoop(cfg, rd, accelerator, events, stop)
        loop.memory_plan = plan
        loop.setup(resume=resume)
        if use_bar:
            progress = loop.progress = Progress(loop.total_steps, loop.step)
            events.printer = progress.write
        return loop.run()
    except BaseException as exc:
        msg = str(exc) if isinstance(exc, BPError) else f"{type(exc).__name__}: {exc}"
        if isinstance(exc, KeyboardInterrupt):
            msg = "aborted (second interrupt); the last complete state is kept"
        events.emit("error", message=msg)
        raise
    finally:
        stop.restore()
        accelerator.end_training()
        events.close()
        if main:
            rd.trainer_pid_file.unlink(missing_ok=True)
        if lock_owned:
            rd.release_lock(os.getpid())


def resolve_memory_plan(cfg: RunConfig, rd: RunDir, accelerator: Any) -> "tuple[RunConfig, Optional[Dict[str, Any]]]":
    """`training.memory: auto`: the fastest option set whose pre-flight estimate fits this process's GPU (or
    `training.vram_gb`), written into the run's config.yaml (a resume keeps it); the report goes into the start
    event. Other values are resolved by the config check already."""
    if cfg.training.memory != "auto":
        return cfg, None
    from bp_trainer.train.config import save_config
    from bp_trainer.train.estimate import estimate_run
    from bp_trainer.train.memory_plan import choose

    if cfg.training.vram_gb:
        budget = int(cfg.training.vram_gb * 2**30)
    elif accelerator.device.type == "cuda":
        budget = int(torch.cuda.mem_get_info(accelerator.device)[0])
    else:
        budget = 2**62  # no GPU: memory is not the limit, the fastest set is chosen
    cfg, report = choose(cfg, budget, lambda c: estimate_run(c)["peak_bytes"])
    if accelerator.is_main_process:
        save_config(cfg, rd.config)
    return cfg, report


def _claim_run_dir(rd: RunDir) -> bool:
    """Write trainer.pid, and run.lock when no launcher holds it (started by `accelerate launch` directly)."""
    from bp_trainer.procs import pid_alive

    owned = False
    if not pid_alive(rd.lock_pid()):
        rd.write_lock(os.getpid(), command=sys.argv)
        owned = True
    rd.write_trainer_pid(os.getpid())
    return owned
