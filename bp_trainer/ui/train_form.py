"""The Train form <-> the run config (pure; no gradio).

The form shows the main options; the YAML box holds the whole config (every advanced key). On Start,
and whenever the form changes, the form's values are laid over the YAML: the form wins for its keys, the
YAML keeps everything else. Importing a YAML fills both. Schema, defaults, presets and validation are the
trainer's (`bp_trainer.train.config`); nothing here duplicates them.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from bp_trainer.errors import ConfigError

# (config key, label). The order is the order of the form's inputs (after base model / dataset / preset).
FORM_FIELDS: List[Tuple[str, str]] = [
    ("run.name", "Run name"),
    ("training.batch_size", "Batch size"),
    ("training.gradient_accumulation", "Gradient accumulation"),
    ("training.learning_rate", "Learning rate"),
    ("training.lr_scheduler", "LR schedule"),
    ("training.lr_warmup_steps", "Warm-up steps"),
    ("training.epochs", "Epochs"),
    ("training.max_steps", "Max steps (0: use epochs)"),
    ("training.mixed_precision", "Mixed precision"),
    ("training.gradient_checkpointing", "Gradient checkpointing"),
    ("training.train_text_encoder", "Train text encoder"),
    ("training.noise_offset", "Noise offset"),
    ("training.seed", "Seed"),
    ("model.clip_skip", "Clip skip"),
    ("ema.enabled", "EMA"),
    ("ema.decay", "EMA decay"),
    ("saving.every_n_epochs", "Save every N epochs"),
    ("saving.every_n_steps", "Save every N steps"),
    ("saving.precision", "Checkpoint precision"),
    ("embeddings.tags", "Tag embeddings (one tag per line; typed in the WebUI in space form)"),
    ("sampling.prompts", "Sample prompts (one per line)"),
    ("sampling.negative_prompt", "Negative prompt"),
    ("sampling.every_n_steps", "Sample every N steps"),
    ("sampling.steps", "Sampling steps"),
    ("run.num_processes", "Processes (GPUs)"),
]

PRESET_NAMES = ("512", "768", "1024")
DEFAULT_PRESET = "768"


def _cfgmod():
    from bp_trainer.train import config

    return config


def field(key: str):
    sec, name = key.split(".", 1)
    return _cfgmod().spec(sec, name)


def get(cfg: Mapping[str, Any], key: str) -> Any:
    sec, name = key.split(".", 1)
    return (cfg.get(sec) or {}).get(name)


def put(cfg: Dict[str, Any], key: str, value: Any) -> None:
    sec, name = key.split(".", 1)
    cfg.setdefault(sec, {})
    if not isinstance(cfg[sec], dict):
        cfg[sec] = {}
    cfg[sec][name] = value


def form_value(key: str, value: Any) -> Any:
    """A config value as its form widget shows it."""
    f = field(key)
    if f.kind == "strlist":
        return "\n".join(value or [])
    if key == "training.max_steps":
        return int(value or 0)
    if value is None:
        return "" if f.kind in ("str", "path") else (0 if f.kind in ("int", "float") else value)
    return value


def config_value(key: str, value: Any) -> Any:
    """A form widget's value as the config stores it (validation happens later, in config.validate)."""
    f = field(key)
    if f.kind == "strlist":
        return [line.strip() for line in str(value or "").splitlines() if line.strip()]
    if key == "training.max_steps":
        return int(value) if value not in (None, "") and int(value) > 0 else None
    if f.kind == "int" and isinstance(value, float) and value == int(value):
        return int(value)
    if f.kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if f.kind in ("str", "path") and value is None:
        return ""
    return value


def parse_yaml(text: str) -> Dict[str, Any]:
    """The YAML box's text as a raw (unvalidated) dict; an error names the line."""
    import yaml

    if not (text or "").strip():
        return {}
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = _cfgmod().yaml_error_where(exc)
        raise ConfigError(f"the run YAML is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError("the run YAML must be a mapping of sections (model:, dataset:, training: ...)")
    return raw


def dump_yaml(cfg: Any) -> str:
    """YAML of a raw form config (a dict) or a validated RunConfig."""
    return _cfgmod().dump_config(cfg if not isinstance(cfg, Mapping) else dict(cfg))


def initial_config(preset: str = DEFAULT_PRESET) -> Dict[str, Any]:
    """Defaults with a resolution preset applied."""
    c = _cfgmod()
    return c.merge(c.defaults(), c.preset(preset))


def apply_preset(cfg: Mapping[str, Any], preset: str) -> Dict[str, Any]:
    """The config with the preset's `arb:` block and training keys laid over it."""
    return _cfgmod().merge(dict(cfg), _cfgmod().preset(preset))


def arb_yaml(cfg: Mapping[str, Any]) -> str:
    """The `arb:` block alone, naifu style, for the editable box."""
    import yaml

    return yaml.safe_dump({"arb": dict(cfg.get("arb") or {})}, sort_keys=False, default_flow_style=None)


def parse_arb(text: str) -> Dict[str, Any]:
    """An `arb:` block (with or without the `arb:` key, or a whole run config) as a dict."""
    raw = parse_yaml(text)
    if "arb" in raw and isinstance(raw["arb"], dict):
        return dict(raw["arb"])
    return raw


def merge_form(yaml_text: str, *, base: str | None, dataset: str | None, arb_text: str | None,
               values: Sequence[Any]) -> Dict[str, Any]:
    """The YAML box's config with the form laid over it (form wins for its keys). Not validated."""
    cfg = copy.deepcopy(parse_yaml(yaml_text))
    if base:
        put(cfg, "model.base", base)
    if dataset is not None and str(dataset).strip():
        put(cfg, "dataset.path", str(dataset).strip())
    if arb_text is not None and arb_text.strip():
        cfg["arb"] = {**(cfg.get("arb") or {}), **parse_arb(arb_text)}
    for (key, _label), value in zip(FORM_FIELDS, values):
        put(cfg, key, config_value(key, value))
    return cfg


def form_values(cfg: Mapping[str, Any]) -> List[Any]:
    """The form's widget values for a config (in FORM_FIELDS order)."""
    full = _cfgmod().merge(_cfgmod().defaults(), dict(cfg))
    return [form_value(key, get(full, key)) for key, _label in FORM_FIELDS]


def validate(cfg: Mapping[str, Any], *, check_paths: bool = True) -> Any:
    """The raw form config as a validated `RunConfig`."""
    return _cfgmod().validate(copy.deepcopy(dict(cfg)), check_paths=check_paths)


def detect_preset(cfg: Mapping[str, Any]) -> str | None:
    """Which preset's `arb:` block the config has (None: a custom one)."""
    arb = dict(cfg.get("arb") or {})
    for name in PRESET_NAMES:
        p = _cfgmod().preset(name).get("arb", {})
        if all(arb.get(k) == v or (isinstance(v, list) and list(arb.get(k) or []) == v) for k, v in p.items()):
            return name
    return None
