"""The WebUI's 75-token chunking (`sd_hijack_clip.TextConditionalModel.tokenize_line`), on token ids only.

A prompt becomes chunks of 75 tokens (plus BOS and EOS = 77 ids each). A chunk closes when it is full, or at
`BREAK`. When a chunk is full and a comma occurred within its last `backtrack` tokens (the WebUI setting
"Prompt word wrap length limit", `comma_padding_backtrack`, default 20), the tokens after that comma move to
the next chunk, so a tag is not cut in two. The count the WebUI shows is 75 per closed chunk plus the real
tokens of the last one; the limit is the next multiple of 75.

Pure functions: no tokenizer, no model. A textual-inversion embedding (`EmbeddingUse`, found by the caller)
takes as many positions as it has vectors and moves whole to the next chunk when it does not fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence, Tuple, Union

CHUNK_LENGTH = 75
COMMA_ID = 267  # ',</w>' in the CLIP ViT-L/14 vocabulary
BOS_ID = 49406
EOS_ID = 49407
DEFAULT_BACKTRACK = 20



@dataclass(frozen=True)
class EmbeddingUse:
    """A textual-inversion embedding found in the prompt: `vectors` placeholder ids (0) in the chunk, never split
    across chunks. `first_id` is the first token of its name (the WebUI checks that one for the comma rule)."""

    name: str
    vectors: int
    first_id: int


# One segment of a parsed prompt: its (token id or EmbeddingUse, weight) pairs, or None for a BREAK.
Segment = Optional[Sequence[Tuple[Union[int, EmbeddingUse], float]]]


@dataclass
class Chunk:
    """One 77-id chunk. `start`/`end` are positions in the prompt's flat token stream (end exclusive)."""

    index: int
    start: int
    end: int
    ids: list = field(repr=False)  # 77 ids: BOS, tokens, EOS padding, EOS
    multipliers: list = field(repr=False)
    closed_by: str  # "full", "comma" (text after the last comma moved on), "BREAK", "embedding" (next one did not fit), "end"
    # (offset, EmbeddingUse) of each embedding placed in this chunk (the WebUI's PromptChunkFix): its vectors go to
    # positions offset+1 ... (0 is BOS). Like the WebUI, a fix stays with its chunk when the comma rule moves its
    # placeholders on to the next one.
    fixes: list = field(default_factory=list, repr=False)

    @property
    def count(self) -> int:
        return self.end - self.start

    @property
    def padding(self) -> int:
        return CHUNK_LENGTH - self.count

    def to_dict(self, with_ids: bool = False) -> dict:
        d = {"index": self.index, "start": self.start, "end": self.end, "tokens": self.count,
             "padding": self.padding, "closed_by": self.closed_by}
        if with_ids:
            d["ids"] = list(self.ids)
            d["multipliers"] = list(self.multipliers)
        return d


def target_token_count(count: int, chunk_length: int = CHUNK_LENGTH) -> int:
    """The limit shown beside the count: `ceil(max(count, 1) / 75) * 75`."""
    return math.ceil(max(count, 1) / chunk_length) * chunk_length


def chunk_segments(segments: Iterable[Segment], *, backtrack: int = DEFAULT_BACKTRACK,
                   comma_id: int = COMMA_ID, bos_id: int = BOS_ID, eos_id: int = EOS_ID,
                   chunk_length: int = CHUNK_LENGTH) -> tuple[list[Chunk], int]:
    """(chunks, token_count) for a prompt given as segments of (id, weight) pairs and BREAKs (None)."""
    chunks: list[Chunk] = []
    ids: list[int] = []
    mults: list[float] = []
    fixes: list = []
    first = 0  # flat position of ids[0]
    count = 0
    last_comma = -1

    def close(reason: str, last: bool = False) -> None:
        nonlocal ids, mults, fixes, first, count, last_comma
        count += len(ids) if last else chunk_length
        pad = max(0, chunk_length - len(ids))
        chunks.append(Chunk(
            index=len(chunks), start=first, end=first + len(ids),
            ids=[bos_id] + ids + [eos_id] * pad + [eos_id],
            multipliers=[1.0] + mults + [1.0] * pad + [1.0],
            closed_by=reason, fixes=fixes,
        ))
        first += len(ids)
        ids, mults, fixes = [], [], []
        last_comma = -1

    for segment in segments:
        if segment is None:
            close("BREAK")
            continue
        for token, weight in segment:
            embedding = token if isinstance(token, EmbeddingUse) else None
            if embedding is not None:
                token = embedding.first_id
            if token == comma_id:
                last_comma = len(ids)
            elif (backtrack != 0 and len(ids) == chunk_length and last_comma != -1
                  and len(ids) - last_comma <= backtrack):
                cut = last_comma + 1
                moved_ids, moved_mults = ids[cut:], mults[cut:]
                ids, mults = ids[:cut], mults[:cut]
                close("comma")
                ids, mults = moved_ids, moved_mults
            if len(ids) == chunk_length:
                close("full")
            if embedding is None:
                ids.append(token)
                mults.append(weight)
                continue
            if len(ids) + embedding.vectors > chunk_length:
                close("embedding")
            fixes.append((len(ids), embedding))
            ids.extend([0] * embedding.vectors)
            mults.extend([weight] * embedding.vectors)

    if ids or not chunks:
        close("end", last=True)
    return chunks, count


def chunk_dicts(chunks: Sequence[Chunk], with_ids: bool = False) -> list[dict]:
    return [c.to_dict(with_ids) for c in chunks]


__all__ = ["Chunk", "EmbeddingUse", "chunk_segments", "target_token_count", "chunk_dicts",
           "CHUNK_LENGTH", "COMMA_ID", "BOS_ID", "EOS_ID", "DEFAULT_BACKTRACK"]
