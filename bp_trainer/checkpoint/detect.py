"""What kind of model a file holds, from its key names and shapes alone (pure; no torch, WebUI-safe).

`detect_layout(shapes)` -> (kind, layout); `detect_arch(shapes, layout)` -> `sd1`|`sd2`|`sdxl`|`unknown`.
Used by `layout.describe` (the `inspect` report) and by the run-config check of a base model, which reads
only a file's header.
"""

from __future__ import annotations

from typing import Mapping

from bp_trainer.checkpoint import ldm_keys as lk

SDXL_MARKERS = ("conditioner.embedders.", "model.diffusion_model.label_emb.0.0.weight")
SD2_TEXT_PREFIX = "cond_stage_model.model."


def has_prefix(keys, *prefixes) -> bool:
    return any(k.startswith(prefixes) for k in keys)


def detect_layout(shapes: Mapping[str, tuple]) -> tuple[str, str]:
    """(kind, layout) of a flat key -> shape mapping."""
    keys = list(shapes)
    if has_prefix(keys, "conditioner.embedders."):
        return "checkpoint", "sgm"
    unet = has_prefix(keys, lk.UNET_PREFIX)
    vae = has_prefix(keys, lk.VAE_PREFIX)
    te = has_prefix(keys, "cond_stage_model.")
    ema = has_prefix(keys, lk.EMA_PREFIX)
    if unet and (vae or te):
        return "checkpoint", "ldm"
    if unet or (ema and not vae and not te):
        return "unet", "ldm"
    if vae and not te:
        return "vae", "ldm"
    if te and not vae:
        return "text_encoder", "ldm"
    if vae and te:
        return "checkpoint", "ldm"
    if "input_blocks.0.0.weight" in shapes or "diffusion_model.input_blocks.0.0.weight" in shapes:
        return "unet", "ldm-bare"
    if has_prefix(keys, "encoder.down.", "decoder.up.") and has_prefix(keys, "quant_conv.", "post_quant_conv.", "decoder."):
        return "vae", "ldm-bare"
    if has_prefix(keys, "encoder.down_blocks.", "decoder.up_blocks."):
        return "vae", "diffusers"
    if has_prefix(keys, "down_blocks.") and has_prefix(keys, "time_embedding."):
        return "unet", "diffusers"
    if has_prefix(keys, "text_model.embeddings.", "embeddings.token_embedding.") :
        return "text_encoder", "transformers"
    return "unknown", "unknown"


def context_dim(shapes: Mapping[str, tuple]) -> "int | None":
    for k, s in shapes.items():
        if k.endswith(("attn2.to_k.weight", "attn2to_kweight")) and len(s) == 2:  # EMA names lose their dots
            return int(s[1])
    return None


def detect_arch(shapes: Mapping[str, tuple], layout: str) -> str:
    """`sd1`, `sd2`, `sdxl` or `unknown`. SD-1.x-shaped models of other widths (the tiny model) are `sd1`."""
    keys = list(shapes)
    if layout == "sgm" or any(k in shapes for k in SDXL_MARKERS) or has_prefix(keys, "conditioner."):
        return "sdxl"
    ctx = context_dim(shapes)
    if ctx in (2048, 1280):
        return "sdxl"
    if ctx == 1024 or has_prefix(keys, SD2_TEXT_PREFIX):
        return "sd2"
    if ctx == 768:
        return "sd1"
    for k, s in shapes.items():  # text encoders alone
        if k.endswith("token_embedding.weight") and len(s) == 2:
            return {1024: "sd2", 1280: "sdxl"}.get(int(s[1]), "sd1")
    if has_prefix(keys, "model.", "first_stage_model.", "encoder.", "decoder.", "down_blocks.", "input_blocks.",
            "cond_stage_model.", "diffusion_model.", "model_ema."):
        return "sd1"
    return "unknown"


