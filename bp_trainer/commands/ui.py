"""`bp-train ui [--port 7860] [--models DIR] [--runs DIR] [--config RUN.yaml]`: the standalone app.

Serves the same "BP Train" tab as the WebUI extension on 127.0.0.1, without the WebUI: checkpoints from
MODELS/Stable-diffusion, VAEs from MODELS/VAE (the WebUI's layout), runs under RUNS, the tokenizer from the
offline CLIP vocabulary. `--config` pre-fills the Train form from a run YAML (dev/demo.sh writes one).
"""

from __future__ import annotations

import argparse
import os


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=int(os.environ.get("BP_TRAIN_PORT", 7860)),
                        help="port on 127.0.0.1 (default 7860)")
    parser.add_argument("--models", default="demo/models",
                        help="models folder with Stable-diffusion/ and VAE/ subfolders (default ./demo/models)")
    parser.add_argument("--runs", default=None, help="folder of training runs (default: MODELS/../runs)")
    parser.add_argument("--config", default=None, help="a run YAML that pre-fills the Train form")
    parser.add_argument("--python", default=None, help="Python of the trainer's environment (default: this one)")
    parser.add_argument("--open", action="store_true", help="open the page in a browser")


def run(args: argparse.Namespace) -> int:
    from bp_trainer.errors import BPError
    from bp_trainer.ui.standalone import StandaloneHost, launch

    if not os.path.isdir(args.models):
        raise BPError("models folder not found", path=args.models,
                      hint="create it with Stable-diffusion/ and VAE/ subfolders, or run dev/demo.sh for the demo models")
    if args.config and not os.path.isfile(args.config):
        raise BPError("run config not found", path=args.config)
    _check_port(args.port)
    host = StandaloneHost(args.models, args.runs, python=args.python)
    launch(host, port=args.port, initial_config=args.config, open_browser=args.open)
    return 0


def _check_port(port: int) -> None:
    """A clear message when the port is taken (gradio's own is 'Cannot find empty port in range')."""
    import socket

    from bp_trainer.errors import BPError

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise BPError(f"port {port} on 127.0.0.1 is in use (another app, or BP Train already running there)",
                          hint="pass --port N, or set BP_TRAIN_PORT") from None
