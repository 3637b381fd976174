"""Checkpoint toolkit: read, inspect, convert, assemble and write SD 1.x/2.x checkpoints; WebUI hashes.

Imports only torch/stdlib at module level (the WebUI process uses it); diffusers is imported lazily by
`convert` (LDM -> diffusers) only. The names below are loaded on first use, so `bp_trainer.checkpoint.hashes`
can be imported (and start hashing) before torch is.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "file_hashes": "bp_trainer.checkpoint.hashes",
    "open_file": "bp_trainer.checkpoint.io",
    "write_checkpoint": "bp_trainer.checkpoint.io",
    "diffusers_to_ldm": "bp_trainer.checkpoint.ldm_keys",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bp_trainer.checkpoint' has no attribute {name!r}")
