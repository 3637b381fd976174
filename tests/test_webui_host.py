"""scripts/bp_train.py in the WebUI stand-in: settings, WebUIHost (models, tokenizer, GPU hand-off), tab, API mount."""

from __future__ import annotations

import asyncio
import threading

import pytest

from bp_trainer.errors import BPError
from tests.webui_stub.harness import fake_tokenizer, load_webui, unload_webui


@pytest.fixture
def webui(tmp_path, monkeypatch):
    monkeypatch.setenv("BP_TRAIN_TRAINER_ENV", str(tmp_path / "no-trainer-venv"))
    w = load_webui(tmp_path, monkeypatch)
    # scripts/bp_train.py defines no Script; reach its module through a callback it registered
    w.glue = w.script_callbacks.callback_map["callbacks_ui_settings"][0].__globals__
    yield w
    unload_webui()


def test_settings_section_and_defaults(webui):
    labels = webui.opts.data_labels
    keys = ["bp_train_python", "bp_train_runs_dir", "bp_train_presets_file", "bp_train_allow_generation"]
    for key in keys:
        assert labels[key].section == ("bp_train", "BP Train")
    assert [webui.opts.data[k] for k in keys] == ["", "", "", False]
    host = webui.glue["get_host"]()
    assert host.runs_dir() == str(webui.root / "bp-train" / "runs")
    assert host.presets_file() == str(webui.root / "bp-train" / "presets.yaml")
    webui.opts.bp_train_runs_dir = str(webui.root / "elsewhere")
    assert host.runs_dir() == str(webui.root / "elsewhere") and (webui.root / "elsewhere").is_dir()
    assert host.generation_may_run_during_training() is False


def test_settings_exist_before_any_ui_settings_callback(webui):
    # --nowebui: the WebUI builds GET /sdapi/v1/options' model from opts.data_labels before on_ui_settings runs.
    import modules.scripts as scripts
    from tests.webui_stub.harness import REPO

    keys = {"bp_train_python", "bp_train_runs_dir", "bp_train_presets_file", "bp_train_allow_generation"}
    for key in keys:
        webui.opts.data_labels.pop(key)
    scripts.load_scripts([str(REPO)])  # the start-up import of extension scripts, no ui_settings callback yet
    assert keys <= set(webui.opts.data_labels)


def test_trainer_python_needs_the_env_or_a_setting(webui):
    host = webui.glue["get_host"]()
    with pytest.raises(BPError, match="trainer environment is missing"):
        host.trainer_python()
    webui.opts.bp_train_python = "/opt/py/bin/python"
    assert host.trainer_python() == "/opt/py/bin/python"
    assert host.trainer_env_status()["state"] == "missing"


def test_models_lists_paths_and_refresh(webui, tmp_path):
    sd = webui.root / "models" / "Stable-diffusion"
    (sd / "sub").mkdir()
    for f in (sd / "a.safetensors", sd / "sub" / "b.ckpt", sd / "x.vae.safetensors", webui.root / "models" / "VAE" / "v.pt"):
        f.write_bytes(b"0")
    host = webui.glue["get_host"]()
    assert host.list_checkpoints() == []  # nothing scanned yet
    host.refresh_models()
    assert host.list_checkpoints() == ["a.safetensors", "sub/b.ckpt"]
    assert host.checkpoint_path("sub/b.ckpt") == str(sd / "sub" / "b.ckpt")
    assert host.checkpoint_path("b") == str(sd / "sub" / "b.ckpt")  # the WebUI's closest match
    assert host.list_vaes() == ["v.pt"] and host.vae_path("v.pt").endswith("v.pt")
    with pytest.raises(BPError, match="unknown checkpoint 'zzz'"):
        host.checkpoint_path("zzz")
    with pytest.raises(BPError, match="unknown VAE"):
        host.vae_path("nope.pt")
    assert host.checkpoint_dir() == webui.sd_models.model_path
    webui.shared.cmd_opts.ckpt_dir = str(tmp_path / "ckpts")
    assert host.checkpoint_dir() == str(tmp_path / "ckpts")


def test_tokenizer_peeks_without_loading_a_model(webui):
    host = webui.glue["get_host"]()
    tok = host.tokenizer()
    assert ("load",) not in webui.sd_models.calls  # shared.sd_model would have loaded one
    assert tok("1girl", add_special_tokens=False)["input_ids"] == [272, 1611]  # the offline CLIP vocabulary
    loaded = fake_tokenizer()
    webui.sd_models.model_data.set_sd_model(webui.sd_models.FakeSdModel(tokenizer=loaded), already_loaded=True)
    assert host.tokenizer() is loaded


def _generate_in_thread(webui):
    runner = webui.runner(False)
    done = threading.Event()
    result = {}

    def job():
        try:
            result["processed"] = webui.generate(runner, webui.txt2img(), webui.ui_args(runner, None))
        except Exception as exc:  # pragma: no cover - reported by the assertions
            result["error"] = exc
        done.set()

    threading.Thread(target=job, daemon=True).start()
    return done, result


def test_gpu_handoff_holds_generation_until_reclaim(webui):
    model = webui.sd_models.FakeSdModel()
    webui.sd_models.model_data.set_sd_model(model, already_loaded=True)
    host = webui.glue["get_host"]()
    host.release_gpu()
    assert model.device == "cpu" and webui.call_queue.queue_lock.locked()
    assert host.gpu_status()["released"] is True
    host.release_gpu()  # idempotent
    done, result = _generate_in_thread(webui)
    assert not done.wait(0.5)  # generation waits in the queue instead of failing on a CPU model
    host.reclaim_gpu()
    assert done.wait(10) and "error" not in result
    assert model.device == "cuda" and not webui.call_queue.queue_lock.locked()
    assert [c for c in webui.sd_models.calls if c[0] in ("unload", "to_device")] == [("unload",), ("to_device",)]
    host.reclaim_gpu()  # idempotent
    assert host.gpu_status()["released"] is False


def test_release_waits_for_a_running_generation_and_can_time_out(webui):
    model = webui.sd_models.FakeSdModel()
    webui.sd_models.model_data.set_sd_model(model, already_loaded=True)
    host = webui.glue["get_host"]()
    lock = webui.call_queue.queue_lock
    lock.acquire()  # a generation is running
    with pytest.raises(BPError, match="still busy generating"):
        host.handoff.release(timeout=0.2)
    assert model.device == "cuda"
    released = threading.Event()
    threading.Thread(target=lambda: (host.release_gpu(), released.set()), daemon=True).start()
    assert not released.wait(0.3)
    lock.release()  # the generation ends: the cancelled attempt lets go, the new one takes the GPU
    assert released.wait(10) and model.device == "cpu"
    host.reclaim_gpu()
    assert model.device == "cuda" and not lock.locked()


def test_no_model_loaded_is_not_loaded_by_the_handoff(webui):
    host = webui.glue["get_host"]()
    gc_before = webui.devices.gc_calls
    host.release_gpu()
    host.reclaim_gpu()
    assert ("load",) not in webui.sd_models.calls and webui.devices.gc_calls == gc_before + 1


def test_opting_out_keeps_the_model_and_generation(webui):
    model = webui.sd_models.FakeSdModel()
    webui.sd_models.model_data.set_sd_model(model, already_loaded=True)
    webui.opts.bp_train_allow_generation = True
    host = webui.glue["get_host"]()
    host.release_gpu()
    assert model.device == "cuda" and not webui.call_queue.queue_lock.locked()
    assert host.gpu_status()["shared_without_lock"] is True
    done, result = _generate_in_thread(webui)
    assert done.wait(10) and "error" not in result
    host.reclaim_gpu()
    assert ("unload",) not in webui.sd_models.calls


def test_tab_is_registered_with_the_ui_helper_tab(webui):
    import gradio as gr

    tabs = webui.script_callbacks.ui_tabs_callback()
    assert not webui.script_callbacks.errors
    [(component, title, elem_id)] = tabs
    assert (title, elem_id) == ("BP Train", "bp_train") and isinstance(component, gr.Blocks)
    texts = [getattr(b, "value", "") for b in component.blocks.values()]
    assert not any(isinstance(t, str) and "could not build its tab" in t for t in texts)


def _request(app, method, url, **kw):
    import httpx

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://webui") as client:
            return await client.request(method, url, **kw)

    return asyncio.run(go())


def test_app_started_mounts_the_api(webui):
    from fastapi import FastAPI

    app = FastAPI()
    webui.script_callbacks.app_started_callback(None, app)
    assert not webui.script_callbacks.errors
    r = _request(app, "GET", "/bp-train/v1/status")
    assert r.status_code == 200
    body = r.json()
    assert body["host"] == "webui" and body["active"] is False and body["trainer_env"]["state"] == "missing"
    assert body["gpu"]["released"] is False and body["runs_dir"] == str(webui.root / "bp-train" / "runs")
    r = _request(app, "POST", "/bp-train/v1/tokens", json={"text": "1girl, solo"})
    assert r.status_code == 200 and r.json()["count"] == 4
    r = _request(app, "GET", "/bp-train/v1/presets")
    assert r.json()["script_name"] == "bp presets"
    assert r.json()["presets_file"] == str(webui.root / "bp-train" / "presets.yaml")
    assert _request(app, "POST", "/bp-train/v1/stop").status_code == 409


def test_api_auth_of_the_webui_protects_the_routes(webui):
    from fastapi import FastAPI

    webui.shared.cmd_opts.api_auth = "alice:s3cret:x,bob:pw"
    app = FastAPI()
    webui.script_callbacks.app_started_callback(None, app)
    assert _request(app, "GET", "/bp-train/v1/presets").status_code == 401
    assert _request(app, "GET", "/bp-train/v1/presets", auth=("alice", "wrong")).status_code == 401
    assert _request(app, "GET", "/bp-train/v1/presets", auth=("alice", "s3cret:x")).status_code == 200
    assert _request(app, "GET", "/bp-train/v1/presets", auth=("bob", "pw")).status_code == 200


def test_reload_ui_during_a_run_still_gives_the_gpu_back(webui):
    model = webui.sd_models.FakeSdModel()
    webui.sd_models.model_data.set_sd_model(model, already_loaded=True)
    old_host = webui.glue["get_host"]()
    old_host.release_gpu()
    # "Reload UI": callbacks cleared, scripts/*.py imported again -> a new module and a new host object
    from tests.webui_stub.harness import REPO

    webui.scripts.load_scripts([str(REPO)])
    new_glue = webui.script_callbacks.callback_map["callbacks_ui_settings"][0].__globals__
    assert new_glue is not webui.glue
    new_host = new_glue["get_host"]()
    assert new_host is not old_host and new_host.gpu_status()["released"] is True
    new_host.reclaim_gpu()
    assert model.device == "cuda" and not webui.call_queue.queue_lock.locked()


def test_a_tab_that_fails_to_build_says_why(webui, monkeypatch):
    import bp_trainer.ui.tab as tab

    def broken(host, **kw):
        raise RuntimeError("gradio says no")

    monkeypatch.setattr(tab, "build_tab", broken)
    [(component, title, elem_id)] = webui.script_callbacks.ui_tabs_callback()
    texts = [getattr(b, "value", "") for b in component.blocks.values()]
    assert any(isinstance(t, str) and "RuntimeError: gradio says no" in t for t in texts)
    assert (title, elem_id) == ("BP Train", "bp_train")


def test_a_model_loading_at_startup_during_a_run_goes_to_ram_too(webui):
    host = webui.glue["get_host"]()
    host.release_gpu()  # a run re-attached while the WebUI's start-up model load is still going
    model = webui.sd_models.load_model()  # the start-up load finishes (outside the generation lock)
    assert model.device == "cpu" and not webui.script_callbacks.errors
    host.reclaim_gpu()
    assert model.device == "cuda"
    other = webui.sd_models.load_model()  # a load with no run active is left alone
    assert other.device == "cuda"


def test_release_waits_for_a_model_load_in_progress_then_unloads_it(webui):
    # The WebUI's start-up load holds model_data.lock (not queue_lock) while it builds the model and puts it
    # on the GPU; a run started meanwhile must wait for it and move that model off, not find "no model".
    data = webui.sd_models.model_data
    data.lock.acquire()  # the start-up load is running
    host = webui.glue["get_host"]()
    released = threading.Event()
    threading.Thread(target=lambda: (host.release_gpu(), released.set()), daemon=True).start()
    assert not released.wait(0.3)  # waiting for the load, generation lock already taken
    model = webui.sd_models.FakeSdModel()
    data.set_sd_model(model, already_loaded=True)  # the load put its model on the GPU ...
    data.lock.release()  # ... and finished
    assert released.wait(10)
    assert model.device == "cpu" and ("unload",) in webui.sd_models.calls
    host.reclaim_gpu()
    assert model.device == "cuda" and not data.lock.locked()


def test_refresh_waits_for_a_running_generation_unless_a_run_holds_the_lock(webui):
    # list_models() empties the list before refilling it: a generation must not start in between.
    host = webui.glue["get_host"]()
    lock = webui.call_queue.queue_lock
    lock.acquire()  # a generation is running
    done = threading.Event()
    threading.Thread(target=lambda: (host.refresh_models(), done.set()), daemon=True).start()
    assert not done.wait(0.4)
    lock.release()
    assert done.wait(10) and not lock.locked()
    host.release_gpu()  # a run holds the generation lock: the re-scan must not wait for itself
    finished = threading.Event()
    threading.Thread(target=lambda: (host.refresh_models(), finished.set()), daemon=True).start()
    assert finished.wait(10)
    host.reclaim_gpu()
    assert not lock.locked()


def test_trainer_uses_the_webuis_device_id_gpu(webui, monkeypatch):
    host = webui.glue["get_host"]()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(webui.shared.cmd_opts, "device_id", None, raising=False)
    assert host.trainer_env() == {}  # the default device: the trainer's default too
    monkeypatch.setattr(webui.shared.cmd_opts, "device_id", "1", raising=False)
    assert host.trainer_env() == {"CUDA_VISIBLE_DEVICES": "1"}
    # --device-id indexes the WebUI's own visible devices: with CUDA_VISIBLE_DEVICES=2,3 device 1 is GPU 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert host.trainer_env() == {"CUDA_VISIBLE_DEVICES": "3"}


def test_release_unloads_every_loaded_checkpoint(webui):
    current, other = webui.sd_models.FakeSdModel(), webui.sd_models.FakeSdModel()
    webui.sd_models.model_data.set_sd_model(current, already_loaded=True)
    webui.sd_models.model_data.loaded_sd_models = [current, other]  # "checkpoints loaded at the same time: 2"
    host = webui.glue["get_host"]()
    host.release_gpu()
    try:
        assert current.device == "cpu" and other.device == "cpu"
    finally:
        host.reclaim_gpu()
