"""Captions for training: Danbooru-style tag lists, shuffled / dropped out reproducibly, and 3x75-token chunks.

`CaptionProcessor.process(caption, rng)` takes any rng with `.random()` (a `random.Random` or a numpy
`Generator`), draws from it in a fixed order, and so gives the same text for the same seed on every machine.

Order of operations: whole-caption dropout (returns "" for classifier-free guidance) -> split on the separator
-> keep the first `keep_first` tags in place -> drop each other tag with probability `tag_dropout` -> shuffle the
others -> underscores to spaces (kaomoji such as `^_^` or `o_o` are left alone) -> bracket escaping.

Bracket escaping (`(` -> `\\(` ...) makes a caption safe to paste into the WebUI, whose prompt parser reads
`(tag)` as emphasis and `\\(` as a literal bracket. CLIP itself never sees the backslash in the WebUI, so leave
escaping off for the text a trainer tokenizes, and turn it on for captions meant as WebUI prompts.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace
from typing import Any, List, Sequence

_UNESCAPED_BRACKET = re.compile(r"(?<!\\)([()\[\]])")
_ESCAPED_BRACKET = re.compile(r"\\([()\[\]])")


def split_tags(caption: str, separator: str = ",") -> "list[str]":
    """Tags of a caption: split on `separator` (and line breaks), stripped, empty ones removed."""
    parts = caption.replace("\r", "\n").replace("\n", separator).split(separator)
    return [t.strip() for t in parts if t.strip()]


def underscores_to_spaces(tag: str) -> str:
    """`long_hair` -> `long hair`; kaomoji made of one-character parts (`^_^`, `o_o`, `>_<`) are kept."""
    if "_" not in tag or all(len(part) <= 1 for part in tag.split("_")):
        return tag
    return tag.replace("_", " ")


def escape_brackets(text: str) -> str:
    """Escape `(`, `)`, `[`, `]` as the WebUI's prompt parser expects literal brackets (already escaped ones stay)."""
    return _UNESCAPED_BRACKET.sub(r"\\\1", text)


def unescape_brackets(text: str) -> str:
    """Undo `escape_brackets`: `\\(` -> `(` (what the WebUI's parser hands to CLIP)."""
    return _ESCAPED_BRACKET.sub(r"\1", text)


def _shuffle(items: "List[Any]", rng: Any) -> None:
    # Fisher-Yates with rng.random() only, so random.Random and numpy Generators give reproducible results
    for i in range(len(items) - 1, 0, -1):
        j = min(int(rng.random() * (i + 1)), i)
        items[i], items[j] = items[j], items[i]


@dataclass(frozen=True)
class CaptionProcessor:
    shuffle: bool = False
    keep_first: int = 0
    tag_dropout: float = 0.0
    caption_dropout: float = 0.0
    underscores_to_spaces: bool = False
    escape_brackets: bool = False
    separator: str = ","
    joiner: str = ", "

    def __post_init__(self) -> None:
        from bp_trainer.errors import ConfigError

        for name in ("tag_dropout", "caption_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be between 0 and 1, got {value}")
        if self.keep_first < 0:
            raise ConfigError(f"keep_first must be 0 or more, got {self.keep_first}")
        if not self.separator:
            raise ConfigError("the tag separator must not be empty")

    @property
    def is_random(self) -> bool:
        return self.shuffle or self.tag_dropout > 0 or self.caption_dropout > 0

    def process(self, caption: str, rng: Any = None) -> str:
        """The training text for `caption`. `rng` (with `.random()`) is required when anything is random."""
        if self.is_random and rng is None:
            raise ValueError("this CaptionProcessor shuffles or drops tags: pass a seeded rng")
        if self.caption_dropout > 0 and rng.random() < self.caption_dropout:
            return ""
        tags = split_tags(caption, self.separator)
        fixed, rest = tags[: self.keep_first], tags[self.keep_first:]
        if self.tag_dropout > 0:
            rest = [t for t in rest if rng.random() >= self.tag_dropout]
        if self.shuffle:
            _shuffle(rest, rng)
        tags = fixed + rest
        if self.underscores_to_spaces:
            tags = [underscores_to_spaces(t) for t in tags]
        text = self.joiner.join(tags)
        return escape_brackets(text) if self.escape_brackets else text


@dataclass(frozen=True)
class CaptionVariants:
    """A fixed set of `count` processed versions of each caption, for a cached text encoder: the text a batch
    trains on is one of them (drawn per epoch), so every text is known, and encoded, before training.

    Variant `v` of an image's caption is `processor` (without its caption dropout) seeded by (`seed`, `v`, the
    image's key); caption dropout stays a draw per epoch, giving "" (so it drops as often as without a cache).
    Without shuffle and tag dropout there is one variant."""

    processor: CaptionProcessor
    count: int
    seed: int

    @property
    def per_caption(self) -> int:
        p = self.processor
        return self.count if (p.shuffle or p.tag_dropout > 0) else 1

    def variant(self, caption: str, image_key: str, v: int) -> str:
        processor = replace(self.processor, caption_dropout=0.0)
        if not processor.is_random:
            return processor.process(caption)
        return processor.process(caption, random.Random(f"{self.seed}:variant:{v}:{image_key}"))

    def texts(self, caption: str, image_key: str) -> "list[str]":
        """Every text `pick` can return for this caption (distinct, in variant order)."""
        out = [self.variant(caption, image_key, v) for v in range(self.per_caption)]
        if self.processor.caption_dropout > 0:
            out.append("")
        return list(dict.fromkeys(out))

    def pick(self, caption: str, image_key: str, rng: Any) -> str:
        """The text of one epoch's item (`rng`: that item's seeded rng, as `CaptionProcessor.process` takes)."""
        if self.processor.caption_dropout > 0 and rng.random() < self.processor.caption_dropout:
            return ""
        n = self.per_caption
        return self.variant(caption, image_key, min(int(rng.random() * n), n - 1))


def chunk_token_ids(
    ids: "Sequence[int]",
    bos: int,
    eos: int,
    pad: int,
    chunk_len: int = 75,
    max_chunks: int = 3,
    *,
    comma: "int | None" = None,
    backtrack: int = 20,
) -> "list[list[int]]":
    """Split token ids (no BOS/EOS) into chunks of `chunk_len`: each chunk is BOS + ids + EOS, padded with `pad`.

    At most `max_chunks` chunks (3 x 75 = 225 tokens, naifu/NovelAI and the WebUI); extra tokens are cut.
    An empty caption gives one chunk `[BOS, EOS, pad, ...]`. With `comma` set, a chunk that would split a tag
    ends after its last comma when that comma is within `backtrack` tokens of the end, and the rest moves on to
    the next chunk: the WebUI's "prompt word wrap length limit" (comma_padding_backtrack, default 20), with its
    exact boundary rules (checked against `bp_trainer.tokens.chunks`, the WebUI-exact counter).
    """
    if chunk_len <= 0 or max_chunks <= 0:
        raise ValueError("chunk_len and max_chunks must be positive")
    ids = list(ids)
    pieces: "list[list[int]]" = []
    start = 0
    while start < len(ids) and len(pieces) < max_chunks:
        end = min(start + chunk_len, len(ids))
        if comma is not None and backtrack > 0 and end < len(ids) and ids[end] != comma:
            # the WebUI's rule: a full chunk followed by a non-comma token ends after its last comma when that
            # comma is at index >= chunk_len - backtrack
            window = ids[start:end]
            last = max((i for i, t in enumerate(window) if t == comma), default=-1)
            if last >= 0 and len(window) - last <= backtrack:
                end = start + last + 1
        pieces.append(ids[start:end])
        start = end
    if not pieces:
        pieces = [[]]
    return [[bos] + p + [eos] + [pad] * (chunk_len - len(p)) for p in pieces]


def pad_chunks(chunks: "list[list[int]]", n: int, bos: int, eos: int, pad: int) -> "list[list[int]]":
    """Extend a caption's chunks to `n` with empty chunks `[BOS, EOS, pad...]` (to batch captions of different lengths)."""
    width = len(chunks[0]) if chunks else 77
    return list(chunks) + [[bos, eos] + [pad] * (width - 2) for _ in range(n - len(chunks))]


def tokenize_caption(text: str, tokenizer: Any, chunk_len: int = 75, max_chunks: int = 3, **kw: Any) -> "list[list[int]]":
    """Tokenize `text` with a transformers CLIP tokenizer (4.30 or 5.x) into `chunk_token_ids` chunks."""
    ids = tokenizer(text, add_special_tokens=False, truncation=False).input_ids
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return chunk_token_ids(ids, tokenizer.bos_token_id, tokenizer.eos_token_id, pad, chunk_len, max_chunks, **kw)
