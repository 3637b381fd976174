"""`bp-train demo [--out DIR]`: a complete short bucketed fine-tune of the tiny model on CPU.

Generates what is missing under DIR (the tiny model with `demo-model`'s writer, the sample dataset with
`demo-dataset`'s), writes `DIR/demo.yaml`, trains it in a child `accelerate launch` process exactly as
`train` does (buckets, EMA, latent cache, samples, checkpoints), and prints where the WebUI-loadable
checkpoint is. The run folder (events.jsonl, checkpoints, samples, state) stays under DIR/runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict

from bp_trainer.rundir import RunDir


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo", help="demo folder (default ./demo)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs to train (default 4)")
    parser.add_argument("--max-steps", type=int, help="stop after this many steps (overrides --epochs)")
    parser.add_argument("--images", type=int, default=48, help="sample dataset size when it is generated")
    parser.add_argument("--num-processes", type=int, default=1, help="data-parallel processes (CPU: gloo)")
    parser.add_argument("--foreground", action="store_true", help="train in this process")
    parser.add_argument("--json", action="store_true")


def demo_config(out: Path, *, epochs: int, max_steps: "int | None", num_processes: int) -> Dict[str, Any]:
    return {
        "run": {"name": "demo", "runs_dir": str(out / "runs"), "num_processes": num_processes},
        "model": {"base": str(out / "model" / "tiny-sd.safetensors"), "clip_skip": 2},
        "dataset": {"path": str(out / "dataset"), "shuffle_tags": True, "keep_tokens": 1, "caption_dropout": 0.05},
        "arb": {"enabled": True, "base_res": [128, 128], "max_size": [192, 128], "divisible": 32,
                "max_ar_error": 4, "min_dim": 64, "dim_limit": 256},
        "training": {"batch_size": 4, "learning_rate": 2.0e-4, "lr_scheduler": "cosine", "lr_warmup_steps": 2,
                     "epochs": epochs, "max_steps": max_steps, "seed": 42, "noise_offset": 0.05,
                     "min_snr_gamma": 5.0},
        "ema": {"enabled": True, "decay": 0.99, "device": "cpu", "every_n_steps": 1},
        "latents": {"cache": "memory"},
        "saving": {"every_n_epochs": 2, "at_end": True, "precision": "fp16", "main_unet": "ema"},
        "sampling": {"prompts": ["1girl, solo, red_background", "2girls, striped_background"], "steps": 8,
                     "cfg_scale": 6.0, "seed": 1, "width": 128, "height": 128},
        "logging": {"tensorboard": True},
    }


def run(args: argparse.Namespace) -> int:
    import yaml

    from bp_trainer import launcher
    from bp_trainer.cli import emit
    from bp_trainer.errors import BPError
    from bp_trainer.train.config import load_config
    from bp_trainer.train.events import read_all

    out = Path(args.out).resolve()
    model_file = out / "model" / "tiny-sd.safetensors"
    if not model_file.exists():
        print(f"writing the tiny model to {out / 'model'}", file=sys.stderr, flush=True)
        from bp_trainer.tiny_model import build_components, save_diffusers_folder, save_webui_file

        components = build_components(seed=0)
        save_diffusers_folder(components, out / "model" / "tiny-sd")
        save_webui_file(components, model_file, ema_seed=None)
    data_dir = out / "dataset"
    if not data_dir.is_dir() or not any(data_dir.rglob("*.txt")):
        print(f"drawing the sample dataset in {data_dir}", file=sys.stderr, flush=True)
        from bp_trainer.dataset.demo import write_demo_dataset

        write_demo_dataset(data_dir, count=args.images, seed=0)
    if args.epochs < 1 or (args.max_steps is not None and args.max_steps < 1):
        raise BPError("--epochs and --max-steps must be at least 1")
    cfg_path = out / "demo.yaml"
    raw = demo_config(out, epochs=args.epochs, max_steps=args.max_steps, num_processes=args.num_processes)
    cfg_path.write_text("# BP Train demo run (bp-train demo)\n" + yaml.safe_dump(raw, sort_keys=False),
                        encoding="utf-8")
    cfg = load_config(cfg_path)
    if args.foreground:
        from bp_trainer.train.run import train

        run_dir = launcher.prepare_run(cfg)
        train(cfg, run_dir)
        code = 0
    else:
        handle = launcher.start_run(cfg, log_to_file=False)
        run_dir = handle.run_dir
        print(f"run folder: {run_dir}", file=sys.stderr, flush=True)
        try:
            code = handle.wait()
        except KeyboardInterrupt:
            launcher.request_stop(run_dir)
            code = handle.wait()
    done = [e for e in read_all(run_dir) if e.get("type") == "done"]
    outputs = done[-1].get("outputs", {}) if done else {}
    result = {"run_dir": str(run_dir), "config": str(cfg_path), "exit_code": code,
              "webui_checkpoint": outputs.get("webui"), "ema_unet": outputs.get("ema_unet"),
              "samples": str(RunDir(run_dir).samples), "events": str(RunDir(run_dir).events)}
    emit(result, args.json, lambda r: "\n".join([
        f"run folder: {r['run_dir']}",
        f"WebUI-loadable checkpoint: {r['webui_checkpoint']}",
        f"EMA UNet (fp32): {r['ema_unet']}",
        f"samples: {r['samples']}",
        f"progress log: {r['events']}",
    ]))
    return code
