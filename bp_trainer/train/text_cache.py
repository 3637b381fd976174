"""The frozen text encoder's outputs, computed once before training (`text_cache.mode: memory | disk`).

Every text a run can train on is known in advance (`CaptionVariants`: a fixed number of shuffled / dropped-out
versions of each caption, plus "" for caption dropout), so the loop encodes them all before the first step and the
text encoder then leaves the GPU. A batch's conditioning is the cached outputs of its texts, padded to the same
number of 77-token chunks with the output of the empty chunk, as `encode_captions` pads a batch.

Entries are keyed by the text and an identity of everything the output depends on (the text encoder's weights,
the tokenizer, clip skip, the chunk limit, the dtype). On disk each text has one file
`DIR/<hh>/<sha1>.safetensors` whose metadata holds its identity and text (`cache_files`: a stale or foreign file is
re-encoded and replaced atomically), so runs with the same encoder share the folder.

Values are stored in the autocast dtype of the run (bf16/fp16): the UNet reads the conditioning only through its
cross-attention projections, which autocast casts to that dtype anyway, so the cached run computes the same as an
uncached one, with half the storage of fp32.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch

from bp_trainer.errors import BPError
from bp_trainer.train.cache_files import read_keyed, write_keyed

EMPTY = ""


def weights_identity(state: "Dict[str, torch.Tensor]", *, samples: int = 4096) -> str:
    """A short identity of a module's weights: every tensor's name, shape and dtype, and `samples` values strided
    across each tensor (so a fine-tuned encoder, whose every tensor moved, gets a new identity)."""
    h = hashlib.sha1()
    for name, t in state.items():
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        h.update(flat[::step].to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_identity(text_encoder_state: "Dict[str, torch.Tensor]", tokenizer: Any, *, clip_skip: int,
                   max_chunks: int, dtype: torch.dtype) -> str:
    vocab = getattr(tokenizer, "vocab_size", None)
    parts = [weights_identity(text_encoder_state), type(tokenizer).__name__, str(vocab), f"skip{clip_skip}",
             f"chunks{max_chunks}", str(dtype)]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


class TextCache:
    """Text -> conditioning `(chunks * 77, dim)` of one text encoder setting, in memory or on disk."""

    def __init__(self, mode: str, directory: "str | os.PathLike[str] | None", identity: str, dtype: torch.dtype):
        if mode not in ("memory", "disk"):
            raise ValueError(mode)
        self.mode, self.identity, self.dtype = mode, identity, dtype
        self.dir = Path(directory) if directory is not None else None
        self._mem: Dict[str, torch.Tensor] = {}
        self._empty: Optional[torch.Tensor] = None
        self.encoded = 0  # texts encoded by this process (the rest came from the disk)
        if mode == "disk":
            assert self.dir is not None
            self.dir.mkdir(parents=True, exist_ok=True)

    def _file(self, text: str) -> Path:
        digest = hashlib.sha1(f"{self.identity}\0{text}".encode("utf-8")).hexdigest()
        assert self.dir is not None
        return self.dir / digest[:2] / f"{digest[2:26]}.safetensors"

    def _key(self, text: str) -> str:
        return f"{self.identity}|{text}"  # (the identity is 16 hex digits: the text is the rest)

    def has(self, text: str) -> bool:
        if self.mode == "memory":
            return text in self._mem
        return read_keyed(self._file(text), self._key(text), "cond", load=False) is not None

    def get(self, text: str) -> Optional[torch.Tensor]:
        return self._mem.get(text) if self.mode == "memory" else read_keyed(self._file(text), self._key(text), "cond")

    def put(self, text: str, cond: torch.Tensor) -> None:
        cond = cond.detach().to("cpu", self.dtype).contiguous()
        self.encoded += 1
        if self.mode == "memory":
            self._mem[text] = cond
            return
        write_keyed(self._file(text), self._key(text), "cond", cond)

    def missing(self, texts: Iterable[str]) -> List[str]:
        return [t for t in dict.fromkeys(texts) if not self.has(t)]

    def fill(self, texts: Sequence[str], encode: Callable[[List[str]], torch.Tensor],
             chunks_of: Callable[[str], int], *, batch_size: int,
             progress: Optional[Callable[[int, int], None]] = None) -> None:
        """Encode the `texts` not cached yet, `batch_size` at a time; texts of the same chunk count share a batch,
        so no batch is padded. `encode(texts) -> (batch, chunks * 77, dim)`."""
        todo = self.missing(texts)
        by_chunks: Dict[int, List[str]] = {}
        for text in todo:
            by_chunks.setdefault(chunks_of(text), []).append(text)
        done = 0
        for group in by_chunks.values():
            for start in range(0, len(group), batch_size):
                batch = group[start:start + batch_size]
                out = encode(batch)
                for text, cond in zip(batch, out):
                    self.put(text, cond)
                done += len(batch)
                if progress is not None:
                    progress(done, len(todo))

    def conditioning(self, texts: Sequence[str], device: torch.device) -> torch.Tensor:
        """The batch's conditioning `(batch, chunks * 77, dim)` on `device`, as `encode_captions` gives it."""
        conds = []
        for text in texts:
            cond = self.get(text)
            if cond is None:
                raise BPError(f"the text cache has no entry for the caption {text[:60]!r}",
                              path=str(self.dir or "memory"),
                              hint="do not delete the text cache while a run uses it; resume to rebuild it")
            conds.append(cond)
        longest = max(c.shape[0] for c in conds)
        if any(c.shape[0] < longest for c in conds):
            empty = self._empty_chunk()
            conds = [torch.cat([c] + [empty] * ((longest - c.shape[0]) // empty.shape[0])) for c in conds]
        return torch.stack(conds).to(device, non_blocking=True)

    def _empty_chunk(self) -> torch.Tensor:
        if self._empty is None:
            empty = self.get(EMPTY)
            if empty is None:
                raise BPError("the text cache has no entry for the empty caption", path=str(self.dir or "memory"),
                              hint="resume to rebuild the text cache")
            self._empty = empty
        return self._empty
