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
    """Wraps a binary file being written sequentially (e.g. by `torch.save`): computes the WebUI hashes of
    what passes through. `error` keeps the file's own failure (a library may report it as something else)."""

    def __init__(self, fh):
        self.fh = fh
        self.sha = hashlib.sha256()
        self.pos = 0
        self._old = bytearray()
        self.error: "OSError | None" = None

    def write(self, data) -> int:
        mv = memoryview(data).cast("B")
        n = len(mv)
        try:
            self.fh.write(mv)
        except OSError as exc:
            self.error = self.error or exc
            raise
        self.sha.update(mv)
        end = self.pos + n
        lo, hi = OLD_HASH_OFFSET, OLD_HASH_OFFSET + OLD_HASH_LENGTH
        if end > lo and self.pos < hi:
            self._old += mv[max(lo - self.pos, 0) : min(hi - self.pos, n)]
        self.pos = end
        return n

    def flush(self) -> None:
        try:
            self.fh.flush()
        except OSError as exc:
            self.error = self.error or exc
            raise

    def hashes(self) -> dict[str, str]:
        return hashes_from_sha256(self.sha.hexdigest(), old_hash_of_bytes(bytes(self._old)))


class FollowingHasher:
    """Hashes a file while it is being written with positioned writes, possibly out of order.

    The writers report each completely written region with `written(offset, n)`; a thread reads the file
    back (from the page cache) in order up to the contiguous written watermark and hashes it, so when the
    last write lands only the tail is left to hash. `result()` waits for the end and returns the WebUI
    hashes of the `total` bytes; `abort()` stops it (after a failed write)."""

    def __init__(self, path: "str | os.PathLike[str]", total: int):
        import threading

        self.path, self.total = os.fspath(path), int(total)
        self._cond = threading.Condition()
        self._pending: dict[int, int] = {}  # start -> end of written regions beyond the watermark
        self._mark = 0
        self._aborted = False
        self._error: "BaseException | None" = None
        self._sha = hashlib.sha256()
        self._old = bytearray()
        self._thread = threading.Thread(target=self._run, name="bp-ckpt-hash", daemon=True)
        self._thread.start()

    def written(self, offset: int, n: int) -> None:
        if n <= 0:
            return
        with self._cond:
            self._pending[int(offset)] = int(offset) + int(n)
            advanced = False
            while self._mark in self._pending:
                self._mark = self._pending.pop(self._mark)
                advanced = True
            if advanced:
                self._cond.notify()

    def abort(self) -> None:
        with self._cond:
            self._aborted = True
            self._cond.notify()
        self._thread.join()

    def result(self) -> dict[str, str]:
        """Call after every write has returned: the hashes (raises if a region was never reported)."""
        with self._cond:
            incomplete = self._mark < self.total
            if incomplete:
                self._aborted = True
                self._cond.notify()
        self._thread.join()
        if incomplete:
            raise RuntimeError(f"{self.path}: bytes {self._mark}..{self.total} were never reported written")
        if self._error is not None:
            raise self._error
        if self._aborted:
            raise RuntimeError("hashing was aborted")
        return hashes_from_sha256(self._sha.hexdigest(), old_hash_of_bytes(bytes(self._old)))

    def _run(self) -> None:
        block = 8 * _BLOCK
        buf = bytearray(block)
        view = memoryview(buf)
        pos = 0
        lo, hi = OLD_HASH_OFFSET, OLD_HASH_OFFSET + OLD_HASH_LENGTH
        try:
            with open(self.path, "rb", buffering=0) as fh:  # unbuffered: a read-ahead buffer would go stale
                while pos < self.total:
                    with self._cond:
                        while self._mark <= pos and not self._aborted:
                            self._cond.wait()
                        if self._aborted:
                            return
                        mark = self._mark
                    while pos < mark:
                        want = min(block, mark - pos)
                        fh.seek(pos)
                        n = fh.readinto(view[:want])
                        if not n:
                            raise OSError(f"{self.path}: short read at byte {pos} while hashing")
                        chunk = view[:n]
                        self._sha.update(chunk)
                        if pos + n > lo and pos < hi:
                            self._old += chunk[max(lo - pos, 0): min(hi - pos, n)]
                        pos += n
        except BaseException as exc:  # reported by result()
            self._error = exc
