"""`modules.sd_models`: checkpoint list and the model's device moves (a fake model records where it is)."""

import os
import threading
import types

from modules import devices, paths, shared

model_path = os.path.abspath(os.path.join(paths.models_path, "Stable-diffusion"))
checkpoints_list = {}
checkpoint_aliases = {}
calls = []  # ("unload" | "to_device" | "load" | "list_models", ...) in order, for tests


class CheckpointInfo:
    def __init__(self, filename):
        self.filename = filename
        abspath = os.path.abspath(filename)
        name = os.path.relpath(abspath, model_path) if abspath.startswith(model_path) else os.path.basename(filename)
        self.name = name.replace("\\", "/")
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.model_name = os.path.splitext(self.name)[0]
        self.hash = None
        self.sha256 = None
        self.shorthash = None
        self.title = self.name
        self.ids = [self.name, self.model_name]

    def register(self):
        checkpoints_list[self.title] = self
        for i in self.ids:
            checkpoint_aliases[i] = self


def list_models():
    calls.append(("list_models",))
    checkpoints_list.clear()
    checkpoint_aliases.clear()
    if os.path.isdir(model_path):
        for root, dirs, files in os.walk(model_path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for f in sorted(files):
                if f.endswith((".ckpt", ".safetensors")) and not f.endswith((".vae.ckpt", ".vae.safetensors")):
                    CheckpointInfo(os.path.join(root, f)).register()


def checkpoint_tiles(use_short=False):
    return [x.title for x in checkpoints_list.values()]


def get_closet_checkpoint_match(search_string):
    if not search_string:
        return None
    info = checkpoint_aliases.get(search_string)
    if info is not None:
        return info
    found = sorted([i for i in checkpoints_list.values() if search_string in i.title], key=lambda x: len(x.title))
    return found[0] if found else None


class FakeSdModel:
    """What the glue touches on a loaded SD1 model: device, lowvram flag, cond_stage_model.wrapped.tokenizer."""

    def __init__(self, tokenizer=None):
        self.device = devices.device
        self.lowvram = False
        self.cond_stage_model = types.SimpleNamespace(wrapped=types.SimpleNamespace(tokenizer=tokenizer))
        self.sd_checkpoint_info = None

    def to(self, device):
        self.device = device
        return self


class SdModelData:
    def __init__(self):
        self.sd_model = None
        self.loaded_sd_models = []
        self.was_loaded_at_least_once = False
        self.lock = threading.Lock()

    def get_sd_model(self):
        if self.was_loaded_at_least_once:
            return self.sd_model
        if self.sd_model is None:
            with self.lock:
                if self.sd_model is None:
                    load_model()
        return self.sd_model

    def set_sd_model(self, v, already_loaded=False):
        self.sd_model = v
        if already_loaded:
            self.was_loaded_at_least_once = True


model_data = SdModelData()


def load_model(checkpoint_info=None, already_loaded_state_dict=None):
    from modules import script_callbacks

    calls.append(("load",))
    model = FakeSdModel()
    model_data.set_sd_model(model, already_loaded=True)
    model_data.was_loaded_at_least_once = True
    script_callbacks.model_loaded_callback(model)
    return model


def send_model_to_cpu(m):
    m.to(devices.cpu)
    devices.torch_gc()


def send_model_to_device(m):
    calls.append(("to_device",))
    m.to(shared.cmd_opts.__dict__.get("device", devices.device))


def unload_model_weights(sd_model=None, info=None):
    calls.append(("unload",))
    send_model_to_cpu(sd_model or shared.sd_model)


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    # the same checkpoint is already selected: returns early without moving the model (WebUI behaviour)
    return sd_model or model_data.sd_model
