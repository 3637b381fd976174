"""`python -m bp_trainer convert SRC --to diffusers|webui --out OUT`: WebUI single file <-> diffusers."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="WebUI .safetensors/.ckpt, or a diffusers folder / component file")
    parser.add_argument("--to", required=True, choices=["diffusers", "webui"])
    parser.add_argument("--out", required=True, help="output folder (diffusers; must not exist) or file (webui), in an existing folder")
    parser.add_argument("--use-ema", action="store_true", help="diffusers: build the UNet from the EMA weights")
    parser.add_argument("--prediction-type", choices=["epsilon", "v_prediction"],
                        help="diffusers: scheduler prediction type (default: detected; SD 2.x 768-v is v_prediction)")
    parser.add_argument("--precision", choices=["fp16", "bf16", "fp32"], help="webui: convert every floating tensor")
    parser.add_argument("--format", dest="fmt", choices=["safetensors", "ckpt"], default=None)
    parser.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from bp_trainer.fsutil import check_output_path

    check_output_path(args.out, folder=args.to == "diffusers")  # before torch is imported
    from bp_trainer.checkpoint.convert import convert_to_diffusers, convert_to_webui
    from bp_trainer.cli import emit

    if args.to == "diffusers":
        result = convert_to_diffusers(args.src, args.out, use_ema=args.use_ema, prediction_type=args.prediction_type)
        human = lambda r: f"wrote diffusers folder {r['out']} ({', '.join(r['components'])})"  # noqa: E731
    else:
        fmt = args.fmt or ("ckpt" if str(args.out).lower().endswith((".ckpt", ".pt")) else "safetensors")
        result = convert_to_webui(args.src, args.out, precision=args.precision, fmt=fmt)
        human = lambda r: f"wrote {r['out']} ({r['kind']}, {r['tensors']} tensors), autov2 {r['autov2']}"  # noqa: E731
    emit(result, args.json, human)
    return 0
