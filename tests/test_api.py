"""The /bp-train/v1 API with a host and a stand-in trainer child (a tiny script speaking the events.jsonl /
STOP-file protocol), over HTTP through FastAPI 0.94: start -> status/events -> stop, one run at a time,
the host's GPU released while the run lives and reclaimed when it ends."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bp_trainer.rundir import RunDir
from conftest import write_model_header

FAKE_TRAINER = r"""
import json, os, sys, time
run_dir = sys.argv[1]
ev = open(os.path.join(run_dir, "events.jsonl"), "a")
def emit(t, **kw):
    ev.write(json.dumps({"type": t, "time": time.time(), **kw}) + "\n"); ev.flush()
emit("start", total_steps=1000, run_dir=run_dir)
step = 0
while not os.path.exists(os.path.join(run_dir, "STOP")) and step < 3000:
    step += 1
    emit("step", step=step, loss=0.1, total_steps=1000)
    time.sleep(0.02)
emit("done", reason="stopped", step=step)
"""


class FakeHost:
    name = "test"

    def __init__(self, root: Path):
        self.root = root
        self.calls = []

    def runs_dir(self):
        p = self.root / "runs"
        p.mkdir(exist_ok=True)
        return str(p)

    def trainer_python(self):
        return sys.executable

    def release_gpu(self):
        self.calls.append("release")

    def reclaim_gpu(self):
        self.calls.append("reclaim")

    def refresh_models(self):
        self.calls.append("refresh")

    def checkpoint_dir(self):
        return str(self.root)

    def generation_may_run_during_training(self):
        return False

    def tokenizer(self):
        from bp_trainer.clip_vocab import clip_tokenizer

        return clip_tokenizer()

    def presets_file(self):
        return str(self.root / "presets.yaml")


@pytest.fixture
def api(tmp_path, monkeypatch):
    from fastapi import FastAPI

    from bp_trainer import launcher
    from bp_trainer.api import create_router

    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    started = []

    def fake_start_run(cfg, *, resume_dir=None, run_dir=None, python=None, **kw):
        target = launcher.prepare_run(cfg, resume_dir=resume_dir, run_dir=run_dir)
        proc = subprocess.Popen([python, str(script), str(target)], start_new_session=True)
        RunDir(target).write_lock(proc.pid)
        started.append(proc)
        return launcher.RunHandle(target, proc)

    monkeypatch.setattr(launcher, "start_run", fake_start_run)
    host = FakeHost(tmp_path)
    app = FastAPI()
    app.include_router(create_router(host))
    write_model_header(tmp_path / "model.safetensors")
    (tmp_path / "data").mkdir()
    yield app, host, tmp_path
    for proc in started:  # never leave a child behind
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def call(app, method, url, **kw):
    import httpx

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.request(method, url, **kw)

    r = asyncio.run(go())
    return r.status_code, r.json()


def _wait(pred, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_start_status_events_stop(api):
    app, host, root = api
    config = {"model": {"base": str(root / "model.safetensors")}, "dataset": {"path": str(root / "data")}}
    code, body = call(app, "POST", "/bp-train/v1/start", json={"config": config})
    assert code == 202 and body["status"] == "starting", body  # answered at once; the hand-off runs behind it
    run_dir = Path(body["run_dir"])
    assert run_dir.parent == root / "runs" and (run_dir / "config.yaml").is_file()
    assert _wait(lambda: host.calls == ["release"])
    # one run at a time
    code, body2 = call(app, "POST", "/bp-train/v1/start", json={"config": config})
    assert code == 409 and "already running" in body2["detail"]
    assert _wait(lambda: call(app, "GET", "/bp-train/v1/status")[1]["run"]["step"] >= 2)
    code, status = call(app, "GET", "/bp-train/v1/status")
    assert status["active"] is True and status["runs"][0]["name"] == run_dir.name and status["runs"][0]["active"]
    code, evs = call(app, "GET", "/bp-train/v1/events", params={"offset": 0})
    assert evs["events"][0]["type"] == "start" and evs["offset"] > 0
    code, more = call(app, "GET", "/bp-train/v1/events", params={"offset": evs["offset"]})
    assert all(e["type"] == "step" for e in more["events"])  # only what came after
    code, stopped = call(app, "POST", "/bp-train/v1/stop", json={})
    assert code == 200 and (run_dir / "STOP").exists()
    assert _wait(lambda: not call(app, "GET", "/bp-train/v1/status")[1]["active"])
    assert _wait(lambda: "reclaim" in host.calls)
    assert host.calls.count("release") == 1 and host.calls.count("reclaim") == 1
    code, status = call(app, "GET", "/bp-train/v1/status")
    assert status["runs"][0]["status"] == "stopped"
    assert call(app, "POST", "/bp-train/v1/stop", json={})[0] == 409


def test_bad_requests_name_the_problem(api):
    app, host, root = api
    code, body = call(app, "POST", "/bp-train/v1/start", json={"config": {"model": {"base": str(root / "nope")}}})
    assert code == 400 and "model.base" in body["detail"] and "dataset.path: missing" in body["detail"]
    code, body = call(app, "POST", "/bp-train/v1/start", json={"config_path": str(root / "missing.yaml")})
    assert code == 400 and "missing.yaml" in body["detail"]
    code, body = call(app, "POST", "/bp-train/v1/start", content=b"not json")
    assert code == 400 and "JSON" in body["detail"]
    code, body = call(app, "POST", "/bp-train/v1/start", json={"config": {}, "resume_dir": "x"})
    assert code == 400 and "exactly one" in body["detail"]
    assert host.calls == []  # nothing started, the GPU never left the host
    code, body = call(app, "POST", "/bp-train/v1/tokens", json={})
    assert code == 400 and "'text'" in body["detail"]
    code, body = call(app, "POST", "/bp-train/v1/tokens", json={"text": "1girl", "steps": "many"})
    assert code == 400 and "'steps'" in body["detail"] and "'many'" in body["detail"]


def test_tokens_presets_infotext(api):
    app, host, root = api
    code, body = call(app, "POST", "/bp-train/v1/tokens", json={"text": "1girl, (solo:1.2) BREAK smile", "steps": 20})
    assert code == 200 and len(body["chunks"]) == 2 and body["limit"] == 150
    text = ("x\nSteps: 28, Sampler: Euler a, CFG scale: 12, Seed: 1, Size: 512x768, Clip skip: 2, ENSD: 31337, "
            "Version: v1.10.1")
    code, body = call(app, "POST", "/bp-train/v1/infotext", json={"text": text, "name": "NAI", "save": True})
    assert code == 200 and body["preset"]["ensd"] == 31337 and body["saved_to"] == str(root / "presets.yaml")
    code, body = call(app, "GET", "/bp-train/v1/presets")
    assert [p["name"] for p in body["presets"]][-1] == "NAI" and body["script_name"] == "bp presets"
    code, body = call(app, "POST", "/bp-train/v1/infotext", json={"text": text, "name": "NAI", "save": True})
    assert code == 400 and "already exists" in body["detail"]


def test_status_reports_a_broken_trainer_env_instead_of_failing(api, monkeypatch):
    app, host, root = api
    monkeypatch.setenv("BP_TRAIN_TRAINER_REQUIREMENTS", str(root / "gone.txt"))
    monkeypatch.setenv("BP_TRAIN_TRAINER_ENV", str(root / "venv"))
    (root / "venv" / "bin").mkdir(parents=True)
    (root / "venv" / "bin" / "python").write_text("")
    (root / "venv" / "bp-train-env.json").write_text('{"requirements_sha256": "x"}')
    code, body = call(app, "GET", "/bp-train/v1/status")
    assert code == 200 and body["trainer_env"]["state"] == "error" and "gone.txt" in body["trainer_env"]["message"]
