"""`python -m bp_trainer train --config RUN.yaml [--resume RUN_DIR] [--foreground]`.

Validates the config (one message per problem), creates the run folder, and starts the trainer in a child
`accelerate launch` process (the configured Python, process count and mixed precision); returns the
child's exit code. Ctrl+C asks the trainer to save and stop (a second one sends SIGTERM, a third SIGKILL).
`--foreground` trains in this process (debugging). `--show-defaults` prints a complete default config.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any, Dict


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="run YAML (default with --resume: RUN_DIR/config.yaml)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its newest saved state")
    parser.add_argument("--run-dir", help="run folder (default: run.runs_dir/NAME-TIMESTAMP)")
    parser.add_argument("--foreground", action="store_true", help="train in this process (no child process)")
    parser.add_argument("--num-processes", type=int, help="override run.num_processes")
    parser.add_argument("--preset", help="lay a preset (512, 768, 1024) under the config's own values")
    parser.add_argument("--check", action="store_true", help="validate the config, print it resolved, and exit")
    parser.add_argument("--memory", choices=("manual", "fast", "lean", "auto"), help="override training.memory")
    parser.add_argument("--estimate-memory", action="store_true",
                        help="estimate the run's peak GPU memory (its real step on empty models, no GPU) and exit")
    parser.add_argument("--show-defaults", action="store_true", help="print a complete default config and exit")
    parser.add_argument("--json", action="store_true", help="machine-readable result")


def _load(args: argparse.Namespace) -> Any:
    from bp_trainer.errors import BPError, ConfigError
    from bp_trainer.train import config as C

    path = Path(args.config) if args.config else (Path(args.resume) / "config.yaml" if args.resume else None)
    if path is None:
        raise BPError("no config given", hint="pass --config RUN.yaml (or --resume RUN_DIR)")
    if not path.is_file():
        raise ConfigError("config file not found", path=path)
    raw = C.read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError("a run config must be a mapping of sections (model:, dataset:, training: ...)", path=path)
    if args.preset:
        raw = C.merge(C.preset(args.preset), raw)
    if args.num_processes is not None:
        raw = C.merge(raw, {"run": {"num_processes": args.num_processes}})
    if args.memory:
        raw = C.merge(raw, {"training": {"memory": args.memory}})
    return C.validate(raw, base_dir=path.parent, source=path)


def run(args: argparse.Namespace) -> int:
    from bp_trainer import launcher
    from bp_trainer.cli import emit
    from bp_trainer.train import config as C
    from bp_trainer.train.events import read_all

    if args.show_defaults:
        cfg = C.defaults()
        if args.preset:
            cfg = C.merge(cfg, C.preset(args.preset))
        print(C.dump_config(cfg), end="")
        return 0
    cfg = _load(args)
    if args.check:
        emit(cfg.to_dict(), args.json, lambda c: C.dump_config(cfg).rstrip())
        return 0
    if args.estimate_memory:
        from bp_trainer.train.estimate import estimate_run

        emit(estimate_run(cfg), args.json, _human_estimate)
        return 0
    if args.foreground:
        from bp_trainer.train.run import train

        run_dir = launcher.prepare_run(cfg, resume_dir=args.resume, run_dir=args.run_dir)
        result = train(cfg, run_dir, resume=bool(args.resume))
        emit({"run_dir": str(run_dir), **result}, args.json, _human)
        return 0
    handle = launcher.start_run(cfg, resume_dir=args.resume, run_dir=args.run_dir, log_to_file=False)
    print(f"run folder: {handle.run_dir} (pid {handle.pid}); Ctrl+C saves and stops", file=sys.stderr, flush=True)
    presses = [0]

    def on_signal(signum: int, frame: Any) -> None:
        presses[0] += 1
        if presses[0] == 1:
            launcher.request_stop(handle.run_dir)
            print("\nstopping after the current step (saving); Ctrl+C again to terminate", file=sys.stderr)
        else:
            sig = signal.SIGTERM if presses[0] == 2 else launcher.SIGKILL
            launcher.signal_group(handle.pid, sig)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = handle.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    done = [e for e in read_all(handle.run_dir) if e.get("type") == "done"]
    result = {"run_dir": str(handle.run_dir), "exit_code": code}
    if done:
        result.update(reason=done[-1].get("reason"), step=done[-1].get("step"), outputs=done[-1].get("outputs"))
    emit(result, args.json, _human)
    return code


def _human_estimate(r: Dict[str, Any]) -> str:
    o = r["options"]
    parts = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in r["parts"].items())
    return (f"estimated peak {r['peak_gib']:.2f} GiB at bucket {r['bucket'][0]}x{r['bucket'][1]}, batch {r['batch_size']} "
            f"({parts} GiB)\noptions: {', '.join(f'{k}={v}' for k, v in o.items())}\n"
            + "\n".join(f"note: {n}" for n in r["notes"]))


def _human(r: Dict[str, Any]) -> str:
    lines = [f"run folder: {r['run_dir']}"]
    if r.get("reason"):
        lines.append(f"{r['reason']} at step {r.get('step')}")
    outputs = r.get("outputs") or {}
    if outputs.get("webui"):
        lines.append(f"WebUI checkpoint: {outputs['webui']}")
    for k, v in outputs.items():
        if k != "webui":
            lines.append(f"{k}: {v}")
    if r.get("exit_code") not in (None, 0):
        lines.append(f"trainer exited with code {r['exit_code']} (see the run folder's events.jsonl)")
    return "\n".join(lines)
