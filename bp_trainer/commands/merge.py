"""`python -m bp_trainer merge --base A [...] --out OUT`: assemble a checkpoint from parts, or merge (WebUI style)."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="base checkpoint (model A)")
    parser.add_argument("--unet", help="take the UNet from this file (UNet-only, checkpoint, or its EMA with --use-ema)")
    parser.add_argument("--use-ema", action="store_true", help="use EMA weights (model_ema.*) as the UNet")
    parser.add_argument("--vae", help="bake in this VAE (WebUI models/VAE file, checkpoint or diffusers VAE)")
    parser.add_argument("--text-encoder", help="take the text encoder from this file")
    parser.add_argument("--drop-ema", action="store_true", help="leave EMA weights out of the output")
    parser.add_argument("--precision", choices=["fp16", "bf16", "fp32"], help="convert every floating tensor")
    parser.add_argument("--mode", choices=["assemble", "weighted-sum", "add-difference"], default="assemble")
    parser.add_argument("--b", help="model B (weighted-sum, add-difference)")
    parser.add_argument("--c", help="model C (add-difference)")
    parser.add_argument("--alpha", type=float, default=0.5, help="multiplier (WebUI's M); default 0.5")
    parser.add_argument("--format", dest="fmt", choices=["safetensors", "ckpt"], default=None,
                        help="output format (default: from the extension of --out, else safetensors)")
    parser.add_argument("--out", required=True, help="output file in an existing folder (never one of the inputs)")
    parser.add_argument("--json", action="store_true")


def _start_hashing(args: argparse.Namespace):
    """Look the input hashes up in the hash cache, and hash the others on threads from the start, while
    torch is still being imported."""
    from bp_trainer.checkpoint.hashcache import start_hashing  # no torch import

    return start_hashing({"base": args.base, "unet": args.unet, "vae": args.vae, "text_encoder": args.text_encoder,
                          "b": args.b, "c": args.c})


def run(args: argparse.Namespace) -> int:
    from bp_trainer.fsutil import check_output_path, refuse_overwriting_inputs

    check_output_path(args.out)  # before any work: a folder, a missing folder, a name too long
    refuse_overwriting_inputs(args.out, [args.base, args.unet, args.vae, args.text_encoder, args.b, args.c])
    hashing = _start_hashing(args)
    try:
        from bp_trainer.checkpoint.assemble import MergeOptions, merge
    except BaseException:
        hashing[0].shutdown(wait=False, cancel_futures=True)
        raise
    from bp_trainer.cli import emit

    fmt = args.fmt or ("ckpt" if str(args.out).lower().endswith((".ckpt", ".pt")) else "safetensors")
    opts = MergeOptions(base=args.base, unet=args.unet, use_ema=args.use_ema, vae=args.vae,
                        text_encoder=args.text_encoder, drop_ema=args.drop_ema, precision=args.precision,
                        mode=args.mode, b=args.b, c=args.c, alpha=args.alpha, fmt=fmt)
    result = merge(opts, args.out, hashing=hashing)
    emit(result, args.json, lambda r: (f"wrote {r['out']} ({r['tensors']} tensors, {r['bytes']:,} bytes)\n"
                                       f"sha256 {r['sha256']}  autov2 {r['autov2']}  old {r['old']}"))
    return 0
