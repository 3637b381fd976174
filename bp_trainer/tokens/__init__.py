"""CLIP tokenizer inspector and caption tag tools (no WebUI imports; lark/transformers loaded lazily).

Prompt side (WebUI v1.10.1 exact): `parse_prompt_attention`, `prompt_schedule`, `token_counter`,
`tokenize_line`, `inspect_prompt` (bounded by `PromptLimits`). Dataset side: `audit_dataset` with the
word-level flag `mangled_words`, `plan_rename` / `apply_rename` / `undo_rename`, `suggest_replacements`.
See docs/tokens.md.
"""

from __future__ import annotations

from bp_trainer.tokens.attention import parse_prompt_attention
from bp_trainer.tokens.chunks import Chunk, chunk_segments, target_token_count
from bp_trainer.tokens.inspect import inspect_prompt, token_counter, tokenize_line
from bp_trainer.tokens.limits import DEFAULT_LIMITS, PromptLimits
from bp_trainer.tokens.mangled import MangledWord, mangled_words
from bp_trainer.tokens.schedules import counter_prompts, prompt_schedule, split_and, strip_extra_networks
from bp_trainer.tokens.tokenizer import TokenizerView, find_model_tokenizer, readable_piece, readable_pieces

__all__ = [
    "parse_prompt_attention", "Chunk", "chunk_segments", "target_token_count", "inspect_prompt", "token_counter",
    "tokenize_line", "counter_prompts", "prompt_schedule", "split_and", "strip_extra_networks", "TokenizerView",
    "find_model_tokenizer", "readable_piece", "readable_pieces", "PromptLimits", "DEFAULT_LIMITS", "MangledWord",
    "mangled_words",
]
