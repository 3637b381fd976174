"""Captions with tag embeddings, read the way WebUI v1.10.1 reads a prompt with textual-inversion embeddings.

1. Tokenize the caption (no BOS/EOS); wherever the id sequence of an embedding's name (either tag form)
   starts, the longest match is replaced by the embedding (`EmbeddingDatabase.find_embedding_at_position`).
2. Chunk it as the WebUI counts (`bp_trainer.tokens.chunks.chunk_segments`, the WebUI-exact counter): an
   embedding counts as its vectors, never splits, and moves whole to the next chunk when it does not fit; its
   positions hold placeholder id 0 (`PromptChunkFix`). At most `max_chunks` chunks are kept, as for any caption.
3. Encode: right after the token-embedding lookup the vectors replace the placeholders' rows (positions
   offset+1 ..., cut at the chunk's end: `EmbeddingsWithFixes.forward`); CLIP adds the position embeddings and
   runs its layers as usual, then clip skip and the final layer norm apply (`models.encode_captions` with
   `embeddings` does all three).

Gradients reach the vectors whether the text encoder's own weights are frozen or trained.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import torch

from bp_trainer.tokens.chunks import EmbeddingUse, chunk_segments
from bp_trainer.tokens.inspect import with_embeddings

CHUNK_WIDTH = 77  # BOS + 75 + EOS


def alias_lookup(plans: Sequence[Any]) -> Dict[int, list]:
    """{first id: [(ids, name, vectors), ...] longest first} over every alias of every plan (ties: plan order)."""
    lookup: Dict[int, list] = {}
    for plan in plans:
        for ids in plan.aliases:
            lookup.setdefault(ids[0], []).append((list(ids), plan.name, plan.vectors))
    for entries in lookup.values():
        entries.sort(key=lambda e: len(e[0]), reverse=True)
    return lookup


@dataclass(frozen=True)
class EmbeddedTokens:
    """Token ids (batch, chunks, 77) with placeholder 0 where vectors go, and the fixes of each flattened row
    (caption * chunks + chunk): (offset, embedding name) as in the WebUI's PromptChunkFix."""

    ids: torch.Tensor
    fixes: Tuple[Tuple[Tuple[int, str], ...], ...]


def caption_chunks(ids: Sequence[int], lookup: Dict[int, list], *, bos: int, eos: int, pad: int, comma: int,
                   backtrack: int, max_chunks: int) -> List[Tuple[List[int], List[Tuple[int, str]]]]:
    """One caption's chunks: (77 ids, fixes), at most `max_chunks`."""
    units = with_embeddings(list(ids), lookup)
    chunks, _count = chunk_segments([[(u, 1.0) for u in units]], backtrack=backtrack, comma_id=comma, bos_id=bos,
                                    eos_id=eos)
    out = []
    for c in chunks[:max_chunks]:
        body = c.ids[1:1 + c.count]
        row = [bos] + body + [eos] + [pad] * (CHUNK_WIDTH - 2 - len(body))
        out.append((row, [(offset, use.name) for offset, use in c.fixes if isinstance(use, EmbeddingUse)]))
    return out


def tokenize_with_embeddings(tokenizer: Any, captions: Sequence[str], max_chunks: int, lookup: Dict[int, list],
                             *, comma: int, backtrack: int) -> EmbeddedTokens:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    encoded = tokenizer(list(captions), add_special_tokens=False, truncation=False).input_ids
    per_caption = [caption_chunks(ids, lookup, bos=bos, eos=eos, pad=pad, comma=comma, backtrack=backtrack,
                                  max_chunks=max_chunks) for ids in encoded]
    n = max(len(c) for c in per_caption)
    empty = ([bos, eos] + [pad] * (CHUNK_WIDTH - 2), [])
    rows, fixes = [], []
    for chunks in per_caption:
        for row, fix in list(chunks) + [empty] * (n - len(chunks)):
            rows.append(row)
            fixes.append(tuple(fix))
    ids = torch.tensor(rows, dtype=torch.long).reshape(len(per_caption), n, CHUNK_WIDTH)
    return EmbeddedTokens(ids=ids, fixes=tuple(fixes))


def _placements(fixes: Sequence[Sequence[Tuple[int, str]]], starts: Dict[str, int], sizes: Dict[str, int],
                width: int) -> Tuple[List[int], List[int], List[int]]:
    """(rows, columns, rows of the stacked vectors) to write; a later fix wins a position, as the WebUI applies
    fixes one after another."""
    where: Dict[Tuple[int, int], int] = {}
    for row, row_fixes in enumerate(fixes):
        for offset, name in row_fixes:
            for j in range(min(width - offset - 1, sizes[name])):
                where[(row, offset + 1 + j)] = starts[name] + j
    keys = list(where)
    return [r for r, _ in keys], [c for _, c in keys], [where[k] for k in keys]


@contextlib.contextmanager
def vectors_inserted(text_encoder: Any, fixes: Sequence[Sequence[Tuple[int, str]]], embeddings: Any) -> Iterator[None]:
    """While open, the text encoder's token-embedding output has the embeddings' vectors at the fixes' positions
    (a forward hook on its input embeddings; a DDP-wrapped encoder is reached through `.module`)."""
    inner = getattr(text_encoder, "module", text_encoder)
    layer = inner.get_input_embeddings()
    rows, cols, src = _placements(fixes, embeddings.starts, embeddings.sizes, CHUNK_WIDTH)
    if not rows:
        yield
        return

    def insert(_module: Any, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        index = torch.tensor(src, device=output.device)
        values = embeddings.stacked().to(output.device)[index].to(output.dtype)
        r = torch.tensor(rows, device=output.device)
        c = torch.tensor(cols, device=output.device)
        return output.index_put((r, c), values)

    handle = layer.register_forward_hook(insert)
    try:
        yield
    finally:
        handle.remove()
