"""The tab without the WebUI: `StandaloneHost` and the gradio app (`python -m bp_trainer ui`).

Models come from a WebUI-like models folder (`Stable-diffusion/` for checkpoints, `VAE/` for VAEs); a
diffusers folder (a directory with `model_index.json`) in `Stable-diffusion/` is listed as a checkpoint
too (the trainer accepts it as a base). The tokenizer is the offline CLIP vocabulary. There is no
generation to pause here, so releasing/reclaiming the GPU only records the state.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from bp_trainer.errors import BPError

CHECKPOINT_EXTS = (".safetensors", ".ckpt", ".pt")
VAE_EXTS = (".safetensors", ".ckpt", ".pt")


def _list_models(folder: Path, exts: tuple[str, ...], *, diffusers_dirs: bool) -> dict[str, str]:
    found: dict[str, str] = {}
    if not folder.is_dir():
        return found
    for dirpath, dirnames, filenames in os.walk(folder):
        d = Path(dirpath)
        if diffusers_dirs and (d / "model_index.json").is_file() and d != folder:
            found[d.relative_to(folder).as_posix()] = str(d)
            dirnames[:] = []  # a diffusers folder's parts are not separate models
            continue
        dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
        for name in sorted(filenames):
            if name.lower().endswith(exts) and not name.startswith("."):
                found[(d / name).relative_to(folder).as_posix()] = str(d / name)
    return dict(sorted(found.items(), key=lambda kv: kv[0].lower()))


class StandaloneHost:
    """`bp_trainer.ui.host.Host` for the standalone app."""

    name = "standalone"

    def __init__(self, models_dir: "str | os.PathLike[str]", runs_dir: "str | os.PathLike[str] | None" = None,
                 *, python: str | None = None, allow_generation_during_training: bool = True):
        self.models_dir = Path(models_dir).resolve()
        self._runs_dir = Path(runs_dir).resolve() if runs_dir else self.models_dir.parent / "runs"
        self._python = python or sys.executable
        self._allow = allow_generation_during_training
        self._checkpoints: dict[str, str] = {}
        self._vaes: dict[str, str] = {}
        self._tokenizer: Any = None
        self._has_gpu: bool | None = None
        self.gpu_released = False
        self.refresh_models()

    # models
    def refresh_models(self) -> None:
        self._checkpoints = _list_models(self.models_dir / "Stable-diffusion", CHECKPOINT_EXTS, diffusers_dirs=True)
        self._vaes = _list_models(self.models_dir / "VAE", VAE_EXTS, diffusers_dirs=True)

    def list_checkpoints(self) -> list[str]:
        return list(self._checkpoints)

    def checkpoint_path(self, name: str) -> str:
        if name in self._checkpoints:
            return self._checkpoints[name]
        if name and os.path.exists(name):  # a path typed by the user
            return str(Path(name).resolve())
        raise BPError(f"unknown checkpoint '{name}'", path=self.models_dir / "Stable-diffusion",
                      hint="press the refresh button or put the file in that folder")

    def list_vaes(self) -> list[str]:
        return list(self._vaes)

    def vae_path(self, name: str) -> str:
        if name in self._vaes:
            return self._vaes[name]
        if name and os.path.exists(name):
            return str(Path(name).resolve())
        raise BPError(f"unknown VAE '{name}'", path=self.models_dir / "VAE", hint="press the refresh button")

    def checkpoint_dir(self) -> str:
        path = self.models_dir / "Stable-diffusion"
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    # tokenizer
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from bp_trainer.clip_vocab import clip_tokenizer

            self._tokenizer = clip_tokenizer()
        return self._tokenizer

    # training
    def runs_dir(self) -> str:
        self._runs_dir.mkdir(parents=True, exist_ok=True)
        return str(self._runs_dir)

    def trainer_python(self) -> str:
        return self._python

    def trainer_env_status(self) -> dict:
        """The app trains with its own Python (the project's .venv, or --python), not the WebUI's trainer venv."""
        return {"state": "ready", "python": self._python,
                "message": f"the standalone app trains with {self._python}"}

    def release_gpu(self) -> None:
        self.gpu_released = True

    def reclaim_gpu(self) -> None:
        self.gpu_released = False

    def generation_may_run_during_training(self) -> bool:
        return self._allow

    def has_gpu(self) -> bool:
        """Whether torch sees a CUDA or MPS device here (asked once; False without torch)."""
        if self._has_gpu is None:
            try:
                import torch
            except ImportError:
                self._has_gpu = False
            else:
                mps = getattr(getattr(torch.backends, "mps", None), "is_available", lambda: False)
                self._has_gpu = bool(torch.cuda.is_available() or mps())
        return self._has_gpu

    def gpu_free_bytes(self) -> "int | None":
        """Free memory of the CUDA GPU the trainer will use (None without one)."""
        try:
            import torch

            return int(torch.cuda.mem_get_info()[0]) if torch.cuda.is_available() else None
        except Exception:  # noqa: BLE001 - a reading must never break the tab
            return None


def create_app(host: Any, *, initial_config: "str | os.PathLike[str] | None" = None):
    """The gradio Blocks app serving the tab (JS/CSS injected like the WebUI does)."""
    import gradio as gr

    from bp_trainer.ui import assets
    from bp_trainer.ui.tab import build_tab

    assets.install_template_injection()
    # Built outside any Blocks context and rendered into the page, exactly as the WebUI renders on_ui_tabs tabs.
    tab = build_tab(host, initial_config=initial_config)
    with gr.Blocks(title="BP Train", analytics_enabled=False) as app:  # JS and CSS come with the page template
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("BP Train", id="bp_train", elem_id="tab_bp_train"):
                tab.render()
    return app


def launch(host: Any, *, port: int = 7860, initial_config: "str | os.PathLike[str] | None" = None,
           open_browser: bool = False, block: bool = True):
    """Build and serve the app on 127.0.0.1:port. Returns the app (with `block=False`, the server runs in a thread)."""
    app = create_app(host, initial_config=initial_config)
    app.queue(concurrency_count=8)
    app.launch(server_name="127.0.0.1", server_port=port, inbrowser=open_browser, prevent_thread_lock=True,
               show_api=False, quiet=True)
    _attach_api_routes(app, host)
    print(f"BP Train: http://127.0.0.1:{port}/  (models: {getattr(host, 'models_dir', '?')}, runs: {host.runs_dir()})",
          flush=True)
    if block:
        try:
            app.block_thread()
        finally:
            app.close()
    return app


def _attach_api_routes(app: Any, host: Any) -> None:
    try:
        from bp_trainer import api
    except ImportError:
        return
    factory = getattr(api, "create_router", None) or getattr(api, "router", None)
    if factory is None or not callable(factory):
        return
    try:
        router = factory(host)
        app.server_app.include_router(router) if hasattr(app, "server_app") else app.app.include_router(router)
    except Exception as exc:  # the API is optional in the standalone app; the tab works without it
        print(f"BP Train: HTTP API not mounted ({type(exc).__name__}: {exc})", file=sys.stderr)
