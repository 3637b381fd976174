"""`python -m bp_trainer infotext "TEXT" [--json]`: parse a WebUI infotext and show the BP preset it makes."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Dict


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", help="the infotext (PNG Info text); '-' reads it from standard input")
    parser.add_argument("--name", default=None, help="name of the preset (default: its 'BP preset' key, else 'From infotext')")
    parser.add_argument("--save", metavar="PRESETS_YAML", default=None,
                        help="also add the preset to this user presets file (needs --name or a 'BP preset' key)")
    parser.add_argument("--replace", action="store_true", help="with --save: replace a preset of the same name")
    parser.add_argument("--json", action="store_true", help="print JSON")


def _human(result: Dict[str, Any]) -> str:
    lines = ["fields (as written; --json also lists the WebUI's defaults for missing keys):"]
    fields = {k: v for k, v in result["fields"].items() if k in result["written"]}
    width = max((len(k) for k in fields), default=0)
    for key, value in fields.items():
        lines.append(f"  {key.ljust(width)}  {value}")
    preset = result["preset"]
    lines.append(f"preset '{preset['name']}': {result['summary']}")
    if result.get("saved_to"):
        lines.append(f"saved to {result['saved_to']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from bp_trainer.cli import emit
    from bp_trainer.errors import BPError
    from bp_trainer.infotext import parse_infotext, split_infotext
    from bp_trainer.presets.preset import preset_from_infotext
    from bp_trainer.presets.store import add_user_preset

    text = sys.stdin.read() if args.text == "-" else args.text
    if not text.strip():
        raise BPError("the infotext is empty", hint="pass the text in quotes, or '-' to read standard input")
    if "\n" not in text and "\\n" in text:  # a shell argument typed with literal \n line breaks
        text = text.replace("\\n", "\n")
    fields = parse_infotext(text, skip_fields=[])
    prompt, negative, written = split_infotext(text)
    preset = preset_from_infotext(text, args.name or "From infotext")
    result: Dict[str, Any] = {
        "fields": fields,
        "written": ["Prompt", "Negative prompt"] + list(written),
        "preset": {"name": preset.name, **preset.to_dict()},
        "summary": preset.summary(),
    }
    if args.save:
        if not args.name and "BP preset" not in written:
            raise BPError("--save needs --name NAME (the infotext names no BP preset)")
        add_user_preset(args.save, preset, replace=args.replace)
        result["saved_to"] = args.save
    emit(result, args.json, _human)
    return 0
