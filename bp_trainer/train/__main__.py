"""`accelerate launch -m bp_trainer.train RUN.yaml [--run-dir DIR] [--resume]`: one training process.

Every process of an accelerate launch runs this. Without `--run-dir` the run folder is
`run.runs_dir/run.name` (the same on every process); `--resume` continues from its newest saved state.
Exit codes: 0 finished or stopped (signal / STOP file), 2 bad input (one line on stderr), 1 a bug.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bp_trainer.errors import BPError


def main(argv: "list[str] | None" = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bp_trainer.train", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="run YAML")
    parser.add_argument("--run-dir", help="run folder (default: run.runs_dir/run.name)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest state in the run folder")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from bp_trainer.train import state
        from bp_trainer.train.config import load_config

        cfg = load_config(args.config)
        run_dir = Path(args.run_dir) if args.run_dir else Path(cfg.run.runs_dir) / cfg.run.name
        if not args.resume and state.latest_state(run_dir) is not None:
            raise BPError("this run folder already holds a run", path=run_dir,
                          hint="pass --resume to continue it, or choose another run.name")
        from bp_trainer.train.run import train

        train(cfg, run_dir, resume=args.resume)
        return 0
    except BPError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
