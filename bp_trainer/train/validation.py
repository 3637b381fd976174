"""Validation: a held-out set, a deterministic validation loss, and the best-so-far watch (`validation:`).

**The held-out set.** With `validation.fraction`, the dataset's images are grouped by the bucket they train in;
each bucket holds out `round(fraction * n)` images, at least 1 (so every bucket size is represented) and at
most `n - 1` (so it still trains; a bucket of one image holds out none). Over `max_images`, every bucket keeps
one (largest buckets first) and the rest is shared in proportion. Inside a bucket the images are ranked by
`sha256("split:SEED:KEY")` and the first ones are held out. With `validation.path`, the images are a folder's
(with their captions) or a list file's (dataset images, one path per line, relative to `dataset.path`).
Held-out images are removed from the training items before anything else sees them.

**The fixed inputs of an image.** KEY is the image's path relative to its folder (`dataset.path`, or the
validation folder), '/'-separated; K = `validation.timesteps`, T = the schedule's train timesteps:

    g = torch.Generator("cpu").manual_seed(image_seed(SEED, KEY))      # sha256("SEED:KEY"), 63 bits
    u = torch.rand(K, generator=g, dtype=torch.float64)
    t = floor((arange(K) + u) * T / K)          # one timestep in each K-quantile of the schedule
    noise = torch.randn((K, C, h, w), generator=g)
    latent = VAE posterior mean of the centre crop into the image's bucket, times the scaling factor

**The loss of an image**: the UNet (eval mode, `torch.no_grad`, the training autocast) on the K noised copies
in one batch, with the caption as written (tag formatting applies; no shuffle, no dropout); per timestep the
mean squared error against the noise (or the velocity, for v-prediction) in fp32, averaged over the K
timesteps in float64. Unweighted: no min-SNR weighting, no offset noise. The validation loss is the mean over
the images (`math.fsum`, so the order does not matter), and per bucket the same over its images.

**Processes.** Each process computes the trained weights' losses of every `world_size`-th image; the EMA
(kept by the main process only) is computed there for all images. Every image's loss sits in its own slot of
one float64 vector that is all-reduced by sum: each slot gets exactly one non-zero term, so the result is the
same bit for bit on 1 or N processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, FrozenSet, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from bp_trainer.errors import BPError

Bucket = Tuple[int, int]


@dataclass(frozen=True)
class HeldOut:
    """One validation image."""

    key: str  # path relative to its folder, '/'-separated: the identity its noise is drawn from
    path: str
    caption: str  # as written (tag formatting applied, never shuffled or dropped)
    size: Bucket  # the bucket (w, h) it is validated at


@dataclass(frozen=True)
class ValidationSet:
    images: Tuple[HeldOut, ...]  # sorted by (bucket, key)
    excluded: FrozenSet[str]  # real paths taken out of the training items

    def keys(self) -> List[str]:
        return [im.key for im in self.images]


# ------------------------------------------------------------------------------------------------ the split


def image_seed(seed: int, key: str) -> int:
    """The seed of an image's fixed noise and timesteps: 63 bits of sha256("SEED:KEY")."""
    digest = hashlib.sha256(f"{int(seed)}:{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def _rank(seed: int, key: str) -> bytes:
    return hashlib.sha256(f"split:{int(seed)}:{key}".encode("utf-8")).digest()


def bucket_quotas(counts: Mapping[Bucket, int], fraction: float, max_images: int, *,
                  leave_one: bool = True) -> Dict[Bucket, int]:
    """Held-out images per bucket (see the module doc). `leave_one`: every bucket keeps one image to train."""
    caps = {b: n - 1 if leave_one else n for b, n in counts.items()}
    eligible = sorted((b for b in counts if caps[b] >= 1), key=lambda b: (-counts[b], b))
    want = {b: min(caps[b], max(1, math.floor(fraction * counts[b] + 0.5))) for b in eligible}
    if sum(want.values()) <= max_images:
        return want
    quota = {b: 0 for b in eligible}
    for b in eligible[:max_images]:
        quota[b] = 1
    left = max_images - sum(quota.values())
    extra = {b: want[b] - 1 for b in eligible}
    total_extra = sum(extra.values())
    if left > 0 and total_extra:
        shares = {b: extra[b] * left / total_extra for b in eligible}
        floors = {b: int(shares[b]) for b in eligible}
        by_remainder = sorted(eligible, key=lambda b: (-(shares[b] - floors[b]), -counts[b], b))
        for b in by_remainder[:left - sum(floors.values())]:
            floors[b] += 1
        for b in eligible:
            quota[b] += floors[b]
    return {b: q for b, q in quota.items() if q}


def choose_held_out(keys: Sequence[str], buckets: Sequence[Optional[Bucket]], *, fraction: float,
                    max_images: int, seed: int, leave_one: bool = True) -> List[int]:
    """Indices of the held-out images among `keys` (None bucket: not eligible), stratified by bucket."""
    members: Dict[Bucket, List[int]] = {}
    for i, b in enumerate(buckets):
        if b is not None:
            members.setdefault(b, []).append(i)
    quotas = bucket_quotas({b: len(m) for b, m in members.items()}, fraction, max_images, leave_one=leave_one)
    chosen: List[int] = []
    for b, q in quotas.items():
        chosen.extend(sorted(members[b], key=lambda i: _rank(seed, keys[i]))[:q])
    return sorted(chosen)


def item_buckets(sizes: Sequence[Bucket], arb: Any) -> List[Optional[Bucket]]:
    """The bucket each image trains in (the sampler's assignment; None: skipped by max_ar_error)."""
    if not arb.enabled:
        return [(int(arb.base_res[0]), int(arb.base_res[1]))] * len(sizes)
    from bp_trainer.buckets import assign_buckets, bucket_table

    table = bucket_table(arb)
    table_sizes = [(w, h) for w, h, _ in table]
    ids = assign_buckets(sizes, table_sizes, aspects=[a for _, _, a in table], max_ar_error=arb.max_ar_error)
    return [table_sizes[i] if i is not None else None for i in ids]


def _key(path: str, root: str) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def build_validation_set(cfg: Any, scan: Any, captions: Any) -> Optional[ValidationSet]:
    """The held-out images of a run (None when validation is off). `scan`: the dataset's scan; `captions`: a
    CaptionProcessor without randomness (tag formatting only)."""
    v, root = cfg.validation, cfg.dataset.path
    if not v.enabled:
        return None
    items, keys, leave_one = list(scan.items), [_key(it.path, root) for it in scan.items], True
    fraction = float(v.fraction)
    if v.path:
        items, keys = _items_from_path(v.path, cfg, scan)
        fraction, leave_one = 1.0, False
    buckets = item_buckets([it.size for it in items], cfg.arb)
    chosen = choose_held_out(keys, buckets, fraction=fraction, max_images=int(v.max_images), seed=int(v.seed),
                             leave_one=leave_one)
    if not chosen:
        raise BPError("no image can be held out for validation", path=v.path or root,
                      hint="a bucket of one image holds none out, nor does an image without a bucket "
                           "(arb.max_ar_error): add images, or give validation.path")
    images = sorted((HeldOut(keys[i], items[i].path, captions.process(items[i].caption),
                             buckets[i]) for i in chosen), key=lambda im: (im.size, im.key))  # type: ignore[arg-type]
    return ValidationSet(tuple(images), frozenset(os.path.realpath(im.path) for im in images))


def _items_from_path(path: str, cfg: Any, scan: Any) -> Tuple[List[Any], List[str]]:
    """Validation candidates from a folder (scanned with its captions) or a list file of dataset images."""
    from bp_trainer.dataset import scan_dataset

    if os.path.isdir(path):
        found = scan_dataset(path, caption_ext=cfg.dataset.caption_extension, missing_caption="empty")
        if not found.items:
            raise BPError("no usable images in the validation folder", path=path,
                          hint="images (png/jpg/webp) with .txt captions next to them")
        return list(found.items), [_key(it.path, path) for it in found.items]
    root = cfg.dataset.path
    by_path = {os.path.realpath(it.path): it for it in scan.items}
    items = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            name = line.strip()
            if not name or name.startswith("#"):
                continue
            item = by_path.get(os.path.realpath(os.path.join(root, name)))
            if item is None:
                raise BPError(f"line {n}: {name!r} is not an image of the dataset", path=path,
                              hint="list dataset images, one path per line, relative to dataset.path")
            items.append(item)
    return items, [_key(it.path, root) for it in items]


# ------------------------------------------------------------------------------------------------ the loss


def fixed_noise(seed: int, key: str, latent_shape: Sequence[int], timesteps: int,
                num_train_timesteps: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """An image's fixed (noise [K, C, h, w], timesteps [K]), as the module doc derives them."""
    g = torch.Generator("cpu").manual_seed(image_seed(seed, key))
    u = torch.rand(timesteps, generator=g, dtype=torch.float64)
    t = torch.floor((torch.arange(timesteps, dtype=torch.float64) + u) * num_train_timesteps / timesteps)
    noise = torch.randn((timesteps, *latent_shape), generator=g)
    return noise, t.long().clamp_(0, num_train_timesteps - 1)


def image_loss(unet: Any, noise_scheduler: Any, latent: torch.Tensor, cond: torch.Tensor, noise: torch.Tensor,
               timesteps: torch.Tensor, *, v_prediction: bool) -> torch.Tensor:
    """One image's validation loss (a float64 scalar): its K noised copies in one batch."""
    k = noise.shape[0]
    latents = latent.unsqueeze(0).expand(k, -1, -1, -1)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    target = noise_scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise
    pred = unet(noisy, timesteps, cond.expand(k, -1, -1)).sample
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3)).double().mean()


def encode_latent(vae: Any, image: HeldOut) -> torch.Tensor:
    """The image's latent [C, h, w] (fp32, CPU): the VAE posterior mean of its centre crop, scaled."""
    from bp_trainer.dataset import load_image_for_bucket
    from bp_trainer.train.latents import pixels_of

    pixels = pixels_of(load_image_for_bucket(image.path, image.size, "center"))
    dist = vae.encode(pixels.unsqueeze(0).to(vae.device, vae.dtype)).latent_dist
    return (dist.mean.float() * float(vae.config.scaling_factor))[0].cpu()


@dataclass(frozen=True)
class BucketLoss:
    images: int
    loss: float
    ema_loss: Optional[float]


@dataclass(frozen=True)
class ValidationResult:
    loss: float
    ema_loss: Optional[float]
    buckets: Dict[str, BucketLoss]  # "WxH" -> the bucket's losses
    images: int
    seconds: float

    def to_event(self) -> Dict[str, Any]:
        return {"loss": self.loss, "ema_loss": self.ema_loss, "images": self.images,
                "buckets": {k: asdict(b) for k, b in self.buckets.items()}, "seconds": round(self.seconds, 3)}

    def scalars(self) -> Dict[str, float]:
        """TensorBoard scalars: validation/loss, validation/ema_loss, validation/WxH (the trained weights)."""
        out = {"validation/loss": self.loss}
        if self.ema_loss is not None:
            out["validation/ema_loss"] = self.ema_loss
        out.update({f"validation/{k}": b.loss for k, b in self.buckets.items()})
        return out


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def summarize(images: Sequence[HeldOut], losses: Sequence[float], ema_losses: Optional[Sequence[float]],
              seconds: float = 0.0) -> ValidationResult:
    """Overall and per-bucket means of the per-image losses (exact sums: independent of the order)."""
    groups: Dict[str, List[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(f"{im.size[0]}x{im.size[1]}", []).append(i)
    buckets = {k: BucketLoss(len(idx), _mean([losses[i] for i in idx]),
                             _mean([ema_losses[i] for i in idx]) if ema_losses is not None else None)
               for k, idx in groups.items()}
    return ValidationResult(_mean(losses), _mean(ema_losses) if ema_losses is not None else None, buckets,
                            len(images), seconds)


@dataclass(frozen=True)
class BestTracker:
    """The lowest validation loss so far, its step, and the evaluations since (the early-stop count)."""

    best_loss: Optional[float] = None
    best_step: Optional[int] = None
    since_best: int = 0
    evaluations: int = 0

    def after(self, step: int, loss: float) -> "BestTracker":
        if self.best_loss is None or loss < self.best_loss:
            return BestTracker(loss, step, 0, self.evaluations + 1)
        return BestTracker(self.best_loss, self.best_step, self.since_best + 1, self.evaluations + 1)

    def patience_exhausted(self, patience: int) -> bool:
        return patience > 0 and self.since_best >= patience

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Optional[Mapping[str, Any]]) -> "BestTracker":
        return cls(**{k: data[k] for k in ("best_loss", "best_step", "since_best", "evaluations") if k in data}) \
            if data else cls()


# ------------------------------------------------------------------------------------------------ a process


@contextlib.contextmanager
def eval_mode(*modules: Any) -> Iterator[None]:
    """Modules in eval mode, gradients off; their modes restored afterwards."""
    modes = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        with torch.no_grad():
            yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


class Validator:
    """The validation of one training process: its shard of the held-out images, their latents (encoded once,
    kept on the CPU) and text conditionings (encoded once while the text encoder is frozen), and the all-reduced
    per-image losses of the trained and the EMA weights."""

    def __init__(self, images: Sequence[HeldOut], *, seed: int, timesteps: int, rank: int, world_size: int):
        self.images = tuple(images)
        self.seed, self.timesteps = int(seed), int(timesteps)
        self.mine = list(range(rank, len(self.images), world_size))
        self.world_size = world_size
        self._latents: Dict[int, torch.Tensor] = {}
        self._conds: Dict[int, torch.Tensor] = {}  # while the text encoder is frozen

    def run(self, loop: Any, *, ema: bool) -> ValidationResult:
        """Every process calls it; `ema`: the run keeps an EMA (the main process holds it as `loop.ema`)."""
        started = time.perf_counter()
        n = len(self.images)
        losses = torch.zeros(2, n, dtype=torch.float64)
        te = loop.acc.unwrap_model(loop.text_encoder)
        with eval_mode(loop.raw_unet, te):
            for i in self.mine:
                losses[0, i] = self._loss(loop, te, i)
            if loop.ema is not None:
                with loop.ema.swapped_into(loop.raw_unet):
                    for i in range(n):
                        losses[1, i] = self._loss(loop, te, i)
        if self.world_size > 1:
            losses = loop.acc.reduce(losses.to(loop.device), "sum").cpu()
        per_image = losses.tolist()
        return summarize(self.images, per_image[0], per_image[1] if ema else None,
                         time.perf_counter() - started)

    def prepare(self, loop: Any) -> None:
        """Encode, before training, what this process's validations read (latents; conditionings while the text
        is frozen), so the VAE and a cached text encoder can leave the GPU."""
        indices = range(len(self.images)) if loop.ema is not None else self.mine
        te = loop.acc.unwrap_model(loop.text_encoder)
        keep_conds = not loop.train_te and loop.tag_embeddings is None
        with eval_mode(te), loop.acc.autocast():
            for i in indices:
                self._latent(loop, i)
                if keep_conds:
                    self._cond(loop, te, i)

    def _latent(self, loop: Any, i: int) -> torch.Tensor:
        latent = self._latents.get(i)
        if latent is None:
            latent = self._latents[i] = encode_latent(loop.models.vae, self.images[i])
        return latent

    def _cond(self, loop: Any, text_encoder: Any, i: int) -> torch.Tensor:
        """The held-out caption's conditioning (with the run's tag embeddings); kept while nothing that shapes
        it trains (the text encoder, the embeddings)."""
        cond = self._conds.get(i)
        if cond is None:
            emb = loop.tag_embeddings
            cond = loop.family.encode_text(loop.models, [self.images[i].caption], clip_skip=loop.clip_skip,
                                           max_chunks=int(loop.cfg.dataset.max_chunks), text_encoder=text_encoder,
                                           embeddings=emb)
            if not loop.train_te and emb is None:
                self._conds[i] = cond
        return cond

    def _loss(self, loop: Any, text_encoder: Any, i: int) -> float:
        image, models = self.images[i], loop.models
        latent = self._latent(loop, i)
        noise, t = fixed_noise(self.seed, image.key, latent.shape, self.timesteps,
                               int(models.noise_scheduler.config.num_train_timesteps))
        device = loop.device
        with loop.acc.autocast():
            cond = self._cond(loop, text_encoder, i)
            loss = image_loss(loop.raw_unet, models.noise_scheduler, latent.to(device), cond.to(device),
                              noise.to(device), t.to(device), v_prediction=models.v_prediction)
        return float(loss.item())
