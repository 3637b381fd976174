"""Dataset tag audit: every distinct caption tag with its frequency and how CLIP splits it.

A tag is a comma-separated piece of a caption, stripped (as the trainer splits captions). It is tokenized as
written, as the trainer feeds it to CLIP (emphasis brackets in captions are not parsed by trainers);
`spaces=True` shows the tags as they are trained when the run converts underscores to spaces.

A tag is flagged when CLIP cuts one of its words into meaningless pieces (`bp_trainer.tokens.mangled`: romanized
Japanese such as artist names, `kyousuke` -> `k·you·suke`, and other fragments, `fuzichoco`, `as109`), not for
its number of pieces: `multiple_girls` is 3 pieces of words CLIP knows. Each row lists the words cut
(`mangled`) and keeps the piece count. Tokenization is cached per distinct tag and word, so 5,000 captions of
30 tags take well under a second (bench/bench_tokens.py).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from bp_trainer.errors import BPError
from bp_trainer.tokens.mangled import mangled_by_tag, mangled_words  # noqa: F401 - mangled_words: the rule, re-exported
from bp_trainer.tokens.tokenizer import TokenizerView

SORT_KEYS = ("count", "pieces", "tag")
FLAG_RULE = "a word CLIP cuts into meaningless pieces (romanized Japanese, fragments, letter-digit codes)"
JOURNAL_DIR = ".bp_tag_journal"  # hidden: dataset scans skip it


def iter_caption_files(root: "str | os.PathLike[str]", caption_ext: str = ".txt") -> Iterator[tuple[str, str]]:
    """(caption_path, text) for every image's sidecar caption under `root` (hidden folders skipped).

    Uses the dataset scanner (`bp_trainer.dataset.scan.iter_captions`, no image is opened), so the tools see
    exactly the captions training reads.
    """
    root = Path(root)
    if not root.is_dir():
        raise BPError("the dataset folder does not exist", path=root, hint="pass --dataset DIR with your images and .txt captions")
    seen: set[str] = set()
    for _image, caption_path, text in _iter_captions(os.fspath(root), caption_ext):
        if caption_path not in seen:  # two images may share one caption name (a.png + a.jpg)
            seen.add(caption_path)
            yield caption_path, text


def _iter_captions(root: str, caption_ext: str) -> Iterator[tuple[str, str, str]]:
    from bp_trainer.dataset.scan import iter_captions  # imported lazily: it loads Pillow

    return iter_captions(root, caption_ext)


def split_tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


def underscores_to_spaces(tag: str) -> str:
    """The caption option's rule (`bp_trainer.dataset.captions`): `long_hair` -> `long hair`, kaomoji kept."""
    from bp_trainer.dataset.captions import underscores_to_spaces as convert

    return convert(tag)


def read_focus_file(path: "str | os.PathLike[str]") -> list[str]:
    """Tags listed in a file: one per line or comma-separated; blank lines and `#` comments ignored."""
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise BPError(f"cannot read the focus list ({exc.strerror or exc})", path=p) from exc
    except UnicodeDecodeError as exc:
        raise BPError("the focus list is not UTF-8 text", path=p) from exc
    tags: list[str] = []
    for line in text.splitlines():
        if not line.lstrip().startswith("#"):
            tags.extend(split_tags(line))
    return list(dict.fromkeys(tags))


def compile_pattern(pattern: str) -> "re.Pattern[str]":
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise BPError(f"the tag pattern {pattern!r} is not a valid regular expression ({exc})",
                      hint="Python `re` syntax, e.g. --pattern '^artist:|_\\(artist\\)$'") from exc


def tag_rows(counts: "Counter[str]", view: TokenizerView, *, spaces: bool = False) -> list[dict]:
    """One row per distinct tag: count, pieces, ids, the words CLIP cuts apart (tokenized in batches)."""
    tags = list(counts)
    texts = [underscores_to_spaces(t) for t in tags] if spaces else tags
    all_ids = view.encode_many(texts)
    mangled = mangled_by_tag(tags, view)
    rows = []
    for tag, text, ids in zip(tags, texts, all_ids):
        words = [m.to_dict() for m in mangled[tag]]
        rows.append({
            "tag": tag,
            "count": counts[tag],
            "n_pieces": len(ids),
            "pieces": view.pieces(ids),
            "ids": ids,
            "mangled": words,
            "flagged": bool(words),
            **({"trained_as": text} if spaces else {}),
        })
    return rows


def sort_rows(rows: list[dict], by: str = "count") -> list[dict]:
    if by not in SORT_KEYS:
        raise BPError(f"unknown sort key {by!r}", hint=f"one of: {', '.join(SORT_KEYS)}")
    if by == "count":
        return sorted(rows, key=lambda r: (-r["count"], -r["n_pieces"], r["tag"]))
    if by == "pieces":
        return sorted(rows, key=lambda r: (-r["n_pieces"], -r["count"], r["tag"]))
    return sorted(rows, key=lambda r: r["tag"])


def count_tags(captions: Iterable[str]) -> tuple["Counter[str]", int]:
    """(tag -> number of captions containing it, number of captions). A tag repeated in one caption counts once."""
    counts: Counter[str] = Counter()
    n = 0
    for text in captions:
        n += 1
        counts.update(set(split_tags(text)))
    return counts, n


def audit_dataset(root: "str | os.PathLike[str]", tokenizer: Any = None, *, caption_ext: str = ".txt",
                  focus: Optional[Iterable[str]] = None, pattern: Optional[str] = None,
                  sort: str = "count", spaces: bool = False, flagged_only: bool = False) -> dict:
    """The tag audit of a dataset folder as a JSON-ready dict (see module doc).

    `focus` (tags) and/or `pattern` (regex searched in each tag) restrict the rows: a tag is kept when it is
    in `focus` or matches `pattern`. Focus tags that occur in no caption are listed in `focus_missing`.
    """
    view = TokenizerView.of(tokenizer)
    counts, n_captions = count_tags(text for _, text in iter_caption_files(root, caption_ext))
    return audit_counts(counts, n_captions, view, root=os.fspath(root), focus=focus, pattern=pattern,
                        sort=sort, spaces=spaces, flagged_only=flagged_only)


def audit_counts(counts: "Counter[str]", n_captions: int, tokenizer: Any = None, *, root: str = "",
                 focus: Optional[Iterable[str]] = None, pattern: Optional[str] = None,
                 sort: str = "count", spaces: bool = False, flagged_only: bool = False) -> dict:
    """`audit_dataset` on already counted tags (the UI can count once and re-filter)."""
    view = TokenizerView.of(tokenizer)
    focus_list = list(dict.fromkeys(focus)) if focus is not None else None
    regex = compile_pattern(pattern) if pattern else None
    selected: Counter[str] = counts
    if focus_list is not None or regex is not None:
        wanted = set(focus_list or ())
        selected = Counter({t: c for t, c in counts.items()
                            if t in wanted or (regex is not None and regex.search(t))})
    rows = tag_rows(selected, view, spaces=spaces)
    flagged = sum(r["flagged"] for r in rows)
    if flagged_only:
        rows = [r for r in rows if r["flagged"]]
    return {
        "root": root,
        "captions": n_captions,
        "tag_occurrences": sum(counts.values()),
        "distinct_tags": len(counts),
        "selected_tags": len(selected),
        "flag_rule": FLAG_RULE,
        "flagged": flagged,
        "sort": sort,
        "tags": sort_rows(rows, sort),
        "focus_missing": [t for t in focus_list if t not in counts] if focus_list is not None else [],
    }
