"""Peak tensor memory of one SD 1.5 UNet training step for each optimizer / update mode (estimates, no GPU).

For the 768 and 1024 presets' largest buckets (`bp_trainer.buckets` from the presets' `arb:` blocks) at batch 1
and 4, and the 1024x1024 image (128x128 latent) the issue's orientation figures used: the full-size SD 1.5 UNet
(diffusers UNet2DConditionModel with `checkpoint/configs/sd1.json`, 859.5 M parameters, no weights), gradient
checkpointing, bf16 autocast, one steady-state step (optimizer states created first) of
`memory.unet_training_step` (noise, UNet forward, MSE loss, backward, optimizer step) traced by
`memory.estimate_peak` (FakeTensorMode + MemTracker, or the StorageTally fallback). UNet only: the VAE and
text encoder, CUDA context, workspaces and allocator fragmentation are not in these figures.

    .venv/bin/python bench/bench_train_memory.py [--out results.jsonl] [--method auto|memtracker|tally]
        [--only SUBSTRING ...] [--reproduce] [--table results.jsonl]

Each estimate takes about 2 minutes on 2 cores (MemTracker; the tally is faster). Results are appended to
--out as JSON lines as they finish; a rerun skips the ones already there. --table prints the markdown table.
AdamW8bit needs bitsandbytes importable (for the fake run a CPU install is enough); without it the row says so.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

GiB = 2 ** 30
MODES = {  # label -> (OptimizerSpec keyword arguments, bf16 weights)
    "AdamW fp32 (baseline)": {},
    "AdamW8bit": {"name": "adamw8bit"},
    "Adafactor": {"name": "adafactor"},
    "Adafactor + fused backward": {"name": "adafactor", "fused_backward": True, "max_grad_norm": 0.0},
    "Adafactor + fused backward + bf16 weights": {"name": "adafactor", "fused_backward": True, "max_grad_norm": 0.0,
                                                  "weights": "bf16"},
}
ORIENTATION = ("AdamW fp32 (baseline)", "Adafactor + fused backward")
FOREACH_ADAMW = "AdamW fp32, torch foreach"  # the orientation run: torch.optim.AdamW(foreach=True)


def largest_bucket(preset: str) -> "tuple[int, int]":
    import yaml

    from bp_trainer.buckets import ArbConfig, generate_buckets

    text = (ROOT / "bp_trainer" / "train" / "presets" / f"{preset}.yaml").read_text(encoding="utf-8")
    buckets = generate_buckets(ArbConfig.from_dict(yaml.safe_load(text)["arb"]))
    return max(buckets, key=lambda b: b[0] * b[1])  # the first of the largest area (ties have equal pixels)


def cases(reproduce: bool = False) -> "list[dict]":
    if reproduce:  # the figures: the FIRST step (no optimizer states yet during forward/backward)
        return [{"preset": "1024x1024", "bucket": [1024, 1024], "batch": 1, "mode": m, "first_step": True}
                for m in (FOREACH_ADAMW, ORIENTATION[1])]
    out = [{"preset": "1024x1024", "bucket": [1024, 1024], "batch": 1, "mode": m} for m in ORIENTATION]
    for batch in (1, 4):
        for preset in ("1024", "768"):
            w, h = largest_bucket(preset)
            out += [{"preset": preset, "bucket": [w, h], "batch": batch, "mode": m} for m in MODES]
    return out


def estimate(case: dict, method: str) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    from bp_trainer.checkpoint.convert import shipped_config
    from bp_trainer.train import memory
    from bp_trainer.train.optim import build_optimizer, check_available
    from bp_trainer.train.optim_spec import OptimizerSpec

    spec = OptimizerSpec(**MODES.get(case["mode"], {}))
    problem = check_available(spec, "cpu")
    if problem:
        return {**case, "skipped": problem}
    config = {k: v for k, v in shipped_config("sd1")["unet"].items() if not k.startswith("_")}
    w, h = case["bucket"]

    def build(device):
        unet = UNet2DConditionModel(**config).to(device)
        unet.enable_gradient_checkpointing()
        if spec.weights == "bf16":
            unet.to(torch.bfloat16)
        unet.train()
        groups = [{"params": list(unet.parameters()), "lr": 5e-6}]
        opt = torch.optim.AdamW(groups, foreach=True) if case["mode"] == FOREACH_ADAMW else \
            build_optimizer(groups, spec, device)
        batch = memory.make_unet_batch(config, case["batch"], (h // 8, w // 8), device)
        return memory.Traced(modules=(unet,), optimizer=opt, payload=batch)

    def step(traced):
        return memory.unet_training_step(traced.modules[0], traced.optimizer, traced.payload,
                                         autocast_dtype=torch.bfloat16)

    t0 = time.perf_counter()
    est = memory.estimate_peak(build, step, method=method, prime_optimizer=not case.get("first_step"))
    return {**case, **est.to_dict(), "seconds": round(time.perf_counter() - t0, 1), "torch": torch.__version__}


def key(r: dict) -> str:
    return f"{r['preset']}|{r['batch']}|{r['mode']}" + ("|first step" if r.get("first_step") else "")


def table(rows: "list[dict]") -> str:
    lines = ["| preset | bucket (latent) | batch | mode | tracker | peak GiB | params | grads | optimizer | activations "
             "| other |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        w, h = r["bucket"]
        mode = r["mode"] + (" (first step)" if r.get("first_step") else "")
        head = f"| {r['preset']} | {w}x{h} ({w // 8}x{h // 8}) | {r['batch']} | {mode} | {r.get('method', '')} |"
        if "skipped" in r:
            lines.append(f"{head} not run: {r['skipped']} ||||||")
            continue
        p = r["parts"]
        cells = [r["peak_bytes"], p["parameters"], p["gradients"], p["optimizer"], p["activations"], p["other"]]
        lines.append(head + " " + " | ".join(f"{c / GiB:.2f}" for c in cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/out/train-memory.jsonl")
    ap.add_argument("--method", default="auto", choices=("auto", "memtracker", "tally"))
    ap.add_argument("--only", nargs="*", default=[], help="run the cases whose preset|batch|mode has all of these")
    ap.add_argument("--table", help="print the markdown table of a results file and exit")
    ap.add_argument("--reproduce", action="store_true",
                    help="only the issue's orientation runs: first step, foreach AdamW / fused-backward Adafactor")
    args = ap.parse_args()
    if args.table:
        print(table([json.loads(x) for x in Path(args.table).read_text(encoding="utf-8").splitlines() if x.strip()]))
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {key(json.loads(x)) for x in out.read_text(encoding="utf-8").splitlines() if x.strip()} \
        if out.exists() else set()
    for case in cases(args.reproduce):
        if key(case) in done or not all(s in key(case) for s in args.only):
            continue
        result = estimate(case, args.method)
        with out.open("a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")
        peak = f"{result['peak_bytes'] / GiB:.2f} GiB in {result['seconds']} s" if "peak_bytes" in result else "skipped"
        print(f"{key(case)}: {peak}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
