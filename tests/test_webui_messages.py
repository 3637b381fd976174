"""What BP Train tells the user about the WebUI's generation during a run, on a WebUI with a GPU and on a CPU-only
one (`--use-cpu all`, or no GPU found: `modules.devices.device` is the CPU): the Train tab's note, the console lines
of the hand-off and the setting's help never speak of a GPU the WebUI does not have."""

from __future__ import annotations

import pytest

from bp_trainer.run_controller import handoff_note
from tests.webui_stub.harness import load_webui, unload_webui


@pytest.fixture
def webui(tmp_path, monkeypatch):
    w = load_webui(tmp_path, monkeypatch)
    w.glue = w.script_callbacks.callback_map["callbacks_ui_settings"][0].__globals__
    yield w
    unload_webui()


def _lend_and_return(webui) -> list:
    """The hand-off's log lines for one run: the model leaves, the run ends, the model comes back."""
    host = webui.glue["get_host"]()
    lines: list = []
    host.handoff.log = lines.append
    model = webui.sd_models.FakeSdModel()
    webui.sd_models.model_data.set_sd_model(model, already_loaded=True)
    host.release_gpu()
    host.reclaim_gpu()
    assert len(lines) == 2
    return lines


def _notes(host) -> list:
    notes = [handoff_note(host, starting=True), handoff_note(host, starting=False)]
    host_allows = host.generation_may_run_during_training
    host.generation_may_run_during_training = lambda: True
    notes.append(handoff_note(host, starting=False))
    host.generation_may_run_during_training = host_allows
    return notes


def test_a_cpu_only_webui_is_never_told_about_its_gpu(webui):
    webui.devices.device = "cpu"  # what shared_init sets with --use-cpu all (a torch.device of type "cpu")
    host = webui.glue["get_host"]()
    assert host.has_gpu() is False
    for text in _lend_and_return(webui) + _notes(host):
        assert "GPU" not in text, text
    assert "waits" in _notes(host)[1] and "generation" in _lend_and_return(webui)[0]
    info = webui.opts.data_labels["bp_train_allow_generation"].comment_after
    assert "if there is one" in info  # the setting's help holds for both


def test_a_webui_with_a_gpu_is_told_where_its_model_goes(webui):
    host = webui.glue["get_host"]()
    assert webui.devices.device == "cuda" and host.has_gpu() is True
    assert _lend_and_return(webui) == ["the WebUI's model is off the GPU; generation waits until the training run ends",
                                       "the WebUI's model is back on the GPU"]
    starting, waits, shared = _notes(host)
    assert "waiting for the GPU" in starting and "holds the GPU" in waits and "the GPU is shared" in shared


def test_the_standalone_app_has_no_generation_to_mention(tmp_path):
    from bp_trainer.ui.standalone import StandaloneHost

    host = StandaloneHost(tmp_path / "models", tmp_path / "runs")
    assert _notes(host) == ["", "", ""]
    assert isinstance(host.has_gpu(), bool)
