"""The process model: the accelerate command, run locks and re-attach, 2-process data parallel on CPU (gloo),
graceful stop, kill -9 and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from bp_trainer import launcher
from bp_trainer.rundir import RunDir
from bp_trainer.train import config as C
from bp_trainer.train.events import read_all

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from bp_trainer.dataset.demo import write_demo_dataset

    out = tmp_path_factory.mktemp("ldata") / "ds"
    write_demo_dataset(out, count=9, seed=5)
    return out


def cfg_for(model: Path, data: Path, runs: Path, **sections) -> dict:
    raw = {
        "run": {"name": "l", "runs_dir": str(runs)},
        "model": {"base": str(model)},
        "dataset": {"path": str(data)},
        "arb": {"base_res": [64, 64], "max_size": [96, 64], "divisible": 32, "min_dim": 32, "dim_limit": 128},
        "training": {"batch_size": 2, "learning_rate": 1e-3, "seed": 11},
        "ema": {"decay": 0.9, "every_n_steps": 1},
        "saving": {"every_n_epochs": 0, "ema_unet_fp32": False},
        "logging": {"tensorboard": False, "progress_bar": "false"},
    }
    for sec, body in sections.items():
        raw.setdefault(sec, {}).update(body)
    return C.validate(raw)


def _env(tmp_path: Path) -> dict:
    # our own HF_HOME: no stray default accelerate config is picked up
    return {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "OMP_NUM_THREADS": "1"}


def _parsed(argv):
    """argv as accelerate's own `launch` parser reads it (the independent truth of what the command means)."""
    from accelerate.commands.launch import launch_command_parser

    assert argv[1:3] == ["-m", "accelerate.commands.launch"]
    return launch_command_parser().parse_args(argv[3:])


def test_command_for_one_and_several_processes(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = C.validate({"run": {"num_processes": 2}, "training": {"mixed_precision": "bf16"}}, check_paths=False)
    cmd = launcher.build_command(cfg, tmp_path, use_cpu=True, python="/opt/py/bin/python")
    args = _parsed(cmd["argv"])
    assert cmd["argv"][0] == "/opt/py/bin/python"
    assert (args.num_processes, args.multi_gpu, args.cpu, args.mixed_precision) == (2, True, False, "bf16")
    assert args.module and args.training_script == "bp_trainer.train"
    assert args.training_script_args == [str(tmp_path / "config.yaml"), "--run-dir", str(tmp_path)]
    assert args.num_cpu_threads_per_process >= 1  # passed, so accelerate does not warn and guess
    # several CPU processes need MULTI_GPU + ACCELERATE_USE_CPU (gloo); --cpu would run one process
    assert cmd["env"]["ACCELERATE_USE_CPU"] == "true"
    acc = load_config_from_file(cmd["accelerate_config"])
    assert str(acc.distributed_type).endswith("MULTI_GPU") and acc.num_processes == 2 and not acc.use_cpu

    # one process runs the trainer directly (its one-line errors and exit code reach the user unwrapped); the
    # Accelerator inside reads the same settings from accelerate's environment variables
    one = launcher.build_command(C.validate({}, check_paths=False), tmp_path, use_cpu=True, resume=True)
    assert one["argv"] == [sys.executable, "-m", "bp_trainer.train", str(tmp_path / "config.yaml"),
                           "--run-dir", str(tmp_path), "--resume"]
    assert one["env"]["ACCELERATE_USE_CPU"] == "true" and one["env"]["ACCELERATE_MIXED_PRECISION"] == "no"

    own = tmp_path / "my_accelerate.yaml"
    own.write_text("distributed_type: DEEPSPEED\n")
    mine = C.validate({"run": {"accelerate_config": str(own), "python": "/venv/bin/python"}}, check_paths=False)
    args2 = _parsed(launcher.build_command(mine, tmp_path)["argv"])
    assert args2.config_file == str(own) and args2.num_processes is None  # the user's file decides


def test_mixed_precision_is_chosen_by_compute_capability():
    pick = launcher.choose_precision
    assert [pick("auto", cap) for cap in ((9, 0), (8, 6), (8, 0), (7, 5), (7, 0), (6, 1))] == \
        ["bf16", "bf16", "bf16", "fp16", "fp16", "fp16"]  # T4/V100/RTX 20xx (7.x) have no native bf16
    assert pick("auto", (7, 5), arch="sd2") == "no"  # SD 2.x overflows in fp16
    assert [pick(v, None) for v in ("auto", "fp16", "bf16", "no")] == ["no", "no", "bf16", "no"]
    assert pick("fp16", (8, 0)) == "fp16" and pick("bf16", (7, 5)) == "bf16"  # an explicit choice stands
    # the launcher decides `auto` without touching a GPU: the trainer picks it from its own device
    assert launcher.launch_precision("auto", use_cpu=False) == "no"
    assert launcher.launch_precision("fp16", use_cpu=False) == "fp16"
    for preset in ("768", "1024"):
        assert C.preset(preset).get("training", {}).get("mixed_precision", "auto") == "auto"


def test_a_trainer_python_that_does_not_exist_is_a_clear_error_and_leaves_no_run_folder(tiny_model_dir, dataset,
                                                                                        tmp_path):
    from bp_trainer.errors import BPError

    runs = tmp_path / "runs"
    cfg = cfg_for(tiny_model_dir, dataset, runs)
    missing = str(tmp_path / "no-venv" / "bin" / "python")
    with pytest.raises(BPError, match="cannot start the trainer") as err:
        launcher.start_run(cfg, python=missing, use_cpu=True)
    assert missing in str(err.value)
    assert not runs.exists() or not any(runs.iterdir())


def test_find_active_run_ignores_stale_locks(tmp_path):
    live, dead = tmp_path / "a-live", tmp_path / "b-dead"
    for d in (live, dead):
        d.mkdir()
        (d / "config.yaml").write_text("{}")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        RunDir(live).write_lock(proc.pid)
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        RunDir(dead).write_lock(gone.pid)
        (dead / "events.jsonl").write_text(json.dumps({"type": "start", "total_steps": 9}) + "\n")
        assert launcher.find_active_run(tmp_path) == live
        runs = {Path(r["run_dir"]).name: r for r in launcher.list_runs(tmp_path)}
        assert runs["a-live"]["active"] and not runs["b-dead"]["active"]
        assert runs["b-dead"]["status"] == "interrupted"
        handle = launcher.attach(live)
        assert handle is not None and handle.pid == proc.pid and handle.poll() is None
        assert launcher.attach(dead) is None
        with pytest.raises(Exception, match="already running"):
            launcher.prepare_run(C.validate({}, check_paths=False), resume_dir=live)
    finally:
        proc.kill()
        proc.wait()
    assert launcher.find_active_run(tmp_path) is None


def test_resuming_a_run_whose_trainer_still_saves_after_its_lock_is_gone_is_a_bperror(tmp_path):
    run = tmp_path / "saving"
    run.mkdir()
    (run / "config.yaml").write_text("{}")
    RunDir(run).write_trainer_pid(os.getpid())  # alive; no run.lock
    with pytest.raises(launcher.BPError, match=f"already running.*pid {os.getpid()}"):
        launcher.prepare_run(C.validate({}, check_paths=False), resume_dir=run)


@pytest.mark.slow
def test_two_cpu_processes_train_data_parallel(tiny_model_dir, dataset, tmp_path):
    """accelerate launch --multi_gpu --num_processes 2 with ACCELERATE_USE_CPU: both ranks train on disjoint
    shards, every image once per epoch across ranks, and the weights stay identical."""
    from bp_trainer.buckets import ArbConfig
    from bp_trainer.dataset import BucketBatchSampler, scan_dataset

    cfg = cfg_for(tiny_model_dir, dataset, tmp_path / "runs", run={"num_processes": 2},
                  training={"epochs": 2, "batch_size": 1}, logging={"record_batches": True},
                  saving={"every_n_epochs": 1})
    handle = launcher.start_run(cfg, use_cpu=True, env=_env(tmp_path))
    code = handle.wait(timeout=400)
    log = (handle.run_dir / "train.log").read_text(errors="replace")
    assert code == 0, log[-3000:]
    events = read_all(handle.run_dir)
    start = next(e for e in events if e["type"] == "start")
    assert start["world_size"] == 2
    done = [e for e in events if e["type"] == "done"]
    assert done and done[-1]["reason"] == "finished"

    records = {r: [json.loads(line) for line in (handle.run_dir / f"batches-rank{r}.jsonl").read_text().splitlines()]
               for r in (0, 1)}
    finals = {r: recs[-1] for r, recs in records.items()}
    assert finals[0]["final"] and finals[0]["weights"] == finals[1]["weights"]  # in sync, bit for bit
    steps = {r: [b["step"] for b in recs if "items" in b] for r, recs in records.items()}
    assert steps[0] == steps[1] and len(steps[0]) == start["total_steps"]  # both ranks did every step

    scan = scan_dataset(dataset)
    rel = [os.path.relpath(it.path, dataset) for it in scan.items]
    ref = BucketBatchSampler.from_sizes([it.size for it in scan.items], cfg.arb, 1,
                                        seed=11, rank=0, world_size=2, base_res=(64, 64))
    for epoch in (0, 1):
        used = [item.split("#")[0] for r in (0, 1) for b in records[r] if b.get("epoch") == epoch
                for item in b["items"]]
        assert len(used) == len(set(used)), Counter(used).most_common(2)  # no image twice in an epoch
        skipped = {rel[i] for i in ref.skipped_this_epoch(epoch)}
        assert set(used) == set(rel) - skipped and not (set(used) & skipped)
        mine = {r: {i.split("#")[0] for b in records[r] if b.get("epoch") == epoch for i in b["items"]} for r in (0, 1)}
        assert mine[0] and mine[1] and not (mine[0] & mine[1])


@pytest.mark.slow
def test_kill_9_leaves_a_resumable_state_and_stop_file_stops_gracefully(tiny_model_dir, dataset, tmp_path):
    from bp_trainer.train.state import latest_state

    runs = tmp_path / "runs"
    cfg = cfg_for(tiny_model_dir, dataset, runs, training={"max_steps": 100000}, saving={"every_n_steps": 2})
    handle = launcher.start_run(cfg, use_cpu=True, env=_env(tmp_path))
    run_dir = handle.run_dir
    assert launcher.find_active_run(runs) == run_dir
    deadline = time.monotonic() + 300
    while not any(e["type"] == "checkpoint" for e in read_all(run_dir)):
        assert handle.poll() is None, (run_dir / "train.log").read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    launcher.stop_run(run_dir, force=True)  # SIGKILL to the whole process group, at whatever it is doing
    deadline = time.monotonic() + 30  # the kernel takes the process down asynchronously
    while handle.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert handle.poll() not in (None, 0)
    assert launcher.find_active_run(runs) is None
    state = latest_state(run_dir)
    assert state is not None and (state / "trainer.json").exists() and (state / "model.safetensors").exists()
    saved_step = json.loads((state / "trainer.json").read_text())["step"]
    # a save cut off half-way (the rename never happened) is ignored; the kill may have made one already
    partial = run_dir / "state" / f".tmp-step-{saved_step + 2:08d}"
    partial.mkdir(exist_ok=True)
    (partial / "model.safetensors").write_bytes(b"\0" * 10)
    assert latest_state(run_dir) == state

    again = launcher.start_run(cfg, resume_dir=run_dir, use_cpu=True, env=_env(tmp_path))
    deadline = time.monotonic() + 300
    while True:
        evs = read_all(run_dir)
        resumed = [e for e in evs if e["type"] == "start" and e.get("resumed_from_step") is not None]
        if resumed and any(e["type"] == "step" and e["step"] > saved_step + 1 for e in evs):
            break
        assert again.poll() is None, (run_dir / "train.log").read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert resumed[0]["resumed_from_step"] == saved_step
    code = launcher.stop_run(run_dir, timeout=120)  # as a re-attached UI: STOP file, the trainer saves, exits 0
    assert code == 0, (run_dir / "train.log").read_text()[-3000:]
    evs = read_all(run_dir)
    done = [e for e in evs if e["type"] == "done"][-1]
    assert done["reason"] == "stopped"
    last = [e for e in evs if e["type"] == "checkpoint"][-1]
    assert last["reason"].startswith("stop") and last["step"] == done["step"] > saved_step
    assert latest_state(run_dir).name == f"step-{done['step']:08d}"
    assert not (run_dir / "run.lock").exists() and launcher.find_active_run(runs) is None
    assert again.wait(timeout=30) == 0


@pytest.mark.slow
def test_sigterm_saves_and_exits_0(tiny_model_dir, dataset, tmp_path):
    """The trainer's own signal handling (foreground, no accelerate launcher in between)."""
    cfg = cfg_for(tiny_model_dir, dataset, tmp_path / "runs", training={"max_steps": 100000})
    path = tmp_path / "run.yaml"
    C.save_config(cfg, path)
    run_dir = tmp_path / "fg"
    env = dict(os.environ, **_env(tmp_path), PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "bp_trainer", "train", "--config", str(path), "--foreground",
                             "--run-dir", str(run_dir)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not any(e["type"] == "step" for e in read_all(run_dir)):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()[-3000:]
    evs = read_all(run_dir)
    assert evs[-1]["type"] == "done" and evs[-1]["reason"] == "stopped"
    ck = [e for e in evs if e["type"] == "checkpoint"][-1]
    assert ck["reason"] == "stop (SIGTERM)" and Path(ck["files"]["webui"]["path"]).exists()


@pytest.mark.slow
def test_two_process_run_resumes_exactly(tiny_model_dir, dataset, tmp_path):
    """Stop a 2-process run after its first save, resume it: losses and final weights equal an uninterrupted
    run's (per-rank sampler positions and noise generators are part of the state)."""
    def run(cfg, resume_dir=None):
        return launcher.start_run(cfg, resume_dir=resume_dir, use_cpu=True, env=_env(tmp_path))

    base = dict(run={"num_processes": 2}, training={"max_steps": 10, "batch_size": 1, "noise_offset": 0.05},
                logging={"record_batches": True}, dataset={"shuffle_tags": True, "caption_dropout": 0.2})
    full = launcher.start_run(cfg_for(tiny_model_dir, dataset, tmp_path / "a", **base), use_cpu=True,
                              env=_env(tmp_path))
    assert full.wait(timeout=400) == 0, (full.run_dir / "train.log").read_text()[-3000:]

    cfg = cfg_for(tiny_model_dir, dataset, tmp_path / "b", **base, saving={"every_n_steps": 2})
    part = run(cfg)
    deadline = time.monotonic() + 300
    while not any(e["type"] == "checkpoint" for e in read_all(part.run_dir)):
        assert part.poll() is None, (part.run_dir / "train.log").read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    launcher.request_stop(part.run_dir)
    assert part.wait(timeout=300) == 0
    stopped = [e for e in read_all(part.run_dir) if e["type"] == "done"][-1]
    assert stopped["reason"] == "stopped" and stopped["step"] < 10
    again = run(cfg, resume_dir=part.run_dir)
    assert again.wait(timeout=400) == 0, (part.run_dir / "train.log").read_text()[-3000:]

    def losses(d):
        return {e["step"]: e["loss"] for e in read_all(d) if e["type"] == "step"}

    starts = [e for e in read_all(part.run_dir) if e["type"] == "start"]
    assert [s["resumed_from_step"] for s in starts] == [None, stopped["step"]]
    assert losses(part.run_dir) == losses(full.run_dir) and len(losses(full.run_dir)) == 10

    def final_weights(d, rank):
        lines = (Path(d) / f"batches-rank{rank}.jsonl").read_text().splitlines()
        return [json.loads(x)["weights"] for x in lines if '"final"' in x][-1]

    for rank in (0, 1):
        assert final_weights(part.run_dir, rank) == final_weights(full.run_dir, 0)


@pytest.mark.slow
def test_sigterm_to_the_process_group_saves_and_the_handle_waits_for_the_trainer(tiny_model_dir, dataset, tmp_path):
    """The UI's escalation: SIGTERM to the whole group. `accelerate launch` itself dies at once, the trainer
    finishes its step and saves; the run counts as active (trainer.pid) until the trainer is done."""
    cfg = cfg_for(tiny_model_dir, dataset, tmp_path / "runs", training={"max_steps": 100000})
    handle = launcher.start_run(cfg, use_cpu=True, env=_env(tmp_path))
    deadline = time.monotonic() + 300
    while not any(e["type"] == "step" for e in read_all(handle.run_dir)):
        assert handle.poll() is None, (handle.run_dir / "train.log").read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert RunDir(handle.run_dir).trainer_pid() != 0
    launcher.signal_group(handle.pid, signal.SIGTERM)
    handle.wait(timeout=120)
    evs = read_all(handle.run_dir)
    assert evs[-1]["type"] == "done" and evs[-1]["reason"] == "stopped"
    assert [e for e in evs if e["type"] == "checkpoint"][-1]["reason"] == "stop (SIGTERM)"
    assert not RunDir(handle.run_dir).is_active() and launcher.find_active_run(tmp_path / "runs") is None


def test_list_runs_reads_a_runs_events_again_only_when_they_changed(tmp_path, monkeypatch):
    from bp_trainer.train import events as E

    run = tmp_path / "r1"
    run.mkdir()
    (run / "events.jsonl").write_text(json.dumps({"type": "start", "total_steps": 5}) + "\n")
    reads = []
    real = E.read_all
    monkeypatch.setattr(E, "read_all", lambda d: reads.append(str(d)) or real(d))
    assert launcher.list_runs(tmp_path)[0]["total_steps"] == 5
    assert launcher.list_runs(tmp_path)[0]["total_steps"] == 5
    assert len(reads) == 1  # the second /status poll used the cached summary
    with open(run / "events.jsonl", "a") as fh:
        fh.write(json.dumps({"type": "step", "step": 3, "total_steps": 5}) + "\n")
    assert launcher.list_runs(tmp_path)[0]["step"] == 3 and len(reads) == 2
