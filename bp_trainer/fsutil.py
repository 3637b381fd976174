"""Filesystem helpers: atomic writes and input protection.

`atomic_path` yields a temporary path in the target's folder; on success the file is fsynced and renamed
over the target, so readers see either the old file or the complete new one, and a failure (exception,
disk full, kill -9) leaves no partial output behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, Iterable, List, Optional

from bp_trainer.errors import BPError


def same_file(a: "str | os.PathLike[str]", b: "str | os.PathLike[str]") -> bool:
    """True when both paths name the same existing file (or the same path when one does not exist yet)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def refuse_overwriting_inputs(out: "str | os.PathLike[str]", inputs: Iterable["str | os.PathLike[str] | None"]) -> None:
    """Raise a BPError when `out` is one of the input files: inputs are never overwritten."""
    for src in inputs:
        if src is not None and os.path.exists(src) and same_file(out, src):
            raise BPError("the output would overwrite an input file", path=out, hint="choose another output name")


def fsync_dir(path: "str | os.PathLike[str]") -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(target: "str | os.PathLike[str]", *, mode: int | None = 0o644,
                tmp_dir: "str | os.PathLike[str] | None" = None) -> Iterator[Path]:
    """Yield a temporary file path next to `target`; rename it over `target` when the block succeeds.

    The caller writes the temporary path (any library may write it). On an exception the temporary file
    is removed and `target` is untouched. `tmp_dir` puts the temporary file elsewhere on the same filesystem
    (so a kill -9 leaves nothing beside `target`; the caller cleans `tmp_dir`).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=tmp_dir or target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(target: "str | os.PathLike[str]", data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: "str | os.PathLike[str]", text: str, encoding: str = "utf-8") -> None:
    atomic_write_bytes(target, text.encode(encoding))


def tail_lines(path: "str | os.PathLike[str]", n: Optional[int], max_bytes: int = 16384) -> List[str]:
    """The last `n` lines (None: all) of a (log) file's last `max_bytes`; [] when it cannot be read."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - max_bytes))
            lines = fh.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return []
    return lines if n is None else lines[-n:]


def read_json_object(path: "str | os.PathLike[str]") -> Optional[Dict[str, Any]]:
    """A small JSON state file (lock, stamp, table) as a dict; None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    return data if isinstance(data, dict) else None
