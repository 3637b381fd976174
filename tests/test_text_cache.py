"""Cached text-encoder outputs (`text_cache:`) with N caption variants, and the VAE / text encoder off the GPU once
every latent and text is encoded (issue 11, item 2)."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from bp_trainer.dataset import CaptionProcessor, CaptionVariants, split_tags
from bp_trainer.train import config as C
from bp_trainer.train.events import read_all
from bp_trainer.train.text_cache import TextCache
from conftest import tiny_run_raw, train_until_stopped

CAPTION = "1girl, solo, long_hair, smile, blue_eyes, hat, outdoors, sky"


def _processor(**kw):
    base = dict(shuffle=True, keep_first=1, tag_dropout=0.2, caption_dropout=0.25)
    return CaptionProcessor(**{**base, **kw})


def test_variants_are_a_fixed_set_that_every_pick_comes_from():
    v = CaptionVariants(_processor(), count=4, seed=3)
    texts = v.texts(CAPTION, "a.png")
    assert "" in texts and len(texts) == 5  # four distinct variants and the dropped caption
    tags = split_tags(CAPTION)
    for text in texts[:-1]:
        got = split_tags(text)
        assert got[0] == "1girl" and set(got) <= set(tags)  # keep-tokens kept, only the caption's own tags
    picks = Counter(v.pick(CAPTION, "a.png", random.Random(f"3:{epoch}:0")) for epoch in range(4000))
    assert set(picks) == set(texts)
    assert abs(picks[""] / 4000 - 0.25) < 0.03  # caption dropout as often as without a cache
    assert all(abs(picks[t] / 4000 - 0.75 / 4) < 0.03 for t in texts[:-1])  # the variants equally often
    assert v.texts(CAPTION, "b.png") != texts  # another image has its own variants
    assert CaptionVariants(_processor(), count=4, seed=3).texts(CAPTION, "a.png") == texts  # reproducible


def test_without_shuffle_or_tag_dropout_there_is_one_variant():
    plain = CaptionProcessor(underscores_to_spaces=True)
    v = CaptionVariants(plain, count=8, seed=0)
    assert v.texts(CAPTION, "a.png") == ["1girl, solo, long hair, smile, blue eyes, hat, outdoors, sky"]
    dropping = CaptionVariants(CaptionProcessor(caption_dropout=0.5), count=8, seed=0)
    assert dropping.texts(CAPTION, "a.png") == [CAPTION, ""]


def _encode(tiny_components, clip_tokenizer, texts, clip_skip):
    from bp_trainer.train.models import encode_captions

    with torch.no_grad():
        return encode_captions(tiny_components["text_encoder"], clip_tokenizer, texts, clip_skip=clip_skip,
                               max_chunks=3)


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_cached_conditioning_equals_the_batched_encoding(tiny_components, clip_tokenizer, tmp_path, clip_skip):
    from bp_trainer.train.models import tokenize_chunks

    long = ", ".join(f"tag{i}" for i in range(25))  # two chunks
    texts = ["1girl, solo", long, "", "smile"]
    cache = TextCache("disk", tmp_path / "tc", identity="te-a", dtype=torch.float32)
    cache.fill(texts, lambda batch: _encode(tiny_components, clip_tokenizer, batch, clip_skip),
               lambda t: tokenize_chunks(clip_tokenizer, [t], 3).shape[1], batch_size=2)
    assert cache.encoded == 4 and len(list((tmp_path / "tc").rglob("*.safetensors"))) == 4
    # second method: the whole batch encoded at once, padded with empty chunks by encode_captions itself
    batch = ["smile", long, "1girl, solo"]
    expected = _encode(tiny_components, clip_tokenizer, batch, clip_skip)
    got = cache.conditioning(batch, torch.device("cpu"))
    assert got.shape == expected.shape == (3, 2 * 77, 32)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # a cache of another encoder setting shares the folder without reading these entries
    other = TextCache("disk", tmp_path / "tc", identity="te-b", dtype=torch.float32)
    assert other.missing(texts) == texts


def test_damaged_or_foreign_disk_entries_are_misses(tmp_path):
    cache = TextCache("disk", tmp_path, identity="x", dtype=torch.float16)
    cache.put("a", torch.ones(77, 4))
    assert cache.get("a").dtype == torch.float16 and cache.has("a")
    cache._file("a").write_bytes(b"not a safetensors file")
    assert not cache.has("a") and cache.get("a") is None
    from bp_trainer.errors import BPError

    with pytest.raises(BPError, match="text cache has no entry"):
        cache.conditioning(["a"], torch.device("cpu"))


def _run_cfg(tiny_model_dir, data, runs, **sections):
    base = dict(training={"max_steps": 6, "gradient_accumulation": 1},
                dataset={"shuffle_tags": True, "tag_dropout": 0.2, "caption_dropout": 0.2, "keep_tokens": 1},
                latents={"cache": "memory"}, text_cache={"mode": "memory", "variants": 3})
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v}
    return C.validate(tiny_run_raw(tiny_model_dir, data, runs, **base))


@pytest.fixture()
def spied(monkeypatch):
    """Counts, after `prepare`, every text-encoder forward and VAE encode, and checks every cached conditioning
    against a fresh encoding of the same captions (the text encoder brought back for it)."""
    from bp_trainer.train import prepare as prep
    from bp_trainer.train.loop import TrainLoop

    seen = {"te_calls": 0, "vae_calls": 0, "checked": 0, "captions": Counter(), "off": None}
    real_prepare, real_condition = TrainLoop.prepare, TrainLoop.condition

    def prepare(self):
        real_prepare(self)
        seen["off"] = self.offloaded
        self.models.text_encoder.register_forward_hook(lambda *a: seen.__setitem__("te_calls", seen["te_calls"] + 1))
        self.models.vae.encoder.register_forward_hook(lambda *a: seen.__setitem__("vae_calls", seen["vae_calls"] + 1))

    def condition(self, captions):
        cond = real_condition(self, captions)
        if self.text_cache is not None:
            calls = seen["te_calls"]
            with prep.frozen_on_device(self), torch.no_grad():
                fresh = self.family.encode_text(self.models, captions, clip_skip=self.clip_skip, max_chunks=3)
            seen["te_calls"] = calls
            torch.testing.assert_close(cond, fresh.to(cond.dtype), rtol=1e-5, atol=1e-5)
            seen["checked"] += 1
            seen["captions"].update(captions)
        return cond

    monkeypatch.setattr(TrainLoop, "prepare", prepare)
    monkeypatch.setattr(TrainLoop, "condition", condition)
    return seen


@pytest.mark.slow
def test_a_cached_run_trains_on_the_variants_without_the_vae_or_text_encoder(tiny_model_dir, small_dataset, tmp_path,
                                                                            spied):
    from bp_trainer.train.run import train

    cfg = _run_cfg(tiny_model_dir, small_dataset, tmp_path / "runs", training={"max_steps": 12})
    train(cfg, tmp_path / "run")
    events = read_all(tmp_path / "run")
    start = next(e for e in events if e["type"] == "start")
    assert start["off_gpu"] == ["vae", "text_encoder"] and spied["off"] == ("vae", "text_encoder")
    assert start["text_cache"] == {"mode": "memory", "variants": 3}
    assert spied["te_calls"] == 0 and spied["vae_calls"] == 0  # no step needed either
    assert spied["checked"] == 12  # every batch's conditioning equals a fresh encoding of its captions
    prepared = [e for e in events if e["type"] == "prepare"]
    assert {e["what"] for e in prepared} == {"latents", "text"}
    last = {e["what"]: e for e in prepared}
    assert all(e["done"] == e["total"] > 0 for e in last.values())
    # the captions trained on are exactly the cached variants (at most 3 per image, and the dropped caption)
    from bp_trainer.dataset import scan_dataset

    items = scan_dataset(small_dataset).items
    processor = CaptionProcessor(shuffle=True, keep_first=1, tag_dropout=0.2, caption_dropout=0.2)
    allowed = {t for it in items for t in CaptionVariants(processor, 3, 5).texts(it.caption, it.path)}
    assert set(spied["captions"]) <= allowed and len(allowed) <= 3 * len(items) + 1


@pytest.mark.slow
def test_a_cached_run_resumes_exactly_and_reuses_its_disk_cache(tiny_model_dir, small_dataset, tmp_path):
    from bp_trainer.train.run import train

    runs = tmp_path / "runs"
    cfg = _run_cfg(tiny_model_dir, small_dataset, runs, text_cache={"mode": "disk"}, latents={"cache": "disk"})
    train(cfg, tmp_path / "full")
    full = {e["step"]: e["loss"] for e in read_all(tmp_path / "full") if e["type"] == "step"}
    first_text = [e for e in read_all(tmp_path / "full") if e["type"] == "prepare" and e["what"] == "text"]
    assert first_text[-1]["total"] > 0

    part = tmp_path / "part"

    assert train_until_stopped(train, cfg, part, 3)["step"] == 3
    assert train(cfg, part, resume=True)["step"] == 6
    events = read_all(part)
    assert {e["step"]: e["loss"] for e in events if e["type"] == "step"} == full
    # the later runs found every text and latent on disk: nothing left to encode
    assert all(e["total"] == 0 for e in events if e["type"] == "prepare")
    a, b = (d / "state" / "step-00000006" / "model.safetensors" for d in (tmp_path / "full", part))
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.slow
def test_every_latent_of_every_epoch_is_encoded_before_training(tiny_model_dir, tmp_path, spied):
    """Leftovers of a bucket train at the base resolution in some epochs (naifu's pool) and at their bucket in
    others: both latents are encoded before the first step, so no step needs the VAE."""
    from PIL import Image

    from bp_trainer.train.run import train

    data = tmp_path / "data"
    data.mkdir()
    for i, size in enumerate([(192, 128)] * 3 + [(128, 128)] * 3):
        Image.new("RGB", size, (40 * i, 90, 200 - 20 * i)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"1girl, tag{i}, smile", encoding="utf-8")
    cfg = _run_cfg(tiny_model_dir, data, tmp_path / "runs", training={"max_steps": 12},
                   logging={"record_batches": True}, text_cache={"mode": "none"})
    train(cfg, tmp_path / "run")
    assert spied["off"] == ("vae",) and spied["vae_calls"] == 0
    import json

    from bp_trainer.rundir import RunDir

    lines = [json.loads(x) for x in RunDir(tmp_path / "run").batches(0).read_text().splitlines()]
    sizes: dict = {}
    for rec in lines:
        for item in rec.get("items", []):
            sizes.setdefault(item.split("#")[0], set()).add(tuple(rec["size"]))
    assert any(len(s) > 1 for s in sizes.values())  # an image trained at two sizes: the case is covered


def test_the_tab_and_the_api_show_the_caches_being_filled():
    from bp_trainer.run_view import RunView
    from bp_trainer.train.events import summarize
    from bp_trainer.ui.render import progress_html

    filling = [{"type": "prepare", "time": 1.0, "what": "latents", "done": 120, "total": 5000}]
    view = RunView("/runs/r-1")
    view.apply(filling)
    assert "encoding latents 120/5000" in progress_html(view.summary())
    view.apply([{"type": "prepare", "time": 2.0, "what": "text", "done": 7, "total": 40},
                {"type": "start", "time": 3.0, "total_steps": 10}])
    assert "encoding" not in progress_html(view.summary()) and view.status == "running"
    assert summarize(filling)["preparing"] == {"what": "latents", "done": 120, "total": 5000}
    assert summarize(filling + [{"type": "start", "total_steps": 10}])["preparing"] is None


def test_a_conditioning_stored_in_the_autocast_dtype_gives_the_same_unet_output(tiny_components):
    """Why the cache may store bf16: under bf16 autocast the UNet reads the conditioning only through its
    cross-attention projections, which cast it to bf16 themselves, so a bf16-stored conditioning gives the same
    prediction, bit for bit, as the encoder's own fp32 output."""
    unet = tiny_components["unet"]
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 154, 32, generator=g) * 3
    t = torch.tensor([10, 700])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fresh = unet(x, t, cond).sample
        stored = unet(x, t, cond.to(torch.bfloat16)).sample
        other = unet(x, t, cond.to(torch.float16).float()).sample  # rounded another way: the cond does matter
    assert torch.equal(fresh, stored) and not torch.equal(fresh, other)


@pytest.mark.slow
def test_two_processes_share_the_disk_cache_and_keep_identical_weights(tiny_model_dir, small_dataset, tmp_path):
    """Two gloo processes: each encodes its share of the caption variants into the disk cache, then both train from
    all of them (identical weights on both ranks at the end)."""
    import json

    from bp_trainer import launcher
    from bp_trainer.dataset import scan_dataset
    from bp_trainer.rundir import RunDir

    runs = tmp_path / "runs"
    cfg = _run_cfg(tiny_model_dir, small_dataset, runs, run={"num_processes": 2},
                   training={"max_steps": 4, "batch_size": 1}, text_cache={"mode": "disk"},
                   latents={"cache": "disk"}, logging={"record_batches": True})
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    handle = launcher.start_run(cfg, use_cpu=True, env=env)
    assert handle.wait(timeout=600) == 0, (handle.run_dir / "train.log").read_text()[-3000:]
    processor = CaptionProcessor(shuffle=True, keep_first=1, tag_dropout=0.2, caption_dropout=0.2)
    texts = {t for it in scan_dataset(small_dataset).items for t in CaptionVariants(processor, 3, 5).texts(it.caption,
                                                                                                         it.path)}
    assert len(list((runs / "text_cache").rglob("*.safetensors"))) == len(texts)  # both shares, nothing twice

    def final(rank):
        lines = RunDir(handle.run_dir).batches(rank).read_text().splitlines()
        return [json.loads(x)["weights"] for x in lines if '"final"' in x][-1]

    assert final(0) == final(1)
    done = [e for e in read_all(handle.run_dir) if e["type"] == "done"][-1]
    assert done["step"] == 4
