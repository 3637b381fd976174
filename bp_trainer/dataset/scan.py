"""Scanning a dataset folder: images, their captions, and a report of everything that could not be used.

Layout: images anywhere under `root` (png, jpg/jpeg, webp, bmp; hidden files and folders are skipped), each with a
sidecar caption `name.txt` (or `name.png.txt`; another extension with `caption_ext`), or one metadata file (JSONL
lines or a JSON list of `{"file_name": ..., "text": ...}`, or a JSON object `{image: caption}` /
`{image: {"caption": ..., "tags": ...}}` as kohya's meta_clean.json). Image keys in metadata are paths relative to
the metadata file's folder or to `root`, with or without the extension.

Nothing stops a scan: every unusable file is a `Problem(path, reason, kind)` in the result and the rest goes on.
`missing_caption="error"` is the one exception by choice: the scan finishes, then raises a BPError naming the
first image without a caption and the count.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

from bp_trainer.dataset.images import DEFAULT_MAX_PIXELS, ImageProblem, is_image_name, probe_image
from bp_trainer.errors import BPError

MISSING_CAPTION_POLICIES = ("skip", "empty", "error")
CAPTION_KEYS = ("text", "caption", "tags", "prompt")
IMAGE_KEYS = ("file_name", "image", "path", "file", "filename")


@dataclass(frozen=True)
class ImageItem:
    path: str
    width: int  # after EXIF orientation
    height: int
    caption: str
    caption_path: Optional[str]  # None when the caption came from a metadata file or is empty by policy
    format: str = ""
    orientation: int = 1

    @property
    def size(self) -> "Tuple[int, int]":
        return (self.width, self.height)


@dataclass(frozen=True)
class Problem:
    path: str
    reason: str
    kind: str = "other"

    def to_dict(self) -> "Dict[str, str]":
        return {"path": self.path, "reason": self.reason, "kind": self.kind}


@dataclass
class ScanResult:
    root: str
    items: "List[ImageItem]" = field(default_factory=list)
    problems: "List[Problem]" = field(default_factory=list)
    empty_captions: int = 0  # images given "" because they had no caption (missing_caption="empty")

    def problem_counts(self) -> "Dict[str, int]":
        return dict(Counter(p.kind for p in self.problems))

    def summary(self) -> "Dict[str, Any]":
        return {
            "root": self.root,
            "images": len(self.items),
            "problems": len(self.problems),
            "problem_kinds": self.problem_counts(),
            "empty_captions": self.empty_captions,
        }


def _walk(root: str, errors: "Optional[List[Problem]]" = None) -> "Iterator[str]":
    """Files under `root`, depth first in sorted order; hidden entries skipped; symlinked folders not followed.

    A folder that cannot be listed is recorded in `errors` (when given) and skipped.
    """
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:
        if errors is not None:
            errors.append(Problem(root, f"cannot list this folder: {exc.strerror or exc}", "unreadable"))
        return
    dirs = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                dirs.append(entry.path)
            elif entry.is_file():
                yield entry.path
        except OSError:
            continue
    for d in dirs:
        yield from _walk(d, errors)


MAX_CAPTION_BYTES = 1 << 20  # a caption file larger than this is a mistake (a log, a dump), not tags


def _read_caption(path: str) -> str:
    with open(path, "rb") as fh:
        data = fh.read(MAX_CAPTION_BYTES + 1)
    if len(data) > MAX_CAPTION_BYTES:
        raise OSError(f"caption file is larger than {MAX_CAPTION_BYTES // 1024} KiB")
    return data.decode("utf-8-sig").strip()


def caption_candidates(image_path: str, caption_ext: str) -> "Tuple[str, str]":
    """`dir/name.txt` then `dir/name.png.txt`."""
    ext = caption_ext if caption_ext.startswith(".") else "." + caption_ext
    return (os.path.splitext(image_path)[0] + ext, image_path + ext)


class _FileIndex:
    """The files of a scan, for caption lookups without a stat per image; the extension's case is ignored
    (`IMG_01.TXT` is the caption of `IMG_01.png`, as on Windows), an exact match wins."""

    def __init__(self, files: "List[str]"):
        self.exact = set(files)
        self.folded: "Dict[str, str]" = {}
        for f in files:
            self.folded.setdefault(f.lower(), f)

    def find(self, candidate: str) -> "Optional[str]":
        if candidate in self.exact:
            return candidate
        return self.folded.get(candidate.lower())


def _find_caption(image_path: str, caption_ext: str, existing: "Optional[_FileIndex]") -> "Optional[str]":
    for cand in caption_candidates(image_path, caption_ext):
        if existing is not None:
            found = existing.find(cand)
            if found is not None:
                return found
        elif os.path.isfile(cand):
            return cand
    return None


def iter_captions(
    root: "Union[str, os.PathLike]", caption_ext: str = ".txt"
) -> "Iterator[Tuple[str, str, str]]":
    """(image_path, caption_path, text) for every image with a readable sidecar caption; images are not opened.

    The cheap path for tag statistics and tag renaming. Undecodable caption files are left out (`scan_dataset`
    reports them).
    """
    files = list(_walk(os.fspath(root)))
    existing = _FileIndex(files)
    for path in files:
        if not is_image_name(path):
            continue
        cap = _find_caption(path, caption_ext, existing)
        if cap is None:
            continue
        try:
            text = _read_caption(cap)
        except (OSError, UnicodeDecodeError):
            continue
        yield path, cap, text


def _caption_from_record(value: Any) -> "Optional[str]":
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, str) for t in value):
        return ", ".join(value)
    if isinstance(value, dict):
        caption = value.get("caption") if isinstance(value.get("caption"), str) else None
        tags = value.get("tags")
        if isinstance(tags, list):
            tags = ", ".join(str(t) for t in tags)
        tags = tags if isinstance(tags, str) else None
        if caption and tags:
            return f"{caption}, {tags}"
        for key in CAPTION_KEYS:
            v = value.get(key)
            if isinstance(v, str):
                return v
            if isinstance(v, list) and all(isinstance(t, str) for t in v):
                return ", ".join(v)
    return None


def load_metadata(path: "Union[str, os.PathLike]") -> "Tuple[Dict[str, str], List[Problem]]":
    """Captions keyed by the image key as written in the file, and problems for unusable records."""
    path = os.fspath(path)
    problems: "List[Problem]" = []
    mapping: "Dict[str, str]" = {}
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise BPError(f"cannot read the metadata file ({exc})", path=path) from None

    def add_record(rec: Any, where: str) -> None:
        if not isinstance(rec, dict):
            problems.append(Problem(where, "metadata record is not an object", "metadata"))
            return
        key = next((rec[k] for k in IMAGE_KEYS if isinstance(rec.get(k), str)), None)
        if key is None:
            problems.append(Problem(where, f"metadata record has no image key ({'/'.join(IMAGE_KEYS)})", "metadata"))
            return
        caption = _caption_from_record(rec)
        if caption is None:
            problems.append(Problem(where, f"metadata record has no caption ({'/'.join(CAPTION_KEYS)})", "metadata"))
            return
        mapping[key] = caption

    stripped = text.lstrip()
    if path.lower().endswith(".jsonl") or not stripped.startswith(("{", "[")) or _is_jsonl(stripped):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as exc:
                problems.append(Problem(f"{path}:{n}", f"invalid JSON line ({exc})", "metadata"))
                continue
            add_record(rec, f"{path}:{n}")
        return mapping, problems
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise BPError(f"invalid JSON ({exc})", path=path, hint="use JSON or one JSON object per line (JSONL)") from None
    if isinstance(data, list):
        for n, rec in enumerate(data):
            add_record(rec, f"{path}[{n}]")
    elif isinstance(data, dict):
        for key, value in data.items():
            caption = _caption_from_record(value)
            if caption is None:
                problems.append(Problem(f"{path}[{key!r}]", "metadata entry has no caption", "metadata"))
            else:
                mapping[key] = caption
    else:
        raise BPError("metadata must be a JSON object or list", path=path)
    return mapping, problems


def _is_jsonl(text: str) -> bool:
    first = text.split("\n", 1)[0].strip()
    if not first.startswith("{") or "\n" not in text.strip():
        return False
    try:
        json.loads(first)
    except ValueError:
        return False
    return True


def _norm(key: str) -> str:
    return os.path.normpath(key.replace("\\", "/")).replace(os.sep, "/") if key else key


def _add(
    result: ScanResult,
    path: str,
    info: Any,
    sidecar: "Optional[Tuple[str, Optional[str], Optional[Exception]]]",
    meta: "Optional[Dict[str, str]]",
    root_s: str,
    caption_ext: str,
    missing_caption: str,
    missing: "List[str]",
) -> None:
    """Record one probed image: an item with its caption, or a problem."""
    if isinstance(info, ImageProblem):
        result.problems.append(Problem(path, info.reason, info.kind))
        return
    caption: "Optional[str]" = None
    caption_path: "Optional[str]" = None
    if meta is not None:
        rel = _norm(os.path.relpath(path, root_s))
        for k in (rel, os.path.splitext(rel)[0]):
            if k in meta:
                caption = meta[k]
                break
    elif sidecar is not None:
        caption_path, caption, exc = sidecar
        if isinstance(exc, UnicodeDecodeError):
            result.problems.append(
                Problem(caption_path, f"caption is not UTF-8 text ({exc.reason} at byte {exc.start})", "caption_unreadable")
            )
            return
        if exc is not None:
            result.problems.append(Problem(caption_path, f"cannot read caption: {getattr(exc, 'strerror', None) or exc}",
                                           "caption_unreadable"))
            return
    if caption is None:
        if missing_caption == "skip":
            where = "in the metadata file" if meta is not None else f"({caption_ext} beside it)"
            result.problems.append(Problem(path, f"no caption {where}", "no_caption"))
            return
        missing.append(path)
        if missing_caption == "empty":
            caption = ""
            result.empty_captions += 1
    if caption is None:
        return
    result.items.append(ImageItem(path, info.width, info.height, caption, caption_path, info.format, info.orientation))


def scan_dataset(
    root: "Union[str, os.PathLike]",
    *,
    caption_ext: str = ".txt",
    metadata_file: "Union[str, os.PathLike, None]" = None,
    missing_caption: str = "skip",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    verify: str = "header",
    progress: "Any" = None,
    workers: int = 1,
) -> ScanResult:
    """Every usable image under `root` with its size (after EXIF orientation) and caption; problems for the rest.

    `progress(done, total)` is called now and then (for a UI progress bar). `workers > 1` reads headers in that
    many threads: worth it on network or spinning disks, where a scan waits on I/O; the result is the same.
    """
    if missing_caption not in MISSING_CAPTION_POLICIES:
        raise BPError(f"unknown missing-caption policy {missing_caption!r}", hint="use skip, empty or error")
    if verify not in ("header", "full"):
        raise BPError(f"unknown verify mode {verify!r}", hint="use header or full")
    root_s = os.fspath(root)
    if not os.path.isdir(root_s):
        what = "is a file, not a folder" if os.path.exists(root_s) else "dataset folder not found"
        raise BPError(what, path=root_s, hint="give the folder that holds the images")
    result = ScanResult(root=root_s)
    files = list(_walk(root_s, result.problems))
    existing = _FileIndex(files)
    images = [p for p in files if is_image_name(p)]

    meta: "Optional[Dict[str, str]]" = None
    if metadata_file is not None:
        mapping, meta_problems = load_metadata(metadata_file)
        result.problems.extend(meta_problems)
        meta_dir = os.path.dirname(os.path.abspath(os.fspath(metadata_file)))
        root_abs = os.path.abspath(root_s)
        meta = {}
        for key, caption in mapping.items():
            rel = os.path.relpath(os.path.normpath(os.path.join(meta_dir, key)), root_abs)
            for k in (_norm(key), _norm(rel)):
                meta.setdefault(k, caption)

    missing: "List[str]" = []
    total = len(images)

    def probe(path: str) -> "Tuple[Any, Optional[Tuple[str, Optional[str], Optional[Exception]]]]":
        # header and sidecar caption together, so worker threads overlap all the file reads
        info = probe_image(path, max_pixels=max_pixels, verify=verify)
        if meta is not None or isinstance(info, ImageProblem):
            return info, None
        caption_path = _find_caption(path, caption_ext, existing)
        if caption_path is None:
            return info, None
        try:
            return info, (caption_path, _read_caption(caption_path), None)
        except (OSError, UnicodeDecodeError) as exc:
            return info, (caption_path, None, exc)

    pool = None
    if workers > 1 and total > 1:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bp-scan")
        infos: "Iterator[Any]" = pool.map(probe, images)
    else:
        infos = map(probe, images)
    try:
        for n, (path, (info, sidecar)) in enumerate(zip(images, infos)):
            if progress is not None and n % 1000 == 0:
                progress(n, total)
            _add(result, path, info, sidecar, meta, root_s, caption_ext, missing_caption, missing)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    if progress is not None:
        progress(total, total)

    if meta is not None:
        found = {_norm(os.path.relpath(p, root_s)) for p in images}
        found |= {os.path.splitext(k)[0] for k in found}
        for key in mapping:
            full = os.path.normpath(os.path.join(meta_dir, key))
            rel = _norm(os.path.relpath(full, os.path.abspath(root_s)))
            if _norm(key) not in found and rel not in found:
                result.problems.append(Problem(key, "listed in the metadata file but no such image", "metadata"))
    if missing_caption == "error" and missing:
        raise BPError(
            f"{len(missing)} image(s) have no caption, e.g. {missing[0]}",
            path=root_s,
            hint="add captions, or choose missing-caption 'skip' or 'empty'",
        )
    return result
