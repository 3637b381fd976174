"""The "BP presets" Script (txt2img and img2img Script dropdown): clip skip, ENSD and hires-fix presets.

Logic lives in `bp_trainer.presets` (pure, tested without the WebUI: `preset` what a preset is, `store` the user
presets file, `apply` a preset on a processing object); this file only builds the controls and
calls it. `import modules.scripts as scripts` (never `from modules.scripts import Script`, which would register
the base class). API use: `"script_name": "bp presets", "script_args": ["BPModel recommended"]`.
"""

from __future__ import annotations

import os
from typing import Any, List, Optional, Tuple

import gradio as gr

import modules.scripts as scripts
from modules import processing, script_callbacks, shared

EXT_ROOT = scripts.basedir()

from bp_trainer.presets import apply as preset_apply  # noqa: E402
from bp_trainer.presets import preset as bp_preset  # noqa: E402
from bp_trainer.presets import store as preset_store  # noqa: E402
from bp_trainer.errors import BPError  # noqa: E402


def presets_file() -> str:
    configured = str(getattr(shared.opts, "bp_train_presets_file", "") or "").strip()
    if configured:
        return configured
    from modules import paths

    return os.path.join(paths.data_path, "bp-train", "presets.yaml")


def load_presets() -> Tuple[List[bp_preset.Preset], Optional[str]]:
    """Built-in + user presets; a broken user file gives the built-ins and the error message."""
    try:
        return preset_store.all_presets(presets_file()), None
    except BPError as exc:
        return list(bp_preset.BUILTIN_PRESETS), str(exc)


def describe(name: str) -> str:
    presets, error = load_presets()
    preset = preset_store.find_preset(presets, name or "")
    text = f"**{preset.name}**: {preset.summary()}" if preset else f"Unknown preset '{name}'."
    if preset is not None and preset.description:
        text += f"  \n{preset.description}"
    if error:
        text += f"  \n⚠ presets file: {error}"
    return text


def save_from_infotext(infotext: str, name: str, include_sampling: bool, replace: bool) -> Tuple[Any, str, str]:
    """Button handler: parse the infotext, save it as a user preset, select it. Returns (dropdown, info, status)."""
    try:
        name = bp_preset.check_name(name or "")
        preset = bp_preset.preset_from_infotext(infotext or "", name, include_sampling=include_sampling)
        preset_store.add_user_preset(presets_file(), preset, replace=replace)
    except BPError as exc:
        return gr.update(), gr.update(), f"⚠ {exc}"
    names = [p.name for p in load_presets()[0]]
    return (gr.update(choices=names, value=preset.name), describe(preset.name),
            f"Saved '{preset.name}' to {presets_file()}: {preset.summary()}")


def refresh(current: str) -> Tuple[Any, str]:
    names = [p.name for p in load_presets()[0]]
    value = current if current in names else bp_preset.RECOMMENDED
    return gr.update(choices=names, value=value), describe(value)


def preset_from_paste(params: dict) -> Any:
    """Paste / "Send to txt2img": select the preset an infotext names (left alone when unknown here)."""
    name = params.get(bp_preset.INFOTEXT_KEY)
    if not name:
        return gr.update()
    preset = preset_store.find_preset(load_presets()[0], str(name))
    return preset.name if preset is not None else gr.update()


def _tool_button(value: str, elem_id: str) -> Any:
    """The WebUI's small icon button (its CSS styles `.tool`); a plain button with that class elsewhere."""
    try:
        from modules.ui_components import ToolButton
    except ImportError:  # pragma: no cover - every v1.x WebUI has it
        return gr.Button(value=value, elem_id=elem_id, elem_classes=["tool"])
    return ToolButton(value=value, elem_id=elem_id)


class BPPresetsScript(scripts.Script):
    def title(self) -> str:
        return bp_preset.SCRIPT_TITLE

    def show(self, is_img2img: bool) -> bool:
        return True

    def ui(self, is_img2img: bool) -> list:
        presets, _ = load_presets()
        names = [p.name for p in presets]
        with gr.Row():
            preset = gr.Dropdown(label="Preset", choices=names, value=bp_preset.RECOMMENDED,
                                 elem_id=self.elem_id("preset"))
            refresh_button = _tool_button("\U0001f504", elem_id=self.elem_id("refresh"))
        info = gr.Markdown(describe(bp_preset.RECOMMENDED), elem_id=self.elem_id("info"))
        if is_img2img:
            gr.Markdown("img2img: clip skip, ENSD and sampling settings apply; hires fix is txt2img only.")
        with gr.Accordion("New preset from an infotext", open=False):
            infotext = gr.Textbox(label="Infotext (PNG Info text, or the text under an image)", lines=3,
                                  elem_id=self.elem_id("infotext"))
            with gr.Row():
                name = gr.Textbox(label="Preset name", elem_id=self.elem_id("name"))
                include_sampling = gr.Checkbox(label="Include steps, sampler and CFG scale", value=True,
                                               elem_id=self.elem_id("include_sampling"))
                replace = gr.Checkbox(label="Replace a preset of that name", value=False,
                                      elem_id=self.elem_id("replace"))
            save = gr.Button("Save preset", elem_id=self.elem_id("save"))
            status = gr.Markdown(elem_id=self.elem_id("status"))
        preset.change(describe, inputs=[preset], outputs=[info], show_progress="hidden")
        refresh_button.click(refresh, inputs=[preset], outputs=[preset, info], show_progress="hidden")
        save.click(save_from_infotext, inputs=[infotext, name, include_sampling, replace],
                   outputs=[preset, info, status], show_progress="hidden")
        self.infotext_fields = [(preset, preset_from_paste)]
        self.paste_field_names = [bp_preset.INFOTEXT_KEY]
        return [preset]

    def run(self, p: Any, preset_name: str = bp_preset.RECOMMENDED, *unused: Any) -> Any:
        presets, error = load_presets()
        preset = preset_store.find_preset(presets, str(preset_name or ""))
        if preset is None:
            raise BPError(f"unknown BP preset '{preset_name}'" + (f" ({error})" if error else ""),
                          hint="choose one of: " + ", ".join(x.name for x in presets))
        is_txt2img = isinstance(p, processing.StableDiffusionProcessingTxt2Img)
        snapshot = preset_apply.snapshot_settings(shared.opts)
        preset_apply.apply_preset(p, preset, is_txt2img)
        try:
            return processing.process_images(p)
        finally:
            # The WebUI restores overrides only for keys saved in config.json; undo the rest here too.
            if getattr(p, "override_settings_restore_afterwards", True):
                preset_apply.restore_settings(shared.opts, snapshot)


def on_infotext_pasted(infotext: str, params: dict) -> None:
    """An infotext naming a BP preset selects the Script even when its 'Script' key was lost (e.g. edited)."""
    if params.get(bp_preset.INFOTEXT_KEY) and "Script" not in params:
        params["Script"] = bp_preset.SCRIPT_TITLE


script_callbacks.on_infotext_pasted(on_infotext_pasted)
