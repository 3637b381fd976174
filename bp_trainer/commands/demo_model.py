"""`bp-train demo-model --out DIR`: the tiny SD-1.x-shaped model used by tests and the demo.

Writes (a) a diffusers folder `DIR/tiny-sd/`, (b) a WebUI single file `DIR/tiny-sd.safetensors` with
`model_ema.*` weights (the UNet plus a seeded perturbation, so EMA promotion is testable), (c) a VAE file
`DIR/tiny-vae.safetensors` in the WebUI's models/VAE layout (no prefix), from another seed.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from bp_trainer.checkpoint.io import write_checkpoint
    from bp_trainer.checkpoint.ldm_keys import vae_key_map, vae_tensor_to_ldm
    from bp_trainer.cli import emit
    from bp_trainer.tiny_model import build_components, build_vae, save_diffusers_folder, save_webui_file

    out = Path(args.out)
    components = build_components(seed=args.seed)
    folder = save_diffusers_folder(components, out / "tiny-sd")
    single = save_webui_file(components, out / "tiny-sd.safetensors", ema_seed=args.seed + 1000)
    vae_sd = build_vae(args.seed + 77).state_dict()
    vae_ldm = {ldm: vae_tensor_to_ldm(ldm, vae_sd[k]) for k, ldm in vae_key_map(vae_sd).items()}
    vae = write_checkpoint(vae_ldm, out / "tiny-vae.safetensors", {"bp_model": "tiny-vae"})
    result = {"diffusers": str(folder), "webui": single["out"], "vae": vae["out"]}
    emit(result, args.json, lambda r: "\n".join(f"{k}: {v}" for k, v in r.items()))
    return 0
