"""Tag rename across caption files: byte-exact edits, dry run, journaled apply, interruption, resume, undo."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bp_trainer.cli import main
from bp_trainer.errors import BPError
from bp_trainer.tokens import rename as rn
from bp_trainer.tokens.audit import JOURNAL_DIR

BOM = b"\xef\xbb\xbf"

# caption bytes before -> after renaming "sakimichan" to "sakim" (written by hand)
CAPTIONS = {
    "a.txt": (b"1girl, sakimichan, long_hair,smile\n", b"1girl, sakim, long_hair,smile\n"),
    "b.txt": (b"(sakimichan:1.2),  solo\r\n", b"(sakim:1.2),  solo\r\n"),
    "c.txt": (b"sakimichan_style, xsakimichan,\tsakimichan\t", b"sakimichan_style, xsakimichan,\tsakim\t"),
    "sub/d.txt": (BOM + "sakimichan, caf\u00e9, [ sakimichan ]".encode(), BOM + "sakim, caf\u00e9, [ sakim ]".encode()),
    "e.txt": (b"1boy, solo", b"1boy, solo"),
}


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    for rel, (before, _after) in CAPTIONS.items():
        cap = root / rel
        cap.parent.mkdir(parents=True, exist_ok=True)
        cap.write_bytes(before)
        cap.with_suffix(".png").write_bytes(b"not decoded by the caption scan")
    os.chmod(root / "a.txt", 0o600)
    (root / "notes.txt").write_bytes(b"sakimichan")  # no image beside it: not a caption, never touched
    return root


def contents(root: Path) -> dict:
    return {rel: (root / rel).read_bytes() for rel in CAPTIONS}


def before(root: Path) -> dict:
    return {rel: b for rel, (b, _a) in CAPTIONS.items()}


def after(root: Path) -> dict:
    return {rel: a for rel, (_b, a) in CAPTIONS.items()}


def test_rename_in_text_changes_only_the_tag():
    text = "a, old ,b,(old:1.2),((old)),[old], old_x, xold, \\(old\\), (old and more)\n"
    new, n = rn.rename_in_text(text, "old", "NEW")
    assert new == "a, NEW ,b,(NEW:1.2),((NEW)),[NEW], old_x, xold, \\(old\\), (old and more)\n"
    assert n == 4
    assert rn.rename_in_text(text, "old", "NEW", emphasis=False) == (
        "a, NEW ,b,(old:1.2),((old)),[old], old_x, xold, \\(old\\), (old and more)\n", 1)
    # An escaped-bracket tag is matched literally, also inside emphasis.
    assert rn.rename_in_text("(character \\(series\\)), x", "character \\(series\\)", "c")[0] == "(c), x"
    # A bracketed tag also matches its escaped spelling, which gets the new name escaped the same way.
    text = "miku_\\(cosplay\\), miku_(cosplay),(miku_\\(cosplay\\):1.1), miku_\\(cosplay\\)_x\n"
    assert rn.rename_in_text(text, "miku_(cosplay)", "mk_(cos)") == (
        "mk_\\(cos\\), mk_(cos),(mk_\\(cos\\):1.1), miku_\\(cosplay\\)_x\n", 3)


def test_names_are_validated():
    for old, new in (("", "x"), ("a", " "), ("a,b", "c"), ("a", "b\nc"), ("same", "same")):
        with pytest.raises(BPError):
            rn.check_names(old, new)


def test_dry_run_shows_every_change_and_writes_nothing(dataset):
    plan = rn.plan_rename(dataset, "sakimichan", "sakim").to_dict()
    assert [f["path"] for f in plan["files"]] == ["a.txt", "b.txt", "c.txt", "sub/d.txt"]
    assert plan["replacements"] == 5 and plan["captions_scanned"] == 5
    d = next(f for f in plan["files"] if f["path"] == "sub/d.txt")
    assert d["lines"] == [{"line": 1, "before": "sakimichan, café, [ sakimichan ]", "after": "sakim, café, [ sakim ]"}]
    b = next(f for f in plan["files"] if f["path"] == "b.txt")
    assert b["lines"] == [{"line": 1, "before": "(sakimichan:1.2),  solo", "after": "(sakim:1.2),  solo"}]
    assert contents(dataset) == before(dataset)
    assert not (dataset / JOURNAL_DIR).exists()


def test_dry_run_without_match_lists_similar_tags(dataset):
    plan = rn.plan_rename(dataset, "Sakimichan", "sakim").to_dict()
    assert plan["files"] == [] and plan["similar"][0] == {"tag": "sakimichan", "count": 3}  # a, c, d (b has "(sakimichan:1.2)")


def test_apply_then_undo_byte_exact(dataset):
    result = rn.apply_rename(dataset, "sakimichan", "sakim")
    assert result["applied"] == 4 and result["conflicts"] == [] and result["state"] == "applied"
    assert contents(dataset) == after(dataset)
    assert (dataset / "notes.txt").read_bytes() == b"sakimichan"
    assert os.stat(dataset / "a.txt").st_mode & 0o777 == 0o600  # permissions kept
    journal = json.loads(Path(result["journal"]).read_text())
    assert journal["state"] == "applied" and len(journal["files"]) == 4
    backup = Path(result["journal"]).parent / "backup"
    assert (backup / "sub/d.txt").read_bytes() == CAPTIONS["sub/d.txt"][0]

    # Running the same apply again changes nothing (no caption has the tag any more).
    assert rn.apply_rename(dataset, "sakimichan", "sakim")["journal"] is None

    undone = rn.undo_rename(result["journal"])
    assert undone["restored"] == 4 and undone["conflicts"] == []
    assert contents(dataset) == before(dataset)
    assert os.stat(dataset / "a.txt").st_mode & 0o777 == 0o600
    # Undo twice: nothing left to restore.
    again = rn.undo_rename(Path(result["journal"]).parent)
    assert again["restored"] == 0 and again["already_original"] == 4


def _crash_on_call(monkeypatch, n: int) -> list:
    real = rn._write_caption
    calls = []

    def flaky(path, data, mode, tmp_dir):
        calls.append(path)
        if len(calls) == n:
            raise KeyboardInterrupt("simulated crash")
        real(path, data, mode, tmp_dir)

    monkeypatch.setattr(rn, "_write_caption", flaky)
    return calls


def test_interrupted_apply_is_completed_by_running_it_again(dataset, monkeypatch):
    _crash_on_call(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        rn.apply_rename(dataset, "sakimichan", "sakim")
    monkeypatch.undo()
    now = contents(dataset)
    assert now["a.txt"] == after(dataset)["a.txt"] and now["b.txt"] == after(dataset)["b.txt"]
    assert now["c.txt"] == before(dataset)["c.txt"] and now["sub/d.txt"] == before(dataset)["sub/d.txt"]
    (jpath, journal), = rn.unfinished_journals(dataset)
    assert journal["state"] == "applying"

    # Another rename is refused while this one is unfinished; the message names the journal.
    with pytest.raises(BPError, match="unfinished"):
        rn.apply_rename(dataset, "solo", "alone")

    resumed = rn.apply_rename(dataset, "sakimichan", "sakim")
    assert resumed["resumed"] is True and resumed["applied"] == 2 and resumed["already"] == 2
    assert resumed["journal"] == str(jpath)
    assert contents(dataset) == after(dataset)
    assert rn.unfinished_journals(dataset) == []


def test_interrupted_apply_can_be_undone(dataset, monkeypatch):
    _crash_on_call(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        rn.apply_rename(dataset, "sakimichan", "sakim")
    monkeypatch.undo()
    (jpath, _), = rn.unfinished_journals(dataset)
    undone = rn.undo_rename(jpath)
    assert undone["restored"] == 1 and undone["already_original"] == 3
    assert contents(dataset) == before(dataset)
    assert rn.unfinished_journals(dataset) == []


def test_crash_before_any_backup_leaves_captions_untouched(dataset, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt("crash while backing up")

    monkeypatch.setattr(rn, "atomic_write_bytes", boom)
    with pytest.raises(KeyboardInterrupt):
        rn.apply_rename(dataset, "sakimichan", "sakim")
    monkeypatch.undo()
    assert contents(dataset) == before(dataset)
    (_, journal), = rn.unfinished_journals(dataset)
    assert journal["state"] == "planned"
    assert rn.apply_rename(dataset, "sakimichan", "sakim")["applied"] == 4
    assert contents(dataset) == after(dataset)


def test_files_edited_after_the_plan_are_never_overwritten(dataset, monkeypatch):
    result = rn.apply_rename(dataset, "sakimichan", "sakim")
    (dataset / "c.txt").write_bytes(b"edited by hand")
    undone = rn.undo_rename(result["journal"])
    assert [c["path"] for c in undone["conflicts"]] == ["c.txt"]
    assert (dataset / "c.txt").read_bytes() == b"edited by hand"
    assert (dataset / "a.txt").read_bytes() == CAPTIONS["a.txt"][0]

    # During an interrupted apply, a file changed before it was reached is skipped and reported.
    (dataset / "c.txt").write_bytes(CAPTIONS["c.txt"][0])
    _crash_on_call(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        rn.apply_rename(dataset, "sakimichan", "sakim")
    monkeypatch.undo()
    (dataset / "sub/d.txt").write_bytes(b"sakimichan, changed meanwhile")
    resumed = rn.apply_rename(dataset, "sakimichan", "sakim")
    assert [c["path"] for c in resumed["conflicts"]] == ["sub/d.txt"]
    assert (dataset / "sub/d.txt").read_bytes() == b"sakimichan, changed meanwhile"


def test_cli_rename_dry_run_apply_undo(dataset, capsys):
    args = ["tags", "rename", "--dataset", str(dataset), "--from", "sakimichan", "--to", "sakim", "--json"]
    assert main(args) == 0
    dry = json.loads(capsys.readouterr().out)
    assert dry["dry_run"] is True and dry["files_changed"] == 4
    assert contents(dataset) == before(dataset)
    assert main(args + ["--apply"]) == 0
    applied = json.loads(capsys.readouterr().out)
    assert contents(dataset) == after(dataset)
    assert main(["tags", "rename", "--undo", applied["journal"], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["restored"] == 4
    assert contents(dataset) == before(dataset)
    assert main(["tags", "journals", "--dataset", str(dataset), "--json"]) == 0
    assert [j["state"] for j in json.loads(capsys.readouterr().out)["journals"]] == ["undone"]
    # Bad input: one line, exit 2.
    assert main(["tags", "rename", "--dataset", str(dataset / "nope"), "--from", "a", "--to", "b"]) == 2
    assert "does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- a real kill -9

KILLED_CHILD = r"""
import os, sys, time
from bp_trainer.tokens import rename as rn
from bp_trainer.tokens.audit import JOURNAL_DIR

stop_at, marker = int(os.environ["BP_TEST_STOP_AT"]), os.environ["BP_TEST_MARKER"]
real_replace, seen = os.replace, []

def replace(src, dst, *a, **k):  # every atomic write ends with this rename: stop before the chosen caption's
    if str(dst).endswith(".txt") and JOURNAL_DIR not in str(dst):
        seen.append(dst)
        if len(seen) == stop_at:
            with open(marker, "w") as fh:
                fh.write(str(src))  # the temporary file, written and not yet renamed
            time.sleep(600)  # killed here
    return real_replace(src, dst, *a, **k)

os.replace = replace
if sys.argv[1] == "undo":
    rn.undo_rename(sys.argv[2])
else:
    rn.apply_rename(sys.argv[2], sys.argv[3], sys.argv[4])
"""


def _kill_during(args: list, stop_at: int, tmp_path: Path) -> str:
    """Run apply/undo in a child process and SIGKILL it while its `stop_at`-th caption write is half done;
    returns the temporary file it had written."""
    import signal
    import subprocess
    import sys
    import time

    marker = tmp_path / f"marker-{stop_at}-{args[0]}"
    env = dict(os.environ, BP_TEST_STOP_AT=str(stop_at), BP_TEST_MARKER=str(marker),
               PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, *args], env=env)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() or not marker.read_text():
            assert child.poll() is None, "the child ended before the chosen write"
            assert time.monotonic() < deadline, "the child never reached the chosen write"
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
    return marker.read_text()


def dataset_files(root: Path) -> set:
    """Every file of the dataset outside the rename journals."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and JOURNAL_DIR not in p.parts}


def test_kill_during_undo_is_journaled_blocks_renames_and_resumes(dataset, tmp_path, capsys):
    files = dataset_files(dataset)
    applied = rn.apply_rename(dataset, "sakimichan", "sakim")
    temporary = _kill_during(["undo", applied["journal"]], 2, tmp_path)

    assert JOURNAL_DIR in Path(temporary).parts  # the temporary file was never written beside the captions
    assert dataset_files(dataset) == files  # no .partial (or anything else) left in the dataset
    (jpath, journal), = rn.unfinished_journals(dataset)
    assert journal["state"] == "undoing" and str(jpath) == applied["journal"]
    now = contents(dataset)
    assert now["a.txt"] == before(dataset)["a.txt"] and now["b.txt"] == after(dataset)["b.txt"]  # half undone

    # A new rename (or the same one again) is refused until the undo is finished, saying how.
    for old, new in (("solo", "alone"), ("sakimichan", "sakim")):
        with pytest.raises(BPError, match="undo of the rename 'sakimichan' -> 'sakim' was interrupted") as err:
            rn.apply_rename(dataset, old, new)
        assert f"tags rename --undo {jpath}" in str(err.value)
    assert main(["tags", "rename", "--dataset", str(dataset), "--from", "solo", "--to", "alone", "--apply"]) == 2
    assert "--undo" in capsys.readouterr().err
    assert main(["tags", "rename", "--dataset", str(dataset), "--from", "solo", "--to", "alone"]) == 0
    assert f"finish it with: tags rename --undo {jpath}" in capsys.readouterr().out  # the dry run says so too

    finished = rn.undo_rename(jpath)  # running the undo again completes it
    assert finished["state"] == "undone" and finished["restored"] == 3 and finished["already_original"] == 1
    assert contents(dataset) == before(dataset)
    assert not list(dataset.rglob("*.partial"))  # the journal's own temporary file is gone too
    assert rn.unfinished_journals(dataset) == []
    assert rn.apply_rename(dataset, "solo", "alone")["applied"] == 2  # b.txt, e.txt


def test_kill_during_apply_leaves_no_temporary_file_and_resumes(dataset, tmp_path):
    files = dataset_files(dataset)
    temporary = _kill_during(["apply", str(dataset), "sakimichan", "sakim"], 3, tmp_path)
    assert JOURNAL_DIR in Path(temporary).parts and Path(temporary).exists()
    assert dataset_files(dataset) == files
    (_, journal), = rn.unfinished_journals(dataset)
    assert journal["state"] == "applying"
    resumed = rn.apply_rename(dataset, "sakimichan", "sakim")
    assert resumed["resumed"] is True and resumed["applied"] == 2 and resumed["already"] == 2
    assert contents(dataset) == after(dataset) and not Path(temporary).exists()
    assert not list(dataset.rglob("*.partial"))


def test_partial_files_left_beside_captions_by_older_versions_are_removed(dataset):
    applied = rn.apply_rename(dataset, "sakimichan", "sakim")
    legacy = [dataset / ".a.txt.k2j3h4.partial", dataset / "sub" / ".d.txt.x9y8.partial"]
    for p in legacy:
        p.write_bytes(b"half a caption")
    keep = dataset / ".a.txt.notes"  # not an atomic-write temporary: left alone
    keep.write_bytes(b"x")
    rn.undo_rename(applied["journal"])
    assert not any(p.exists() for p in legacy) and keep.exists()
    assert contents(dataset) == before(dataset)
