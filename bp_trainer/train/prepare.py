"""Before the first step (`TrainLoop.prepare`): with a latent cache, every latent this process will train on is
encoded (every epoch's buckets, the leftover pool's base resolution included); with `text_cache`, every text
(each caption's variants and the empty caption); the held-out validation images' latents and conditionings too.
Then nothing in the steps needs the VAE or the cached text encoder, and they leave the GPU; `frozen_on_device`
brings them back while samples are drawn.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Dict, Iterator, List, Tuple

import torch

from bp_trainer.rundir import RunDir
from bp_trainer.train.text_cache import EMPTY, TextCache, cache_identity

PROGRESS_EVERY_S = 5.0
Key = Tuple[int, int, int]  # (item index, bucket width, bucket height), as the bucket sampler keys an item


def progress_events(events: Any, what: str) -> Callable[[int, int], None]:
    """`report(done, total)`: a `prepare` event at the first and last call and at most every PROGRESS_EVERY_S."""
    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if done in (0, total) or now - last[0] >= PROGRESS_EVERY_S:
            last[0] = now
            events.emit("prepare", what=what, done=done, total=total)

    return report


def latent_work(loop: Any) -> List[List[Key]]:
    """This process's items of every epoch whose latent is not cached yet, one per (image, bucket), in batches of
    the training batch size that share a bucket."""
    cache, items = loop.cache, loop.dataset.items
    seen: Dict[Tuple[str, int, int], Key] = {}
    for epoch in range(int(loop.num_epochs)):
        for batch in loop.sampler.epoch_batches(epoch):
            w, h = batch.size
            for i in batch.indices:
                seen.setdefault((items[i].path, w, h), (i, w, h))
    by_size: Dict[Tuple[int, int], List[Key]] = {}
    for (path, w, h), key in seen.items():
        if not cache.has(cache.key(path, (w, h), "center")):
            by_size.setdefault((w, h), []).append(key)
    size = int(loop.cfg.training.batch_size)
    return [group[i:i + size] for group in by_size.values() for i in range(0, len(group), size)]


def fill_latents(loop: Any) -> None:
    """Encode (and cache) every latent `latent_work` lists, loading images with the training DataLoader's workers."""
    from bp_trainer.train.data import collate

    batches = latent_work(loop)
    total = sum(len(b) for b in batches)
    report = progress_events(loop.events, "latents")
    report(0, total)
    if not batches:
        return
    loader = torch.utils.data.DataLoader(loop.dataset, batch_sampler=batches, collate_fn=collate,
                                         num_workers=int(loop.data.get("workers", 0)),
                                         pin_memory=loop.device.type == "cuda")
    done = 0
    for batch in loader:
        loop.latents_for(batch)
        done += len(batch["index"])
        report(done, total)


def text_work(loop: Any) -> List[str]:
    """Every text the run can train on: each training image's caption variants, and the empty caption."""
    variants, n = loop.data["variants"], int(loop.data["images"])
    texts = [EMPTY]
    for item in loop.data["items"][:n]:
        texts.extend(variants.texts(item.caption, item.path))
    return list(dict.fromkeys(texts))


def build_text_cache(loop: Any) -> TextCache:
    cfg = loop.cfg
    directory = cfg.text_cache.dir or str(RunDir(cfg.run.runs_dir).path / "text_cache")
    identity = cache_identity(loop.frozen_originals["text_encoder"], loop.models.tokenizer, clip_skip=loop.clip_skip,
                              max_chunks=int(cfg.dataset.max_chunks), dtype=loop.weight_dtype)
    return TextCache(cfg.text_cache.mode, directory if cfg.text_cache.mode == "disk" else None, identity,
                     loop.weight_dtype)


def fill_text(loop: Any, cache: TextCache) -> None:
    """Encode every `text_work` text missing from the cache (on disk each process takes its share, then all wait)."""
    from bp_trainer.train.models import tokenize_chunks

    texts = cache.missing(text_work(loop))
    if cache.mode == "disk":
        texts = texts[loop.rank::loop.world]
    max_chunks = int(loop.cfg.dataset.max_chunks)

    def encode(batch: List[str]) -> torch.Tensor:
        with torch.no_grad(), loop.acc.autocast():
            return loop.family.encode_text(loop.models, batch, clip_skip=loop.clip_skip, max_chunks=max_chunks)

    report = progress_events(loop.events, "text")
    report(0, len(texts))
    cache.fill(texts, encode, lambda t: int(tokenize_chunks(loop.models.tokenizer, [t], max_chunks).shape[1]),
               batch_size=max(8, int(loop.cfg.training.batch_size)), progress=report)
    if cache.mode == "disk":
        loop.acc.wait_for_everyone()


def offload_frozen(loop: Any) -> Tuple[str, ...]:
    """Move the parts the steps no longer use to the CPU: the VAE (latents cached) and the text encoder (its
    outputs cached). Returns their names."""
    parts = (("vae",) if loop.cache is not None else ()) + (("text_encoder",) if loop.text_cache is not None else ())
    for name in parts:
        getattr(loop.models, name).to("cpu")
    return parts


@contextlib.contextmanager
def frozen_on_device(loop: Any) -> Iterator[None]:
    """The offloaded parts back on the training device (samples decode and encode with them), then off again."""
    parts = tuple(getattr(loop, "offloaded", ()))
    for name in parts:
        getattr(loop.models, name).to(loop.device)
    try:
        yield
    finally:
        for name in parts:
            getattr(loop.models, name).to("cpu")
