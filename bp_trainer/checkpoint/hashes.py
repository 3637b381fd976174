"""Model hashes exactly as the AUTOMATIC1111 WebUI computes them.

- `sha256`: SHA-256 of the whole file (`modules/hashes.py: calculate_sha256`, read in 1 MiB blocks).
- `autov2`: its first 10 hex characters, the "Model hash" of infotexts and the `[abcdef0123]` of the model list.
- `old`: the legacy 8-hex hash (`modules/sd_models.py: model_hash`): SHA-256 of the 0x10000 bytes at offset
  0x100000 (of whatever is there: a shorter file hashes fewer, possibly zero, bytes).
"""

from __future__ import annotations

import hashlib
import os

from bp_trainer.errors import BPError

OLD_HASH_OFFSET = 0x100000
OLD_HASH_LENGTH = 0x10000
_BLOCK = 1 << 20


def old_hash_of_bytes(data: bytes) -> str:
    """Old 8-hex hash of a file whose bytes [0x100000, 0x110000) are `data`."""
    return hashlib.sha256(data).hexdigest()[0:8]


def hashes_from_sha256(sha256_hex: str, old: str) -> dict[str, str]:
    return {"sha256": sha256_hex, "autov2": sha256_hex[0:10], "old": old}


def file_hashes(path: "str | os.PathLike[str]") -> dict[str, str]:
    """{"sha256", "autov2", "old"} of a file, reading it once in 1 MiB blocks (constant memory)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise BPError("not a file (a folder has no WebUI hash)" if os.path.isdir(path) else "file not found", path=path)
    sha = hashlib.sha256()
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    with open(path, "rb") as fh:
        while True:
            n = fh.readinto(buf)
            if not n:
                break
            sha.update(view[:n])
        fh.seek(OLD_HASH_OFFSET)
        old = old_hash_of_bytes(fh.read(OLD_HASH_LENGTH))
    return hashes_from_sha256(sha.hexdigest(), old)


class HashingWriter:
    """Wraps a binary file being written sequentially: computes the WebUI hashes of what passes through."""

    def __init__(self, fh):
        self.fh = fh
        self.sha = hashlib.sha256()
        self.pos = 0
        self._old = bytearray()

    def write(self, data) -> int:
        mv = memoryview(data).cast("B")
        n = len(mv)
        self.fh.write(mv)
        self.sha.update(mv)
        end = self.pos + n
        lo, hi = OLD_HASH_OFFSET, OLD_HASH_OFFSET + OLD_HASH_LENGTH
        if end > lo and self.pos < hi:
            self._old += mv[max(lo - self.pos, 0) : min(hi - self.pos, n)]
        self.pos = end
        return n

    def hashes(self) -> dict[str, str]:
        return hashes_from_sha256(self.sha.hexdigest(), old_hash_of_bytes(bytes(self._old)))
