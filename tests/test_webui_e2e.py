"""End to end in the WebUI stand-in: POST /bp-train/v1/start runs the real trainer (tiny model, CPU) in a
child process; the WebUI's model leaves the GPU and generation waits; when the run ends the model is back,
generation runs again, and the trained checkpoint is in the WebUI's checkpoint list."""

from __future__ import annotations

import asyncio
import sys
import time

import pytest

from tests.webui_stub.harness import load_webui, unload_webui


@pytest.fixture
def webui(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stray accelerate default config
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    w = load_webui(tmp_path, monkeypatch)
    w.glue = w.script_callbacks.callback_map["callbacks_ui_settings"][0].__globals__
    yield w
    unload_webui()


def _request(app, method, url, **kw):
    import httpx

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://webui") as client:
            return await client.request(method, url, **kw)

    r = asyncio.run(go())
    return r.status_code, r.json()


def test_api_training_run_hands_the_gpu_over_and_back(webui, tiny_model_dir, tmp_path):
    from fastapi import FastAPI

    from bp_trainer.dataset.demo import write_demo_dataset

    data = tmp_path / "ds"
    write_demo_dataset(data, count=4, seed=3)
    webui.opts.bp_train_python = sys.executable  # the dev venv has the trainer's libraries
    # the API's path rule: the model and the dataset live outside the WebUI's folders, so the user allows them
    webui.opts.bp_train_api_roots = f"{tiny_model_dir.parent}, {data}"
    model = webui.sd_models.FakeSdModel()
    webui.sd_models.model_data.set_sd_model(model, already_loaded=True)
    app = FastAPI()
    webui.script_callbacks.app_started_callback(None, app)
    config = {
        "run": {"name": "e2e"},
        "model": {"base": str(tiny_model_dir)},
        "dataset": {"path": str(data)},
        "arb": {"base_res": [64, 64], "max_size": [64, 64], "divisible": 32, "min_dim": 32, "dim_limit": 128},
        "training": {"batch_size": 2, "max_steps": 2, "learning_rate": 1e-3, "seed": 1},
        "saving": {"every_n_epochs": 0, "at_end": True, "ema_unet_fp32": False},
        "sampling": {"every_n_steps": 0, "at_saves": False},
        "logging": {"tensorboard": False, "progress_bar": "false"},
    }
    code, body = _request(app, "POST", "/bp-train/v1/start", json={"config": config})
    assert code == 202, body  # answered at once; the hand-off happens behind it
    deadline = time.monotonic() + 60
    while not (model.device == "cpu" and webui.call_queue.queue_lock.locked()):
        assert time.monotonic() < deadline, "the GPU was not handed over"
        time.sleep(0.05)
    while not _request(app, "GET", "/bp-train/v1/status")[1]["gpu"]["released"]:
        assert time.monotonic() < deadline, "the hand-off did not finish"
        time.sleep(0.05)
    code, status = _request(app, "GET", "/bp-train/v1/status")
    assert status["active"] and status["gpu"]["released"] is True
    deadline = time.monotonic() + 240
    while _request(app, "GET", "/bp-train/v1/status")[1]["active"]:
        assert time.monotonic() < deadline, "the tiny run did not finish"
        time.sleep(0.2)
    code, status = _request(app, "GET", "/bp-train/v1/status")
    assert status["run"]["status"] in ("finished", "max_steps", "done"), status["run"]
    assert status["run"]["step"] == 2 and status["gpu"]["released"] is False
    assert model.device == "cuda" and not webui.call_queue.queue_lock.locked()
    listed = webui.glue["get_host"]().list_checkpoints()
    assert any(name.startswith("bp-train/e2e-") for name in listed), listed
    runner = webui.runner(False)  # generation works again
    processed = webui.generate(runner, webui.txt2img(), webui.ui_args(runner, "BP presets"))
    assert "BP preset: BPModel recommended" in processed.infotexts[0]
