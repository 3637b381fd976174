"""Foundation: CLI contract, atomic writes, the offline CLIP vocabulary, the tiny model."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from bp_trainer import cli
from bp_trainer.clip_vocab import BOS_ID, EOS_ID, VOCAB_SIZE, load_vocab_and_merges
from bp_trainer.errors import BPError
from bp_trainer.fsutil import atomic_path, atomic_write_text, refuse_overwriting_inputs

ROOT = Path(__file__).resolve().parent.parent


def test_vocab_matches_openai_clip_layout():
    vocab, merges = load_vocab_and_merges()
    assert len(vocab) == VOCAB_SIZE
    assert len(merges) == 48894
    assert vocab["<|startoftext|>"] == BOS_ID and vocab["<|endoftext|>"] == EOS_ID
    assert vocab[",</w>"] == 267  # the WebUI's comma_token


def test_tokenizer_splits_like_the_webui(clip_tokenizer):
    ids = clip_tokenizer("1girl, Artist_Name, (sakimichan:1.2)", add_special_tokens=False).input_ids
    pieces = clip_tokenizer.convert_ids_to_tokens(ids)
    # Pieces checked against open_clip 2.20's SimpleTokenizer and the HF ViT-L/14 tokenizer (shared/notes).
    assert pieces == ['1</w>', 'girl</w>', ',</w>', 'artist</w>', '_</w>', 'name</w>', ',</w>', '(</w>',
                      'sa', 'kim', 'ic', 'han</w>', ':</w>', '1</w>', '.</w>', '2</w>', ')</w>']


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
    atomic_write_text(target, "new")
    assert target.read_text() == "new"


def test_refuses_overwriting_an_input(tmp_path):
    src = tmp_path / "a.safetensors"
    src.write_bytes(b"x")
    with pytest.raises(BPError, match="overwrite an input"):
        refuse_overwriting_inputs(tmp_path / "." / "a.safetensors", [src])
    refuse_overwriting_inputs(tmp_path / "b.safetensors", [src])


CONTRACT_COMMANDS = {"hash", "inspect", "merge", "convert", "demo-model", "buckets", "tokens", "tags", "demo-dataset",
                     "train", "demo", "ui", "infotext"}


def _help(capsys, argv):
    with pytest.raises(SystemExit) as done:
        cli.main([*argv, "--help"])
    assert done.value.code == 0, argv
    return capsys.readouterr().out


def _commands_in_help(text):
    """The command names `bp-train --help` lists (the indented first word of each line under COMMAND)."""
    return {m.group(1) for m in re.finditer(r"^    ([a-z][a-z0-9-]*)(?:\s|$)", text, re.M)}


def test_help_lists_every_contract_command_and_each_runs(capsys):
    top = _help(capsys, [])
    assert top.startswith("usage: bp-train ")
    assert _commands_in_help(top) == CONTRACT_COMMANDS == set(cli.COMMANDS)  # the table and --help agree
    for name in sorted(CONTRACT_COMMANDS):
        text = _help(capsys, [name])
        assert text.startswith(f"usage: bp-train {name} "), name


def _documented_calls():
    """(argv prefix, options) of every `bp-train …` call shown in README.md and docs/*.md."""
    calls = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = re.sub(r"\\\n\s*", " ", doc.read_text(encoding="utf-8"))  # join `\`-continued shell lines
        for line in text.splitlines():
            for call in re.findall(r"bp-train ([^`#;>]*)", line.split("  #")[0]):
                words = call.split()
                if not words or words[0] not in cli.COMMANDS:
                    continue
                prefix = words[:2] if words[0] == "tags" and len(words) > 1 and words[1].isalpha() else words[:1]
                options = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", call))
                calls.append((doc.name, prefix, options))
    return calls


def test_every_option_the_docs_show_is_in_the_commands_help(capsys):
    calls = _documented_calls()
    assert len({tuple(prefix) for _, prefix, _ in calls}) >= 12  # the docs do show the commands
    for doc, prefix, options in calls:
        text = _help(capsys, prefix)
        missing = {o for o in options if not re.search(rf"(?<![\w-]){o}(?![\w-])", text)}
        assert not missing, f"{doc}: `bp-train {' '.join(prefix)}` has no {sorted(missing)}"


def _installed_cli():
    """The `bp-train` script of this Python's environment, installed for this checkout, else a skip (a failure in CI,
    where dev/setup.sh has installed it)."""
    script = Path(sysconfig.get_path("scripts")) / ("bp-train.exe" if os.name == "nt" else "bp-train")
    where = subprocess.run([sys.executable, "-c", "import bp_trainer; print(bp_trainer.__file__)"],
                           capture_output=True, text=True, cwd=script.anchor, env=_env_without_pythonpath())
    problem = None
    if not script.is_file():
        problem = f"{script} is not installed"
    elif Path(where.stdout.strip() or "?").resolve() != ROOT / "bp_trainer" / "__init__.py":
        problem = f"{script} runs {where.stdout.strip() or 'nothing'} ({where.stderr.strip()[-200:]}), not this checkout"
    if problem:
        message = f"{problem}: run dev/setup.sh (it installs this checkout into .venv, editable)"
        if os.environ.get("CI", "").lower() in ("1", "true") or os.environ.get("BP_TRAIN_REQUIRE_SETUP") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return script


def _env_without_pythonpath():
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def test_bp_train_is_installed_and_runs_from_any_folder(tmp_path):
    script = _installed_cli()
    env = _env_without_pythonpath()
    shown = subprocess.run([str(script), "--help"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("usage: bp-train ") and _commands_in_help(shown.stdout) == CONTRACT_COMMANDS
    sample = tmp_path / "sample.bin"
    sample.write_bytes(b"BP Train" * 1000)
    hashed = subprocess.run([str(script), "hash", "sample.bin", "--json", "--no-cache"], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=120)
    assert hashed.returncode == 0, hashed.stderr
    assert json.loads(hashed.stdout)["sha256"] == hashlib.sha256(sample.read_bytes()).hexdigest()
    as_module = subprocess.run([sys.executable, "-m", "bp_trainer", "--help"], capture_output=True, text=True,
                               cwd=tmp_path, env=env, timeout=120)
    assert as_module.returncode == 0 and as_module.stdout == shown.stdout, as_module.stderr


def test_demo_model_writes_a_loadable_diffusers_folder(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bp_trainer", "demo-model", "--out", str(tmp_path), "--json"],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(result["diffusers"], subfolder="unet")
    assert unet.config.cross_attention_dim == 32


_FAKE_APT = r"""#!/usr/bin/env bash
# apt 2.6 as measured with a held lock: `update` fails at once while the lists lock is held, option or not;
# other commands wait for the dpkg lock only with -o DPkg::Lock::Timeout=N, else fail at once.
echo "$*" >> "$FAKE/calls"
if [[ " $* " == *" update "* ]]; then
  [ -e "$FAKE/lists.lock" ] && { echo "E: Could not get lock /var/lib/apt/lists/lock. It is held by process 1 (apt-get)" >&2; exit 100; }
  exit 0
fi
if [[ "$*" == *"DPkg::Lock::Timeout="* ]]; then
  while [ -e "$FAKE/dpkg.lock" ]; do sleep 0.1; done
fi
[ -e "$FAKE/dpkg.lock" ] && { echo "E: Could not get lock /var/lib/dpkg/lock-frontend" >&2; exit 100; }
printf '#!/bin/sh\necho Chromium 1.0\n' > "$BP_CHROMIUM" && chmod +x "$BP_CHROMIUM"
"""


def test_ensure_chromium_waits_for_another_apt_get(tmp_path):
    # Another apt-get holds the package lists, then dpkg: the script waits for both instead of failing.
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "apt-get").write_text(_FAKE_APT)
    (fake / "sudo").write_text('#!/bin/sh\nexec "$@"\n')  # when the tests do not run as root
    for tool in ("apt-get", "sudo"):
        (fake / tool).chmod(0o755)
    (fake / "lists.lock").touch()
    (fake / "dpkg.lock").touch()
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "FAKE": str(fake),
           "BP_CHROMIUM": str(tmp_path / "chromium")}
    proc = subprocess.Popen(["bash", str(ROOT / "dev" / "ensure_chromium.sh")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    (fake / "lists.lock").unlink()  # the other apt-get finishes its update ...
    time.sleep(3)
    (fake / "dpkg.lock").unlink()  # ... then its install
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "chromium ready: Chromium 1.0" in out and "waiting" in err
    calls = (fake / "calls").read_text().splitlines()
    assert sum(" update " in f" {c} " for c in calls) >= 2 and "install" in calls[-1]
