"""What validation adds to a demo-sized run: the demo's config (`python -m bp_trainer demo`: the tiny SD-1.x-shaped
model, the 48-image sample dataset, 128-px buckets, batch 4, EMA every step, saves with samples every 2 epochs and
at the end) trained for the same number of steps without and with `validation: {fraction: 0.1}` (every other
validation key at its default: at saves, 1 timestep per image, trained and EMA weights). The run without
validation trains on the dataset minus the images the other run holds out, so both train the same images, buckets
and steps.

Two figures, from `repeats` alternating pairs of runs (medians):
- direct: the time the `validation` events report (`seconds`, the first one including the VAE encoding of the
  held-out images) over the wall time of the run with validation;
- A/B: the wall time of the run with validation over the one without, minus 1 (noisier: two runs on a shared
  machine).

    .venv/bin/python bench/bench_validation.py [--steps 40] [--repeats 3] [--threads N] [--out bench/out]
"""

from __future__ import annotations

import argparse
import contextlib
import io
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


def one_run(work: Path, steps: int, validation: bool, extra: "dict | None" = None) -> dict:
    """Train the demo config for `steps` steps in this process; wall time and the validation events' time."""
    from bp_trainer.commands.demo import demo_config
    from bp_trainer.train import config as C
    from bp_trainer.train.events import read_all
    from bp_trainer.train.run import train

    raw = C.merge(demo_config(work, epochs=4, max_steps=steps, num_processes=1),
                  {"logging": {"tensorboard": False, "progress_bar": "false"}})
    if validation:
        raw = C.merge(raw, {"validation": {"fraction": 0.1, **(extra or {})}})
    else:
        raw = C.merge(raw, {"dataset": {"path": str(work / "train-only")}})
    cfg = C.validate(raw)
    run_dir = work / "runs" / f"{'val' if validation else 'base'}-{time.time_ns()}"
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        train(cfg, run_dir, install_signals=False)
    wall = time.perf_counter() - started
    events = read_all(run_dir)
    vals = [e for e in events if e["type"] == "validation"]
    start = next(e for e in events if e["type"] == "start")
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"wall": wall, "validation_seconds": sum(e["seconds"] for e in vals), "evaluations": len(vals),
            "held_out": len(start.get("validation_images") or []), "train_images": start["images"],
            "per_evaluation": [e["seconds"] for e in vals]}


def prepare(work: Path, images: int) -> None:
    """The demo's model and dataset in WORK, and WORK/train-only: the dataset without the images validation holds
    out (hard links), so the run without validation trains exactly the same images, buckets and steps."""
    from bp_trainer.commands.demo import demo_config
    from bp_trainer.dataset import CaptionProcessor, scan_dataset
    from bp_trainer.dataset.demo import write_demo_dataset
    from bp_trainer.tiny_model import build_components, save_webui_file
    from bp_trainer.train import config as C
    from bp_trainer.train.validation import build_validation_set

    save_webui_file(build_components(seed=0), work / "model" / "tiny-sd.safetensors", ema_seed=None)
    write_demo_dataset(work / "dataset", count=images, seed=0)
    cfg = C.validate(C.merge(demo_config(work, epochs=4, max_steps=1, num_processes=1),
                             {"validation": {"fraction": 0.1}}))
    held = build_validation_set(cfg, scan_dataset(work / "dataset"), CaptionProcessor()).excluded
    for image in (work / "dataset").rglob("*"):
        if image.suffix != ".txt" and image.is_file() and os.path.realpath(image) not in held:
            for f in (image, image.with_suffix(".txt")):
                target = work / "train-only" / f.relative_to(work / "dataset")
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(f, target)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--timesteps", type=int, default=0, help="validation.timesteps (0: the default)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    args = ap.parse_args()

    import torch

    from bp_trainer.train import config as C

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bp-bench-val-"))
    base, val = [], []
    try:
        prepare(work, args.images)
        for r in range(args.repeats):  # alternate the order, so drift in machine load hits both alike
            for with_val in ((False, True) if r % 2 == 0 else (True, False)):
                extra = {"timesteps": args.timesteps} if args.timesteps else {}
                (val if with_val else base).append(one_run(work, args.steps, with_val, extra))
            print(f"repeat {r + 1}: without {base[-1]['wall']:.1f} s, with {val[-1]['wall']:.1f} s "
                  f"(validation {val[-1]['validation_seconds']:.2f} s in {val[-1]['evaluations']} evaluations)",
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    direct = [100.0 * v["validation_seconds"] / v["wall"] for v in val]
    ab = [100.0 * (v["wall"] / b["wall"] - 1.0) for v, b in zip(val, base)]
    result = {
        "what": "the demo config for --steps steps, without and with validation: {fraction: 0.1}",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "steps": args.steps, "repeats": args.repeats, "images": args.images,
        "timesteps": args.timesteps or C.ValidationSection().timesteps,
        "held_out": val[0]["held_out"], "train_images": val[0]["train_images"],
        "evaluations": val[0]["evaluations"], "per_evaluation_seconds": [v["per_evaluation"] for v in val],
        "wall_without": [round(b["wall"], 2) for b in base], "wall_with": [round(v["wall"], 2) for v in val],
        "validation_seconds": [round(v["validation_seconds"], 3) for v in val],
        "direct_percent_median": round(statistics.median(direct), 2),
        "ab_percent_median": round(statistics.median(ab), 2),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "validation.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
