"""Resume and stop: resumable training states in RUN_DIR/state, and the stop request.

A state is `state/step-NNNNNNNN/`, written by accelerate's `save_state` (models, optimizer, global RNG
states of every process) plus ours: `ema.safetensors` (the EMA UNet, fp32), `trainer.json` (step, epoch,
batches consumed in the epoch, the bucket sampler's state, the EMA's update count), `rng-rankN.pt`
(the noise generator of each process) and `embeddings.safetensors` (the tag embeddings' vectors, if any).
It is written under `state/.tmp-step-NNNNNNNN` and renamed when complete, so a `kill -9` at any moment
leaves every `step-*` folder complete: the newest one is the resume point. Older states beyond
`saving.keep_states` are deleted after a new one is complete.

Stopping: SIGINT/SIGTERM or a `STOP` file in the run folder set a flag; the trainer checks it after
every optimizer step (all processes agree through one all-reduce), saves and exits 0. A second SIGINT
aborts at once (the last complete state stays).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from bp_trainer.fsutil import fsync_dir
from bp_trainer.rundir import RunDir
_STEP_RE = re.compile(r"^step-(\d+)$")


class StopFlag:
    """Set by SIGINT/SIGTERM or by RUN_DIR/STOP; `requested(accelerator)` is the same on every process."""

    def __init__(self, run_dir: "str | os.PathLike[str]", install_signals: bool = True):
        self.stop_file = RunDir(run_dir).stop_file
        self.signal_received: Optional[int] = None
        self._previous: Dict[int, Any] = {}
        if install_signals:
            sigs = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGBREAK] if hasattr(signal, "SIGBREAK") else [])
            for sig in sigs:  # SIGBREAK: the launcher's graceful stop on Windows
                try:
                    self._previous[sig] = signal.signal(sig, self._handle)
                except ValueError:  # not the main thread (e.g. a UI running the trainer in-process)
                    pass

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl+C: abort now
        self.signal_received = signum

    def local(self) -> bool:
        return self.signal_received is not None or self.stop_file.exists()

    def requested(self, accelerator: Any = None) -> bool:
        flag = self.local()
        if accelerator is not None and accelerator.num_processes > 1:
            t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
            t = accelerator.reduce(t, reduction="sum")
            return bool(t.item() > 0)
        return flag

    def reason(self) -> str:
        if self.signal_received is not None:
            return signal.Signals(self.signal_received).name
        return "stop file"

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            try:
                signal.signal(sig, handler)
            except (ValueError, TypeError):
                pass
        self._previous = {}


def list_states(run_dir: "str | os.PathLike[str]") -> List[Path]:
    """Complete states, oldest first."""
    root = RunDir(run_dir).state_dir
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_state(run_dir: "str | os.PathLike[str]") -> Optional[Path]:
    states = list_states(run_dir)
    return states[-1] if states else None


def save_state(accelerator: Any, run_dir: "str | os.PathLike[str]", *, step: int, trainer: Dict[str, Any],
               ema: Any, generator: torch.Generator, keep: int, embeddings: Any = None) -> Path:
    """Write a complete resumable state (every process must call this); `embeddings`: the run's tag embeddings,
    whose vectors go to `embeddings.safetensors` (read back by `TagEmbeddings.load_state`)."""
    root = RunDir(run_dir).state_dir
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    torch.save({"generator": generator.get_state()}, tmp / f"rng-rank{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        if ema is not None:
            from safetensors.torch import save_file

            save_file({k: v.detach().to("cpu").contiguous() for k, v in ema.state_dict().items()},
                      str(tmp / "ema.safetensors"))
            trainer = dict(trainer, ema_updates=ema.num_updates)
        if embeddings is not None:
            embeddings.save_state(tmp)
        (tmp / "trainer.json").write_text(json.dumps(trainer, indent=1), encoding="utf-8")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for f in tmp.rglob("*"):  # DeepSpeed writes sub-folders
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        for old in list_states(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_state(accelerator: Any, state_dir: Path, *, ema: Any, generator: torch.Generator) -> Dict[str, Any]:
    """Restore a state written by `save_state`; returns trainer.json's counters.

    Tensors are read straight onto the training device (`map_location="on_device"`): accelerate's default on one
    GPU reads the whole optimizer state into host RAM first (AdamW's fp32 states of SD 1.5 are 9.6 GiB, more than
    many 8 GB-card machines have spare), then copies it over. On the device the states land where they stay, and
    the models' transient copy (one UNet) comes before any optimizer state exists, so the GPU peak stays below a
    training step's. On a CPU both are the same memory."""
    on_device = getattr(accelerator.device, "type", "cpu") != "cpu"  # (accelerate names a CPU "cpu:0": refused)
    accelerator.load_state(str(state_dir), map_location="on_device" if on_device else "cpu")
    trainer = json.loads((state_dir / "trainer.json").read_text(encoding="utf-8"))
    rng_file = state_dir / f"rng-rank{accelerator.process_index}.pt"
    if rng_file.exists():
        generator.set_state(torch.load(rng_file, weights_only=True)["generator"])
    if ema is not None:
        from safetensors.torch import load_file

        ema_file = state_dir / "ema.safetensors"
        if ema_file.exists():
            ema.load_state_dict(load_file(str(ema_file)), trainer.get("ema_updates", 0))
    return trainer
