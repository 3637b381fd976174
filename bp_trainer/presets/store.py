"""The user presets file (YAML): load with one-line errors naming the file and the bad preset/key, atomic save,
add / replace / delete, and lookup by name among the built-ins and the user's presets.

Format (`version: 1`): `presets: {NAME: {description, clip_skip, ensd, steps, sampler, scheduler, cfg_scale,
hires: {upscaler, scale, denoising, steps, resize_x, resize_y}}}`; see docs/webui.md.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import List, Mapping, Optional

from bp_trainer.errors import BPError
from bp_trainer.presets.preset import BUILTIN_PRESETS, Preset, check_name, preset_from_dict

FILE_VERSION = 1
_HEADER = "# BP Train: user presets for the \"BP presets\" Script (txt2img/img2img). Format: docs/webui.md\n"


def _read_yaml(path: Path) -> object:
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise BPError(f"cannot read presets file: {exc}", path=path) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise BPError(f"presets file is not valid YAML{at}", path=path, hint="fix it or delete it") from None


def load_user_presets(path: "str | os.PathLike[str]") -> List[Preset]:
    """User presets from a YAML file (missing file: none). Errors name the file and the bad preset/key."""
    path = Path(path)
    if not path.exists():
        return []
    data = _read_yaml(path)
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
    atomic_write_text(path, _HEADER + yaml.safe_dump(body, sort_keys=False, allow_unicode=True))


def all_presets(path: "str | os.PathLike[str] | None") -> List[Preset]:
    """Built-in presets followed by the user's."""
    return list(BUILTIN_PRESETS) + (load_user_presets(path) if path else [])


def find_preset(presets: List[Preset], name: str) -> Optional[Preset]:
    """The preset of that name: exact match first, else ignoring case and surrounding spaces."""
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
    preset = dataclasses.replace(preset, name=name, builtin=False)
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
