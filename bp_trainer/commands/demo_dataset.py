"""`bp-train demo-dataset --out DIR [--count N]`: a procedurally drawn sample dataset with tag captions."""

from __future__ import annotations

import argparse
import os


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (created; must be empty or absent)")
    parser.add_argument("--count", type=int, default=48, help="number of images (default 48)")
    parser.add_argument("--seed", type=int, default=0, help="the same seed draws the same dataset")
    parser.add_argument("--with-problems", action="store_true",
                        help="also write a few broken files (truncated, empty, not an image, no caption) in problems/")
    parser.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from bp_trainer.cli import emit
    from bp_trainer.dataset.demo import write_demo_dataset
    from bp_trainer.errors import BPError

    if args.count < 1:
        raise BPError("--count must be at least 1")
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        raise BPError("the output folder exists and is not empty", path=args.out,
                      hint="choose a new folder; nothing in an existing one is overwritten")
    result = write_demo_dataset(args.out, count=args.count, seed=args.seed, with_problems=args.with_problems)
    summary = {k: v for k, v in result.items() if k != "items"}
    summary["example_caption"] = result["items"][0]["caption"]
    emit(summary, args.json, lambda r: (
        f"wrote {r['images']} images with .txt captions to {r['out']}\n"
        f"example: {r['example_caption']}"
        + (f"\nproblem files: {len(r['problem_files'])}" if r["problem_files"] else "")))
    return 0
