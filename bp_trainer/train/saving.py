"""The outputs of a save, mirroring BPModel's releases, written atomically with their WebUI hashes.

(a) `NAME-sSTEP.safetensors`: the WebUI-loadable checkpoint (UNet + VAE + text encoder, LDM layout,
    fp16 by default; the UNet is the EMA's when `saving.main_unet: ema`).
(b) `NAME-sSTEP-ema-unet.safetensors`: the EMA UNet in fp32 (LDM keys, `model.diffusion_model.*`), for
    continued training or `merge`.
(c) optionally `NAME-sSTEP-diffusers/`: a diffusers folder (written to a temporary folder, then renamed), with
    the run's tag embeddings in `embeddings/<name>/learned_embeds.safetensors`.
(d) with `saving.keep_best`: the same files of the step with the lowest validation loss as `NAME-best*`
    (`keep_best`: hard links to that step's files, or written anew when the step saved none).

Each file's full SHA-256, AutoV2 (10 hex, the infotext "Model hash") and old 8-hex hash are returned and
appended to `checkpoints/hashes.json`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from bp_trainer.errors import BPError
from bp_trainer.fsutil import atomic_write_text, read_json_object, write_errors

UNET_PREFIX = "model.diffusion_model."


def _cpu_state(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu") for k, v in module.state_dict().items()}


def metadata_for(cfg: Any, step: int, epoch: int, unet_kind: str) -> Dict[str, str]:
    from bp_trainer.train.config import dump_config

    return {
        "bp_train_step": str(step),
        "bp_train_epoch": str(epoch),
        "bp_train_unet": unet_kind,
        "bp_train_base": os.path.basename(str(cfg.model.base)),
        "bp_train_clip_skip": str(cfg.model.clip_skip),
        "bp_train_config": dump_config(cfg),
    }


def model_configs_metadata(unet: Any, vae: Any, text_encoder: Any, scheduler_config: Optional[Dict[str, Any]]
                           ) -> Dict[str, str]:
    """`bp_configs` (the diffusers configs, so any width of model reloads exactly) and the prediction type."""
    def plain(config: Any) -> Dict[str, Any]:
        d = dict(config.to_dict() if hasattr(config, "to_dict") else config)
        return {k: v for k, v in d.items() if not k.startswith("_") or k == "_class_name"}

    te = plain(text_encoder.config)
    for k in ("architectures", "transformers_version", "torch_dtype", "dtype", "model_type", "name_or_path",
              "output_hidden_states", "return_dict", "use_return_dict"):
        te.pop(k, None)
    configs = {"unet": plain(unet.config), "vae": plain(vae.config), "text_encoder": te,
               "scheduler": dict(scheduler_config or {})}
    out = {"bp_configs": json.dumps(configs, default=str)}
    pred = (scheduler_config or {}).get("prediction_type")
    if pred:
        out["bp_prediction_type"] = str(pred)
    return out


def save_outputs(*, cfg: Any, family: Any, run_dir: Any, step: int, epoch: int, unet: torch.nn.Module,
                 models: Any, text_encoder: torch.nn.Module, ema: Any = None,
                 frozen: Optional[Dict[str, Dict[str, torch.Tensor]]] = None,
                 stem: Optional[str] = None, embeddings: Any = None) -> Dict[str, Dict[str, Any]]:
    """Write (a), (b), (c) for the current weights; returns {kind: {path, sha256, autov2, old}}.
    `stem`: the files' name stem (default `step_stem(cfg, step)`).

    Frozen parts (the VAE; the text encoder unless trained) are written from `frozen`, their weights as loaded:
    the copies on the device may be cast to bf16/fp16 for training, and a save must never round them.
    """
    from bp_trainer.checkpoint.io import write_checkpoint
    from bp_trainer.rundir import RunDir

    s, frozen = cfg.saving, frozen or {}
    out_dir = RunDir(run_dir).checkpoints
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or step_stem(cfg, step)
    trained = _cpu_state(unet)
    ema_sd = ema.full_state_dict(unet) if ema is not None else None
    use_ema = s.main_unet == "ema" and ema_sd is not None
    main_unet = {k: v.to("cpu") for k, v in ema_sd.items()} if use_ema else trained
    vae_sd = frozen.get("vae") or _cpu_state(models.vae)
    te_sd = frozen.get("text_encoder") or _cpu_state(text_encoder)
    files: Dict[str, Dict[str, Any]] = {}

    tensors = family.export_webui(unet=main_unet, vae=vae_sd, text_encoder=te_sd,
                                  scheduler_config=models.scheduler_config)
    meta = metadata_for(cfg, step, epoch, "ema" if use_ema else "trained")
    meta.update(model_configs_metadata(unet, models.vae, text_encoder, models.scheduler_config))
    res = write_checkpoint(tensors, out_dir / f"{stem}.safetensors", meta, "safetensors", s.precision)
    files["webui"] = _record(res)
    del tensors

    if ema_sd is not None and s.ema_unet_fp32:
        ema_cpu = {k: v.to("cpu") for k, v in ema_sd.items()}
        ldm = {k: v for k, v in family.export_webui(unet=ema_cpu).items() if k.startswith(UNET_PREFIX)}
        res = write_checkpoint(ldm, out_dir / f"{stem}-ema-unet.safetensors", metadata_for(cfg, step, epoch, "ema"),
                               "safetensors", "fp32")
        files["ema_unet"] = _record(res)

    if s.diffusers:
        parts = {"unet": (unet, main_unet), "vae": (models.vae, vae_sd), "text_encoder": (text_encoder, te_sd)}
        files["diffusers"] = _save_diffusers(out_dir / f"{stem}-diffusers", parts=parts, tokenizer=models.tokenizer,
                                             scheduler_config=models.scheduler_config, embeddings=embeddings,
                                             step=step)
    _append_hashes(out_dir, files)
    return files


def step_stem(cfg: Any, step: int) -> str:
    return f"{cfg.run.name}-s{step:06d}"


def keep_best(saved: Optional[Dict[str, Dict[str, Any]]], *, cfg: Any, run_dir: Any, step: int,
              write: Callable[[str], Dict[str, Dict[str, Any]]]) -> Dict[str, Dict[str, Any]]:
    """The new best checkpoint under stable names (`NAME-best.safetensors`, `NAME-best-ema-unet.safetensors`,
    `NAME-best-diffusers/`): links to (or copies of) the files `saved` at this step, else written by
    `write(stem)`. Each name is replaced atomically; the step's own files stay as they are."""
    from bp_trainer.rundir import RunDir

    best = f"{cfg.run.name}-best"
    if not saved:
        return write(best)
    out_dir, source = RunDir(run_dir).checkpoints, step_stem(cfg, step)
    files: Dict[str, Dict[str, Any]] = {}
    for kind, rec in saved.items():
        src = Path(rec["path"])
        dest = out_dir / (best + src.name[len(source):])
        _link_tree(src, dest) if src.is_dir() else _link_file(src, dest)
        files[kind] = dict(rec, path=str(dest))
    _append_hashes(out_dir, files)
    return files


def _link_file(src: Path, dest: Path) -> None:
    """`dest` becomes a hard link to `src` (a copy across file systems), replaced atomically."""
    from bp_trainer.fsutil import atomic_path

    with atomic_path(dest) as tmp:
        try:
            tmp.unlink()
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def _link_tree(src: Path, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, copy_function=_link_or_copy)
    _replace_dir(tmp, dest)


def _replace_dir(tmp: Path, target: Path) -> None:
    """Move the complete folder `tmp` to `target`; an old `target` is moved aside first, so a crash never leaves
    neither."""
    old = target.with_name(target.name + ".old")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def _link_or_copy(src: str, dest: str) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def cpu_copy(module: torch.nn.Module, state: Dict[str, torch.Tensor]) -> torch.nn.Module:
    """A new fp32 module on the CPU with `module`'s config and `state`'s weights (the device copy is never
    duplicated on the device)."""
    if hasattr(module, "from_config"):
        copy = type(module).from_config(module.config)
    else:  # transformers
        copy = type(module)(module.config)
    copy.load_state_dict({k: v.to("cpu", torch.float32) for k, v in state.items()})
    return copy.to(torch.float32)


def _record(res: Dict[str, Any]) -> Dict[str, Any]:
    return {"path": res["out"], "sha256": res["sha256"], "autov2": res["autov2"], "old": res["old"],
            "bytes": res.get("bytes")}


def _save_diffusers(target: Path, *, parts: Dict[str, Any], tokenizer: Any,
                    scheduler_config: Optional[Dict[str, Any]], embeddings: Any = None, step: int = 0
                    ) -> Dict[str, Any]:
    from bp_trainer.checkpoint.hashes import file_hashes

    tmp = target.with_name(f".{target.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with write_errors(target):  # a full disk: one line, and no half folder is left
            _write_pipeline(tmp, parts, tokenizer, scheduler_config, embeddings, step)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace_dir(tmp, target)  # re-saving a step (after a resume) replaces its folder
    weights = target / "unet" / "diffusion_pytorch_model.safetensors"
    rec: Dict[str, Any] = {"path": str(target)}
    if weights.exists():
        rec.update({f"unet_{k}": v for k, v in file_hashes(weights).items()})
    return rec


def _write_pipeline(tmp: Path, parts: Dict[str, Any], tokenizer: Any, scheduler_config: Optional[Dict[str, Any]],
                    embeddings: Any = None, step: int = 0) -> None:
    from diffusers import PNDMScheduler

    from bp_trainer.checkpoint.convert import write_pipeline_index
    from bp_trainer.clip_vocab import write_vocab_files

    for name, (module, state) in parts.items():
        cpu_copy(module, state).save_pretrained(tmp / name)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp / "tokenizer")
        if not (tmp / "tokenizer" / "merges.txt").exists():  # transformers 5 writes tokenizer.json only
            try:
                write_vocab_files(tmp / "tokenizer")  # vocab.json/merges.txt for transformers 4.x readers
            except BPError:  # no offline BPE file in this environment: tokenizer.json serves new readers
                pass
    PNDMScheduler.from_config({k: v for k, v in (scheduler_config or {}).items() if not k.startswith("_")}
                              ).save_pretrained(tmp / "scheduler")
    write_pipeline_index(tmp)
    if embeddings is not None:  # the tag embeddings, each loadable with pipeline.load_textual_inversion(folder)
        embeddings.write_diffusers_forms(tmp / "embeddings", {"bp_train_step": str(step)})


def _append_hashes(out_dir: Path, files: Dict[str, Dict[str, Any]]) -> None:
    path = out_dir / "hashes.json"
    table = read_json_object(path) or {}
    for rec in files.values():
        table[os.path.basename(rec["path"])] = {k: v for k, v in rec.items() if k != "path"}
    atomic_write_text(path, json.dumps(table, indent=1, sort_keys=True))
