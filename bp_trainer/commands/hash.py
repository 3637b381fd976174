"""`python -m bp_trainer hash FILE [--json] [--no-cache]`: the WebUI's hashes of a file (sha256, AutoV2, old 8-hex).

Answered from the hash cache (`bp_trainer.checkpoint.hashcache`) when the file is unchanged since it was last
hashed; computed hashes are stored there (so a later merge with this file as an input skips hashing it)."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="model file")
    parser.add_argument("--json", action="store_true", help="print JSON: sha256, autov2, old")
    parser.add_argument("--no-cache", action="store_true",
                        help="recompute even if the hash cache has this file (and refresh its entry)")


def run(args: argparse.Namespace) -> int:
    from bp_trainer.checkpoint.hashcache import cached_file_hashes
    from bp_trainer.cli import emit

    result = cached_file_hashes(args.file, use_cache=not args.no_cache)
    emit(result, args.json, lambda r: f"sha256 {r['sha256']}\nautov2 {r['autov2']}\nold    {r['old']}")
    return 0
