"""The Train sub-tab: the run form, the run YAML, Start/Stop and live progress.

Callbacks live on `TrainCallbacks(host)` as plain methods over plain values (unit-tested with a fake
host): a form arrives as `{name: value}` (`yaml`, `base`, `dataset`, `arb`, `preset` and one entry per form field,
keyed by its config key) and every callback answers `{output name: value}` (see `render.bind`); `build(host)` lays
out the gradio components and wires them. Progress is redrawn when the page clicks the Refresh button
`#bp_train_poll` (javascript/bp_train.js does it every 1.5 s while a run is active and the tab is visible, the user
may too); the run itself is followed by a background watcher (`runs.py`), so nothing depends on a page being open.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from bp_trainer import access
from bp_trainer.errors import BPError
from bp_trainer.ui import render, train_form
from bp_trainer.run_controller import RunController, controller_for

STOP_LABEL = "Stop"
FORCE_STOP_LABEL = "Force stop"
STOP_NOTE = ("Stop: the trainer finishes its current step, saves (a resumable state, and the checkpoint unless "
             "saving.on_stop is off) and exits. While it stops, the button becomes Force stop: it kills the trainer at "
             "once; what it learned since its last save is lost, and Resume continues from that save.")


def field_values(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """The form fields' widget values of a config, keyed by config key."""
    return dict(zip((key for key, _label in train_form.FORM_FIELDS), train_form.form_values(cfg)))


def _merged(form: Mapping[str, Any], *, base: Optional[str], dataset: Optional[str], arb: Optional[str]) -> dict:
    values = [form[key] for key, _label in train_form.FORM_FIELDS]
    return train_form.merge_form(form["yaml"], base=base, dataset=dataset, arb_text=arb, values=values)


def _gpu_free_bytes(host: Any) -> Optional[int]:
    """The host's GPU's free memory (`host.gpu_free_bytes()`), None when it has none or cannot tell."""
    fn = getattr(host, "gpu_free_bytes", None)
    try:
        return int(fn()) if callable(fn) and fn() else None
    except Exception:  # noqa: BLE001 - a reading must never break the tab
        return None


class TrainCallbacks:
    def __init__(self, host: Any):
        self.host = host

    @property
    def controller(self) -> RunController:
        return controller_for(self.host)

    # ------------------------------------------------------------------------------------ models and runs lists

    def checkpoint_choices(self) -> List[str]:
        return list(self.host.list_checkpoints())

    def refresh_models(self) -> List[str]:
        self.host.refresh_models()
        return self.checkpoint_choices()

    def refresh_lists(self, base: Optional[str]) -> Dict[str, Any]:
        """The base model and resume-run lists as they are now (page load, ↻): the host re-scans its models."""
        return {"base": render.change(choices=self.refresh_models(), value=base or None),
                "resume_run": render.change(choices=self.resumable_runs())}

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
        """Starting values of the form (a run YAML given to the app, else the 768 preset's defaults):
        `base`, `dataset`, `preset`, `arb`, `yaml` and `fields` ({config key: widget value})."""
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
        return self._form_of(train_form._cfgmod().merge(train_form._cfgmod().defaults(), cfg))

    def _form_of(self, full: Mapping[str, Any]) -> Dict[str, Any]:
        """Every form input's value for a full config."""
        return {"base": self.base_name_for(train_form.get(full, "model.base") or ""),
                "dataset": train_form.get(full, "dataset.path") or "",
                "preset": train_form.detect_preset(full) or "custom", "arb": train_form.arb_yaml(full),
                "yaml": train_form.dump_yaml(full), "fields": field_values(full)}

    def config_from_form(self, form: Mapping[str, Any], *, check_paths: bool = True) -> Any:
        """The validated config the form describes, with the host's runs folder and trainer Python."""
        base = form.get("base")
        raw = _merged(form, base=self.base_path(base) if base else None, dataset=form.get("dataset"),
                      arb=form.get("arb"))
        train_form.put(raw, "run.runs_dir", self.host.runs_dir())
        train_form.put(raw, "run.python", self.host.trainer_python())
        return train_form.validate(raw, check_paths=check_paths)

    def form_to_yaml(self, form: Mapping[str, Any]) -> Dict[str, Any]:
        """Form edits into the YAML box (not validated: the box shows what Start will check), and the preset
        the buckets now match ("custom" after an edit of the `arb:` block)."""
        try:
            base = form.get("base")
            raw = _merged(form, base=self.base_path(base) if base else None, dataset=form.get("dataset"),
                          arb=form.get("arb"))
            full = train_form._cfgmod().merge(train_form._cfgmod().defaults(), raw)
            return {"yaml": train_form.dump_yaml(full), "message": "",
                    "preset": train_form.detect_preset(full) or "custom"}
        except (BPError, ValueError, TypeError) as exc:
            return {"message": render.error_html(exc)}

    def apply_preset(self, form: Mapping[str, Any]) -> Dict[str, Any]:
        """Preset radio: its `arb:` block and training keys into the form and the YAML."""
        preset = form.get("preset")
        if preset not in train_form.PRESET_NAMES:
            return {"message": ""}
        try:
            raw = _merged(form, base=None, dataset=None, arb=None)
            cfg = train_form.apply_preset(train_form._cfgmod().merge(train_form._cfgmod().defaults(), raw), preset)
        except BPError as exc:
            return {"message": render.error_html(exc)}
        return {"arb": train_form.arb_yaml(cfg), "yaml": train_form.dump_yaml(cfg), **field_values(cfg),
                "message": render.message_html(f"preset {preset}: buckets and batch settings applied", "ok")}

    def yaml_to_form(self, yaml_text: str) -> Dict[str, Any]:
        """The YAML box into the form (base, dataset, preset, arb, every form field)."""
        try:
            raw = train_form.parse_yaml(yaml_text)
            full = train_form._cfgmod().merge(train_form._cfgmod().defaults(), raw)
        except BPError as exc:
            return {"message": render.error_html(exc)}
        form = self._form_of(full)
        fields = form.pop("fields")
        return {**form, **fields, "message": render.message_html("run config loaded into the form", "ok")}

    def import_yaml(self, file: Any) -> Dict[str, Any]:
        path = getattr(file, "name", file)
        if not path:
            return {"message": ""}
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            return {"message": render.error_html(BPError(str(exc), path=path))}
        return self.yaml_to_form(text)

    def export_yaml(self, form: Mapping[str, Any]) -> Dict[str, Any]:
        """Validate (paths too) and write the run YAML to a file the browser downloads."""
        try:
            cfg = self.config_from_form(form, check_paths=False)
        except BPError as exc:
            return {"yaml_file": None, "message": render.error_html(exc)}
        name = cfg.run.name
        out = Path(tempfile.mkdtemp(prefix="bp-train-")) / f"{name}.yaml"
        out.write_text(train_form.dump_yaml(cfg), encoding="utf-8")
        return {"yaml_file": str(out), "message": render.message_html(f"exported {out.name}", "ok")}

    # ------------------------------------------------------------------------------------ run

    def estimate(self, form: Mapping[str, Any]) -> Dict[str, Any]:
        """The run's pre-flight memory estimate beside the GPU's free memory (remembered for Start's warning)."""
        from bp_trainer.ui import estimate as E

        try:
            cfg = self.config_from_form(form)
            result = E.run_estimate(cfg, self.host.trainer_python())
        except BPError as exc:
            return {"message": render.error_html(exc)}
        free = _gpu_free_bytes(self.host)
        self._estimate = (train_form.dump_yaml(cfg), result, free)
        return {"message": render.message_html(E.summary(result, free), "ok" if E.fits(result, free) is not False
                                               else "warn")}

    def _fit_warning(self, cfg: Any) -> str:
        """Start's warning when this very config was estimated not to fit."""
        from bp_trainer.ui import estimate as E

        last = getattr(self, "_estimate", None)
        if last is None or last[0] != train_form.dump_yaml(cfg) or E.fits(last[1], last[2]) is not False:
            return ""
        return " Warning: " + E.summary(last[1], last[2])

    def start(self, form: Mapping[str, Any]) -> Dict[str, Any]:
        try:
            cfg = self.config_from_form(form)
            access.remember_dataset(self.host.runs_dir(), cfg.dataset.path)  # the API may use it from now on
            run_dir = self.controller.start(cfg)
        except BPError as exc:
            return {"message": render.error_html(exc)}
        warning = self._fit_warning(cfg)
        return {"message": render.message_html(f"started {Path(run_dir).name} (folder {run_dir}).{warning}",
                                               "warn" if warning else "ok")}

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

    def resume(self, name: str) -> Dict[str, Any]:
        """Continue a stopped or interrupted run from its last saved state (same folder, same config)."""
        from bp_trainer.rundir import RunDir
        from bp_trainer.train.config import load_config

        if not name:
            return {"message": render.message_html("choose a run to resume", "warn")}
        run_dir = Path(self.host.runs_dir()) / name
        try:
            if os.path.dirname(name) or not run_dir.is_dir():
                raise BPError("run folder not found", path=run_dir, hint="press \u21bb to list the runs")
            cfg = load_config(RunDir(run_dir).config).with_values(run={"python": self.host.trainer_python()})
            self.controller.start(cfg, resume_dir=str(run_dir))
        except BPError as exc:
            return {"message": render.error_html(exc)}
        return {"message": render.message_html(f"resuming {name} from its last saved state", "ok")}

    def stop(self) -> Dict[str, Any]:
        """Stop, or while the run already stops, Force stop (what the button then says): kill it at once."""
        ctl = self.controller
        try:
            if ctl.snapshot()["status"] == "stopping":
                return {"message": render.message_html(self._force_stop(ctl), "warn")}
            return {"message": render.message_html(ctl.stop(), "info")}
        except BPError as exc:
            return {"message": render.error_html(exc)}

    @staticmethod
    def _force_stop(ctl: RunController) -> str:
        from bp_trainer import launcher

        run_dir = ctl.run_dir
        if run_dir is None:
            raise BPError("no training run is running")
        launcher.stop_run(run_dir, force=True)
        return (f"Force stop: the trainer of {Path(run_dir).name} was killed; Resume continues it from its last "
                "saved state.")

    def poll(self, last_version: Any) -> Dict[str, Any]:
        """progress, the Start/Stop buttons and the version always; loss chart, samples and log when they changed."""
        ctl = self.controller
        if not ctl.active:
            ctl.attach_existing()
            if ctl.run_dir is None:
                self._show_latest(ctl)
        snap = ctl.snapshot()
        version = f"{snap.get('run_dir')}:{snap['version']}:{snap['status']}"
        stopping = snap["status"] == "stopping"
        out: Dict[str, Any] = {
            "progress": render.progress_html(snap),
            "start": render.change(interactive=not snap["active"]),
            "stop": render.change(interactive=bool(snap["active"]), value=FORCE_STOP_LABEL if stopping else STOP_LABEL),
            "version": version,
        }
        if version != last_version:
            with ctl.lock:
                out["loss"] = render.loss_chart_svg(ctl.view.losses, ctl.view.validation_curve(), ctl.view.best_step)
                out["samples"] = render.sample_grid_update(ctl.view.sample_grid())
                out["log"] = ctl.view.log_text()
        return out

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

    def trainer_env_status(self) -> tuple:
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


ACCORDION_FIELDS = ("sampling.", "run.num_processes")  # form fields shown in the "Sample prompts" accordion


def _form_fields(gr: Any, init: Mapping[str, Any]) -> Dict[str, Any]:
    """The form's option widgets, {config key: component}: the main ones in a row, the sampling ones folded."""
    keys = [(key, label) for key, label in train_form.FORM_FIELDS if not key.startswith(ACCORDION_FIELDS)]
    folded = [(key, label) for key, label in train_form.FORM_FIELDS if key.startswith(ACCORDION_FIELDS)]
    fields: Dict[str, Any] = {}
    with gr.Row(elem_id="bp_train_options"):
        for key, label in keys:
            fields[key] = _widget(gr, key, label, init[key])
    with gr.Accordion("Sample prompts (images during training), processes", open=False,
                      elem_id="bp_train_sampling_box"):
        with gr.Row():
            for key, label in folded:
                fields[key] = _widget(gr, key, label, init[key])
    return fields


def _form_column(gr: Any, cb: TrainCallbacks, init: Mapping[str, Any]) -> Dict[str, Any]:
    """The left column: dataset, base model, preset, buckets, options, the run YAML. {name: component}."""
    c: Dict[str, Any] = {}
    with gr.Column(scale=5, elem_id="bp_train_form"):
        with gr.Row():
            c["dataset"] = gr.Textbox(label="Dataset folder", value=init["dataset"], elem_id="bp_train_dataset",
                                      placeholder="/path/to/images (with .txt tag captions)", scale=3)
            c["base"] = gr.Dropdown(label="Base model", choices=cb.checkpoint_choices(), value=init["base"] or None,
                                    allow_custom_value=True, elem_id="bp_train_base", scale=3)
            c["refresh_models"] = gr.Button("\u21bb", elem_id="bp_train_refresh_models", elem_classes=["bp-icon-btn"],
                                            scale=0, min_width=40)
        with gr.Row():
            c["preset"] = gr.Radio(label="Resolution preset", choices=[*train_form.PRESET_NAMES, "custom"],
                                   value=init["preset"], elem_id="bp_train_preset", scale=2)
            c["arb"] = gr.Code(label="Buckets (naifu-diffusion arb: block, editable)", value=init["arb"],
                               language="yaml", elem_id="bp_train_arb", lines=9)
        c["fields"] = _form_fields(gr, init["fields"])
        with gr.Accordion("Run config (YAML): every option", open=False, elem_id="bp_train_yaml_box"):
            c["yaml"] = gr.Code(label="run.yaml", value=init["yaml"], language="yaml", elem_id="bp_train_yaml",
                                lines=24)
            with gr.Row():
                c["yaml_apply"] = gr.Button("YAML \u2192 form", elem_id="bp_train_yaml_apply")
                c["yaml_export"] = gr.Button("Export YAML", elem_id="bp_train_yaml_export")
            with gr.Row():
                c["yaml_import"] = gr.File(label="Import a run YAML", file_types=[".yaml", ".yml"], type="file",
                                           elem_id="bp_train_yaml_import")
                c["yaml_file"] = gr.File(label="Exported YAML", interactive=False, elem_id="bp_train_yaml_file")
    return c


def _run_column(gr: Any, cb: TrainCallbacks, first_message: str) -> Dict[str, Any]:
    """The right column: Start/Stop/Refresh, resume, message, progress, loss, samples, log. {name: component}."""
    c: Dict[str, Any] = {}
    with gr.Column(scale=4, elem_id="bp_train_run_panel"):
        with gr.Row():
            c["start"] = gr.Button("Start training", variant="primary", elem_id="bp_train_start")
            c["stop"] = gr.Button(STOP_LABEL, variant="stop", elem_id="bp_train_stop", interactive=False)
            c["estimate"] = gr.Button("Estimate memory", elem_id="bp_train_estimate", scale=0, min_width=150)
            c["poll"] = gr.Button("Refresh", elem_id="bp_train_poll", elem_classes=["bp-small-btn"], scale=0,
                                  min_width=90)
        gr.HTML(f'<div class="bp-muted bp-stop-note">{render.esc(STOP_NOTE)}</div>', elem_id="bp_train_stop_note")
        with gr.Accordion("Resume a stopped run", open=False, elem_id="bp_train_resume_box"):
            with gr.Row():
                c["resume_run"] = gr.Dropdown(label="Run", choices=cb.resumable_runs(), elem_id="bp_train_resume_run",
                                              scale=4)
                c["resume_refresh"] = gr.Button("\u21bb", elem_id="bp_train_resume_refresh",
                                                elem_classes=["bp-icon-btn"], scale=0, min_width=40)
                c["resume"] = gr.Button("Resume", elem_id="bp_train_resume", scale=1)
        c["message"] = gr.HTML(first_message, elem_id="bp_train_message")
        c["progress"] = gr.HTML(render.progress_html({"status": "idle"}), elem_id="bp_train_progress")
        c["loss"] = gr.HTML(render.line_chart_svg([], title="loss"), elem_id="bp_train_loss")
        c["samples"] = gr.Gallery(label="Latest samples", elem_id="bp_train_samples", columns=4, height=220,
                                  object_fit="contain")
        c["log"] = gr.Textbox(label="Log", lines=8, max_lines=14, interactive=False, elem_id="bp_train_log",
                              elem_classes=["bp-log"])
    return c


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
            c = _form_column(gr, cb, init)
            c.update(_run_column(gr, cb, first_message))
        c["version"] = gr.State("")
    render.not_saved(c["base"], c["yaml_file"], c["yaml_import"], c["log"], c["samples"], c["version"],
                     c["resume_run"])
    cb.initial_values = {key: value for key, value in init.items() if key != "fields"}
    cb.components = {"dataset": c["dataset"], "base": c["base"], "arb": c["arb"], "yaml": c["yaml"],
                     "fields": c["fields"]}
    _wire(gr, cb, c)
    return cb


def _wire(gr: Any, cb: TrainCallbacks, c: Mapping[str, Any]) -> None:
    fields = c["fields"]
    form = {"yaml": c["yaml"], "base": c["base"], "dataset": c["dataset"], "arb": c["arb"], **fields}
    form_outputs = {name: c[name] for name in ("base", "dataset", "preset", "arb", "yaml", "message")}
    form_outputs.update(fields)
    lists = {"base": c["base"], "resume_run": c["resume_run"]}
    render.on_page_load(lambda v: cb.refresh_lists(v["base"]), {"base": c["base"]}, lists)
    render.bind(c["refresh_models"].click, lambda v: cb.refresh_lists(v["base"]), {"base": c["base"]}, lists,
                show_progress="hidden")
    render.bind(c["resume_refresh"].click, lambda v: {"resume_run": render.change(choices=cb.resumable_runs())}, None,
                {"resume_run": c["resume_run"]}, show_progress="hidden")
    # User edits only (`input`/`blur`), so programmatic updates of the form do not echo back.
    sync_outputs = {"yaml": c["yaml"], "message": c["message"], "preset": c["preset"]}
    for comp in [c["base"], c["dataset"], c["arb"], *fields.values()]:
        event = comp.blur if isinstance(comp, (gr.Textbox, gr.Number)) else comp.input
        render.bind(event, cb.form_to_yaml, form, sync_outputs, show_progress="hidden", queue=False)
    render.bind(c["preset"].input, cb.apply_preset, {**form, "preset": c["preset"]},
                {"arb": c["arb"], "yaml": c["yaml"], **fields, "message": c["message"]}, show_progress="hidden",
                queue=False)
    render.bind(c["yaml_apply"].click, lambda v: cb.yaml_to_form(v["yaml"]), {"yaml": c["yaml"]}, form_outputs,
                show_progress="hidden")
    render.bind(c["yaml_import"].upload, lambda v: cb.import_yaml(v["file"]), {"file": c["yaml_import"]},
                form_outputs, show_progress="hidden")
    render.bind(c["yaml_export"].click, cb.export_yaml, form, {"yaml_file": c["yaml_file"], "message": c["message"]},
                show_progress="hidden")
    poll_outputs = {name: c[name] for name in ("progress", "loss", "samples", "log", "start", "stop", "version")}
    poll = {"fn": lambda v: cb.poll(v["version"]), "inputs": {"version": c["version"]}, "outputs": poll_outputs}
    message = {"message": c["message"]}
    started = render.bind(c["start"].click, cb.start, form, message, show_progress="minimal")
    stopped = render.bind(c["stop"].click, lambda v: cb.stop(), None, message, show_progress="hidden")
    render.bind(c["estimate"].click, cb.estimate, form, message, show_progress="minimal")
    resumed = render.bind(c["resume"].click, lambda v: cb.resume(v["run"]), {"run": c["resume_run"]}, message,
                          show_progress="minimal")
    for dependency in (started, stopped, resumed):
        render.bind(dependency.then, **poll, show_progress="hidden")
    render.bind(c["poll"].click, **poll, show_progress="hidden", queue=False)  # a quick read: never queued
    # Re-attach on every page load: a reloaded page shows the live run at once.
    render.on_page_load(**poll)


def _trainer_env_box(gr: Any, cb: TrainCallbacks, message: str) -> None:
    """The "Set up trainer environment" button (shown while the trainer's environment is not ready)."""
    with gr.Group(elem_id="bp_train_env_box"):
        gr.HTML(render.message_html(message or "The trainer's environment is not set up yet.", "warn"))
        button = gr.Button("Set up trainer environment", elem_id="bp_train_env_setup")
        out = gr.Textbox(label="Set-up output", lines=6, max_lines=12, interactive=False, elem_id="bp_train_env_log",
                         elem_classes=["bp-log"])
    render.not_saved(out)
    button.click(cb.setup_trainer_env, None, [out])
