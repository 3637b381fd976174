"""Foundation: CLI contract, atomic writes, the offline CLIP vocabulary, the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bp_trainer import cli
from bp_trainer.clip_vocab import BOS_ID, EOS_ID, VOCAB_SIZE, load_vocab_and_merges
from bp_trainer.errors import BPError
from bp_trainer.fsutil import atomic_path, atomic_write_text, refuse_overwriting_inputs


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


def test_cli_lists_every_contract_command():
    parser = cli.build_parser(only="")
    names = set(parser._subparsers._group_actions[0].choices)  # noqa: SLF001
    assert {"hash", "inspect", "merge", "convert", "demo-model", "buckets", "tokens", "tags",
            "demo-dataset", "train", "demo", "ui", "infotext"} <= names


def test_demo_model_writes_a_loadable_diffusers_folder(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bp_trainer", "demo-model", "--out", str(tmp_path), "--json"],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(result["diffusers"], subfolder="unet")
    assert unet.config.cross_attention_dim == 32
