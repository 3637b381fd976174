"""Trainer overhead: images/s of the full BP Train trainer vs a bare diffusers training loop, same batches.

Both train the tiny SD-1.x-shaped model on CPU on the same bucketed batches of the sample dataset
(same images, sizes, batch size, optimizer). The full trainer adds everything it does per step:
DataLoader + bucket sampler, caption processing, clip skip / chunked text encoding, EMA, stop checks,
events.jsonl + TensorBoard logging. The bare loop is the inner loop of diffusers'
`train_text_to_image.py` (load, VAE encode, CLIP encode, noise, UNet, MSE, backward, AdamW).
Throughput is measured between the `warmup`-th and the last step (start-up excluded), `repeats` times
each, alternating, and the medians are compared.

    .venv/bin/python bench/bench_train_overhead.py [--steps 40] [--batch 4] [--repeats 3] [--out bench/out]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ARB = {"base_res": [128, 128], "max_size": [192, 128], "divisible": 32, "min_dim": 64, "dim_limit": 256}


def full_trainer(model: Path, data: Path, work: Path, steps: int, warmup: int, batch: int, seed: int) -> float:
    from bp_trainer.train import config as C
    from bp_trainer.train.events import read_all
    from bp_trainer.train.run import train

    cfg = C.validate({
        "run": {"name": "bench", "runs_dir": str(work)}, "model": {"base": str(model)},
        "dataset": {"path": str(data), "shuffle_tags": True, "center_crop": True},
        "arb": ARB, "training": {"batch_size": batch, "max_steps": warmup + steps, "seed": seed,
                                 "learning_rate": 1e-4},
        "ema": {"enabled": True, "decay": 0.999, "device": "cpu", "every_n_steps": 1},  # the costliest setting
        "saving": {"every_n_epochs": 0, "at_end": True, "every_n_steps": 0, "keep_states": 1},  # after the window
        "logging": {"tensorboard": True, "progress_bar": "false"},
    })
    run_dir = work / f"full-{time.time_ns()}"
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        train(cfg, run_dir, install_signals=False)
    times = {e["step"]: e["time"] for e in read_all(run_dir) if e["type"] == "step"}
    shutil.rmtree(run_dir, ignore_errors=True)
    return steps * batch / (times[warmup + steps] - times[warmup])


def batches(data: Path, steps: int, batch: int, seed: int):
    from bp_trainer.buckets import ArbConfig
    from bp_trainer.dataset import BucketBatchSampler, scan_dataset

    scan = scan_dataset(data)
    sampler = BucketBatchSampler.from_sizes([it.size for it in scan.items], ArbConfig.from_dict(ARB), batch,
                                            seed=seed, base_res=tuple(ARB["base_res"]))
    out, epoch = [], 0
    while len(out) < steps:
        for b in sampler.epoch_batches(epoch):
            out.append(([scan.items[i] for i in b.indices], b.size))
        epoch += 1
    return out[:steps]


def bare_loop(model: Path, data: Path, steps: int, warmup: int, batch: int, seed: int) -> float:
    """diffusers' train_text_to_image.py inner loop on the same bucketed batches."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from bp_trainer.dataset import load_image_for_bucket

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    vae = AutoencoderKL.from_pretrained(model / "vae")
    te = CLIPTextModel.from_pretrained(model / "text_encoder")
    tok = CLIPTokenizer.from_pretrained(model / "tokenizer")
    sched = DDPMScheduler.from_pretrained(model / "scheduler")
    vae.requires_grad_(False)
    te.requires_grad_(False)
    unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=1e-2)
    plan = batches(data, warmup + steps, batch, seed)
    start = None
    for n, (items, (w, h)) in enumerate(plan):
        if n == warmup:
            start = time.perf_counter()
        px = torch.stack([torch.from_numpy(np.asarray(load_image_for_bucket(it.path, (w, h), "center"),
                                                      dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1
                          for it in items])
        with torch.no_grad():
            latents = vae.encode(px).latent_dist.sample() * vae.config.scaling_factor
            ids = tok([it.caption for it in items], max_length=tok.model_max_length, padding="max_length",
                      truncation=True, return_tensors="pt").input_ids
            cond = te(ids, return_dict=False)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],))
        pred = unet(sched.add_noise(latents, noise, t), t, cond, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    assert start is not None
    return steps * batch / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    args = ap.parse_args()

    import torch

    from bp_trainer.dataset.demo import write_demo_dataset
    from bp_trainer.tiny_model import build_components, save_diffusers_folder

    work = Path(tempfile.mkdtemp(prefix="bp-bench-train-"))
    try:
        model = save_diffusers_folder(build_components(seed=0), work / "tiny-sd")
        data = work / "data"
        write_demo_dataset(data, count=args.images, seed=0)
        full, bare = [], []
        for r in range(args.repeats):  # alternate the order, so drift in machine load hits both alike
            order = [("bare", bare), ("full", full)] if r % 2 == 0 else [("full", full), ("bare", bare)]
            for kind, sink in order:
                if kind == "bare":
                    sink.append(bare_loop(model, data, args.steps, args.warmup, args.batch, args.seed))
                else:
                    sink.append(full_trainer(model, data, work, args.steps, args.warmup, args.batch, args.seed))
            print(f"repeat {r + 1}: bare {bare[-1]:.2f} img/s, full trainer {full[-1]:.2f} img/s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    f, b = statistics.median(full), statistics.median(bare)
    fb, bb = max(full), max(bare)  # best of the repeats: the least disturbed by other load on the machine
    result = {
        "what": "tiny SD-1.x model, CPU, bucketed batches of the sample dataset (128-px buckets)",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "steps": args.steps, "warmup": args.warmup, "batch": args.batch, "repeats": args.repeats,
        "bare_images_per_second": bare, "full_images_per_second": full,
        "bare_median": round(b, 3), "full_median": round(f, 3),
        "overhead_percent": round(100.0 * (b - f) / b, 2),
        "bare_best": round(bb, 3), "full_best": round(fb, 3),
        "overhead_percent_best": round(100.0 * (bb - fb) / bb, 2),
        "load_average": os.getloadavg(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_overhead.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
