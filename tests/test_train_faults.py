"""Training faults: a diverging run stops at once without publishing non-finite weights, `--check` refuses
non-finite and out-of-range numbers, relative run folders work, and an error inside the trainer reaches the
user as one line with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bp_trainer.errors import BPError
from bp_trainer.train import config as C
from bp_trainer.train.events import read_all
from conftest import tiny_run_raw

ROOT = Path(__file__).resolve().parent.parent


def _raw(model_dir, data, runs, **sections):
    base = {"training": {"seed": 3, "max_steps": 6}, "ema": {"every_n_steps": 1},
            "saving": {"every_n_epochs": 0, "every_n_steps": 2}}
    for sec, body in sections.items():
        base[sec] = {**base.get(sec, {}), **body}
    return tiny_run_raw(model_dir, data, runs, **base)


@pytest.mark.slow
def test_a_nan_loss_stops_the_run_and_publishes_nothing_non_finite(tiny_model_dir, small_dataset, tmp_path,
                                                                   monkeypatch):
    from bp_trainer.train import loop as loop_mod
    from bp_trainer.train.run import train
    from bp_trainer.train.state import latest_state

    real, calls = loop_mod.diffusion_loss, []

    def diverging(*args, **kw):  # the 4th update's loss is NaN, as when a learning rate far too high diverges
        calls.append(1)
        loss = real(*args, **kw)
        return loss * float("nan") if len(calls) >= 4 else loss

    monkeypatch.setattr(loop_mod, "diffusion_loss", diverging)
    cfg = C.validate(_raw(tiny_model_dir, small_dataset, tmp_path))
    run_dir = tmp_path / "run"
    with pytest.raises(BPError, match="loss became nan at step 4"):
        train(cfg, run_dir, install_signals=False)
    events = read_all(run_dir)
    error = [e for e in events if e["type"] == "error"]
    assert error and "step 4" in error[-1]["message"] and "learning_rate" in error[-1]["message"]
    assert [e["step"] for e in events if e["type"] == "checkpoint"] == [2]  # nothing saved after the NaN
    assert latest_state(run_dir).name == "step-00000002"  # the last good state stays resumable
    monkeypatch.setattr(loop_mod, "diffusion_loss", real)
    stale = run_dir / "checkpoints" / ".f-s000004.safetensors.1a2b3c4d.partial"  # a write a kill cut short
    stale.write_bytes(b"\0" * 64)
    result = train(cfg, run_dir, resume=True, install_signals=False)
    assert result["step"] == 6 and not stale.exists()


@pytest.mark.slow
def test_a_full_disk_while_saving_the_state_is_one_line_and_keeps_the_last_state(tiny_model_dir, small_dataset,
                                                                                 tmp_path, monkeypatch):
    import errno

    from bp_trainer.train import state as state_mod
    from bp_trainer.train.run import train

    real, saves = state_mod.save_state, []

    def full_disk(accelerator, run_dir, **kw):
        saves.append(kw["step"])
        if len(saves) >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(accelerator, run_dir, **kw)

    monkeypatch.setattr(state_mod, "save_state", full_disk)
    cfg = C.validate(_raw(tiny_model_dir, small_dataset, tmp_path))
    with pytest.raises(BPError) as err:
        train(cfg, tmp_path / "run", install_signals=False)
    message = str(err.value)
    assert "No space left on device" in message and "\n" not in message and "state" in message
    assert state_mod.latest_state(tmp_path / "run").name == "step-00000002"


@pytest.mark.parametrize("training, fragment", [({"learning_rate": ".nan"}, "training.learning_rate"),
                                                ({"learning_rate": 1.0e8}, "training.learning_rate"),
                                                ({"seed": 12345678901234567890}, "training.seed"),
                                                ({"noise_offset": float("inf")}, "training.noise_offset")])
def test_check_refuses_non_finite_and_out_of_range_numbers(tmp_path, capsys, training, fragment):
    from bp_trainer import cli
    from conftest import write_model_header

    (tmp_path / "d").mkdir()
    raw = {"model": {"base": str(write_model_header(tmp_path / "m.safetensors"))}, "dataset": {"path": str(tmp_path / "d")}}
    text = yaml.safe_dump({**raw, "training": training})
    path = tmp_path / "run.yaml"
    path.write_text(text.replace("'.nan'", ".nan"), encoding="utf-8")
    assert cli.main(["train", "--config", str(path), "--check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0]


def test_relative_run_folders_resolve_before_the_child_starts_in_them(tmp_path, monkeypatch):
    """The child runs inside its run folder: `--run-dir runs/NAME` (or `--resume runs/NAME`) must not be
    resolved from there (it was: FileNotFoundError ... accelerate.yaml)."""
    from bp_trainer import launcher

    monkeypatch.chdir(tmp_path)
    cfg = C.validate({"run": {"num_processes": 2}}, check_paths=False)
    target = launcher.prepare_run(cfg, run_dir="runs/rel")
    assert target == tmp_path / "runs" / "rel" and target.is_absolute()
    for resume in (False, True):
        cmd = launcher.build_command(cfg, "runs/rel", resume=resume, use_cpu=True)
        os.chdir(target)  # where the child runs
        try:
            assert Path(cmd["accelerate_config"]).is_file()
            i = cmd["argv"].index("bp_trainer.train")
            assert Path(cmd["argv"][i + 1]).is_file() and Path(cmd["argv"][i + 3]).is_dir()
        finally:
            os.chdir(tmp_path)
    assert launcher.prepare_run(cfg, resume_dir="runs/rel") == target


@pytest.mark.slow
def test_an_error_inside_the_trainer_is_one_line_with_exit_code_2(tiny_model_dir, tmp_path):
    """A dataset with no usable image is found by the trainer child (the config check only sees a folder)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("no images here")
    raw = _raw(tiny_model_dir, data, tmp_path / "runs")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT),
               HF_HOME=str(tmp_path / "hf"), ACCELERATE_USE_CPU="true")
    proc = subprocess.run([sys.executable, "-m", "bp_trainer", "train", "--config", str(path)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and "no usable images" in errors[0] and str(data) in errors[0]
    assert "Traceback" not in proc.stderr and "CalledProcessError" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("training", [{"memory": "lean"}, {"optimizer": "adafactor"}], ids=["lean", "adafactor"])
def test_lean_options_train_and_resume_bit_exactly(tiny_model_dir, small_dataset, tmp_path, training):
    """Adafactor, fused backward and bf16 weights through the real loop: a run stopped after its first save and
    resumed ends with the same weights as an uninterrupted one."""
    from bp_trainer.train.run import train

    def final_digest(run_dir):
        lines = (run_dir / "batches-rank0.jsonl").read_text().splitlines()
        return [json.loads(x)["weights"] for x in lines if '"final"' in x][-1]

    def cfg_for(runs, **saving):
        raw = _raw(tiny_model_dir, small_dataset, runs, training={**training, "max_steps": 4, "mixed_precision": "bf16"},
                   logging={"record_batches": True}, saving={"every_n_steps": 2, **saving})
        return C.validate(raw)

    full = train(cfg_for(tmp_path / "a"), tmp_path / "a" / "run", install_signals=False)
    assert full["step"] == 4
    part_dir = tmp_path / "b" / "run"
    cfg = cfg_for(tmp_path / "b")
    if training.get("memory") == "lean":
        assert (cfg.training.optimizer, cfg.training.fused_backward, cfg.training.weights) == ("adafactor", True, "bf16")
    (part_dir).mkdir(parents=True)
    (part_dir / "STOP").write_text("x")  # stops after the first update: saved at step 1
    stopped = train(cfg, part_dir, install_signals=False)
    assert stopped["reason"] == "stopped" and stopped["step"] == 1
    (part_dir / "STOP").unlink()
    resumed = train(cfg, part_dir, resume=True, install_signals=False)
    assert resumed["step"] == 4
    assert final_digest(part_dir) == final_digest(tmp_path / "a" / "run")
