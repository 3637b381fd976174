"""BP Train inside the AUTOMATIC1111 WebUI: the tab, its settings, the HTTP API and the GPU hand-off.

Thin glue: everything here talks to `modules.*` and hands plain values to `bp_trainer` (which never imports
the WebUI). Loaded by the WebUI's script loader with the extension root first on sys.path (import time only),
so `bp_trainer` is imported at module level. The "BP presets" Script is in `scripts/bp_presets.py`.
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import time
from typing import Any, Dict, Iterator, List

from modules import script_callbacks, scripts, shared

EXT_ROOT = scripts.basedir()  # valid only while the WebUI imports this file

from bp_trainer import trainer_env  # noqa: E402
from bp_trainer.errors import BPError  # noqa: E402
from bp_trainer.gpu_handoff import GpuHandoff, shared_handoff  # noqa: E402

SECTION = ("bp_train", "BP Train")
TAB_TITLE = "BP Train"
TAB_ID = "bp_train"


def _data_path() -> str:
    try:
        from modules import paths

        return paths.data_path
    except Exception:  # pragma: no cover - every WebUI has modules.paths
        return os.getcwd()


def default_runs_dir() -> str:
    return os.path.join(_data_path(), "bp-train", "runs")


def default_presets_file() -> str:
    return os.path.join(_data_path(), "bp-train", "presets.yaml")


def _opt(key: str, default: Any) -> Any:
    value = getattr(shared.opts, key, default)
    return default if value is None else value


# ----------------------------------------------------------------------------------------------- GPU


def _unload_model() -> None:
    from modules import devices, sd_models

    # The WebUI's start-up model load runs under model_data.lock, not queue_lock: wait for a load in progress
    # (bounded), so the model it is putting on the GPU is moved off too, instead of landing there mid-run.
    lock = getattr(sd_models.model_data, "lock", None)
    got = lock.acquire(timeout=MODEL_LOAD_WAIT_S) if lock is not None else False
    try:
        model = sd_models.model_data.sd_model  # peek: shared.sd_model would load a model if none was ever loaded
        if model is not None:
            sd_models.unload_model_weights(model)
        # "Maximum number of checkpoints loaded at the same time" > 1 keeps others: they leave the GPU too
        for other in list(getattr(sd_models.model_data, "loaded_sd_models", []) or []):
            if other is not None and other is not model:
                sd_models.unload_model_weights(other)
    finally:
        if got:
            lock.release()
    gc.collect()  # drop Python references first, so the cache below can really be emptied
    devices.torch_gc()


def child_cuda_devices(device_id: Any, parent_visible: "str | None") -> "str | None":
    """CUDA_VISIBLE_DEVICES for the trainer so its cuda:0 is the WebUI's `--device-id` GPU (an index into the
    WebUI's own visible devices); None when the WebUI uses the default device."""
    if device_id is None or str(device_id).strip() == "":
        return None
    visible = [d.strip() for d in parent_visible.split(",")] if parent_visible else None
    index = int(device_id)
    return visible[index] if visible and 0 <= index < len(visible) else str(index)


def gpu_memory_in_use() -> float:
    """GiB the WebUI process still holds on its GPU (0 without CUDA)."""
    try:
        import torch

        return torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    except Exception:  # noqa: BLE001 - a status must never fail
        return 0.0


REFRESH_LOCK_WAIT_S = 120.0  # a long generation: re-scan without the lock rather than hang the tab
MODEL_LOAD_WAIT_S = 600.0  # a full-size load from a slow disk can take minutes


def _try_acquire(lock: Any, timeout: float) -> bool:
    """Acquire the WebUI's FIFOLock within `timeout` seconds (its acquire() takes no timeout)."""
    deadline = time.monotonic() + timeout
    while not lock.acquire(blocking=False):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def _reload_model() -> None:
    from modules import sd_models

    model = sd_models.model_data.sd_model
    if model is not None:
        sd_models.send_model_to_device(model)  # not reload_model_weights(): that returns early for the same file


def _has_gpu() -> bool:
    """Whether the WebUI generates on a GPU: `devices.device` (set at start-up from --use-cpu and what torch finds)
    is not the CPU. True while it is not set yet."""
    from modules import devices

    device = getattr(devices, "device", None)
    return device is None or getattr(device, "type", str(device)) != "cpu"


def _make_handoff() -> GpuHandoff:
    from modules import call_queue

    return GpuHandoff(call_queue.queue_lock, _unload_model, _reload_model, has_gpu=_has_gpu)


def _loaded_tokenizer(model: Any) -> Any:
    """The loaded model's CLIP tokenizer (SD1: cond_stage_model.wrapped.tokenizer; SDXL: its CLIP-L), or None."""
    cond = getattr(model, "cond_stage_model", None)
    if cond is None:
        return None
    candidates = [cond]
    embedders = getattr(cond, "embedders", None)
    if embedders:
        candidates.append(embedders[0])
    for c in candidates:
        tok = getattr(getattr(c, "wrapped", None), "tokenizer", None)
        if tok is not None and hasattr(tok, "get_vocab"):
            return tok
    return None


class WebUIHost:
    """`bp_trainer.ui.host.Host` backed by the running WebUI."""

    name = "webui"

    def __init__(self) -> None:
        self.handoff = shared_handoff("webui", _make_handoff)
        self._offline_tokenizer: Any = None
        self._lent_without_lock = False

    # models
    def list_checkpoints(self) -> List[str]:
        from modules import sd_models

        return list(sd_models.checkpoint_tiles())

    def checkpoint_path(self, name: str) -> str:
        from modules import sd_models

        info = sd_models.checkpoints_list.get(name) or sd_models.get_closet_checkpoint_match(name)
        if info is not None:
            return info.filename
        if name and os.path.isfile(name):
            return os.path.abspath(name)
        raise BPError(f"unknown checkpoint '{name}'", path=self.checkpoint_dir(),
                      hint="refresh the checkpoint list, or put the file in that folder")

    def list_vaes(self) -> List[str]:
        from modules import sd_vae

        return list(sd_vae.vae_dict)

    def vae_path(self, name: str) -> str:
        from modules import sd_vae

        if name in sd_vae.vae_dict:
            return sd_vae.vae_dict[name]
        if name and os.path.isfile(name):
            return os.path.abspath(name)
        raise BPError(f"unknown VAE '{name}'", path=sd_vae.vae_path, hint="refresh the VAE list")

    @contextlib.contextmanager
    def _generation_lock(self) -> Iterator[None]:
        """The WebUI's generation lock (`queue_lock`), unless a run already holds it for us; after
        REFRESH_LOCK_WAIT_S of a long generation, without it rather than hang the tab."""
        from modules import call_queue

        lock = call_queue.queue_lock
        got = False if self.handoff.released else _try_acquire(lock, REFRESH_LOCK_WAIT_S)
        try:
            yield
        finally:
            if got:
                lock.release()

    def refresh_models(self) -> None:
        from modules import sd_models, sd_vae

        # list_models() empties the checkpoint list before refilling it: a generation starting in between finds
        # "No checkpoints found". Re-scan under the generation lock.
        with self._generation_lock():
            # With --ckpt, list_models() resets the selected checkpoint to --ckpt's; keep the user's selection.
            selected = shared.opts.data.get("sd_model_checkpoint")
            sd_models.list_models()
            if selected and selected in sd_models.checkpoints_list:
                shared.opts.data["sd_model_checkpoint"] = selected
            sd_vae.refresh_vae_list()

    def embeddings_dir(self) -> str:
        """The WebUI's textual-inversion folder (`--embeddings-dir`), where trained tag embeddings are published."""
        from modules import paths

        return str(getattr(shared.cmd_opts, "embeddings_dir", None) or os.path.join(paths.data_path, "embeddings"))

    def reload_embeddings(self) -> None:
        """Re-read the embeddings folder now, as /sdapi/v1/refresh-embeddings does (forced: a new file in a
        sub-folder leaves the folder's own mtime, which the WebUI watches, unchanged). Without a loaded model
        nothing is done: the WebUI reloads embeddings itself when it loads one."""
        from modules import sd_hijack, sd_models

        if sd_models.model_data.sd_model is None:
            return
        with self._generation_lock():
            sd_hijack.model_hijack.embedding_db.load_textual_inversion_embeddings(force_reload=True)

    def checkpoint_dir(self) -> str:
        from modules import sd_models

        return getattr(shared.cmd_opts, "ckpt_dir", None) or sd_models.model_path

    def allowed_roots(self) -> Dict[str, List[str]]:
        """Folders the HTTP API may name besides the runs folder (bp_trainer.access): the WebUI's model folders
        and the ones the user listed in Settings > BP Train."""
        from modules import sd_models, sd_vae

        models = [sd_models.model_path, getattr(shared.cmd_opts, "ckpt_dir", None), sd_vae.vae_path,
                  getattr(shared.cmd_opts, "vae_dir", None)]
        extra = str(_opt("bp_train_api_roots", "")).replace(",", "\n").splitlines()
        return {"models": [m for m in models if m], "any": [e.strip() for e in extra if e.strip()]}

    # tokenizer
    def tokenizer(self) -> Any:
        from modules import sd_models

        tok = _loaded_tokenizer(sd_models.model_data.sd_model)
        if tok is not None:
            return tok
        if self._offline_tokenizer is None:
            from bp_trainer.clip_vocab import clip_tokenizer

            self._offline_tokenizer = clip_tokenizer()
        return self._offline_tokenizer

    # training
    def runs_dir(self) -> str:
        path = str(_opt("bp_train_runs_dir", "")).strip() or default_runs_dir()
        os.makedirs(path, exist_ok=True)
        return path

    def presets_file(self) -> str:
        return str(_opt("bp_train_presets_file", "")).strip() or default_presets_file()

    def trainer_env_status(self) -> Dict[str, Any]:
        return trainer_env.status().to_dict()

    def trainer_python(self) -> str:
        configured = str(_opt("bp_train_python", "")).strip()
        if configured:
            return configured
        st = trainer_env.status()
        if not st.ready:
            raise BPError(f"the trainer environment is {st.state}: {st.message}",
                          hint="or set Settings > BP Train > Trainer Python")
        return st.python

    def generation_may_run_during_training(self) -> bool:
        return bool(_opt("bp_train_allow_generation", False))

    def has_gpu(self) -> bool:
        return _has_gpu()

    def gpu_free_bytes(self) -> "int | None":
        """What the trainer will have: the GPU's free memory, plus what the WebUI's model frees at the hand-off
        (unless generation keeps running during training)."""
        try:
            import torch

            if not torch.cuda.is_available():
                return None
            free = int(torch.cuda.mem_get_info()[0])
            return free if self.generation_may_run_during_training() else free + int(torch.cuda.memory_allocated())
        except Exception:  # noqa: BLE001 - a reading must never break the tab
            return None

    def release_gpu(self) -> None:
        if self.generation_may_run_during_training():
            # opted out: the WebUI keeps its model on the GPU and keeps generating (both share the memory)
            self._lent_without_lock = True
            return
        self.handoff.release()

    def reclaim_gpu(self) -> None:
        self._lent_without_lock = False
        self.handoff.reclaim()

    def prompt_settings(self) -> Dict[str, Any]:
        """The WebUI's prompt settings for the token counter (Tokens tab, /tokens): emphasis mode, comma back-off,
        old scheduling and the loaded textual-inversion embeddings, so counts match the prompt box."""
        opts = shared.opts
        settings: Dict[str, Any] = {
            "emphasis": str(getattr(opts, "emphasis", "Original")) != "None",
            "backtrack": int(getattr(opts, "comma_padding_backtrack", 20)),
            "use_old_scheduling": bool(getattr(opts, "use_old_scheduling", False)),
        }
        try:
            from modules import sd_hijack

            db = sd_hijack.model_hijack.embedding_db
            settings["embeddings"] = {name: int(emb.vectors) for name, emb in db.word_embeddings.items()}
        except Exception:  # no embedding database (yet): count without embeddings
            pass
        return settings

    def trainer_env(self) -> Dict[str, str]:
        """Environment for the trainer child: the WebUI's --device-id GPU becomes the trainer's cuda:0."""
        devices = child_cuda_devices(getattr(shared.cmd_opts, "device_id", None),
                                     os.environ.get("CUDA_VISIBLE_DEVICES"))
        return {"CUDA_VISIBLE_DEVICES": devices} if devices is not None else {}

    def gpu_status(self) -> Dict[str, Any]:
        return {"released": self.handoff.released, "waiting_for_generation": self.handoff.pending,
                "still_in_use_gib": round(gpu_memory_in_use(), 2) if self.handoff.released else None,
                "shared_without_lock": self._lent_without_lock,
                "generation_may_run_during_training": self.generation_may_run_during_training()}


_host_lock = threading.Lock()
_host: List[WebUIHost] = []


def get_host() -> WebUIHost:
    with _host_lock:
        if not _host:
            _host.append(WebUIHost())
        return _host[0]


# ----------------------------------------------------------------------------------------------- callbacks


def on_ui_settings() -> None:
    """Register the "BP Train" settings section (idempotent).

    Also called at import time: with --nowebui the WebUI builds the API's options model before any
    on_ui_settings callback runs, so options added only there are missing from GET /sdapi/v1/options.
    """
    import gradio as gr

    opts = shared.opts
    opts.add_option("bp_train_python", shared.OptionInfo(
        "", "Trainer Python (empty: BP Train's own environment)", gr.Textbox, section=SECTION,
    ).info(f"the trainer's venv: {trainer_env.default_env_dir()}"))
    opts.add_option("bp_train_runs_dir", shared.OptionInfo(
        "", "Runs folder (empty: default)", gr.Textbox, section=SECTION,
    ).info(default_runs_dir()))
    opts.add_option("bp_train_presets_file", shared.OptionInfo(
        "", "Presets file of the \"BP presets\" Script (empty: default)", gr.Textbox, section=SECTION,
    ).info(default_presets_file()))
    opts.add_option("bp_train_api_roots", shared.OptionInfo(
        "", "Extra folders the HTTP API may read models and datasets from (one per line or comma-separated)",
        gr.Textbox, section=SECTION,
    ).info("the API also allows the WebUI's checkpoint and VAE folders, the runs folder and datasets trained "
           "from in the tab; see README > Safety"))
    opts.add_option("bp_train_allow_generation", shared.OptionInfo(
        False, "Let image generation run during training", section=SECTION,
    ).info("off: while a run trains, generation waits (and the model leaves the GPU, if there is one); on: both run "
           "at once and share the GPU's memory"))


def on_ui_tabs() -> list:
    import gradio as gr

    host = get_host()
    try:
        from bp_trainer.ui.tab import build_tab

        tab = build_tab(host)
    except Exception as exc:  # show why in place of the tab instead of silently missing it
        with gr.Blocks(analytics_enabled=False) as tab:
            gr.Markdown(f"**BP Train could not build its tab:** `{type(exc).__name__}: {exc}`")
    return [(tab, TAB_TITLE, TAB_ID)]


def on_app_started(demo: Any, app: Any) -> None:
    from bp_trainer.api import create_router, parse_credentials

    host = get_host()
    # the same users as the WebUI's own API (--api-auth); without it the routes are open like /sdapi/v1
    credentials = parse_credentials(getattr(shared.cmd_opts, "api_auth", None))
    app.include_router(create_router(host, credentials=credentials or None))

    def reattach() -> None:  # a run that outlived a WebUI restart keeps the GPU
        try:
            from bp_trainer.run_controller import controller_for

            controller_for(host).attach_existing()
        except Exception as exc:
            print(f"BP Train: could not re-attach to a running run: {exc}", flush=True)

    threading.Thread(target=reattach, name="bp-train-reattach", daemon=True).start()


def on_model_loaded(sd_model: Any) -> None:
    """A model that finishes loading while a run holds the GPU (the WebUI's start-up load runs outside the
    generation lock) goes to system RAM too; it comes back with the rest when the run ends."""
    host = get_host()
    if host.handoff.released:
        from modules import sd_models

        sd_models.send_model_to_cpu(sd_model)


on_ui_settings()  # at import time too (see its docstring)
script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_model_loaded(on_model_loaded)
script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_app_started(on_app_started)
