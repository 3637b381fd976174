"""Checkpoint I/O: WebUI hashes, the streaming safetensors writer, readers, refusal of unsafe pickles, atomicity."""

from __future__ import annotations

import hashlib
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bp_trainer.checkpoint.hashes import HashingWriter, file_hashes
from bp_trainer.checkpoint.io import Entry, open_file, write_checkpoint
from bp_trainer.cli import main
from bp_trainer.errors import BPError, UnsafePickleError


@pytest.fixture(autouse=True)
def _private_hash_cache(tmp_path_factory, monkeypatch):
    """Keep the hash cache (merge, hash) out of the user's ~/.cache (and out of tmp_path, which tests list)."""
    monkeypatch.setenv("BP_TRAIN_CACHE_DIR", str(tmp_path_factory.mktemp("hash-cache")))


def _independent_hashes(path: Path) -> dict:
    data = path.read_bytes()
    full = hashlib.sha256(data).hexdigest()
    return {"sha256": full, "autov2": full[:10], "old": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]}


@pytest.mark.parametrize("size", [0, 1000, 0x100000 + 5, 0x110000 + 12345])
def test_file_hashes_match_an_independent_computation(tmp_path, size):
    p = tmp_path / "f.bin"
    p.write_bytes(os.urandom(size))
    assert file_hashes(p) == _independent_hashes(p)


def test_hashing_writer_equals_file_hashes(tmp_path):
    data = os.urandom(0x110000 + 777)
    p = tmp_path / "w.bin"
    with open(p, "wb") as fh:
        w = HashingWriter(fh)
        for i in range(0, len(data), 99_991):  # odd chunking across the old-hash window
            w.write(data[i : i + 99_991])
    assert w.hashes() == _independent_hashes(p)


def test_hash_cli_json(tmp_path, capsys):
    p = tmp_path / "x.safetensors"
    save_file({"a": torch.arange(400_000, dtype=torch.float32)}, str(p))
    assert main(["hash", str(p), "--json"]) == 0
    import json

    assert json.loads(capsys.readouterr().out) == _independent_hashes(p)


def _sample_tensors():
    g = torch.Generator().manual_seed(3)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 2, 2, generator=g).to(torch.bfloat16),
        "i64": torch.arange(6, dtype=torch.int64).reshape(1, 6),
        "i32": torch.tensor(5, dtype=torch.int32),
        "u8": torch.arange(9, dtype=torch.uint8),
        "b": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
    }


def test_writer_output_is_read_back_by_safetensors_itself(tmp_path):
    tensors = _sample_tensors()
    p = tmp_path / "out.safetensors"
    res = write_checkpoint(tensors, p, {"k": "v", "n": "1"})
    back = load_file(str(p))
    assert set(back) == set(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k
    assert res["bytes"] == p.stat().st_size and res["tensors"] == len(tensors)
    assert {k: res[k] for k in ("sha256", "autov2", "old")} == _independent_hashes(p)
    from safetensors import safe_open

    with safe_open(str(p), "pt") as f:
        assert f.metadata() == {"k": "v", "n": "1"}
    assert (p.stat().st_mode & 0o777) == 0o644
    # and by our own lazy reader
    with open_file(p) as src:
        for k, t in tensors.items():
            assert src.info(k).shape == tuple(t.shape)
            assert torch.equal(src.get(k), t)


def test_precision_applies_to_every_floating_tensor_only(tmp_path):
    tensors = _sample_tensors()
    p = tmp_path / "bf.safetensors"
    write_checkpoint(tensors, p, precision="bf16")
    back = load_file(str(p))
    for k, t in tensors.items():
        want = torch.bfloat16 if t.is_floating_point() else t.dtype
        assert back[k].dtype == want, k
        assert torch.equal(back[k], t.to(want)), k


def test_reader_handles_files_written_by_safetensors(tmp_path):
    tensors = _sample_tensors()
    p = tmp_path / "lib.safetensors"
    save_file(tensors, str(p), metadata={"a": "b"})
    with open_file(p) as src:
        assert src.metadata == {"a": "b"}
        for k, t in tensors.items():
            assert torch.equal(src.get(k), t)


def test_truncated_safetensors_is_named_with_the_problem(tmp_path):
    p = tmp_path / "t.safetensors"
    save_file({"w": torch.randn(100, 100)}, str(p))
    data = p.read_bytes()
    p.write_bytes(data[:-100])
    with pytest.raises(BPError, match="truncated") as exc:
        open_file(p)
    assert str(p) in str(exc.value)
    p.write_bytes(data[:5])
    with pytest.raises(BPError, match="8-byte"):
        open_file(p)
    p.write_bytes(struct.pack("<Q", 10) + b"not json!!")
    with pytest.raises(BPError, match="corrupt"):
        open_file(p)


def test_cli_error_is_one_line_exit_2(tmp_path, capsys):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(struct.pack("<Q", 999999) + b"{}")
    assert main(["inspect", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(p) in err and "Traceback" not in err
    assert main(["hash", str(tmp_path / "missing.safetensors")]) == 2
    assert "file not found" in capsys.readouterr().err


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


@pytest.mark.parametrize("container", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused_and_never_executed(tmp_path, container, capsys):
    marker = tmp_path / "executed.txt"
    p = tmp_path / "evil.ckpt"
    payload = {"state_dict": {"w": torch.zeros(2)}, "x": _Evil(str(marker))}
    if container == "torch.save":
        torch.save(payload, p)
    else:
        with open(p, "wb") as fh:
            pickle.dump(payload, fh)
    assert not marker.exists()
    with pytest.raises(UnsafePickleError):
        open_file(p)
    assert not marker.exists()
    assert main(["inspect", str(p)]) == 2
    assert "refused" in capsys.readouterr().err
    assert not marker.exists()


def test_ckpt_state_dict_nesting_and_metadata(tmp_path):
    p = tmp_path / "m.ckpt"
    sd = {"model.diffusion_model.x": torch.randn(3), "first_stage_model.y": torch.randn(2)}
    torch.save({"state_dict": sd, "global_step": 875000, "epoch": 3}, p)
    with open_file(p) as src:
        assert set(src.keys()) == set(sd)
        assert torch.equal(src.get("model.diffusion_model.x"), sd["model.diffusion_model.x"])
        assert src.metadata["global_step"] == "875000"
    flat = tmp_path / "flat.pt"
    torch.save(sd, flat)
    with open_file(flat) as src:
        assert set(src.keys()) == set(sd)


def test_ckpt_output_round_trip(tmp_path):
    tensors = _sample_tensors()
    p = tmp_path / "o.ckpt"
    res = write_checkpoint(tensors, p, {"m": "1"}, fmt="ckpt")
    assert {k: res[k] for k in ("sha256", "autov2", "old")} == _independent_hashes(p)
    with open_file(p) as src:
        for k, t in tensors.items():
            assert torch.equal(src.get(k), t)


def test_failure_mid_write_leaves_no_partial_output(tmp_path):
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"previous content")

    def boom():
        raise OSError(28, "No space left on device")

    entries = [Entry("a", torch.float32, (1000,), lambda: torch.zeros(1000)),
               Entry("b", torch.float32, (10,), boom)]
    with pytest.raises(BPError, match="No space left"):
        write_checkpoint(entries, target)
    assert target.read_bytes() == b"previous content"
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors"]  # no temporary file left behind

    new = tmp_path / "new.safetensors"
    with pytest.raises(BPError):
        write_checkpoint(entries, new)
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors"]


def test_output_equal_to_input_is_refused(tmp_path):
    p = tmp_path / "in.safetensors"
    save_file({"a": torch.ones(2)}, str(p))
    before = p.read_bytes()
    with pytest.raises(BPError, match="overwrite"):
        write_checkpoint({"a": torch.zeros(2)}, p, inputs=[p])
    assert p.read_bytes() == before


def test_converting_reads_cross_chunk_boundaries(tmp_path):
    from bp_trainer.checkpoint import io as cio

    g = torch.Generator().manual_seed(0)
    big = torch.randn(cio._CHUNK // 4 * 2 + 12345, generator=g)  # spans three chunks
    p = tmp_path / "big.safetensors"
    save_file({"big": big, "small": big[:7].clone(), "ids": torch.arange(5)}, str(p))
    with open_file(p) as src:
        assert torch.equal(src.get_as("big", torch.float16), big.half())
        assert torch.equal(src.get_as("big", torch.bfloat16), big.to(torch.bfloat16))
        assert torch.equal(src.get_as("small", torch.float16), big[:7].half())
        assert src.get_as("ids", torch.float16).dtype == torch.int64
        assert torch.equal(src.get_as("big", torch.float32), big)


def test_checkpoint_modules_do_not_import_diffusers_or_accelerate():
    """The WebUI process imports these; it has no diffusers."""
    import subprocess
    import sys

    code = ("import sys, bp_trainer.checkpoint, bp_trainer.checkpoint.assemble, bp_trainer.checkpoint.layout, "
            "bp_trainer.checkpoint.hashes, bp_trainer.checkpoint.ldm_keys; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'accelerate', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("bad", ["unet/config.json", "scheduler/scheduler_config.json"])
def test_diffusers_folder_with_a_broken_config_is_a_bperror_naming_it(tmp_path, bad):
    root = tmp_path / "model"
    (root / "unet").mkdir(parents=True)
    (root / "scheduler").mkdir()
    save_file({"conv_in.weight": torch.zeros(2, 2)}, str(root / "unet" / "diffusion_pytorch_model.safetensors"))
    (root / "unet" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}', encoding="utf-8")
    (root / "scheduler" / "scheduler_config.json").write_text("{}", encoding="utf-8")
    (root / bad).write_text('{"_class_name": "UNet2D', encoding="utf-8")  # cut short
    with pytest.raises(BPError) as info:
        open_file(root)
    assert info.value.path is not None and Path(info.value.path) == root / bad


def test_ckpt_output_is_the_same_bytes_whatever_the_file_is_called(tmp_path):
    """Written through one file object: torch's zip archive no longer takes its inner folder name from the
    random temporary file name, so the same tensors give the same file and the same hashes."""
    tensors = _sample_tensors()
    a = write_checkpoint(tensors, tmp_path / "a.ckpt", {"m": "1"}, fmt="ckpt")
    b = write_checkpoint(tensors, tmp_path / "other-name.ckpt", {"m": "1"}, fmt="ckpt")
    assert (tmp_path / "a.ckpt").read_bytes() == (tmp_path / "other-name.ckpt").read_bytes()
    assert a["sha256"] == b["sha256"] == _independent_hashes(tmp_path / "a.ckpt")["sha256"]


def test_the_write_path_gives_the_same_bytes_without_positioned_writes(tmp_path, monkeypatch):
    """Windows has no os.pwrite: the writer threads then share the file position under a lock. Without late
    metadata, with it known at once (header first) and with it known only after the data (header last)."""
    from bp_trainer.checkpoint.io import LateMetadata

    g = torch.Generator().manual_seed(5)
    tensors = {f"t{i}": torch.randn(n, generator=g) for i, n in enumerate([300_000, 7, 0, 123_457])}
    tensors["ids"] = torch.arange(77)
    src = tmp_path / "src.safetensors"
    save_file(tensors, str(src))

    def write_all(tag: str) -> dict:
        outs = {}
        with open_file(src) as s:
            for late in (None, True, False):
                entries = [Entry(k, torch.float16 if s.info(k).dtype.is_floating_point else s.info(k).dtype,
                                 s.info(k).shape, (lambda k=k: s.get_as(k, torch.float16)), direct=(s, k))
                           for k in s.keys()]
                meta = None if late is None else LateMetadata(lambda: {"late": "x"}, lambda late=late: late, 64)
                out = tmp_path / f"{tag}-{late}.safetensors"
                res = write_checkpoint(entries, out, {"a": "1"}, late=meta)
                assert {k: res[k] for k in ("sha256", "autov2", "old")} == _independent_hashes(out)
                outs[late] = out.read_bytes()
        return outs

    positioned = write_all("pwrite")
    monkeypatch.delattr(os, "pwrite")
    assert write_all("seek") == positioned
    assert positioned[True] == positioned[False]
    back = load_file(str(tmp_path / "seek-None.safetensors"))
    assert all(torch.equal(back[k], t.half() if t.is_floating_point() else t) for k, t in tensors.items())
