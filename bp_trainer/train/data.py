"""The training data: scanned images, bucketed batches for this process, and per-item loading.

Everything random about an item (tag shuffle/dropout, caption dropout, crop offset) is drawn from an RNG
seeded by `(seed, epoch, index)`, so an item is a pure function of those: DataLoader workers, restarts and
resumes all see the same captions and crops. Batches come from the dataset module's `BucketBatchSampler`
(global-rank sharding, naifu's leftover pool at base_res, resumable position).
"""

from __future__ import annotations

import os
import random
from dataclasses import replace
from typing import Any, Dict, List, Optional, Tuple

import torch

from bp_trainer.errors import BPError
from bp_trainer.train.latents import pixels_of
from bp_trainer.train.validation import build_validation_set


class BucketDataset(torch.utils.data.Dataset):
    """Items addressed by `(index, w, h)` keys from `BucketBatchSampler.keyed()`."""

    def __init__(self, items: List[Any], *, seed: int, captions: Any, center_crop: bool, cache: Any = None,
                 variants: Any = None):
        self.items = items
        self.seed = seed
        self.captions = captions
        self.variants = variants  # a CaptionVariants when the text encoder's outputs are cached
        self.center_crop = center_crop
        self.cache = cache
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.items)

    def rng(self, index: int) -> random.Random:
        return random.Random(f"{self.seed}:{self.epoch}:{index}")

    def __getitem__(self, key: Tuple[int, int, int]) -> Dict[str, Any]:
        from bp_trainer.dataset import load_image_for_bucket

        index, w, h = key
        item = self.items[index]
        rng = self.rng(index)
        if self.variants is not None:
            caption = self.variants.pick(item.caption, item.path, rng)
        elif self.captions.is_random:
            caption = self.captions.process(item.caption, rng)
        else:
            caption = self.captions.process(item.caption)
        crop = "center" if (self.center_crop or self.cache is not None) else "random"
        cache_key = self.cache.key(item.path, (w, h), crop) if self.cache is not None else None
        pixels = None
        if cache_key is None or not self.cache.has(cache_key):
            pixels = pixels_of(load_image_for_bucket(item.path, (w, h), crop, rng if crop == "random" else None))
        return {"index": index, "caption": caption, "pixels": pixels, "cache_key": cache_key, "size": (w, h)}


def collate(batch: List[Dict[str, Any]]) -> Dict[str, Any]:
    return {
        "index": [b["index"] for b in batch],
        "caption": [b["caption"] for b in batch],
        "pixels": [b["pixels"] for b in batch],
        "cache_key": [b["cache_key"] for b in batch],
        "size": batch[0]["size"],
    }


def auto_workers(requested: Optional[int], *, on_gpu: bool, world_size: int) -> int:
    """DataLoader workers: as configured, else 0 on a CPU (no GPU to overlap with) and on a GPU up to 4 per
    process, leaving one CPU per process for the training loop."""
    if requested is not None:
        return int(requested)
    if not on_gpu or os.name == "nt":  # Windows spawns workers (slow start, pickled dataset): keep it simple there
        return 0
    per_process = (os.cpu_count() or 1) // max(1, world_size) - 1
    return max(0, min(4, per_process))


def build_data(cfg: Any, *, rank: int, world_size: int, cache: Any = None, warn: Any = None,
               pin_memory: bool = False) -> Dict[str, Any]:
    """Scan the dataset and build the per-process sampler, dataset and DataLoader (`cfg`: a RunConfig).

    The held-out validation images (`validation`: a ValidationSet or None) are taken out of the training items
    first; `items` are the training items (times `dataset.repeats`), `images` the distinct training images."""
    from bp_trainer.dataset import BucketBatchSampler, CaptionProcessor, CaptionVariants, scan_dataset

    d, t, arb = cfg.dataset, cfg.training, cfg.arb
    scan = scan_dataset(d.path, caption_ext=d.caption_extension, missing_caption="empty")
    if warn is not None and scan.problems:
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(scan.problem_counts().items()))
        warn(f"{len(scan.problems)} dataset file(s) skipped ({kinds}); first: {scan.problems[0].path}: "
             f"{scan.problems[0].reason}")
    if not scan.items:
        raise BPError("no usable images in the dataset", path=d.path,
                      hint="images (png/jpg/webp) with .txt captions next to them")
    captions = CaptionProcessor(shuffle=bool(d.shuffle_tags), keep_first=int(d.keep_tokens),
                                tag_dropout=float(d.tag_dropout), caption_dropout=float(d.caption_dropout),
                                underscores_to_spaces=bool(d.underscores_to_spaces),
                                escape_brackets=bool(d.escape_brackets))
    validation = build_validation_set(cfg, scan, replace(captions, shuffle=False, tag_dropout=0.0,
                                                         caption_dropout=0.0))
    unique = [it for it in scan.items if validation is None or os.path.realpath(it.path) not in validation.excluded]
    if not unique:
        raise BPError("every image is held out for validation; none is left to train on", path=d.path,
                      hint="lower validation.fraction or give validation.path outside the dataset")
    items = unique * int(d.repeats)
    base_res = (int(arb.base_res[0]), int(arb.base_res[1]))
    common = dict(seed=int(t.seed), rank=rank, world_size=world_size, leftover="pool", base_res=base_res)
    if arb.enabled:
        sampler = BucketBatchSampler.from_sizes([it.size for it in items], arb, int(t.batch_size), **common)
    else:
        sampler = BucketBatchSampler([0] * len(items), [base_res], int(t.batch_size), **common)
    if len(sampler) == 0:
        raise BPError(f"{len(items)} image(s) do not make one batch per process "
                      f"(batch size {t.batch_size} x {world_size} process(es))", path=d.path,
                      hint="lower training.batch_size or add images")
    if arb.debug and warn is not None:  # naifu's arb.debug: show the bucket plan before training
        from bp_trainer.dataset.plan import format_plan, plan_buckets

        plan = plan_buckets(items, arb, problems=scan.problems, batch_size=int(t.batch_size),
                            world_size=world_size)
        warn("bucket plan (arb.debug):\n" + format_plan(plan.to_dict()))
    variants = CaptionVariants(captions, int(cfg.text_cache.variants), int(t.seed)) if cfg.text_cache.enabled else None
    dataset = BucketDataset(items, seed=int(t.seed), captions=captions, center_crop=bool(d.center_crop),
                            cache=cache, variants=variants)
    workers = auto_workers(d.num_workers, on_gpu=pin_memory, world_size=world_size)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler.keyed(), collate_fn=collate,
                                         num_workers=workers, pin_memory=pin_memory,
                                         persistent_workers=False)
    return {"scan": scan, "items": items, "sampler": sampler, "dataset": dataset, "loader": loader,
            "buckets": sampler.buckets, "images": len(unique), "validation": validation, "variants": variants,
            "workers": workers}


def relpath(path: str, root: str) -> str:
    try:
        return os.path.relpath(path, root)
    except ValueError:
        return path


def describe_batches(data: Dict[str, Any], indices: List[int], root: Optional[str] = None) -> List[str]:
    items = data["items"]
    n = data["images"]
    return [f"{relpath(items[i].path, root) if root else items[i].path}#{i // n}" for i in indices]
