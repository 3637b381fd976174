"""A cache of file hashes, like the WebUI's `cache.json` (sha256 per file, trusted only while the file is unchanged).

Where: `$BP_TRAIN_CACHE_DIR/hashes.json`, else `$XDG_CACHE_HOME/bp_train/hashes.json`, else
`~/.cache/bp_train/hashes.json`. Delete the file to clear it (or run `hash --no-cache FILE` to re-hash one file).

Key: the file's absolute real path; an entry is used only when the file's size, `mtime_ns`, inode and device
all still equal the recorded ones, so an edited, replaced or re-downloaded file is hashed again. A file whose
modification time is within `_RACY_S` seconds of the moment it was hashed is not cached (it may still be
being written, and a coarse timestamp could hide a second write), nor one that changed while it was hashed.
A missing, unreadable or corrupt cache file is treated as empty; a cache that cannot be written is ignored:
the cache can only save time, never change a result. Writes are atomic (temporary file + rename).
No torch import: the CLI looks hashes up before torch is loaded.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from bp_trainer.checkpoint.hashes import file_hashes, hashes_from_sha256

CACHE_VERSION = 1
_RACY_S = 2.0
_MAX_ENTRIES = 2000
_lock = threading.Lock()


def cache_file() -> Path:
    base = os.environ.get("BP_TRAIN_CACHE_DIR")
    if base:
        return Path(base) / "hashes.json"
    xdg = os.environ.get("XDG_CACHE_HOME")
    root = Path(xdg) if xdg else Path.home() / ".cache"
    return root / "bp_train" / "hashes.json"


def _key(path: "str | os.PathLike[str]") -> str:
    return os.path.realpath(os.fspath(path))


def _identity(st: os.stat_result) -> dict:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino, "dev": st.st_dev}


def _load() -> dict:
    try:
        data = json.loads(cache_file().read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("files"), dict):
        return {}
    return data["files"]


def lookup(path: "str | os.PathLike[str]") -> "dict[str, str] | None":
    """The cached {"sha256", "autov2", "old"} of `path` if it is unchanged since it was hashed, else None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    with _lock:
        ent = _load().get(_key(path))
    if not isinstance(ent, dict) or any(ent.get(k) != v for k, v in _identity(st).items()):
        return None
    sha, old = ent.get("sha256"), ent.get("old")
    if not (isinstance(sha, str) and len(sha) == 64 and isinstance(old, str) and len(old) == 8):
        return None
    try:
        int(sha, 16), int(old, 16)
    except ValueError:
        return None
    return hashes_from_sha256(sha, old)


def store(path: "str | os.PathLike[str]", hashes: dict, before: os.stat_result, started: float) -> bool:
    """Record `hashes` of `path`, computed from `started` (time.time()) with `before` its stat then; skipped
    (False) when the file changed meanwhile or was modified too recently to be trusted."""
    try:
        after = os.stat(path)
    except OSError:
        return False
    if _identity(after) != _identity(before) or after.st_mtime_ns > (started - _RACY_S) * 1e9:
        return False
    from bp_trainer.fsutil import atomic_write_text

    with _lock:
        files = _load()
        files[_key(path)] = {**_identity(after), "sha256": hashes["sha256"], "old": hashes["old"],
                             "hashed_at": round(time.time(), 3)}
        if len(files) > _MAX_ENTRIES:  # drop the oldest entries
            keep = sorted(files.items(), key=lambda kv: -float(kv[1].get("hashed_at", 0) or 0))[:_MAX_ENTRIES]
            files = dict(keep)
        try:
            atomic_write_text(cache_file(), json.dumps({"version": CACHE_VERSION, "files": files}, indent=0))
        except OSError:
            return False
    return True


def cached_file_hashes(path: "str | os.PathLike[str]", *, use_cache: bool = True) -> dict[str, str]:
    """`file_hashes(path)`, answered from the cache when the file is unchanged; computed hashes are
    stored. `use_cache=False`: always recompute (and refresh the cache entry)."""
    if use_cache:
        hit = lookup(path)
        if hit is not None:
            return hit
    try:
        before = os.stat(path)
    except OSError:
        before = None
    started = time.time()
    result = file_hashes(path)  # raises the usual BPError for a missing file or a folder
    if before is not None:
        store(path, result, before, started)
    return result


def start_hashing(paths: "dict[str, str | None]"):
    """Hash the file inputs (folders and None are skipped): (pool, {role: Future of the hashes}).

    Cache hits are answered at once (already-completed futures); misses are hashed on background threads
    and stored in the cache. `all(f.done() ...)` right after this call means every hash is known now."""
    from concurrent.futures import Future, ThreadPoolExecutor

    files = {r: p for r, p in paths.items() if p and os.path.isfile(p)}
    futures: dict[str, Future] = {}
    misses = {}
    for role, p in files.items():
        hit = lookup(p)
        if hit is None:
            misses[role] = p
        else:
            futures[role] = Future()
            futures[role].set_result(hit)
    pool = ThreadPoolExecutor(max_workers=max(1, min(4, len(misses))), thread_name_prefix="bp-hash")
    for role, p in misses.items():
        futures[role] = pool.submit(cached_file_hashes, p, use_cache=False)
    return pool, futures
