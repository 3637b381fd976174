"""diffusers -> LDM (WebUI single-file) key mapping, written here because diffusers ships none for the full model.

Pure functions over key names (no diffusers import: the WebUI process uses this for baking diffusers VAEs
and exporting trained models). The block structure (levels, resnets per level, which up-levels carry
attention) is read from the diffusers key names themselves, so the same code maps SD 1.x/2.x and the
narrow tiny model. Proved by tests against the WebUI's key/shape fixture and LDM -> diffusers -> LDM round
trips (diffusers' own `single_file_utils` does the other direction).

LDM layout of a full checkpoint:
- UNet `model.diffusion_model.<ldm unet key>`; EMA copy `model_ema.<"diffusion_model." + key, dots removed>`
  plus `model_ema.decay` / `model_ema.num_updates` (LitEma buffers);
- VAE `first_stage_model.<ldm vae key>` (a standalone WebUI VAE file uses the same keys without prefix);
- SD 1.x text encoder `cond_stage_model.transformer.text_model.<transformers key>`; SD 2.x (1024 wide)
  `cond_stage_model.model.<OpenCLIP key>` with q/k/v fused into `in_proj_*`;
- the noise-schedule buffers of `LatentDiffusion.register_schedule` (`betas`, `alphas_cumprod`, ...).
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."  # + "text_model.<key>"
SD1_TEXT_PREFIX = TEXT_PREFIX + "text_model."
EMA_PREFIX = "model_ema."
EMA_BUFFERS = ("model_ema.decay", "model_ema.num_updates")
POSITION_IDS = SD1_TEXT_PREFIX + "embeddings.position_ids"

SCHEDULE_KEYS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


# ---------------------------------------------------------------------------------------------- EMA naming
def ema_key(ldm_unet_key: str) -> str:
    """`model.diffusion_model.X.Y` -> `model_ema.diffusion_modelXY` (LitEma drops the dots)."""
    if not ldm_unet_key.startswith(UNET_PREFIX):
        raise ValueError(f"not an LDM UNet key: {ldm_unet_key}")
    return EMA_PREFIX + ldm_unet_key[len("model.") :].replace(".", "")


def ema_key_map(ldm_unet_keys: Iterable[str]) -> dict[str, str]:
    """EMA name -> LDM UNet key, for the given UNet keys (EMA names alone are ambiguous: dots are gone)."""
    return {ema_key(k): k for k in ldm_unet_keys if k.startswith(UNET_PREFIX)}


# --------------------------------------------------------------------------------------------------- UNet
_UNET_RESNET = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _unet_structure(keys: Iterable[str]) -> tuple[int, int, set[int]]:
    """(levels, resnets per down level, up levels that have attention) from diffusers UNet key names."""
    down_res: dict[int, set[int]] = {}
    up_attn: set[int] = set()
    for k in keys:
        m = re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.", k)
        if m:
            down_res.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
        m = re.match(r"up_blocks\.(\d+)\.attentions\.", k)
        if m:
            up_attn.add(int(m.group(1)))
    if not down_res:
        raise KeyError("no down_blocks.*.resnets keys: not a diffusers UNet state dict")
    levels = max(down_res) + 1
    per_level = max(len(v) for v in down_res.values())
    return levels, per_level, up_attn


def unet_key_map(diffusers_keys: Iterable[str]) -> dict[str, str]:
    """diffusers UNet2DConditionModel key -> LDM key (with the `model.diffusion_model.` prefix)."""
    keys = list(diffusers_keys)
    levels, n, up_attn = _unet_structure(keys)
    out: dict[str, str] = {}
    for k in keys:
        out[k] = UNET_PREFIX + unet_key(k, n, up_attn)
    return out


def _resnet_inner(rest: str) -> str:
    for d, l in _UNET_RESNET:
        if rest == d or rest.startswith(d + "."):
            return l + rest[len(d) :]
    raise KeyError(rest)


def unet_key(k: str, layers_per_block: int, up_levels_with_attention: "set[int]") -> str:
    """One diffusers UNet key -> LDM key (without prefix). Attention internals keep their names."""
    n = layers_per_block
    for d, l in _UNET_TOP.items():
        if k.startswith(d + "."):
            return l + k[len(d) :]
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)$", k)
    if m:
        i, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        idx = 1 + i * (n + 1) + j
        return f"input_blocks.{idx}.0.{_resnet_inner(rest)}" if kind == "resnets" else f"input_blocks.{idx}.1.{rest}"
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)$", k)
    if m:
        i = int(m.group(1))
        return f"input_blocks.{1 + i * (n + 1) + n}.0.op.{m.group(2)}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)$", k)
    if m:
        kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
        return f"middle_block.{2 * j}.{_resnet_inner(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)$", k)
    if m:
        i, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        idx = i * (n + 1) + j
        return f"output_blocks.{idx}.0.{_resnet_inner(rest)}" if kind == "resnets" else f"output_blocks.{idx}.1.{rest}"
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)$", k)
    if m:
        i = int(m.group(1))
        sub = 2 if i in up_levels_with_attention else 1
        return f"output_blocks.{i * (n + 1) + n}.{sub}.conv.{m.group(2)}"
    raise KeyError(f"unknown diffusers UNet key: {k}")


# ---------------------------------------------------------------------------------------------------- VAE
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
             # older diffusers names
             "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}


def vae_key_map(diffusers_keys: Iterable[str]) -> dict[str, str]:
    """diffusers AutoencoderKL key -> LDM VAE key (no prefix; a checkpoint adds `first_stage_model.`)."""
    keys = list(diffusers_keys)
    up_levels = {int(m.group(1)) for k in keys for m in [re.match(r"decoder\.up_blocks\.(\d+)\.", k)] if m}
    n_up = max(up_levels) + 1 if up_levels else 0
    return {k: vae_key(k, n_up) for k in keys}


def vae_key(k: str, num_up_levels: int) -> str:
    if k.startswith(("quant_conv.", "post_quant_conv.")):
        return k
    m = re.match(r"(encoder|decoder)\.(.*)$", k)
    if not m:
        raise KeyError(f"unknown diffusers VAE key: {k}")
    side, rest = m.group(1), m.group(2)
    rest = rest.replace("conv_norm_out.", "norm_out.")
    m = re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$", rest)
    if m:
        rest = f"down.{m.group(1)}.block.{m.group(2)}.{m.group(3)}"
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.(.*)$", rest)
    if m:
        rest = f"down.{m.group(1)}.downsample.{m.group(2)}"
    m = re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$", rest)
    if m:
        rest = f"up.{num_up_levels - 1 - int(m.group(1))}.block.{m.group(2)}.{m.group(3)}"
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)$", rest)
    if m:
        rest = f"up.{num_up_levels - 1 - int(m.group(1))}.upsample.{m.group(2)}"
    m = re.match(r"mid_block\.resnets\.(\d+)\.(.*)$", rest)
    if m:
        rest = f"mid.block_{int(m.group(1)) + 1}.{m.group(2)}"
    m = re.match(r"mid_block\.attentions\.0\.(.*)$", rest)
    if m:
        inner = m.group(1)
        for d, l in _VAE_ATTN.items():
            if inner.startswith(d + "."):
                inner = l + inner[len(d) :]
                break
        else:
            raise KeyError(f"unknown diffusers VAE attention key: {k}")
        rest = f"mid.attn_1.{inner}"
    rest = re.sub(r"\.conv_shortcut\.", ".nin_shortcut.", rest)
    return f"{side}.{rest}"


def vae_needs_conv_shape(ldm_vae_key: str) -> bool:
    """LDM stores the VAE mid-attention q/k/v/proj_out as 1x1 convs; diffusers as linear layers."""
    return bool(re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", ldm_vae_key))


def vae_tensor_to_ldm(ldm_vae_key: str, tensor: Any) -> Any:
    if vae_needs_conv_shape(ldm_vae_key) and tensor.ndim == 2:
        return tensor.reshape(*tensor.shape, 1, 1)
    return tensor


def vae_shape_to_ldm(ldm_vae_key: str, shape: tuple) -> tuple:
    if vae_needs_conv_shape(ldm_vae_key) and len(shape) == 2:
        return tuple(shape) + (1, 1)
    return tuple(shape)


# ------------------------------------------------------------------------------------------- text encoder
def text_key(k: str) -> str:
    """transformers CLIPTextModel key (with or without `text_model.`, transformers 5 drops it) -> LDM key."""
    if k.startswith("text_model."):
        k = k[len("text_model.") :]
    return SD1_TEXT_PREFIX + k


def text_key_map(keys: Iterable[str]) -> dict[str, str]:
    out = {}
    for k in keys:
        if k.startswith(("text_projection.", "logit_scale")):
            continue  # CLIPModel heads, not part of CLIPTextModel / the LDM FrozenCLIPEmbedder
        out[k] = text_key(k)
    return out


SD2_TEXT_PREFIX = "cond_stage_model.model."
_OPENCLIP_LAYER = [("self_attn.out_proj.", "attn.out_proj."), ("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."),
                   ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj.")]


def is_openclip_width(text_keys_shapes: Mapping[str, Any]) -> bool:
    """SD 2.x text encoders (OpenCLIP ViT-H) are 1024 wide; SD 1.x CLIP ViT-L is 768."""
    for k, v in text_keys_shapes.items():
        if k.endswith("token_embedding.weight"):
            shape = tuple(v.shape) if hasattr(v, "shape") else tuple(v)
            return len(shape) == 2 and shape[1] == 1024
    return False


def openclip_key_plan(keys: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """LDM SD 2.x key (`cond_stage_model.model.*`) -> the transformers CLIPTextModel key(s) it is made of.

    q/k/v projections fuse into `attn.in_proj_weight`/`in_proj_bias` (concatenated in that order), the
    inverse of diffusers' `convert_open_clip_checkpoint`. Block 23 and `text_projection` of the original
    OpenCLIP-H are not in a (penultimate-layer) CLIPTextModel; the WebUI loads non-strictly and does not use them.
    """
    bare = {(k[len("text_model."):] if k.startswith("text_model.") else k): k for k in keys}
    out: dict[str, tuple[str, ...]] = {}
    simple = {"embeddings.token_embedding.weight": "token_embedding.weight",
              "embeddings.position_embedding.weight": "positional_embedding",
              "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    for b, k in bare.items():
        if b in simple:
            out[SD2_TEXT_PREFIX + simple[b]] = (k,)
            continue
        m = re.match(r"encoder\.layers\.(\d+)\.(.*)$", b)
        if not m:
            continue  # position_ids, text_projection, logit_scale
        i, rest = m.group(1), m.group(2)
        dst = f"{SD2_TEXT_PREFIX}transformer.resblocks.{i}."
        qkv = re.match(r"self_attn\.(q|k|v)_proj\.(weight|bias)$", rest)
        if qkv:
            if qkv.group(1) == "q":
                w = qkv.group(2)
                src = tuple(bare[f"encoder.layers.{i}.self_attn.{x}_proj.{w}"] for x in "qkv")
                out[dst + f"attn.in_proj_{w}"] = src
            continue
        for d, l in _OPENCLIP_LAYER:
            if rest.startswith(d):
                out[dst + l + rest[len(d):]] = (k,)
                break
    return out


def position_ids(max_positions: int = 77):
    import torch

    return torch.arange(max_positions, dtype=torch.int64).unsqueeze(0)


# ------------------------------------------------------------------------------------------ noise schedule
def schedule_buffers(scheduler_config: "Mapping[str, Any] | None" = None) -> dict:
    """The buffers `LatentDiffusion.register_schedule` saves, from a diffusers scheduler config.

    Computed the way LDM does (float64 numpy-equivalent, stored as float32). diffusers `scaled_linear`
    is LDM's `linear` (linspace of square roots, squared); `linear` is LDM's `sqrt_linear`.
    """
    import torch

    cfg = dict(scheduler_config or {})
    t = int(cfg.get("num_train_timesteps", 1000))
    b0 = float(cfg.get("beta_start", 0.00085))
    b1 = float(cfg.get("beta_end", 0.012))
    sched = cfg.get("beta_schedule", "scaled_linear")
    if cfg.get("trained_betas") is not None:
        betas = torch.tensor(cfg["trained_betas"], dtype=torch.float64)
    elif sched == "scaled_linear":
        betas = torch.linspace(b0**0.5, b1**0.5, t, dtype=torch.float64) ** 2
    elif sched == "linear":
        betas = torch.linspace(b0, b1, t, dtype=torch.float64)
    elif sched == "squaredcos_cap_v2":
        s = 0.008
        ts = torch.arange(t + 1, dtype=torch.float64) / t + s
        alphas = torch.cos(ts / (1 + s) * math.pi / 2).pow(2)
        alphas = alphas / alphas[0]
        betas = (1 - alphas[1:] / alphas[:-1]).clamp(max=0.999)
    else:
        raise ValueError(f"unsupported beta_schedule {sched!r}")
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, dim=0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    values = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - ac).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt(),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
    }
    return {k: values[k].to(torch.float32) for k in SCHEDULE_KEYS}


# ------------------------------------------------------------------------------------------- whole model
def diffusers_to_ldm(
    unet: "Mapping[str, Any] | None" = None,
    vae: "Mapping[str, Any] | None" = None,
    text_encoder: "Mapping[str, Any] | None" = None,
    *,
    ema_unet: "Mapping[str, Any] | None" = None,
    scheduler_config: "Mapping[str, Any] | None" = None,
    ema_decay: float = 0.9999,
    ema_num_updates: int = 0,
) -> dict:
    """diffusers state dicts -> one LDM (WebUI) state dict. Tensors are shared, not copied.

    UNet under `model.diffusion_model.`, VAE under `first_stage_model.` (attention weights reshaped to
    1x1 convs), text encoder under `cond_stage_model.transformer.text_model.` (+ `position_ids`), EMA under
    `model_ema.<key without dots>` with LitEma's `decay`/`num_updates`, and the noise-schedule buffers
    (from `scheduler_config`, SD 1.x defaults when None) whenever a UNet is given.
    """
    import torch

    out: dict = {}
    if unet is not None:
        for k, ldm in unet_key_map(unet.keys()).items():
            out[ldm] = unet[k]
        out.update(schedule_buffers(scheduler_config))
    if ema_unet is not None:
        for k, ldm in unet_key_map(ema_unet.keys()).items():
            out[ema_key(ldm)] = ema_unet[k]
        out["model_ema.decay"] = torch.tensor(ema_decay, dtype=torch.float32)
        out["model_ema.num_updates"] = torch.tensor(ema_num_updates, dtype=torch.int32)
    if vae is not None:
        for k, ldm in vae_key_map(vae.keys()).items():
            out[VAE_PREFIX + ldm] = vae_tensor_to_ldm(ldm, vae[k])
    if text_encoder is not None and is_openclip_width(text_encoder):
        for ldm, parts in openclip_key_plan(text_encoder.keys()).items():
            out[ldm] = torch.cat([text_encoder[p] for p in parts]) if len(parts) > 1 else text_encoder[parts[0]]
    elif text_encoder is not None:
        for k, ldm in text_key_map(text_encoder.keys()).items():
            out[ldm] = text_encoder[k]
        if POSITION_IDS not in out:
            emb = out.get(SD1_TEXT_PREFIX + "embeddings.position_embedding.weight")
            out[POSITION_IDS] = position_ids(int(emb.shape[0]) if emb is not None else 77)
    return out
