"""`python -m bp_trainer hash FILE [--json]`: the WebUI's hashes of a file (sha256, AutoV2, old 8-hex)."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="model file")
    parser.add_argument("--json", action="store_true", help="print JSON: sha256, autov2, old")


def run(args: argparse.Namespace) -> int:
    from bp_trainer.checkpoint.hashes import file_hashes
    from bp_trainer.cli import emit

    result = file_hashes(args.file)
    emit(result, args.json, lambda r: f"sha256 {r['sha256']}\nautov2 {r['autov2']}\nold    {r['old']}")
    return 0
