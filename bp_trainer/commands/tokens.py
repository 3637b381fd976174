"""`python -m bp_trainer tokens "PROMPT"` / `tokens --dataset DIR`: how CLIP reads a prompt or a dataset's tags.

Prompt: the WebUI v1.10.1 token counter (`count`/`limit` for `--steps`), its 75-token chunks, and every tag
with its weight, CLIP pieces and ids. Dataset: every distinct caption tag with its frequency and pieces,
flagged when CLIP cuts one of its words into meaningless pieces (`kyousuke -> k·you·suke`,
`bp_trainer.tokens.mangled`).
"""

from __future__ import annotations

import argparse

from bp_trainer.errors import BPError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", help="a prompt to inspect (quote it)")
    parser.add_argument("--steps", type=int, default=20,
                        help="sampling steps for [a:b:N] schedules, 1..150 (default 20)")
    parser.add_argument("--negative", action="store_true", help="count as a negative prompt (no AND split)")
    parser.add_argument("--hires-steps", type=int, metavar="N", help="schedules as in a hires-fix pass of N steps")
    parser.add_argument("--old-scheduling", action="store_true",
                        help="the WebUI's 'Use old prompt editing timelines' (a value below 1 is a fraction)")
    parser.add_argument("--backtrack", type=int, default=20, metavar="N",
                        help="the WebUI's 'Prompt word wrap length limit' (comma back-off, default 20; 0 = off)")
    parser.add_argument("--no-emphasis", action="store_true", help="emphasis mode 'None': brackets are plain text")
    parser.add_argument("--embedding", action="append", default=[], metavar="NAME:VECTORS",
                        help="a textual-inversion embedding the WebUI would load (repeatable), e.g. EasyNegative:8")
    parser.add_argument("--ids", action="store_true", help="include each chunk's 77 ids and multipliers (JSON)")
    parser.add_argument("--dataset", metavar="DIR", help="audit the tags of every caption in this dataset folder")
    parser.add_argument("--caption-ext", default=".txt", help="caption file extension (default .txt)")
    parser.add_argument("--focus", metavar="FILE", help="only these tags (one per line or comma-separated)")
    parser.add_argument("--pattern", metavar="RE", help="only tags matching this regular expression")
    parser.add_argument("--sort", choices=("count", "pieces", "tag"), default="count", help="row order (default count)")
    parser.add_argument("--flagged", action="store_true",
                        help="list only flagged tags (a word CLIP cuts into meaningless pieces)")
    parser.add_argument("--spaces", action="store_true", help="tokenize tags with underscores as spaces (as trained "
                                                              "with that caption option)")
    parser.add_argument("--limit", type=int, default=50, help="rows in the human-readable table (default 50; JSON has all)")
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    from bp_trainer.cli import emit

    if args.dataset:
        if args.prompt:
            raise BPError("give either a prompt or --dataset DIR, not both")
        from bp_trainer.tokens.audit import audit_dataset, read_focus_file

        focus = read_focus_file(args.focus) if args.focus else None
        result = audit_dataset(args.dataset, caption_ext=args.caption_ext, focus=focus, pattern=args.pattern,
                               sort=args.sort, spaces=args.spaces, flagged_only=args.flagged)
        emit(result, args.json, lambda r: _human_audit(r, args.limit))
        return 0
    if args.prompt is None:
        raise BPError("nothing to inspect", hint='pass a prompt in quotes, or --dataset DIR')
    if args.focus or args.pattern:
        raise BPError("--focus and --pattern apply to --dataset")
    import dataclasses

    from bp_trainer.tokens.inspect import inspect_prompt
    from bp_trainer.tokens.limits import DEFAULT_LIMITS, parse_steps

    parse_steps(args.steps, "--steps")  # the same rule as the API and the tab: 1..150
    if args.hires_steps is not None:
        parse_steps(args.hires_steps, "--hires-steps")
    result = inspect_prompt(args.prompt, steps=args.steps, negative=args.negative, backtrack=args.backtrack,
                            emphasis=not args.no_emphasis, embeddings=_embeddings(args.embedding), with_ids=args.ids,
                            hires_steps=args.hires_steps, use_old_scheduling=args.old_scheduling,
                            limits=dataclasses.replace(DEFAULT_LIMITS, field="prompt"))
    emit(result, args.json, _human_prompt)
    return 0


def _embeddings(specs: list) -> dict:
    out = {}
    for spec in specs:
        name, sep, vectors = spec.rpartition(":")
        if not sep or not name or not vectors.isdigit() or int(vectors) < 1:
            raise BPError(f"--embedding {spec!r} should be NAME:VECTORS", hint="e.g. --embedding EasyNegative:8")
        out[name] = int(vectors)
    return out


def _pieces(pieces: list) -> str:
    from bp_trainer.tokens.tokenizer import readable_pieces

    shown: list = []
    for p, text in zip(pieces, readable_pieces(pieces)):
        if p.startswith("<") and p.endswith(">") and shown and shown[-1][0] == p:
            shown[-1][2] += 1  # an embedding's vectors: one entry "<name>x8"
        else:
            shown.append([p, text.rstrip(), 1])
    return "|".join(text + (f"x{n}" if n > 1 else "") for _p, text, n in shown)


def _human_prompt(r: dict) -> str:
    lines = [f"{r['count']}/{r['limit']} tokens ({'negative' if r['negative'] else 'positive'} prompt, "
             f"{r['steps']} steps), {len(r['chunks'])} chunk(s)"]
    if len(r["variants"]) > 1:
        lines.append(f"  counted over {len(r['variants'])} schedule/AND variants; shown: {r['text']!r}")
    tags_by_chunk: dict = {}
    for t in r["tags"]:
        tags_by_chunk.setdefault(t["chunk"], []).append(t)
    width = max([len(t["text"]) for t in r["tags"]] + [8])
    width = min(width, 40)
    for c in r["chunks"]:
        lines.append(f"chunk {c['index'] + 1}: tokens {c['start']}..{c['end'] - 1} ({c['tokens']}), "
                     f"padding {c['padding']}, closed by {c['closed_by']}")
        for t in tags_by_chunk.get(c["index"], []):
            weight = "" if t["weight"] == 1.0 and not t["mixed_weights"] else f"x{t['weight']:.3g}" + (
                "*" if t["mixed_weights"] else "")
            mark = "".join(f"  ! {m['shown']}" for m in t.get("mangled", []))
            cross = " (crosses into the next chunk)" if t["crosses_chunk"] else ""
            lines.append(f"  {t['text'][:width]:<{width}} {weight:>7} {len(t['ids']):>2}  {_pieces(t['pieces'])}"
                         f"{mark}{cross}")
    if r["extra_networks"]:
        lines.append("extra networks (not counted): " + ", ".join(
            f"<{n['name']}:{':'.join(n['args'])}>" for n in r["extra_networks"]))
    return "\n".join(lines)


def _human_audit(r: dict, limit: int) -> str:
    lines = [f"{r['root']}: {r['captions']} captions, {r['tag_occurrences']} tag uses, {r['distinct_tags']} distinct "
             f"tags; {r['flagged']} of {r['selected_tags']} shown tags flagged (! = {r['flag_rule']})"]
    rows = r["tags"][: max(0, limit)]
    width = min(max([len(x["tag"]) for x in rows] + [3]), 40)
    lines.append(f"  {'tag':<{width}} {'count':>6} {'pcs':>3}  pieces")
    for x in rows:
        flag = "".join(f"  ! {m['shown']}" for m in x["mangled"])
        lines.append(f"  {x['tag'][:width]:<{width}} {x['count']:>6} {x['n_pieces']:>3}  {_pieces(x['pieces'])}{flag}")
    if len(r["tags"]) > len(rows):
        lines.append(f"  … {len(r['tags']) - len(rows)} more (--limit N, or --json for all)")
    if r["focus_missing"]:
        lines.append("focus tags in no caption: " + ", ".join(r["focus_missing"]))
    return "\n".join(lines)
