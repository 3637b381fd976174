"""Assemble (VAE bake, EMA promotion, UNet/text-encoder swap, drop EMA, precision) and WebUI-style merges."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from bp_trainer.checkpoint import ldm_keys as lk
from bp_trainer.checkpoint.assemble import MergeOptions, merge
from bp_trainer.checkpoint.hashes import file_hashes
from bp_trainer.checkpoint.io import open_file
from bp_trainer.cli import main
from bp_trainer.errors import BPError


@pytest.fixture(autouse=True)
def _private_hash_cache(tmp_path_factory, monkeypatch):
    """Keep the hash cache (merge, hash) out of the user's ~/.cache (and out of tmp_path, which tests list)."""
    monkeypatch.setenv("BP_TRAIN_CACHE_DIR", str(tmp_path_factory.mktemp("hash-cache")))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo-model", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def base_sd(demo):
    return load_file(str(demo / "tiny-sd.safetensors"))


def _unet_keys(sd):
    return [k for k in sd if k.startswith(lk.UNET_PREFIX)]


def test_cli_assemble_fp16_with_vae_and_ema_promotion(demo, base_sd, tmp_path, capsys):
    out = tmp_path / "bp.safetensors"
    rc = main(["merge", "--base", str(demo / "tiny-sd.safetensors"), "--vae", str(demo / "tiny-vae.safetensors"),
               "--use-ema", "--drop-ema", "--precision", "fp16", "--out", str(out), "--json"])
    assert rc == 0
    r = json.loads(capsys.readouterr().out)
    for key in ("out", "sha256", "autov2", "old", "tensors", "bytes", "recipe"):
        assert key in r
    assert {k: r[k] for k in ("sha256", "autov2", "old")} == file_hashes(out)
    sd = load_file(str(out))
    assert r["tensors"] == len(sd) and r["bytes"] == out.stat().st_size
    vae = load_file(str(demo / "tiny-vae.safetensors"))
    # every tensor: dtype and value
    for k, t in sd.items():
        if k == lk.POSITION_IDS:
            assert t.dtype == torch.int64 and torch.equal(t, base_sd[k])
            continue
        assert t.dtype == torch.float16, k
        if k.startswith(lk.VAE_PREFIX):
            want = vae[k[len(lk.VAE_PREFIX):]]
        elif k.startswith(lk.UNET_PREFIX):
            want = base_sd[lk.ema_key(k)]  # EMA promoted
        else:
            want = base_sd[k]
        assert torch.equal(t, want.half()), k
    assert not any(k.startswith(lk.EMA_PREFIX) for k in sd)
    # the UNet really changed (EMA differs from the raw UNet)
    k = "model.diffusion_model.out.2.weight"
    assert not torch.equal(sd[k], base_sd[k].half())
    meta = open_file(out).metadata
    recipe = json.loads(meta["bp_recipe"])
    assert recipe["options"]["use_ema"] is True and recipe["options"]["precision"] == "fp16"
    assert recipe["inputs"]["base"]["sha256"] == file_hashes(demo / "tiny-sd.safetensors")["sha256"]
    assert recipe["inputs"]["vae"]["sha256"] == file_hashes(demo / "tiny-vae.safetensors")["sha256"]


def test_diffusers_vae_is_converted_when_baked(demo, tmp_path):
    from diffusers import AutoencoderKL

    vae_dir = demo / "tiny-sd" / "vae"
    out = tmp_path / "o.safetensors"
    merge(MergeOptions(base=str(demo / "tiny-sd.safetensors"), vae=str(vae_dir)), out)
    sd = load_file(str(out))
    dsd = AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True).state_dict()
    mapping = lk.vae_key_map(dsd)
    for k, ldm in mapping.items():
        assert torch.equal(sd[lk.VAE_PREFIX + ldm], lk.vae_tensor_to_ldm(ldm, dsd[k])), k
    # the file-level diffusers weights work too
    out2 = tmp_path / "o2.safetensors"
    merge(MergeOptions(base=str(demo / "tiny-sd.safetensors"), vae=str(vae_dir / "diffusion_pytorch_model.safetensors")),
          out2)
    sd2 = load_file(str(out2))
    assert all(torch.equal(sd2[k], sd[k]) for k in sd)


def test_vae_of_wrong_shape_or_no_vae_is_refused(demo, tmp_path, capsys):
    vae = load_file(str(demo / "tiny-vae.safetensors"))
    vae["decoder.conv_out.weight"] = torch.zeros(3, 16, 3, 3)
    bad = tmp_path / "bad-vae.safetensors"
    save_file(vae, str(bad))
    out = tmp_path / "o.safetensors"
    rc = main(["merge", "--base", str(demo / "tiny-sd.safetensors"), "--vae", str(bad), "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "wrong-shaped VAE" in err and str(bad) in err and err.count("\n") == 1
    assert not out.exists()
    te_only = tmp_path / "te.safetensors"
    base = load_file(str(demo / "tiny-sd.safetensors"))
    save_file({k: v for k, v in base.items() if k.startswith("cond_stage_model.")}, str(te_only))
    with pytest.raises(BPError, match="no VAE weights"):
        merge(MergeOptions(base=str(demo / "tiny-sd.safetensors"), vae=str(te_only)), out)
    assert not out.exists()


def test_unet_from_unet_only_file_and_ema_only_file(demo, base_sd, tmp_path, tiny_components):
    from bp_trainer.tiny_model import build_components

    other = build_components(seed=5)["unet"].state_dict()
    unet_only = tmp_path / "unet.safetensors"  # diffusers-layout UNet file
    save_file({k: v.contiguous() for k, v in other.items()}, str(unet_only))
    out = tmp_path / "o.safetensors"
    merge(MergeOptions(base=str(demo / "tiny-sd.safetensors"), unet=str(unet_only)), out)
    sd = load_file(str(out))
    want = {ldm: other[k] for k, ldm in lk.unet_key_map(other).items()}
    assert all(torch.equal(sd[k], v) for k, v in want.items())
    assert not any(k.startswith(lk.EMA_PREFIX) for k in sd)  # the base's EMA belonged to the old UNet
    assert torch.equal(sd["first_stage_model.decoder.conv_out.weight"], base_sd["first_stage_model.decoder.conv_out.weight"])

    ema_only = tmp_path / "ema.safetensors"  # an "EMA fp32" file: only model_ema.* keys
    save_file({k: v for k, v in base_sd.items() if k.startswith(lk.EMA_PREFIX)}, str(ema_only))
    out2 = tmp_path / "o2.safetensors"
    merge(MergeOptions(base=str(unet_only), unet=str(ema_only), use_ema=True, drop_ema=True,
                       vae=str(demo / "tiny-vae.safetensors"),
                       text_encoder=str(demo / "tiny-sd.safetensors")), out2)
    sd2 = load_file(str(out2))
    for k in _unet_keys(base_sd):
        assert torch.equal(sd2[k], base_sd[lk.ema_key(k)]), k
    assert all(torch.equal(sd2[k], base_sd[k]) for k in base_sd if k.startswith("cond_stage_model."))


def test_text_encoder_from_another_checkpoint(demo, base_sd, tmp_path):
    from bp_trainer.tiny_model import build_components

    te = build_components(seed=9)["text_encoder"].state_dict()
    te_file = tmp_path / "te.safetensors"  # transformers layout
    save_file({k: v.contiguous() for k, v in te.items()}, str(te_file))
    out = tmp_path / "o.safetensors"
    merge(MergeOptions(base=str(demo / "tiny-sd.safetensors"), text_encoder=str(te_file)), out)
    sd = load_file(str(out))
    for k, v in te.items():
        assert torch.equal(sd[lk.text_key(k)], v), k
    assert torch.equal(sd[lk.POSITION_IDS], base_sd[lk.POSITION_IDS])
    assert set(sd) == set(base_sd)


def test_keep_dtypes_without_precision_and_bf16(demo, base_sd, tmp_path):
    out = tmp_path / "bf.safetensors"
    merge(MergeOptions(base=str(demo / "tiny-sd.safetensors"), precision="bf16"), out)
    sd = load_file(str(out))
    assert set(sd) == set(base_sd)
    for k, t in sd.items():
        want = torch.bfloat16 if base_sd[k].is_floating_point() else base_sd[k].dtype
        assert t.dtype == want, k
    assert sd["model_ema.num_updates"].dtype == torch.int32


def test_weighted_sum_and_add_difference_match_an_independent_computation(demo, base_sd, tmp_path):
    from bp_trainer.tiny_model import build_components, save_webui_file

    b_path, c_path = tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    save_webui_file(build_components(seed=11), b_path, ema_seed=None)
    save_webui_file(build_components(seed=12), c_path, ema_seed=None)
    a, b, c = base_sd, load_file(str(b_path)), load_file(str(c_path))
    alpha = 0.3
    ws = tmp_path / "ws.safetensors"
    assert main(["merge", "--base", str(demo / "tiny-sd.safetensors"), "--mode", "weighted-sum", "--b", str(b_path),
                 "--alpha", str(alpha), "--out", str(ws)]) == 0
    got = load_file(str(ws))
    assert set(got) == set(a)
    for k in a:
        if "model" in k and k in b and k != lk.POSITION_IDS:
            want = (1 - alpha) * a[k].double() + alpha * b[k].double()
            assert torch.allclose(got[k].double(), want, rtol=1e-6, atol=1e-7), k
        else:  # schedule buffers, position_ids, A's EMA (B has none)
            assert torch.equal(got[k], a[k]), k
    ad = tmp_path / "ad.safetensors"
    assert main(["merge", "--base", str(demo / "tiny-sd.safetensors"), "--mode", "add-difference", "--b", str(b_path),
                 "--c", str(c_path), "--alpha", "0.7", "--precision", "fp16", "--out", str(ad)]) == 0
    got = load_file(str(ad))
    for k in a:
        if "model" in k and k in b and k != lk.POSITION_IDS:
            want = a[k].double() + 0.7 * (b[k].double() - c[k].double())
            assert got[k].dtype == torch.float16
            assert torch.allclose(got[k].double(), want.half().double(), rtol=2e-3, atol=2e-3), k


def test_merge_refuses_bad_requests(demo, tmp_path):
    base = str(demo / "tiny-sd.safetensors")
    with pytest.raises(BPError, match="needs model B"):
        merge(MergeOptions(base=base, mode="weighted-sum"), tmp_path / "o.safetensors")
    with pytest.raises(BPError, match="file not found"):
        merge(MergeOptions(base=base, vae=str(tmp_path / "nope.safetensors")), tmp_path / "o.safetensors")
    with pytest.raises(BPError, match="overwrite"):
        merge(MergeOptions(base=base, drop_ema=True), base)
    with pytest.raises(BPError, match="no EMA"):
        merge(MergeOptions(base=str(demo / "tiny-sd" ), use_ema=True), tmp_path / "o.safetensors")
    assert sorted(os.listdir(tmp_path)) == []


def test_failure_while_streaming_leaves_no_output(demo, tmp_path, monkeypatch):
    """An input that turns out corrupt mid-run (a tensor read fails) leaves neither output nor temp file."""
    from bp_trainer.checkpoint import io as cio

    calls = {"n": 0}
    real = cio.SafetensorsSource._read_into

    def flaky(self, view, offset, key):
        calls["n"] += 1
        if calls["n"] == 50:
            raise BPError("truncated .safetensors file while reading tensor", path=self.path)
        return real(self, view, offset, key)

    monkeypatch.setattr(cio.SafetensorsSource, "_read_into", flaky)
    out = tmp_path / "o.safetensors"
    with pytest.raises(BPError, match="truncated"):
        merge(MergeOptions(base=str(demo / "tiny-sd.safetensors"), precision="fp16"), out)
    assert calls["n"] >= 50
    assert os.listdir(tmp_path) == []


def test_ckpt_output(demo, base_sd, tmp_path):
    out = tmp_path / "o.ckpt"
    assert main(["merge", "--base", str(demo / "tiny-sd.safetensors"), "--drop-ema", "--out", str(out)]) == 0
    obj = torch.load(out, weights_only=True)
    assert set(obj["state_dict"]) == {k for k in base_sd if not k.startswith(lk.EMA_PREFIX)}


def test_direct_chunked_conversion_writes_the_same_bytes_as_the_tensor_path(demo, tmp_path, monkeypatch):
    """The fast path (converted chunk by chunk straight into the file) and the tensor path agree byte for byte."""
    from bp_trainer.checkpoint import io as cio

    opts = dict(base=str(demo / "tiny-sd.safetensors"), vae=str(demo / "tiny-vae.safetensors"), use_ema=True,
                precision="fp16")
    fast = tmp_path / "fast.safetensors"
    used = {"n": 0}
    real = cio.SafetensorsSource.write_converted

    def counting(self, *a):
        used["n"] += 1
        return real(self, *a)

    monkeypatch.setattr(cio.SafetensorsSource, "write_converted", counting)
    merge(MergeOptions(**opts), fast)
    assert used["n"] > 400  # nearly every tensor took the direct path
    monkeypatch.setattr(cio, "_direct_ok", lambda e: False)
    slow = tmp_path / "slow.safetensors"
    merge(MergeOptions(**opts), slow)
    assert fast.read_bytes() == slow.read_bytes()


def test_disk_full_during_direct_write_leaves_no_output(demo, tmp_path, monkeypatch):
    """ENOSPC from a positioned write (the fast path): one-line error, no output, no temporary file."""
    import errno

    from bp_trainer.checkpoint import io as cio

    real = os.pwrite
    calls = {"n": 0}

    def full(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(cio.os, "pwrite", full)
    out = tmp_path / "o.safetensors"
    with pytest.raises(BPError, match="No space left on device"):
        merge(MergeOptions(base=str(demo / "tiny-sd.safetensors"), precision="fp16"), out)
    assert calls["n"] > 20
    assert os.listdir(tmp_path) == []


def test_unet_of_wrong_shape_or_other_structure_is_refused(demo, base_sd, tmp_path, capsys):
    unet = {k: v for k, v in base_sd.items() if k.startswith(lk.UNET_PREFIX)}
    k = "model.diffusion_model.out.2.weight"
    unet[k] = torch.zeros(4, 16, 3, 3)
    bad = tmp_path / "bad-unet.safetensors"
    save_file(unet, str(bad))
    out = tmp_path / "o.safetensors"
    assert main(["merge", "--base", str(demo / "tiny-sd.safetensors"), "--unet", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "wrong-shaped UNet" in err and k in err and str(bad) in err and err.count("\n") == 1
    del unet[k]
    save_file(unet, str(bad))
    assert main(["merge", "--base", str(demo / "tiny-sd.safetensors"), "--unet", str(bad), "--out", str(out)]) == 2
    assert "does not fit the base" in capsys.readouterr().err
    assert not out.exists()
