"""The Train tab's run controller: GPU hand-off, one run at a time, stop, re-attach, crash, checkpoint publishing.

The child process is a small stand-in trainer (it writes events with the real `EventWriter`, honours the
launcher's STOP file and writes a checkpoint file), started through the real launcher (`start_run`, run
lock, `attach`, `find_active_run`); only the launcher's command line is replaced. The real trainer is
driven end to end by the browser test.
"""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bp_trainer import launcher
from bp_trainer.errors import BPError
from bp_trainer.rundir import RunDir
from conftest import write_model_header
from bp_trainer import run_controller as runs
from bp_trainer.ui.standalone import StandaloneHost

FAKE_TRAINER = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    from bp_trainer.train.events import EventWriter

    run_dir = Path(sys.argv[1]); steps = int(sys.argv[2]); mode = sys.argv[3]
    ev = EventWriter(run_dir, echo="none")
    ev.emit("start", run_dir=str(run_dir), total_steps=steps, images=8, world_size=1)
    for step in range(1, steps + 1):
        if mode == "crash" and step == 2:
            print("Traceback (most recent call last):\\nRuntimeError: boom in the stand-in trainer", flush=True)
            sys.exit(3)
        time.sleep(0.05)
        ev.emit("step", step=step, epoch=0, loss=1.0 / step, lr=1e-4, images_per_second=10.0,
                eta_seconds=(steps - step) * 0.05, total_steps=steps)
        if step == 2:
            ck = run_dir / "checkpoints" / "fake-s000002.safetensors"
            ck.parent.mkdir(exist_ok=True)
            ck.write_bytes(b"checkpoint bytes " + str(step).encode())
            ev.emit("checkpoint", step=step, epoch=0, reason="every_n_steps", files={"webui": {"path": str(ck)}})
            ev.emit("sample", step=step, path=str(run_dir / "s.png"), prompt="1girl", ema=False)
        if (run_dir / "STOP").exists():
            (run_dir / "state" / f"step-{step}").mkdir(parents=True, exist_ok=True)
            ev.emit("done", step=step, reason="stopped", outputs={})
            sys.exit(0)
    ev.emit("done", step=steps, reason="finished", outputs={})
    """
)


class RecordingHost(StandaloneHost):
    """The standalone host, recording the GPU hand-off and model-list refreshes."""

    name = "test"

    def __init__(self, root: Path, **kw):
        super().__init__(root / "models", root / "runs", **kw)
        self.calls: list[str] = []

    def release_gpu(self) -> None:
        self.calls.append("release")
        super().release_gpu()

    def reclaim_gpu(self) -> None:
        self.calls.append("reclaim")
        super().reclaim_gpu()

    def refresh_models(self) -> None:
        if hasattr(self, "calls"):
            self.calls.append("refresh")
        super().refresh_models()

    def generation_may_run_during_training(self) -> bool:
        return False


@pytest.fixture
def fake_trainer(tmp_path, monkeypatch):
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER, encoding="utf-8")
    settings = {"steps": 6, "mode": "ok"}

    def build_command(cfg, run_dir, **kw):
        settings.setdefault("commands", []).append(kw)
        return {"argv": [sys.executable, str(script), str(run_dir), str(settings["steps"]), settings["mode"]],
                "env": {}, "accelerate_config": ""}

    monkeypatch.setattr(launcher, "build_command", build_command)
    monkeypatch.setattr(runs, "_controllers", {})
    monkeypatch.setattr(runs, "POLL_SECONDS", 0.05)
    return settings


def _cfg(host: RecordingHost, **sections):
    """A validated config (paths unchecked: the fake trainer never reads them)."""
    from bp_trainer.train.config import validate

    return validate({"run": {"name": "t", "runs_dir": host.runs_dir()}, **sections}, check_paths=False)


def _wait_for(pred, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_run_releases_gpu_publishes_checkpoint_and_reclaims(tmp_path, fake_trainer):
    host = RecordingHost(tmp_path)
    ctl = runs.controller_for(host)
    run_dir = ctl.start(_cfg(host))
    assert host.calls[0] == "release" and host.gpu_released
    assert ctl.wait(30)
    snap = ctl.snapshot()
    assert snap["status"] == "done" and snap["step"] == 6 and snap["total_steps"] == 6
    assert ctl.exit_code == 0
    # The GPU went back exactly once, after the run, and after the last re-scan of the model list (inside the
    # WebUI a re-scan clears the list: generation released by the reclaim must not run into it).
    assert host.calls.count("release") == 1 and host.calls.count("reclaim") == 1
    assert host.calls.index("reclaim") > host.calls.index("release")
    assert host.calls[-1] == "reclaim" and "refresh" in host.calls[host.calls.index("release"):]
    assert not host.gpu_released
    # The checkpoint is listed by the host, with the run's bytes.
    listed = [n for n in host.list_checkpoints() if n.startswith(runs.PUBLISH_SUBDIR + "/")]
    assert listed == [f"{runs.PUBLISH_SUBDIR}/{Path(run_dir).name}-s000002.safetensors"]
    published = Path(host.checkpoint_path(listed[0]))
    assert published.read_bytes() == (Path(run_dir) / "checkpoints" / "fake-s000002.safetensors").read_bytes()
    assert [x for x, _ in ctl.view.losses] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert ctl.view.sample_gallery()[0][0].endswith("s.png")


def test_one_run_at_a_time_and_graceful_stop(tmp_path, fake_trainer):
    fake_trainer["steps"] = 100000
    host = RecordingHost(tmp_path)
    ctl = runs.controller_for(host)
    run_dir = ctl.start(_cfg(host))
    assert _wait_for(lambda: ctl.snapshot()["step"] >= 2)
    with pytest.raises(BPError, match="already running"):
        ctl.start(_cfg(host))
    assert host.calls.count("release") == 1  # the refused start did not touch the GPU
    assert "generation" in ctl.snapshot()["gpu_note"]  # the host makes generation wait: the UI says so
    ctl.stop()
    assert RunDir(run_dir).stop_file.exists()
    assert ctl.wait(30)
    snap = ctl.snapshot()
    assert snap["status"] == "stopped" and ctl.exit_code == 0 and not snap["active"]
    assert runs.find_live_run(host.runs_dir()) is None
    assert host.calls.count("reclaim") == 1
    with pytest.raises(BPError, match="no training run"):
        ctl.stop()


def test_reattach_after_host_restart(tmp_path, fake_trainer):
    fake_trainer["steps"] = 100000
    first = RecordingHost(tmp_path)
    ctl = runs.controller_for(first)
    run_dir = ctl.start(_cfg(first))
    assert _wait_for(lambda: ctl.snapshot()["step"] >= 3)
    # A new process (fresh registry, new host object) finds the live run through the runs folder.
    second = RecordingHost(tmp_path)
    assert runs.find_live_run(second.runs_dir()) == launcher.find_active_run(second.runs_dir()) == Path(run_dir)
    fresh = runs.RunController(second)
    assert fresh.attach_existing()
    assert fresh.run_dir == Path(run_dir)
    assert second.calls == ["release"]  # the run holds the GPU: the restarted host keeps its model off it
    assert _wait_for(lambda: fresh.snapshot()["step"] >= 3)  # rebuilt from events.jsonl
    assert fresh.view.losses[0] == (1.0, 1.0)
    fresh.stop()
    assert fresh.wait(30) and ctl.wait(30)
    assert fresh.snapshot()["status"] == "stopped"
    assert "reclaim" in second.calls


def test_crash_reports_error_with_log_tail(tmp_path, fake_trainer):
    fake_trainer["mode"] = "crash"
    host = RecordingHost(tmp_path)
    ctl = runs.controller_for(host)
    ctl.start(_cfg(host))
    assert ctl.wait(30)
    snap = ctl.snapshot()
    assert snap["status"] == "error" and ctl.exit_code == 3
    assert "exited with code 3" in snap["error"]
    assert "boom in the stand-in trainer" in ctl.view.log_text()
    assert host.calls.count("reclaim") == 1


def test_failed_start_gives_gpu_back(tmp_path, fake_trainer, monkeypatch):
    host = RecordingHost(tmp_path)
    ctl = runs.controller_for(host)

    def broken(*a, **k):
        raise BPError("cannot start the trainer")

    monkeypatch.setattr(launcher, "start_run", broken)
    with pytest.raises(BPError, match="cannot start"):
        ctl.start(_cfg(host))
    assert host.calls == ["release", "reclaim"] and not ctl.active


def test_publish_checkpoint_links_and_names(tmp_path):
    src = tmp_path / "run" / "checkpoints" / "x.safetensors"
    src.parent.mkdir(parents=True)
    src.write_bytes(b"abc")
    dest = runs.publish_checkpoint(src, tmp_path / "ckpt", "myrun-20260101", 42)
    assert dest == tmp_path / "ckpt" / "bp-train" / "myrun-20260101-s000042.safetensors"
    assert dest.read_bytes() == b"abc"
    assert os.path.samefile(dest, src)  # a hard link on the same file system: no extra space
    assert runs.publish_checkpoint(src, tmp_path / "ckpt", "myrun-20260101", 42) == dest  # idempotent


def test_resume_a_stopped_run(tmp_path, fake_trainer):
    from bp_trainer.ui.train_tab import TrainCallbacks

    fake_trainer["steps"] = 100000
    host = RecordingHost(tmp_path)
    write_model_header(tmp_path / "base.safetensors")
    (tmp_path / "data").mkdir()
    cfg = _cfg(host, model={"base": str(tmp_path / "base.safetensors")}, dataset={"path": str(tmp_path / "data")})
    ctl = runs.controller_for(host)
    run_dir = ctl.start(cfg)
    assert _wait_for(lambda: ctl.snapshot()["step"] >= 2)
    cb = TrainCallbacks(host)
    assert cb.resumable_runs() == []  # a live run is not resumable
    ctl.stop()
    assert ctl.wait(30)
    assert cb.resumable_runs() == [Path(run_dir).name]
    html = cb.resume(Path(run_dir).name)["message"]
    assert "resuming" in html, html
    assert fake_trainer["commands"][-1].get("resume") is True
    assert ctl.run_dir == Path(run_dir) and ctl.active
    assert _wait_for(lambda: ctl.snapshot()["status"] == "running")
    ctl.stop()
    assert ctl.wait(30)
    assert host.calls.count("release") == 2 and host.calls.count("reclaim") == 2
    assert "bp-msg-error" in cb.resume("../elsewhere")["message"]


def test_pages_keep_polling_while_the_host_releases_the_gpu(tmp_path, fake_trainer):
    """Inside the WebUI the release waits for a generation in progress: polls answer, a second Start is refused."""
    import threading

    gate = threading.Event()

    class SlowHost(RecordingHost):
        def has_gpu(self) -> bool:  # a WebUI on a GPU (its notes are worded by whether it has one)
            return True

        def release_gpu(self) -> None:
            gate.wait(20)
            super().release_gpu()

    host = SlowHost(tmp_path)
    ctl = runs.controller_for(host)
    box = {}
    t = threading.Thread(target=lambda: box.update(run_dir=ctl.start(_cfg(host))))
    t.start()
    assert _wait_for(lambda: ctl._starting)
    snap = ctl.snapshot()  # not blocked by the pending release
    assert snap["status"] == "starting" and "waiting for the GPU" in snap["gpu_note"]
    with pytest.raises(BPError, match="already running"):
        ctl.start(_cfg(host))
    assert not ctl.attach_existing()
    gate.set()
    t.join(20)
    assert ctl.wait(30) and ctl.snapshot()["status"] == "done"
    assert host.calls.count("release") == 1 and host.calls.count("reclaim") == 1


def test_stop_pressed_twice_sends_sigterm(tmp_path, fake_trainer):
    """A trainer that does not react to the STOP file (stuck in a long step) gets SIGTERM on the second press."""
    fake_trainer["steps"] = 100000
    host = RecordingHost(tmp_path)
    ctl = runs.controller_for(host)
    run_dir = ctl.start(_cfg(host))
    assert _wait_for(lambda: ctl.snapshot()["step"] >= 1)
    # make the stand-in ignore the STOP file: rename it away as soon as it appears
    assert "Stopping" in ctl.stop()
    RunDir(run_dir).stop_file.unlink()
    assert "SIGTERM" in ctl.stop()
    assert ctl.wait(30)
    assert ctl.exit_code not in (0, None)  # killed by the signal (the stand-in has no handler)
    assert ctl.snapshot()["status"] == "stopped" and "after the stop" in ctl.view.log_text()
    assert host.calls.count("reclaim") == 1


def test_a_trainer_that_cannot_start_is_refused_before_the_gpu_moves(tmp_path, fake_trainer):
    class NoTrainerHost(RecordingHost):
        def trainer_python(self) -> str:
            raise BPError("the trainer environment is outdated")

    host = NoTrainerHost(tmp_path)
    ctl = runs.controller_for(host)
    with pytest.raises(BPError, match="outdated"):
        ctl.start(_cfg(host))
    assert "release" not in host.calls and "reclaim" not in host.calls and not ctl.active


def test_a_missing_trainer_python_is_a_clear_error_before_the_gpu_moves(tmp_path, fake_trainer):
    host = RecordingHost(tmp_path, python=str(tmp_path / "nonexistent" / "python"))
    ctl = runs.controller_for(host)
    with pytest.raises(BPError, match="trainer's Python does not exist") as err:
        ctl.start(_cfg(host))
    assert "nonexistent" in str(err.value)
    assert "release" not in host.calls and not ctl.active
    assert list(Path(host.runs_dir()).iterdir()) == []  # no run folder was made
