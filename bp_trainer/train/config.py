"""The run configuration: one YAML file read into typed, frozen dataclasses (one per section).

Importable without torch/diffusers/accelerate (the WebUI process checks a config before a run starts).

    cfg = load_config("run.yaml")        # or validate(raw_dict)
    cfg.training.batch_size, cfg.arb.max_size, cfg.model.base ...

`validate(raw)` reports ONE clear message per problem — an unknown key (with the nearest valid key), a wrong
type, an impossible or non-finite value, a missing dataset, a base model of the wrong kind — all raised together
as one `ConfigError`, before anything heavy starts (inside the WebUI: before its model leaves the GPU).

Each section's fields carry their default, help text and limits (`spec(section, key)`); the `arb:` section is
naifu-diffusion's block, validated only by `bp_trainer.buckets.parse_arb`. Plain dicts exist only on the way
in and out (`defaults()`, `preset()`, `merge()` for forms and YAML; `to_dict()`/`dump_config()` for files).

A `version` key names the file format; older formats are migrated on load (`MIGRATIONS`), newer ones refused.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from bp_trainer.buckets import ARB_KEYS, ArbConfig, parse_arb
from bp_trainer.errors import ConfigError

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
CURRENT_VERSION = 1
MAX_LISTED_PROBLEMS = 12  # a config with thousands of bad keys still gets a one-line error
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class Spec:
    """One config value: its kind, allowed values and a one-line help text (the default is the field's)."""

    kind: str  # int, float, bool, str, name, path, strlist, auto (embeddings.auto: {min_images: N})
    help: str
    choices: Optional[Tuple[Any, ...]] = None
    min: Optional[float] = None
    max: Optional[float] = None
    optional: bool = False  # None allowed


def _f(default: Any, help: str, kind: str, **limits: Any) -> Any:
    spec = Spec(kind, help, **limits)
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda d=tuple(default): d, metadata={"spec": spec})
    return field(default=default, metadata={"spec": spec})


@dataclass(frozen=True)
class RunSection:
    name: str = _f("bp-run", "name of the run (letters, digits, - _ .); its folder is RUNS_DIR/NAME-TIMESTAMP",
                   "name")
    runs_dir: str = _f("runs", "folder holding one sub-folder per run (relative to the config file)", "path")
    num_processes: int = _f(1, "processes (GPUs) for data-parallel training", "int", min=1, max=1024)
    python: str = _f("", "Python of the trainer's environment (empty: the current one)", "str")
    accelerate_config: Optional[str] = _f(None, "an accelerate config file (multi-node, DeepSpeed)", "path",
                                          optional=True)


@dataclass(frozen=True)
class ModelSection:
    base: Optional[str] = _f(None, "base model: a WebUI .safetensors/.ckpt file or a diffusers folder", "path",
                             optional=True)
    vae: Optional[str] = _f(None, "optional VAE file/folder replacing the base model's VAE", "path", optional=True)
    v_prediction: str = _f("auto", "auto (from the model), true (v-prediction, SD 2.x 768) or false (eps)", "str",
                           choices=("auto", "true", "false"))
    clip_skip: int = _f(2, "use the n-th last CLIP layer, then the final layer norm (WebUI 'Clip skip')", "int",
                        min=1, max=12)


@dataclass(frozen=True)
class DatasetSection:
    path: Optional[str] = _f(None, "folder of images with .txt tag captions (searched recursively)", "path",
                             optional=True)
    caption_extension: str = _f(".txt", "caption file extension", "str")
    shuffle_tags: bool = _f(True, "shuffle comma-separated tags each time an image is used", "bool")
    keep_tokens: int = _f(0, "keep the first N tags in place when shuffling", "int", min=0, max=1000)
    tag_dropout: float = _f(0.0, "probability of dropping each tag", "float", min=0.0, max=1.0)
    caption_dropout: float = _f(0.0, "probability of training an image with an empty caption (ucg)", "float",
                                min=0.0, max=1.0)
    underscores_to_spaces: bool = _f(False, "write tags as 'long hair' instead of 'long_hair'", "bool")
    escape_brackets: bool = _f(False, "escape ( ) [ ] in tags, as WebUI prompts need "
                               "(e.g. 'kaguya \\(oshi no ko\\)')", "bool")
    max_chunks: int = _f(3, "75-token chunks per caption (3 = 225 tokens, like naifu)", "int", min=1, max=8)
    center_crop: bool = _f(False, "centre crop into the bucket (random crop when false)", "bool")
    repeats: int = _f(1, "times each image is used per epoch", "int", min=1, max=10000)
    num_workers: Optional[int] = _f(None, "data-loading worker processes (empty: auto, 0 on a CPU, up to 4 per GPU "
                                    "so image decoding overlaps the GPU)", "int", optional=True, min=0, max=64)


@dataclass(frozen=True)
class TrainingSection:
    batch_size: int = _f(1, "images per step per process", "int", min=1, max=4096)
    gradient_accumulation: int = _f(1, "steps accumulated per optimizer update", "int", min=1, max=4096)
    learning_rate: float = _f(5e-6, "peak learning rate of the UNet", "float", min=0.0, max=1.0)
    text_encoder_lr: Optional[float] = _f(None, "learning rate of the text encoder (default: learning_rate)",
                                          "float", optional=True, min=0.0, max=1.0)
    lr_scheduler: str = _f("constant", "learning-rate schedule after warm-up", "str",
                           choices=("constant", "cosine", "linear"))
    lr_warmup_steps: int = _f(0, "linear warm-up steps", "int", min=0, max=10**9)
    optimizer: str = _f("adamw", "adamw (torch, fused on a GPU), adamw8bit (bitsandbytes; the config check says when it "
                        "cannot run here) or adafactor (transformers', with this LR schedule)", "str",
                        choices=("adamw", "adamw8bit", "adafactor"))
    fused_backward: bool = _f(False, "step each parameter's optimizer as soon as its gradient is ready, so all "
                              "gradients never exist at once (needs gradient_accumulation 1, max_grad_norm 0, one "
                              "process)", "bool")
    weights: str = _f("fp32", "precision of the UNet's weights: fp32, or bf16 (updated in fp32 with stochastic "
                      "rounding; needs mixed_precision bf16; the EMA stays fp32)", "str", choices=("fp32", "bf16"))
    memory: str = _f("manual", "manual (the options as written), fast, lean (the least memory), or auto (the fastest "
                     "set that fits vram_gb, by the pre-flight estimate)", "str",
                     choices=("manual", "fast", "lean", "auto"))
    vram_gb: Optional[float] = _f(None, "GPU memory budget for memory: auto (empty: the free memory of the GPU)",
                                  "float", optional=True, min=0.5, max=10000.0)
    adam_beta1: float = _f(0.9, "AdamW beta1", "float", min=0.0, max=1.0)
    adam_beta2: float = _f(0.999, "AdamW beta2", "float", min=0.0, max=1.0)
    adam_epsilon: float = _f(1e-8, "AdamW epsilon", "float", min=0.0, max=1.0)
    weight_decay: float = _f(1e-2, "AdamW weight decay", "float", min=0.0, max=10.0)
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0: off)", "float", min=0.0, max=1e6)
    epochs: int = _f(10, "epochs to train (ignored when max_steps is set)", "int", min=1, max=10**6)
    max_steps: Optional[int] = _f(None, "optimizer steps to train (overrides epochs)", "int", optional=True, min=1,
                                  max=10**9)
    mixed_precision: str = _f("auto", "auto (bf16 where the GPU supports it, else fp16; none on a CPU), no, fp16 "
                              "or bf16", "str", choices=("auto", "no", "fp16", "bf16"))
    gradient_checkpointing: bool = _f(False, "trade compute for memory", "bool")
    attention: str = _f("sdpa", "sdpa (PyTorch scaled_dot_product_attention) or default", "str",
                        choices=("sdpa", "default"))
    train_text_encoder: bool = _f(False, "train the text encoder too", "bool")
    noise_offset: float = _f(0.0, "offset noise strength (0.0357-0.1 typical; 0: off)", "float", min=0.0, max=1.0)
    min_snr_gamma: Optional[float] = _f(None, "min-SNR loss weighting gamma (5 typical; empty: off)", "float",
                                        optional=True, min=0.0, max=1e6)
    seed: int = _f(42, "seed of everything (noise, shuffling, buckets)", "int", min=0, max=MAX_SEED)


@dataclass(frozen=True)
class EmaSection:
    enabled: bool = _f(True, "keep an exponential moving average of the UNet", "bool")
    decay: float = _f(0.999, "EMA decay per update", "float", min=0.0, max=1.0)
    device: str = _f("cpu", "cpu (saves VRAM) or accelerator (faster)", "str", choices=("cpu", "accelerator"))
    every_n_steps: int = _f(5, "update the EMA every N optimizer steps (a CPU EMA costs a copy of the UNet)", "int",
                            min=1, max=10**9)


@dataclass(frozen=True)
class LatentsSection:
    cache: str = _f("none", "none, memory or disk (disk: reused between runs)", "str",
                    choices=("none", "memory", "disk"))
    dir: Optional[str] = _f(None, "disk cache folder (default: RUNS_DIR/latent_cache, shared by runs)", "path",
                            optional=True)


@dataclass(frozen=True)
class TextCacheSection:
    """The frozen text encoder's outputs, computed once before training (then the encoder leaves the GPU)."""

    mode: str = _f("auto", "cache the frozen text encoder's outputs: none, memory, disk (disk: reused between runs) "
                   "or auto (as the latents under training.memory: lean, else none); needs a frozen text encoder "
                   "and no embeddings", "str", choices=("auto", "none", "memory", "disk"))
    variants: int = _f(8, "shuffled/dropped-out versions cached per caption (tag shuffle and tag dropout pick one "
                       "of them each epoch; 1 when the dataset does neither)", "int", min=1, max=256)
    dir: Optional[str] = _f(None, "disk cache folder (default: RUNS_DIR/text_cache, shared by runs)", "path",
                            optional=True)

    @property
    def enabled(self) -> bool:
        return self.mode in ("memory", "disk")


@dataclass(frozen=True)
class SavingSection:
    every_n_epochs: int = _f(1, "save every N epochs (0: off)", "int", min=0, max=10**6)
    every_n_steps: int = _f(0, "save every N steps (0: off)", "int", min=0, max=10**9)
    at_end: bool = _f(True, "save when training ends", "bool")
    on_stop: bool = _f(True, "save when stopped (signal or stop file)", "bool")
    precision: str = _f("fp16", "precision of the WebUI checkpoint", "str", choices=("fp16", "bf16", "fp32"))
    main_unet: str = _f("ema", "UNet of the WebUI checkpoint: ema (when EMA is on) or trained", "str",
                        choices=("ema", "trained"))
    ema_unet_fp32: bool = _f(True, "also write the EMA UNet in fp32 (for continued training)", "bool")
    diffusers: bool = _f(False, "also write a diffusers folder", "bool")
    keep_states: int = _f(2, "resumable training states kept (older ones are deleted)", "int", min=1, max=1000)
    keep_best: bool = _f(False, "keep the checkpoint with the lowest validation loss as NAME-best.safetensors "
                         "(needs validation)", "bool")


@dataclass(frozen=True)
class SamplingSection:
    prompts: Tuple[str, ...] = _f((), "prompts sampled during training", "strlist")
    negative_prompt: str = _f("lowres, bad anatomy, bad hands, text, error, worst quality, low quality",
                              "negative prompt", "str")
    every_n_steps: int = _f(0, "sample every N steps (0: only at saves)", "int", min=0, max=10**9)
    at_saves: bool = _f(True, "sample whenever a checkpoint is saved", "bool")
    steps: int = _f(20, "sampling steps", "int", min=1, max=150)
    cfg_scale: float = _f(7.0, "CFG scale", "float", min=0.0, max=100.0)
    seed: int = _f(1, "sampling seed", "int", min=0, max=MAX_SEED)
    width: Optional[int] = _f(None, "sample width (default: arb.base_res)", "int", optional=True, min=64, max=8192)
    height: Optional[int] = _f(None, "sample height (default: arb.base_res)", "int", optional=True, min=64,
                               max=8192)
    sampler: str = _f("Euler a", "sampler (Euler a)", "str", choices=("Euler a",))
    ema: bool = _f(True, "also sample with the EMA weights", "bool")

    def size(self, arb: ArbConfig) -> Tuple[int, int]:
        """(width, height) of the samples: the configured size, else the bucket base resolution."""
        return int(self.width or arb.base_res[0]), int(self.height or arb.base_res[1])

    def due(self, step: int, saved: bool) -> bool:
        """Whether to sample at `step` (`saved`: a checkpoint was just written)."""
        if not self.prompts:
            return False
        if saved and self.at_saves:
            return True
        return bool(self.every_n_steps) and step % self.every_n_steps == 0


@dataclass(frozen=True)
class ValidationSection:
    fraction: float = _f(0.0, "share of the dataset held out for validation, stratified by bucket (0: off)",
                         "float", min=0.0, max=0.5)
    path: Optional[str] = _f(None, "validation images instead of a fraction: a folder (images with captions) or a "
                             "list file of dataset images (one per line, relative to dataset.path)", "path",
                             optional=True)
    seed: int = _f(0, "seed of the split and of each image's fixed noise and timesteps", "int", min=0,
                   max=MAX_SEED)
    every_n_steps: int = _f(0, "validate every N steps (0: only at saves)", "int", min=0, max=10**9)
    at_saves: bool = _f(True, "validate whenever a checkpoint is saved", "bool")
    timesteps: int = _f(1, "fixed timesteps per image, one in each of that many quantiles of the noise schedule "
                        "(the cost grows with it: 4 costs about 4 times 1)", "int", min=1, max=64)
    max_images: int = _f(64, "at most this many validation images", "int", min=1, max=10000)
    early_stop_patience: int = _f(0, "stop (saving) after N evaluations without a lower validation loss (0: off)",
                                  "int", min=0, max=10**6)

    @property
    def enabled(self) -> bool:
        return self.fraction > 0 or bool(self.path)

    def due(self, step: int, saved: bool) -> bool:
        """Whether to validate at `step` (`saved`: a checkpoint is saved at this step)."""
        if not self.enabled:
            return False
        if saved and self.at_saves:
            return True
        return bool(self.every_n_steps) and step % self.every_n_steps == 0


@dataclass(frozen=True)
class LoggingSection:
    every_n_steps: int = _f(1, "write a step event every N steps", "int", min=1, max=10**9)
    tensorboard: bool = _f(True, "TensorBoard scalars in RUN_DIR/logs", "bool")
    progress_bar: str = _f("auto", "tqdm bar: auto (when a terminal), true, false", "str",
                           choices=("auto", "true", "false"))
    record_batches: bool = _f(False, "write each process's batches to RUN_DIR/batches-rankN.jsonl "
                              "(checks of the data order)", "bool")


@dataclass(frozen=True)
class AutoEmbeddings:
    """`embeddings.auto: {min_images: N}`: every mangled tag found in at least N images."""

    min_images: int = 5


@dataclass(frozen=True)
class EmbeddingsSection:
    tags: Tuple[str, ...] = _f((), "tags trained as textual-inversion embeddings with the model (`_` or space form; "
                               "the WebUI loads each as RUN_DIR/embeddings/<tag in space form>.safetensors)", "strlist")
    auto: Optional[AutoEmbeddings] = _f(None, "also every mangled tag in at least N images: {min_images: N}",
                                        "auto", optional=True)
    vectors: Optional[int] = _f(None, "vectors per embedding (empty: one per CLIP piece of the tag, initialised "
                                "from those pieces, so step 0 conditions as the plain caption; fewer: means of "
                                "neighbouring pieces)", "int", optional=True, min=1, max=75)
    init_text: str = _f("", "initialise every embedding from this text's tokens instead of the tag's own pieces",
                        "str")
    lr: float = _f(1e-3, "learning rate of the embeddings (AdamW, no weight decay)", "float", min=0.0, max=1.0)
    train_steps: int = _f(0, "train the embeddings for the first N steps only (0: throughout)", "int", min=0,
                          max=10**9)

    @property
    def enabled(self) -> bool:
        return bool(self.tags) or self.auto is not None


SECTIONS: Dict[str, type] = {
    "run": RunSection, "model": ModelSection, "dataset": DatasetSection, "arb": ArbConfig,
    "training": TrainingSection, "ema": EmaSection, "latents": LatentsSection,
    "text_cache": TextCacheSection, "saving": SavingSection,
    "sampling": SamplingSection, "validation": ValidationSection, "logging": LoggingSection,
    "embeddings": EmbeddingsSection,
}


@dataclass(frozen=True)
class RunConfig:
    """A complete, validated run config. Change it with `with_values` (it is frozen)."""

    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    dataset: DatasetSection = field(default_factory=DatasetSection)
    arb: ArbConfig = field(default_factory=ArbConfig)
    training: TrainingSection = field(default_factory=TrainingSection)
    ema: EmaSection = field(default_factory=EmaSection)
    latents: LatentsSection = field(default_factory=LatentsSection)
    text_cache: TextCacheSection = field(default_factory=TextCacheSection)
    saving: SavingSection = field(default_factory=SavingSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    embeddings: EmbeddingsSection = field(default_factory=EmbeddingsSection)
    version: int = CURRENT_VERSION

    def with_values(self, **sections: Mapping[str, Any]) -> "RunConfig":
        """A copy with some keys changed, e.g. `cfg.with_values(run={"runs_dir": d})` (not re-validated)."""
        changes = {sec: dataclasses.replace(getattr(self, sec), **dict(body)) for sec, body in sections.items()}
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        """Plain nested dict (lists, not tuples), sections in schema order, `version` first."""
        out: Dict[str, Any] = {"version": self.version}
        for sec in SECTIONS:
            body = getattr(self, sec)
            out[sec] = body.to_dict() if isinstance(body, ArbConfig) else {
                f.name: _plain(getattr(body, f.name)) for f in dataclasses.fields(body)}
        return out


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return list(value) if isinstance(value, tuple) else value


# ------------------------------------------------------------------------------------------------ schema


def spec(section: str, key: str) -> Spec:
    """The Spec of `section.key` (KeyError when there is none; `arb` keys have none: see buckets.parse_arb)."""
    for f in dataclasses.fields(SECTIONS[section]):
        if f.name == key and "spec" in f.metadata:
            return f.metadata["spec"]
    raise KeyError(f"{section}.{key}")


def section_keys(section: str) -> List[str]:
    if section == "arb":
        return list(ARB_KEYS)
    return [f.name for f in dataclasses.fields(SECTIONS[section])]


def defaults() -> Dict[str, Any]:
    """A complete config with every default, as a plain dict (model.base and dataset.path empty)."""
    out = RunConfig().to_dict()
    out.pop("version")
    return out


def field_defaults(section: str) -> Dict[str, Any]:
    return defaults()[section]


# ------------------------------------------------------------------------------------------------ values


def _nearest(name: str, options: List[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    if close:
        return f"did you mean '{close[0]}'?"
    return "valid keys: " + ", ".join(sorted(options))


def _number(value: Any, kind: str) -> Tuple[Any, Optional[str]]:
    if isinstance(value, str) and kind == "float":
        try:
            value = float(value)  # YAML 1.1 reads 5e-6 as a string
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None, f"expected a {'whole number' if kind == 'int' else 'number'}, got {value!r}"
    if not math.isfinite(value):
        return None, f"expected a finite number, got {value!r}"
    if kind == "int":
        if int(value) != value:
            return None, f"expected a whole number, got {value!r}"
        return int(value), None
    return float(value), None


def _text(value: Any, s: Spec) -> Tuple[Any, Optional[str]]:
    if isinstance(value, bool) and s.choices and str(value).lower() in s.choices:
        return str(value).lower(), None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and s.kind in ("str", "name"):
        value = str(value)
    if not isinstance(value, (str, os.PathLike)):
        return None, f"expected text, got {value!r}"
    value = os.fspath(value)
    if s.kind == "name":
        return value, _name_problem(value)
    return value, None


def _name_problem(value: str) -> Optional[str]:
    """A run name is a file-name part, never a path (`/tmp/x`, `../up` are refused)."""
    ok = value and len(value) <= 100 and all(c.isalnum() or c in "-_." for c in value) and value.strip(".")
    return None if ok else (f"{value!r} is not a run name: use 1-100 letters, digits, '-', '_' or '.' "
                            "(a name, not a path)")


def _coerce(s: Spec, default: Any, value: Any) -> Tuple[Any, Optional[str]]:
    """One value checked against its Spec: (normalised value, problem or None)."""
    if value is None:
        return (None, None) if (s.optional or default is None) else (default, f"must not be empty ({s.help})")
    if s.kind == "bool":
        if isinstance(value, bool):
            return value, None
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on"), None
        return default, f"expected true or false, got {value!r}"
    if s.kind in ("int", "float"):
        value, problem = _number(value, s.kind)
    elif s.kind == "auto":
        value, problem = _auto_embeddings(value)
    elif s.kind == "strlist":
        value = [value] if isinstance(value, str) else value
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        value, problem = (tuple(value), None) if ok else (None, f"expected a list of texts, got {value!r}")
    else:
        value, problem = _text(value, s)
    if problem:
        return default, problem
    return value, _limit_problem(s, value)


def _auto_embeddings(value: Any) -> Tuple[Any, Optional[str]]:
    """`{min_images: N}` (N >= 1) as AutoEmbeddings."""
    if isinstance(value, AutoEmbeddings):
        return value, None
    if not isinstance(value, Mapping) or set(value) - {"min_images"}:
        return None, f"expected {{min_images: N}}, got {value!r}"
    n, problem = _number(value.get("min_images", AutoEmbeddings.min_images), "int")
    if problem or n < 1:
        return None, f"min_images: {problem or f'{n} is below the minimum 1'}"
    return AutoEmbeddings(min_images=n), None


def _limit_problem(s: Spec, value: Any) -> Optional[str]:
    if s.choices is not None and value not in s.choices:
        return f"{value!r} is not one of {', '.join(map(str, s.choices))}"
    if s.min is not None and isinstance(value, (int, float)) and value < s.min:
        return f"{value} is below the minimum {s.min:g}"
    if s.max is not None and isinstance(value, (int, float)) and value > s.max:
        return f"{value} is above the maximum {s.max:g}"
    return None


# ------------------------------------------------------------------------------------------------ loading


MIGRATIONS: Dict[int, Callable[[Dict[str, Any]], Dict[str, Any]]] = {}
"""version N -> a function turning a raw version-N config into version N+1 (none yet: version 1 is the first
versioned format, and files without `version` are version 1)."""


def migrate(raw: Dict[str, Any], problems: List[str]) -> Dict[str, Any]:
    """Bring a raw config to CURRENT_VERSION (files written before `version` existed are version 1)."""
    raw = dict(raw)
    version = raw.pop("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        problems.append(f"version: expected a whole number >= 1, got {version!r}")
        return raw
    if version > CURRENT_VERSION:
        problems.append(f"version: {version} was written by a newer BP Train (this one reads up to "
                        f"{CURRENT_VERSION}); update BP Train")
        return raw
    while version < CURRENT_VERSION:
        raw = MIGRATIONS[version](raw)
        version += 1
    return raw


def _section(name: str, body: Any, problems: List[str]) -> Any:
    """One section's raw mapping as its dataclass (defaults for bad values; every problem appended)."""
    if body is None:
        body = {}
    if not isinstance(body, Mapping):
        problems.append(f"{name}: expected a mapping of keys, got {body!r}")
        body = {}
    if name == "arb":
        arb, found = parse_arb(body)
        problems.extend(found)
        return arb or ArbConfig()
    cls = SECTIONS[name]
    known = {f.name: f for f in dataclasses.fields(cls)}
    values: Dict[str, Any] = {}
    for key, value in body.items():
        if key not in known:
            other = [s for s in SECTIONS if s != name and str(key) in section_keys(s)]
            hint = f"it belongs in '{other[0]}.{key}'" if other else _nearest(str(key), list(known))
            problems.append(f"unknown key '{name}.{key}': {hint}")
            continue
        f = known[key]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        values[key], problem = _coerce(f.metadata["spec"], default, value)
        if problem:
            problems.append(f"{name}.{key}: {problem}")
    return cls(**values)


def _cross_checks(cfg: RunConfig, problems: List[str]) -> RunConfig:
    from bp_trainer.train.memory_plan import named_plan
    from bp_trainer.train.optim_spec import config_problems, spec_of

    if not cfg.ema.enabled and cfg.saving.main_unet == "ema":
        cfg = cfg.with_values(saving={"main_unet": "trained"})  # the default follows the EMA switch
    cfg = named_plan(cfg)  # training.memory: fast / lean set their options here (auto: in the trainer)
    if cfg.training.memory == "manual" and cfg.text_cache.mode == "auto":
        cfg = cfg.with_values(text_cache={"mode": "none"})
    if cfg.training.memory in ("manual", "fast", "lean"):
        problems.extend(config_problems(spec_of(cfg.training), world_size=cfg.run.num_processes,
                                        mixed_precision=cfg.training.mixed_precision))
    for key in ("width", "height"):
        value = getattr(cfg.sampling, key)
        if value is not None and value % 8:
            problems.append(f"sampling.{key}: {value} must be a multiple of 8")
    s = cfg.saving
    if s.every_n_epochs == 0 and s.every_n_steps == 0 and not s.at_end:
        problems.append("saving: every_n_epochs, every_n_steps and at_end are all off; the run would save nothing")
    problems.extend(_validation_problems(cfg))
    problems.extend(_text_cache_problems(cfg))
    if cfg.embeddings.tags:
        from bp_trainer.train.embeddings import tag_problems

        problems.extend(f"embeddings.tags: {p}" for p in tag_problems(cfg.embeddings.tags))
    return cfg


def _text_cache_problems(cfg: RunConfig) -> List[str]:
    if not cfg.text_cache.enabled:
        return []
    why = f"text_cache.mode: {cfg.text_cache.mode} caches the frozen text encoder's outputs"
    out = []
    if cfg.training.train_text_encoder:
        out.append(f"{why}, but training.train_text_encoder is on (set text_cache.mode: none or freeze the encoder)")
    if cfg.embeddings.enabled:
        out.append(f"{why}, but embeddings: trains tag vectors that change those outputs "
                   "(set text_cache.mode: none or remove embeddings:)")
    return out


def _validation_problems(cfg: RunConfig) -> List[str]:
    v = cfg.validation
    if v.fraction > 0 and v.path:
        return ["validation: give fraction or path, not both"]
    if not v.enabled:
        return [f"{key}: needs validation (set validation.fraction or validation.path)" for key, on in
                (("saving.keep_best", cfg.saving.keep_best),
                 ("validation.early_stop_patience", v.early_stop_patience)) if on]
    if not v.every_n_steps and not v.at_saves:
        return ["validation: every_n_steps is 0 and at_saves is off; it would never run"]
    return []


_PATH_KEYS = (("model", "base"), ("model", "vae"), ("dataset", "path"), ("run", "runs_dir"), ("latents", "dir"),
              ("text_cache", "dir"), ("run", "accelerate_config"), ("validation", "path"))


def _resolve_paths(cfg: RunConfig, base_dir: Path) -> RunConfig:
    changes: Dict[str, Dict[str, Any]] = {}
    for sec, key in _PATH_KEYS:
        value = getattr(getattr(cfg, sec), key)
        if isinstance(value, str) and value:
            p = Path(os.path.expanduser(value))
            changes.setdefault(sec, {})[key] = str(p if p.is_absolute() else (base_dir / p).resolve())
    return cfg.with_values(**changes)


def _path_problems(cfg: RunConfig) -> List[str]:
    from bp_trainer.train.base_check import base_model_problem

    problems = []
    base = cfg.model.base
    if not base:
        problems.append("model.base: missing (a WebUI .safetensors/.ckpt file or a diffusers folder)")
    elif not os.path.exists(base):
        problems.append(f"model.base: {base} does not exist")
    else:
        problem = base_model_problem(base)
        if problem:
            problems.append(f"model.base: {problem}")
    if cfg.model.vae and not os.path.exists(cfg.model.vae):
        problems.append(f"model.vae: {cfg.model.vae} does not exist")
    if not cfg.dataset.path:
        problems.append("dataset.path: missing (a folder of images with .txt captions)")
    elif not os.path.isdir(cfg.dataset.path):
        problems.append(f"dataset.path: {cfg.dataset.path} is not a folder")
    if cfg.run.accelerate_config and not os.path.isfile(cfg.run.accelerate_config):
        problems.append(f"run.accelerate_config: {cfg.run.accelerate_config} does not exist")
    if cfg.validation.path and not os.path.exists(cfg.validation.path):
        problems.append(f"validation.path: {cfg.validation.path} does not exist (a folder of images or a list file)")
    return problems


def _raise(problems: List[str], source: Any) -> None:
    n = len(problems)
    shown = problems[:MAX_LISTED_PROBLEMS]
    if n > len(shown):
        shown.append(f"... and {n - len(shown)} more")
    head = "invalid run config" + (f" ({n} problems)" if n > 1 else "")
    raise ConfigError(f"{head}: " + "; ".join(shown), path=source,
                      hint="see docs/training.md or `bp-train train --show-defaults`")


def validate(raw: Any, *, base_dir: "str | os.PathLike[str] | None" = None, check_paths: bool = True,
             source: "str | os.PathLike[str] | None" = None) -> RunConfig:
    """`raw` (a YAML mapping) checked and filled with defaults; one ConfigError lists every problem.

    Relative paths are resolved against `base_dir` (the config file's folder). With `check_paths`, the model
    and the dataset must exist, and the base model must be a full SD 1.x/2.x model (read from its header).
    """
    if raw is None:
        raw = {}
    if isinstance(raw, RunConfig):
        raw = raw.to_dict()
    if not isinstance(raw, Mapping):
        raise ConfigError("a run config must be a mapping of sections (model:, dataset:, training: ...)",
                          path=source)
    problems: List[str] = []
    raw = migrate(dict(raw), problems)
    sections: Dict[str, Any] = {}
    for sec, body in raw.items():
        if sec not in SECTIONS:
            problems.append(f"unknown section '{sec}': {_nearest(str(sec), list(SECTIONS))}")
        else:
            sections[sec] = _section(sec, body, problems)
    cfg = RunConfig(**sections)
    if not problems:
        cfg = _cross_checks(cfg, problems)
    cfg = _resolve_paths(cfg, Path(base_dir) if base_dir is not None else Path.cwd())
    if check_paths and not problems:
        problems.extend(_path_problems(cfg))
    if problems:
        _raise(problems, source)
    return cfg


def load_config(path: "str | os.PathLike[str]", *, check_paths: bool = True) -> RunConfig:
    """Read and validate a run YAML (relative paths are relative to the file)."""
    path = Path(path)
    return validate(read_yaml(path), base_dir=path.parent, check_paths=check_paths, source=path)


def read_yaml(path: Path) -> Any:
    """A YAML file's content; a missing, unreadable or invalid file is a ConfigError naming it — without ever
    quoting the file's content (it may not be a config at all)."""
    import yaml

    if not path.is_file():
        raise ConfigError("config file not found", path=path, hint="pass --config RUN.yaml")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError(f"cannot read the config ({reason})", path=path,
                          hint="save it as UTF-8 text and check its permissions") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML{yaml_error_where(exc)}", path=path) from None


def yaml_error_where(exc: Exception) -> str:
    """' at line L, column C' of a YAML parse error ('' when the parser does not say)."""
    mark = getattr(exc, "problem_mark", None)
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def dump_config(cfg: "RunConfig | Mapping[str, Any]") -> str:
    """YAML text of a config (sections in schema order; a plain dict is dumped as given, ordered)."""
    import yaml

    if isinstance(cfg, RunConfig):
        data = cfg.to_dict()
    else:
        data = {sec: {k: _plain((cfg.get(sec) or {}).get(k)) for k in section_keys(sec)} for sec in SECTIONS}
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=None)


def save_config(cfg: RunConfig, path: "str | os.PathLike[str]") -> None:
    from bp_trainer.fsutil import atomic_write_text

    atomic_write_text(path, dump_config(cfg))


# ------------------------------------------------------------------------------------------------ presets


def list_presets() -> List[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def preset(name: str) -> Dict[str, Any]:
    """A preset's raw sections (e.g. '768'): lay them under a config with `merge`."""
    import yaml

    path = PRESETS_DIR / f"{name}.yaml"
    if name not in list_presets():
        raise ConfigError(f"unknown preset '{name}'", hint=_nearest(name, list_presets()))
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def merge(base: Mapping[str, Any], override: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """A copy of raw config `base` with `override`'s sections/keys laid over it (one level deep)."""
    out = copy.deepcopy(dict(base))
    for sec, body in (override or {}).items():
        if isinstance(body, Mapping) and isinstance(out.get(sec), dict):
            out[sec].update(copy.deepcopy(dict(body)))
        else:
            out[sec] = copy.deepcopy(body)
    return out
