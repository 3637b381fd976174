"""Train tab callbacks (form <-> YAML, validation, presets, export, polling) and the event view, with no browser."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bp_trainer.errors import BPError
from bp_trainer.train import config as C
from bp_trainer.train.events import EventWriter, follow
from bp_trainer import run_controller as runs
from bp_trainer.ui import render, train_form
from conftest import write_model_header
from bp_trainer.run_view import RunView
from bp_trainer.ui.standalone import StandaloneHost
from bp_trainer.ui.train_tab import TrainCallbacks


@pytest.fixture
def host(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "_controllers", {})
    sd = tmp_path / "models" / "Stable-diffusion"
    sd.mkdir(parents=True)
    write_model_header(sd / "base.safetensors")  # header only: these tests never load weights
    (tmp_path / "data").mkdir()
    return StandaloneHost(tmp_path / "models", tmp_path / "runs")


def _form(cb: TrainCallbacks, base: str = "", dataset: str = "", **over):
    """The initial values and the form a page sends: {yaml, base, dataset, arb, config key: widget value}."""
    init = cb.initial()
    form = {"yaml": init["yaml"], "base": base, "dataset": dataset, "arb": init["arb"], **init["fields"]}
    for key, value in over.items():
        assert key.replace("__", ".") in init["fields"], key
        form[key.replace("__", ".")] = value
    return init, form


def test_initial_form_is_the_768_preset(host):
    cb = TrainCallbacks(host)
    init = cb.initial()
    assert init["preset"] == "768"
    arb = train_form.parse_arb(init["arb"])
    assert arb == C.preset("768")["arb"]
    full = yaml.safe_load(init["yaml"])
    # Every schema section and key is in the YAML box; the form shows the same values.
    assert set(full) == set(C.SECTIONS) and all(set(full[s]) == set(C.section_keys(s)) for s in C.SECTIONS)
    assert list(init["fields"]) == [key for key, _ in train_form.FORM_FIELDS]
    for key, value in init["fields"].items():
        assert train_form.config_value(key, value) == train_form.get(full, key), key


def test_form_wins_over_yaml_and_advanced_keys_survive(host, tmp_path):
    cb = TrainCallbacks(host)
    init, form = _form(cb, "base.safetensors", str(tmp_path / "data"), training__batch_size=7,
                       training__learning_rate=3e-5, sampling__prompts="a, b\n\n c ", training__max_steps=0)
    text = yaml.safe_load(init["yaml"])
    text["latents"]["cache"] = "memory"  # an advanced key that is only in the YAML box
    text["training"]["batch_size"] = 99  # overridden by the form
    cfg = cb.config_from_form({**form, "yaml": yaml.safe_dump(text)})
    assert cfg.training.batch_size == 7
    assert cfg.training.learning_rate == pytest.approx(3e-5)
    assert cfg.training.max_steps is None  # 0 in the form means "use epochs"
    assert cfg.sampling.prompts == ("a, b", "c")
    assert cfg.latents.cache == "memory"
    assert cfg.model.base == str(tmp_path / "models" / "Stable-diffusion" / "base.safetensors")
    assert cfg.run.runs_dir == host.runs_dir()
    assert cfg.run.python == host.trainer_python()


def test_start_with_bad_config_names_the_problem_and_starts_nothing(host, tmp_path):
    cb = TrainCallbacks(host)
    init, form = _form(cb, "base.safetensors", str(tmp_path / "missing"))
    html = cb.start(form)["message"]
    assert "bp-msg-error" in html and "dataset.path" in html and "is not a folder" in html
    assert not host.gpu_released and not cb.controller.active
    bad = init["yaml"].replace("training:", "trainin:")
    html = cb.start({**form, "yaml": bad, "dataset": str(tmp_path / "data")})["message"]
    assert "unknown section" in html and "training" in html


def test_yaml_errors_name_the_line(host):
    cb = TrainCallbacks(host)
    out = cb.yaml_to_form("training:\n  batch_size: [1,\n")
    assert list(out) == ["message"]  # nothing else changes
    assert "line 3" in out["message"] and "bp-msg-error" in out["message"]


def test_yaml_round_trip_through_the_form(host, tmp_path):
    cb = TrainCallbacks(host)
    raw = C.merge(C.defaults(), C.preset("1024"))
    raw["model"]["base"] = str(tmp_path / "models" / "Stable-diffusion" / "base.safetensors")
    raw["dataset"]["path"] = str(tmp_path / "data")
    raw["training"]["epochs"] = 3
    raw["sampling"]["prompts"] = ["x", "y"]
    out = cb.yaml_to_form(C.dump_config(raw))
    assert (out["base"], out["dataset"], out["preset"]) == ("base.safetensors", str(tmp_path / "data"), "1024")
    assert out["training.epochs"] == 3 and out["sampling.prompts"] == "x\ny"
    assert "bp-msg-ok" in out.pop("message")
    cfg = cb.config_from_form(out)
    for sec in ("arb", "training", "sampling", "ema", "saving"):
        assert getattr(cfg, sec) == getattr(C.validate(raw, check_paths=False), sec), sec


def test_preset_applies_buckets_and_batch(host):
    cb = TrainCallbacks(host)
    init, form = _form(cb)
    out = cb.apply_preset({**form, "preset": "1024"})
    assert train_form.parse_arb(out["arb"])["base_res"] == [1024, 1024]
    assert yaml.safe_load(out["yaml"])["arb"]["max_size"] == [1536, 1024]
    assert out["training.batch_size"] == C.preset("1024")["training"]["batch_size"]
    assert "bp-msg-ok" in out["message"]
    assert cb.apply_preset({**form, "preset": "custom"}) == {"message": ""}  # "custom" changes nothing


def test_export_writes_a_loadable_run_yaml(host, tmp_path):
    cb = TrainCallbacks(host)
    init, form = _form(cb, "base.safetensors", str(tmp_path / "data"), run__name="my run/1")
    out = cb.export_yaml(form)  # a run name is a name, never a path
    assert out["yaml_file"] is None and "run.name" in out["message"] and "not a path" in out["message"]
    init, form = _form(cb, "base.safetensors", str(tmp_path / "data"), run__name="my-run_1")
    path = cb.export_yaml(form)["yaml_file"]
    assert Path(path).name == "my-run_1.yaml"
    loaded = C.load_config(path)
    assert loaded.model.base.endswith("base.safetensors")
    assert loaded.arb == C.validate(C.preset("768"), check_paths=False).arb


def test_poll_redraws_only_on_change(host, tmp_path):
    cb = TrainCallbacks(host)
    first = cb.poll("")
    assert "No run" in first["progress"] and {"loss", "samples", "log"} <= set(first)
    second = cb.poll(first["version"])
    assert set(second) == {"progress", "start", "stop", "version"}  # loss, samples and log are left alone
    assert second["start"] == render.change(interactive=True)
    assert second["stop"] == render.change(interactive=False, value="Stop")


def test_poll_shows_the_latest_finished_run(host, tmp_path):
    run_dir = Path(host.runs_dir()) / "old-run"
    (run_dir).mkdir()
    (run_dir / "config.yaml").write_text("{}")
    w = EventWriter(run_dir, echo="none")
    w.emit("start", total_steps=2)
    w.emit("step", step=1, loss=0.5, total_steps=2)
    w.emit("step", step=2, loss=0.25, total_steps=2)
    w.emit("done", step=2, reason="finished")
    w.close()
    out = TrainCallbacks(host).poll("")
    assert "Finished" in out["progress"] and "old-run" in out["progress"] and "step 2/2" in out["progress"]
    assert "<polyline" in out["loss"]


def test_run_view_replay_equals_incremental(tmp_path):
    """A re-attaching page replays events.jsonl from 0: the same view as following it live."""
    w = EventWriter(tmp_path, echo="none")
    live = RunView(str(tmp_path))
    offset = 0
    w.emit("start", total_steps=4, run_dir=str(tmp_path))
    for step in range(1, 5):
        w.emit("step", step=step, epoch=0, loss=1.0 / step, lr=1e-4, images_per_second=2.0, eta_seconds=4 - step,
               total_steps=4)
        events, offset = follow(tmp_path, offset)
        live.apply(events)
    w.emit("sample", step=4, path="a.png", prompt="p")
    w.emit("warning", message="careful")
    w.emit("done", step=4, reason="stopped")
    events, offset = follow(tmp_path, offset)
    live.apply(events)
    replay = RunView(str(tmp_path))
    replay.apply(follow(tmp_path, 0)[0])
    a, b = live.summary(now=0), replay.summary(now=0)
    assert a == b
    assert a["status"] == "stopped" and a["step"] == 4 and a["loss"] == 0.25 and a["ips"] == 2.0
    assert live.losses == [(1.0, 1.0), (2.0, 0.5), (3.0, 1 / 3), (4.0, 0.25)]
    assert live.sample_gallery() == [("a.png", "step 4: p")]
    assert "warning: careful" in live.log_text()


def test_run_view_error_event():
    v = RunView("r")
    v.apply([{"type": "start", "total_steps": 10}, {"type": "error", "message": "CUDA out of memory"}])
    s = v.summary()
    assert s["status"] == "error" and s["error"] == "CUDA out of memory" and v.finished
    html = render.progress_html(s)
    assert "Failed" in html and "CUDA out of memory" in html


def test_progress_html_eta_and_fraction():
    html = render.progress_html({"status": "running", "step": 25, "total_steps": 100, "eta": 3725, "loss": 0.123,
                                 "ips": 4.5, "epoch": 1, "epochs_done": 1, "total_epochs": 4})
    assert "width:25.0%" in html and "ETA 1:02:05" in html and "step 25/100" in html and "1/4 epochs" in html


def test_line_chart_smoothing_and_bounds():
    svg = render.line_chart_svg([(i, 10.0 - i) for i in range(10)], title="loss", width=200, height=100)
    assert svg.count("<polyline") == 2
    sm = render.smooth([1.0, 1.0, 1.0])
    assert sm == pytest.approx([1.0, 1.0, 1.0])  # bias-corrected: a constant stays constant
    assert "no data yet" in render.line_chart_svg([])


def test_bar_chart_bars_are_proportional():
    svg = render.bar_chart_svg([("a", 10), ("b", 5), ("<c>", 0)], width=400, label_width=100)
    import re

    widths = [float(w) for w in re.findall(r'class="bp-bar" x="\d+" y="\d+" width="([\d.]+)"', svg)]
    assert len(widths) == 3 and widths[0] == pytest.approx(2 * widths[1]) and widths[2] == 0
    assert "&lt;c&gt;" in svg and "<c>" not in svg


def test_events_follow_json_shape_matches_trainer(tmp_path):
    """The view reads the trainer's own field names (events.py documents them)."""
    w = EventWriter(tmp_path, echo="none")
    w.emit("step", step=3, epoch=1, loss=0.5, lr=1e-5, images_per_second=7.5, eta_seconds=12.0, total_steps=9)
    v = RunView(str(tmp_path))
    v.apply(follow(tmp_path, 0)[0])
    s = v.summary(now=json.loads((tmp_path / "events.jsonl").read_text())["time"])
    assert (s["step"], s["epoch"], s["total_steps"], s["ips"], s["lr"]) == (3, 1, 9, 7.5, 1e-5)
    assert s["eta"] == pytest.approx(12.0)


def test_editing_the_buckets_marks_the_preset_custom(host, tmp_path):
    cb = TrainCallbacks(host)
    init, form = _form(cb)
    out = cb.form_to_yaml(form)
    assert (out["message"], out["preset"]) == ("", "768")
    edited = init["arb"].replace("min_dim: 256", "min_dim: 320")
    out = cb.form_to_yaml({**form, "arb": edited})
    assert out["preset"] == "custom" and yaml.safe_load(out["yaml"])["arb"]["min_dim"] == 320
    out = cb.form_to_yaml({**form, "arb": "arb: ["})
    assert list(out) == ["message"] and "bp-msg-error" in out["message"]  # the YAML box and preset stay


def test_tab_builds_without_torch_and_without_a_queue(host):
    """Also run on the WebUI v1.10.1 stack (tests/webui_stub/check_py310.sh: Python 3.10, gradio 3.41.2, no torch):
    the whole tab builds, renders into a page, and launches without the gradio queue (--no-gradio-queue)."""
    import sys

    import gradio as gr

    from bp_trainer.ui.tab import build_tab

    had_torch = "torch" in sys.modules
    tab = build_tab(host)
    with gr.Blocks() as page:
        tab.render()
    page.validate_queue_settings()
    assert not page.progress_tracking
    ids = {getattr(b, "elem_id", None) for b in page.blocks.values()}
    assert {"bp_train_start", "bp_train_tok_chips", "bp_train_bk_plan", "bp_train_mg_go"} <= ids
    if not had_torch:
        assert "torch" not in sys.modules  # building the tab imports no torch (the WebUI loads it anyway)


def test_a_run_config_given_to_the_app_that_cannot_be_read_is_one_clear_error(host, tmp_path):
    # `python -m bp_trainer ui --config FILE` with a non-UTF-8 file: a BPError naming it, not a broken tab.
    bad = tmp_path / "run.yaml"
    bad.write_bytes(b"model:\n  base: \xff\xfe\n")
    with pytest.raises(BPError, match="cannot read the run config") as err:
        TrainCallbacks(host).initial(str(bad))
    assert str(bad) in str(err.value)


def test_estimate_beside_start_and_starts_warning(host, tmp_path, monkeypatch):
    from bp_trainer.ui import estimate as E

    calls = []

    def fake_estimate(cfg, python):  # the real one runs `bp-train train --estimate-memory` (tests/test_train_estimate)
        calls.append((cfg.training.memory, python))
        return {"peak_bytes": 9 * 2**30, "bucket": [1024, 1536], "batch_size": 1}

    monkeypatch.setattr(E, "run_estimate", fake_estimate)
    monkeypatch.setattr(host, "gpu_free_bytes", lambda: 8 * 2**30, raising=False)
    monkeypatch.setattr(host, "release_gpu", lambda: None, raising=False)
    cb = TrainCallbacks(host)
    init, form = _form(cb, "base.safetensors", str(tmp_path / "data"))
    msg = cb.estimate(form)["message"]
    assert "estimated peak 9.0 GiB at 1024x1536, batch 1" in msg and "8.0 GiB free" in msg and "will not fit" in msg
    assert calls == [("manual", host.trainer_python())]
    assert E.fits({"peak_bytes": 7 * 2**30}, 8 * 2**30) is True and E.fits({"peak_bytes": 1}, None) is None
