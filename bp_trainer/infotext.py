"""The WebUI's infotext format: quoting, parsing and the compatibility rules of WebUI v1.10.1.

An infotext is `prompt\\nNegative prompt: neg\\nSteps: 20, Sampler: Euler a, ...` (the PNG `parameters` text and
the text under an image). Pure code (no WebUI imports), used by the presets (`bp_trainer.presets`), the `infotext`
command and the trainer's sample images.

* `quote(value)` is `infotext_utils.quote`: what the WebUI writes for a parameter value.
* `parse_infotext(text)` parses exactly as `infotext_utils.parse_generation_parameters` does (same regular
  expressions, JSON unquoting, `Size-1`/`Size-2` splitting and the same defaults for missing keys); values stay
  strings, as in the WebUI.
* `sampler_uses_ensd(name)` and `split_sampler(...)`: which samplers write `ENSD`, and old sampler names that carry
  their schedule type.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")

# v1.10.1 schedule types an old-style sampler name may carry as a suffix ("DPM++ 2M Karras")
_OLD_SAMPLER_SCHEDULE_SUFFIXES = ("Karras", "Exponential")

# The v1.10.1 samplers whose config has `uses_ensd` (all k-diffusion; their default eta is 1): the WebUI writes `ENSD`
# only for these. DDIM, PLMS, UniPC, LCM and the SDE samplers (Brownian noise) have no `uses_ensd`.
ENSD_SAMPLERS = ("Euler a", "DPM2 a", "DPM++ 2S a", "DPM fast", "DPM adaptive")


def quote(value: Any) -> Any:
    """The WebUI's infotext value quoting: JSON-quote values containing ',', newline or ':'; others as they are."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return value
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def split_infotext(text: str) -> Tuple[str, str, Dict[str, str]]:
    """(prompt, negative prompt, parameters exactly as written) of an infotext; no defaults added.

    The last line is the parameter line only when it holds at least 3 `key: value` pairs (WebUI rule).
    `WxH` values are split into `Key-1`/`Key-2`.
    """
    *lines, lastline = text.strip().split("\n")
    if len(_RE_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    prompt, negative = _split_prompts(lines)
    params: Dict[str, str] = {}
    for key, value in _RE_PARAM.findall(lastline):
        if value[:1] == '"' and value[-1:] == '"':
            value = unquote(value)
        m = _RE_IMAGESIZE.match(value)
        if m is not None:
            params[f"{key}-1"] = m.group(1)
            params[f"{key}-2"] = m.group(2)
        else:
            params[key] = value
    return prompt, negative, params


def _split_prompts(lines: List[str]) -> Tuple[str, str]:
    prompt = ""
    negative = ""
    done_with_prompt = False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    return prompt, negative


def _old_hires_fix_first_pass_dimensions(width: int, height: int) -> Tuple[int, int]:
    scale = math.sqrt(512 * 512 / (width * height))
    return math.ceil(scale * width / 64) * 64, math.ceil(scale * height / 64) * 64


def _restore_old_hires_fix_params(res: Dict[str, Any]) -> None:
    """Infotexts before the hires-fix rework carry `First pass size`; convert it as the WebUI does."""
    fw, fh = res.get("First pass size-1"), res.get("First pass size-2")
    if fw is None or fh is None:
        return
    fw, fh = int(fw), int(fh)
    width = int(res.get("Size-1", 512))
    height = int(res.get("Size-2", 512))
    if fw == 0 or fh == 0:
        fw, fh = _old_hires_fix_first_pass_dimensions(width, height)
    res["Size-1"], res["Size-2"] = fw, fh
    res["Hires resize-1"], res["Hires resize-2"] = width, height


_DEFAULTS: Tuple[Tuple[str, Any], ...] = (
    ("Hires sampler", "Use same sampler"),
    ("Hires schedule type", "Use same scheduler"),
    ("Hires checkpoint", "Use same checkpoint"),
    ("Hires prompt", ""),
    ("Hires negative prompt", ""),
    ("Mask mode", "Inpaint masked"),
    ("Masked content", "original"),
    ("Inpaint area", "Whole picture"),
    ("Masked area padding", 32),
)
_DEFAULTS_AFTER_HIRES: Tuple[Tuple[str, Any], ...] = (
    ("RNG", "GPU"),
    ("Schedule type", "Automatic"),
    ("Schedule max sigma", 0),
    ("Schedule min sigma", 0),
    ("Schedule rho", 0),
    ("VAE Encoder", "Full"),
    ("VAE Decoder", "Full"),
    ("FP8 weight", "Disable"),
)


def _uses_emphasis(text: str) -> bool:
    """Whether `parse_prompt_attention` would give some text a weight other than 1.0.

    True when an unescaped `(`, `[` opens a group (the WebUI applies even unbalanced brackets).
    """
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c in "([":
            return True
        i += 1
    return False


def _parse_version(text: Any) -> Any:
    """`infotext_versions.parse_version`: "v1.7.0-225-gabc" -> version 1.7.0.post225; None when unparsable."""
    if text is None:
        return None
    m = re.match(r"([^-]+-[^-]+)-.*", str(text))
    if m:
        text = m.group(1)
    try:
        from packaging import version

        return version.parse(str(text))
    except Exception:
        return None


def _backcompat(res: Dict[str, Any]) -> None:
    """`infotext_versions.backcompat`: flags that make old infotexts reproduce on v1.10.1."""
    ver = _parse_version(res.get("Version"))
    if ver is None:
        return
    v160, v170_tsnr, v180 = (_parse_version(v) for v in ("v1.6.0", "v1.7.0-225", "v1.8.0"))
    if ver < v160 and "[" in res.get("Prompt", ""):
        res["Old prompt editing timelines"] = True
    if ver < v160 and res.get("Sampler", "") in ("DDIM", "PLMS"):
        res["Pad conds v0"] = True
    if ver < v170_tsnr:
        res["Downcast alphas_cumprod"] = True
    if ver < v180 and res.get("Refiner"):
        res["Refiner switch by sampling steps"] = True


def parse_infotext(text: str, skip_fields: Optional[List[str]] = None) -> Dict[str, Any]:
    """Parse an infotext like WebUI v1.10.1's `parse_generation_parameters` (styles are not extracted:
    they depend on the user's styles file).

    Returns a dict with `Prompt`, `Negative prompt`, every parameter as a string, and the WebUI's
    defaults for missing keys (`Clip skip` "1", `Hires resize-1/2` 0, `Schedule type` "Automatic", ...).
    """
    prompt, negative, params = split_infotext(text)
    res: Dict[str, Any] = dict(params)
    res["Prompt"] = prompt
    res["Negative prompt"] = negative
    if "Clip skip" not in res:
        res["Clip skip"] = "1"
    hypernet = res.get("Hypernet")
    if hypernet is not None:
        res["Prompt"] += f"<hypernet:{hypernet}:{res.get('Hypernet strength', '1.0')}>"
    if "Hires resize-1" not in res:
        res["Hires resize-1"] = 0
        res["Hires resize-2"] = 0
    for key, value in _DEFAULTS:
        res.setdefault(key, value)
    _restore_old_hires_fix_params(res)
    for key, value in _DEFAULTS_AFTER_HIRES:
        res.setdefault(key, value)
    if "Cache FP16 weight for LoRA" not in res and res["FP8 weight"] != "Disable":
        res["Cache FP16 weight for LoRA"] = False
    if "Emphasis" not in res and (_uses_emphasis(prompt) or _uses_emphasis(negative)):
        res["Emphasis"] = "Original"
    res.setdefault("Refiner switch by sampling steps", False)
    _backcompat(res)
    for key in skip_fields or []:
        res.pop(key, None)
    return res


def hires_enabled_on_paste(params: Mapping[str, Any]) -> bool:
    """The WebUI's rule (ui.py) for ticking "Hires. fix" when an infotext is pasted into txt2img."""
    return "Denoising strength" in params and (
        "Hires upscale" in params or "Hires upscaler" in params or "Hires resize-1" in params
    )


def sampler_uses_ensd(sampler: str) -> bool:
    """Whether the WebUI writes a non-zero `ENSD` into the infotext for this sampler (at its default eta)."""
    return sampler in ENSD_SAMPLERS


def split_sampler(sampler: str, schedule_type: Optional[str]) -> Tuple[str, Optional[str]]:
    """Old infotexts name the schedule in the sampler ("DPM++ 2M Karras"); v1.10.1 splits it out."""
    if schedule_type in (None, "", "Automatic"):
        for suffix in _OLD_SAMPLER_SCHEDULE_SUFFIXES:
            if sampler.endswith(" " + suffix):
                return sampler[: -len(suffix) - 1], suffix
        return sampler, None
    return sampler, schedule_type
