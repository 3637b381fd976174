"""Filesystem helpers: atomic writes, output-path checks, write errors as one line, input protection.

`atomic_path` yields a temporary path in the target's folder (`atomic_dir` a temporary folder); on success
it is fsynced and renamed over the target, so readers see either the old file or the complete new one, and
a failure (exception, disk full) leaves no partial output behind. What a killed writer (kill -9, power
loss) leaves, a hidden `.NAME.XXXXXXXX.partial`, is removed by `remove_stale_partials(folder)`, which our
checkpoint writers call on their output folder when they start (and the trainer on resume).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Iterable, List, Optional

from bp_trainer.errors import BPError

try:  # POSIX: a live writer holds an advisory lock on its temporary file (released by the kernel if killed)
    import fcntl
except ImportError:  # Windows: no flock; an open file cannot be deleted there anyway
    fcntl = None  # type: ignore[assignment]

PARTIAL_SUFFIX = ".partial"
_RANDOM_PART = 8  # tempfile's random name part
_PARTIAL_NAME = re.compile(r"\..+\.partial", re.DOTALL)  # .NAME.partial, .NAME.XXXXXXXX.partial
UNLOCKED_STALE_AFTER_S = 24 * 3600.0  # without file locks, a partial untouched this long is taken as stale


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


# ------------------------------------------------------------------------------------------ output paths
def name_max(folder: "str | os.PathLike[str]") -> int:
    """The longest file name (bytes) the file system of `folder` allows (255 when it cannot say)."""
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (AttributeError, OSError, ValueError):
        return 255


def check_output_path(out: "str | os.PathLike[str]", *, folder: bool = False, create_parent: bool = False) -> Path:
    """`out` as a Path, or a BPError for an output that could only be written by guessing: a file output
    given as a folder (a trailing separator, or an existing folder), a name longer than the file system
    allows, a folder that does not exist (refused unless `create_parent`: user-facing outputs never create
    folders silently; programs that write into their own folders may)."""
    raw = os.fspath(out)
    path = Path(raw)
    seps = tuple(s for s in (os.sep, os.altsep) if s)
    as_file = f"add a file name, e.g. {path / 'model.safetensors'}"
    if not folder and raw.endswith(seps):
        raise BPError("the output must be a file name, not a folder", path=raw, hint=as_file)
    try:
        existing = path.parent
        while create_parent and not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise BPError("the output folder does not exist" if not existing.exists() else "the output folder is a file",
                          path=existing, hint="create the folder first, or choose an existing one")
        size, limit = len(os.fsencode(path.name)), name_max(existing)
        if size > limit:
            raise BPError(f"the output name is too long ({size} bytes; this file system allows {limit})",
                          path=path.parent / (path.name[:40] + "..."), hint="choose a shorter name")
        if not folder and path.is_dir():
            raise BPError("the output must be a file name, but this is a folder", path=raw, hint=as_file)
    except OSError as exc:
        raise BPError(f"cannot use this output path ({exc.strerror or exc})", path=raw) from None
    return path


# ------------------------------------------------------------------------------------------ write errors
_ERRNO_IN_TEXT = re.compile(r"\(os error (\d+)\)|Os \{ code: (\d+)")  # Rust io errors (safetensors)
_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _write_errno(exc: BaseException) -> "int | None":
    """The errno behind a failed write, from an OSError or a library's text (safetensors' Rust error), following
    the exception's cause chain; None when it is not a file-system error."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc.errno
        found = _ERRNO_IN_TEXT.search(str(exc))
        if found:
            return int(found.group(1) or found.group(2))
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale / 10:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def write_error(exc: BaseException, out: "str | os.PathLike[str]", needed: "int | None" = None) -> "BPError | None":
    """The one-line BPError for a failed write of `out` (disk full, quota, a file too large for the file system,
    permissions, ...), or None when `exc` is not a file-system error (a bug keeps its traceback)."""
    code = _write_errno(exc)
    if code is None:
        return None
    folder = Path(out).parent
    if code in _FULL:
        try:
            free = f"{_size(shutil.disk_usage(folder).free)} free"
        except OSError:
            free = "free space unknown"
        need = f", the output needs about {_size(needed)}" if needed else ""
        return BPError(f"could not write the output: {os.strerror(code)} ({free}{need}); nothing was written",
                       path=out, hint=f"free some space on the drive of {folder}, or write somewhere else, then run again")
    if code == errno.EFBIG:
        return BPError("the file system cannot hold a file this large (FAT32 stops at 4 GB); nothing was written",
                       path=out, hint="write to a drive formatted NTFS, exFAT, ext4 or APFS")
    return BPError(f"could not write the output ({os.strerror(code)}); nothing was written", path=out,
                   hint="check the folder's permissions and free space")


@contextlib.contextmanager
def write_errors(out: "str | os.PathLike[str]", *, needed: "int | None" = None) -> Iterator[None]:
    """Run a block that writes `out`: a file-system failure inside it becomes `write_error`'s BPError."""
    try:
        yield
    except BPError:
        raise
    except Exception as exc:
        err = write_error(exc, out, needed)
        if err is None:
            raise
        raise err from None


# --------------------------------------------------------------------------------------- atomic writing
def partial_prefix(target: "str | os.PathLike[str]") -> str:
    """`.NAME.`: how the temporary names of `target`'s atomic writes start (NAME cut to leave room for the
    random part and the `.partial` suffix in the file system's name limit)."""
    target = Path(target)
    room = max(1, name_max(target.parent if target.parent.is_dir() else ".") - 2 - _RANDOM_PART - len(PARTIAL_SUFFIX))
    name = os.fsencode(target.name)[:room].decode(sys.getfilesystemencoding(), "ignore")
    return f".{name}."


def partial_files(target: "str | os.PathLike[str]") -> List[Path]:
    """The temporary files of atomic writes of `target` now present (e.g. to report a write's progress)."""
    target = Path(target)
    prefix = partial_prefix(target)
    try:
        return [target.parent / n for n in os.listdir(target.parent) if n.startswith(prefix) and n.endswith(PARTIAL_SUFFIX)]
    except OSError:
        return []


def _lock(fd: int) -> "bool | None":
    """Take the lock that marks a temporary file or folder live while `fd` is open (`remove_stale_partials`
    leaves it alone): True taken, False held by someone else, None where there are no file locks."""
    if fcntl is None or fd < 0:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # a file system without locks
        return None
    return True


def _new_partial(target: Path, make_dir: bool, folder: "Path | None" = None) -> "tuple[Path, int]":
    """A new temporary file or folder for `target` (in `folder`, default beside it: the same file system), and the
    open descriptor that holds its lock (-1: none)."""
    where = folder if folder is not None else target.parent
    while True:
        if make_dir:
            name = tempfile.mkdtemp(prefix=partial_prefix(target), suffix=PARTIAL_SUFFIX, dir=where)
            fd = os.open(name, os.O_RDONLY) if fcntl is not None else -1
        else:
            fd, name = tempfile.mkstemp(prefix=partial_prefix(target), suffix=PARTIAL_SUFFIX, dir=where)
            if fcntl is None:  # Windows: an open handle would block the rename
                os.close(fd)
                fd = -1
        if _lock(fd) is not False:
            return Path(name), fd
        os.close(fd)  # a cleaner took it just now and is about to remove it: make another


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
    tmp, fd = _new_partial(target, make_dir=False, folder=Path(tmp_dir) if tmp_dir else None)
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
    finally:
        if fd >= 0:
            os.close(fd)


@contextlib.contextmanager
def atomic_dir(target: "str | os.PathLike[str]", *, file_mode: int = 0o644, dir_mode: int = 0o755) -> Iterator[Path]:
    """Yield a temporary folder next to `target` (which must not exist); when the block succeeds, every file
    in it is fsynced, modes are set, and it is renamed to `target`. On an exception it is removed."""
    target = Path(target)
    tmp, fd = _new_partial(target, make_dir=True)
    try:
        yield tmp
        for p in [tmp, *tmp.rglob("*")]:
            if p.is_dir():
                os.chmod(p, dir_mode)
                continue
            os.chmod(p, file_mode)
            with open(p, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if fd >= 0:
            os.close(fd)


@contextlib.contextmanager
def _if_stale(entry: "os.DirEntry[str]") -> Iterator[bool]:
    """Yield whether `entry` is stale: no live writer holds its lock (then it is held here until the block
    ends); where there are no file locks, untouched for a day."""
    fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)) if fcntl is not None else -1
    try:
        taken = _lock(fd)
        if taken is None:
            taken = time.time() - entry.stat(follow_symlinks=False).st_mtime > UNLOCKED_STALE_AFTER_S
        yield taken
    finally:
        if fd >= 0:
            os.close(fd)


def remove_stale_partials(folder: "str | os.PathLike[str]") -> List[str]:
    """Remove what killed atomic writes left in `folder` (not below it): hidden files and folders named
    `.NAME.partial` or `.NAME.XXXXXXXX.partial` (the names `atomic_path`, `atomic_dir` and the trainer's
    writers use) that no live writer holds. Nothing else is touched; links are not followed. Returns the
    removed names. Safe while other writers run: `atomic_path`/`atomic_dir` hold a lock on their partial."""
    removed: List[str] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not _PARTIAL_NAME.fullmatch(entry.name) or entry.is_symlink():
            continue
        try:
            with _if_stale(entry) as stale:
                if not stale:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
        except OSError:
            continue
        removed.append(entry.name)
    return removed


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
