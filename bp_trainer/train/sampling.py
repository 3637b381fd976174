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
           autocast: Any = None, decoder: Any = None, embeddings: Any = None) -> List[Dict[str, Any]]:
    """Render one image per prompt (seeds seed, seed+1, ...) and save PNGs with infotext; returns records.

    The UNet runs under `autocast`; the latents are decoded outside it by `decoder` (an fp32 VAE; default
    `vae`), since fp16 decoding gives black images with NaN-prone VAEs. `embeddings`: the run's tag embeddings,
    read in the prompts (and the negative prompt) as the WebUI reads loaded textual inversions.
    """
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    sched_cfg = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    scheduler = EulerAncestralDiscreteScheduler.from_config(sched_cfg)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    decoder = decoder if decoder is not None else vae
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    was_training = unet.training
    unet.eval()
    try:
        with torch.no_grad():
            with (autocast or contextlib.nullcontext)():
                neg_emb = encode_captions(text_encoder, tokenizer, [negative_prompt], clip_skip=clip_skip,
                                          max_chunks=max_chunks, embeddings=embeddings)
                empty = encode_captions(text_encoder, tokenizer, [""], clip_skip=clip_skip, max_chunks=1)
            for i, prompt in enumerate(prompts):
                with (autocast or contextlib.nullcontext)():
                    emb = encode_captions(text_encoder, tokenizer, [prompt], clip_skip=clip_skip,
                                          max_chunks=max_chunks, embeddings=embeddings)
                    emb, neg = pad_to_same_length(emb, neg_emb, empty)
                    generator = torch.Generator("cpu").manual_seed(seed + i)
                    latents = pipe(prompt_embeds=emb, negative_prompt_embeds=neg, height=height, width=width,
                                   num_inference_steps=steps, guidance_scale=cfg_scale, generator=generator,
                                   output_type="latent").images
                image = decode_image(decoder, latents)
                params = {"Steps": steps, "Sampler": "Euler a", "Schedule type": "Automatic",
                          "CFG scale": f"{cfg_scale:g}", "Seed": seed + i, "Size": f"{width}x{height}"}
                params.update(extra)
                params["Clip skip"] = clip_skip if clip_skip > 1 else None
                params["Version"] = "BP Train"
                records.append(_save_png(image, prompt, negative_prompt, params, out_dir / f"{stem}-{i:02d}.png",
                                         seed + i))
    finally:
        unet.train(was_training)
    return records


def decode_image(vae: Any, latents: torch.Tensor) -> Any:
    """The first latent as a PIL image, decoded in fp32 outside autocast."""
    from PIL import Image

    with torch.autocast(device_type=latents.device.type, enabled=False):
        lat = latents[:1].to(vae.device, torch.float32) / float(vae.config.scaling_factor)
        pixels = vae.decode(lat).sample[0].float()
    array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def _save_png(image: Any, prompt: str, negative_prompt: str, params: Dict[str, Any], path: Path,
              seed: int) -> Dict[str, Any]:
    from PIL.PngImagePlugin import PngInfo

    text = infotext(prompt, negative_prompt, params)
    info = PngInfo()
    info.add_text("parameters", text)
    tmp = path.with_name(f".{path.name}.partial")
    image.save(tmp, format="PNG", pnginfo=info)
    tmp.replace(path)
    return {"path": str(path), "prompt": prompt, "seed": seed, "parameters": text}


def sample_run(loop: Any, files: Optional[Dict[str, Dict[str, Any]]]) -> None:
    """A TrainLoop's samples at its current step: trained weights, and the EMA's when on; one event each."""
    cfg, models = loop.cfg, loop.models
    sc = cfg.sampling
    w, h = sc.size(cfg.arb)
    variants: List[Any] = [("trained", contextlib.nullcontext())]
    if loop.ema is not None and sc.ema:
        variants.append(("ema", loop.ema.swapped_into(loop.raw_unet)))
    main_kind = cfg.saving.main_unet if loop.ema is not None else "trained"
    decoder = fp32_vae(models.vae, loop.frozen_originals.get("vae"))
    for kind, ctx in variants:
        with ctx:
            extra = dict(model_hash_params(files) if kind == main_kind else {},
                         **{"BP step": loop.step, "BP weights": kind})
            recs = sample(unet=loop.raw_unet, vae=models.vae, text_encoder=loop.acc.unwrap_model(loop.text_encoder),
                          tokenizer=models.tokenizer, scheduler_config=models.scheduler_config,
                          prompts=list(sc.prompts), negative_prompt=sc.negative_prompt, steps=sc.steps,
                          cfg_scale=sc.cfg_scale, seed=sc.seed, width=w, height=h, clip_skip=loop.clip_skip,
                          max_chunks=int(cfg.dataset.max_chunks), out_dir=loop.rd.samples,
                          stem=f"s{loop.step:06d}-{kind}", extra=extra, autocast=loop.acc.autocast,
                          decoder=decoder, embeddings=loop.tag_embeddings)
        for r in recs:
            loop.events.emit("sample", step=loop.step, epoch=loop.epoch, path=r["path"], prompt=r["prompt"],
                             ema=kind == "ema", parameters=r["parameters"], decoded="fp32")


def fp32_vae(vae: Any, originals: Optional[Dict[str, torch.Tensor]]) -> Any:
    """The VAE to decode samples with: the training one when it is fp32, else an fp32 copy of its weights as
    loaded (on the same device)."""
    if vae.dtype == torch.float32 or not originals:
        return vae
    from bp_trainer.train.saving import cpu_copy

    return cpu_copy(vae, originals).to(vae.device).eval()


def model_hash_params(files: Optional[Dict[str, Dict[str, Any]]]) -> Dict[str, Any]:
    if not files or "webui" not in files:
        return {}
    rec = files["webui"]
    return {"Model hash": rec["autov2"], "Model": Path(rec["path"]).stem}
