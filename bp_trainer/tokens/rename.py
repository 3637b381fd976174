"""Rename a tag across a dataset's caption files: dry run, journaled apply, resume, undo.

Matching: captions are split at commas; a piece matches when, without its surrounding whitespace, it equals
the old tag exactly (case-sensitive). With `emphasis=True` (default) a piece that is the tag wrapped in WebUI
emphasis also matches, and only the tag inside is replaced: `(old)`, `((old))`, `[old]`, `(old:1.2)`.
A tag with brackets also matches its escaped spelling (`character_(series)` matches `character_\\(series\\)`,
which then gets the new name escaped the same way). Only the characters of the matched tag change: order,
separators, spacing, other tags, line endings, a UTF-8 BOM and the trailing newline are kept byte for byte.

Apply is journaled so that nothing is lost:
1. the plan is written to `DATASET/.bp_tag_journal/<id>/journal.json` (each file: path, SHA-256 before,
   SHA-256 after) with state "planned";
2. every file to change is copied into `<id>/backup/` and verified, then the state becomes "applying";
3. files are rewritten one by one atomically (temp file + rename; permissions kept). A file whose content is
   already the new one is skipped, so running the same apply again after an interruption (Ctrl-C, crash,
   power loss) completes it; a file edited by someone since the plan is left alone and reported;
4. the state becomes "applied".
`undo_rename(journal)` restores every file that still has the renamed content from its backup (and leaves
files edited since then alone, reporting them), for a finished or an interrupted apply. It is journaled the
same way: the state becomes "undoing" before the first file is restored and "undone" after the last, so an
interrupted undo is completed by running it again, and blocks any rename of the dataset until then.

Temporary files are written in the journal's own `tmp/` folder and renamed over the captions, so a kill at
any moment leaves none beside the captions; each run removes what an interrupted one left (also the
`.NAME.*.partial` files that versions before this one wrote beside the captions).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from bp_trainer.errors import BPError
from bp_trainer.fsutil import atomic_path, atomic_write_bytes, atomic_write_text
from bp_trainer.tokens.audit import JOURNAL_DIR, iter_caption_files

JOURNAL_KIND = "bp_train.tag_rename"
JOURNAL_VERSION = 1
UNFINISHED = ("planned", "applying", "undoing")
BOM = b"\xef\xbb\xbf"

# `(tag)`, `((tag))`, `[tag]`, `(tag:1.2)`: brackets around the whole piece (a closing bracket must not be escaped).
_WRAPPED = re.compile(r"^(?P<open>[(\[]+)(?P<inner>.*?)(?P<weight>:\s*[+-]?[.\d]+\s*)?(?<!\\)(?P<close>[)\]]+)$", re.S)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------- text level


_UNESCAPED_BRACKET = re.compile(r"(?<!\\)([()\[\]])")


def escape_brackets(tag: str) -> str:
    """`name_(series)` -> `name_\\(series\\)`: how captions written for the WebUI spell a bracketed tag."""
    return _UNESCAPED_BRACKET.sub(r"\\\1", tag)


def _tag_span(piece: str, old: str, emphasis: bool) -> Optional[tuple[int, int, bool]]:
    """(start, end, escaped) of the tag in a comma-separated piece when the piece is tag `old` (written as is,
    or with its brackets escaped: `escaped` is then True), else None."""
    core = piece.strip()
    if not core:
        return None
    lead = len(piece) - len(piece.lstrip())
    escaped_old = escape_brackets(old)
    forms = [(old, False)] + ([(escaped_old, True)] if escaped_old != old else [])
    for form, escaped in forms:
        if core == form:
            return lead, lead + len(core), escaped
    if emphasis:
        m = _WRAPPED.match(core)
        if m:
            inner = m.group("inner")
            for form, escaped in forms:
                if inner.strip() == form:
                    start = lead + m.start("inner") + (len(inner) - len(inner.lstrip()))
                    return start, start + len(form), escaped
    return None


def rename_in_text(text: str, old: str, new: str, *, emphasis: bool = True) -> tuple[str, int]:
    """(`text` with every tag `old` replaced by `new`, number of replacements); nothing else changes.

    A tag written with escaped brackets (`name_\\(series\\)`, as captions meant for the WebUI spell
    `name_(series)`) is matched too and gets `new` with its brackets escaped the same way.
    """
    out: list[str] = []
    n = 0
    escaped_new = escape_brackets(new)
    for i, piece in enumerate(text.split(",")):
        if i:
            out.append(",")
        span = _tag_span(piece, old, emphasis)
        if span is None:
            out.append(piece)
        else:
            start, end, escaped = span
            out.append(piece[:start] + (escaped_new if escaped else new) + piece[end:])
            n += 1
    return "".join(out), n


def _has_tag(text: str, tag: str, emphasis: bool) -> bool:
    return any(_tag_span(p, tag, emphasis) is not None for p in text.split(","))


def rename_in_bytes(data: bytes, old: str, new: str, *, emphasis: bool = True) -> tuple[bytes, int]:
    """`rename_in_text` on a UTF-8 file's bytes (a BOM is kept). Raises UnicodeDecodeError for other encodings."""
    bom = BOM if data.startswith(BOM) else b""
    text = data[len(bom):].decode("utf-8")
    renamed, n = rename_in_text(text, old, new, emphasis=emphasis)
    return (bom + renamed.encode("utf-8")) if n else data, n


def check_names(old: str, new: str) -> tuple[str, str]:
    """Validated (old, new), stripped of surrounding whitespace."""
    old, new = (old or "").strip(), (new or "").strip()
    if not old or not new:
        raise BPError("both the old and the new tag must be non-empty", hint="--from OLD --to NEW")
    for name, value in (("old", old), ("new", new)):
        if "," in value or "\n" in value or "\r" in value:
            raise BPError(f"the {name} tag {value!r} contains a comma or a line break",
                          hint="a tag is one comma-separated piece of a caption")
    if old == new:
        raise BPError(f"the old and new tags are the same ({old!r})")
    return old, new


# ---------------------------------------------------------------------------------------------- plan


@dataclass
class FilePlan:
    path: str  # relative to the dataset root
    old_sha256: str
    new_sha256: str
    replacements: int
    lines: list = field(default_factory=list)  # [{"line": 1-based, "before": str, "after": str}]
    already_has_new: bool = False  # the new tag was already in this caption (it will appear twice)


@dataclass
class RenamePlan:
    root: str
    old: str
    new: str
    emphasis: bool
    caption_ext: str
    captions_scanned: int
    files: list  # [FilePlan]
    similar: list = field(default_factory=list)  # when nothing matches: [{"tag", "count"}] that look like `old`

    @property
    def replacements(self) -> int:
        return sum(f.replacements for f in self.files)

    def to_dict(self) -> dict:
        return {
            "root": self.root, "from": self.old, "to": self.new, "emphasis": self.emphasis,
            "caption_ext": self.caption_ext, "captions_scanned": self.captions_scanned,
            "files_changed": len(self.files), "replacements": self.replacements,
            "duplicates": [f.path for f in self.files if f.already_has_new],
            "files": [asdict(f) for f in self.files],
            "similar": list(self.similar),
        }


def _changed_lines(before: str, after: str) -> list[dict]:
    b, a = before.split("\n"), after.split("\n")
    return [{"line": i + 1, "before": x.rstrip("\r"), "after": y.rstrip("\r")}
            for i, (x, y) in enumerate(zip(b, a)) if x != y]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BPError(f"cannot read the caption file ({exc.strerror or exc})", path=path) from exc


def plan_rename(root: "str | os.PathLike[str]", old: str, new: str, *, caption_ext: str = ".txt",
                emphasis: bool = True) -> RenamePlan:
    """The dry run: every caption file that would change, each changed line before/after. Writes nothing."""
    old, new = check_names(old, new)
    root_path = Path(root).resolve()
    files: list[FilePlan] = []
    scanned = 0
    texts: list[str] = []
    for caption_path, text in iter_caption_files(root_path, caption_ext):
        scanned += 1
        texts.append(text)
        path = Path(caption_path)
        data = _read(path)
        try:
            renamed, n = rename_in_bytes(data, old, new, emphasis=emphasis)
        except UnicodeDecodeError:  # the scanner already leaves undecodable captions out
            continue
        if not n:
            continue
        text_before = data.decode("utf-8-sig")
        text_after = renamed.decode("utf-8-sig")
        files.append(FilePlan(
            path=path.relative_to(root_path).as_posix(), old_sha256=sha256(data), new_sha256=sha256(renamed),
            replacements=n, lines=_changed_lines(text_before, text_after),
            already_has_new=_has_tag(text_before, new, emphasis),
        ))
    similar = _similar_tags(old, texts) if not files else []
    return RenamePlan(root=os.fspath(root_path), old=old, new=new, emphasis=emphasis, caption_ext=caption_ext,
                      captions_scanned=scanned, files=files, similar=similar)


def _similar_tags(tag: str, texts: list[str], limit: int = 5) -> list[dict]:
    """Tags of the dataset that look like `tag` (other case, `_` vs space, a typo): a hint when nothing matched."""
    import difflib

    from bp_trainer.tokens.audit import count_tags

    counts, _ = count_tags(texts)
    key = tag.casefold().replace(" ", "_")
    same = [t for t in counts if t.casefold().replace(" ", "_") == key and t != tag]
    close = difflib.get_close_matches(tag, list(counts), n=limit, cutoff=0.75)
    names = list(dict.fromkeys(same + close))[:limit]
    return [{"tag": t, "count": counts[t]} for t in names]


# ---------------------------------------------------------------------------------------------- journal


def _write_caption(path: Path, data: bytes, mode: Optional[int], tmp_dir: Path) -> None:
    """Atomically replace one caption file, keeping its permissions; the temporary file is made in the
    journal's `tmp_dir`, never beside the caption (tests patch this to inject a crash)."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path, mode=mode, tmp_dir=tmp_dir) as tmp:
            tmp.write_bytes(data)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        with atomic_path(path, mode=mode) as tmp:  # a caption on another filesystem: temporary file beside it
            tmp.write_bytes(data)


def _remove_temporaries(jpath: Path, journal: dict, root: Path) -> None:
    """What an interrupted run left: the journal folder's temporary files, and `.NAME.*.partial` files beside
    the journal's captions (written there by versions before temporary files moved into the journal)."""
    for leftover in [*jpath.parent.rglob("*.partial"), *_caption_partials(journal, root)]:
        with contextlib.suppress(OSError):
            leftover.unlink()


def _caption_partials(journal: dict, root: Path) -> list[Path]:
    found = []
    for f in journal.get("files", []):
        caption = root / f["path"]
        found.extend(p for p in caption.parent.glob(f".{glob.escape(caption.name)}.*.partial") if p.is_file())
    return found


def _save(journal_path: Path, journal: dict) -> None:
    atomic_write_text(journal_path, json.dumps(journal, indent=1, ensure_ascii=False) + "\n")


def load_journal(path: "str | os.PathLike[str]") -> tuple[Path, dict]:
    """(journal.json path, its content) from the journal file or its folder."""
    p = Path(path)
    if p.is_dir():
        p = p / "journal.json"
    try:
        journal = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise BPError("no rename journal here", path=p, hint="pass the journal.json that --apply printed") from exc
    except (OSError, ValueError) as exc:
        raise BPError(f"the rename journal cannot be read ({exc})", path=p) from exc
    if not isinstance(journal, dict) or journal.get("kind") != JOURNAL_KIND:
        raise BPError("this file is not a BP Train tag-rename journal", path=p)
    if journal.get("version") != JOURNAL_VERSION:
        raise BPError(f"unsupported journal version {journal.get('version')!r}", path=p)
    return p, journal


def journals(root: "str | os.PathLike[str]") -> list[tuple[Path, dict]]:
    """Every rename journal of a dataset, oldest first."""
    base = Path(root) / JOURNAL_DIR
    out = []
    if base.is_dir():
        for j in sorted(base.glob("*/journal.json")):
            try:
                out.append(load_journal(j))
            except BPError:
                continue
    return out


def unfinished_journals(root: "str | os.PathLike[str]") -> list[tuple[Path, dict]]:
    return [(p, j) for p, j in journals(root) if j.get("state") in UNFINISHED]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:32] or "tag"


def _new_journal_dir(root: Path, old: str, new: str) -> Path:
    base = root / JOURNAL_DIR
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    for i in range(1000):
        d = base / f"{stamp}{'-' + str(i) if i else ''}-{_slug(old)}-to-{_slug(new)}"
        try:
            d.mkdir(parents=True)
            return d
        except FileExistsError:
            continue
    raise BPError("cannot create a new journal folder", path=base)  # pragma: no cover


def apply_rename(root: "str | os.PathLike[str]", old: str, new: str, *, caption_ext: str = ".txt",
                 emphasis: bool = True) -> dict:
    """Apply the rename with a backup and an undo journal; completes an interrupted apply of the same rename.

    Raises a BPError when a different rename is unfinished in this dataset (complete or undo it first).
    """
    old, new = check_names(old, new)
    root_path = Path(root).resolve()
    if not root_path.is_dir():
        raise BPError("the dataset folder does not exist", path=root_path)
    pending = unfinished_journals(root_path)
    for jpath, journal in pending:
        if journal["state"] == "undoing":
            raise BPError(f"the undo of the rename {journal['from']!r} -> {journal['to']!r} was interrupted",
                          path=jpath, hint=finish_hint(jpath, journal))
    for jpath, journal in pending:
        if journal["from"] == old and journal["to"] == new:
            return dict(_run(jpath, journal), resumed=True)
    if pending:
        jpath, journal = pending[0]
        raise BPError(f"an interrupted rename {journal['from']!r} -> {journal['to']!r} is unfinished",
                      path=jpath, hint=finish_hint(jpath, journal))

    plan = plan_rename(root_path, old, new, caption_ext=caption_ext, emphasis=emphasis)
    if not plan.files:
        return {"journal": None, "from": old, "to": new, "files_changed": 0, "replacements": 0, "applied": 0,
                "already": 0, "conflicts": [], "resumed": False, "state": "nothing to do"}
    try:
        jdir = _new_journal_dir(root_path, old, new)
    except OSError as exc:
        raise BPError(f"cannot write the rename journal ({exc.strerror or exc})", path=root_path / JOURNAL_DIR,
                      hint="the dataset folder must be writable") from exc
    journal = {
        "kind": JOURNAL_KIND, "version": JOURNAL_VERSION, "root": plan.root, "from": old, "to": new,
        "emphasis": emphasis, "caption_ext": caption_ext, "state": "planned",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "finished": None, "undone": None,
        "conflicts": [],
        "files": [{"path": f.path, "old_sha256": f.old_sha256, "new_sha256": f.new_sha256,
                   "replacements": f.replacements} for f in plan.files],
    }
    jpath = jdir / "journal.json"
    _save(jpath, journal)
    return dict(_run(jpath, journal), resumed=False)


def journal_root(jpath: Path, journal: dict) -> Path:
    """The dataset folder of a journal: the one holding its `.bp_tag_journal` (so a moved dataset still works)."""
    if jpath.parent.parent.name == JOURNAL_DIR:
        return jpath.parent.parent.parent
    return Path(journal["root"])


def _run(jpath: Path, journal: dict) -> dict:
    root = journal_root(jpath, journal)
    backup = jpath.parent / "backup"
    _remove_temporaries(jpath, journal, root)
    conflicts: list[dict] = []
    blocked: set[str] = set()

    # Backups first (verified): a file is rewritten only when its original is safe in the journal.
    for f in journal["files"]:
        src, bk = root / f["path"], backup / f["path"]
        if bk.is_file() and sha256(bk.read_bytes()) == f["old_sha256"]:
            continue
        try:
            data = src.read_bytes()
        except OSError:
            data = None
        if data is not None and sha256(data) == f["old_sha256"]:
            atomic_write_bytes(bk, data)
        else:
            blocked.add(f["path"])  # changed by someone else before its backup existed: never touched
    if journal["state"] == "planned":
        journal["state"] = "applying"
        _save(jpath, journal)

    applied = already = 0
    for f in journal["files"]:
        src = root / f["path"]
        try:
            data = src.read_bytes()
            mode = os.stat(src).st_mode & 0o7777
        except OSError as exc:
            conflicts.append({"path": f["path"], "reason": f"cannot read it ({exc.strerror or exc})"})
            continue
        digest = sha256(data)
        if digest == f["new_sha256"]:
            already += 1
            continue
        if digest != f["old_sha256"] or f["path"] in blocked:
            conflicts.append({"path": f["path"], "reason": "edited since the plan; left as it is"})
            continue
        renamed, _n = rename_in_bytes(data, journal["from"], journal["to"], emphasis=journal["emphasis"])
        if sha256(renamed) != f["new_sha256"]:  # pragma: no cover - same input, same function
            conflicts.append({"path": f["path"], "reason": "the rename gives another result than planned"})
            continue
        _write_caption(src, renamed, mode, jpath.parent / "tmp")
        applied += 1

    journal["state"] = "applied"
    journal["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    journal["conflicts"] = conflicts
    _save(jpath, journal)
    return {"journal": str(jpath), "from": journal["from"], "to": journal["to"],
            "files_changed": len(journal["files"]),
            "replacements": sum(f["replacements"] for f in journal["files"]),
            "applied": applied, "already": already, "conflicts": conflicts, "state": journal["state"]}


def undo_rename(journal: "str | os.PathLike[str]") -> dict:
    """Restore the files of a rename (finished or interrupted) from its backups; completes an interrupted undo.

    A file that still has the renamed content is restored; one that has its original content is left (an
    interrupted apply or undo never reached it, or already restored it); one edited since is left alone and
    reported as a conflict. The journal says "undoing" while files are being restored.
    """
    jpath, data = load_journal(journal)
    root = journal_root(jpath, data)
    backup = jpath.parent / "backup"
    _remove_temporaries(jpath, data, root)
    if data.get("state") != "undoing":
        data["undo_from_state"] = data.get("state")
        data["state"] = "undoing"
        _save(jpath, data)
    restored = original = 0
    conflicts: list[dict] = []
    for f in data["files"]:
        outcome = _restore_one(root / f["path"], backup / f["path"], f, jpath.parent / "tmp")
        if outcome == "restored":
            restored += 1
        elif outcome == "original":
            original += 1
        else:
            conflicts.append({"path": f["path"], "reason": outcome})
    data["state"] = "undone" if not conflicts else "undone with conflicts"
    data["undone"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    data["undo_conflicts"] = conflicts
    _save(jpath, data)
    return {"journal": str(jpath), "from": data["from"], "to": data["to"], "restored": restored,
            "already_original": original, "conflicts": conflicts, "state": data["state"]}


def _restore_one(src: Path, bk: Path, f: dict, tmp_dir: Path) -> str:
    """"restored", "original" (nothing to do), or the reason the file was left alone."""
    try:
        current = src.read_bytes()
        mode = os.stat(src).st_mode & 0o7777
    except OSError as exc:
        return f"cannot read it ({exc.strerror or exc}); its original is in {bk}"
    digest = sha256(current)
    if digest == f["old_sha256"]:
        return "original"
    if digest != f["new_sha256"]:
        return "edited after the rename; left as it is"
    try:
        saved = bk.read_bytes()
    except OSError:
        saved = None
    if saved is None or sha256(saved) != f["old_sha256"]:
        return "its backup is missing or damaged"
    _write_caption(src, saved, mode, tmp_dir)
    return "restored"


def finish_hint(jpath: Path, journal: dict) -> str:
    """How to finish an unfinished journal (what to run)."""
    if journal.get("state") == "undoing":
        return f"finish it with: tags rename --undo {jpath}"
    return (f"run it again with --from {journal['from']!r} --to {journal['to']!r} --apply to complete it, "
            f"or --undo {jpath}")


def journal_summary(jpath: Path, journal: dict) -> dict[str, Any]:
    summary = {"journal": str(jpath), "from": journal.get("from"), "to": journal.get("to"),
               "state": journal.get("state"), "created": journal.get("created"),
               "files": len(journal.get("files", []))}
    if journal.get("state") in UNFINISHED:
        summary["finish"] = finish_hint(jpath, journal)
    return summary
