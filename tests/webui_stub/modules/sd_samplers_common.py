"""`modules.sd_samplers_common.is_sampler_using_eta_noise_seed_delta`, with WebUI v1.10.1's rule
(modules/sd_samplers_common.py:123-139): the job's eta (else the sampler's, which comes from its eta setting), else 1.0
unless the config says `default_eta_is_0`; eta 0 means no; otherwise the config's `uses_ensd` option decides."""

from modules import sd_samplers
from modules.shared import opts


def is_sampler_using_eta_noise_seed_delta(p):
    config = sd_samplers.find_sampler_config(p.sampler_name)
    eta = getattr(p, "eta", None)
    if eta is None and config is not None:
        eta = getattr(opts, config.eta_option)  # what the created sampler's `eta` holds
    if eta is None and config is not None:
        eta = 0 if config.options.get("default_eta_is_0", False) else 1.0
    if eta == 0:
        return False
    return config.options.get("uses_ensd", False)
