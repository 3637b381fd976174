"""`modules.shared`: opts, cmd_opts, the lazily-loading `sd_model` property, upscaler names."""

import argparse
import os
import sys
import types

from modules import options, paths_internal
from modules.options import OptionInfo, options_section  # noqa: F401

cmd_opts = argparse.Namespace(ckpt_dir=None, vae_dir=None, freeze_settings=False, skip_install=False, api_auth=None,
                              api=False, nowebui=False,
                              embeddings_dir=os.path.join(paths_internal.data_path, "embeddings"))

options_templates = {}
options_templates.update(options_section(("sd", "Stable Diffusion", "sd"), {
    "sd_model_checkpoint": OptionInfo(None, "Stable Diffusion checkpoint", infotext="Model hash"),
    "CLIP_stop_at_last_layers": OptionInfo(1, "Clip skip", infotext="Clip skip"),
}))
options_templates.update(options_section(("sampler-params", "Sampler parameters", "sd"), {
    "eta_ddim": OptionInfo(0.0, "Eta for DDIM", infotext="Eta DDIM"),
    "eta_ancestral": OptionInfo(1.0, "Eta for k-diffusion samplers", infotext="Eta"),
    "eta_noise_seed_delta": OptionInfo(0, "Eta noise seed delta", infotext="ENSD"),
}))
options_templates.update(options_section(("sd", "Stable Diffusion", "sd"), {
    "comma_padding_backtrack": OptionInfo(20, "Prompt word wrap length limit"),
    "emphasis": OptionInfo("Original", "Emphasis mode"),
}))
options_templates.update(options_section(("infotext", "Infotext", "ui"), {
    "add_model_hash_to_info": OptionInfo(True, "Add model hash to infotext"),
    "infotext_skip_pasting": OptionInfo([], "Disregard fields from pasted infotext"),
}))

opts = options.Options(options_templates)

latent_upscale_default_mode = "Latent"
latent_upscale_modes = {
    "Latent": {"mode": "bilinear", "antialias": False},
    "Latent (antialiased)": {"mode": "bilinear", "antialias": True},
    "Latent (bicubic)": {"mode": "bicubic", "antialias": False},
    "Latent (bicubic antialiased)": {"mode": "bicubic", "antialias": True},
    "Latent (nearest)": {"mode": "nearest", "antialias": False},
    "Latent (nearest-exact)": {"mode": "nearest-exact", "antialias": False},
}
sd_upscalers = [types.SimpleNamespace(name=n) for n in ("None", "Lanczos", "Nearest", "R-ESRGAN 4x+ Anime6B")]

state = types.SimpleNamespace(interrupted=False, job="")


def refresh_checkpoints():
    from modules import sd_models

    sd_models.list_models()


class Shared(types.ModuleType):
    """As in the WebUI, `shared.sd_model` is a property that loads a model if none was ever loaded."""

    @property
    def sd_model(self):
        from modules import sd_models

        return sd_models.model_data.get_sd_model()

    @sd_model.setter
    def sd_model(self, value):
        from modules import sd_models

        sd_models.model_data.set_sd_model(value)


sys.modules[__name__].__class__ = Shared
