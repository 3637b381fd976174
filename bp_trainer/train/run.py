"""The training flow, top to bottom (in the spirit of diffusers' `train_text_to_image.py`).

    accelerator -> events -> models -> data (buckets) -> optimizer / EMA -> prepare -> resume
    -> for each epoch, for each bucketed batch: latents, noise, UNet loss, backward, step, EMA,
       events/TensorBoard, save (outputs + resumable state), samples, stop check
    -> final save -> `done`

Run it with `accelerate launch -m bp_trainer.train RUN.yaml` (any accelerate config: several GPUs,
machines, DeepSpeed) or through `python -m bp_trainer train` (which launches that for you).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from bp_trainer.errors import BPError
from bp_trainer.train import data as data_mod
from bp_trainer.train import state as state_mod
from bp_trainer.train.events import EventWriter
from bp_trainer.train.models import encode_captions, load_base


def lr_at(step: int, *, base_lr: float, schedule: str, warmup: int, total: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then constant/cosine/linear decay."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant":
        return base_lr
    span = max(1, total - warmup)
    progress = min(1.0, max(0.0, (step - warmup) / span))
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return base_lr * (1.0 - progress)


def snr_weights(noise_scheduler: Any, timesteps: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma)/SNR, or /(SNR+1) for v-prediction."""
    alphas = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas / (1.0 - alphas)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    return clipped / (snr + 1.0) if v_prediction else clipped / snr


def diffusion_loss(unet: Any, noise_scheduler: Any, latents: torch.Tensor, cond: torch.Tensor,
                   generator: torch.Generator, *, noise_offset: float, min_snr_gamma: Optional[float],
                   v_prediction: bool) -> torch.Tensor:
    """One denoising loss: noise and timesteps drawn from `generator` (CPU, so the same on any device)."""
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator)
    if noise_offset:
        noise += noise_offset * torch.randn((b, latents.shape[1], 1, 1), generator=generator)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=generator)
    noise, timesteps = noise.to(latents.device), timesteps.to(latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    target = noise_scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise
    pred = unet(noisy, timesteps, cond).sample
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma:
        loss = loss * snr_weights(noise_scheduler, timesteps, min_snr_gamma, v_prediction)
    return loss.mean()


def effective_clip_skip(clip_skip: int, text_encoder: Any, warn: Callable[[str], None]) -> int:
    """The WebUI applies Clip skip to SD 1.x's CLIP only. For SD 2.x (OpenCLIP, width 1024) it ignores the
    setting: the model already conditions on OpenCLIP's penultimate layer, which is the last layer of the
    diffusers text encoder. Train as the WebUI will generate."""
    if clip_skip > 1 and int(getattr(text_encoder.config, "hidden_size", 768)) == 1024:
        warn(f"SD 2.x model: the WebUI ignores Clip skip for OpenCLIP, so model.clip_skip {clip_skip} is "
             "treated as 1 (the penultimate OpenCLIP layer, as SD 2.x was trained)")
        return 1
    return clip_skip


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's parameters (to compare processes' weights bit for bit)."""
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        h.update(name.encode())
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _make_optimizer(params: List[Dict[str, Any]], t: Dict[str, Any], warn: Callable[[str], None]) -> Any:
    kwargs = dict(betas=(t["adam_beta1"], t["adam_beta2"]), eps=t["adam_epsilon"], weight_decay=t["weight_decay"])
    if t["optimizer"] == "adamw8bit":
        try:
            import bitsandbytes as bnb  # type: ignore[import-not-found]

            return bnb.optim.AdamW8bit(params, **kwargs)
        except Exception as exc:  # noqa: BLE001 - missing or broken bitsandbytes: plain AdamW
            warn(f"8-bit AdamW unavailable ({type(exc).__name__}: {exc}); using torch AdamW")
    return torch.optim.AdamW(params, **kwargs)


class _Progress:
    """tqdm in a terminal (main process), nothing otherwise."""

    def __init__(self, enabled: bool, total: int, initial: int):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, loss: float, lr: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            self.bar.update(1)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(cfg: Dict[str, Any], run_dir: "str | os.PathLike[str]", *, resume: bool = False,
          on_event: Optional[Callable[[Dict[str, Any]], None]] = None, install_signals: bool = True) -> Dict[str, Any]:
    """Run (or resume) one training run in RUN_DIR; returns {"reason", "step", "outputs"}."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from bp_trainer.launcher import resolve_mixed_precision

    run_dir = Path(run_dir)
    t, lg = cfg["training"], cfg["logging"]
    log_with = None
    if lg["tensorboard"]:
        try:
            import tensorboard  # noqa: F401

            log_with = "tensorboard"
        except ImportError:
            log_with = None
    mixed = resolve_mixed_precision(t["mixed_precision"], not torch.cuda.is_available())  # fp16 needs a GPU
    accelerator = Accelerator(mixed_precision=mixed, log_with=log_with,
                              project_config=ProjectConfiguration(project_dir=str(run_dir),
                                                                  logging_dir=str(run_dir / "logs")))
    main = accelerator.is_main_process
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    tty = sys.stderr.isatty()
    bar_setting = lg["progress_bar"]
    use_bar = main and (bar_setting == "true" or (bar_setting == "auto" and tty))
    events = EventWriter(run_dir, enabled=main, echo="human" if use_bar else ("json" if main else "none"))
    if on_event is not None and main:
        events.listeners.append(on_event)
    warn = lambda msg: events.emit("warning", message=msg)  # noqa: E731
    if t["mixed_precision"] == "fp16" and mixed == "no":
        warn("mixed precision fp16 needs a GPU; training in fp32")
    lock_owned = False
    pid_file = run_dir / "trainer.pid"
    if main:
        from bp_trainer import launcher
        from bp_trainer.fsutil import atomic_write_text

        lock = launcher.read_lock(run_dir)
        if lock is None or not launcher.pid_alive(int(lock.get("pid", 0))):
            launcher.write_lock(run_dir, os.getpid(), command=sys.argv)  # started without our launcher
            lock_owned = True
        atomic_write_text(pid_file, str(os.getpid()))
    stop = state_mod.StopFlag(run_dir, install_signals=install_signals)
    try:
        return _train(cfg, run_dir, accelerator, events, stop, warn, resume, use_bar)
    except BaseException as exc:
        msg = str(exc) if isinstance(exc, BPError) else f"{type(exc).__name__}: {exc}"
        if isinstance(exc, KeyboardInterrupt):
            msg = "aborted (second interrupt); the last complete state is kept"
        events.emit("error", message=msg)
        raise
    finally:
        stop.restore()
        accelerator.end_training()
        events.close()
        if main:
            pid_file.unlink(missing_ok=True)
        if lock_owned:
            (run_dir / "run.lock").unlink(missing_ok=True)


def _train(cfg: Dict[str, Any], run_dir: Path, accelerator: Any, events: EventWriter, stop: Any, warn: Any,
           resume: bool, use_bar: bool) -> Dict[str, Any]:
    from bp_trainer.train.ema import EMA
    from bp_trainer.train.latents import LatentCache, encode, vae_fingerprint
    from bp_trainer.train.saving import save_outputs
    from bp_trainer.train import sampling

    t, s, e_cfg, lg, d = cfg["training"], cfg["saving"], cfg["ema"], cfg["logging"], cfg["dataset"]
    main = accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    torch.manual_seed(t["seed"])
    from bp_trainer.train.config import save_config

    if main and not (run_dir / "config.yaml").exists():
        save_config(cfg, run_dir / "config.yaml")

    # ---- models
    m = load_base(cfg)
    unet, vae, text_encoder, tokenizer = m["unet"], m["vae"], m["text_encoder"], m["tokenizer"]
    noise_scheduler, v_pred = m["noise_scheduler"], m["prediction_type"] == "v_prediction"
    scheduler_config = dict(m["scheduler_config"], prediction_type=m["prediction_type"])
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    clip_skip = effective_clip_skip(int(cfg["model"]["clip_skip"]), text_encoder, warn)
    vae.requires_grad_(False)
    train_te = bool(t["train_text_encoder"])
    text_encoder.requires_grad_(train_te)
    unet.requires_grad_(True)
    unet.train()
    if t["attention"] == "default":
        from diffusers.models.attention_processor import AttnProcessor

        unet.set_attn_processor(AttnProcessor())
    if t["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()
        if train_te:
            text_encoder.gradient_checkpointing_enable()
    vae.to(device, dtype=weight_dtype if weight_dtype != torch.float16 else torch.float32)
    if not train_te:
        text_encoder.to(device, dtype=weight_dtype)
        text_encoder.eval()
    else:
        text_encoder.train()

    # ---- data
    cache = None
    if cfg["latents"]["cache"] != "none":
        # default: shared by the runs in runs_dir (keys cover image, bucket, crop and VAE, so sharing is safe)
        cache_dir = cfg["latents"]["dir"] or str(Path(cfg["run"]["runs_dir"]) / "latent_cache")
        cache = LatentCache(cfg["latents"]["cache"], cache_dir, vae_fingerprint(vae))
    data = data_mod.build_data(cfg, rank=rank, world_size=world, cache=cache, warn=warn if main else None)
    sampler, loader, dataset = data["sampler"], data["loader"], data["dataset"]
    accum = int(t["gradient_accumulation"])
    batches_per_epoch = len(sampler)
    updates_per_epoch = math.ceil(batches_per_epoch / accum)
    if t["max_steps"]:
        total_steps = int(t["max_steps"])
        num_epochs = math.ceil(total_steps / updates_per_epoch)
    else:
        num_epochs = int(t["epochs"])
        total_steps = num_epochs * updates_per_epoch

    # ---- optimizer, EMA, prepare
    groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": t["learning_rate"],
               "base_lr": t["learning_rate"]}]
    if train_te:
        te_lr = t["text_encoder_lr"] if t["text_encoder_lr"] is not None else t["learning_rate"]
        groups.append({"params": [p for p in text_encoder.parameters() if p.requires_grad], "lr": te_lr,
                       "base_lr": te_lr})
    optimizer = _make_optimizer(groups, t, warn)
    _configure_deepspeed(accelerator, int(t["batch_size"]), accum)
    ema = None
    if e_cfg["enabled"] and main:  # only the main process saves and samples it: no copy on the others
        ema_device = "cpu" if e_cfg["device"] == "cpu" else device
        ema = EMA(unet, decay=e_cfg["decay"], device=ema_device)
    if train_te:
        unet, text_encoder, optimizer = accelerator.prepare(unet, text_encoder, optimizer)
    else:
        unet, optimizer = accelerator.prepare(unet, optimizer)
    raw_unet = accelerator.unwrap_model(unet)
    generator = torch.Generator("cpu").manual_seed(int(t["seed"]) * 7919 + rank)

    # ---- resume
    step = 0
    start_epoch = 0
    consumed = 0
    resumed_from = None
    if resume:
        latest = state_mod.latest_state(run_dir)
        if latest is None:
            warn("no saved state to resume from; starting from step 0")
        else:
            trainer_state = state_mod.load_state(accelerator, latest, ema=ema, generator=generator)
            step = int(trainer_state["step"])
            samplers = trainer_state.get("samplers") or [trainer_state["sampler"]]
            sampler.load_state_dict(samplers[rank] if rank < len(samplers) else samplers[0])
            start_epoch, consumed = sampler.epoch, sampler.state_dict()["position"]
            resumed_from = step
    name = cfg["run"]["name"]
    images_total = data["images"]
    accelerator.init_trackers("bp_train")
    events.emit("start", run_dir=str(run_dir), world_size=world, total_steps=total_steps, epochs=num_epochs,
                steps_per_epoch=updates_per_epoch, max_steps=int(t["max_steps"] or 0), images=images_total,
                buckets=[list(b) for b in data["buckets"]], batches_per_epoch=batches_per_epoch,
                resumed_from_step=resumed_from, prediction_type=m["prediction_type"], model=str(cfg["model"]["base"]),
                mixed_precision=accelerator.mixed_precision, device=str(device))
    progress = _Progress(use_bar, total_steps, step)
    if use_bar:
        events.printer = progress.write
    record = None
    if lg.get("record_batches"):
        record = open(run_dir / f"batches-rank{rank}.jsonl", "a", encoding="utf-8")

    def cond_for(captions: List[str]) -> torch.Tensor:
        ctx = contextlib.nullcontext() if train_te else torch.no_grad()
        with ctx:
            return encode_captions(text_encoder, tokenizer, captions,
                                   clip_skip=clip_skip, max_chunks=int(d["max_chunks"]))

    def latents_for(batch: Dict[str, Any]) -> torch.Tensor:
        keys, pixels = batch["cache_key"], batch["pixels"]
        out: List[Optional[torch.Tensor]] = [None] * len(keys)
        todo = []
        for i, key in enumerate(keys):
            if cache is not None and key is not None and pixels[i] is None:
                out[i] = cache.get(key)
            if out[i] is None:
                todo.append(i)
        if todo:
            if any(pixels[i] is None for i in todo):  # cache entry vanished between load and use
                raise BPError("a cached latent disappeared during training", path=str(cache.dir if cache else ""),
                              hint="do not delete the latent cache while a run uses it")
            px = torch.stack([pixels[i] for i in todo])
            gens = [LatentCache.generator_for(keys[i]) if cache is not None else generator for i in todo]
            with torch.no_grad():
                lat = encode(vae, px, gens, float(vae.config.scaling_factor))
            for j, i in enumerate(todo):
                out[i] = lat[j]
                if cache is not None and keys[i] is not None:
                    cache.put(keys[i], lat[j])
        return torch.stack([o.to(device) for o in out]).float()  # type: ignore[union-attr]

    def do_save(epoch: int, reason: str, outputs: bool) -> Optional[Dict[str, Any]]:
        files = None
        accelerator.wait_for_everyone()
        if outputs and main:
            files = save_outputs(cfg=cfg, run_dir=run_dir, name=name, step=step, epoch=epoch, unet=raw_unet,
                                 vae=vae, text_encoder=accelerator.unwrap_model(text_encoder), ema=ema,
                                 tokenizer=tokenizer, scheduler_config=scheduler_config)
        mine = sampler.state_dict()
        mine["epoch"], mine["position"] = epoch, consumed_in_epoch
        if consumed_in_epoch >= batches_per_epoch:
            mine["epoch"], mine["position"] = epoch + 1, 0
        gathered = _gather_objects(accelerator, mine)
        trainer_state = {"step": step, "epoch": mine["epoch"], "sampler": gathered[0], "samplers": gathered,
                         "world_size": world, "reason": reason}
        path = state_mod.save_state(accelerator, run_dir, step=step, trainer=trainer_state, ema=ema,
                                    generator=generator, keep=int(s["keep_states"]))
        events.emit("checkpoint", step=step, epoch=epoch, reason=reason, files=files or {}, state=str(path))
        return files

    sampled: Dict[str, Any] = {"step": -1, "with_files": False}

    def do_sample(epoch: int, files: Optional[Dict[str, Any]]) -> None:
        # once per step (again only to add the Model hash of a checkpoint saved at the same step)
        if sampled["step"] == step and (sampled["with_files"] or not files):
            return
        sampled.update(step=step, with_files=bool(files))
        accelerator.wait_for_everyone()
        if main:
            w, h = sampling.sample_size(cfg)
            sc = cfg["sampling"]
            variants = [("trained", contextlib.nullcontext())]
            if ema is not None and sc["ema"]:
                variants.append(("ema", ema.swapped_into(raw_unet)))
            for kind, ctx in variants:
                with ctx:
                    extra = dict(sampling.model_hash_params(files) if kind == (s["main_unet"] if ema else "trained")
                                 else {}, **{"BP step": step, "BP weights": kind})
                    recs = sampling.sample(unet=raw_unet, vae=vae, text_encoder=accelerator.unwrap_model(text_encoder),
                                           tokenizer=tokenizer, scheduler_config=scheduler_config,
                                           prompts=sc["prompts"], negative_prompt=sc["negative_prompt"],
                                           steps=sc["steps"], cfg_scale=sc["cfg_scale"], seed=sc["seed"], width=w,
                                           height=h, clip_skip=clip_skip,
                                           max_chunks=int(d["max_chunks"]), out_dir=run_dir / "samples",
                                           stem=f"s{step:06d}-{kind}", extra=extra, autocast=accelerator.autocast)
                for r in recs:
                    events.emit("sample", step=step, epoch=epoch, path=r["path"], prompt=r["prompt"],
                                ema=kind == "ema", parameters=r["parameters"])
        accelerator.wait_for_everyone()

    # ---- the loop
    reason = "finished"
    last_files: Optional[Dict[str, Any]] = None
    window_start, window_images, window_steps = time.perf_counter(), 0, 0
    step_times: List[float] = []
    saved_at = step if resumed_from is not None else -1  # a resumed state was saved at its step
    consumed_in_epoch = consumed
    epoch = start_epoch
    loss_value = float("nan")
    stopped = False
    while epoch < num_epochs and step < total_steps and not stopped:
        sampler.set_epoch(epoch)
        dataset.epoch = epoch
        consumed_in_epoch = sampler.state_dict()["position"]
        micro = 0
        group_losses: List[float] = []
        for batch in loader:
            batch_index = consumed_in_epoch
            last_in_epoch = batch_index + 1 >= batches_per_epoch
            group_size = min(accum, batches_per_epoch - (batch_index - batch_index % accum))
            sync = (batch_index + 1) % accum == 0 or last_in_epoch
            if record is not None:
                record.write(json.dumps({"step": step, "epoch": epoch, "batch": batch_index,
                                         "items": data_mod.describe_batches(data, batch["index"], d["path"]),
                                         "size": list(batch["size"])}) + "\n")
            lat = latents_for(batch)
            ctx = contextlib.nullcontext() if sync or world == 1 else accelerator.no_sync(unet)
            with ctx:
                with accelerator.autocast():
                    cond = cond_for(batch["caption"])
                    loss = diffusion_loss(unet, noise_scheduler, lat, cond, generator,
                                          noise_offset=float(t["noise_offset"]), min_snr_gamma=t["min_snr_gamma"],
                                          v_prediction=v_pred)
                accelerator.backward(loss / group_size)
            group_losses.append(float(loss.detach().item()))
            consumed_in_epoch = batch_index + 1
            micro += 1
            window_images += len(batch["index"]) * world
            if not sync:
                continue
            lr = lr_at(step, base_lr=1.0, schedule=t["lr_scheduler"], warmup=int(t["lr_warmup_steps"]),
                       total=total_steps)
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * lr
            if t["max_grad_norm"] > 0:
                params = [p for g in optimizer.param_groups for p in g["params"]]
                accelerator.clip_grad_norm_(params, t["max_grad_norm"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if ema is not None and step % int(e_cfg["every_n_steps"]) == 0:
                ema.update(raw_unet)
            loss_value = sum(group_losses) / len(group_losses)
            group_losses = []
            if world > 1:
                loss_value = float(accelerator.reduce(torch.tensor([loss_value], device=device), "mean").item())
            window_steps += 1
            now = time.perf_counter()
            cur_lr = optimizer.param_groups[0]["lr"]
            progress.update(loss_value, cur_lr)
            if step % int(lg["every_n_steps"]) == 0 or step == total_steps:
                elapsed = now - window_start
                ips = window_images / elapsed if elapsed > 0 else 0.0
                step_times.append(elapsed / max(window_steps, 1))
                per_step = sum(step_times[-20:]) / len(step_times[-20:])
                events.emit("step", step=step, epoch=epoch, loss=loss_value, lr=cur_lr, images_per_second=ips,
                            eta_seconds=round(per_step * (total_steps - step), 1), total_steps=total_steps)
                accelerator.log({"loss": loss_value, "lr": cur_lr, "images_per_second": ips}, step=step)
                window_start, window_images, window_steps = now, 0, 0
            saved = False
            stopping = stop.requested(accelerator)
            if stopping:
                # the resumable state is always written; the outputs when saving.on_stop
                reason = "stopped"
                last_files = do_save(epoch, f"stop ({stop.reason()})", outputs=bool(s["on_stop"]))
                saved_at = step
                stopped = True
                break
            if s["every_n_steps"] and step % int(s["every_n_steps"]) == 0 and step < total_steps:
                last_files = do_save(epoch, "every_n_steps", outputs=True)
                saved_at, saved = step, True
            if sampling.should_sample(cfg, step, saved) and step < total_steps:
                do_sample(epoch, last_files if saved else None)
            if step >= total_steps:
                break
        else:
            # the epoch ran to its end
            if (s["every_n_epochs"] and (epoch + 1) % int(s["every_n_epochs"]) == 0 and step < total_steps
                    and saved_at != step):
                consumed_in_epoch = batches_per_epoch
                last_files = do_save(epoch, "every_n_epochs", outputs=True)
                saved_at = step
                if sampling.should_sample(cfg, step, True):
                    do_sample(epoch, last_files)
        if stopped or step >= total_steps:
            break
        epoch += 1
    if not stopped and saved_at != step:
        last_files = do_save(epoch, "end", outputs=bool(s["at_end"]))
        saved_at = step
        if sampling.should_sample(cfg, step, bool(s["at_end"])):
            do_sample(epoch, last_files)
    if record is not None:
        record.write(json.dumps({"final": True, "step": step, "weights": weights_digest(raw_unet)}) + "\n")
        record.close()
    progress.close()
    outputs = {k: v.get("path") for k, v in (last_files or {}).items()}
    events.emit("done", step=step, reason=reason, outputs=outputs, loss=loss_value,
                latent_cache={"hits": cache.hits, "misses": cache.misses} if cache is not None else None)
    return {"reason": reason, "step": step, "outputs": outputs, "files": last_files or {}}


def _configure_deepspeed(accelerator: Any, batch_size: int, accum: int) -> None:
    """Under DeepSpeed (ZeRO-2 from the user's accelerate config) tell it the per-GPU batch size; our
    batches come from the bucket sampler, not a prepared DataLoader it could read it from."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    if accum != 1:
        raise BPError("with DeepSpeed, set gradient_accumulation_steps in the DeepSpeed config",
                      hint="and keep training.gradient_accumulation at 1")
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size


def _gather_objects(accelerator: Any, obj: Any) -> List[Any]:
    if accelerator.num_processes == 1:
        return [obj]
    from accelerate.utils import gather_object

    return list(gather_object([obj]))
