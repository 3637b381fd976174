"""How CLIP reads a prompt: the WebUI's token counter, its 75-token chunks, and every tag with its weight,
BPE pieces and ids.

    >>> from bp_trainer.tokens import inspect_prompt
    >>> r = inspect_prompt("(masterpiece:1.2), long_hair")    # doctest: +SKIP
    >>> r["count"], r["limit"], r["tags"][1]["pieces"]          # doctest: +SKIP
    (5, 75, ['long</w>', '_</w>', 'hair</w>'])

A tag is a comma-separated piece of the prompt after emphasis parsing (`(masterpiece:1.2)` is the tag
`masterpiece` with weight 1.2). Token ids are exactly those the WebUI feeds to CLIP: each emphasis segment is
tokenized on its own, as `tokenize_line` does.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

from bp_trainer.errors import BPError
from bp_trainer.tokens.attention import is_break, parse_prompt_attention
from bp_trainer.tokens.chunks import DEFAULT_BACKTRACK, EmbeddingUse, chunk_segments, target_token_count
from bp_trainer.tokens.limits import DEFAULT_LIMITS, PromptLimits, parse_steps
from bp_trainer.tokens.mangled import mangled_by_tag
from bp_trainer.tokens.schedules import counter_prompts, strip_extra_networks, unique
from bp_trainer.tokens.tokenizer import TokenizerView, readable_pieces


@dataclass
class LineTokens:
    """One prompt line tokenized and chunked the WebUI's way."""

    text: str
    parsed: list  # [[text, weight], ...] with ["BREAK", -1] markers
    chunks: list  # [Chunk]
    count: int
    tags: list  # [dict]
    pieces: list  # BPE piece (or "<embedding>") at each position of the token stream

    @property
    def limit(self) -> int:
        return target_token_count(self.count)


def _parse(text: str, emphasis: bool) -> list:
    if not emphasis:
        return [[text, 1.0]]
    try:
        return parse_prompt_attention(text)
    except ValueError as exc:  # e.g. '(x:1.2.3)': the WebUI fails the same way
        raise BPError(f"the prompt's emphasis weight is not a number ({exc})", hint="write weights like (tag:1.2)") from exc


def _segment_tags(text: str, weight: float, ids: list[int], view: TokenizerView) -> list[tuple[str, list[int]]]:
    """Split one emphasis segment at its commas: [(piece text, piece ids)], the pieces' ids plus one comma
    token between neighbours making up exactly `ids`.

    Each comma-separated piece is tokenized alone and checked against the segment's own tokenization. A comma
    glued to other punctuation (',,' or ',(' is one BPE word, not the comma token) does not separate pieces;
    where a piece still does not align (text the tokenizer's clean-up changes), up to `_MAX_JOIN` neighbours
    are joined until their text tokenizes to the stream up to a real comma token, else the rest of the
    segment is one piece. Linear in the segment: each piece is tokenized a bounded number of times.
    """
    pieces = _comma_pieces(text)
    if len(pieces) == 1:
        return [(text, ids)]
    out: list[tuple[str, list[int]]] = []
    last = len(pieces) - 1
    i = off = 0
    while i <= last:
        j, joined = i, pieces[i]
        while True:
            t_ids = view.encode(joined)
            end = off + len(t_ids)
            if ids[off:end] == t_ids and ((j == last and end == len(ids))
                                          or (j < last and end < len(ids) and ids[end] == view.comma_id)):
                break
            if j == last or j - i >= _MAX_JOIN:  # no alignment: the rest of the segment is one piece
                joined, j = ",".join(pieces[i:]), last
                t_ids, end = ids[off:], len(ids)
                break
            j += 1
            joined = joined + "," + pieces[j]
        out.append((joined, t_ids))
        off, i = end + 1, j + 1
    return out


_MAX_JOIN = 8


def _comma_pieces(text: str) -> list[str]:
    """`text` split at the commas CLIP reads as the comma token: those without punctuation next to them."""
    def glued(ch: str) -> bool:  # CLIP's pre-tokenizer keeps a run of [^\s\p{L}\p{N}] together
        return not (ch.isspace() or ch.isalnum())

    pieces: list[str] = []
    start = 0
    for k, ch in enumerate(text):
        if ch == "," and not (k > 0 and glued(text[k - 1])) and not (k + 1 < len(text) and glued(text[k + 1])):
            pieces.append(text[start:k])
            start = k + 1
    pieces.append(text[start:])
    return pieces


def embedding_lookup(view: TokenizerView, embeddings: Optional[Mapping[str, int]]) -> dict[int, list]:
    """{first token id: [(name ids, name, vectors), ...] longest first}, as the WebUI's EmbeddingDatabase keeps it."""
    lookup: dict[int, list] = {}
    if not embeddings:
        return lookup
    names = list(embeddings)
    for name, ids in zip(names, view.encode_many(names)):
        vectors = int(embeddings[name])
        if ids and vectors > 0:
            lookup.setdefault(ids[0], []).append((ids, name, vectors))
    for first in lookup:
        lookup[first].sort(key=lambda x: len(x[0]), reverse=True)  # stable: first registered wins a tie
    return lookup


def with_embeddings(ids: list[int], lookup: dict[int, list]) -> list[Union[int, EmbeddingUse]]:
    """Token ids with every embedding name replaced by one EmbeddingUse (find_embedding_at_position)."""
    if not lookup:
        return list(ids)
    out: list[Union[int, EmbeddingUse]] = []
    i = 0
    while i < len(ids):
        for name_ids, name, vectors in lookup.get(ids[i], ()):
            if ids[i:i + len(name_ids)] == name_ids:
                out.append(EmbeddingUse(name, vectors, ids[i]))
                i += len(name_ids)
                break
        else:
            out.append(ids[i])
            i += 1
    return out


def tokenize_line(text: str, tokenizer: Any = None, *, backtrack: int = DEFAULT_BACKTRACK,
                  emphasis: bool = True, embeddings: Optional[Mapping[str, int]] = None,
                  limits: Optional[PromptLimits] = None) -> LineTokens:
    """Chunks, count and tags of one prompt line (no schedule expansion), as `tokenize_line` in the WebUI.

    `emphasis=False` is the WebUI's emphasis mode "None" (brackets are literal text). `embeddings` maps the
    textual-inversion embeddings the WebUI has loaded (name -> number of vectors) so that their names count as
    their vectors, as in the WebUI (an embedding name containing a comma is not recognised).
    """
    view = TokenizerView.of(tokenizer)
    lookup = embedding_lookup(view, embeddings)
    parsed = _parse(text, emphasis)
    texts = [t for t, w in parsed if not is_break([t, w])]
    if limits is not None:
        limits.check_words(texts, view.clean)
    seg_ids = iter(view.encode_many(texts))
    comma_piece = view.pieces([view.comma_id])[0]

    segments: list[Optional[list[tuple[Any, float]]]] = []
    stream_pieces: list[str] = []
    tags: list[dict] = []
    current: dict | None = None

    def close_tag() -> None:
        nonlocal current
        if current is not None and (current["text"].strip() or current["ids"]):
            tags.append(current)
        current = None

    for seg_text, weight in parsed:
        if is_break([seg_text, weight]):
            close_tag()
            segments.append(None)
            continue
        ids = next(seg_ids)
        units: list[Union[int, EmbeddingUse]] = []
        for i, (piece_text, piece_ids) in enumerate(_segment_tags(seg_text, weight, ids, view)):
            if i:  # a comma token separates this piece from the previous one
                close_tag()
                units.append(view.comma_id)
                stream_pieces.append(comma_piece)
            if current is None:
                current = {"text": "", "ids": [], "pieces": [], "weights": [], "start": len(stream_pieces),
                           "embeddings": []}
            current["text"] += piece_text
            piece_units = with_embeddings(piece_ids, lookup)
            units.extend(piece_units)
            for u in piece_units:
                if isinstance(u, EmbeddingUse):
                    current["ids"].extend([0] * u.vectors)
                    current["pieces"].extend([f"<{u.name}>"] * u.vectors)
                    current["weights"].extend([weight] * u.vectors)
                    current["embeddings"].append(u.name)
                    stream_pieces.extend([f"<{u.name}>"] * u.vectors)
                else:
                    piece = view.pieces([u])[0]
                    current["ids"].append(u)
                    current["pieces"].append(piece)
                    current["weights"].append(weight)
                    stream_pieces.append(piece)
        segments.append([(u, weight) for u in units])
    close_tag()

    chunks, count = chunk_segments(segments, backtrack=backtrack, comma_id=view.comma_id,
                                   bos_id=view.bos_id, eos_id=view.eos_id)
    chunk_ends = [c.end for c in chunks]
    for tag in tags:
        _finish_tag(tag, chunk_ends)
    return LineTokens(text=text, parsed=parsed, chunks=chunks, count=count, tags=tags, pieces=stream_pieces)


def _chunk_at(chunk_ends: list[int], position: int) -> int:
    """Index of the chunk holding a stream position (chunks are contiguous; past the end: the last chunk)."""
    return min(bisect.bisect_right(chunk_ends, position), max(len(chunk_ends) - 1, 0))


def _finish_tag(tag: dict, chunk_ends: list[int]) -> None:
    weights = tag["weights"]
    tag["text"] = tag["text"].strip()
    tag["end"] = tag["start"] + len(tag["ids"])
    if weights:
        counts = Counter(weights)
        top = max(counts.values())
        tag["weight"] = next(w for w in weights if counts[w] == top)  # the most frequent; first seen on ties
    else:
        tag["weight"] = 1.0
    tag["mixed_weights"] = len(set(weights)) > 1
    tag["chunk"] = _chunk_at(chunk_ends, tag["start"])
    tag["crosses_chunk"] = bool(tag["ids"]) and _chunk_at(chunk_ends, tag["end"] - 1) != tag["chunk"]
    order = ["text", "weight", "pieces", "ids", "weights", "mixed_weights", "start", "end", "chunk", "crosses_chunk"]
    items = {k: tag[k] for k in order}
    if tag["embeddings"]:
        items["embeddings"] = tag["embeddings"]
    tag.clear()
    tag.update(items)


def token_counter(text: str, tokenizer: Any = None, *, steps: int = 20, negative: bool = False,
                  backtrack: int = DEFAULT_BACKTRACK, emphasis: bool = True, hires_steps: int | None = None,
                  use_old_scheduling: bool = False, embeddings: Optional[Mapping[str, int]] = None,
                  limits: Optional[PromptLimits] = DEFAULT_LIMITS) -> tuple[int, int]:
    """(count, limit) exactly as the WebUI's prompt box shows them for `steps` sampling steps."""
    best = max(_variants(text, tokenizer, steps, negative, hires_steps, use_old_scheduling, limits,
                         backtrack=backtrack, emphasis=emphasis, embeddings=embeddings), key=lambda v: v.count)
    return best.count, best.limit


def _variants(text: str, tokenizer: Any, steps: int, negative: bool, hires_steps: int | None,
              use_old_scheduling: bool, limits: Optional[PromptLimits], **line_options: Any) -> list[LineTokens]:
    """Every distinct text the counter measures, tokenized; within `limits` (None: unbounded)."""
    parse_steps(steps)
    if hires_steps is not None:
        parse_steps(hires_steps, "hires_steps")
    if limits is not None:
        limits = limits.started()
        limits.check_prompt(text)
    texts = unique(counter_prompts(text, steps, negative=negative, hires_steps=hires_steps,
                                   use_old_scheduling=use_old_scheduling, limits=limits))
    lines = []
    for t in texts:
        if limits is not None:
            limits.check_time()
        lines.append(tokenize_line(t, tokenizer, limits=limits, **line_options))
    return lines


def _mark_mangled(tags: list, tokenizer: Any) -> None:
    """Give each tag `mangled`: the words CLIP cuts into meaningless pieces (none for textual inversions)."""
    plain = [t["text"] for t in tags if not t.get("embeddings")]
    verdicts = mangled_by_tag(plain, tokenizer)
    for tag in tags:
        tag["mangled"] = [m.to_dict() for m in verdicts.get(tag["text"], [])] if not tag.get("embeddings") else []


def token_chips(line: LineTokens) -> list[dict]:
    """One entry per token of the stream, for drawing chips: position, id, BPE piece, display text (a character
    cut across pieces shows on each with `…`), weight, chunk, and the index of its tag in `tags` (None for the
    comma tokens between tags)."""
    owner: dict[int, int] = {}
    for i, tag in enumerate(line.tags):
        for p in range(tag["start"], tag["end"]):
            owner[p] = i
    texts = readable_pieces(line.pieces)
    chips = []
    for c in line.chunks:
        ids = c.ids[1:1 + c.count]
        for k, token in enumerate(ids):
            pos = c.start + k
            piece = line.pieces[pos]
            chips.append({"pos": pos, "id": token, "piece": piece, "text": texts[pos],
                          "weight": c.multipliers[1 + k], "chunk": c.index, "tag": owner.get(pos)})
    return chips


def inspect_prompt(text: str, tokenizer: Any = None, *, steps: int = 20, negative: bool = False,
                   backtrack: int = DEFAULT_BACKTRACK, emphasis: bool = True, hires_steps: int | None = None,
                   use_old_scheduling: bool = False, embeddings: Optional[Mapping[str, int]] = None,
                   with_ids: bool = False, limits: Optional[PromptLimits] = DEFAULT_LIMITS) -> dict:
    """Everything the inspector shows for a prompt, as a JSON-ready dict.

    `count`/`limit` are the WebUI's counter (the largest over `AND` parts and schedule variants at `steps`).
    `chunks` and `tags` describe the variant that gives that count (`text`); `variants` lists each distinct
    text the counter measured with its own count. `embeddings`: the WebUI's loaded textual inversions
    (name -> vectors), see `tokenize_line`. `steps` (and `hires_steps`) are 1..150; `limits` bounds the work a
    hostile prompt can cause (`bp_trainer.tokens.limits`; None: unbounded, for trusted local use).
    """
    limits = limits.started() if limits is not None else None
    variants = _variants(text, tokenizer, steps, negative, hires_steps, use_old_scheduling, limits,
                         backtrack=backtrack, emphasis=emphasis, embeddings=embeddings)
    if limits is not None:
        limits.check_time()  # before the per-token chips
    best = max(variants, key=lambda v: v.count)
    _mark_mangled(best.tags, tokenizer)
    _, networks = strip_extra_networks(text)
    return {
        "prompt": text,
        "negative": negative,
        "steps": steps,
        "count": best.count,
        "limit": best.limit,
        "text": best.text,
        "chunks": [c.to_dict(with_ids) for c in best.chunks],
        "tags": best.tags,
        "tokens": token_chips(best),
        "variants": [{"text": v.text, "count": v.count, "limit": v.limit} for v in variants],
        "extra_networks": networks,
    }
