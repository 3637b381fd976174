"""Load BP Train's `scripts/*.py` into the `modules` stand-in the way the WebUI does, and drive it.

`load_webui(tmp_path, monkeypatch, config)` gives a fresh WebUI per test: stub modules re-imported, `opts.data`
set to `config` (what config.json holds), scripts imported with the extension root first on sys.path and
`Script` subclasses registered from each module's namespace, `on_ui_settings` run (as the UI build does).
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any, Dict, Optional

STUB_DIR = Path(__file__).resolve().parent
REPO = STUB_DIR.parent.parent


def _purge() -> None:
    for name in list(sys.modules):
        if name == "modules" or name.startswith("modules."):
            del sys.modules[name]


class WebUI:
    def __init__(self, root: Path):
        import modules.call_queue as call_queue
        import modules.devices as devices
        import modules.processing as processing
        import modules.script_callbacks as script_callbacks
        import modules.scripts as scripts
        import modules.sd_models as sd_models
        import modules.sd_vae as sd_vae
        import modules.shared as shared

        self.root = root
        self.call_queue = call_queue
        self.devices = devices
        self.processing = processing
        self.script_callbacks = script_callbacks
        self.scripts = scripts
        self.sd_models = sd_models
        self.sd_vae = sd_vae
        self.shared = shared
        self.opts = shared.opts

    # ---------------------------------------------------------------- scripts
    def script_classes(self):
        return [d.script_class for d in self.scripts.scripts_data]

    def runner(self, is_img2img: bool = False):
        import gradio as gr

        runner = self.scripts.ScriptRunner()
        runner.initialize_scripts(is_img2img)
        with gr.Blocks():
            runner.setup_ui()
        return runner

    def ui_args(self, runner, title: Optional[str], **values: Any) -> list:
        """The script_args the UI would send: component values, the Script dropdown's index."""
        args = [getattr(c, "value", None) for c in runner.inputs]
        args[0] = 0 if title is None else runner.titles.index(title) + 1
        return args

    def generate(self, runner, p, args) -> Any:
        """txt2img()/img2img(): under the queue lock, the selected Script's run() else process_images()."""
        p.scripts = runner
        p.script_args = args
        with self.call_queue.queue_lock:
            processed = runner.run(p, *args)
            if processed is None:
                processed = self.processing.process_images(p)
        return processed

    def api_args(self, runner, script_name: str, script_args: list) -> list:
        """`Api.init_script_args`: defaults from the UI, the named script's slice replaced by the request's."""
        script = next(s for s in runner.selectable_scripts if s.title().lower() == script_name.lower())
        args = [getattr(c, "value", None) for c in runner.inputs]
        args[script.args_from:script.args_to] = script_args
        args[0] = runner.selectable_scripts.index(script) + 1
        return args

    def paste(self, runner, infotext: str) -> Dict[Any, Any]:
        """Paste / "Send to": parse, run on_infotext_pasted callbacks, compute each bound field's new value."""
        from bp_trainer.infotext import parse_infotext

        params = parse_infotext(infotext)
        self.script_callbacks.infotext_pasted_callback(infotext, params)
        out = {}
        for component, key in runner.infotext_fields:
            out[component] = key(params) if callable(key) else params.get(key)
        return out

    def txt2img(self, **kw):
        return self.processing.StableDiffusionProcessingTxt2Img(**kw)

    def img2img(self, **kw):
        return self.processing.StableDiffusionProcessingImg2Img(**kw)


def load_webui(tmp_path: Path, monkeypatch: Any, config: Optional[Dict[str, Any]] = None) -> WebUI:
    root = tmp_path / "webui"
    (root / "models" / "Stable-diffusion").mkdir(parents=True, exist_ok=True)
    (root / "models" / "VAE").mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("BP_STUB_WEBUI_ROOT", str(root))
    monkeypatch.setenv("BP_STUB_WEBUI_DATA", str(root))
    _purge()
    monkeypatch.syspath_prepend(str(STUB_DIR))
    import modules.scripts as scripts
    import modules.script_callbacks as script_callbacks
    import modules.shared as shared

    shared.opts.load_data(config or {})
    scripts.load_scripts([str(REPO)])
    script_callbacks.ui_settings_callback()
    webui = WebUI(root)
    return webui


def unload_webui() -> None:
    """Give a lent GPU back and forget shared state so the next test starts clean."""
    try:
        from bp_trainer import gpu_handoff

        for h in list(gpu_handoff._shared.values()):
            h.reclaim(timeout=10)
        gpu_handoff._shared.clear()
    except Exception:
        pass
    _purge()


def fake_tokenizer() -> Any:
    return types.SimpleNamespace(get_vocab=lambda: {}, name="loaded-model-tokenizer")


__all__ = ["WebUI", "load_webui", "unload_webui", "fake_tokenizer", "REPO"]
