"""Checkpoint toolkit: read, inspect, convert, assemble and write SD 1.x/2.x checkpoints; WebUI hashes.

Imports only torch/safetensors/stdlib at module level (the WebUI process uses it); diffusers is imported
lazily by `convert` (LDM -> diffusers) only.
"""

from bp_trainer.checkpoint.hashes import file_hashes
from bp_trainer.checkpoint.io import open_file, write_checkpoint
from bp_trainer.checkpoint.ldm_keys import diffusers_to_ldm

__all__ = ["file_hashes", "open_file", "write_checkpoint", "diffusers_to_ldm"]
