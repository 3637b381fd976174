"""One cached tensor per `.safetensors` file, tagged with the full key it was computed for (the latent cache and
the text cache). A file whose key differs (stale, foreign, a hash collision) or that cannot be read is a miss;
a write is atomic, so a killed run never leaves half a file under a cache name."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch


def read_keyed(file: Path, key: str, name: str, *, load: bool = True) -> Optional[torch.Tensor]:
    """The tensor `name` of `file` when the file was written for `key` (one open); with `load=False` an empty
    tensor stands for "present" (the metadata alone is read). None: a miss."""
    if not file.exists():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as fh:
            if (fh.metadata() or {}).get("key") != key:
                return None
            return fh.get_tensor(name) if load else torch.empty(0)
    except Exception:  # noqa: BLE001 - a damaged cache file is a miss (it is re-encoded and replaced)
        return None


def write_keyed(file: Path, key: str, name: str, tensor: torch.Tensor) -> None:
    """Write `tensor` as `name` into `file`, tagged with `key`, atomically."""
    from safetensors.torch import save_file

    from bp_trainer.fsutil import atomic_path

    with atomic_path(file) as tmp:
        save_file({name: tensor}, str(tmp), metadata={"key": key})
