"""Load the base model for training and encode captions the way the WebUI does.

- `load_base(cfg)`: a diffusers folder or a WebUI single file (through `bp_trainer.checkpoint`) ->
  unet, vae, text_encoder, tokenizer, a DDPMScheduler for the training noise, and the prediction type
  (v-prediction detected from the scheduler config, or forced by `model.v_prediction`).
- `tokenize_chunks`: the WebUI's 75-token chunking (the dataset module's `chunk_token_ids`: a full chunk
  breaks after the last comma within 20 tokens, like `comma_padding_backtrack`); `encode_captions(...)` wraps each chunk in
  BOS ... EOS + padding to 77, runs the text encoder on every chunk, takes the hidden state of the
  `clip_skip`-th last layer followed by the final layer norm (WebUI "Clip skip"; naifu does the same), and
  concatenates the chunks: (batch, 77 * chunks, dim). Captions in a batch are padded to the same number
  of chunks with empty chunks, as the WebUI pads cond/uncond.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Dict, Sequence

import torch

from bp_trainer.errors import BPError

CHUNK = 75
COMMA_TOKEN = 267  # ",</w>"
BACKTRACK = 20


def tokenize_chunks(tokenizer: Any, captions: Sequence[str], max_chunks: int) -> torch.Tensor:
    """Token ids (batch, chunks, 77): BOS + chunk + EOS + padding, batch padded to the same chunk count.

    Chunking is the dataset module's `chunk_token_ids` (WebUI rules, comma back-off within 20 tokens).
    """
    from bp_trainer.dataset.captions import chunk_token_ids, pad_chunks

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    encoded = tokenizer(list(captions), add_special_tokens=False, truncation=False).input_ids
    per_caption = [chunk_token_ids(ids, bos, eos, pad, CHUNK, max_chunks, comma=COMMA_TOKEN, backtrack=BACKTRACK)
                   for ids in encoded]
    n = max(len(c) for c in per_caption)
    return torch.tensor([pad_chunks(c, n, bos, eos, pad) for c in per_caption], dtype=torch.long)


def encode_tokens(text_encoder: Any, tokens: torch.Tensor, clip_skip: int) -> torch.Tensor:
    """Hidden states (batch, chunks*77, dim) of token chunks (batch, chunks, 77) with WebUI clip skip."""
    b, n, length = tokens.shape
    weight = next(itertools.chain(text_encoder.parameters(), text_encoder.buffers()))  # (a traced estimate holds
    flat = tokens.reshape(b * n, length).to(weight.device)                               # frozen weights as buffers)
    if clip_skip <= 1:
        hidden = text_encoder(flat, return_dict=True).last_hidden_state
    else:
        out = text_encoder(flat, output_hidden_states=True, return_dict=True)
        hidden = out.hidden_states[-clip_skip]
        inner = getattr(text_encoder, "module", text_encoder)  # a DDP-wrapped encoder (trained, several GPUs)
        ln = getattr(getattr(inner, "text_model", inner), "final_layer_norm")
        # LayerNorm.forward itself, called as a function: the module already ran inside the encoder, and torch's
        # MemTracker (the memory estimate's cross-check) refuses a module called twice in one step
        hidden = torch.nn.functional.layer_norm(hidden, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
    return hidden.reshape(b, n * length, hidden.shape[-1])


def encode_captions(text_encoder: Any, tokenizer: Any, captions: Sequence[str], *, clip_skip: int,
                    max_chunks: int, embeddings: Any = None) -> torch.Tensor:
    """Conditioning of captions; with `embeddings` (a `TagEmbeddings`) their tags read as trained vectors."""
    if embeddings is None or not embeddings.plans:
        return encode_tokens(text_encoder, tokenize_chunks(tokenizer, captions, max_chunks), clip_skip)
    from bp_trainer.train.embedding_text import tokenize_with_embeddings, vectors_inserted

    tokens = tokenize_with_embeddings(tokenizer, captions, max_chunks, embeddings.lookup, comma=COMMA_TOKEN,
                                      backtrack=BACKTRACK)
    with vectors_inserted(text_encoder, tokens.fixes, embeddings):
        return encode_tokens(text_encoder, tokens.ids, clip_skip)


def pad_to_same_length(a: torch.Tensor, b: torch.Tensor, empty: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor]":
    """Pad two (batch, k*77, dim) conditionings with copies of an empty chunk until they are as long."""
    while a.shape[1] < b.shape[1]:
        a = torch.cat([a, empty.expand(a.shape[0], -1, -1)], dim=1)
    while b.shape[1] < a.shape[1]:
        b = torch.cat([b, empty.expand(b.shape[0], -1, -1)], dim=1)
    return a, b


def load_base(model: Any) -> Dict[str, Any]:
    """unet, vae, text_encoder, tokenizer, noise_scheduler (DDPM), prediction_type of `model.base` (`model`:
    the config's model section).

    A diffusers folder or a WebUI single file (SD 1.x/2.x), through `bp_trainer.checkpoint`. Weights are
    loaded in fp32 (the trainer keeps fp32 master weights; mixed precision is autocast).
    """
    from diffusers import DDPMScheduler

    from bp_trainer.checkpoint.convert import load_diffusers_components

    base = Path(model.base)
    if not base.exists():
        raise BPError("base model not found", path=base, hint="a WebUI .safetensors/.ckpt file or a diffusers folder")
    setting = model.v_prediction
    forced = None if setting == "auto" else ("v_prediction" if setting == "true" else "epsilon")
    parts = load_diffusers_components(base, prediction_type=forced)
    unet, vae, text_encoder = parts["unet"].float(), parts["vae"].float(), parts["text_encoder"].float()
    tokenizer = parts.get("tokenizer") or _load_tokenizer(None)
    sched = parts.get("scheduler")
    scheduler_config = {k: v for k, v in dict(sched.config).items()} if sched is not None else {}
    scheduler_config["_class_name"] = type(sched).__name__ if sched is not None else "PNDMScheduler"
    vae_path = model.vae
    if vae_path:
        vae = _load_vae(Path(vae_path), vae)
    prediction_type = forced or scheduler_config.get("prediction_type") or "epsilon"
    noise_scheduler = DDPMScheduler.from_config(_ddpm_config(scheduler_config))
    noise_scheduler.register_to_config(prediction_type=prediction_type)
    scheduler_config["prediction_type"] = prediction_type
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "noise_scheduler": noise_scheduler, "prediction_type": prediction_type,
            "scheduler_config": scheduler_config}


def _ddpm_config(config: Dict[str, Any]) -> Dict[str, Any]:
    keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
            "steps_offset", "timestep_spacing", "rescale_betas_zero_snr")
    out = {k: config[k] for k in keep if k in config}
    out.setdefault("num_train_timesteps", 1000)
    out.setdefault("beta_start", 0.00085)
    out.setdefault("beta_end", 0.012)
    out.setdefault("beta_schedule", "scaled_linear")
    out["clip_sample"] = False
    return out


def _load_tokenizer(path: "Path | None") -> Any:
    from transformers import CLIPTokenizer

    if path is not None and ((path / "vocab.json").exists() or (path / "tokenizer.json").exists()):
        try:
            return CLIPTokenizer.from_pretrained(path)
        except (OSError, ValueError):
            pass
    from bp_trainer.clip_vocab import clip_tokenizer

    return clip_tokenizer()


def _load_vae(path: Path, current: Any) -> Any:
    """A VAE folder (diffusers) or a WebUI VAE file (models/VAE layout), shaped like the base's VAE."""
    from diffusers import AutoencoderKL

    if path.is_dir():
        return AutoencoderKL.from_pretrained(path if (path / "config.json").exists() else path / "vae").float()
    from bp_trainer.checkpoint.io import open_file
    from bp_trainer.checkpoint.ldm_keys import vae_key_map, vae_tensor_to_ldm

    src = open_file(path)
    try:
        tensors = {k: src.get(k) for k in src.keys()}
    finally:
        src.close()
    expected = current.state_dict()
    mapping = vae_key_map(expected.keys())  # diffusers name -> LDM name
    prefixed = any(k.startswith("first_stage_model.") for k in tensors)
    state = {}
    for dk, ldm in mapping.items():
        key = ("first_stage_model." + ldm) if prefixed else ldm
        if key not in tensors:
            raise BPError(f"VAE file lacks {key}", path=path, hint="a WebUI VAE (.safetensors/.pt) for this model")
        t = tensors[key]
        state[dk] = t.reshape(expected[dk].shape).float() if t.numel() == expected[dk].numel() else t
    current.load_state_dict(state)
    return current
