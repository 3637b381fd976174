"""WebUI (LDM) single files <-> diffusers, and loading any SD 1.x/2.x model as diffusers components offline.

LDM -> diffusers uses diffusers' own `diffusers.loaders.single_file_utils` conversion functions with local
configs (imported lazily: only the trainer and the CLI come here, never the WebUI process). The configs are,
in order: the ones a BP Train file carries in its metadata (`bp_configs`), the shipped full-size SD 1.x/2.x
configs (`configs/sd1.json`, `configs/sd2.json`) when the shapes are full-size, or configs inferred from the
tensor shapes (any SD-1.x-shaped width, e.g. the tiny model). diffusers -> LDM is `ldm_keys` (own code).
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import torch

from bp_trainer.errors import BPError
from bp_trainer.fsutil import atomic_dir, check_output_path, remove_stale_partials, write_errors
from bp_trainer.checkpoint import ldm_keys as lk
from bp_trainer.checkpoint.io import TensorSource, open_file, write_checkpoint
from bp_trainer.checkpoint.layout import MappedSource, detect_prediction, ema_unet_map, ldm_view

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@lru_cache(maxsize=None)
def shipped_config(arch: str) -> dict[str, Any]:
    """Full-size diffusers configs (`unet`, `vae`, `text_encoder`, `scheduler`) of `sd1` or `sd2`."""
    data = json.loads((CONFIG_DIR / f"{arch}.json").read_text(encoding="utf-8"))
    data.pop("_about", None)
    return data


# ------------------------------------------------------------------------------------- config inference
def _sub(shapes: Mapping[str, tuple], prefix: str) -> dict[str, tuple]:
    return {k[len(prefix):]: tuple(v) for k, v in shapes.items() if k.startswith(prefix)}


def infer_unet_config(shapes: Mapping[str, tuple]) -> dict[str, Any]:
    """diffusers UNet2DConditionModel config from LDM UNet shapes (keys with or without the prefix)."""
    s = _sub(shapes, lk.UNET_PREFIX) or dict(shapes)
    try:
        conv_in = s["input_blocks.0.0.weight"]
        n_in = 1 + max(int(k.split(".")[1]) for k in s if k.startswith("input_blocks."))
        levels = 1 + sum(1 for k in s if k.startswith("input_blocks.") and k.endswith(".0.op.weight"))
        per = (n_in - 1 + 1) // levels - 1  # n_in - 1 blocks after conv_in = levels*(per+1) - 1
        channels, down, up = [], [], []
        for i in range(levels):
            first = 1 + i * (per + 1)
            channels.append(int(s[f"input_blocks.{first}.0.out_layers.3.weight"][0]))
            down.append("CrossAttnDownBlock2D" if f"input_blocks.{first}.1.proj_in.weight" in s else "DownBlock2D")
            up.append("CrossAttnUpBlock2D" if f"output_blocks.{i * (per + 1)}.1.proj_in.weight" in s else "UpBlock2D")
        proj = next(v for k, v in s.items() if k.endswith("proj_in.weight"))
        ctx = next(int(v[1]) for k, v in s.items() if k.endswith("attn2.to_k.weight"))
        depth = 1 + max(int(k.split("transformer_blocks.")[1].split(".")[0])
                        for k in s if k.startswith("input_blocks.1.1.transformer_blocks.")) if down[0] == "CrossAttnDownBlock2D" else 1
    except (KeyError, StopIteration, ValueError) as exc:
        raise BPError(f"cannot infer the UNet structure from its tensors (missing {exc})") from None
    linear = len(proj) == 2
    cfg: dict[str, Any] = {
        "sample_size": 64,
        "in_channels": int(conv_in[1]),
        "out_channels": int(s["out.2.weight"][0]),
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": channels,
        "layers_per_block": per,
        "cross_attention_dim": ctx,
        "attention_head_dim": [c // 64 for c in channels] if linear and all(c % 64 == 0 for c in channels) else 8,
        "use_linear_projection": linear,
        "norm_num_groups": 32,
        "transformer_layers_per_block": depth,
    }
    if linear:
        cfg["upcast_attention"] = ctx == 1024
    return cfg


def infer_vae_config(shapes: Mapping[str, tuple]) -> dict[str, Any]:
    s = _sub(shapes, lk.VAE_PREFIX) or dict(shapes)
    try:
        levels = 1 + max(int(k.split(".")[2]) for k in s if k.startswith("encoder.down."))
        per = 1 + max(int(k.split(".")[4]) for k in s if k.startswith("encoder.down.0.block."))
        channels = [int(s[f"encoder.down.{i}.block.{per - 1}.conv2.weight"][0]) for i in range(levels)]
        cfg = {
            "in_channels": int(s["encoder.conv_in.weight"][1]),
            "out_channels": int(s["decoder.conv_out.weight"][0]),
            "down_block_types": ["DownEncoderBlock2D"] * levels,
            "up_block_types": ["UpDecoderBlock2D"] * levels,
            "block_out_channels": channels,
            "layers_per_block": per,
            "latent_channels": int(s["decoder.conv_in.weight"][1]),
            "norm_num_groups": 32,
            "sample_size": 512,
            "scaling_factor": 0.18215,
        }
    except (KeyError, ValueError) as exc:
        raise BPError(f"cannot infer the VAE structure from its tensors (missing {exc})") from None
    return cfg


def infer_text_config(shapes: Mapping[str, tuple]) -> dict[str, Any]:
    s = _sub(shapes, lk.SD1_TEXT_PREFIX)
    try:
        vocab, hidden = (int(x) for x in s["embeddings.token_embedding.weight"])
        layers = 1 + max(int(k.split(".")[2]) for k in s if k.startswith("encoder.layers."))
        inter = int(s["encoder.layers.0.mlp.fc1.weight"][0])
        positions = int(s["embeddings.position_embedding.weight"][0])
    except (KeyError, ValueError) as exc:
        raise BPError(f"cannot infer the text encoder structure from its tensors (missing {exc})") from None
    return {
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // 64) if hidden % 64 == 0 else max(1, hidden // 8),
        "max_position_embeddings": positions, "hidden_act": "quick_gelu", "projection_dim": hidden,
        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
    }


def infer_openclip_config(shapes: Mapping[str, tuple]) -> dict[str, Any]:
    """CLIPTextModel config for an SD 2.x OpenCLIP text encoder (`cond_stage_model.model.*`) from its shapes.

    SD 2.x uses the penultimate layer: a 24-block OpenCLIP-H becomes a 23-layer CLIPTextModel (diffusers
    ignores block 23); other depths are taken whole."""
    s = _sub(shapes, "cond_stage_model.model.")
    try:
        vocab, hidden = (int(x) for x in s["token_embedding.weight"])
        blocks = 1 + max(int(k.split(".")[2]) for k in s if k.startswith("transformer.resblocks."))
        inter = int(s["transformer.resblocks.0.mlp.c_fc.weight"][0])
        positions = int(s["positional_embedding"][0])
    except (KeyError, ValueError) as exc:
        raise BPError(f"cannot infer the OpenCLIP text encoder structure (missing {exc})") from None
    proj = s.get("text_projection")
    return {
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": blocks - 1 if blocks == 24 else blocks,
        "num_attention_heads": max(1, hidden // 64), "max_position_embeddings": positions, "hidden_act": "gelu",
        "projection_dim": int(proj[1]) if proj else hidden, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
    }


def _struct(cfg: Mapping[str, Any], keys) -> tuple:
    return tuple(json.dumps(cfg.get(k), sort_keys=True) for k in keys)


_UNET_STRUCT = ("block_out_channels", "layers_per_block", "cross_attention_dim", "in_channels", "out_channels",
                "down_block_types", "up_block_types")


def model_configs(view: MappedSource) -> dict[str, Any]:
    """diffusers configs for the parts present in an LDM view (metadata > shipped full-size > inferred)."""
    shapes = {k: view.info(k).shape for k in view.keys()}
    meta = view.metadata.get("bp_configs")
    if meta:
        try:
            cfgs = json.loads(meta)
            if isinstance(cfgs, dict) and "unet" in cfgs:
                return cfgs
        except json.JSONDecodeError:
            pass
    out: dict[str, Any] = {}
    arch = view.arch if view.arch in ("sd1", "sd2") else "sd1"
    shipped = shipped_config(arch)
    if any(k.startswith(lk.UNET_PREFIX) for k in shapes) or any(k.startswith(lk.EMA_PREFIX) for k in shapes):
        ushapes = shapes if any(k.startswith(lk.UNET_PREFIX) for k in shapes) else _ema_as_unet_shapes(view)
        inferred = infer_unet_config(ushapes)
        out["unet"] = dict(shipped["unet"]) if _struct(inferred, _UNET_STRUCT) == _struct(shipped["unet"], _UNET_STRUCT) else inferred
    if any(k.startswith(lk.VAE_PREFIX) for k in shapes):
        inferred = infer_vae_config(shapes)
        keys = ("block_out_channels", "layers_per_block", "latent_channels")
        out["vae"] = dict(shipped["vae"]) if _struct(inferred, keys) == _struct(shipped["vae"], keys) else inferred
    if any(k.startswith(lk.SD1_TEXT_PREFIX) for k in shapes):
        inferred = infer_text_config(shapes)
        keys = ("hidden_size", "num_hidden_layers", "intermediate_size")
        out["text_encoder"] = dict(shipped_config("sd1")["text_encoder"]) if _struct(inferred, keys) == _struct(
            shipped_config("sd1")["text_encoder"], keys) else inferred
    elif any(k.startswith("cond_stage_model.model.") for k in shapes):
        inferred = infer_openclip_config(shapes)
        keys = ("hidden_size", "num_hidden_layers", "intermediate_size")
        sd2 = shipped_config("sd2")["text_encoder"]
        out["text_encoder"] = dict(sd2) if _struct(inferred, keys) == _struct(sd2, keys) else inferred
    out["scheduler"] = dict(shipped["scheduler"])
    return out


def _ema_as_unet_shapes(view: TensorSource) -> dict[str, tuple]:
    raise BPError("this file holds EMA weights only; the UNet structure cannot be recovered from their names",
                  path=view.path, hint="pass it together with a base model (merge --unet FILE --use-ema --base BASE)")


# ------------------------------------------------------------------------------- LDM -> diffusers dicts
def ldm_to_diffusers_state_dicts(view: MappedSource, configs: Mapping[str, Any], *, use_ema: bool = False,
                                 keep_ema: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """Convert an LDM view into diffusers state dicts with diffusers' single_file_utils functions."""
    from diffusers.loaders import single_file_utils as sfu

    sd = {k: view.get(k) for k in view.keys()}
    out: dict[str, dict[str, torch.Tensor]] = {}
    unet_keys = [k for k in sd if k.startswith(lk.UNET_PREFIX)]
    emap = ema_unet_map(view, unet_keys)
    if unet_keys:
        if use_ema:
            if not emap:
                raise BPError("--use-ema: this file has no EMA weights (model_ema.*)", path=view.path)
            ema_sd = {u: sd[e] for u, e in emap.items()}
            out["unet"] = sfu.convert_ldm_unet_checkpoint(ema_sd, configs["unet"])
        else:
            out["unet"] = sfu.convert_ldm_unet_checkpoint({k: sd[k] for k in unet_keys}, configs["unet"])
            if emap and keep_ema:
                out["unet_ema"] = sfu.convert_ldm_unet_checkpoint({u: sd[e] for u, e in emap.items()}, configs["unet"])
    if any(k.startswith(lk.VAE_PREFIX) for k in sd):
        out["vae"] = sfu.convert_ldm_vae_checkpoint({k: v for k, v in sd.items() if k.startswith(lk.VAE_PREFIX)},
                                                    configs["vae"])
    if any(k.startswith(lk.SD1_TEXT_PREFIX) for k in sd):
        te = sfu.convert_ldm_clip_checkpoint({k: v for k, v in sd.items() if k.startswith(lk.SD1_TEXT_PREFIX)})
        out["text_encoder"] = te
    elif any(k.startswith("cond_stage_model.model.") for k in sd):
        from transformers import CLIPTextConfig, CLIPTextModel

        with torch.device("meta"):
            model = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
        out["text_encoder"] = sfu.convert_open_clip_checkpoint(model, sd)
    return out


def _build(kind: str, config: Mapping[str, Any], state: Mapping[str, torch.Tensor], path: str):
    if kind in ("unet", "unet_ema"):
        from diffusers import UNet2DConditionModel as cls
    elif kind == "vae":
        from diffusers import AutoencoderKL as cls
    else:
        cls = None
    if cls is not None:
        model = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    else:
        from transformers import CLIPTextConfig, CLIPTextModel

        model = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in config.items() if not k.startswith("_")}))
    expected = model.state_dict()
    if cls is None:  # CLIPModel heads are not part of CLIPTextModel
        state = {k: v for k, v in state.items() if not k.startswith(("text_projection", "logit_scale"))}
    state = _align_text_keys(dict(state), expected) if cls is None else dict(state)
    state = {k: v for k, v in state.items() if k in expected or not k.endswith("position_ids")}
    missing = [k for k in expected if k not in state and not k.endswith("position_ids")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise BPError(f"{kind} weights do not fit the model: {len(missing)} missing (e.g. {missing[:2]}), "
                      f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})", path=path)
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise BPError(f"{kind} tensor {k} has shape {tuple(v.shape)}, the model needs {tuple(expected[k].shape)}",
                          path=path)
    dtype = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    model.load_state_dict(state, strict=False)
    if dtype != torch.float32:
        model = model.to(dtype)
    return model.eval()


def _align_text_keys(state: dict, expected: Mapping[str, Any]) -> dict:
    """transformers 5 names lack `text_model.`; 4.x names have it: follow whichever the model uses."""
    has = any(k.startswith("text_model.") for k in expected)
    out = {}
    for k, v in state.items():
        bare = k[len("text_model."):] if k.startswith("text_model.") else k
        out["text_model." + bare if has else bare] = v
    return out


def _scheduler(config: Mapping[str, Any], prediction: str):
    import diffusers

    cfg = dict(config)
    name = cfg.pop("_class_name", "PNDMScheduler")
    cls = getattr(diffusers, name, diffusers.PNDMScheduler)
    cfg["prediction_type"] = prediction
    return cls.from_config(cfg)


def write_pipeline_index(folder: "str | os.PathLike[str]", scheduler_class: str = "PNDMScheduler") -> None:
    """model_index.json of a StableDiffusionPipeline folder without safety checker (unet/vae/text_encoder/
    tokenizer/scheduler sub-folders written by the caller, one component at a time)."""
    index = {
        "_class_name": "StableDiffusionPipeline", "feature_extractor": [None, None],
        "requires_safety_checker": False, "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "image_encoder": [None, None],
    }
    (Path(folder) / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def load_diffusers_components(path: "str | os.PathLike[str]", *, prediction_type: "str | None" = None,
                              use_ema: bool = False) -> dict[str, Any]:
    """unet, vae, text_encoder, tokenizer, scheduler (+ `ema_unet` or None) from a WebUI single file
    (SD 1.x; SD 2.x incl. v-prediction) or a diffusers folder, fully offline.

    `use_ema`: the UNet is built from the file's EMA weights. `prediction_type` overrides detection.
    """
    path = os.fspath(path)
    src = open_file(path)
    from bp_trainer.checkpoint.io import DiffusersFolderSource

    if isinstance(src, DiffusersFolderSource) and (Path(path) / "unet").is_dir():
        src.close()
        return _load_folder(Path(path), prediction_type=prediction_type, use_ema=use_ema)
    view = ldm_view(src)
    if view.kind != "checkpoint" or not any(k.startswith(lk.UNET_PREFIX) for k in view.keys()):
        raise BPError(f"a full model is needed here, this file is a {view.kind}", path=path,
                      hint="use a checkpoint with UNet, VAE and text encoder (or assemble one with `merge`)")
    configs = model_configs(view)
    dicts = ldm_to_diffusers_state_dicts(view, configs, use_ema=use_ema)
    missing = [c for c in ("unet", "vae", "text_encoder") if c not in dicts]
    if missing:
        raise BPError(f"this checkpoint has no {', '.join(missing)}", path=path,
                      hint="bake the missing part in with `merge --vae/--text-encoder`")
    comps: dict[str, Any] = {}
    for kind in ("unet", "vae", "text_encoder"):
        comps[kind] = _build(kind, configs[kind], dicts.pop(kind), path)
    comps["ema_unet"] = _build("unet", configs["unet"], dicts.pop("unet_ema"), path) if "unet_ema" in dicts else None
    pred = prediction_type or detect_prediction(view.arch, view.metadata, view.extras)
    if pred == "unknown":
        step = view.metadata.get("global_step")
        pred = "epsilon" if step == "875000" else "v_prediction"  # SD 2.x: diffusers' own rule (512-base: 875000)
    comps["scheduler"] = _scheduler(configs.get("scheduler") or shipped_config("sd1")["scheduler"], pred)
    comps["tokenizer"] = _tokenizer(view.arch)
    comps["configs"] = configs
    src.close()
    return comps


def _tokenizer(arch: str, folder: "Path | None" = None):
    if folder is not None and (folder / "vocab.json").is_file():
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    from bp_trainer.clip_vocab import clip_tokenizer

    tok = clip_tokenizer()
    if arch == "sd2":  # OpenCLIP pads with "!" (id 0)
        tok = type(tok).from_pretrained(tok.name_or_path, pad_token="!", local_files_only=True) \
            if getattr(tok, "name_or_path", "") and os.path.isdir(tok.name_or_path) else tok
    return tok


def _load_folder(root: Path, *, prediction_type, use_ema: bool) -> dict[str, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    kw = {"local_files_only": True}
    unet_dir = root / ("unet_ema" if use_ema else "unet")
    if use_ema and not unet_dir.is_dir():
        raise BPError("--use-ema: this diffusers folder has no unet_ema/", path=root)
    comps: dict[str, Any] = {
        "unet": UNet2DConditionModel.from_pretrained(str(unet_dir), **kw).eval(),
        "vae": AutoencoderKL.from_pretrained(str(root / "vae"), **kw).eval(),
        "text_encoder": CLIPTextModel.from_pretrained(str(root / "text_encoder"), **kw).eval(),
    }
    ema_dir = root / "unet_ema"
    comps["ema_unet"] = UNet2DConditionModel.from_pretrained(str(ema_dir), **kw).eval() \
        if ema_dir.is_dir() and not use_ema else None
    sched_cfg = json.loads((root / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8")) \
        if (root / "scheduler" / "scheduler_config.json").is_file() else shipped_config("sd1")["scheduler"]
    pred = prediction_type or sched_cfg.get("prediction_type") or "epsilon"
    comps["scheduler"] = _scheduler(sched_cfg, pred)
    arch = "sd2" if comps["text_encoder"].config.hidden_size == 1024 else "sd1"
    comps["tokenizer"] = _tokenizer(arch, root / "tokenizer")
    comps["configs"] = {"unet": dict(comps["unet"].config), "vae": dict(comps["vae"].config),
                        "text_encoder": comps["text_encoder"].config.to_dict(), "scheduler": sched_cfg}
    return comps


# --------------------------------------------------------------------------------------- folder writing
def convert_to_diffusers(src_path: "str | os.PathLike[str]", out_dir: "str | os.PathLike[str]", *,
                         use_ema: bool = False, prediction_type: "str | None" = None) -> dict[str, Any]:
    """WebUI single file -> diffusers folder (pipeline for a checkpoint; a component folder for a UNet/VAE).

    EMA weights (when present and not promoted with `use_ema`) go to `unet_ema/`, with LitEma's
    decay/num_updates in `unet_ema/ema_state.json`, so converting back restores them bit for bit.
    The folder is built next to the target and renamed into place when complete (`fsutil.atomic_dir`); a
    failed write (disk full, ...) is a one-line BPError and leaves nothing behind.
    """
    out = check_output_path(out_dir, folder=True)
    if out.exists():
        raise BPError("the output folder exists already", path=out, hint="choose a new folder name")
    src = open_file(src_path)
    try:
        view = ldm_view(src)
        if view.kind not in ("checkpoint", "unet", "vae"):
            raise BPError(f"converting a {view.kind} file to diffusers is not supported", path=src_path,
                          hint="convert a full checkpoint, a UNet or a VAE")
        configs = model_configs(view)
        remove_stale_partials(out.parent)
        with write_errors(out), atomic_dir(out) as tmp:
            if view.kind == "checkpoint":
                written = _write_pipeline(tmp, view, configs, os.fspath(src_path), use_ema, prediction_type)
            else:
                dicts = ldm_to_diffusers_state_dicts(view, configs, use_ema=use_ema, keep_ema=False)
                _build(view.kind, configs[view.kind], dicts[view.kind], os.fspath(src_path)).save_pretrained(str(tmp))
                written = [view.kind]
    finally:
        src.close()
    return {"out": str(out), "components": written, "arch": view.arch}


def _write_pipeline(tmp: Path, view: MappedSource, configs: dict[str, Any], src_path: str, use_ema: bool,
                    prediction_type: "str | None") -> list[str]:
    """A checkpoint's diffusers pipeline folder, written into `tmp`; returns the model components written."""
    from bp_trainer.clip_vocab import write_tokenizer_files

    written: list[str] = []
    dicts = ldm_to_diffusers_state_dicts(view, configs, use_ema=use_ema)
    for comp in ("unet", "unet_ema", "vae", "text_encoder"):
        if comp in dicts:
            cfg_key = "unet" if comp == "unet_ema" else comp
            _build(comp, configs[cfg_key], dicts.pop(comp), src_path).save_pretrained(str(tmp / comp))
            written.append(comp)
    if "unet_ema" in written:
        st = {}
        if "model_ema.decay" in view:
            st["decay"] = float(view.get("model_ema.decay").item())
        if "model_ema.num_updates" in view:
            st["num_updates"] = int(view.get("model_ema.num_updates").item())
        (tmp / "unet_ema" / "ema_state.json").write_text(json.dumps(st), encoding="utf-8")
    pred = prediction_type or detect_prediction(view.arch, view.metadata, view.extras)
    if pred == "unknown":
        pred = "epsilon" if view.metadata.get("global_step") == "875000" else "v_prediction"
    scheduler = _scheduler(configs["scheduler"], pred)
    scheduler.save_pretrained(str(tmp / "scheduler"))
    write_tokenizer_files(tmp / "tokenizer")
    write_pipeline_index(tmp, type(scheduler).__name__)
    return written


def convert_to_webui(src_path: "str | os.PathLike[str]", out_file: "str | os.PathLike[str]", *,
                     precision: "str | None" = None, fmt: str = "safetensors",
                     metadata: "Mapping[str, str] | None" = None) -> dict[str, Any]:
    """diffusers folder / diffusers or transformers component file -> WebUI single file, streamed.

    A VAE is written in the WebUI models/VAE layout (no prefix); a UNet or text encoder keeps its
    checkpoint prefix; a pipeline folder becomes a full checkpoint (with `model_ema.*` from `unet_ema/`).
    """
    src = open_file(src_path)
    try:
        view = ldm_view(src)
        tensors: Any = view
        if view.kind == "vae":
            tensors = {k[len(lk.VAE_PREFIX):]: (k) for k in view.keys()}
            from bp_trainer.checkpoint.io import Entry, cast, out_dtype

            tensors = [Entry(nk, out_dtype(view.info(k).dtype, precision), view.info(k).shape,
                             (lambda k=k: cast(view.get(k), precision))) for nk, k in tensors.items()]
        meta = {"bp_converted_from": Path(src_path).name}
        if view.layout == "diffusers" and view.kind == "checkpoint":
            cfgs = view.extras.get("configs", {})
            keep = {c: cfgs[c] for c in ("unet", "vae", "text_encoder", "scheduler") if c in cfgs}
            meta["bp_configs"] = json.dumps(keep, default=str)
            pred = (cfgs.get("scheduler") or {}).get("prediction_type")
            if pred:
                meta["bp_prediction_type"] = str(pred)
        meta.update(metadata or {})
        result = write_checkpoint(tensors, out_file, meta, fmt=fmt, precision=precision, inputs=[src_path])
    finally:
        src.close()
    result.update({"kind": view.kind, "arch": view.arch})
    return result
