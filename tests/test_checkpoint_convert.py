"""diffusers -> LDM mapping against the WebUI's own key/shape fixture; LDM <-> diffusers round trips; loading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bp_trainer.checkpoint import ldm_keys as lk
from bp_trainer.checkpoint.convert import (
    convert_to_diffusers,
    convert_to_webui,
    infer_text_config,
    infer_unet_config,
    infer_vae_config,
    load_diffusers_components,
    shipped_config,
)
from bp_trainer.checkpoint.io import open_file
from bp_trainer.checkpoint.layout import describe
from bp_trainer.cli import main

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(autouse=True)
def _private_hash_cache(tmp_path_factory, monkeypatch):
    """Keep the hash cache (merge, hash) out of the user's ~/.cache (and out of tmp_path, which tests list)."""
    monkeypatch.setenv("BP_TRAIN_CACHE_DIR", str(tmp_path_factory.mktemp("hash-cache")))


@pytest.fixture(scope="module")
def sd15_fixture():
    return json.loads((FIXTURES / "sd15-ldm-keys.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def sd15_meta_ldm():
    """Full-size SD 1.5 diffusers components on the meta device (no memory), exported to LDM."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = shipped_config("sd1")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg["unet"])
        vae = AutoencoderKL(**cfg["vae"])
        te = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    return lk.diffusers_to_ldm(unet.state_dict(), vae.state_dict(), te.state_dict(),
                               scheduler_config=cfg["scheduler"]), vae.state_dict()


def test_full_size_sd15_export_has_exactly_the_webui_keys_and_shapes(sd15_fixture, sd15_meta_ldm):
    sd, _ = sd15_meta_ldm
    want = {k: tuple(v["shape"]) for k, v in sd15_fixture["checkpoint"].items()}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    assert set(got) == set(want), (sorted(set(want) - set(got))[:5], sorted(set(got) - set(want))[:5])
    assert got == want
    assert sd[lk.POSITION_IDS].dtype == torch.int64  # the fixture's only integer tensor
    assert sd15_fixture["checkpoint"][lk.POSITION_IDS]["dtype"] == "I64"


def test_standalone_vae_keys_match_the_webui_vae_file(sd15_fixture, sd15_meta_ldm):
    _, vae_sd = sd15_meta_ldm
    mapping = lk.vae_key_map(vae_sd.keys())
    got = {mapping[k]: lk.vae_shape_to_ldm(mapping[k], tuple(v.shape)) for k, v in vae_sd.items()}
    assert got == {k: tuple(v["shape"]) for k, v in sd15_fixture["vae"].items()}


def test_configs_inferred_from_full_size_shapes_match_the_shipped_sd1_configs(sd15_fixture):
    shapes = {k: tuple(v["shape"]) for k, v in sd15_fixture["checkpoint"].items()}
    cfg = shipped_config("sd1")
    unet = infer_unet_config(shapes)
    for key in ("block_out_channels", "layers_per_block", "cross_attention_dim", "in_channels", "out_channels",
                "down_block_types", "up_block_types"):
        assert list(np.atleast_1d(unet[key])) == list(np.atleast_1d(cfg["unet"][key])), key
    assert unet["use_linear_projection"] is False
    vae = infer_vae_config(shapes)
    for key in ("block_out_channels", "layers_per_block", "latent_channels", "in_channels", "out_channels"):
        assert vae[key] == cfg["vae"][key], key
    te = infer_text_config(shapes)
    for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size"):
        assert te[key] == cfg["text_encoder"][key], key


def test_ema_key_is_ldm_litema_naming():
    assert lk.ema_key("model.diffusion_model.input_blocks.1.1.proj_in.weight") == \
        "model_ema.diffusion_modelinput_blocks11proj_inweight"
    keys = ["model.diffusion_model.out.2.weight", "model.diffusion_model.time_embed.0.bias"]
    assert lk.ema_key_map(keys) == {lk.ema_key(k): k for k in keys}


def test_schedule_buffers_follow_ldm_register_schedule():
    """Independent numpy re-computation of LatentDiffusion.register_schedule (linear_start/end 0.00085/0.012)."""
    b = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    a = 1.0 - b
    ac = np.cumprod(a)
    acp = np.append(1.0, ac[:-1])
    pv = b * (1.0 - acp) / (1.0 - ac)
    want = {
        "betas": b, "alphas_cumprod": ac, "alphas_cumprod_prev": acp, "sqrt_alphas_cumprod": np.sqrt(ac),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - ac), "log_one_minus_alphas_cumprod": np.log(1 - ac),
        "sqrt_recip_alphas_cumprod": np.sqrt(1 / ac), "sqrt_recipm1_alphas_cumprod": np.sqrt(1 / ac - 1),
        "posterior_variance": pv, "posterior_log_variance_clipped": np.log(np.maximum(pv, 1e-20)),
        "posterior_mean_coef1": b * np.sqrt(acp) / (1 - ac), "posterior_mean_coef2": (1 - acp) * np.sqrt(a) / (1 - ac),
    }
    got = lk.schedule_buffers(shipped_config("sd1")["scheduler"])
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == torch.float32
        assert torch.equal(got[k], torch.tensor(v, dtype=torch.float32)), k


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo-model", "--out", str(out)]) == 0
    return out


def test_demo_model_writes_three_artifacts(demo, tiny_components):
    assert (demo / "tiny-sd" / "model_index.json").is_file()
    with open_file(demo / "tiny-sd.safetensors") as src:
        rep = describe(src)
        assert rep["kind"] == "checkpoint" and rep["layout"] == "ldm" and rep["arch"] == "sd1"
        assert rep["has_ema"] and rep["ema_tensors"] == rep["tensors_by_part"]["unet"]
        # EMA differs from the UNet (so promotion is observable)
        k = "model.diffusion_model.out.2.weight"
        assert not torch.equal(src.get(k), src.get(lk.ema_key(k)))
    with open_file(demo / "tiny-vae.safetensors") as src:
        rep = describe(src)
        assert rep["kind"] == "vae" and rep["layout"] == "ldm-bare"
        assert all(k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")) for k in src.keys())
        assert not torch.equal(src.get("decoder.conv_out.weight"),
                               tiny_components["vae"].state_dict()["decoder.conv_out.weight"])


def test_inspect_cli_json_contract(demo, capsys):
    assert main(["inspect", str(demo / "tiny-sd.safetensors"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    for key in ("kind", "arch", "has_ema", "dtypes", "tensors", "parameters"):
        assert key in r
    with open_file(demo / "tiny-sd.safetensors") as src:
        assert r["tensors"] == len(src.keys())
        assert r["parameters"] == sum(src.info(k).numel for k in src.keys())
        counts = {}
        for k in src.keys():
            name = str(src.info(k).dtype).replace("torch.", "")
            counts[name] = counts.get(name, 0) + 1
    assert r["dtypes"] == counts


def test_round_trip_ldm_to_diffusers_to_ldm_is_bit_identical(demo, tmp_path):
    folder = tmp_path / "diff"
    assert main(["convert", str(demo / "tiny-sd.safetensors"), "--to", "diffusers", "--out", str(folder)]) == 0
    assert (folder / "unet_ema").is_dir()
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True, safety_checker=None)
    image = pipe("a cat", num_inference_steps=1, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    back = tmp_path / "back.safetensors"
    assert main(["convert", str(folder), "--to", "webui", "--out", str(back)]) == 0
    with open_file(demo / "tiny-sd.safetensors") as a, open_file(back) as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            ta, tb = a.get(k), b.get(k)
            assert ta.dtype == tb.dtype and torch.equal(ta, tb), k


def test_diffusers_folder_export_equals_the_model_weights(tiny_model_dir, tiny_components, tmp_path):
    out = tmp_path / "w.safetensors"
    convert_to_webui(tiny_model_dir, out)
    want = lk.diffusers_to_ldm(tiny_components["unet"].state_dict(), tiny_components["vae"].state_dict(),
                               tiny_components["text_encoder"].state_dict(),
                               scheduler_config=dict(tiny_components["scheduler"].config))
    with open_file(out) as src:
        assert set(src.keys()) == set(want)
        for k, v in want.items():
            assert torch.equal(src.get(k), v), k


def test_vae_round_trip_through_diffusers(demo, tmp_path):
    folder = tmp_path / "vae"
    convert_to_diffusers(demo / "tiny-vae.safetensors", folder)
    back = tmp_path / "vae.safetensors"
    convert_to_webui(folder, back)
    with open_file(demo / "tiny-vae.safetensors") as a, open_file(back) as b:
        assert set(a.keys()) == set(b.keys())
        assert all(torch.equal(a.get(k), b.get(k)) for k in a.keys())


def test_load_components_from_single_file_equals_the_source_model(demo, tiny_components):
    comps = load_diffusers_components(demo / "tiny-sd.safetensors")
    for name in ("unet", "vae", "text_encoder"):
        want = tiny_components[name].state_dict()
        got = comps[name].state_dict()
        assert set(got) == set(want), name
        assert all(torch.equal(got[k], want[k]) for k in want), name
    assert comps["scheduler"].config.prediction_type == "epsilon"
    assert comps["tokenizer"]("a cat").input_ids[0] == 49406
    from bp_trainer.tiny_model import ema_perturbation

    ema_want = ema_perturbation(tiny_components["unet"].state_dict(), 1000)
    ema_got = comps["ema_unet"].state_dict()
    assert all(torch.equal(ema_got[k], ema_want[k]) for k in ema_want)
    promoted = load_diffusers_components(demo / "tiny-sd.safetensors", use_ema=True)
    assert all(torch.equal(promoted["unet"].state_dict()[k], ema_want[k]) for k in ema_want)


def test_load_components_from_folder(tiny_model_dir, tiny_components):
    comps = load_diffusers_components(tiny_model_dir)
    want = tiny_components["unet"].state_dict()
    assert all(torch.equal(comps["unet"].state_dict()[k], want[k]) for k in want)
    assert comps["ema_unet"] is None and comps["tokenizer"] is not None


def test_v_prediction_from_metadata_is_honoured(demo, tmp_path):
    from bp_trainer.checkpoint.assemble import MergeOptions, merge

    out = tmp_path / "v.safetensors"
    merge(MergeOptions(base=str(demo / "tiny-sd.safetensors"), extra_metadata={"bp_prediction_type": "v_prediction"}),
          out)
    assert load_diffusers_components(out)["scheduler"].config.prediction_type == "v_prediction"
    with open_file(out) as src:
        assert describe(src)["prediction"] == "v_prediction"


def test_sdxl_is_recognised_and_refused(tmp_path, capsys):
    from safetensors.torch import save_file

    p = tmp_path / "xl.safetensors"
    save_file({"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(4, 2),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 4, 3, 3)}, str(p))
    assert main(["inspect", str(p), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["arch"] == "sdxl"
    assert main(["convert", str(p), "--to", "diffusers", "--out", str(tmp_path / "o")]) == 2
    assert "SDXL" in capsys.readouterr().err


def test_unknown_layout_is_an_error(tmp_path, capsys):
    from safetensors.torch import save_file

    p = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.alpha": torch.ones(1)}, str(p))
    assert main(["convert", str(p), "--to", "diffusers", "--out", str(tmp_path / "o")]) == 2
    assert "unknown model layout" in capsys.readouterr().err


@pytest.mark.parametrize("part,kind,layout", [
    ("unet", "unet", "ldm"),
    ("ema", "unet", "ldm"),
    ("vae", "vae", "ldm"),
    ("text", "text_encoder", "ldm"),
    ("diffusers-unet", "unet", "diffusers"),
    ("diffusers-vae", "vae", "diffusers"),
    ("transformers-text", "text_encoder", "transformers"),
])
def test_inspect_recognises_each_kind_of_part(demo, tiny_components, tmp_path, part, kind, layout):
    from safetensors.torch import load_file, save_file

    full = load_file(str(demo / "tiny-sd.safetensors"))
    pick = {
        "unet": lambda: {k: v for k, v in full.items() if k.startswith(lk.UNET_PREFIX)},
        "ema": lambda: {k: v for k, v in full.items() if k.startswith(lk.EMA_PREFIX)},
        "vae": lambda: {k: v for k, v in full.items() if k.startswith(lk.VAE_PREFIX)},
        "text": lambda: {k: v for k, v in full.items() if k.startswith("cond_stage_model.")},
        "diffusers-unet": lambda: tiny_components["unet"].state_dict(),
        "diffusers-vae": lambda: tiny_components["vae"].state_dict(),
        "transformers-text": lambda: tiny_components["text_encoder"].state_dict(),
    }[part]()
    p = tmp_path / f"{part}.safetensors"
    save_file({k: v.contiguous() for k, v in pick.items()}, str(p))
    with open_file(p) as src:
        rep = describe(src)
    assert (rep["kind"], rep["layout"], rep["arch"]) == (kind, layout, "sd1")
    assert rep["has_ema"] == (part == "ema")
    assert rep["tensors"] == len(pick)
    assert rep["parameters"] == sum(v.numel() for v in pick.values())


def _openclip_keys(te_sd: dict) -> dict:
    """transformers CLIPTextModel weights written in SD 2.x's OpenCLIP layout (test-side, independent of the code)."""
    sd = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in te_sd.items()}
    p = "cond_stage_model.model."
    out = {p + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
           p + "positional_embedding": sd["embeddings.position_embedding.weight"],
           p + "ln_final.weight": sd["final_layer_norm.weight"], p + "ln_final.bias": sd["final_layer_norm.bias"]}
    i = 0
    while f"encoder.layers.{i}.layer_norm1.weight" in sd:
        src, dst = f"encoder.layers.{i}.", f"{p}transformer.resblocks.{i}."
        for w in ("weight", "bias"):
            out[dst + f"attn.in_proj_{w}"] = torch.cat([sd[src + f"self_attn.{x}_proj.{w}"] for x in "qkv"])
            out[dst + f"attn.out_proj.{w}"] = sd[src + f"self_attn.out_proj.{w}"]
            out[dst + f"ln_1.{w}"] = sd[src + f"layer_norm1.{w}"]
            out[dst + f"ln_2.{w}"] = sd[src + f"layer_norm2.{w}"]
            out[dst + f"mlp.c_fc.{w}"] = sd[src + f"mlp.fc1.{w}"]
            out[dst + f"mlp.c_proj.{w}"] = sd[src + f"mlp.fc2.{w}"]
        i += 1
    return out


def test_sd2_openclip_single_file_loads_with_v_prediction(tmp_path):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from bp_trainer.tiny_model import UNET_CONFIG, build_vae

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**UNET_CONFIG, "cross_attention_dim": 64, "use_linear_projection": True})
    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=1, max_position_embeddings=77, hidden_act="gelu"))
    vae = build_vae(3)
    sd = lk.diffusers_to_ldm(unet.state_dict(), vae.state_dict())
    sd.update(_openclip_keys(te.state_dict()))
    p = tmp_path / "sd2.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(p))
    with open_file(p) as src:
        rep = describe(src)
    assert (rep["kind"], rep["arch"], rep["prediction"]) == ("checkpoint", "sd2", "unknown")
    comps = load_diffusers_components(p)
    assert comps["scheduler"].config.prediction_type == "v_prediction"  # SD 2.x 768-v unless told otherwise
    assert comps["unet"].config.use_linear_projection is True
    want = te.state_dict()
    got = comps["text_encoder"].state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want if not k.endswith("position_ids"))
    assert all(torch.equal(comps["unet"].state_dict()[k], v) for k, v in unet.state_dict().items())
    # the 512-base (global_step 875000 in a .ckpt) is epsilon, as diffusers decides
    ck = tmp_path / "sd2-base.ckpt"
    torch.save({"state_dict": sd, "global_step": 875000}, ck)
    assert load_diffusers_components(ck)["scheduler"].config.prediction_type == "epsilon"
    assert load_diffusers_components(ck, prediction_type="v_prediction")["scheduler"].config.prediction_type == \
        "v_prediction"


def test_naifu_lightning_ckpt_with_torch_ema_converts_to_webui(tiny_components, tmp_path):
    """naifu-diffusion's last.ckpt: state_dict with unet.*/vae.*/text_encoder.* (diffusers names) and the
    torch_ema state (shadow_params in unet.parameters() order) -> a WebUI file with model_ema.*."""
    from bp_trainer.tiny_model import ema_perturbation

    unet = tiny_components["unet"]
    sd = {}
    for comp in ("text_encoder", "vae", "unet"):
        sd.update({f"{comp}.{k}": v for k, v in tiny_components[comp].state_dict().items()})
    ema = ema_perturbation(unet.state_dict(), 5)
    shadow = [ema[name] for name, _ in unet.named_parameters()]
    ck = tmp_path / "last.ckpt"
    torch.save({"state_dict": sd, "global_step": 1000, "model_ema": {"decay": 0.995, "num_updates": 1000,
                                                                     "shadow_params": shadow}}, ck)
    with open_file(ck) as src:
        rep = describe(src)
    assert (rep["kind"], rep["layout"], rep["has_ema"]) == ("checkpoint", "diffusers-prefixed", True)
    out = tmp_path / "webui.safetensors"
    assert main(["merge", "--base", str(ck), "--use-ema", "--drop-ema", "--out", str(out)]) == 0
    with open_file(out) as o:
        for k, ldm in lk.unet_key_map(ema).items():
            assert torch.equal(o.get(ldm), ema[k]), k
        for k, ldm in lk.vae_key_map(tiny_components["vae"].state_dict()).items():
            assert torch.equal(o.get(lk.VAE_PREFIX + ldm),
                               lk.vae_tensor_to_ldm(ldm, tiny_components["vae"].state_dict()[k]))
        assert not any(k.startswith(lk.EMA_PREFIX) for k in o.keys())
    keep = tmp_path / "with-ema.safetensors"
    assert main(["merge", "--base", str(ck), "--out", str(keep)]) == 0
    with open_file(keep) as o:
        assert abs(float(o.get("model_ema.decay")) - 0.995) < 1e-7
        assert int(o.get("model_ema.num_updates")) == 1000


def test_sd2_text_encoder_exports_back_to_openclip_layout(tmp_path):
    """diffusers -> LDM for a 1024-wide (SD 2.x) CLIPTextModel: OpenCLIP keys with q/k/v fused, both through
    diffusers_to_ldm and through the lazy view of a transformers-layout file (what merge/convert use)."""
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(1)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=1024, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu",
                                      bos_token_id=0, eos_token_id=2, pad_token_id=1))
    want = _openclip_keys(te.state_dict())
    got = lk.diffusers_to_ldm(text_encoder=te.state_dict())
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    p = tmp_path / "te2.safetensors"
    save_file({k: v.contiguous() for k, v in te.state_dict().items()}, str(p))
    from bp_trainer.checkpoint.layout import ldm_view

    with open_file(p) as src:
        view = ldm_view(src)
        assert view.arch == "sd2" and set(view.keys()) == set(want)
        for k in want:
            assert view.info(k).shape == tuple(want[k].shape)
            assert torch.equal(view.get(k), want[k]) and torch.equal(view.get_as(k, torch.float16), want[k].half())
