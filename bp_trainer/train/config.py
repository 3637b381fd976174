"""The run configuration: one YAML file, its schema, defaults and validation.

Importable without torch/diffusers/accelerate (the WebUI process uses it to show defaults and presets and
to check a config before starting a run). `load_config(path)` returns a plain nested dict with every
default filled in; `validate(raw)` does the same for a dict; `dump_config(cfg)` writes YAML back.

Validation runs before anything heavy starts and reports ONE clear message per problem: an unknown key
(with the nearest valid key), a wrong type, an impossible value, a missing dataset or model. All problems
are collected and raised together as one `ConfigError`.

The `arb:` section accepts naifu-diffusion's block verbatim (enabled, debug, base_res, max_size,
divisible, max_ar_error, min_dim, dim_limit).
"""

from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from bp_trainer.errors import ConfigError

PRESETS_DIR = Path(__file__).resolve().parent / "presets"


class Field:
    """One config value: its kind, default, allowed values and a one-line help text."""

    def __init__(self, kind: str, default: Any, help: str, *, choices: Optional[Tuple[Any, ...]] = None,
                 min: Optional[float] = None, max: Optional[float] = None, optional: bool = False,
                 check: Optional[Callable[[Any], Optional[str]]] = None):
        self.kind = kind  # int, float, bool, str, path, pair (two ints), strlist
        self.default = default
        self.help = help
        self.choices = choices
        self.min = min
        self.max = max
        self.optional = optional  # None allowed
        self.check = check


def _even_pair(value: Any) -> Optional[str]:
    return None if all(v % 8 == 0 for v in value) else "both sides must be multiples of 8"


SCHEMA: Dict[str, Dict[str, Field]] = {
    "run": {
        "name": Field("str", "bp-run", "name of the run; its folder is RUNS_DIR/NAME-TIMESTAMP"),
        "runs_dir": Field("path", "runs", "folder holding one sub-folder per run (relative to the config file)"),
        "num_processes": Field("int", 1, "processes (GPUs) for data-parallel training", min=1),
        "python": Field("str", "", "Python of the trainer's environment (empty: the current one)"),
        "accelerate_config": Field("path", None, "an accelerate config file (multi-node, DeepSpeed)", optional=True),
    },
    "model": {
        "base": Field("path", None, "base model: a WebUI .safetensors/.ckpt file or a diffusers folder"),
        "vae": Field("path", None, "optional VAE file/folder replacing the base model's VAE", optional=True),
        "v_prediction": Field("str", "auto", "auto (from the model), true (v-prediction, SD 2.x 768) or false (eps)",
                              choices=("auto", "true", "false")),
        "clip_skip": Field("int", 2, "use the n-th last CLIP layer, then the final layer norm (WebUI 'Clip skip')",
                           min=1, max=12),
    },
    "dataset": {
        "path": Field("path", None, "folder of images with .txt tag captions (searched recursively)"),
        "caption_extension": Field("str", ".txt", "caption file extension"),
        "shuffle_tags": Field("bool", True, "shuffle comma-separated tags each time an image is used"),
        "keep_tokens": Field("int", 0, "keep the first N tags in place when shuffling", min=0),
        "tag_dropout": Field("float", 0.0, "probability of dropping each tag", min=0.0, max=1.0),
        "caption_dropout": Field("float", 0.0, "probability of training an image with an empty caption (ucg)",
                                 min=0.0, max=1.0),
        "underscores_to_spaces": Field("bool", False, "write tags as 'long hair' instead of 'long_hair'"),
        "escape_brackets": Field("bool", False, "escape ( ) [ ] in tags, as WebUI prompts need (e.g. 'kaguya \\(oshi no ko\\)')"),
        "max_chunks": Field("int", 3, "75-token chunks per caption (3 = 225 tokens, like naifu)", min=1, max=8),
        "center_crop": Field("bool", False, "centre crop into the bucket (random crop when false)"),
        "repeats": Field("int", 1, "times each image is used per epoch", min=1),
        "num_workers": Field("int", 0, "data-loading worker processes", min=0),
    },
    "arb": {
        "enabled": Field("bool", True, "aspect-ratio buckets (false: every image at base_res)"),
        "debug": Field("bool", False, "print the bucket plan"),
        "base_res": Field("pair", [512, 512], "square (or base) resolution [w, h]", check=_even_pair),
        "max_size": Field("pair", [768, 512], "area budget [w, h]: buckets have at most w*h pixels (sets VRAM)",
                          check=_even_pair),
        "divisible": Field("int", 64, "bucket sides are multiples of this", min=8),
        "max_ar_error": Field("float", 4.0, "skip images whose aspect is further than this from every bucket",
                              min=0.0),
        "min_dim": Field("int", 256, "smallest bucket side", min=8),
        "dim_limit": Field("int", 1024, "largest bucket side", min=8),
    },
    "training": {
        "batch_size": Field("int", 1, "images per step per process", min=1),
        "gradient_accumulation": Field("int", 1, "steps accumulated per optimizer update", min=1),
        "learning_rate": Field("float", 5e-6, "peak learning rate of the UNet", min=0.0),
        "text_encoder_lr": Field("float", None, "learning rate of the text encoder (default: learning_rate)",
                                 optional=True, min=0.0),
        "lr_scheduler": Field("str", "constant", "learning-rate schedule after warm-up",
                              choices=("constant", "cosine", "linear")),
        "lr_warmup_steps": Field("int", 0, "linear warm-up steps", min=0),
        "optimizer": Field("str", "adamw", "adamw, or adamw8bit (bitsandbytes; falls back to adamw when missing)",
                           choices=("adamw", "adamw8bit")),
        "adam_beta1": Field("float", 0.9, "AdamW beta1", min=0.0, max=1.0),
        "adam_beta2": Field("float", 0.999, "AdamW beta2", min=0.0, max=1.0),
        "adam_epsilon": Field("float", 1e-8, "AdamW epsilon", min=0.0),
        "weight_decay": Field("float", 1e-2, "AdamW weight decay", min=0.0),
        "max_grad_norm": Field("float", 1.0, "gradient clipping norm (0: off)", min=0.0),
        "epochs": Field("int", 10, "epochs to train (ignored when max_steps is set)", min=1),
        "max_steps": Field("int", None, "optimizer steps to train (overrides epochs)", optional=True, min=1),
        "mixed_precision": Field("str", "auto", "auto (bf16 where the GPU supports it, else fp16; none on a CPU), "
                                 "no, fp16 or bf16", choices=("auto", "no", "fp16", "bf16")),
        "gradient_checkpointing": Field("bool", False, "trade compute for memory"),
        "attention": Field("str", "sdpa", "sdpa (PyTorch scaled_dot_product_attention) or default",
                           choices=("sdpa", "default")),
        "train_text_encoder": Field("bool", False, "train the text encoder too"),
        "noise_offset": Field("float", 0.0, "offset noise strength (0.0357-0.1 typical; 0: off)", min=0.0, max=1.0),
        "min_snr_gamma": Field("float", None, "min-SNR loss weighting gamma (5 typical; empty: off)", optional=True,
                               min=0.0),
        "seed": Field("int", 42, "seed of everything (noise, shuffling, buckets)", min=0),
    },
    "ema": {
        "enabled": Field("bool", True, "keep an exponential moving average of the UNet"),
        "decay": Field("float", 0.999, "EMA decay per update", min=0.0, max=1.0),
        "device": Field("str", "cpu", "cpu (saves VRAM) or accelerator (faster)", choices=("cpu", "accelerator")),
        "every_n_steps": Field("int", 5, "update the EMA every N optimizer steps (a CPU EMA costs a copy of the UNet)",
                               min=1),
    },
    "latents": {
        "cache": Field("str", "none", "none, memory or disk (disk: reused between runs)",
                       choices=("none", "memory", "disk")),
        "dir": Field("path", None, "disk cache folder (default: RUNS_DIR/latent_cache, shared by runs)",
                     optional=True),
    },
    "saving": {
        "every_n_epochs": Field("int", 1, "save every N epochs (0: off)", min=0),
        "every_n_steps": Field("int", 0, "save every N steps (0: off)", min=0),
        "at_end": Field("bool", True, "save when training ends"),
        "on_stop": Field("bool", True, "save when stopped (signal or stop file)"),
        "precision": Field("str", "fp16", "precision of the WebUI checkpoint", choices=("fp16", "bf16", "fp32")),
        "main_unet": Field("str", "ema", "UNet of the WebUI checkpoint: ema (when EMA is on) or trained",
                           choices=("ema", "trained")),
        "ema_unet_fp32": Field("bool", True, "also write the EMA UNet in fp32 (for continued training)"),
        "diffusers": Field("bool", False, "also write a diffusers folder"),
        "keep_states": Field("int", 2, "resumable training states kept (older ones are deleted)", min=1),
    },
    "sampling": {
        "prompts": Field("strlist", [], "prompts sampled during training"),
        "negative_prompt": Field("str", "lowres, bad anatomy, bad hands, text, error, worst quality, low quality",
                                 "negative prompt"),
        "every_n_steps": Field("int", 0, "sample every N steps (0: only at saves)", min=0),
        "at_saves": Field("bool", True, "sample whenever a checkpoint is saved"),
        "steps": Field("int", 20, "sampling steps", min=1, max=150),
        "cfg_scale": Field("float", 7.0, "CFG scale", min=0.0),
        "seed": Field("int", 1, "sampling seed", min=0),
        "width": Field("int", None, "sample width (default: arb.base_res)", optional=True, min=64),
        "height": Field("int", None, "sample height (default: arb.base_res)", optional=True, min=64),
        "sampler": Field("str", "Euler a", "sampler (Euler a)", choices=("Euler a",)),
        "ema": Field("bool", True, "also sample with the EMA weights"),
    },
    "logging": {
        "every_n_steps": Field("int", 1, "write a step event every N steps", min=1),
        "tensorboard": Field("bool", True, "TensorBoard scalars in RUN_DIR/logs"),
        "progress_bar": Field("str", "auto", "tqdm bar: auto (when a terminal), true, false",
                              choices=("auto", "true", "false")),
        "record_batches": Field("bool", False, "write each process's batches to RUN_DIR/batches-rankN.jsonl "
                                "(checks of the data order)"),
    },
}

# Keys of other tools' configs accepted for compatibility (ignored, with a note).
IGNORED_ALIASES: Dict[Tuple[str, str], str] = {}


def defaults() -> Dict[str, Any]:
    """A complete config with every default (model.base and dataset.path empty)."""
    return {sec: {k: copy.deepcopy(f.default) for k, f in fields.items()} for sec, fields in SCHEMA.items()}


def field_help() -> Dict[str, str]:
    """`section.key` -> one-line help (for UIs and docs)."""
    return {f"{sec}.{k}": f.help for sec, fields in SCHEMA.items() for k, f in fields.items()}


def _nearest(name: str, options: List[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    if close:
        return f"did you mean '{close[0]}'?"
    return "valid keys: " + ", ".join(sorted(options))


def _coerce(where: str, f: Field, value: Any, errors: List[str]) -> Any:
    """Check one value's type and range; return it normalised (ints as floats for floats, pairs as lists)."""
    if value is None:
        if f.optional or f.default is None:
            return None
        errors.append(f"{where}: must not be empty ({f.help})")
        return f.default
    kind = f.kind
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        errors.append(f"{where}: expected true or false, got {value!r}")
        return f.default
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            errors.append(f"{where}: expected a whole number, got {value!r}")
            return f.default
        value = int(value)
    elif kind == "float":
        if isinstance(value, str):
            try:
                value = float(value)  # YAML 1.1 reads 5e-6 as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{where}: expected a number, got {value!r}")
            return f.default
        value = float(value)
    elif kind in ("str", "path"):
        if isinstance(value, bool) and f.choices and str(value).lower() in f.choices:
            value = str(value).lower()
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and kind == "str":
            value = str(value)
        if not isinstance(value, (str, os.PathLike)):
            errors.append(f"{where}: expected text, got {value!r}")
            return f.default
        value = os.fspath(value)
    elif kind == "pair":
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value, value]
        if (not isinstance(value, (list, tuple)) or len(value) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
            errors.append(f"{where}: expected [width, height] of two positive whole numbers, got {value!r}")
            return f.default
        value = [int(v) for v in value]
    elif kind == "strlist":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            errors.append(f"{where}: expected a list of texts, got {value!r}")
            return f.default
        value = list(value)
    if f.choices is not None and value not in f.choices:
        errors.append(f"{where}: {value!r} is not one of {', '.join(map(str, f.choices))}")
        return f.default
    if f.min is not None and isinstance(value, (int, float)) and value < f.min:
        errors.append(f"{where}: {value} is below the minimum {f.min:g}")
    if f.max is not None and isinstance(value, (int, float)) and value > f.max:
        errors.append(f"{where}: {value} is above the maximum {f.max:g}")
    if f.check is not None:
        problem = f.check(value)
        if problem:
            errors.append(f"{where}: {problem}")
    return value


def _cross_checks(cfg: Dict[str, Any], errors: List[str]) -> None:
    arb = cfg["arb"]
    bw, bh = arb["base_res"]
    mw, mh = arb["max_size"]
    if bw * bh > mw * mh:
        errors.append(f"arb.base_res: {bw}x{bh} has more pixels than the max_size budget {mw}x{mh}")
    if arb["min_dim"] > arb["dim_limit"]:
        errors.append(f"arb.min_dim: {arb['min_dim']} is larger than arb.dim_limit {arb['dim_limit']}")
    if arb["min_dim"] * arb["min_dim"] > mw * mh:
        errors.append(f"arb.min_dim: a {arb['min_dim']}px square does not fit the max_size budget {mw}x{mh}")
    if max(bw, bh) > arb["dim_limit"]:
        errors.append(f"arb.base_res: {bw}x{bh} exceeds arb.dim_limit {arb['dim_limit']}")
    if arb["divisible"] % 8:
        errors.append(f"arb.divisible: {arb['divisible']} must be a multiple of 8 (the VAE factor)")
    if cfg["ema"]["enabled"] is False and cfg["saving"]["main_unet"] == "ema":
        cfg["saving"]["main_unet"] = "trained"  # the default follows the EMA switch
    s = cfg["sampling"]
    for key in ("width", "height"):
        if s[key] is not None and s[key] % 8:
            errors.append(f"sampling.{key}: {s[key]} must be a multiple of 8")
    if cfg["saving"]["every_n_epochs"] == 0 and cfg["saving"]["every_n_steps"] == 0 and not cfg["saving"]["at_end"]:
        errors.append("saving: every_n_epochs, every_n_steps and at_end are all off; the run would save nothing")


def validate(raw: Any, *, base_dir: "str | os.PathLike[str] | None" = None, check_paths: bool = True,
             source: "str | os.PathLike[str] | None" = None) -> Dict[str, Any]:
    """Fill defaults into `raw` and check it; raise one ConfigError listing every problem.

    Relative paths are resolved against `base_dir` (the config file's folder). With `check_paths`, the model
    and the dataset must exist.
    """
    errors: List[str] = []
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("a run config must be a mapping of sections (model:, dataset:, training: ...)",
                          path=source)
    cfg = defaults()
    for sec, body in raw.items():
        if sec not in SCHEMA:
            flat = [s for s in SCHEMA]
            errors.append(f"unknown section '{sec}': {_nearest(str(sec), flat)}")
            continue
        if body is None:
            continue
        if not isinstance(body, dict):
            errors.append(f"{sec}: expected a mapping of keys, got {body!r}")
            continue
        fields = SCHEMA[sec]
        for key, value in body.items():
            if key not in fields:
                # A key from another section is a common slip: name the section it belongs to.
                other = [s for s, fl in SCHEMA.items() if key in fl]
                hint = f"it belongs in '{other[0]}.{key}'" if other else _nearest(str(key), list(fields))
                errors.append(f"unknown key '{sec}.{key}': {hint}")
                continue
            cfg[sec][key] = _coerce(f"{sec}.{key}", fields[key], value, errors)
    if not errors:
        _cross_checks(cfg, errors)
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    for sec, key in (("model", "base"), ("model", "vae"), ("dataset", "path"), ("run", "runs_dir"),
                     ("latents", "dir"), ("run", "accelerate_config")):
        v = cfg[sec][key]
        if isinstance(v, str) and v:
            p = Path(os.path.expanduser(v))
            cfg[sec][key] = str(p if p.is_absolute() else (base / p).resolve())
    if check_paths:
        if not cfg["model"]["base"]:
            errors.append("model.base: missing (a WebUI .safetensors/.ckpt file or a diffusers folder)")
        elif not os.path.exists(cfg["model"]["base"]):
            errors.append(f"model.base: {cfg['model']['base']} does not exist")
        if cfg["model"]["vae"] and not os.path.exists(cfg["model"]["vae"]):
            errors.append(f"model.vae: {cfg['model']['vae']} does not exist")
        if not cfg["dataset"]["path"]:
            errors.append("dataset.path: missing (a folder of images with .txt captions)")
        elif not os.path.isdir(cfg["dataset"]["path"]):
            errors.append(f"dataset.path: {cfg['dataset']['path']} is not a folder")
        if cfg["run"]["accelerate_config"] and not os.path.isfile(cfg["run"]["accelerate_config"]):
            errors.append(f"run.accelerate_config: {cfg['run']['accelerate_config']} does not exist")
    if errors:
        n = len(errors)
        head = "invalid run config" + (f" ({n} problems)" if n > 1 else "")
        raise ConfigError(f"{head}: " + "; ".join(errors), path=source,
                          hint="see docs/training.md or `python -m bp_trainer train --show-defaults`")
    return cfg


def load_config(path: "str | os.PathLike[str]", *, check_paths: bool = True) -> Dict[str, Any]:
    """Read and validate a run YAML (relative paths are relative to the file)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError("config file not found", path=path, hint="pass --config RUN.yaml")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the config ({exc})", path=path,
                          hint="save it as UTF-8 text and check its permissions") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"not valid YAML{where}: {getattr(exc, 'problem', exc)}", path=path) from None
    return validate(raw, base_dir=path.parent, check_paths=check_paths, source=path)


def dump_config(cfg: Dict[str, Any]) -> str:
    """YAML text of a config (sections in schema order)."""
    import yaml

    ordered = {sec: {k: cfg.get(sec, {}).get(k) for k in SCHEMA[sec]} for sec in SCHEMA}
    return yaml.safe_dump(ordered, sort_keys=False, allow_unicode=True, default_flow_style=None)


def save_config(cfg: Dict[str, Any], path: "str | os.PathLike[str]") -> None:
    from bp_trainer.fsutil import atomic_write_text

    atomic_write_text(path, dump_config(cfg))


def list_presets() -> List[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def preset(name: str) -> Dict[str, Any]:
    """A preset's raw sections (e.g. 'arb-768'): merge them into a config with `merge`."""
    import yaml

    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset '{name}'", hint=_nearest(name, list_presets()))
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def merge(base: Dict[str, Any], override: Dict[str, Any]) -> Dict[str, Any]:
    """A copy of `base` with `override`'s sections/keys laid over it (one level deep)."""
    out = copy.deepcopy(base)
    for sec, body in (override or {}).items():
        if isinstance(body, dict) and isinstance(out.get(sec), dict):
            out[sec].update(copy.deepcopy(body))
        else:
            out[sec] = copy.deepcopy(body)
    return out
