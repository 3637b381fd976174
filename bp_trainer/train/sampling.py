"""Sample images during training (Euler a) and save them with a WebUI infotext in the PNG.

The prompt is encoded exactly as in training (clip skip, 75-token chunks), so samples show what the
WebUI will produce with the same settings. Each PNG carries a `parameters` text chunk in the WebUI's
format (`prompt\\nNegative prompt: ...\\nSteps: 20, Sampler: Euler a, ...`), so PNG Info reads it and
"Send to txt2img" reproduces the sample in the WebUI with the saved checkpoint.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from bp_trainer.infotext import quote
from bp_trainer.train.models import encode_captions, pad_to_same_length

def infotext(prompt: str, negative_prompt: str, params: Dict[str, Any]) -> str:
    """`prompt\\nNegative prompt: neg\\nKey: value, ...` (None values left out), as WebUI's create_infotext."""
    fields = ", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    neg = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{neg}\n{fields}"


def sample(*, unet: Any, vae: Any, text_encoder: Any, tokenizer: Any, scheduler_config: Dict[str, Any],
           prompts: List[str], negative_prompt: str, steps: int, cfg_scale: float, seed: int, width: int,
           height: int, clip_skip: int, max_chunks: int, out_dir: Path, stem: str, extra: Dict[str, Any],
           autocast: Any = None) -> List[Dict[str, Any]]:
    """Render one image per prompt (seeds seed, seed+1, ...) and save PNGs with infotext; returns records."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline
    from PIL.PngImagePlugin import PngInfo

    sched_cfg = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    scheduler = EulerAncestralDiscreteScheduler.from_config(sched_cfg)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    was_training = unet.training
    unet.eval()
    try:
        with torch.no_grad(), (autocast or contextlib.nullcontext)():
            neg_emb = encode_captions(text_encoder, tokenizer, [negative_prompt], clip_skip=clip_skip,
                                      max_chunks=max_chunks)
            empty = encode_captions(text_encoder, tokenizer, [""], clip_skip=clip_skip, max_chunks=1)
            for i, prompt in enumerate(prompts):
                emb = encode_captions(text_encoder, tokenizer, [prompt], clip_skip=clip_skip, max_chunks=max_chunks)
                emb, neg = pad_to_same_length(emb, neg_emb, empty)
                generator = torch.Generator("cpu").manual_seed(seed + i)
                image = pipe(prompt_embeds=emb, negative_prompt_embeds=neg, height=height, width=width,
                             num_inference_steps=steps, guidance_scale=cfg_scale, generator=generator).images[0]
                params = {"Steps": steps, "Sampler": "Euler a", "Schedule type": "Automatic",
                          "CFG scale": f"{cfg_scale:g}", "Seed": seed + i, "Size": f"{width}x{height}"}
                params.update(extra)
                params["Clip skip"] = clip_skip if clip_skip > 1 else None
                params["Version"] = "BP Train"
                text = infotext(prompt, negative_prompt, params)
                info = PngInfo()
                info.add_text("parameters", text)
                path = out_dir / f"{stem}-{i:02d}.png"
                tmp = path.with_name(f".{path.name}.partial")
                image.save(tmp, format="PNG", pnginfo=info)
                tmp.replace(path)
                records.append({"path": str(path), "prompt": prompt, "seed": seed + i, "parameters": text})
    finally:
        unet.train(was_training)
    return records


def sample_size(cfg: Dict[str, Any]) -> "tuple[int, int]":
    s = cfg["sampling"]
    base = cfg["arb"]["base_res"]
    return int(s["width"] or base[0]), int(s["height"] or base[1])


def should_sample(cfg: Dict[str, Any], step: int, saved: bool) -> bool:
    s = cfg["sampling"]
    if not s["prompts"]:
        return False
    if saved and s["at_saves"]:
        return True
    return bool(s["every_n_steps"]) and step % s["every_n_steps"] == 0


def model_hash_params(files: Optional[Dict[str, Dict[str, Any]]]) -> Dict[str, Any]:
    if not files or "webui" not in files:
        return {}
    rec = files["webui"]
    return {"Model hash": rec["autov2"], "Model": Path(rec["path"]).stem}
