"""`python -m bp_trainer demo-model --out DIR`: the tiny SD-1.x-shaped model used by tests and the demo."""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from bp_trainer.cli import emit
    from bp_trainer.tiny_model import build_components, save_diffusers_folder

    out = Path(args.out)
    components = build_components(seed=args.seed)
    folder = save_diffusers_folder(components, out / "tiny-sd")
    result = {"diffusers": str(folder)}
    emit(result, args.json, lambda r: "\n".join(f"{k}: {v}" for k, v in r.items()))
    return 0
