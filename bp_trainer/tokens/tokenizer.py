"""A thin, cached view over any HF `CLIPTokenizer`-like object.

Only calls that exist in transformers 4.30.2 (the WebUI's) and 5.x are used: `tokenizer(texts,
add_special_tokens=False, truncation=False)["input_ids"]`, `convert_ids_to_tokens`, `get_vocab()`,
`bos_token_id`/`eos_token_id`. Ids are cached per distinct text, so a dataset of 100k captions with a few
thousand distinct tags is tokenized once per tag.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, Iterable, Sequence

from bp_trainer.clip_vocab import bytes_to_unicode

_VIEWS: "weakref.WeakKeyDictionary[Any, TokenizerView]" = weakref.WeakKeyDictionary()
MAX_CACHED_TEXTS = 200_000  # distinct texts whose ids a view keeps (a dataset's distinct tags, prompt pieces)


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def readable_piece(piece: str) -> str:
    """A BPE piece as text: byte-level characters decoded, the word-end marker `</w>` shown as a space."""
    end = piece.endswith("</w>")
    core = piece[:-4] if end else piece
    dec = _byte_decoder()
    if all(c in dec for c in core):
        core = bytes(dec[c] for c in core).decode("utf-8", errors="replace")
    return core + (" " if end else "")


def readable_pieces(pieces: Sequence[str]) -> list[str]:
    """Display text of each piece of a token sequence, for characters cut across pieces too.

    CLIP's byte-level BPE can split one character (Japanese, many emoji) over several pieces; alone each part
    is no text. Here every piece shows the characters its bytes belong to, with `…` on the side where a
    character continues in the neighbouring piece: `初` over two pieces reads `初…`, `…初`. Linear: pieces
    that hold whole characters are decoded alone, only runs of pieces sharing a character byte by byte.
    """
    dec = _byte_decoder()
    raw: list[bytes] = []
    for piece in pieces:
        core = piece[:-4] if piece.endswith("</w>") else piece
        raw.append(bytes(dec[c] for c in core) if all(c in dec for c in core) else core.encode("utf-8"))
    texts: list[str] = []
    start = 0
    for k in range(1, len(raw) + 1):  # cut where the next piece starts a new character
        if k == len(raw) or not _continues(raw[k]):
            texts.extend(_readable_run(pieces[start:k], raw[start:k]))
            start = k
    return texts


def _continues(chunk: bytes) -> bool:
    """Whether these bytes start inside a character (a UTF-8 continuation byte)."""
    return bool(chunk) and chunk[0] & 0xC0 == 0x80


def _readable_run(pieces: Sequence[str], raw: Sequence[bytes]) -> list[str]:
    """`readable_pieces` of a run of pieces that starts and ends on character boundaries."""
    import codecs

    ends = [" " if p.endswith("</w>") else "" for p in pieces]
    if len(raw) == 1:
        return [raw[0].decode("utf-8", errors="replace") + ends[0]]
    # Character spans over the concatenated bytes.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    spans: list[tuple[int, int, str]] = []
    start = pos = 0
    for chunk in raw:
        for b in chunk:
            out = decoder.decode(bytes([b]))
            pos += 1
            if out:
                # A replacement char may complete together with the next char: give each its own span.
                for k, ch in enumerate(out):
                    spans.append((start if k == 0 else pos - 1, pos, ch))
                start = pos
    tail = decoder.decode(b"", final=True)
    if tail:
        spans.append((start, pos, tail))
    texts: list[str] = []
    offset = first = 0  # spans before `first` end before the current piece (both sorted by position)
    for end_mark, chunk in zip(ends, raw):
        a, b = offset, offset + len(chunk)
        offset = b
        while first < len(spans) and spans[first][1] <= a:
            first += 1
        parts = []
        k = first
        while k < len(spans) and spans[k][0] < b:
            s0, s1, ch = spans[k]
            parts.append(("…" if s0 < a else "") + ch + ("…" if s1 > b else ""))
            k += 1
        texts.append("".join(parts) + end_mark)
    return texts


class TokenizerView:
    """Cached tokenization plus the ids the WebUI's chunking needs (comma, BOS, EOS)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._ids: dict[str, list[int]] = {}
        self._vocab: dict[str, int] | None = None
        self._inverse: list[str] | None = None
        vocab = self.vocab
        self.comma_id = vocab.get(",</w>", 267)
        self.bos_id = getattr(tokenizer, "bos_token_id", None) or vocab.get("<|startoftext|>", 49406)
        self.eos_id = getattr(tokenizer, "eos_token_id", None) or vocab.get("<|endoftext|>", 49407)
        # Prompts longer than 77 tokens are the point here: silence transformers' one-time "longer than the
        # maximum sequence length" warning (a flag both 4.30 and 5.x keep in this dict).
        warned = getattr(tokenizer, "deprecation_warnings", None)
        if isinstance(warned, dict):
            warned["sequence-length-is-longer-than-the-specified-maximum"] = True

    @classmethod
    def of(cls, tokenizer: Any) -> "TokenizerView":
        """The shared view of `tokenizer` (None: the offline CLIP ViT-L/14 tokenizer)."""
        if isinstance(tokenizer, TokenizerView):
            return tokenizer
        if tokenizer is None:
            from bp_trainer.clip_vocab import clip_tokenizer

            tokenizer = clip_tokenizer()
        try:
            view = _VIEWS.get(tokenizer)
        except TypeError:  # not weak-referenceable / hashable: no sharing
            return cls(tokenizer)
        if view is None:
            view = cls(tokenizer)
            _VIEWS[tokenizer] = view
        return view

    @property
    def vocab(self) -> dict[str, int]:
        if self._vocab is None:
            self._vocab = dict(self.tokenizer.get_vocab())
        return self._vocab

    @property
    def vocab_by_id(self) -> list[str]:
        if self._inverse is None:
            inverse = [""] * (max(self.vocab.values()) + 1)
            for tok, i in self.vocab.items():
                inverse[i] = tok
            self._inverse = inverse
        return self._inverse

    def clean(self, text: str) -> str:
        """The text as the tokenizer reads it before BPE: transformers' slow CLIPTokenizer (the WebUI's) runs
        ftfy's `fix_text` (HTML entities, control characters, mojibake) and lower-cases."""
        fix = getattr(self.tokenizer, "fix_text", None)
        return (fix(text) if callable(fix) else text).lower()

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text without BOS/EOS and without truncation (the WebUI's `tokenize`)."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._ids))
        if len(self._ids) + len(missing) > MAX_CACHED_TEXTS:  # bounded memory in a long-lived process
            self._ids.clear()
            missing = list(dict.fromkeys(texts))
        if missing:
            out = self.tokenizer(missing, add_special_tokens=False, truncation=False)["input_ids"]
            for text, ids in zip(missing, out):
                self._ids[text] = list(ids)
        return [self._ids[t] for t in texts]

    def encode(self, text: str) -> list[int]:
        return self.encode_many([text])[0]

    def pieces(self, ids: Iterable[int]) -> list[str]:
        table = self.vocab_by_id
        return [table[i] if 0 <= i < len(table) and table[i] else str(i) for i in ids]


def find_model_tokenizer(sd_model: Any) -> Any:
    """The CLIP-L tokenizer of a WebUI model object, or None (no WebUI import; attribute lookups only).

    SD 1.x: `cond_stage_model.wrapped.tokenizer`; SDXL: the first embedder of the `GeneralConditioner`.
    """
    cond = getattr(sd_model, "cond_stage_model", None)
    if cond is None:
        return None
    for holder in (getattr(cond, "wrapped", None), cond):
        tok = getattr(holder, "tokenizer", None)
        if tok is not None and hasattr(tok, "get_vocab"):
            return tok
    for embedder in getattr(cond, "embedders", None) or []:
        for holder in (getattr(embedder, "wrapped", None), embedder):
            tok = getattr(holder, "tokenizer", None)
            if tok is not None and hasattr(tok, "get_vocab"):
                return tok
    return None
