"""Output paths of merge/convert (CLI and Merge tab alike): a folder given as the output file, a folder that does
not exist, a name longer than the file system allows are refused in one line before any work, and nothing is
created. And the stale partial files of killed writes: removed when a writer starts, never a live one's, never
anything else."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bp_trainer.checkpoint.io import write_checkpoint
from bp_trainer.cli import main
from bp_trainer.errors import BPError
from bp_trainer.fsutil import atomic_dir, atomic_path, remove_stale_partials

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models")
    assert main(["demo-model", "--out", str(out)]) == 0
    return out


def _refused(capsys, argv: list[str], *words: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and err.count("\n") == 0 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


def _merge(models: Path, out: str) -> list[str]:
    return ["merge", "--base", str(models / "tiny-sd.safetensors"), "--precision", "fp16", "--out", out]


def test_merge_out_with_a_trailing_separator_is_refused_not_written_as_a_file(models, tmp_path, capsys):
    _refused(capsys, _merge(models, str(tmp_path / "newdir") + os.sep), "must be a file name", "add a file name")
    assert os.listdir(tmp_path) == []  # before the fix: a file named 'newdir'


def test_merge_out_naming_an_existing_folder_is_refused(models, tmp_path, capsys):
    (tmp_path / "existing").mkdir()
    _refused(capsys, _merge(models, str(tmp_path / "existing")), "this is a folder", str(tmp_path / "existing"))
    assert os.listdir(tmp_path / "existing") == []


def test_merge_out_in_a_missing_folder_is_refused_with_a_hint_and_creates_nothing(models, tmp_path, capsys):
    out = tmp_path / "missing" / "deeper" / "m.safetensors"
    _refused(capsys, _merge(models, str(out)), "does not exist", "create the folder first",
             str(tmp_path / "missing" / "deeper"))
    assert os.listdir(tmp_path) == []  # before the fix: missing/deeper/ created silently


def test_merge_out_name_too_long_is_refused_in_one_line(models, tmp_path, capsys):
    err = _refused(capsys, _merge(models, str(tmp_path / ("x" * 300 + ".safetensors"))), "too long", "shorter name")
    assert len(err) < 400 and os.listdir(tmp_path) == []


def test_a_long_name_that_fits_is_written_although_its_temporary_name_would_not(models, tmp_path):
    """255 bytes is the usual limit; the temporary `.NAME.XXXXXXXX.partial` would be 273: its NAME is cut."""
    out = tmp_path / ("y" * (255 - len(".safetensors")) + ".safetensors")
    assert main(_merge(models, str(out))) == 0
    assert os.listdir(tmp_path) == [out.name]


@pytest.mark.parametrize("to, name", [("webui", "v.safetensors"), ("diffusers", "v-diffusers")])
def test_convert_out_gets_the_same_rules(models, tmp_path, capsys, to, name):
    src = str(models / "tiny-vae.safetensors") if to == "diffusers" else str(models / "tiny-sd" / "vae")
    convert = ["convert", src, "--to", to, "--out"]
    _refused(capsys, [*convert, str(tmp_path / "missing" / name)], "does not exist", "create the folder first")
    _refused(capsys, [*convert, str(tmp_path / ("z" * 300))], "too long")
    (tmp_path / "there").mkdir()
    if to == "webui":
        _refused(capsys, [*convert, str(tmp_path / "newdir") + os.sep], "must be a file name")
        _refused(capsys, [*convert, str(tmp_path / "there")], "this is a folder")
    else:
        _refused(capsys, [*convert, str(tmp_path / "there") + os.sep], "exists already")
    assert sorted(os.listdir(tmp_path)) == ["there"] and os.listdir(tmp_path / "there") == []
    assert main([*convert, str(tmp_path / name)]) == 0
    assert sorted(os.listdir(tmp_path)) == sorted(["there", name])


def test_merge_tab_refuses_a_300_character_name_and_a_missing_checkpoint_folder(models, tmp_path):
    from bp_trainer.ui.merge_tab import MergeCallbacks
    from bp_trainer.ui.standalone import StandaloneHost

    root = tmp_path / "models"
    (root / "Stable-diffusion").mkdir(parents=True)
    (root / "Stable-diffusion" / "tiny-sd.safetensors").write_bytes((models / "tiny-sd.safetensors").read_bytes())
    cb = MergeCallbacks(StandaloneHost(root, tmp_path / "runs"))
    html = cb.merge("tiny-sd.safetensors", name="n" * 300)
    assert "bp-msg-error" in html and "too long" in html and "choose a shorter name" in html
    assert os.listdir(root / "Stable-diffusion") == ["tiny-sd.safetensors"]

    gone = tmp_path / "gone"

    class MovedFolder(StandaloneHost):
        def checkpoint_dir(self) -> str:
            return str(gone)

    html = MergeCallbacks(MovedFolder(root, tmp_path / "runs")).merge("tiny-sd.safetensors", name="x")
    assert "bp-msg-error" in html and "does not exist" in html and "create the folder first" in html
    assert not gone.exists()


# ------------------------------------------------------------------------------------------ stale partials
def _stale_by_name(folder: Path) -> dict[str, Path]:
    """Every kind of entry a folder may hold: killed writes' partials (ours) and look-alikes (not ours)."""
    (folder / ".m.safetensors.ab12cd34.partial").write_bytes(b"half a tensor")  # atomic_path's
    (folder / ".m-diffusers.partial" / "unet").mkdir(parents=True)  # the trainer's diffusers folder
    (folder / ".m-diffusers.partial" / "unet" / "w.safetensors").write_bytes(b"x")
    (folder / ".pipe.k3j4h5g6.partial" / "vae").mkdir(parents=True)  # atomic_dir's
    keep = {name: folder / name for name in ("m.partial", "notes.partial.txt", ".hidden", ".partial", "m.safetensors")}
    for path in keep.values():
        path.write_bytes(b"user data")
    outside = folder.parent / f"{folder.name}-outside"
    outside.mkdir()
    (outside / "precious").write_bytes(b"keep me")
    os.symlink(outside, folder / ".link.partial")  # never followed, never removed
    keep[".link.partial"] = folder / ".link.partial"
    return keep


def test_remove_stale_partials_removes_only_what_killed_writes_leave(tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    keep = _stale_by_name(folder)
    removed = remove_stale_partials(folder)
    assert sorted(removed) == [".m-diffusers.partial", ".m.safetensors.ab12cd34.partial", ".pipe.k3j4h5g6.partial"]
    assert sorted(os.listdir(folder)) == sorted(keep)
    assert (tmp_path / "ckpts-outside" / "precious").read_bytes() == b"keep me"
    assert remove_stale_partials(folder) == [] and remove_stale_partials(tmp_path / "nope") == []


def test_a_live_atomic_write_is_never_removed(tmp_path):
    with atomic_path(tmp_path / "a.safetensors") as tmp, atomic_dir(tmp_path / "pipe") as tmp_dir:
        tmp.write_bytes(b"being written")
        (tmp_dir / "unet").mkdir()
        assert remove_stale_partials(tmp_path) == []
        assert tmp.read_bytes() == b"being written" and (tmp_dir / "unet").is_dir()
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors", "pipe"]


WRITER = r"""
import sys, time, torch
from pathlib import Path
from bp_trainer.checkpoint.io import Entry, write_checkpoint

out, release = Path(sys.argv[1]), Path(sys.argv[2])

def slow():  # the second tensor waits: the write stays in progress until `release` exists
    while not release.exists():
        time.sleep(0.05)
    return torch.ones(10)

write_checkpoint([Entry("a", torch.float32, (300_000,), lambda: torch.zeros(300_000)),
                  Entry("b", torch.float32, (10,), slow)], out, {"who": "the other writer"})
"""


def _start_writer(out: Path, release: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out), str(release)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 60
    while not [n for n in os.listdir(out.parent) if n.startswith(f".{out.name}.") and n.endswith(".partial")]:
        assert proc.poll() is None and time.time() < deadline, "the writer did not start"
        time.sleep(0.05)
    return proc


def test_a_killed_write_is_cleaned_up_when_the_next_writer_starts_and_a_live_one_is_not(tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    killed = _start_writer(folder / "killed.safetensors", tmp_path / "never")
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    stale = [n for n in os.listdir(folder) if n.endswith(".partial")]
    assert len(stale) == 1 and stale[0].startswith(".killed.safetensors.")

    live = _start_writer(folder / "live.safetensors", tmp_path / "release")
    write_checkpoint({"w": torch.ones(3)}, folder / "next.safetensors")  # a writer starting in the same folder
    left = sorted(os.listdir(folder))
    assert stale[0] not in left  # removed: its writer is gone
    assert "next.safetensors" in left and any(n.startswith(".live.safetensors.") for n in left)  # kept: live
    (tmp_path / "release").touch()
    assert live.wait(60) == 0
    assert sorted(os.listdir(folder)) == ["live.safetensors", "next.safetensors"]
    from bp_trainer.checkpoint.io import open_file

    with open_file(folder / "live.safetensors") as src:
        assert src.metadata == {"who": "the other writer"} and torch.equal(src.get("b"), torch.ones(10))


def test_convert_to_diffusers_cleans_its_folder_of_stale_partials(models, tmp_path):
    (tmp_path / ".pipe.zz99yy88.partial" / "unet").mkdir(parents=True)  # a killed conversion's half folder
    assert main(["convert", str(models / "tiny-vae.safetensors"), "--to", "diffusers", "--out",
                 str(tmp_path / "vae")]) == 0
    assert sorted(os.listdir(tmp_path)) == ["vae"]
    assert (tmp_path / "vae").stat().st_mode & 0o777 == 0o755


def test_write_checkpoint_refuses_a_folder_as_its_output(tmp_path):
    with pytest.raises(BPError, match="file name"):
        write_checkpoint({"w": torch.ones(1)}, str(tmp_path / "d") + os.sep)
    assert os.listdir(tmp_path) == []
