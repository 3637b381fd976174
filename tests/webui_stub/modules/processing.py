"""`modules.processing`: the processing classes' fields BP Train sets, `process_images` with the WebUI's
override/restore order, hires-fix `init()` and the infotext rules for Clip skip / ENSD / hires keys."""

from modules import devices, sd_models, sd_samplers_common, shared
from modules.infotext_utils import quote
from modules.shared import opts


class StableDiffusionProcessing:
    def __init__(self, prompt="", negative_prompt="", steps=20, sampler_name="Euler a", scheduler="Automatic",
                 cfg_scale=7.0, seed=1, width=512, height=512, batch_size=1, n_iter=1, override_settings=None,
                 override_settings_restore_afterwards=True, denoising_strength=None, eta=None):
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        self.steps = steps
        self.sampler_name = sampler_name
        self.scheduler = scheduler
        self.cfg_scale = cfg_scale
        self.seed = seed
        self.width = width
        self.height = height
        self.batch_size = batch_size
        self.n_iter = n_iter
        self.override_settings = dict(override_settings or {})
        self.override_settings_restore_afterwards = override_settings_restore_afterwards
        self.denoising_strength = denoising_strength
        self.eta = eta
        self.extra_generation_params = {}
        self.scripts = None
        self.script_args = []
        self.sampled_with = None  # what the stand-in "sampler" saw: settings in effect during the job

    def init(self):
        pass


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    def __init__(self, enable_hr=False, denoising_strength=0.75, hr_scale=2.0, hr_upscaler=None,
                 hr_second_pass_steps=0, hr_resize_x=0, hr_resize_y=0, **kwargs):
        super().__init__(denoising_strength=denoising_strength, **kwargs)
        self.enable_hr = enable_hr
        self.hr_scale = hr_scale
        self.hr_upscaler = hr_upscaler
        self.hr_second_pass_steps = hr_second_pass_steps
        self.hr_resize_x = hr_resize_x
        self.hr_resize_y = hr_resize_y

    def init(self):
        if not self.enable_hr:
            return
        self.extra_generation_params["Denoising strength"] = self.denoising_strength
        upscaler = self.hr_upscaler
        if upscaler is not None and upscaler not in shared.latent_upscale_modes and \
                upscaler not in [x.name for x in shared.sd_upscalers]:
            raise Exception(f"could not find upscaler named {upscaler}")
        if self.hr_resize_x == 0 and self.hr_resize_y == 0:
            self.extra_generation_params["Hires upscale"] = self.hr_scale
        else:
            self.extra_generation_params["Hires resize"] = f"{self.hr_resize_x}x{self.hr_resize_y}"
        if self.hr_second_pass_steps:
            self.extra_generation_params["Hires steps"] = self.hr_second_pass_steps
        if self.hr_upscaler is not None:
            self.extra_generation_params["Hires upscaler"] = self.hr_upscaler


class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    def __init__(self, init_images=None, denoising_strength=0.75, **kwargs):
        super().__init__(denoising_strength=denoising_strength, **kwargs)
        self.init_images = init_images or []

    def init(self):
        self.extra_generation_params["Denoising strength"] = self.denoising_strength


class Processed:
    def __init__(self, p, infotexts):
        self.images = []
        self.infotexts = infotexts
        self.info = infotexts[0] if infotexts else ""


def create_infotext(p, seed):
    """v1.10.1 modules/processing.py:758-791: Clip skip above 1; ENSD when non-zero and the sampler uses it."""
    clip_skip = getattr(p, "clip_skip", opts.CLIP_stop_at_last_layers)
    ensd = opts.eta_noise_seed_delta
    uses_ensd = ensd != 0 and sd_samplers_common.is_sampler_using_eta_noise_seed_delta(p)
    params = {
        "Steps": p.steps,
        "Sampler": p.sampler_name,
        "Schedule type": p.scheduler,
        "CFG scale": p.cfg_scale,
        "Seed": seed,
        "Size": f"{p.width}x{p.height}",
        "Denoising strength": p.extra_generation_params.get("Denoising strength"),
        "Clip skip": None if clip_skip <= 1 else clip_skip,
        "ENSD": ensd if uses_ensd else None,
        **p.extra_generation_params,
        "Version": "v1.10.1",
    }
    line = ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    negative = f"\nNegative prompt: {p.negative_prompt}" if p.negative_prompt else ""
    return f"{p.prompt}{negative}\n{line}"


def process_images_inner(p):
    p.init()
    model = sd_models.model_data.sd_model
    if model is not None and model.device != devices.device:
        raise RuntimeError("Expected all tensors to be on the same device, but found at least two devices")
    p.sampled_with = {"CLIP_stop_at_last_layers": opts.CLIP_stop_at_last_layers,
                      "eta_noise_seed_delta": opts.eta_noise_seed_delta,
                      "enable_hr": getattr(p, "enable_hr", None)}
    infotexts = [create_infotext(p, p.seed + i) for i in range(p.batch_size * p.n_iter)]
    return Processed(p, infotexts)


def process_images(p):
    if p.scripts is not None:
        p.scripts.before_process(p)
    # v1.10.1 modules/processing.py:823 remembers only override keys already in opts.data, and :854 restores only
    # those: on a fresh config.json an override stays behind after the job.
    stored_opts = {k: opts.data[k] for k in p.override_settings.keys() if k in opts.data}
    try:
        for k, v in p.override_settings.items():
            opts.set(k, v, is_api=True, run_callbacks=False)
        res = process_images_inner(p)
    finally:
        if p.override_settings_restore_afterwards:
            for k, v in stored_opts.items():
                setattr(opts, k, v)
    return res
