"""`python -m bp_trainer tags rename|suggest|journals`: fix the caption tags that CLIP mangles.

    tags rename --dataset DIR --from OLD --to NEW            dry run: every change, nothing written
    tags rename --dataset DIR --from OLD --to NEW --apply    apply with backup + undo journal (re-run to resume)
    tags rename --undo JOURNAL                               restore the files of that rename (re-run to resume)
    tags suggest --dataset DIR --tag TAG                     rare single-token replacements, with reasons
    tags journals --dataset DIR                              renames recorded in this dataset
"""

from __future__ import annotations

import argparse

from bp_trainer.errors import BPError


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="tags_command", metavar="{rename,suggest,journals}")

    rn = sub.add_parser("rename", help="rename a tag in every caption file (dry run unless --apply)")
    rn.add_argument("--dataset", metavar="DIR", help="dataset folder (images with .txt captions)")
    rn.add_argument("--from", dest="old", metavar="OLD", help="the tag to rename (whole tag, case-sensitive)")
    rn.add_argument("--to", dest="new", metavar="NEW", help="its new name")
    rn.add_argument("--apply", action="store_true", help="write the changes (backup + undo journal)")
    rn.add_argument("--undo", metavar="JOURNAL", help="restore the files changed by this journal")
    rn.add_argument("--caption-ext", default=".txt")
    rn.add_argument("--no-emphasis", action="store_true",
                    help="match plain tags only, not (OLD) / (OLD:1.2) / [OLD]")
    rn.add_argument("--json", action="store_true")

    sg = sub.add_parser("suggest", help="single-token replacements for a tag, unused in the dataset, rare in CLIP")
    sg.add_argument("--dataset", metavar="DIR", required=True)
    sg.add_argument("--tag", required=True)
    sg.add_argument("--count", type=int, default=10, help="how many suggestions (default 10)")
    sg.add_argument("--min-len", type=int, default=4)
    sg.add_argument("--max-len", type=int, default=12)
    sg.add_argument("--caption-ext", default=".txt")
    sg.add_argument("--json", action="store_true")

    jl = sub.add_parser("journals", help="list the tag renames recorded in a dataset")
    jl.add_argument("--dataset", metavar="DIR", required=True)
    jl.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from bp_trainer.cli import emit

    cmd = getattr(args, "tags_command", None)
    if cmd == "rename":
        return _rename(args, emit)
    if cmd == "suggest":
        from bp_trainer.tokens.suggest import suggest_replacements

        if args.count < 1:
            raise BPError("--count must be at least 1")
        result = suggest_replacements(args.dataset, args.tag, caption_ext=args.caption_ext, count=args.count,
                                      min_len=args.min_len, max_len=args.max_len)
        emit(result, args.json, _human_suggest)
        return 0
    if cmd == "journals":
        from bp_trainer.tokens.rename import journal_summary, journals

        result = {"journals": [journal_summary(p, j) for p, j in journals(args.dataset)]}
        emit(result, args.json, lambda r: "\n".join(
            f"{j['created']}  {j['state']:<22} {j['from']!r} -> {j['to']!r} ({j['files']} files)  {j['journal']}"
            + (f"\n  unfinished: {j['finish']}" if j.get("finish") else "")
            for j in r["journals"]) or "no tag renames recorded")
        return 0
    raise BPError("choose a tags subcommand", hint="tags rename | tags suggest | tags journals (see --help)")


def _rename(args: argparse.Namespace, emit) -> int:
    from bp_trainer.tokens import rename as rn

    if args.undo:
        if args.apply:
            raise BPError("--undo and --apply are exclusive")
        result = rn.undo_rename(args.undo)
        emit(result, args.json, lambda r: (
            f"restored {r['restored']} file(s), {r['already_original']} already original; journal {r['journal']}"
            + "".join(f"\n  not restored: {c['path']}: {c['reason']}" for c in r["conflicts"])))
        return 1 if result["conflicts"] else 0
    if not (args.dataset and args.old and args.new):
        raise BPError("rename needs --dataset DIR --from OLD --to NEW (or --undo JOURNAL)")
    emphasis = not args.no_emphasis
    if args.apply:
        result = rn.apply_rename(args.dataset, args.old, args.new, caption_ext=args.caption_ext, emphasis=emphasis)
        emit(result, args.json, _human_applied)
        return 1 if result["conflicts"] else 0
    plan = rn.plan_rename(args.dataset, args.old, args.new, caption_ext=args.caption_ext, emphasis=emphasis)
    result = dict(plan.to_dict(), dry_run=True)
    pending = [rn.journal_summary(p, j) for p, j in rn.unfinished_journals(plan.root)]
    if pending:
        result["unfinished_journals"] = pending
    emit(result, args.json, _human_plan)
    return 0


def _human_plan(r: dict) -> str:
    lines = [f"dry run: {r['from']!r} -> {r['to']!r}: {r['replacements']} replacement(s) in {r['files_changed']} "
             f"of {r['captions_scanned']} caption files (nothing written; add --apply)"]
    for f in r["files"]:
        for ln in f["lines"]:
            lines.append(f"{f['path']}:{ln['line']}:\n  - {ln['before']}\n  + {ln['after']}")
    if not r["files"] and r.get("similar"):
        lines.append("no caption has this exact tag; similar tags: " + ", ".join(
            f"{s['tag']!r} ({s['count']})" for s in r["similar"]))
    if r["duplicates"]:
        lines.append(f"note: {len(r['duplicates'])} caption(s) already have {r['to']!r}; it will appear twice there")
    for j in r.get("unfinished_journals", []):
        lines.append(f"unfinished {'undo of ' if j['state'] == 'undoing' else ''}rename {j['from']!r} -> {j['to']!r}: "
                     f"{j['journal']} ({j['finish']})")
    return "\n".join(lines)


def _human_applied(r: dict) -> str:
    if r["journal"] is None:
        return f"nothing to rename: no caption has the tag {r['from']!r}"
    head = "resumed and completed" if r["resumed"] else "applied"
    lines = [f"{head}: {r['from']!r} -> {r['to']!r}: {r['applied']} file(s) written, {r['already']} already done, "
             f"{r['replacements']} replacement(s) in {r['files_changed']} file(s)",
             f"undo with: python -m bp_trainer tags rename --undo {r['journal']}"]
    lines += [f"  not changed: {c['path']}: {c['reason']}" for c in r["conflicts"]]
    return "\n".join(lines)


def _human_suggest(r: dict) -> str:
    lines = [f"{r['tag']!r} is {len(r['tag_ids'])} CLIP piece(s): {' | '.join(r['tag_pieces'])}; "
             f"in {r['tag_count']} of {r['captions']} captions"]
    if r["mangled"]:
        lines.append("CLIP cuts " + "; ".join(m["shown"] for m in r["mangled"]))
    else:
        lines.append("note: CLIP reads every word of this tag (not flagged by the audit); a new name may not help")
    if not r["suggestions"]:
        lines.append("no candidate passed every check (try --min-len 3 or --max-len 16)")
    for i, s in enumerate(r["suggestions"], 1):
        lines.append(f"{i:>2}. {s['text']}")
        lines += [f"      - {reason}" for reason in s["reasons"]]
    return "\n".join(lines)
