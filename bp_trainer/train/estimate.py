"""The pre-flight memory estimate of a run config: the TrainLoop's own `train_step` and `update`, on models built
empty from the base model's configs (read from its header or config files, no weights), at the largest bucket of the
config's `arb:` block and its batch size, optimizer, precision, checkpointing and caching, traced under torch's
`FakeTensorMode` (bp_trainer.train.memory): no GPU, nothing computed. Counted with memory.py's StorageTally, which
works on the trainer environment's torch 2.1 as on newer ones. torch's MemTracker (torch >= 2.5; `method="memtracker"`,
the benchmarks' cross-check) agrees with it (tests/test_train_estimate.py): it refuses frozen parameters, so the frozen
text encoder and VAE are held as buffers while it traces, and a module called twice in one step, so it cannot trace a
step whose VAE encodes a batch image by image (uncached latents, batch > 1).

    bp-train train --config run.yaml [--preset 1024] [--memory lean] --estimate-memory --json

A CPU EMA (the default) lives in host RAM and is left out; with latents cached the VAE, and with `text_cache` the
text encoder, are not on the GPU during the steps (the trainer encodes everything first, then moves them off). The
CUDA context, cuDNN/cuBLAS workspaces and allocator fragmentation are not in the estimate (see `MARGIN` in
memory_plan: 10 % is kept for them until GPU measurements calibrate it).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Tuple

import torch

from bp_trainer.train.config import RunConfig
from bp_trainer.train.family import TrainModels


def largest_bucket(cfg: RunConfig) -> Tuple[int, int]:
    """The bucket with the most pixels (the first of a tie, in naifu's order): the step's peak is there."""
    from bp_trainer.buckets import training_buckets

    buckets = training_buckets(cfg.arb)
    best = max(w * h for w, h in buckets)
    return next((int(w), int(h)) for w, h in buckets if w * h == best)


def model_configs(base: str) -> Dict[str, Any]:
    """diffusers configs (unet, vae, text_encoder, scheduler) of a base model, from headers and config files."""
    path = Path(base)
    if path.is_dir():
        return {part: json.loads((path / part / name).read_text(encoding="utf-8")) for part, name in
                (("unet", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json"),
                 ("scheduler", "scheduler_config.json")) if (path / part / name).is_file()}
    from bp_trainer.checkpoint.convert import model_configs as from_view, shipped_config
    from bp_trainer.checkpoint.io import open_file
    from bp_trainer.checkpoint.layout import ldm_view

    try:
        with open_file(path) as src:
            return from_view(ldm_view(src))
    except Exception:  # noqa: BLE001 - e.g. a header-only file: its architecture's shipped configs
        from bp_trainer.train.base_check import base_model_arch

        arch = base_model_arch(path)
        return shipped_config(arch if arch in ("sd1", "sd2") else "sd1")


def empty_models(configs: Dict[str, Any]) -> TrainModels:
    """Modules built from configs (random initialisation; under FakeTensorMode nothing is allocated)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from bp_trainer.clip_vocab import clip_tokenizer
    from bp_trainer.train.models import _ddpm_config

    def plain(cfg: Dict[str, Any]) -> Dict[str, Any]:
        return {k: v for k, v in cfg.items() if not k.startswith("_")}

    te_cfg = {k: v for k, v in plain(configs["text_encoder"]).items()
              if k not in ("architectures", "model_type", "transformers_version", "torch_dtype", "dtype")}
    text_encoder = CLIPTextModel(CLIPTextConfig(**te_cfg))
    sched = dict(configs.get("scheduler") or {})
    width = int(te_cfg.get("hidden_size", 768))
    return TrainModels(unet=UNet2DConditionModel.from_config(plain(configs["unet"])),
                       vae=AutoencoderKL.from_config(plain(configs["vae"])), text_encoder=text_encoder,
                       tokenizer=clip_tokenizer(), noise_scheduler=DDPMScheduler.from_config(_ddpm_config(sched)),
                       prediction_type=str(sched.get("prediction_type") or "epsilon"), scheduler_config=sched,
                       arch="sd2" if width == 1024 else "sd1")


class _Accelerator:
    """What the TrainLoop asks of accelerate, for one process on the traced device."""

    def __init__(self, mixed_precision: str):
        self.mixed_precision = mixed_precision
        self.device = torch.device("cpu")  # the fake device standing in for CUDA (see memory.py)
        self.is_main_process, self.process_index, self.num_processes = True, 0, 1
        self.state = SimpleNamespace(deepspeed_plugin=None)

    def autocast(self) -> Any:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mixed_precision)
        return torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()

    def prepare(self, *objects: Any) -> Any:
        return objects if len(objects) > 1 else objects[0]

    def unwrap_model(self, model: Any) -> Any:
        return model

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm_(self, params: List[torch.Tensor], max_norm: float) -> Any:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


class _CachedLatents:
    """A latent cache that has every latent: the step runs without the VAE, as a cached run does."""

    def __init__(self, shape: Tuple[int, ...]):
        self.shape = shape

    def get(self, key: str) -> torch.Tensor:
        return torch.zeros(self.shape)


class _CachedText:
    """A text cache that has every caption: the step runs without the text encoder, as a cached run does."""

    def __init__(self, cfg: RunConfig, width: int, dtype: torch.dtype):
        self.shape, self.dtype = (int(cfg.dataset.max_chunks) * 77, width), dtype

    def conditioning(self, texts: List[str], device: torch.device) -> torch.Tensor:
        return torch.zeros((len(texts),) + self.shape, dtype=self.dtype, device=device)


def _batch(cfg: RunConfig, bucket: Tuple[int, int], cached: bool) -> Dict[str, Any]:
    """The largest batch the config can make: its batch size at the largest bucket, captions of every chunk."""
    n, (w, h) = int(cfg.training.batch_size), bucket
    caption = ", ".join(f"tag{i}" for i in range(40 * int(cfg.dataset.max_chunks)))  # fills every 75-token chunk
    pixels = [None] * n if cached else [torch.zeros(3, h, w) for _ in range(n)]
    return {"index": list(range(n)), "caption": [caption] * n, "pixels": pixels,
            "cache_key": ["latent"] * n if cached else [None] * n, "size": (w, h)}


def estimate_run(cfg: RunConfig, *, method: str = "tally") -> Dict[str, Any]:
    """Peak tensor memory of one training step of `cfg` on its GPU, and what it consists of (JSON-able)."""
    from bp_trainer.train.loop import TrainLoop
    from bp_trainer.train.memory import Traced, estimate_peak

    mixed = "bf16" if cfg.training.mixed_precision == "auto" else cfg.training.mixed_precision
    cfg = cfg.with_values(ema={"enabled": cfg.ema.enabled and cfg.ema.device == "accelerator"})
    bucket, cached, text_cached = largest_bucket(cfg), cfg.latents.cache != "none", cfg.text_cache.enabled
    configs = model_configs(cfg.model.base)
    latent = (int(configs["unet"].get("in_channels", 4)), bucket[1] // 8, bucket[0] // 8)

    def build(device: torch.device) -> Traced:
        events = SimpleNamespace(emit=lambda *a, **k: None)
        loop = TrainLoop(cfg, tempfile.gettempdir(), _Accelerator(mixed), events, stop=None)
        loop.configure_models(empty_models(configs))
        loop.accum, loop.total_steps, loop.step = 1, 1000, 0
        loop.cache = _CachedLatents(latent) if cached else None
        width = int(getattr(loop.models.text_encoder.config, "hidden_size", 768))
        loop.text_cache = _CachedText(cfg, width, loop.weight_dtype) if text_cached else None
        loop.generator = torch.Generator("cpu").manual_seed(0)  # (the tally drops it: torch 2.1's fake ops refuse one)
        loop._setup_optimizer()
        resident = ((loop.models.unet,) + (() if text_cached else (loop.models.text_encoder,))
                    + (() if cached else (loop.models.vae,)))
        return Traced(modules=resident, optimizer=loop.optimizer, payload=(loop, _batch(cfg, bucket, cached)))

    def step(traced: Traced) -> None:
        loop, batch = traced.payload
        loop.set_lr()
        loop.train_step(batch)
        loop.update()

    est = estimate_peak(build, step, method=method)
    t = cfg.training
    return {"peak_bytes": est.peak_bytes, "peak_gib": round(est.peak_bytes / 2**30, 2), "bucket": list(bucket),
            "batch_size": int(t.batch_size), "parts": est.to_dict()["parts"], "method": est.method,
            "options": {"optimizer": t.optimizer, "fused_backward": t.fused_backward, "weights": t.weights,
                        "gradient_checkpointing": t.gradient_checkpointing, "mixed_precision": mixed,
                        "latents_cached": cached, "text_cached": text_cached, "train_text_encoder": t.train_text_encoder,
                        "attention": t.attention, "ema_on_gpu": cfg.ema.enabled},
            "notes": list(est.notes) + (["mixed_precision auto: estimated as bf16 (a GPU of compute capability 8+)"]
                                        if cfg.training.mixed_precision == "auto" else [])}
