"""Input-hash cache (path + size + mtime_ns + inode) and the header-first write with the output hashed while written."""

from __future__ import annotations

import hashlib
import json
import os
import random
import time

import pytest
import torch
from safetensors.torch import save_file

from bp_trainer.checkpoint import assemble, hashcache
from bp_trainer.checkpoint.assemble import MergeOptions, merge
from bp_trainer.checkpoint.hashes import FollowingHasher
from bp_trainer.checkpoint.io import Entry, LateMetadata, open_file, write_checkpoint
from bp_trainer.cli import main
from bp_trainer.errors import BPError


@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory, monkeypatch):
    d = tmp_path_factory.mktemp("hash-cache") / "cache"
    monkeypatch.setenv("BP_TRAIN_CACHE_DIR", str(d))
    return d


def _independent(path) -> dict:
    data = open(path, "rb").read()
    sha = hashlib.sha256(data).hexdigest()
    return {"sha256": sha, "autov2": sha[:10], "old": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]}


def _age(path, seconds=100.0) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


@pytest.fixture()
def computed(monkeypatch):
    """Counts real hash computations done through the cache."""
    calls = []
    real = hashcache.file_hashes

    def counting(p):
        calls.append(os.fspath(p))
        return real(p)

    monkeypatch.setattr(hashcache, "file_hashes", counting)
    return calls


def test_hit_miss_and_invalidation_on_mtime_size_and_inode(tmp_path, computed, cache_dir):
    p = tmp_path / "m.safetensors"
    p.write_bytes(os.urandom(0x110000 + 123))
    _age(p)
    first = hashcache.cached_file_hashes(p)
    assert first == _independent(p) and len(computed) == 1
    stored = json.loads((cache_dir / "hashes.json").read_text())["files"][os.path.realpath(p)]
    assert stored["size"] == p.stat().st_size and stored["mtime_ns"] == p.stat().st_mtime_ns
    assert hashcache.cached_file_hashes(p) == first and len(computed) == 1  # hit

    _age(p, 50)  # touched: same bytes, new mtime -> recomputed
    assert hashcache.cached_file_hashes(p) == first and len(computed) == 2
    assert hashcache.cached_file_hashes(p) == first and len(computed) == 2

    st = p.stat()
    with open(p, "ab") as fh:  # size changes, mtime put back to the recorded value
        fh.write(b"x")
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert hashcache.lookup(p) is None
    grown = hashcache.cached_file_hashes(p)
    assert grown == _independent(p) != first and len(computed) == 3

    other = tmp_path / "other"  # replaced by another file (new inode), same size and mtime
    other.write_bytes(b"y" * p.stat().st_size)
    st = p.stat()
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, p)
    assert hashcache.lookup(p) is None
    assert hashcache.cached_file_hashes(p) == _independent(p) and len(computed) == 4


def test_recently_modified_file_is_hashed_but_not_cached(tmp_path, computed):
    p = tmp_path / "fresh.bin"
    p.write_bytes(b"abc" * 1000)
    assert hashcache.cached_file_hashes(p) == _independent(p)
    assert hashcache.lookup(p) is None
    hashcache.cached_file_hashes(p)
    assert len(computed) == 2


@pytest.mark.parametrize("content", [b"{not json", b"\x00\xff\xfe", b"[]", b'{"version": 1, "files": []}',
                                     b'{"version": 999, "files": {}}'])
def test_corrupt_or_foreign_cache_file_is_tolerated_and_replaced(tmp_path, cache_dir, computed, content):
    p = tmp_path / "m.bin"
    p.write_bytes(os.urandom(5000))
    _age(p)
    cache_dir.mkdir()
    (cache_dir / "hashes.json").write_bytes(content)
    assert hashcache.cached_file_hashes(p) == _independent(p)
    assert hashcache.cached_file_hashes(p) == _independent(p) and len(computed) == 1  # rewritten, now a hit


def test_malformed_entry_is_not_trusted(tmp_path, cache_dir, computed):
    p = tmp_path / "m.bin"
    p.write_bytes(os.urandom(5000))
    _age(p)
    hashcache.cached_file_hashes(p)
    data = json.loads((cache_dir / "hashes.json").read_text())
    data["files"][os.path.realpath(p)]["sha256"] = "zz" * 32
    (cache_dir / "hashes.json").write_text(json.dumps(data))
    assert hashcache.cached_file_hashes(p) == _independent(p) and len(computed) == 2


def test_unwritable_cache_location_only_costs_time(tmp_path, monkeypatch, computed):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("BP_TRAIN_CACHE_DIR", str(blocker))
    p = tmp_path / "m.bin"
    p.write_bytes(os.urandom(5000))
    _age(p)
    assert hashcache.cached_file_hashes(p) == _independent(p)
    assert hashcache.cached_file_hashes(p) == _independent(p) and len(computed) == 2


def test_hash_cli_uses_and_fills_the_cache_and_no_cache_recomputes(tmp_path, cache_dir, capsys):
    p = tmp_path / "m.safetensors"
    p.write_bytes(os.urandom(20000))
    _age(p)
    assert main(["hash", str(p), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == _independent(p)
    # plant a different (well-formed) value for the unchanged file: a plain `hash` answers from the cache,
    # `--no-cache` recomputes and repairs the entry
    data = json.loads((cache_dir / "hashes.json").read_text())
    data["files"][os.path.realpath(p)]["sha256"] = "ab" * 32
    (cache_dir / "hashes.json").write_text(json.dumps(data))
    assert main(["hash", str(p), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sha256"] == "ab" * 32
    assert main(["hash", str(p), "--json", "--no-cache"]) == 0
    assert json.loads(capsys.readouterr().out) == _independent(p)
    assert main(["hash", str(p), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == _independent(p)


def test_following_hasher_with_out_of_order_regions(tmp_path):
    data = os.urandom(3 * 0x100000 + 4567)
    p = tmp_path / "f.bin"
    regions = []
    pos = 0
    rng = random.Random(0)
    while pos < len(data):
        n = min(len(data) - pos, rng.randint(1, 300_000))
        regions.append((pos, n))
        pos += n
    rng.shuffle(regions)
    with open(p, "wb") as fh:
        h = FollowingHasher(p, len(data))
        for off, n in regions:
            os.pwrite(fh.fileno(), data[off:off + n], off)
            h.written(off, n)
        assert h.result() == _independent(p)


def test_following_hasher_refuses_a_gap(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"a" * 100)
    h = FollowingHasher(p, 100)
    h.written(0, 40)
    h.written(50, 50)
    with pytest.raises(RuntimeError, match="never reported"):
        h.result()


def _big_source(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(n, generator=g) for i, n in enumerate([700_000, 3, 1_300_000, 0, 250_000])}
    tensors["ids"] = torch.arange(77).reshape(1, 77)
    src = tmp_path / "src.safetensors"
    save_file(tensors, str(src))
    return src


@pytest.mark.parametrize("direct", [True, False])
def test_header_first_write_is_byte_identical_and_hashed_right(tmp_path, direct):
    src_path = _big_source(tmp_path)
    outs = {}
    with open_file(src_path) as src:
        entries = [Entry(k, torch.float16 if src.info(k).dtype.is_floating_point else src.info(k).dtype,
                         src.info(k).shape, (lambda k=k: src.get_as(k, torch.float16)),
                         direct=(src, k) if direct else None) for k in src.keys()]
        for ready in (False, True):
            out = tmp_path / f"out-{ready}.safetensors"
            late = LateMetadata(value=lambda: {"late": "x" * 300}, ready=lambda ready=ready: ready, reserve=400)
            res = write_checkpoint(entries, out, {"a": "1"}, late=late)
            assert {k: res[k] for k in ("sha256", "autov2", "old")} == _independent(out)
            assert res["bytes"] == out.stat().st_size > 0x110000
            outs[ready] = out.read_bytes()
    assert outs[True] == outs[False]
    with open_file(tmp_path / "out-True.safetensors") as o:
        assert o.metadata == {"a": "1", "late": "x" * 300}


def test_failure_on_the_header_first_path_leaves_no_output(tmp_path):
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"previous content")

    def boom():
        raise OSError(28, "No space left on device")

    entries = [Entry("a", torch.float32, (300_000,), lambda: torch.zeros(300_000)),
               Entry("b", torch.float32, (10,), boom)]
    with pytest.raises(BPError, match="No space left"):
        write_checkpoint(entries, target, late=LateMetadata(value=lambda: {"k": "v"}, ready=lambda: True, reserve=100))
    assert target.read_bytes() == b"previous content"
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo-model", "--out", str(out)]) == 0
    for name in ("tiny-sd.safetensors", "tiny-vae.safetensors"):
        _age(out / name)  # as a downloaded model would be: not modified just now
    return out


def test_merge_cold_then_warm_same_bytes_hashes_right_and_cache_filled(demo, tmp_path, monkeypatch, cache_dir):
    base, vae = demo / "tiny-sd.safetensors", demo / "tiny-vae.safetensors"
    paths_taken = []
    real = assemble.write_checkpoint

    def spy(*a, **kw):
        late = kw["late"]

        def ready():  # the writer's question: header first?
            paths_taken.append(late.ready())
            return paths_taken[-1]

        return real(*a, **{**kw, "late": LateMetadata(late.value, ready, late.reserve)})

    monkeypatch.setattr(assemble, "write_checkpoint", spy)
    # cold: nothing cached -> hashes computed meanwhile; make sure they are not finished before writing
    real_hash = hashcache.file_hashes

    def slow(p):
        time.sleep(0.3)
        return real_hash(p)

    monkeypatch.setattr(hashcache, "file_hashes", slow)
    opts = dict(base=str(base), vae=str(vae), precision="fp16", use_ema=True)
    cold, warm = tmp_path / "cold.safetensors", tmp_path / "warm.safetensors"
    r_cold = merge(MergeOptions(**opts), cold)
    assert hashcache.lookup(base) == _independent(base) and hashcache.lookup(vae) == _independent(vae)
    r_warm = merge(MergeOptions(**opts), warm)
    assert paths_taken == [False, True]
    assert cold.read_bytes() == warm.read_bytes()
    for r, out in ((r_cold, cold), (r_warm, warm)):
        assert {k: r[k] for k in ("sha256", "autov2", "old")} == _independent(out)
        recipe = json.loads(open_file(out).metadata["bp_recipe"])
        assert recipe["inputs"]["base"]["sha256"] == _independent(base)["sha256"]
        assert recipe["inputs"]["vae"]["autov2"] == _independent(vae)["autov2"]


def test_cli_merge_warm_disk_full_leaves_no_output(demo, tmp_path, monkeypatch):
    from bp_trainer.checkpoint import io as cio

    base = demo / "tiny-sd.safetensors"
    assert main(["hash", str(base)]) == 0  # a base hashed before: the merge takes the header-first path
    assert hashcache.lookup(base) is not None
    real = os.pwrite
    calls = {"n": 0}

    def full(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 20:
            raise OSError(28, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(cio.os, "pwrite", full)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert main(["merge", "--base", str(base), "--precision", "fp16", "--out", str(out_dir / "o.safetensors")]) == 2
    assert calls["n"] > 20 and os.listdir(out_dir) == []
