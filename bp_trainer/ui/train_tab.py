"""The Train sub-tab: the run form, the run YAML, Start/Stop and live progress.

Callbacks live on `TrainCallbacks(host)` as plain methods over plain values (unit-tested with a fake
host); `build(host)` lays out the gradio components and wires them. Progress is redrawn when the page
clicks the Refresh button `#bp_train_poll` (javascript/bp_train.js does it every 1.5 s while a run is
active and the tab is visible, the user may too); the run itself is followed by a background watcher
(`runs.py`), so nothing depends on a page being open.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from bp_trainer.errors import BPError
from bp_trainer.ui import render, train_form
from bp_trainer.run_controller import RunController, controller_for

NO_CHANGE = object()  # a poll output that needs no redraw (turned into gr.update())


class TrainCallbacks:
    def __init__(self, host: Any):
        self.host = host

    @property
    def controller(self) -> RunController:
        return controller_for(self.host)

    # ------------------------------------------------------------------------------------ models

    def checkpoint_choices(self) -> List[str]:
        return list(self.host.list_checkpoints())

    def refresh_models(self) -> List[str]:
        self.host.refresh_models()
        return self.checkpoint_choices()

    def base_path(self, name: str) -> str:
        if not name:
            return ""
        return self.host.checkpoint_path(name)

    def base_name_for(self, path: str) -> str:
        """The dropdown entry for a model path from a YAML (the path itself when the host does not list it)."""
        if not path:
            return ""
        for name in self.host.list_checkpoints():
            try:
                if os.path.realpath(self.host.checkpoint_path(name)) == os.path.realpath(path):
                    return name
            except Exception:
                continue
        return path

    # ------------------------------------------------------------------------------------ config

    def initial(self, config_path: Optional[str] = None) -> Dict[str, Any]:
        """Starting values of the form: a run YAML given to the app, else the 768 preset's defaults."""
        if config_path:
            try:
                text = Path(config_path).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise BPError(f"cannot read the run config: {exc}", path=config_path,
                              hint="give a UTF-8 run YAML (python -m bp_trainer train --show-defaults writes one)") from exc
            cfg = train_form.parse_yaml(text)
            cfg = _resolve_relative(cfg, Path(config_path).resolve().parent)
        else:
            cfg = train_form.initial_config()
        full = train_form._cfgmod().merge(train_form._cfgmod().defaults(), cfg)
        preset = train_form.detect_preset(full)
        return {
            "base": self.base_name_for(train_form.get(full, "model.base") or ""),
            "dataset": train_form.get(full, "dataset.path") or "",
            "preset": preset or "custom",
            "arb": train_form.arb_yaml(full),
            "values": train_form.form_values(full),
            "yaml": train_form.dump_yaml(full),
        }

    def config_from_form(self, yaml_text: str, base: str, dataset: str, arb_text: str, values: Sequence[Any],
                         *, check_paths: bool = True) -> Any:
        """The validated config the form describes, with the host's runs folder and trainer Python."""
        raw = train_form.merge_form(yaml_text, base=self.base_path(base) if base else None, dataset=dataset,
                                    arb_text=arb_text, values=values)
        train_form.put(raw, "run.runs_dir", self.host.runs_dir())
        train_form.put(raw, "run.python", self.host.trainer_python())
        return train_form.validate(raw, check_paths=check_paths)

    def form_to_yaml(self, yaml_text: str, base: str, dataset: str, arb_text: str, *values: Any) -> Tuple[str, str, Any]:
        """Form edits into the YAML box (not validated: the box shows what Start will check), and the preset
        the buckets now match ("custom" after an edit of the `arb:` block)."""
        try:
            raw = train_form.merge_form(yaml_text, base=self.base_path(base) if base else None, dataset=dataset,
                                        arb_text=arb_text, values=values)
            full = train_form._cfgmod().merge(train_form._cfgmod().defaults(), raw)
            return train_form.dump_yaml(full), "", train_form.detect_preset(full) or "custom"
        except (BPError, ValueError, TypeError) as exc:
            return yaml_text, render.error_html(exc), NO_CHANGE

    def apply_preset(self, preset: str, yaml_text: str, arb_text: str, *values: Any) -> List[Any]:
        """Preset radio: its `arb:` block and training keys into the form and the YAML."""
        if preset not in train_form.PRESET_NAMES:
            return [arb_text, yaml_text, *values, ""]
        try:
            raw = train_form.merge_form(yaml_text, base=None, dataset=None, arb_text=None, values=values)
            cfg = train_form.apply_preset(train_form._cfgmod().merge(train_form._cfgmod().defaults(), raw), preset)
            return [train_form.arb_yaml(cfg), train_form.dump_yaml(cfg), *train_form.form_values(cfg),
                    render.message_html(f"preset {preset}: buckets and batch settings applied", "ok")]
        except BPError as exc:
            return [arb_text, yaml_text, *values, render.error_html(exc)]

    def yaml_to_form(self, yaml_text: str) -> List[Any]:
        """The YAML box into the form (base, dataset, preset, arb, every form field)."""
        try:
            raw = train_form.parse_yaml(yaml_text)
            full = train_form._cfgmod().merge(train_form._cfgmod().defaults(), raw)
        except BPError as exc:
            return [NO_CHANGE] * (5 + len(train_form.FORM_FIELDS)) + [render.error_html(exc)]
        preset = train_form.detect_preset(full) or "custom"
        return [self.base_name_for(train_form.get(full, "model.base") or ""), train_form.get(full, "dataset.path") or "",
                preset, train_form.arb_yaml(full), train_form.dump_yaml(full), *train_form.form_values(full),
                render.message_html("run config loaded into the form", "ok")]

    def import_yaml(self, file: Any) -> List[Any]:
        path = getattr(file, "name", file)
        if not path:
            return [NO_CHANGE] * (5 + len(train_form.FORM_FIELDS)) + [""]
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            return [NO_CHANGE] * (5 + len(train_form.FORM_FIELDS)) + [render.error_html(BPError(str(exc), path=path))]
        return self.yaml_to_form(text)

    def export_yaml(self, yaml_text: str, base: str, dataset: str, arb_text: str, *values: Any) -> Tuple[Any, str]:
        """Validate (paths too) and write the run YAML to a file the browser downloads."""
        try:
            cfg = self.config_from_form(yaml_text, base, dataset, arb_text, values, check_paths=False)
        except BPError as exc:
            return None, render.error_html(exc)
        name = cfg.run.name
        out = Path(tempfile.mkdtemp(prefix="bp-train-")) / f"{name}.yaml"
        out.write_text(train_form.dump_yaml(cfg), encoding="utf-8")
        return str(out), render.message_html(f"exported {out.name}", "ok")

    # ------------------------------------------------------------------------------------ run

    def start(self, yaml_text: str, base: str, dataset: str, arb_text: str, *values: Any) -> str:
        try:
            cfg = self.config_from_form(yaml_text, base, dataset, arb_text, values)
            run_dir = self.controller.start(cfg)
        except BPError as exc:
            return render.error_html(exc)
        return render.message_html(f"started {Path(run_dir).name} (folder {run_dir})", "ok")

    def resumable_runs(self) -> List[str]:
        """Runs of the runs folder that ended before finishing and saved a state to resume from (newest first)."""
        from bp_trainer import launcher
        from bp_trainer.rundir import RunDir

        out = []
        for r in launcher.list_runs(self.host.runs_dir()):
            state = RunDir(r["run_dir"]).state_dir
            if not r["active"] and r["status"] != "finished" and state.is_dir() and any(state.iterdir()):
                out.append(r["name"])
        return out

    def resume(self, name: str) -> str:
        """Continue a stopped or interrupted run from its last saved state (same folder, same config)."""
        from bp_trainer.rundir import RunDir
        from bp_trainer.train.config import load_config

        if not name:
            return render.message_html("choose a run to resume", "warn")
        run_dir = Path(self.host.runs_dir()) / name
        try:
            if os.path.dirname(name) or not run_dir.is_dir():
                raise BPError("run folder not found", path=run_dir, hint="press \u21bb to list the runs")
            cfg = load_config(RunDir(run_dir).config).with_values(run={"python": self.host.trainer_python()})
            self.controller.start(cfg, resume_dir=str(run_dir))
        except BPError as exc:
            return render.error_html(exc)
        return render.message_html(f"resuming {name} from its last saved state", "ok")

    def stop(self) -> str:
        try:
            return render.message_html(self.controller.stop(), "info")
        except BPError as exc:
            return render.error_html(exc)

    def poll(self, last_version: Any) -> List[Any]:
        """progress, loss chart, samples, log, start button, stop button, version (NO_CHANGE where unchanged)."""
        ctl = self.controller
        if not ctl.active:
            ctl.attach_existing()
            if ctl.run_dir is None:
                self._show_latest(ctl)
        snap = ctl.snapshot()
        version = f"{snap.get('run_dir')}:{snap['version']}:{snap['status']}"
        progress = render.progress_html(snap)
        buttons = [{"interactive": not snap["active"]}, {"interactive": bool(snap["active"])}]
        if version == last_version:
            return [progress, NO_CHANGE, NO_CHANGE, NO_CHANGE, *buttons, version]
        with ctl.lock:
            loss = render.loss_chart_svg(ctl.view.losses, ctl.view.validation_curve(), ctl.view.best_step)
            gallery = render.sample_grid_update(ctl.view.sample_grid())
            log = ctl.view.log_text()
        return [progress, loss, gallery, log, *buttons, version]

    def _show_latest(self, ctl: RunController) -> None:
        """With no live run, show the newest run of the folder (what happened last)."""
        from bp_trainer import launcher

        try:
            runs = launcher.list_runs(self.host.runs_dir())
        except Exception:
            return
        if runs:
            try:
                ctl.show_run(runs[0]["run_dir"])
            except BPError:
                pass

    def trainer_env_status(self) -> Tuple[bool, str]:
        """(ready, message) of the trainer's own environment.

        The host may answer (`host.trainer_env_status()`); the standalone app trains with its own Python;
        otherwise the WebUI helper's `bp_trainer.trainer_env.status()` decides.
        """
        fn = getattr(self.host, "trainer_env_status", None)
        try:
            if callable(fn):
                st = fn()
            elif getattr(self.host, "name", "") == "standalone":
                return True, ""
            else:
                from bp_trainer import trainer_env

                st = trainer_env.status()
        except Exception as exc:
            return False, f"trainer environment: {exc}"
        if isinstance(st, dict):
            ready = st.get("ready", st.get("state") == "ready")
            return bool(ready), str(st.get("message") or "")
        return bool(getattr(st, "ready", False)), str(getattr(st, "message", "") or "")

    def setup_trainer_env(self):
        """Set the trainer environment up, yielding the output so far (the button streams it)."""
        from bp_trainer import trainer_env

        lines: List[str] = []
        try:
            for line in trainer_env.setup_lines():
                lines.append(line)
                yield "\n".join(lines[-200:])
        except BPError as exc:
            lines.append(f"error: {exc}")
        ready, msg = self.trainer_env_status()
        lines.append("ready: press Start training" if ready else f"not ready: {msg}")
        yield "\n".join(lines[-200:])


def _resolve_relative(cfg: Dict[str, Any], base: Path) -> Dict[str, Any]:
    for key in ("model.base", "model.vae", "dataset.path"):
        v = train_form.get(cfg, key)
        if isinstance(v, str) and v and not os.path.isabs(os.path.expanduser(v)):
            train_form.put(cfg, key, str((base / v).resolve()))
    return cfg


def _widget(gr: Any, key: str, label: str, value: Any):
    f = train_form.field(key)
    elem_id = "bp_train_f_" + key.replace(".", "_")
    info = f.help
    if f.kind == "bool":
        return gr.Checkbox(label=label, value=bool(value), elem_id=elem_id, info=info)
    if f.choices:
        return gr.Dropdown(label=label, choices=list(f.choices), value=value, elem_id=elem_id, info=info)
    if f.kind == "int":
        return gr.Number(label=label, value=value, precision=0, elem_id=elem_id, info=info)
    if f.kind == "float":
        return gr.Number(label=label, value=value, elem_id=elem_id, info=info)
    if f.kind == "strlist":
        return gr.Textbox(label=label, value=value, lines=3, elem_id=elem_id, info=info)
    return gr.Textbox(label=label, value=value, elem_id=elem_id, info=info)


def _upd(gr: Any, values: Sequence[Any]) -> List[Any]:
    return [gr.update() if v is NO_CHANGE else v for v in values]


def build(host: Any, *, initial_config: Optional[str] = None) -> TrainCallbacks:
    """Lay out the Train sub-tab inside the current gradio context and wire its events."""
    import gradio as gr

    cb = TrainCallbacks(host)
    first_message = ""
    try:
        init = cb.initial(initial_config)
    except (BPError, OSError, UnicodeDecodeError) as exc:  # a broken run YAML must not break the tab
        init = cb.initial()
        first_message = render.error_html(BPError(f"could not load the run config ({exc})", path=initial_config))
    ready, env_msg = cb.trainer_env_status()
    with gr.Column(elem_id="bp_train_train"):
        if not ready:
            _trainer_env_box(gr, cb, env_msg)
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, elem_id="bp_train_form"):
                with gr.Row():
                    dataset = gr.Textbox(label="Dataset folder", value=init["dataset"], elem_id="bp_train_dataset",
                                         placeholder="/path/to/images (with .txt tag captions)", scale=3)
                    base = gr.Dropdown(label="Base model", choices=cb.checkpoint_choices(), value=init["base"] or None,
                                       allow_custom_value=True, elem_id="bp_train_base", scale=3)
                    refresh = gr.Button("\u21bb", elem_id="bp_train_refresh_models", elem_classes=["bp-icon-btn"],
                                        scale=0, min_width=40)
                with gr.Row():
                    preset = gr.Radio(label="Resolution preset", choices=[*train_form.PRESET_NAMES, "custom"],
                                      value=init["preset"], elem_id="bp_train_preset", scale=2)
                    arb = gr.Code(label="Buckets (naifu-diffusion arb: block, editable)", value=init["arb"],
                                  language="yaml", elem_id="bp_train_arb", lines=9)
                fields = []
                inits = iter(init["values"])
                with gr.Row(elem_id="bp_train_options"):
                    for key, label in train_form.FORM_FIELDS:
                        if key.startswith(("sampling.", "run.num_processes")):
                            break
                        fields.append(_widget(gr, key, label, next(inits)))
                with gr.Accordion("Sample prompts (images during training), processes", open=False,
                                  elem_id="bp_train_sampling_box"):
                    with gr.Row():
                        for key, label in train_form.FORM_FIELDS[len(fields):]:
                            fields.append(_widget(gr, key, label, next(inits)))
                with gr.Accordion("Run config (YAML): every option", open=False, elem_id="bp_train_yaml_box"):
                    yaml_box = gr.Code(label="run.yaml", value=init["yaml"], language="yaml", elem_id="bp_train_yaml",
                                       lines=24)
                    with gr.Row():
                        yaml_apply = gr.Button("YAML \u2192 form", elem_id="bp_train_yaml_apply")
                        yaml_export = gr.Button("Export YAML", elem_id="bp_train_yaml_export")
                    with gr.Row():
                        yaml_import = gr.File(label="Import a run YAML", file_types=[".yaml", ".yml"], type="file",
                                              elem_id="bp_train_yaml_import")
                        yaml_file = gr.File(label="Exported YAML", interactive=False, elem_id="bp_train_yaml_file")
            with gr.Column(scale=4, elem_id="bp_train_run_panel"):
                with gr.Row():
                    start = gr.Button("Start training", variant="primary", elem_id="bp_train_start")
                    stop = gr.Button("Stop", variant="stop", elem_id="bp_train_stop", interactive=False)
                    poll = gr.Button("Refresh", elem_id="bp_train_poll", elem_classes=["bp-small-btn"], scale=0,
                                     min_width=90)
                with gr.Accordion("Resume a stopped run", open=False, elem_id="bp_train_resume_box"):
                    with gr.Row():
                        resume_name = gr.Dropdown(label="Run", choices=cb.resumable_runs(), elem_id="bp_train_resume_run",
                                                  scale=4)
                        resume_refresh = gr.Button("\u21bb", elem_id="bp_train_resume_refresh",
                                                   elem_classes=["bp-icon-btn"], scale=0, min_width=40)
                        resume_btn = gr.Button("Resume", elem_id="bp_train_resume", scale=1)
                message = gr.HTML(first_message, elem_id="bp_train_message")
                progress = gr.HTML(render.progress_html({"status": "idle"}), elem_id="bp_train_progress")
                loss = gr.HTML(render.line_chart_svg([], title="loss"), elem_id="bp_train_loss")
                samples = gr.Gallery(label="Samples per save", elem_id="bp_train_samples", columns=4, height=220,
                                     object_fit="contain")
                log = gr.Textbox(label="Log", lines=8, max_lines=14, interactive=False, elem_id="bp_train_log",
                                 elem_classes=["bp-log"])
        version = gr.State("")

    render.not_saved(base, yaml_file, yaml_import, log, samples, version, resume_name)
    cb.initial_values = init
    cb.components = {"dataset": dataset, "base": base, "arb": arb, "yaml": yaml_box, "fields": fields}
    form_inputs = [yaml_box, base, dataset, arb, *fields]
    refresh.click(lambda cur: gr.update(choices=cb.refresh_models(), value=cur), [base], [base], show_progress="hidden")

    def sync(*args):
        return _upd(gr, cb.form_to_yaml(*args))

    # User edits only (`input`/`blur`), so programmatic updates of the form do not echo back.
    for comp in [base, dataset, arb, *fields]:
        event = comp.blur if isinstance(comp, (gr.Textbox, gr.Number)) else comp.input
        event(sync, form_inputs, [yaml_box, message, preset], show_progress="hidden", queue=False)
    preset.input(lambda p, y, a, *v: _upd(gr, cb.apply_preset(p, y, a, *v)), [preset, yaml_box, arb, *fields],
                  [arb, yaml_box, *fields, message], show_progress="hidden", queue=False)
    form_outputs = [base, dataset, preset, arb, yaml_box, *fields, message]
    yaml_apply.click(lambda y: _upd(gr, cb.yaml_to_form(y)), [yaml_box], form_outputs, show_progress="hidden")
    yaml_import.upload(lambda f: _upd(gr, cb.import_yaml(f)), [yaml_import], form_outputs, show_progress="hidden")
    yaml_export.click(cb.export_yaml, form_inputs, [yaml_file, message], show_progress="hidden")

    poll_outputs = [progress, loss, samples, log, start, stop, version]

    def do_poll(v):
        out = cb.poll(v)
        return [*_upd(gr, out[:4]), gr.update(**out[4]), gr.update(**out[5]), out[6]]

    start.click(cb.start, form_inputs, [message], show_progress="minimal").then(
        do_poll, [version], poll_outputs, show_progress="hidden")
    stop.click(cb.stop, None, [message], show_progress="hidden").then(do_poll, [version], poll_outputs,
                                                                     show_progress="hidden")
    poll.click(do_poll, [version], poll_outputs, show_progress="hidden", queue=False)  # a quick read: never queued
    resume_refresh.click(lambda: gr.update(choices=cb.resumable_runs()), None, [resume_name], show_progress="hidden")
    resume_btn.click(cb.resume, [resume_name], [message], show_progress="minimal").then(
        do_poll, [version], poll_outputs, show_progress="hidden")
    cb.load_event = (do_poll, [version], poll_outputs)  # wired to the tab's load in tab.py
    return cb


def _trainer_env_box(gr: Any, cb: TrainCallbacks, message: str) -> None:
    """The "Set up trainer environment" button (shown while the trainer's environment is not ready)."""
    with gr.Group(elem_id="bp_train_env_box"):
        gr.HTML(render.message_html(message or "The trainer's environment is not set up yet.", "warn"))
        button = gr.Button("Set up trainer environment", elem_id="bp_train_env_setup")
        out = gr.Textbox(label="Set-up output", lines=6, max_lines=12, interactive=False, elem_id="bp_train_env_log",
                         elem_classes=["bp-log"])
    render.not_saved(out)
    button.click(cb.setup_trainer_env, None, [out])
