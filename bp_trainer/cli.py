"""`bp-train COMMAND …` (or `python -m bp_trainer COMMAND …`): one thin entry point; each command lives in
`bp_trainer/commands/`.

A command module defines `configure(parser)` (adds its arguments) and `run(args) -> int`. Modules are
imported only when their command runs, so `--help` and light commands start fast and a heavy dependency
(diffusers, accelerate) is loaded only by the commands that need it.

User errors (`BPError`) print as one line `error: …` and exit 2; `--debug` shows tracebacks.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Any, Callable, Sequence

from bp_trainer.errors import BPError

# name -> (module under bp_trainer.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "hash": ("hash", "WebUI hashes of a file: full SHA-256, AutoV2 (10 hex) and the old 8-hex hash"),
    "inspect": ("inspect", "what a checkpoint/UNet/VAE/text-encoder file is: layout, architecture, EMA, dtypes"),
    "merge": ("merge", "assemble a checkpoint from parts (VAE, text encoder, UNet/EMA), fp16, weighted sum, add difference"),
    "convert": ("convert", "convert a model between the WebUI (LDM) single-file layout and a diffusers folder"),
    "demo-model": ("demo_model", "write a tiny SD-1.x-shaped model (diffusers folder, WebUI file with EMA, VAE file)"),
    "buckets": ("buckets", "aspect-ratio bucket list (naifu-diffusion `arb:` block) and a dataset's bucket plan"),
    "tokens": ("tokens", "how CLIP tokenizes a prompt (WebUI counter and chunks) or a whole dataset's tags"),
    "tags": ("tags", "rename a tag across caption files (dry run, apply, undo) or suggest single-token replacements"),
    "demo-dataset": ("demo_dataset", "write a procedurally drawn sample dataset with tag captions"),
    "train": ("train", "train from a run YAML in a child process (`accelerate launch` for several processes)"),
    "demo": ("demo", "headless demo: tiny model + sample dataset + a short bucketed fine-tune on CPU"),
    "ui": ("ui", "the BP Train tab as a standalone gradio app on 127.0.0.1"),
    "infotext": ("infotext", "parse a WebUI infotext into its fields and the BP preset they make"),
}


def _load(module: str) -> Any:
    return importlib.import_module(f"bp_trainer.commands.{module}")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bp-train", description="BP Train: SD 1.x fine-tuning tools")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        if only is None or only == name:
            _load(module).configure(sp)
    return parser


def emit(result: Any, as_json: bool, human: Callable[[Any], str] | None = None) -> None:
    """Print a command's result: JSON (machine contract) or a human summary."""
    if as_json or human is None:
        print(json.dumps(result, indent=2, ensure_ascii=False, default=str))
    else:
        print(human(result))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    debug = "--debug" in argv
    try:
        # Only the chosen command's module is imported (keeps --help of one command fast).
        parser = build_parser(only=command if command in COMMANDS else "")
        args = parser.parse_args(argv)
        if not args.command:
            parser.print_help()
            return 1
        return int(_load(COMMANDS[args.command][0]).run(args) or 0)
    except BPError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the reader went away: not an error
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        except OSError:
            pass
        return 0
    except Exception as exc:  # a bug, not a user error: still one line unless --debug
        if debug:
            raise
        print(f"error: unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return 1
