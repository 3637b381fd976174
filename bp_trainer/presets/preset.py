"""What a preset is: clip skip, ENSD (eta noise seed delta), optionally steps / sampler / schedule type / CFG
scale, and optionally a hires-fix block that applies to txt2img only; the built-in presets; the validation of one
preset entry (as written in the presets file); and the preset an infotext's parameter line makes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

from bp_trainer.errors import BPError
from bp_trainer.infotext import sampler_uses_ensd, split_infotext, split_sampler

SCRIPT_TITLE = "BP presets"  # the Script's title(); the WebUI API's script_name is its lower case
INFOTEXT_KEY = "BP preset"  # infotext key naming the preset a picture was made with


@dataclass(frozen=True)
class Hires:
    """Hires fix (txt2img only). `scale` is used unless `resize_x`/`resize_y` are set (WebUI rule)."""

    upscaler: str = "Latent"
    scale: float = 2.0
    denoising: float = 0.7
    steps: int = 0  # 0 = same as the first pass
    resize_x: int = 0
    resize_y: int = 0

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"upscaler": self.upscaler, "scale": self.scale, "denoising": self.denoising}
        out.update({key: getattr(self, key) for key in ("steps", "resize_x", "resize_y") if getattr(self, key)})
        return out


@dataclass(frozen=True)
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
            out["hires"] = self.hires.to_dict()
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

# Entry keys of the presets file: (key, type, lowest, highest) for numbers, None for texts
_TOP_KEYS: Dict[str, Optional[Tuple[type, float, float]]] = {
    "clip_skip": (int, 1, 12), "ensd": (int, 0, 2**63 - 1), "steps": (int, 1, 150), "sampler": None,
    "scheduler": None, "cfg_scale": (float, 1, 30),
}
_HIRES_KEYS: Dict[str, Optional[Tuple[type, float, float]]] = {
    "upscaler": None, "scale": (float, 1, 8), "denoising": (float, 0, 1), "steps": (int, 0, 150),
    "resize_x": (int, 0, 8192), "resize_y": (int, 0, 8192),
}
_FIX = "fix the presets file"


def _check_number(value: Any, key: str, where: str, path: Any, rule: Tuple[type, float, float]) -> Any:
    kind, lo, hi = rule
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BPError(f"{where}: '{key}' must be a number, got {value!r}", path=path, hint=_FIX)
    if kind is int and float(value) != int(value):
        raise BPError(f"{where}: '{key}' must be a whole number, got {value!r}", path=path, hint=_FIX)
    if not lo <= value <= hi:
        raise BPError(f"{where}: '{key}' must be between {_num(lo)} and {_num(hi)}, got {value!r}", path=path,
                      hint=_FIX)
    return kind(value)


def _check_text(value: Any, key: str, where: str, path: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BPError(f"{where}: '{key}' must be a non-empty text, got {value!r}", path=path, hint=_FIX)
    return value.strip()


def _checked(data: Mapping[str, Any], rules: Mapping[str, Any], prefix: str, where: str, path: Any) -> Dict[str, Any]:
    """The set values of `data` whose keys are in `rules`, each checked (number range or non-empty text)."""
    out: Dict[str, Any] = {}
    for key, rule in rules.items():
        value = data.get(key)
        if value is None:
            continue
        name = prefix + key
        out[key] = _check_text(value, name, where, path) if rule is None else _check_number(value, name, where, path,
                                                                                          rule)
    return out


def _refuse_unknown(data: Mapping[str, Any], allowed: Any, prefix: str, where: str, path: Any) -> None:
    unknown = sorted(set(map(str, data)) - set(allowed))
    if unknown:
        raise BPError(f"{where}: unknown key '{prefix}{unknown[0]}'", path=path,
                      hint=f"allowed keys: {', '.join(sorted(allowed))}")


def _hires_from_dict(hires: Any, where: str, path: Any) -> Optional[Hires]:
    if hires is None or hires is False:
        return None
    if hires is True:
        hires = {}
    if not isinstance(hires, Mapping):
        raise BPError(f"{where}: 'hires' must be a mapping (upscaler, scale, denoising, ...)", path=path,
                      hint="or remove it to leave hires fix alone")
    _refuse_unknown(hires, _HIRES_KEYS, "hires.", where, path)
    return Hires(**_checked(hires, _HIRES_KEYS, "hires.", where, path))


def preset_from_dict(name: str, data: Mapping[str, Any], path: Any = None) -> Preset:
    """Validate one preset entry (as in the YAML file) into a `Preset`; a bad entry raises a BPError naming it."""
    where = f"preset '{name}'"
    if not isinstance(data, Mapping):
        raise BPError(f"{where} must be a mapping of settings, got {type(data).__name__}", path=path,
                      hint="see docs/webui.md for the presets file format")
    _refuse_unknown(data, [*_TOP_KEYS, "description", "hires"], "", where, path)
    values = _checked(data, _TOP_KEYS, "", where, path)
    description = str(data["description"]) if data.get("description") is not None else ""
    return Preset(name=name, description=description, hires=_hires_from_dict(data.get("hires"), where, path),
                  **values)


def check_name(name: Any, path: Any = None) -> str:
    if not isinstance(name, str) or not name.strip():
        raise BPError("a preset needs a non-empty name", path=path, hint="type a name for the preset")
    name = name.strip()
    if "\n" in name or len(name) > 80:
        raise BPError(f"preset name {name[:40]!r} must be one line of at most 80 characters", path=path)
    if name.lower() == "none":
        raise BPError("'None' is reserved", path=path, hint="choose another preset name")
    return name


def _to_float(params: Mapping[str, Any], key: str) -> Optional[float]:
    if key not in params:
        return None
    try:
        return float(str(params[key]).strip())
    except ValueError:
        raise BPError(f"infotext value '{key}: {params[key]}' is not a number") from None


def _to_int(params: Mapping[str, Any], key: str) -> Optional[int]:
    value = _to_float(params, key)
    return None if value is None else int(value)


def _hires_from_infotext(params: Mapping[str, Any]) -> Optional[Hires]:
    """The hires fix an infotext records (the WebUI's paste rule: denoising strength plus a hires key)."""
    hires_keys = ("Hires upscale", "Hires upscaler", "Hires resize-1")
    if "Denoising strength" not in params or not any(k in params for k in hires_keys):
        return None
    scale = _to_float(params, "Hires upscale")
    return Hires(upscaler=params.get("Hires upscaler") or "Latent", scale=scale if scale is not None else 2.0,
                 denoising=_to_float(params, "Denoising strength") or 0.0, steps=_to_int(params, "Hires steps") or 0,
                 resize_x=_to_int(params, "Hires resize-1") or 0, resize_y=_to_int(params, "Hires resize-2") or 0)


def preset_from_infotext(text: str, name: str = "From infotext", *, include_sampling: bool = True) -> Preset:
    """The preset an infotext's parameter line makes (clip skip, ENSD, hires fix and, optionally,
    steps / sampler / schedule type / CFG scale). A missing `Clip skip` means 1 and no hires keys mean no hires
    fix; a missing `ENSD` means 0 only for samplers that would have written it, else ENSD is left alone."""
    _, _, params = split_infotext(text)
    if not params:
        raise BPError("no parameter line found in the infotext",
                      hint="paste the whole text, including the line 'Steps: ..., Sampler: ..., CFG scale: ...'")
    sampler, scheduler = split_sampler(params["Sampler"], params.get("Schedule type")) \
        if params.get("Sampler") else (None, None)
    ensd = _to_int(params, "ENSD")
    if ensd is None and sampler is not None and sampler_uses_ensd(sampler):
        ensd = 0  # this sampler would have written a non-zero ENSD; other samplers say nothing about it
    sampling: Dict[str, Any] = {}
    if include_sampling:
        sampling = {"steps": _to_int(params, "Steps"), "sampler": sampler, "scheduler": scheduler,
                    "cfg_scale": _to_float(params, "CFG scale")}
    if INFOTEXT_KEY in params and name == "From infotext":
        name = params[INFOTEXT_KEY]
    return Preset(name=name, clip_skip=_to_int(params, "Clip skip") or 1,  # written whenever it is above 1
                  ensd=ensd, hires=_hires_from_infotext(params), description="from an infotext", **sampling)

