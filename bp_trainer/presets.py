"""Generation presets for the "BP presets" Script: built-ins, a YAML file of user presets, infotext parsing.

Pure code (no WebUI imports): the Script in `scripts/bp_presets.py` only calls these functions.

* A `Preset` is clip skip, ENSD (eta noise seed delta), optionally steps / sampler / schedule type /
  CFG scale, and optionally a hires-fix block that applies to txt2img only.
* `parse_infotext(text)` parses a WebUI infotext exactly as WebUI v1.10.1's
  `infotext_utils.parse_generation_parameters` does (same regular expressions, JSON unquoting, `Size-1`/`Size-2`
  splitting and the same defaults for missing keys); values stay strings, as in the WebUI.
* `preset_from_infotext(text, name)` turns the parameter line into a preset.
* `apply_preset(p, preset, is_txt2img)` sets the fields of a processing object (`p.override_settings`,
  hires fields) and `snapshot_settings`/`restore_settings` undo the settings a job changed, including the
  ones the WebUI itself does not restore (keys absent from `opts.data`, i.e. never saved in config.json).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from bp_trainer.errors import BPError

SCRIPT_TITLE = "BP presets"  # the Script's title(); the WebUI API's script_name is its lower case
INFOTEXT_KEY = "BP preset"  # infotext key naming the preset a picture was made with
FILE_VERSION = 1

# WebUI setting keys (modules/shared_options.py) and their infotext names
CLIP_SKIP_KEY = "CLIP_stop_at_last_layers"  # infotext "Clip skip"
ENSD_KEY = "eta_noise_seed_delta"  # infotext "ENSD"
SETTING_KEYS = (CLIP_SKIP_KEY, ENSD_KEY)

# v1.10.1 schedule types an old-style sampler name may carry as a suffix ("DPM++ 2M Karras")
_OLD_SAMPLER_SCHEDULE_SUFFIXES = ("Karras", "Exponential")

# --------------------------------------------------------------------------------------------------------
# Infotext parsing (behaviour of modules/infotext_utils.py, WebUI v1.10.1)

_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")


def quote(value: Any) -> Any:
    """The WebUI's infotext value quoting: JSON-quote values containing ',', newline or ':'."""
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
    prompt = ""
    negative = ""
    done_with_prompt = False
    *lines, lastline = text.strip().split("\n")
    if len(_RE_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
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


# --------------------------------------------------------------------------------------------------------
# Presets


@dataclass
class Hires:
    """Hires fix (txt2img only). `scale` is used unless `resize_x`/`resize_y` are set (WebUI rule)."""

    upscaler: str = "Latent"
    scale: float = 2.0
    denoising: float = 0.7
    steps: int = 0  # 0 = same as the first pass
    resize_x: int = 0
    resize_y: int = 0


@dataclass
class Preset:
    name: str
    clip_skip: Optional[int] = None
    ensd: Optional[int] = None
    steps: Optional[int] = None
    sampler: Optional[str] = None
    scheduler: Optional[str] = None
    cfg_scale: Optional[float] = None
    hires: Optional[Hires] = None
    description: str = ""
    builtin: bool = False

    def to_dict(self) -> Dict[str, Any]:
        """The YAML/JSON form (without name and builtin); unset fields are left out."""
        out: Dict[str, Any] = {}
        for key in ("description", "clip_skip", "ensd", "steps", "sampler", "scheduler", "cfg_scale"):
            value = getattr(self, key)
            if value not in (None, ""):
                out[key] = value
        if self.hires is not None:
            out["hires"] = {
                "upscaler": self.hires.upscaler,
                "scale": self.hires.scale,
                "denoising": self.hires.denoising,
            }
            for key in ("steps", "resize_x", "resize_y"):
                if getattr(self.hires, key):
                    out["hires"][key] = getattr(self.hires, key)
        return out

    def summary(self) -> str:
        parts = []
        if self.clip_skip is not None:
            parts.append(f"clip skip {self.clip_skip}")
        if self.ensd is not None:
            parts.append(f"ENSD {self.ensd}")
        if self.steps is not None:
            parts.append(f"{self.steps} steps")
        if self.sampler:
            parts.append(self.sampler + (f" ({self.scheduler})" if self.scheduler else ""))
        if self.cfg_scale is not None:
            parts.append(f"CFG {_num(self.cfg_scale)}")
        if self.hires is not None:
            h = self.hires
            size = f"to {h.resize_x}x{h.resize_y}" if (h.resize_x or h.resize_y) else f"x{_num(h.scale)}"
            steps = f", {h.steps} steps" if h.steps else ""
            parts.append(f"txt2img hires {h.upscaler} {size} at denoising {_num(h.denoising)}{steps}")
        return ", ".join(parts) or "changes nothing"


def _num(x: float) -> str:
    return f"{x:g}"


RECOMMENDED = "BPModel recommended"

BUILTIN_PRESETS: Tuple[Preset, ...] = (
    Preset(
        RECOMMENDED,
        clip_skip=2,
        ensd=31337,
        hires=Hires(upscaler="Latent", scale=2.0, denoising=0.7),
        description="What BPModel was tuned for: clip skip 2, ENSD 31337, txt2img hires fix Latent x2 at 0.7.",
        builtin=True,
    ),
    Preset(
        "BPModel (no hires)",
        clip_skip=2,
        ensd=31337,
        description="Clip skip 2 and ENSD 31337 only (img2img, or quick drafts at the base resolution).",
        builtin=True,
    ),
    Preset(
        "BPModel 1.5x hires",
        clip_skip=2,
        ensd=31337,
        hires=Hires(upscaler="Latent", scale=1.5, denoising=0.6),
        description="Lighter hires pass (x1.5, denoising 0.6) for 768-1024 px bases on smaller GPUs.",
        builtin=True,
    ),
)

_TOP_KEYS = {"description", "clip_skip", "ensd", "steps", "sampler", "scheduler", "cfg_scale", "hires"}
_HIRES_KEYS = {"upscaler", "scale", "denoising", "steps", "resize_x", "resize_y"}


def _check_number(value: Any, key: str, where: str, path: Any, kind: type, lo: float, hi: float) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BPError(f"{where}: '{key}' must be a number, got {value!r}", path=path, hint="fix the presets file")
    if kind is int and float(value) != int(value):
        raise BPError(f"{where}: '{key}' must be a whole number, got {value!r}", path=path, hint="fix the presets file")
    if not lo <= value <= hi:
        raise BPError(f"{where}: '{key}' must be between {_num(lo)} and {_num(hi)}, got {value!r}", path=path,
                      hint="fix the presets file")
    return kind(value)


def _check_text(value: Any, key: str, where: str, path: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BPError(f"{where}: '{key}' must be a non-empty text, got {value!r}", path=path, hint="fix the presets file")
    return value.strip()


def preset_from_dict(name: str, data: Mapping[str, Any], path: Any = None) -> Preset:
    """Validate one preset entry (as in the YAML file) into a `Preset`; a bad entry raises a BPError naming it."""
    where = f"preset '{name}'"
    if not isinstance(data, Mapping):
        raise BPError(f"{where} must be a mapping of settings, got {type(data).__name__}", path=path,
                      hint="see docs/webui.md for the presets file format")
    unknown = sorted(set(map(str, data)) - _TOP_KEYS)
    if unknown:
        raise BPError(f"{where}: unknown key '{unknown[0]}'", path=path,
                      hint=f"allowed keys: {', '.join(sorted(_TOP_KEYS))}")
    p = Preset(name=name)
    if data.get("description") is not None:
        p.description = str(data["description"])
    if data.get("clip_skip") is not None:
        p.clip_skip = _check_number(data["clip_skip"], "clip_skip", where, path, int, 1, 12)
    if data.get("ensd") is not None:
        p.ensd = _check_number(data["ensd"], "ensd", where, path, int, 0, 2**63 - 1)
    if data.get("steps") is not None:
        p.steps = _check_number(data["steps"], "steps", where, path, int, 1, 150)
    if data.get("sampler") is not None:
        p.sampler = _check_text(data["sampler"], "sampler", where, path)
    if data.get("scheduler") is not None:
        p.scheduler = _check_text(data["scheduler"], "scheduler", where, path)
    if data.get("cfg_scale") is not None:
        p.cfg_scale = _check_number(data["cfg_scale"], "cfg_scale", where, path, float, 1, 30)
    hires = data.get("hires")
    if hires is not None and hires is not False:
        if hires is True:
            hires = {}
        if not isinstance(hires, Mapping):
            raise BPError(f"{where}: 'hires' must be a mapping (upscaler, scale, denoising, ...)", path=path,
                          hint="or remove it to leave hires fix alone")
        unknown = sorted(set(map(str, hires)) - _HIRES_KEYS)
        if unknown:
            raise BPError(f"{where}: unknown key 'hires.{unknown[0]}'", path=path,
                          hint=f"allowed keys: {', '.join(sorted(_HIRES_KEYS))}")
        h = Hires()
        if hires.get("upscaler") is not None:
            h.upscaler = _check_text(hires["upscaler"], "hires.upscaler", where, path)
        if hires.get("scale") is not None:
            h.scale = _check_number(hires["scale"], "hires.scale", where, path, float, 1, 8)
        if hires.get("denoising") is not None:
            h.denoising = _check_number(hires["denoising"], "hires.denoising", where, path, float, 0, 1)
        if hires.get("steps") is not None:
            h.steps = _check_number(hires["steps"], "hires.steps", where, path, int, 0, 150)
        if hires.get("resize_x") is not None:
            h.resize_x = _check_number(hires["resize_x"], "hires.resize_x", where, path, int, 0, 8192)
        if hires.get("resize_y") is not None:
            h.resize_y = _check_number(hires["resize_y"], "hires.resize_y", where, path, int, 0, 8192)
        p.hires = h
    return p


def check_name(name: Any, path: Any = None) -> str:
    if not isinstance(name, str) or not name.strip():
        raise BPError("a preset needs a non-empty name", path=path, hint="type a name for the preset")
    name = name.strip()
    if "\n" in name or len(name) > 80:
        raise BPError(f"preset name {name[:40]!r} must be one line of at most 80 characters", path=path)
    if name.lower() == "none":
        raise BPError("'None' is reserved", path=path, hint="choose another preset name")
    return name


def load_user_presets(path: "str | os.PathLike[str]") -> List[Preset]:
    """User presets from a YAML file (missing file: none). Errors name the file and the bad preset/key."""
    path = Path(path)
    if not path.exists():
        return []
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise BPError(f"cannot read presets file: {exc}", path=path) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise BPError(f"presets file is not valid YAML{at}", path=path, hint="fix it or delete it") from None
    if data is None:
        return []
    if not isinstance(data, Mapping) or not isinstance(data.get("presets", {}), Mapping):
        raise BPError("presets file must hold a mapping 'presets: {name: {...}}'", path=path,
                      hint="see docs/webui.md for the format")
    version = data.get("version", FILE_VERSION)
    if version != FILE_VERSION:
        raise BPError(f"presets file version {version!r} is not supported (expected {FILE_VERSION})", path=path)
    builtin_names = {b.name.lower() for b in BUILTIN_PRESETS}
    out = []
    for name, entry in (data.get("presets") or {}).items():
        name = check_name(str(name), path)
        if name.lower() in builtin_names:
            raise BPError(f"preset '{name}' has the name of a built-in preset", path=path, hint="rename it")
        out.append(preset_from_dict(name, entry or {}, path))
    return out


def save_user_presets(path: "str | os.PathLike[str]", presets: List[Preset]) -> None:
    """Write the user presets file atomically (readers never see a half-written file)."""
    import yaml

    from bp_trainer.fsutil import atomic_write_text

    body = {"version": FILE_VERSION, "presets": {p.name: p.to_dict() for p in presets if not p.builtin}}
    text = "# BP Train: user presets for the \"BP presets\" Script (txt2img/img2img). Format: docs/webui.md\n"
    text += yaml.safe_dump(body, sort_keys=False, allow_unicode=True)
    atomic_write_text(path, text)


def all_presets(path: "str | os.PathLike[str] | None") -> List[Preset]:
    """Built-in presets followed by the user's."""
    return list(BUILTIN_PRESETS) + (load_user_presets(path) if path else [])


def find_preset(presets: List[Preset], name: str) -> Optional[Preset]:
    for p in presets:
        if p.name == name:
            return p
    lowered = name.strip().lower()
    for p in presets:
        if p.name.lower() == lowered:
            return p
    return None


def add_user_preset(path: "str | os.PathLike[str]", preset: Preset, *, replace: bool = False) -> List[Preset]:
    """Add (or with `replace`, overwrite) a user preset in the file; returns the new user preset list."""
    name = check_name(preset.name, path)
    if find_preset(list(BUILTIN_PRESETS), name) is not None:
        raise BPError(f"'{name}' is a built-in preset", hint="choose another name")
    users = load_user_presets(path)
    existing = find_preset(users, name)
    if existing is not None and not replace:
        raise BPError(f"a preset named '{name}' already exists", path=path, hint="choose another name or replace it")
    preset = Preset(**{**preset.__dict__, "name": name, "builtin": False})
    users = [u for u in users if u is not existing] + [preset]
    save_user_presets(path, users)
    return users


def delete_user_preset(path: "str | os.PathLike[str]", name: str) -> List[Preset]:
    users = load_user_presets(path)
    existing = find_preset(users, name)
    if existing is None:
        raise BPError(f"no user preset named '{name}'", path=path)
    users = [u for u in users if u is not existing]
    save_user_presets(path, users)
    return users


def _to_int(params: Mapping[str, Any], key: str) -> Optional[int]:
    if key not in params:
        return None
    try:
        return int(float(str(params[key]).strip()))
    except ValueError:
        raise BPError(f"infotext value '{key}: {params[key]}' is not a number") from None


def _to_float(params: Mapping[str, Any], key: str) -> Optional[float]:
    if key not in params:
        return None
    try:
        return float(str(params[key]).strip())
    except ValueError:
        raise BPError(f"infotext value '{key}: {params[key]}' is not a number") from None


# v1.10.1 samplers with `uses_ensd` whose default eta is not 0 (DDIM has uses_ensd but eta 0 by default; the
# SDE samplers use Brownian noise from the seeds and ignore ENSD)
ENSD_SAMPLERS = ("Euler a", "DPM2 a", "DPM++ 2S a", "DPM fast", "DPM adaptive")


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


def preset_from_infotext(text: str, name: str = "From infotext", *, include_sampling: bool = True) -> Preset:
    """The preset an infotext's parameter line makes (clip skip, ENSD, hires fix and, optionally,
    steps / sampler / schedule type / CFG scale). A missing `Clip skip` means 1 and no hires keys mean no hires
    fix; a missing `ENSD` means 0 only for samplers that would have written it, else ENSD is left alone."""
    _, _, params = split_infotext(text)
    if not params:
        raise BPError("no parameter line found in the infotext",
                      hint="paste the whole text, including the line 'Steps: ..., Sampler: ..., CFG scale: ...'")
    p = Preset(name=name)
    p.clip_skip = _to_int(params, "Clip skip") or 1  # the WebUI writes it whenever it is above 1
    sampler, scheduler = split_sampler(params["Sampler"], params.get("Schedule type")) \
        if params.get("Sampler") else (None, None)
    p.ensd = _to_int(params, "ENSD")
    if p.ensd is None and sampler is not None and sampler_uses_ensd(sampler):
        p.ensd = 0  # this sampler would have written a non-zero ENSD; other samplers say nothing about it
    if include_sampling:
        p.steps = _to_int(params, "Steps")
        p.sampler, p.scheduler = sampler, scheduler
        p.cfg_scale = _to_float(params, "CFG scale")
    hires_keys = ("Hires upscale", "Hires upscaler", "Hires resize-1")
    if "Denoising strength" in params and any(k in params for k in hires_keys):
        h = Hires(upscaler=params.get("Hires upscaler") or "Latent")
        scale = _to_float(params, "Hires upscale")
        h.scale = scale if scale is not None else 2.0
        h.denoising = _to_float(params, "Denoising strength") or 0.0
        h.steps = _to_int(params, "Hires steps") or 0
        h.resize_x = _to_int(params, "Hires resize-1") or 0
        h.resize_y = _to_int(params, "Hires resize-2") or 0
        p.hires = h
    if INFOTEXT_KEY in params and name == "From infotext":
        p.name = params[INFOTEXT_KEY]
    p.description = "from an infotext"
    return p


# --------------------------------------------------------------------------------------------------------
# Applying a preset to a WebUI processing object (duck-typed: `p` only needs the attributes used)


def preset_overrides(preset: Preset) -> Dict[str, Any]:
    """The WebUI settings a preset changes, as `p.override_settings` entries."""
    out: Dict[str, Any] = {}
    if preset.clip_skip is not None:
        out[CLIP_SKIP_KEY] = int(preset.clip_skip)
    if preset.ensd is not None:
        out[ENSD_KEY] = int(preset.ensd)
    return out


def apply_preset(p: Any, preset: Preset, is_txt2img: bool) -> Dict[str, Any]:
    """Set a processing object's fields from a preset; returns what was set (for logs and tests).

    * Settings go to `p.override_settings`; an override the request already carries (the API's
      `override_settings`, or the UI's "Override settings" box) is kept: the explicit per-job value wins.
    * Steps / sampler / schedule type / CFG scale are set when the preset has them.
    * Hires fix is set only on txt2img (img2img has no hires pass).
    * The infotext records `BP preset: <name>` and `Script: BP presets`, so pasting it re-selects both.
    """
    applied: Dict[str, Any] = {}
    overrides = getattr(p, "override_settings", None)
    if overrides is None:
        overrides = {}
        p.override_settings = overrides
    for key, value in preset_overrides(preset).items():
        if key not in overrides:
            overrides[key] = value
            applied[key] = value
    for attr, value in (("steps", preset.steps), ("sampler_name", preset.sampler), ("scheduler", preset.scheduler),
                        ("cfg_scale", preset.cfg_scale)):
        if value is not None:
            setattr(p, attr, value)
            applied[attr] = value
    if is_txt2img and preset.hires is not None:
        h = preset.hires
        fields = {
            "enable_hr": True,
            "hr_upscaler": h.upscaler,
            "hr_scale": float(h.scale),
            "denoising_strength": float(h.denoising),
            "hr_second_pass_steps": int(h.steps),
            "hr_resize_x": int(h.resize_x),
            "hr_resize_y": int(h.resize_y),
        }
        for attr, value in fields.items():
            setattr(p, attr, value)
        applied.update(fields)
    extra = getattr(p, "extra_generation_params", None)
    if extra is None:
        extra = {}
        p.extra_generation_params = extra
    extra[INFOTEXT_KEY] = preset.name
    extra["Script"] = SCRIPT_TITLE
    return applied


_ABSENT = object()


@dataclass
class SettingsSnapshot:
    """Values of some WebUI settings before a job; `_ABSENT` marks keys not in `opts.data`."""

    values: Dict[str, Any] = field(default_factory=dict)


def snapshot_settings(opts: Any, keys=SETTING_KEYS) -> SettingsSnapshot:
    data = opts.data
    return SettingsSnapshot({k: data[k] if k in data else _ABSENT for k in keys})


def restore_settings(opts: Any, snapshot: SettingsSnapshot) -> List[str]:
    """Put the settings back as they were before the job; returns the keys that had to be restored.

    The WebUI restores overrides only for keys that were in `opts.data` (saved in config.json); a key
    that was absent keeps the job's value afterwards. Such keys are removed again here, so the setting
    reads its default as before.
    """
    restored = []
    data = opts.data
    for key, before in snapshot.values.items():
        if before is _ABSENT:
            if key in data:
                del data[key]
                restored.append(key)
        elif key not in data or data[key] != before:
            try:
                setattr(opts, key, before)
            except RuntimeError:  # the WebUI refuses setattr with --freeze-settings; the job's value must still go
                data[key] = before
            restored.append(key)
    return restored
