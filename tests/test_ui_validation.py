"""Validation where people look, without torch (the WebUI's stack): the `validation:` config section, the events
folded by RunView (validation curve, best step, per-save sample grid), the Train tab's loss chart, the /status
API and the publishing of the best checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from bp_trainer.errors import ConfigError
from bp_trainer.run_view import RunView
from bp_trainer.train import config as C
from bp_trainer.train.events import EventWriter
from bp_trainer.ui import render
from conftest import write_model_header


# ------------------------------------------------------------------------------------------------ config


def test_validation_section_defaults_and_problems(tmp_path):
    cfg = C.validate({}, check_paths=False)
    v = cfg.validation
    assert not v.enabled and (v.fraction, v.timesteps, v.at_saves, v.every_n_steps) == (0.0, 1, True, 0)
    assert not v.due(10, True) and not cfg.saving.keep_best
    on = C.validate({"validation": {"fraction": 0.1, "every_n_steps": 10}}, check_paths=False).validation
    assert on.due(20, False) and on.due(5, True) and not on.due(5, False)
    with pytest.raises(ConfigError) as err:
        C.validate({"saving": {"keep_best": True}, "validation": {"early_stop_patience": 3}}, check_paths=False)
    assert "saving.keep_best: needs validation" in str(err.value)
    assert "validation.early_stop_patience: needs validation" in str(err.value)
    for section, message in [({"fraction": 0.1, "path": str(tmp_path)}, "give fraction or path, not both"),
                             ({"fraction": 0.1, "at_saves": False}, "it would never run"),
                             ({"fraction": 0.9}, "validation.fraction: 0.9 is above the maximum 0.5")]:
        with pytest.raises(ConfigError, match=message):
            C.validate({"validation": section}, check_paths=False)
    # with the paths checked: the list file exists, relative to the config file
    (tmp_path / "data").mkdir()
    raw = {"model": {"base": str(write_model_header(tmp_path / "model.safetensors"))},
           "dataset": {"path": "data"}, "validation": {"path": "val.txt"}}
    with pytest.raises(ConfigError, match="validation.path: .*val.txt does not exist"):
        C.validate(raw, base_dir=tmp_path)
    (tmp_path / "val.txt").write_text("a.png\n")
    cfg = C.validate(raw, base_dir=tmp_path)
    assert cfg.validation.path == str(tmp_path / "val.txt") and cfg.validation.enabled


# ------------------------------------------------------------------------------------------------ UI


def _validation_event(step, loss, ema, best_step, best_loss):
    return dict(step=step, epoch=0, metric="ema_loss", loss=loss, ema_loss=ema, images=3, buckets={},
                seconds=0.1, improved=best_step == step, best_loss=best_loss, best_step=best_step, since_best=0,
                evaluations=1, best_files=None, early_stop=False)


def _write_run(run_dir: Path):
    w = EventWriter(run_dir, echo="none")
    w.emit("start", total_steps=6, run_dir=str(run_dir))
    for step in range(1, 7):
        w.emit("step", step=step, epoch=0, loss=1.0 / step, total_steps=6)
        if step % 2 == 0:
            for prompt in ("a", "b"):
                for ema in (False, True):
                    w.emit("sample", step=step, path=f"s{step}-{prompt}-{ema}.png", prompt=prompt, ema=ema)
            w.emit("validation", **_validation_event(step, 0.5 + (step - 4) ** 2 / 100, 0.4 + (step - 4) ** 2 / 100,
                                                      4 if step >= 4 else step, 0.4 if step >= 4 else 0.44))
    w.emit("done", step=6, reason="early_stopped")
    w.close()


def test_run_view_folds_validation_and_the_sample_grid(tmp_path):
    from bp_trainer.train.events import follow

    _write_run(tmp_path)
    view = RunView(str(tmp_path))
    view.apply(follow(tmp_path, 0)[0])
    assert view.validation_curve() == [(2.0, 0.44), (4.0, 0.4), (6.0, 0.44)]  # the watched loss: ema_loss
    assert view.best_step == 4 and view.best_loss == 0.4
    s = view.summary(now=0)
    assert s["status"] == "done"
    assert s["validation"] == {"step": 6, "loss": 0.44, "trained_loss": 0.54, "ema_loss": 0.44, "best_step": 4,
                               "best_loss": 0.4, "evaluations": 3}
    grid = view.sample_grid()
    assert grid.columns == ("a", "a (EMA)", "b", "b (EMA)")
    assert [step for step, _ in grid.rows] == [6, 4, 2]  # newest first
    assert grid.rows[1][1] == ("s4-a-False.png", "s4-a-True.png", "s4-b-False.png", "s4-b-True.png")
    cells = grid.gallery()
    assert len(cells) == 12 and cells[4] == ("s4-a-False.png", "step 4 · a")
    update = render.sample_grid_update(grid)
    assert update["columns"] == 4 and update["value"] == cells
    import gradio as gr  # the WebUI's gradio 3.41 turns it into the gallery's own update
    from gradio.blocks import postprocess_update_dict

    gallery = gr.Gallery(columns=2)

    sent = postprocess_update_dict(gallery, dict(update), postprocess=False)
    assert sent["grid_cols"] == 4 and sent["value"] == cells


def test_loss_chart_draws_validation_over_training_and_marks_the_best_step(tmp_path):
    import re

    train = [(float(s), 1.0 / s) for s in range(1, 7)]
    val = [(2.0, 0.44), (4.0, 0.4), (6.0, 0.44)]
    svg = render.loss_chart_svg(train, val, 4)
    dots = [(float(x), float(y)) for x, y in re.findall(r'<circle class="bp-val-dot" cx="([\d.]+)" cy="([\d.]+)"', svg)]
    assert len(dots) == 3 and "bp-line-val" in svg and svg.count("<polyline") == 3
    best_x = float(re.search(r'<line class="bp-best" x1="([\d.]+)"', svg).group(1))
    assert best_x == dots[1][0]  # the marker stands on the step-4 point
    assert dots[1][1] > dots[0][1]  # lower loss, lower on the chart (SVG y grows downwards)
    # the shared y axis spans both curves: the training loss 1.0 at step 1 is the top of the plot
    raw = re.search(r'<polyline class="bp-line-raw" points="([^"]+)"', svg).group(1).split()
    assert float(raw[0].split(",")[1]) == 24.0
    assert "best 0.4 at step 4" in svg
    assert render.loss_chart_svg(train) == render.line_chart_svg(train, title="loss")  # no validation: as before


def test_status_api_and_the_best_checkpoint_is_published(tmp_path):
    from bp_trainer import run_controller as runs
    from test_api import FakeHost, call

    from fastapi import FastAPI
    from bp_trainer.api import create_router

    host = FakeHost(tmp_path)
    run_dir = Path(host.runs_dir()) / "r-1"
    _write_run(run_dir)
    runs._controllers.clear()
    try:
        ctl = runs.controller_for(host)
        ctl.show_run(run_dir)
        app = FastAPI()
        app.include_router(create_router(host))
        code, status = call(app, "GET", "/bp-train/v1/status")
        assert code == 200 and status["run"]["validation"]["best_step"] == 4
        assert status["run"]["validation"]["loss"] == 0.44

        best = run_dir / "checkpoints" / "r-best.safetensors"
        best.parent.mkdir()
        best.write_bytes(b"best weights")
        w = EventWriter(run_dir, echo="none")
        w.emit("validation", **dict(_validation_event(8, 0.3, 0.3, 8, 0.3),
                                    best_files={"webui": {"path": str(best)}}))
        w.close()
        ctl._pump()  # what the watcher does with new events
        published = Path(host.checkpoint_dir()) / runs.PUBLISH_SUBDIR / "r-1-best.safetensors"
        assert ctl.published == [str(published)] and published.read_bytes() == b"best weights"
        assert ctl.snapshot()["validation"]["best_step"] == 8
    finally:
        runs._controllers.clear()
