"""Trainer building blocks: LR schedule, WebUI chunking and clip skip, EMA, min-SNR, latent cache, infotext."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch

from bp_trainer.train.ema import EMA
from bp_trainer.train.latents import LatentCache
from bp_trainer.train.models import encode_tokens, tokenize_chunks
from bp_trainer.train.loss import lr_factor, snr_weights
from bp_trainer.train.sampling import infotext


def test_lr_warmup_then_schedules():
    """diffusers' schedules, against the closed forms (linear warm-up from 0 over W steps; then constant,
    half a cosine period, or a straight line to 0 at T)."""
    import math

    W, T = 4, 14
    kw = dict(warmup=W, total=T)
    for s in range(T + 1):
        warm = s / W if s < W else None
        progress = (s - W) / (T - W)
        expect = {"constant": warm if warm is not None else 1.0,
                  "cosine": warm if warm is not None else 0.5 * (1 + math.cos(math.pi * progress)),
                  "linear": warm if warm is not None else max(0.0, 1 - progress)}
        for schedule, value in expect.items():
            assert lr_factor(s, schedule=schedule, **kw) == pytest.approx(value, abs=1e-12), (schedule, s)
    assert lr_factor(0, schedule="constant", warmup=0, total=T) == 1.0


def test_long_captions_make_webui_chunks(clip_tokenizer):
    tags = ", ".join(f"tag{i}" for i in range(60))  # ~180 tokens: 3 chunks
    ids = tokenize_chunks(clip_tokenizer, [tags, "1girl"], max_chunks=3)
    assert ids.shape == (2, 3, 77)
    bos, eos, pad = clip_tokenizer.bos_token_id, clip_tokenizer.eos_token_id, clip_tokenizer.pad_token_id
    assert (ids[:, :, 0] == bos).all()
    # no chunk of the long caption splits a tag: each ends with a comma or the next one starts with one
    comma = clip_tokenizer.convert_tokens_to_ids(",</w>")
    for j in range(2):
        row = ids[0, j].tolist()
        last = row.index(eos, 1) - 1
        assert row[last] == comma or ids[0, j + 1, 1].item() == comma
    # the short caption is padded with empty chunks [BOS, EOS, pad...]
    assert ids[1, 1].tolist() == [bos, eos] + [pad] * 75
    assert ids[0].flatten().tolist().count(bos) == 3
    one = tokenize_chunks(clip_tokenizer, [tags], max_chunks=1)
    assert one.shape == (1, 1, 77)


def test_clip_skip_is_the_nth_last_layer_then_final_layer_norm(tiny_components, clip_tokenizer):
    te = tiny_components["text_encoder"]
    tokens = tokenize_chunks(clip_tokenizer, ["1girl, solo, red_background"], max_chunks=1)
    with torch.no_grad():
        skip1 = encode_tokens(te, tokens, 1)
        skip2 = encode_tokens(te, tokens, 2)
        # independent check: the same encoder with its last layer removed, read at its (normed) output
        shorter = copy.deepcopy(te)
        inner = getattr(shorter, "text_model", shorter)  # transformers 4.x nests the model in .text_model
        inner.encoder.layers = inner.encoder.layers[:-1]
        expected = shorter(tokens.reshape(1, 77)).last_hidden_state
    assert skip1.shape == skip2.shape == (1, 77, te.config.hidden_size)
    torch.testing.assert_close(skip2, expected)
    assert not torch.allclose(skip1, skip2)


def test_ema_follows_the_formula_and_swaps_back_exactly():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    ema = EMA(model, decay=0.9, device="cpu", warmup=False)
    start = [p.detach().clone() for p in model.parameters()]
    expected = [p.clone() for p in start]
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        ema.update(model)
        expected = [0.9 * e + 0.1 * p.detach() for e, p in zip(expected, model.parameters())]
    for got, want in zip(ema.shadow, expected):
        torch.testing.assert_close(got, want)
    live = [p.detach().clone() for p in model.parameters()]
    with ema.swapped_into(model):
        for p, want in zip(model.parameters(), expected):
            torch.testing.assert_close(p.detach(), want)
    assert all(torch.equal(p.detach(), q) for p, q in zip(model.parameters(), live))


def test_ema_decay_warms_up():
    ema = EMA(torch.nn.Linear(2, 2), decay=0.9999)
    assert ema.current_decay() == pytest.approx(0.1)
    ema.num_updates = 10_000_000
    assert ema.current_decay() == 0.9999


def test_min_snr_weights():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([0, 100, 500, 999])
    a = sched.alphas_cumprod[t]
    snr = a / (1 - a)
    w = snr_weights(sched, t, 5.0, v_prediction=False)
    assert w[0] == pytest.approx(5.0 / snr[0].item(), rel=1e-5)  # high SNR (little noise): down-weighted
    assert w[-1] == pytest.approx(1.0)  # low SNR: full weight
    wv = snr_weights(sched, t, 5.0, v_prediction=True)
    assert wv[-1] == pytest.approx(snr[-1].item() / (snr[-1].item() + 1), rel=1e-5)


def test_disk_latent_cache_invalidates_on_image_or_bucket_change(tmp_path):
    img = tmp_path / "a.png"
    img.write_bytes(b"x")
    cache = LatentCache("disk", tmp_path / "cache", vae_id="v1")
    key = cache.key(str(img), (128, 64), "center")
    assert not cache.has(key)
    cache.put(key, torch.ones(4, 8, 16))
    again = LatentCache("disk", tmp_path / "cache", vae_id="v1")  # another run
    assert again.has(key) and torch.equal(again.get(key), torch.ones(4, 8, 16))
    assert not again.has(again.key(str(img), (64, 128), "center"))  # other bucket
    other_vae = LatentCache("disk", tmp_path / "cache", vae_id="v2")
    assert not other_vae.has(other_vae.key(str(img), (128, 64), "center"))  # other VAE
    img.write_bytes(b"changed")
    st = os.stat(img)
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    new_key = again.key(str(img), (128, 64), "center")
    assert new_key != key and not again.has(new_key) and again.get(new_key) is None
    again.put(new_key, torch.zeros(4, 8, 16))  # replaces the stale file in place
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1


def test_sample_infotext_is_read_back_by_the_webui_parser():
    from bp_trainer.infotext import parse_infotext

    text = infotext("1girl, solo, (smile:1.2)", "lowres, bad hands",
                    {"Steps": 20, "Sampler": "Euler a", "Schedule type": "Automatic", "CFG scale": "7", "Seed": 5,
                     "Size": "128x96", "Model hash": "0123456789", "Model": "bp, step 3", "Clip skip": 2,
                     "Version": "BP Train", "Skipped": None})
    p = parse_infotext(text)
    assert p["Prompt"] == "1girl, solo, (smile:1.2)" and p["Negative prompt"] == "lowres, bad hands"
    assert (p["Steps"], p["Sampler"], p["Seed"], p["Size-1"], p["Size-2"]) == ("20", "Euler a", "5", "128", "96")
    assert (p["Model hash"], p["Model"], p["Clip skip"]) == ("0123456789", "bp, step 3", "2")
    assert "Skipped" not in p
    assert math.isclose(float(p["CFG scale"]), 7.0)


def test_base_from_a_webui_file_with_a_webui_vae_file(tiny_components, tmp_path):
    """model.base as a WebUI single file and model.vae as a WebUI models/VAE file (no prefix)."""
    from bp_trainer.checkpoint.io import write_checkpoint
    from bp_trainer.checkpoint.ldm_keys import vae_key_map, vae_tensor_to_ldm
    from bp_trainer.tiny_model import build_vae, save_webui_file
    from bp_trainer.train.config import ModelSection
    from bp_trainer.train.models import load_base

    base = save_webui_file(tiny_components, tmp_path / "base.safetensors", ema_seed=None)["out"]
    other = build_vae(77).state_dict()
    write_checkpoint({ldm: vae_tensor_to_ldm(ldm, other[k]) for k, ldm in vae_key_map(other).items()},
                     tmp_path / "other-vae.safetensors", {})
    m = load_base(ModelSection(base=base, vae=str(tmp_path / "other-vae.safetensors"), v_prediction="auto"))
    got = m["vae"].state_dict()
    assert all(torch.equal(got[k], other[k].float()) for k in other)
    assert m["prediction_type"] == "epsilon"
    unet = tiny_components["unet"].state_dict()
    assert all(torch.equal(m["unet"].state_dict()[k], unet[k]) for k in list(unet)[:10])
    forced = load_base(ModelSection(base=base, vae=None, v_prediction="true"))
    assert forced["prediction_type"] == "v_prediction"
    assert forced["noise_scheduler"].config.prediction_type == "v_prediction"


def test_clip_skip_is_ignored_for_sd2_openclip_like_the_webui():
    from types import SimpleNamespace

    from bp_trainer.train.family import StableDiffusion

    family, warnings = StableDiffusion(), []
    sd2, sd1 = SimpleNamespace(arch="sd2"), SimpleNamespace(arch="sd1")
    assert family.clip_skip(2, sd2, warnings.append) == 1 and "ignores Clip skip" in warnings[0]
    assert family.clip_skip(2, sd1, warnings.append) == 2 and len(warnings) == 1
    assert family.clip_skip(1, sd2, warnings.append) == 1 and len(warnings) == 1
