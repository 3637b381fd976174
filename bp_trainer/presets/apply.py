"""Applying a preset to a WebUI processing object, and putting the WebUI's settings back afterwards.

Duck-typed: `p` only needs the attributes used (`override_settings`, `extra_generation_params`, the sampling and
hires fields), `opts` only `data` and attribute assignment. `snapshot_settings`/`restore_settings` undo the settings
a job changed, including the ones the WebUI itself does not restore (keys absent from `opts.data`, i.e. never saved
in config.json).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List

from bp_trainer.presets.preset import INFOTEXT_KEY, SCRIPT_TITLE, Preset

# WebUI setting keys (modules/shared_options.py) and their infotext names
CLIP_SKIP_KEY = "CLIP_stop_at_last_layers"  # infotext "Clip skip"
ENSD_KEY = "eta_noise_seed_delta"  # infotext "ENSD"
SETTING_KEYS = (CLIP_SKIP_KEY, ENSD_KEY)


def preset_overrides(preset: Preset) -> Dict[str, Any]:
    """The WebUI settings a preset changes, as `p.override_settings` entries."""
    out: Dict[str, Any] = {}
    if preset.clip_skip is not None:
        out[CLIP_SKIP_KEY] = int(preset.clip_skip)
    if preset.ensd is not None:
        out[ENSD_KEY] = int(preset.ensd)
    return out


def _hires_fields(preset: Preset) -> Dict[str, Any]:
    h = preset.hires
    if h is None:
        return {}
    return {
        "enable_hr": True,
        "hr_upscaler": h.upscaler,
        "hr_scale": float(h.scale),
        "denoising_strength": float(h.denoising),
        "hr_second_pass_steps": int(h.steps),
        "hr_resize_x": int(h.resize_x),
        "hr_resize_y": int(h.resize_y),
    }


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
    fields = {"steps": preset.steps, "sampler_name": preset.sampler, "scheduler": preset.scheduler,
              "cfg_scale": preset.cfg_scale}
    fields = {attr: value for attr, value in fields.items() if value is not None}
    if is_txt2img:
        fields.update(_hires_fields(preset))
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


@dataclass(frozen=True)
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
