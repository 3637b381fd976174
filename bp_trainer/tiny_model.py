"""A tiny, seeded Stable-Diffusion-1.x-shaped model for tests, benchmarks and the demo.

Same component classes and block structure as SD 1.x (cross-attention UNet, 4-level KL VAE with a
factor-8 latent, CLIP text encoder with the full 49408-token vocabulary and the real tokenizer), only
narrow: about 3-4 M parameters, so a training step takes milliseconds on a CPU. Built offline (no hub).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bp_trainer.clip_vocab import VOCAB_SIZE, write_tokenizer_files

UNET_CONFIG: dict[str, Any] = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)

VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=256,
)

TEXT_CONFIG: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_hidden_layers=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=32,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=1,
)

# SD 1.x noise schedule (the scheduler/scheduler_config.json of runwayml/stable-diffusion-v1-5).
SCHEDULER_CONFIG: dict[str, Any] = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    set_alpha_to_one=False,
    steps_offset=1,
    skip_prk_steps=True,
    trained_betas=None,
)


def build_components(seed: int = 0, vae_seed: int | None = None) -> dict[str, Any]:
    """unet, vae, text_encoder (fp32, eval mode) and scheduler, deterministically initialised."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    torch.manual_seed(seed + 1 if vae_seed is None else vae_seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    scheduler = PNDMScheduler.from_config(SCHEDULER_CONFIG)
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text_encoder.eval(), "scheduler": scheduler}


def save_diffusers_folder(components: dict[str, Any], out_dir: "str | os.PathLike[str]") -> Path:
    """Write a StableDiffusionPipeline-style diffusers folder (no safety checker) readable offline."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    components["unet"].save_pretrained(out / "unet")
    components["vae"].save_pretrained(out / "vae")
    components["text_encoder"].save_pretrained(out / "text_encoder")
    components["scheduler"].save_pretrained(out / "scheduler")
    write_tokenizer_files(out / "tokenizer")
    from bp_trainer.checkpoint.convert import write_pipeline_index

    write_pipeline_index(out)
    return out


def build_vae(seed: int):
    """A tiny AutoencoderKL alone (same config as in build_components), initialised from `seed`."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**VAE_CONFIG).eval()


def ema_perturbation(state_dict: dict[str, Any], seed: int, scale: float = 0.01) -> dict[str, Any]:
    """A seeded small perturbation of every floating tensor: stand-in EMA weights that differ from the UNet."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state_dict.items():
        if v.is_floating_point():
            out[k] = (v + scale * torch.randn(v.shape, generator=gen, dtype=v.dtype)).contiguous()
        else:
            out[k] = v
    return out


def save_webui_file(components: dict[str, Any], path: "str | os.PathLike[str]", *, ema_seed: int | None = 1234,
                    metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """Write the tiny model as a WebUI (LDM-layout) single `.safetensors`, with `model_ema.*` weights when
    `ema_seed` is not None (the UNet plus a seeded perturbation, so EMA promotion is observable)."""
    from bp_trainer.checkpoint.io import write_checkpoint
    from bp_trainer.checkpoint.ldm_keys import diffusers_to_ldm

    unet_sd = components["unet"].state_dict()
    ema = ema_perturbation(unet_sd, ema_seed) if ema_seed is not None else None
    sd = diffusers_to_ldm(
        unet_sd,
        components["vae"].state_dict(),
        components["text_encoder"].state_dict(),
        ema_unet=ema,
        scheduler_config=dict(components["scheduler"].config),
        ema_decay=0.9999,
        ema_num_updates=100,
    )
    meta = {"bp_model": "tiny-sd", "bp_configs": json.dumps(tiny_configs())}
    meta.update(metadata or {})
    return write_checkpoint(sd, path, meta)


def tiny_configs() -> dict[str, Any]:
    """diffusers configs of the tiny model (stored in its single files' metadata)."""
    return {"unet": dict(UNET_CONFIG), "vae": dict(VAE_CONFIG), "text_encoder": dict(TEXT_CONFIG),
            "scheduler": {"_class_name": "PNDMScheduler", **SCHEDULER_CONFIG}}
