"""The /bp-train/v1 API with a host and a stand-in trainer child (a tiny script speaking the events.jsonl /
STOP-file protocol), over HTTP through FastAPI 0.94: start -> status/events -> stop, one run at a time,
the host's GPU released while the run lives and reclaimed when it ends."""

from __future__ import annotations

import asyncio
import json
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

    def allowed_roots(self):
        return {"datasets": [str(self.root / "data")]}  # as if the user had trained from it in the tab

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
    code, body = call(app, "POST", "/bp-train/v1/start", json={"config_path": str(root / "runs" / "missing.yaml")})
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


# ------------------------------------------------------------------------------------------- the path rule


@pytest.fixture
def outside(tmp_path_factory):
    """Files a remote client must not reach: a model, a dataset, a run YAML and a run folder outside the roots."""
    out = tmp_path_factory.mktemp("outside")
    write_model_header(out / "model.safetensors")
    (out / "data").mkdir()
    (out / "run").mkdir()
    (out / "run" / "config.yaml").write_text("{}")
    (out / "run" / "events.jsonl").write_text('{"type": "start", "secret": "do not leak"}\n')
    (out / "run.yaml").write_text("model: {base: model.safetensors}\ndataset: {path: data}\n")
    (out / "accelerate.yaml").write_text("distributed_type: NO\n")
    return out


def _variants(root: Path, target: Path) -> dict:
    """The same outside file as an absolute path, through `..` from inside the runs folder, and through a
    symbolic link inside the runs folder."""
    runs = root / "runs"
    runs.mkdir(exist_ok=True)
    link = runs / f"link-{target.name}"
    if not link.exists():
        link.symlink_to(target)
    dotdot = runs / ".." / ".." / target.parent.name / target.name
    return {"absolute": str(target), "dotdot": str(dotdot), "symlink": str(link)}


CONFIG_FIELDS = [("model", "base", "model.safetensors"), ("model", "vae", "model.safetensors"),
                 ("dataset", "path", "data"), ("latents", "dir", "data"), ("text_cache", "dir", "data"),
                 ("run", "accelerate_config", "accelerate.yaml")]


@pytest.mark.parametrize("section, key, name", CONFIG_FIELDS)
def test_config_paths_outside_the_allowed_folders_are_refused(api, outside, section, key, name):
    app, host, root = api
    for how, path in _variants(root, outside / name).items():
        config = {"model": {"base": str(root / "model.safetensors")}, "dataset": {"path": str(root / "data")}}
        config.setdefault(section, {})[key] = path
        code, body = call(app, "POST", "/bp-train/v1/start", json={"config": config})
        assert code == 403 and f"{section}.{key}" in body["detail"], (how, body)
    assert host.calls == [] and not any(p.is_dir() and not p.is_symlink() for p in (root / "runs").iterdir())


@pytest.mark.parametrize("field, name", [("config_path", "run.yaml"), ("resume_dir", "run")])
def test_config_path_and_resume_dir_must_lie_in_the_runs_folder(api, outside, field, name):
    app, host, root = api
    for how, path in _variants(root, outside / name).items():
        code, body = call(app, "POST", "/bp-train/v1/start", json={field: path})
        assert code == 403 and field in body["detail"] and "secret" not in body["detail"], (how, body)
    code, body = call(app, "POST", "/bp-train/v1/start", json={"config_path": "/etc/passwd"})
    assert code == 403 and "root:" not in body["detail"]  # never read, never quoted
    code, body = call(app, "POST", "/bp-train/v1/start", json={field: 12})
    assert code == 400 and field in body["detail"]  # not a path: a 4xx naming the field, not a 500
    assert host.calls == []


def test_events_of_a_folder_outside_the_runs_folder_are_refused(api, outside):
    app, host, root = api
    for how, path in _variants(root, outside / "run").items():
        code, body = call(app, "GET", "/bp-train/v1/events", params={"run_dir": path})
        assert code == 403 and "secret" not in json.dumps(body), (how, body)
    for bad in ("-1", "abc"):
        code, body = call(app, "GET", "/bp-train/v1/events", params={"run_dir": str(root / "runs"), "offset": bad})
        assert code in (400, 422) and "offset" in json.dumps(body)


def test_run_name_is_a_name_not_a_path(api):
    app, host, root = api
    for name in ("/tmp/x", "../../escaped", "a/b", ".."):
        config = {"run": {"name": name}, "model": {"base": str(root / "model.safetensors")},
                  "dataset": {"path": str(root / "data")}}
        code, body = call(app, "POST", "/bp-train/v1/start", json={"config": config})
        assert code == 400 and "run.name" in body["detail"], (name, body)
    assert host.calls == [] and not Path("/tmp/x-s000001.safetensors").exists()


def test_a_dataset_trained_from_in_the_tab_is_allowed_over_http(tmp_path):
    from bp_trainer import access

    runs = tmp_path / "runs"
    assert access.remembered_datasets(runs) == []
    access.remember_dataset(runs, str(tmp_path / "data" / ".." / "data"))
    assert access.remembered_datasets(runs) == [str((tmp_path / "data").resolve())]
