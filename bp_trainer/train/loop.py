"""The training loop of one process (naifu's trainer shape, read top to bottom like diffusers'
`train_text_to_image.py`):

    loop = TrainLoop(cfg, run_dir, accelerator, events, stop)
    loop.setup(resume=...)     models -> data (buckets) -> optimizer / EMA -> accelerate's prepare -> cached
                               latents and texts encoded, VAE / cached text encoder off the GPU -> resume
    loop.run()                 for each epoch, for each bucketed batch: train_step(batch); after each optimizer
                               update: log, stop check, save() (with validate() when due), validate() when
                               due, sample(); at the end: save("end")

Run state lives in attributes: `step` (optimizer updates done), `epoch`, `batch_in_epoch` (batches of this
epoch this process has consumed). `train_step(batch)` is the forward + backward of one batch, callable on its
own (benchmarks and the memory estimate run it); `update()` is the optimizer step.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from typing import Any, Dict, List, Optional, Tuple

import torch

from bp_trainer.buckets import training_buckets
from bp_trainer.errors import BPError
from bp_trainer.fsutil import remove_stale_partials, write_errors
from bp_trainer.rundir import RunDir
from bp_trainer.train import data as data_mod
from bp_trainer.train import state as state_mod
from bp_trainer.train.config import RunConfig
from bp_trainer.train.family import TrainModels, family_for
from bp_trainer.train.loss import diffusion_loss, lr_factor
from bp_trainer.train.validation import BestTracker, Validator


class NonFiniteLoss(BPError):
    """The loss became NaN or infinite: the run stops before anything is saved from it."""


class TrainLoop:
    tag_embeddings: Any = None  # the run's tag embeddings (config `embeddings:`; bp_trainer/train/tag_embeddings.py)
    cache: Any = None  # the latent cache (config `latents:`; bp_trainer/train/latents.py)
    text_cache: Any = None  # the frozen text encoder's outputs (config `text_cache:`; bp_trainer/train/text_cache.py)
    offloaded: Tuple[str, ...] = ()  # the frozen parts moved off the GPU once their outputs were cached

    def __init__(self, cfg: RunConfig, run_dir: "RunDir | str", accelerator: Any, events: Any, stop: Any, *,
                 progress: Any = None):
        self.cfg, self.rd, self.acc, self.events, self.stop = cfg, RunDir(run_dir), accelerator, events, stop
        self.progress = progress
        self.family = family_for(cfg.model)
        self.main = accelerator.is_main_process
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.device = accelerator.device
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.resumed_from: Optional[int] = None
        self.saved_at = -1
        self.last_files: Optional[Dict[str, Any]] = None
        self._saved_files: Optional[Dict[str, Any]] = None  # the outputs of the save at `saved_at` (None: none)
        self.loss = float("nan")
        self.skipped_updates = 0
        self._group_losses: List[torch.Tensor] = []
        self._sampled = (-1, False)  # (step, with checkpoint files)
        self._record: Any = None
        self._window = (time.perf_counter(), 0, 0)  # (start, images, updates) since the last step event
        self._step_times: List[float] = []
        self.memory_plan: Optional[Dict[str, Any]] = None
        self.validator: Optional[Validator] = None
        self.best = BestTracker()  # the validation watch (saved in the state)
        self._validated = -1  # the step validated last
        self._early_stop = False  # the validation loss stopped improving for early_stop_patience evaluations
        self.end_reason = "stopped"  # why run() ends before the last step: stopped | early_stopped

    def warn(self, message: str) -> None:
        self.events.emit("warning", message=message)

    # ------------------------------------------------------------------------------------------ setup

    def setup(self, resume: bool = False) -> None:
        torch.manual_seed(self.cfg.training.seed)
        self._setup_models()
        self._setup_data()
        self._setup_embeddings()
        self._setup_optimizer()
        self.prepare()
        self.generator = torch.Generator("cpu").manual_seed(int(self.cfg.training.seed) * 7919 + self.rank)
        if resume:
            self._resume()

    def _setup_models(self) -> None:
        self.configure_models(self.family.load(self.cfg.model))

    def configure_models(self, m: TrainModels) -> None:
        """Precision, trainable parts, attention, checkpointing and devices of loaded (or, for the memory
        estimate, empty) models."""
        t = self.cfg.training
        self.models = m
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.acc.mixed_precision,
                                                                                torch.float32)
        self.clip_skip = self.family.clip_skip(int(self.cfg.model.clip_skip), m, self.warn)
        self.train_te = bool(t.train_text_encoder)
        # the frozen parts' full-precision weights, as loaded: saves read these, never the cast training copies
        self.frozen_originals = {"vae": {k: v.detach() for k, v in m.vae.state_dict().items()}}
        if not self.train_te:
            self.frozen_originals["text_encoder"] = {k: v.detach() for k, v in m.text_encoder.state_dict().items()}
        m.vae.requires_grad_(False)
        m.text_encoder.requires_grad_(self.train_te)
        m.unet.requires_grad_(True)
        m.unet.train()
        if t.attention == "default":
            from diffusers.models.attention_processor import AttnProcessor

            m.unet.set_attn_processor(AttnProcessor())
            if max(w * h for w, h in training_buckets(self.cfg.arb)) >= 1024 * 1024:
                self.warn("training.attention: default materialises the full attention matrix: at 1024 buckets "
                          "that is several GiB per layer; sdpa computes the same without it")
        if t.gradient_checkpointing:
            m.unet.enable_gradient_checkpointing()  # diffusers passes use_reentrant=False itself
            if self.train_te:  # explicit: transformers 4.x defaults to the reentrant variant, 5.x does not
                m.text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.vae.enable_slicing()  # encode a batch image by image: same latents, a fraction of the activations
        m.vae.to(self.device, dtype=self.weight_dtype if self.weight_dtype != torch.float16 else torch.float32)
        if self.train_te:
            self._freeze_skipped_layers(m.text_encoder)
            m.text_encoder.train()
        else:
            m.text_encoder.to(self.device, dtype=self.weight_dtype)
            m.text_encoder.eval()

    def _freeze_skipped_layers(self, text_encoder: Any) -> None:
        """With clip skip N the last N-1 CLIP layers never reach the loss: freeze them, so DDP does not wait for
        gradients that never come (several GPUs crashed at step 2) and the optimizer holds no state for them."""
        layers = getattr(text_encoder, "text_model", text_encoder).encoder.layers  # transformers 5 flattened it
        for layer in list(layers)[len(layers) - (self.clip_skip - 1):] if self.clip_skip > 1 else []:
            layer.requires_grad_(False)

    def _setup_data(self) -> None:
        from bp_trainer.train.latents import LatentCache, vae_fingerprint

        cfg = self.cfg
        self.cache = None
        if cfg.latents.cache != "none":
            # default: shared by the runs in runs_dir (keys cover image, bucket, crop and VAE, so sharing is safe)
            cache_dir = cfg.latents.dir or str(RunDir(cfg.run.runs_dir).path / "latent_cache")
            self.cache = LatentCache(cfg.latents.cache, cache_dir, vae_fingerprint(self.models.vae))
        self.data = data_mod.build_data(cfg, rank=self.rank, world_size=self.world, cache=self.cache,
                                        warn=self.warn if self.main else None,
                                        pin_memory=self.device.type == "cuda")
        self.sampler, self.loader, self.dataset = self.data["sampler"], self.data["loader"], self.data["dataset"]
        held_out = self.data["validation"]
        if held_out is not None:
            self.validator = Validator(held_out.images, seed=cfg.validation.seed, timesteps=cfg.validation.timesteps,
                                       rank=self.rank, world_size=self.world)
        self.accum = int(cfg.training.gradient_accumulation)
        self.batches_per_epoch = len(self.sampler)
        self.updates_per_epoch = updates_per_epoch = math.ceil(self.batches_per_epoch / self.accum)
        if cfg.training.max_steps:
            self.total_steps = int(cfg.training.max_steps)
            self.num_epochs = math.ceil(self.total_steps / updates_per_epoch)
        else:
            self.num_epochs = int(cfg.training.epochs)
            self.total_steps = self.num_epochs * updates_per_epoch

    def _setup_embeddings(self) -> None:
        from bp_trainer.train.tag_embeddings import setup_for_run

        captions = [item.caption for item in self.data["scan"].items]
        self.tag_embeddings = setup_for_run(self.cfg, self.models, captions, originals=self.frozen_originals,
                                            device=self.device, accelerator=self.acc, warn=self.warn)

    def _setup_optimizer(self) -> None:
        from bp_trainer.train.ema import EMA
        from bp_trainer.train.optim import build_optimizer, check_available
        from bp_trainer.train.optim_spec import spec_of

        t, m = self.cfg.training, self.models
        spec = spec_of(t)
        problem = check_available(spec, self.device.type)  # e.g. bitsandbytes missing: said, never replaced
        if problem:
            raise BPError(problem)
        self.ema = None
        if self.cfg.ema.enabled and self.main:  # only the main process saves and samples it: no copy elsewhere
            self.ema = EMA(m.unet, decay=self.cfg.ema.decay,  # from the fp32 weights, before any bf16 cast
                           device="cpu" if self.cfg.ema.device == "cpu" else self.device)
        m.unet.to(self.device, dtype=torch.bfloat16 if t.weights == "bf16" else torch.float32)
        if self.train_te:
            m.text_encoder.to(self.device)
        groups = [{"params": [p for p in m.unet.parameters() if p.requires_grad], "lr": t.learning_rate,
                   "base_lr": t.learning_rate}]
        if self.train_te:
            te_lr = t.text_encoder_lr if t.text_encoder_lr is not None else t.learning_rate
            groups.append({"params": [p for p in m.text_encoder.parameters() if p.requires_grad], "lr": te_lr,
                           "base_lr": te_lr})
        if self.tag_embeddings is not None:
            groups.append(self.tag_embeddings.param_group(float(self.cfg.embeddings.lr)))
        # built after the model is on its device: fused AdamW on a GPU (torch 2.1 refuses it for CPU parameters)
        self.optimizer = build_optimizer(groups, spec, self.device)
        _configure_deepspeed(self.acc, int(t.batch_size), self.accum)
        if self.train_te:
            self.unet, self.text_encoder, self.optimizer = self.acc.prepare(m.unet, m.text_encoder, self.optimizer)
        else:
            self.unet, self.optimizer = self.acc.prepare(m.unet, self.optimizer)
            self.text_encoder = m.text_encoder
        self.raw_unet = self.acc.unwrap_model(self.unet)

    def prepare(self) -> None:
        """Encode what the steps would otherwise ask the VAE and a cached text encoder for (every latent, every
        caption variant, the validation images), then move those parts off the GPU (`prepare.py`)."""
        from bp_trainer.train import prepare as prep

        if self.cfg.text_cache.enabled:
            self.text_cache = prep.build_text_cache(self)
            prep.fill_text(self, self.text_cache)
        if self.cache is not None:
            prep.fill_latents(self)
        if self.validator is not None:
            self.validator.prepare(self)
        self.offloaded = prep.offload_frozen(self)

    def _resume(self) -> None:
        if self.main:  # temporary files of writes a kill cut short (checkpoints, samples, hashes)
            for folder in (self.rd.checkpoints, self.rd.samples, self.rd.path):
                remove_stale_partials(folder)
        latest = state_mod.latest_state(self.rd)
        if latest is None:
            self.warn("no saved state to resume from; starting from step 0")
            return
        if self.tag_embeddings is not None:
            self.tag_embeddings.load_state(latest)
        trainer_state = state_mod.load_state(self.acc, latest, ema=self.ema, generator=self.generator)
        self.step = int(trainer_state["step"])
        samplers = trainer_state.get("samplers") or [trainer_state["sampler"]]
        self.sampler.load_state_dict(samplers[self.rank] if self.rank < len(samplers) else samplers[0])
        self.epoch, self.batch_in_epoch = self.sampler.epoch, self.sampler.state_dict()["position"]
        self.skipped_updates = int(trainer_state.get("skipped_updates", 0))
        self.best = BestTracker.from_dict(trainer_state.get("validation"))
        self.resumed_from = self.saved_at = self.step  # a resumed state was saved at its step

    # ------------------------------------------------------------------------------------------ one step

    def latents_for(self, batch: Dict[str, Any]) -> torch.Tensor:
        """The batch's latents: from the cache, or encoded by the VAE (and cached)."""
        from bp_trainer.train.latents import LatentCache, encode

        cache, keys, pixels = self.cache, batch["cache_key"], batch["pixels"]
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
            gens = [LatentCache.generator_for(keys[i]) if cache is not None else self.generator for i in todo]
            with torch.no_grad():
                lat = encode(self.models.vae, px, gens, float(self.models.vae.config.scaling_factor))
            for j, i in enumerate(todo):
                out[i] = lat[j]
                if cache is not None and keys[i] is not None:
                    cache.put(keys[i], lat[j])
        return torch.stack([o.to(self.device, non_blocking=True) for o in out]).float()  # type: ignore[union-attr]

    def condition(self, captions: List[str]) -> torch.Tensor:
        if self.text_cache is not None:
            return self.text_cache.conditioning(captions, self.device)
        emb = self.tag_embeddings
        train_emb = emb is not None and emb.set_trainable(self.step, int(self.cfg.embeddings.train_steps))
        ctx = contextlib.nullcontext() if self.train_te or train_emb else torch.no_grad()
        with ctx:
            return self.family.encode_text(self.models, captions, clip_skip=self.clip_skip,
                                           max_chunks=int(self.cfg.dataset.max_chunks),
                                           text_encoder=self.text_encoder, embeddings=emb)

    def train_step(self, batch: Dict[str, Any], *, loss_scale: float = 1.0) -> torch.Tensor:
        """Forward and backward of one batch (gradients accumulate); returns the loss as a device tensor."""
        t = self.cfg.training
        latents = self.latents_for(batch)
        with self.acc.autocast():
            cond = self.condition(batch["caption"])
            loss = diffusion_loss(self.unet, self.models.noise_scheduler, latents, cond, self.generator,
                                  noise_offset=float(t.noise_offset), min_snr_gamma=t.min_snr_gamma,
                                  v_prediction=self.models.v_prediction)
        self.acc.backward(loss * loss_scale)
        return loss.detach()

    def set_lr(self) -> None:
        """The learning rate of the coming update (diffusers' schedule at the current step)."""
        t = self.cfg.training
        factor = lr_factor(self.step, schedule=t.lr_scheduler, warmup=int(t.lr_warmup_steps), total=self.total_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor

    def update(self) -> bool:
        """One optimizer update with the accumulated gradients; False when the fp16 grad scaler skipped it (an
        overflow): then neither the step counter, the LR schedule nor the EMA advance."""
        t = self.cfg.training
        if self.tag_embeddings is not None:
            self.tag_embeddings.sync_grads(self.acc)
        if t.max_grad_norm > 0:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            self.acc.clip_grad_norm_(params, t.max_grad_norm)
        if self.ema is not None:
            self.ema.before_optimizer_step()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if getattr(self.optimizer, "step_was_skipped", False):
            self.skipped_updates += 1
            return False
        self.step += 1
        if self.ema is not None and self.step % int(self.cfg.ema.every_n_steps) == 0:
            self.ema.update(self.raw_unet)
        return True

    # ------------------------------------------------------------------------------------------ the run

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps or self.epoch >= self.num_epochs

    def run(self) -> Dict[str, Any]:
        self._emit_start()
        reason = "finished"
        try:
            if self.cfg.logging.record_batches:
                self._record = open(self.rd.batches(self.rank), "a", encoding="utf-8")
            while not self.finished:
                if self._run_epoch():
                    reason = self.end_reason
                    break
                if not self.finished:
                    self.epoch += 1
            if reason == "finished" and self.saved_at != self.step:
                at_end = bool(self.cfg.saving.at_end)
                self.save("end", outputs=at_end, validate=self.cfg.validation.due(self.step, at_end))
                if self.cfg.sampling.due(self.step, bool(self.cfg.saving.at_end)):
                    self.sample()
            self._write_final_record()
        finally:
            if self._record is not None:
                self._record.close()
            if self.progress is not None:
                self.progress.close()
        return self._emit_done(reason)

    def _run_epoch(self) -> bool:
        """Train the rest of the current epoch; True when a stop was requested (saved already)."""
        self.sampler.set_epoch(self.epoch)
        self.dataset.epoch = self.epoch
        self.batch_in_epoch = self.sampler.state_dict()["position"]
        for batch in self.loader:
            index = self.batch_in_epoch
            last_in_epoch = index + 1 >= self.batches_per_epoch
            group_size = min(self.accum, self.batches_per_epoch - (index - index % self.accum))
            sync = (index + 1) % self.accum == 0 or last_in_epoch
            self._record_batch(batch, index)
            self.set_lr()  # before backward: fused backward steps parameters during it
            no_sync = not sync and self.world > 1
            with self._no_sync() if no_sync else contextlib.nullcontext():
                self._group_losses.append(self.train_step(batch, loss_scale=1.0 / group_size))
            self.batch_in_epoch = index + 1
            start, images, updates = self._window
            self._window = (start, images + len(batch["index"]) * self.world, updates)
            if not sync:
                continue
            self._check_loss()  # before the update: a NaN/inf loss never reaches the weights
            if not self.update():
                self._group_losses = []
                self.warn(f"fp16 overflow: update skipped (the grad scaler lowered its scale; "
                          f"{self.skipped_updates} skipped so far)")
                continue
            if self._after_update():
                return True
            if self.step >= self.total_steps:
                return False
        every = int(self.cfg.saving.every_n_epochs)
        if every and (self.epoch + 1) % every == 0 and self.step < self.total_steps and self.saved_at != self.step:
            self.batch_in_epoch = self.batches_per_epoch
            self.save("every_n_epochs", outputs=True, validate=self.cfg.validation.due(self.step, True))
            if self.cfg.sampling.due(self.step, True):
                self.sample()
        return self._stop_early()

    def _no_sync(self) -> Any:
        models = [self.unet] + ([self.text_encoder] if self.train_te else [])
        return self.acc.no_sync(*models) if len(models) > 1 else self.acc.no_sync(self.unet)

    def _after_update(self) -> bool:
        """Events, stop check, periodic save, validation and samples; True when stopping (saved)."""
        self._log_step()
        v = self.cfg.validation
        if self.stop.requested(self.acc):  # validated when an uninterrupted run would validate at this step
            self.save(f"stop ({self.stop.reason()})", outputs=bool(self.cfg.saving.on_stop),
                      validate=v.due(self.step, self._save_due()))
            return True
        s = self.cfg.saving
        saved = False
        if s.every_n_steps and self.step % int(s.every_n_steps) == 0 and self.step < self.total_steps:
            self.save("every_n_steps", outputs=True, validate=v.due(self.step, True))
            saved = True
        elif v.due(self.step, False) and self.step < self.total_steps:
            self.validate()
        if self.cfg.sampling.due(self.step, saved) and self.step < self.total_steps:
            self.sample()
        return self._stop_early()

    def _save_due(self) -> bool:
        """Whether an uninterrupted run saves its outputs at this step (every N steps or epochs, or at the end)."""
        s = self.cfg.saving
        if self.step >= self.total_steps:
            return bool(s.at_end)
        if s.every_n_steps and self.step % int(s.every_n_steps) == 0:
            return True
        epoch_done = self.batch_in_epoch >= self.batches_per_epoch
        return bool(epoch_done and s.every_n_epochs and (self.epoch + 1) % int(s.every_n_epochs) == 0)

    def _stop_early(self) -> bool:
        """When the validation loss stopped improving (early_stop_patience): save (if not saved at this step),
        sample, and end the run; True then."""
        if not self._early_stop:
            return False
        if self.saved_at != self.step:
            self.save("early stop", outputs=True)
            if self.cfg.sampling.due(self.step, True):
                self.sample()
        self.end_reason = "early_stopped"
        return True

    def _check_loss(self) -> None:
        """The mean loss of the coming update (all processes); a NaN/inf loss stops the run before the update and
        before any save. One host sync per optimizer update (none per micro-batch)."""
        loss = torch.stack(self._group_losses).float().mean()
        self._group_losses = []
        if self.world > 1:
            loss = self.acc.reduce(loss.reshape(1), "mean")[0]
        self.loss = float(loss.item())
        if not math.isfinite(self.loss):
            raise NonFiniteLoss(f"the loss became {self.loss} at step {self.step + 1}; that update was not applied and "
                                f"nothing was saved from it: the last saved state (step {max(self.saved_at, 0)}) "
                                "stays resumable",
                                hint="lower training.learning_rate (or use bf16/fp32 instead of fp16) and resume")

    def _log_step(self) -> None:
        now = time.perf_counter()
        start, images, updates = self._window
        updates += 1
        lr = self.optimizer.param_groups[0]["lr"]
        if self.progress is not None:
            self.progress.update(self.loss, lr)
        if self.step % int(self.cfg.logging.every_n_steps) == 0 or self.step == self.total_steps:
            elapsed = now - start
            ips = images / elapsed if elapsed > 0 else 0.0
            self._step_times.append(elapsed / max(updates, 1))
            per_step = sum(self._step_times[-20:]) / len(self._step_times[-20:])
            self.events.emit("step", step=self.step, epoch=self.epoch, loss=self.loss, lr=lr,
                             images_per_second=ips, eta_seconds=round(per_step * (self.total_steps - self.step), 1),
                             total_steps=self.total_steps, skipped_updates=self.skipped_updates)
            self.acc.log({"loss": self.loss, "lr": lr, "images_per_second": ips}, step=self.step)
            self._window = (now, 0, 0)
        else:
            self._window = (start, images, updates)

    # ------------------------------------------------------------------------------------------ save / sample

    def save(self, reason: str, *, outputs: bool, validate: bool = False) -> Optional[Dict[str, Any]]:
        """The resumable state (always) and, with `outputs`, the checkpoints and tag embeddings; every process calls
        it. With `validate`, the validation runs between the two (so the state holds its result)."""
        files, emb = None, self.tag_embeddings
        embedding_files = None
        self.acc.wait_for_everyone()
        if outputs and self.main:
            files = self._write_outputs()
            if emb is not None:
                embedding_files = emb.export(self.rd, metadata=emb.save_metadata(self.step, self.epoch,
                                                                                  files.get("webui")))
        if validate:
            self.validate(files)
        mine = self.sampler.state_dict()
        mine["epoch"], mine["position"] = self.epoch, self.batch_in_epoch
        if self.batch_in_epoch >= self.batches_per_epoch:
            mine["epoch"], mine["position"] = self.epoch + 1, 0
        gathered = _gather_objects(self.acc, mine)
        trainer_state = {"step": self.step, "epoch": mine["epoch"], "sampler": gathered[0], "samplers": gathered,
                         "world_size": self.world, "reason": reason, "skipped_updates": self.skipped_updates,
                         "validation": self.best.to_dict()}
        with write_errors(self.rd.state_dir):  # a full disk is a one-line error; the last complete state stays
            path = state_mod.save_state(self.acc, self.rd, step=self.step, trainer=trainer_state, ema=self.ema,
                                        generator=self.generator, keep=int(self.cfg.saving.keep_states),
                                        embeddings=emb)
        self.events.emit("checkpoint", step=self.step, epoch=self.epoch, reason=reason, files=files or {},
                         state=str(path), **({"embeddings": embedding_files} if embedding_files else {}))
        self.saved_at = self.step
        if files:
            self.last_files = files
        self._saved_files = files
        return files

    def _write_outputs(self, stem: Optional[str] = None) -> Dict[str, Any]:
        from bp_trainer.train.saving import save_outputs

        return save_outputs(cfg=self.cfg, family=self.family, run_dir=self.rd, step=self.step, epoch=self.epoch,
                            unet=self.raw_unet, models=self.models,
                            text_encoder=self.acc.unwrap_model(self.text_encoder), ema=self.ema,
                            frozen=self.frozen_originals, stem=stem, embeddings=self.tag_embeddings)

    def validate(self, files: Optional[Dict[str, Any]] = None) -> None:
        """The validation loss of the trained (and EMA) weights at this step (once per step; every process calls
        it): a `validation` event, TensorBoard scalars, the best checkpoint kept (`saving.keep_best`; `files`:
        the outputs saved at this step), and the early-stop check."""
        from bp_trainer.train.saving import keep_best

        if self.validator is None or self._validated == self.step:
            return
        self._validated = self.step
        result = self.validator.run(self, ema=bool(self.cfg.ema.enabled))
        metric = "ema_loss" if result.ema_loss is not None and self.cfg.saving.main_unet == "ema" else "loss"
        self.best = self.best.after(self.step, getattr(result, metric))
        improved = self.best.best_step == self.step
        best_files = None
        if improved and self.cfg.saving.keep_best and self.main:
            best_files = keep_best(files, cfg=self.cfg, run_dir=self.rd, step=self.step, write=self._write_outputs)
        self._early_stop = self.best.patience_exhausted(int(self.cfg.validation.early_stop_patience))
        self.events.emit("validation", step=self.step, epoch=self.epoch, metric=metric, **result.to_event(),
                         improved=improved, **self.best.to_dict(), best_files=best_files,
                         early_stop=self._early_stop)
        self.acc.log(result.scalars(), step=self.step)
        self.acc.wait_for_everyone()

    def sample(self) -> None:
        """Sample the prompts with the trained (and EMA) weights; once per step (again only to add the Model hash
        of a checkpoint saved at the same step)."""
        from bp_trainer.train import sampling
        from bp_trainer.train.prepare import frozen_on_device

        files = self._saved_files if self.saved_at == self.step else None
        if self._sampled[0] == self.step and (self._sampled[1] or not files):
            return
        self._sampled = (self.step, bool(files))
        self.acc.wait_for_everyone()
        if self.main:
            with frozen_on_device(self):
                sampling.sample_run(self, files)
        self.acc.wait_for_everyone()

    # ------------------------------------------------------------------------------------------ events

    def _emit_start(self) -> None:
        self.acc.init_trackers("bp_train")
        self.events.emit("start", run_dir=str(self.rd.path), world_size=self.world, total_steps=self.total_steps,
                         epochs=self.num_epochs, steps_per_epoch=self.updates_per_epoch,
                         max_steps=int(self.cfg.training.max_steps or 0), images=self.data["images"],
                         buckets=[list(b) for b in self.data["buckets"]], batches_per_epoch=self.batches_per_epoch,
                         resumed_from_step=self.resumed_from, prediction_type=self.models.prediction_type,
                         options={k: getattr(self.cfg.training, k) for k in (
                             "optimizer", "fused_backward", "weights", "gradient_checkpointing", "memory")},
                         memory_plan=self.memory_plan, off_gpu=list(self.offloaded),
                         text_cache={"mode": self.cfg.text_cache.mode, "variants": int(self.cfg.text_cache.variants)}
                         if self.text_cache is not None else None,
                         model=str(self.cfg.model.base), mixed_precision=self.acc.mixed_precision,
                         device=str(self.device),
                         validation_images=[im.key for im in self.validator.images] if self.validator else None,
                         **({"embeddings": [p.to_dict() for p in self.tag_embeddings.plans]}
                            if self.tag_embeddings is not None else {}))

    def _emit_done(self, reason: str) -> Dict[str, Any]:
        outputs = {k: v.get("path") for k, v in (self.last_files or {}).items()}
        cache = self.cache
        self.events.emit("done", step=self.step, epoch=self.epoch, reason=reason, outputs=outputs, loss=self.loss,
                         skipped_updates=self.skipped_updates,
                         latent_cache={"hits": cache.hits, "misses": cache.misses} if cache is not None else None)
        return {"reason": reason, "step": self.step, "outputs": outputs, "files": self.last_files or {}}

    def _record_batch(self, batch: Dict[str, Any], index: int) -> None:
        if self._record is not None:
            items = data_mod.describe_batches(self.data, batch["index"], self.cfg.dataset.path)
            self._record.write(json.dumps({"step": self.step, "epoch": self.epoch, "batch": index, "items": items,
                                           "size": list(batch["size"])}) + "\n")

    def _write_final_record(self) -> None:
        if self._record is not None:
            final = {"final": True, "step": self.step, "weights": weights_digest(self.raw_unet)}
            if self.tag_embeddings is not None:
                final["embeddings"] = weights_digest(self.tag_embeddings)
            self._record.write(json.dumps(final) + "\n")


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's parameters (to compare processes' weights bit for bit)."""
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        h.update(name.encode())
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _configure_deepspeed(accelerator: Any, batch_size: int, accum: int) -> None:
    """Under DeepSpeed (ZeRO-2 from the user's accelerate config) tell it the per-GPU batch size; our batches
    come from the bucket sampler, not a prepared DataLoader it could read it from."""
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
