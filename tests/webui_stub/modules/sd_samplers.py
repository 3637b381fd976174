"""`modules.sd_samplers`: the sampler table of WebUI v1.10.1 (names and the options that decide infotext keys).

Facts read in the WebUI's source at tag v1.10.1 (commit 82a973c0), not copied from BP Train:
* modules/sd_samplers_kdiffusion.py:11-27 `samplers_k_diffusion`: 15 samplers; `"uses_ensd": True` only on
  'DPM++ 2S a' (line 16), 'Euler a' (18), 'DPM2 a' (23), 'DPM fast' (24), 'DPM adaptive' (25). Their eta comes from
  the `eta_ancestral` setting (sd_samplers_common.py:245, 293; shared_options.py:390: default 1.0).
* modules/sd_samplers_timesteps.py:11-16 `samplers_timesteps`: DDIM, DDIM CFG++, PLMS, UniPC, all with options `{}`
  (eta from `eta_ddim`: sd_samplers_timesteps.py:79; shared_options.py:389: default 0.0).
* modules/sd_samplers_lcm.py:100 `samplers_lcm`: LCM, options `{}` (a KDiffusionSampler: eta from `eta_ancestral`).
* modules/sd_samplers.py:11-16 `all_samplers` is the three lists in that order; `find_sampler_config(name)` looks the
  name up in `all_samplers_map` (None when unknown).
"""

from collections import namedtuple

SamplerData = namedtuple("SamplerData", ["name", "options", "eta_option"])

_K_DIFFUSION = [
    ("DPM++ 2M", {}), ("DPM++ SDE", {"brownian_noise": True}), ("DPM++ 2M SDE", {"brownian_noise": True}),
    ("DPM++ 2M SDE Heun", {"brownian_noise": True}), ("DPM++ 2S a", {"uses_ensd": True}),
    ("DPM++ 3M SDE", {"brownian_noise": True}), ("Euler a", {"uses_ensd": True}), ("Euler", {}), ("LMS", {}),
    ("Heun", {}), ("DPM2", {}), ("DPM2 a", {"uses_ensd": True}), ("DPM fast", {"uses_ensd": True}),
    ("DPM adaptive", {"uses_ensd": True}), ("Restart", {}),
]
_TIMESTEPS = ["DDIM", "DDIM CFG++", "PLMS", "UniPC"]

all_samplers = (
    [SamplerData(name, options, "eta_ancestral") for name, options in _K_DIFFUSION]
    + [SamplerData(name, {}, "eta_ddim") for name in _TIMESTEPS]
    + [SamplerData("LCM", {}, "eta_ancestral")]
)
all_samplers_map = {x.name: x for x in all_samplers}


def find_sampler_config(name):
    return all_samplers_map.get(name) if name is not None else all_samplers[0]
