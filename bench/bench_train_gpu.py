"""GPU training benchmark: full-size SD 1.5 architecture (random weights), BPModel's 768/1024 buckets.

For each case: images/s and peak VRAM (torch.cuda.max_memory_allocated) of one training step of
  - `bp`: BP Train's step (bucket resolution, clip skip 2 with two 75-token chunks, bf16 autocast with fp32
    master weights, SDPA, AdamW, EMA of the UNet on the CPU every `--ema-every` steps, gradient clipping);
  - `bare`: the settings of diffusers' reference `train_text_to_image.py` (square base_res, no buckets, no EMA,
    77-token prompt, bf16 mixed precision, SDPA, AdamW),
at batch 1 and 4, with and without gradient checkpointing. The target is 1024-bucket training at batch 1
in under 16 GB. Runs unattended on a CUDA machine and writes `OUT/train_gpu.json` and `OUT/train_gpu.md`;
a case that runs out of memory is recorded as OOM. `--tiny` runs the same code on the tiny model on the
CPU with small buckets (a check of the script, not a measurement).

    python bench/bench_train_gpu.py [--steps 10] [--warmup 3] [--out bench/out] [--tiny]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CAPTION = ", ".join(["1girl", "solo", "long hair", "looking at viewer", "smile", "blue eyes", "school uniform",
                     "outdoors", "cherry blossoms", "masterpiece", "best quality"] * 5)  # ~2 chunks


def build(tiny: bool):
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from bp_trainer.clip_vocab import clip_tokenizer

    if tiny:
        from bp_trainer.tiny_model import SCHEDULER_CONFIG, build_components

        c = build_components(seed=0)
        unet, vae, te = c["unet"], c["vae"], c["text_encoder"]
        sched = DDPMScheduler.from_config({k: v for k, v in SCHEDULER_CONFIG.items() if k != "skip_prk_steps"})
    else:
        from bp_trainer.checkpoint.convert import shipped_config

        cfg = shipped_config("sd1")
        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_config({k: v for k, v in cfg["unet"].items() if not k.startswith("_")})
        vae = AutoencoderKL.from_config({k: v for k, v in cfg["vae"].items() if not k.startswith("_")})
        te = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in cfg["text_encoder"].items()
                                             if k not in ("architectures", "model_type")}))
        sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return unet, vae, te, clip_tokenizer(), sched


def buckets_for(preset: str, tiny: bool) -> Dict[str, List[int]]:
    """The square bucket and the bucket with the most pixels of a preset's `arb:` block."""
    from bp_trainer.buckets import ArbConfig, generate_buckets
    from bp_trainer.train.config import preset as load_preset

    arb = dict(load_preset(preset)["arb"])
    if tiny:
        scale = {"768": 128, "1024": 192}[preset]
        arb.update(base_res=[scale, scale], max_size=[scale * 3 // 2, scale], divisible=32, min_dim=64,
                   dim_limit=scale * 2)
    buckets = generate_buckets(ArbConfig.from_dict(arb))
    largest = max(buckets, key=lambda b: (b[0] * b[1], b[0]))
    return {"square": list(arb["base_res"]), "largest": list(largest)}


def run_case(models, *, mode: str, size: List[int], batch: int, checkpointing: bool, steps: int, warmup: int,
             ema_every: int, device: str) -> Dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from bp_trainer.train.ema import EMA
    from bp_trainer.train.models import encode_captions
    from bp_trainer.train.run import diffusion_loss

    unet, vae, te, tok, sched = models
    cuda = device == "cuda"
    amp = torch.bfloat16 if cuda else torch.float32
    unet.to(device, torch.float32).train()
    unet.requires_grad_(True)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    vae.to(device, amp)
    te.to(device, amp)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-6, weight_decay=1e-2)
    ema = EMA(unet, decay=0.9999, device="cpu") if mode == "bp" else None
    gen = torch.Generator("cpu").manual_seed(0)
    w, h = size
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = None
    try:
        for n in range(warmup + steps):
            if n == warmup:
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
            px = torch.rand((batch, 3, h, w), generator=gen).mul_(2).sub_(1).to(device, amp)
            with torch.no_grad():
                latents = vae.encode(px).latent_dist.sample().float() * vae.config.scaling_factor
            with torch.autocast(device_type=device, dtype=amp, enabled=cuda):
                if mode == "bp":
                    with torch.no_grad():
                        cond = encode_captions(te, tok, [CAPTION] * batch, clip_skip=2, max_chunks=3)
                    loss = diffusion_loss(unet, sched, latents, cond, gen, noise_offset=0.0, min_snr_gamma=None,
                                          v_prediction=False)
                else:
                    ids = tok([CAPTION] * batch, max_length=77, padding="max_length", truncation=True,
                              return_tensors="pt").input_ids.to(device)
                    with torch.no_grad():
                        cond = te(ids, return_dict=False)[0]
                    noise = torch.randn_like(latents)
                    t = torch.randint(0, 1000, (batch,), device=device)
                    pred = unet(sched.add_noise(latents, noise, t.cpu()).to(device), t, cond).sample
                    loss = F.mse_loss(pred.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if ema is not None and (n + 1) % ema_every == 0:
                ema.update(unet)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start  # type: ignore[operator]
        out = {"images_per_second": round(steps * batch / elapsed, 3), "status": "ok"}
        if cuda:
            out["peak_vram_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        return out
    except torch.cuda.OutOfMemoryError if cuda else MemoryError:  # type: ignore[misc]
        return {"status": "OOM", "peak_vram_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}
    finally:
        unet.zero_grad(set_to_none=True)  # an OOM leaves gradients behind: free them for the next case
        del opt, ema
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def markdown(result: Dict[str, Any]) -> str:
    lines = [f"# Training throughput and peak VRAM ({result['device']})", "",
             f"{result['what']}. Steps timed: {result['steps']} after {result['warmup']} warm-up steps.", "",
             "| mode | preset | bucket | batch | grad ckpt | images/s | peak VRAM GiB | status |",
             "|---|---|---|---|---|---|---|---|"]
    for c in result["cases"]:
        lines.append(f"| {c['mode']} | {c['preset']} | {c['size'][0]}x{c['size'][1]} | {c['batch']} | "
                     f"{'on' if c['checkpointing'] else 'off'} | {c.get('images_per_second', '-')} | "
                     f"{c.get('peak_vram_gib', '-')} | {c['status']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--ema-every", type=int, default=5, help="EMA update interval of the bp mode (CPU EMA)")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--presets", default="768,1024", help="bucket presets to measure")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU (checks the script)")
    args = ap.parse_args()

    import torch

    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here; run with --tiny to check the script on the CPU", file=sys.stderr)
        return 2
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    models = build(args.tiny)
    cases = []
    batches = [int(b) for b in args.batches.split(",")]
    for preset in args.presets.split(","):
        b = buckets_for(preset, args.tiny)
        for mode, size in (("bp", b["largest"]), ("bp", b["square"]), ("bare", b["square"])):
            for batch in batches:
                for ckpt in (True, False):
                    case = {"mode": mode, "preset": preset, "size": size, "batch": batch, "checkpointing": ckpt}
                    case.update(run_case(models, mode=mode, size=size, batch=batch, checkpointing=ckpt,
                                         steps=args.steps, warmup=args.warmup, ema_every=args.ema_every,
                                         device=device))
                    print(json.dumps(case), flush=True)
                    cases.append(case)
    name = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({platform.machine()}, tiny model)"
    result = {"what": ("tiny SD-1.x-shaped model, CPU (script check, not a measurement)" if args.tiny else
                       "SD 1.5 architecture, random weights, bf16 autocast + fp32 master weights, SDPA, AdamW"),
              "device": name, "torch": torch.__version__, "steps": args.steps, "warmup": args.warmup,
              "ema_every": args.ema_every, "cases": cases}
    target = [c for c in cases if c["preset"] == "1024" and c["mode"] == "bp" and c["batch"] == 1
              and c["checkpointing"] and c["size"] == buckets_for("1024", args.tiny)["largest"]]
    if target and device == "cuda":
        result["target_1024_batch1_under_16GB"] = target[0].get("status") == "ok" and target[0]["peak_vram_gib"] < 16
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_gpu.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    (out / "train_gpu.md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
