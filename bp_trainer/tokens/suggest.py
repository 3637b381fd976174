"""Replacement suggestions for a tag that CLIP mangles (many pieces): rare single-token strings.

A candidate is a lower-case word that
- is exactly one CLIP token on its own and before a comma (checked with the tokenizer: `word` -> [id],
  `word,` -> [id, comma]), so the trained meaning lands in one embedding;
- occurs in no caption of the dataset, neither as text nor as a token of any tag, so it does not collide
  with what the dataset already teaches;
- is rare: late in the BPE merge order (in the CLIP vocabulary a merge's id is 512 + its rank, so a high id
  is a merge learned late from few examples, a weak prior to overwrite).
Candidates are ranked by similarity to the tag (shared letters in order, 0..1, so the new name stays
recognisable) plus lateness of the merge (rank / number of merges, 0..1). Each suggestion carries its reasons.
"""

from __future__ import annotations

import difflib
import os
import re
from typing import Any, Iterable

from bp_trainer.errors import BPError
from bp_trainer.tokens.audit import count_tags, iter_caption_files
from bp_trainer.tokens.mangled import mangled_words
from bp_trainer.tokens.tokenizer import TokenizerView

BYTE_TOKENS = 512  # 256 byte tokens + the same with </w>: merges start here
_WORD = re.compile(r"^[a-z]+$")


def _merge_count(view: TokenizerView) -> int:
    specials = sum(1 for t in ("<|startoftext|>", "<|endoftext|>") if t in view.vocab)
    return max(1, len(view.vocab) - BYTE_TOKENS - specials)


def merge_rank(token_id: int) -> int:
    """Rank of the BPE merge that made this token (CLIP vocabulary: ids follow the merge order)."""
    return token_id - BYTE_TOKENS


def _letters(text: str) -> str:
    return re.sub(r"[^a-z]", "", text.lower())


def suggest_for_counts(tag: str, captions: Iterable[str], tokenizer: Any = None, *, count: int = 10,
                       min_len: int = 4, max_len: int = 12, late_fraction: float = 0.5) -> dict:
    """Suggestions for `tag` given the dataset's caption texts (see module doc). JSON-ready dict."""
    tag = (tag or "").strip()
    if not tag:
        raise BPError("no tag given", hint="--tag TAG")
    if not 0 < late_fraction <= 1:
        raise BPError("late_fraction must be in (0, 1]")
    view = TokenizerView.of(tokenizer)
    texts = list(captions)
    counts, n_captions = count_tags(texts)
    # A letters-only word cannot span a comma, so "occurs in no caption" = occurs in no distinct tag (far less text).
    haystack = "\n".join(counts).lower()
    used_ids: set[int] = set()
    for ids in view.encode_many(list(counts)):
        used_ids.update(ids)

    n_merges = _merge_count(view)
    first_late = BYTE_TOKENS + int((1 - late_fraction) * n_merges)
    target = _letters(tag)
    matcher = difflib.SequenceMatcher(autojunk=False)
    matcher.set_seq2(target)
    pool: list[tuple[float, int, str]] = []
    for piece, token_id in view.vocab.items():
        if token_id < first_late or token_id >= BYTE_TOKENS + n_merges or not piece.endswith("</w>"):
            continue
        word = piece[:-4]
        if not (min_len <= len(word) <= max_len) or not _WORD.match(word):
            continue
        if token_id in used_ids:
            continue
        matcher.set_seq1(word)
        similarity = matcher.ratio() if target and matcher.real_quick_ratio() > 0 else 0.0
        pool.append((similarity, token_id, word))
    # Score = similarity (0..1) + lateness of the merge (0..1): recognisable and rare both count.
    pool.sort(key=lambda x: (-(x[0] + merge_rank(x[1]) / n_merges), -x[1]))

    tag_ids = view.encode(tag)
    out: list[dict] = []
    in_captions = 0
    batch = 64
    for start in range(0, len(pool), batch):
        group = []
        for item in pool[start:start + batch]:  # checked lazily: only as far down the ranking as needed
            if item[2] in haystack:
                in_captions += 1
            else:
                group.append(item)
        words = [w for _, _, w in group]
        alone = view.encode_many(words)
        before_comma = view.encode_many([w + "," for w in words])
        for (similarity, token_id, word), a, b in zip(group, alone, before_comma):
            if a != [token_id] or b != [token_id, view.comma_id]:
                continue
            rank = merge_rank(token_id)
            late_pct = 100.0 * (n_merges - rank) / n_merges
            reasons = [
                f"one CLIP token ({word}</w>, id {token_id}) alone and before a comma",
                f"rare: BPE merge {rank} of {n_merges} (among the last {late_pct:.1f}% learned)",
                f"in none of the {n_captions} captions, and no tag of the dataset uses this token",
            ]
            if similarity > 0:
                blocks = [target[m.b:m.b + m.size] for m in _blocks(word, target) if m.size >= 2]
                if blocks:
                    reasons.append("shares " + ", ".join(repr(b) for b in blocks) + " with the tag")
            out.append({"text": word, "id": token_id, "merge_rank": rank, "similarity": round(similarity, 3),
                        "score": round(similarity + rank / n_merges, 3), "reasons": reasons})
            if len(out) >= count:
                break
        if len(out) >= count:
            break

    return {
        "tag": tag,
        "tag_count": counts.get(tag, 0),
        "mangled": [m.to_dict() for m in mangled_words(tag, view)],  # the audit's flag: why replace it
        "tag_pieces": view.pieces(tag_ids),
        "tag_ids": tag_ids,
        "captions": n_captions,
        "candidates_considered": len(pool),
        "rejected_in_captions": in_captions,
        "suggestions": out,
    }


def _blocks(a: str, b: str):
    return difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks()


def suggest_replacements(root: "str | os.PathLike[str]", tag: str, tokenizer: Any = None, *,
                         caption_ext: str = ".txt", count: int = 10, min_len: int = 4, max_len: int = 12,
                         late_fraction: float = 0.5) -> dict:
    """Suggestions for `tag` in the dataset folder `root` (JSON-ready dict; see module doc)."""
    texts = [text for _, text in iter_caption_files(root, caption_ext)]
    result = suggest_for_counts(tag, texts, tokenizer, count=count, min_len=min_len, max_len=max_len,
                                late_fraction=late_fraction)
    return dict(result, root=os.fspath(root))


__all__ = ["suggest_replacements", "suggest_for_counts", "merge_rank"]
