"""Defects of the trainer as it runs on a CUDA GPU, each reproduced on the CPU: the EMA's device-to-host copy
ordering (a stand-in for the CUDA stream and event), bf16-rounded frozen parts in saved checkpoints, fp16
overflow-skipped updates, several processes with a trained text encoder and clip skip 2, and a run that counts
as ended only when its trainer process has exited."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from bp_trainer.train.ema import EMA
from conftest import tiny_run_raw


class DeferredCopier:
    """Behaves like the CUDA side stream: `start` only queues the copy; the copy really happens when the
    queue runs — at `wait_before_write` (the main stream waits for it before the next optimizer step) or at
    `finish` (the host waits for the event). An EMA that lets the optimizer write the parameters without
    `wait_before_write` reads values written after the update: the race of non_blocking copies."""

    def __init__(self, params):
        self.buffers = [torch.empty_like(p) for p in params]
        self.queued = None
        self.calls = []

    def _run(self):
        if self.queued is not None:
            for buf, p in zip(self.buffers, self.queued):
                buf.copy_(p)
            self.queued = None

    def start(self, params):
        self.calls.append("start")
        self.queued = list(params)

    def wait_before_write(self):
        self.calls.append("wait")
        self._run()

    def finish(self):
        self.calls.append("finish")
        self._run()
        return self.buffers


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))


def _ema_after_updates(wait_before_write: bool):
    model = _model()
    copier = {}
    ema = EMA(model, decay=0.5, warmup=False, async_copy=True,
              copier_factory=lambda params: copier.setdefault("c", DeferredCopier(params)))
    reference = [p.detach().clone() for p in model.parameters()]
    for step in range(3):
        ema.update(model)  # the copy is queued, not done
        at_update = [p.detach().clone() for p in model.parameters()]
        reference = [r.lerp(a, 0.5) for r, a in zip(reference, at_update)]
        if wait_before_write:
            ema.before_optimizer_step()
        with torch.no_grad():  # the next optimizer step writes the parameters
            for p in model.parameters():
                p.add_(1.0 + step)
    return ema, reference, copier["c"]


def test_ema_reads_the_parameters_as_they_were_at_the_update():
    ema, reference, copier = _ema_after_updates(wait_before_write=True)
    got = list(ema.state_dict().values())
    assert all(torch.equal(g, r) for g, r in zip(got, reference))
    assert copier.calls[:3] == ["start", "wait", "finish"]  # the host lerps only after the copy completed


def test_without_the_wait_the_copy_would_read_later_values():  # the check above can fail
    ema, reference, _ = _ema_after_updates(wait_before_write=False)
    assert not all(torch.equal(g, r) for g, r in zip(ema.state_dict().values(), reference))


class _Optimizer:
    def __init__(self, skipped):
        self.param_groups = [{"lr": 0.0, "base_lr": 1.0, "params": []}]
        self.step_was_skipped = skipped
        self.steps = 0

    def step(self):
        self.steps += 1

    def zero_grad(self, set_to_none=True):
        pass


def _loop_for_update(skipped: bool):
    from bp_trainer.train.config import validate
    from bp_trainer.train.loop import TrainLoop

    loop = TrainLoop.__new__(TrainLoop)
    loop.cfg = validate({"training": {"lr_warmup_steps": 10, "max_grad_norm": 0}, "ema": {"every_n_steps": 1}},
                        check_paths=False)
    loop.optimizer, loop.step, loop.total_steps, loop.skipped_updates = _Optimizer(skipped), 3, 100, 0
    loop.ema = SimpleNamespace(updates=0, before_optimizer_step=lambda: None)
    loop.ema.update = lambda model: setattr(loop.ema, "updates", loop.ema.updates + 1)
    loop.raw_unet, loop.acc = None, SimpleNamespace()
    return loop


def test_an_fp16_overflow_skipped_update_advances_neither_step_schedule_nor_ema():
    loop = _loop_for_update(skipped=True)
    loop.set_lr()
    assert loop.update() is False
    assert (loop.step, loop.skipped_updates, loop.ema.updates) == (3, 1, 0)
    lr_skipped = loop.optimizer.param_groups[0]["lr"]
    loop.optimizer.step_was_skipped = False
    loop.set_lr()
    assert loop.update() is True  # the retried update uses the same point of the schedule
    assert loop.optimizer.param_groups[0]["lr"] == lr_skipped == pytest.approx(0.3)
    assert (loop.step, loop.ema.updates) == (4, 1)


# ------------------------------------------------------------------------------------------------ runs


def _raw(model_dir, data, runs, **sections):
    return tiny_run_raw(model_dir, data, runs, ema={"enabled": False}, **sections)


@pytest.mark.slow
def test_bf16_training_saves_the_frozen_parts_bit_equal_to_the_base(tiny_model_dir, small_dataset, tmp_path):
    """The frozen text encoder and VAE are cast to bf16 for training; the saved fp32 checkpoint must hold them as
    loaded, not bf16-rounded."""
    from bp_trainer.checkpoint.convert import load_diffusers_components
    from bp_trainer.train.config import validate
    from bp_trainer.train.run import train

    cfg = validate(_raw(tiny_model_dir, small_dataset, tmp_path, training={"max_steps": 1, "mixed_precision": "bf16"},
                        saving={"precision": "fp32"}))
    result = train(cfg, tmp_path / "run", install_signals=False)
    base = load_diffusers_components(tiny_model_dir)
    saved = load_diffusers_components(result["files"]["webui"]["path"])
    for part in ("text_encoder", "vae"):
        want, got = base[part].state_dict(), saved[part].state_dict()
        assert all(torch.equal(got[k].float(), want[k].float()) for k in want if k in got), part
    assert "bf16" in json.dumps([json.loads(x) for x in (tmp_path / "run" / "events.jsonl").read_text().splitlines()
                                 if '"start"' in x][0]["mixed_precision"])


@pytest.mark.slow
def test_two_processes_train_the_text_encoder_with_clip_skip_2(tiny_model_dir, small_dataset, tmp_path):
    """DDP needs every trainable parameter to get a gradient: the CLIP layer skipped by clip skip 2 is frozen
    (this run crashed at step 2 before)."""
    from bp_trainer import launcher
    from bp_trainer.train.config import validate
    from bp_trainer.train.events import read_all

    cfg = validate(_raw(tiny_model_dir, small_dataset, tmp_path / "runs", run={"num_processes": 2},
                        training={"max_steps": 3, "batch_size": 1, "train_text_encoder": True},
                        model={"clip_skip": 2}))
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    handle = launcher.start_run(cfg, use_cpu=True, env=env)
    code = handle.wait(timeout=600)
    log = (handle.run_dir / "train.log").read_text(errors="replace")
    assert code == 0, log[-3000:]
    done = [e for e in read_all(handle.run_dir) if e["type"] == "done"]
    assert done and done[-1]["step"] == 3


def test_a_run_has_ended_only_when_its_trainer_exited(tmp_path):
    """accelerate's launcher can exit (SIGTERM) while the trainer still saves: the GPU is not free yet."""
    from bp_trainer import launcher
    from bp_trainer.rundir import RunDir

    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2.5)"])
    RunDir(tmp_path).write_trainer_pid(trainer.pid)
    quick = subprocess.Popen([sys.executable, "-c", "pass"])
    handle = launcher.RunHandle(tmp_path, quick)
    quick.wait()
    try:
        assert handle.poll() is None  # the launcher is gone, the trainer is not
        deadline = time.monotonic() + 30
        while handle.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert trainer.poll() is not None and handle.poll() == 0
    finally:
        trainer.kill()
        trainer.wait()
