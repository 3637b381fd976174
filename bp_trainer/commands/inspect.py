"""`python -m bp_trainer inspect FILE [--json]`: what a model file is (kind, layout, arch, EMA, dtypes, counts)."""

from __future__ import annotations

import argparse
from typing import Any


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help=".safetensors, .ckpt/.pt or a diffusers folder")
    parser.add_argument("--json", action="store_true")


def _human(r: dict[str, Any]) -> str:
    lines = [
        f"{r['path']}",
        f"  kind {r['kind']} ({r['layout']} layout, {r['format']}), arch {r['arch']}, prediction {r['prediction']}",
        f"  tensors {r['tensors']}, parameters {r['parameters']:,}",
        "  dtypes " + ", ".join(f"{k} x{v}" for k, v in sorted(r["dtypes"].items())),
        "  parts " + ", ".join(f"{k} {v:,}" for k, v in r["parameters_by_part"].items()),
        f"  EMA {'yes (' + str(r['ema_tensors']) + ' tensors)' if r['has_ema'] else 'no'}",
    ]
    if r.get("metadata"):
        lines.append("  metadata " + ", ".join(sorted(r["metadata"])))
    if r["arch"] == "sdxl":
        lines.append("  note: SDXL is not supported by BP Train's merge/convert")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from bp_trainer.checkpoint.io import open_file
    from bp_trainer.checkpoint.layout import describe
    from bp_trainer.cli import emit

    with open_file(args.file) as src:
        result = describe(src)
    emit(result, args.json, _human)
    return 0
