"""The bucket plan: how a dataset falls into buckets, before any GPU time is spent.

For each bucket: its size, pixel count (VRAM grows with it), how many images it gets, how many of them are
enlarged to fill it and how much of their area the crop removes. Plus every image that is not used, with the
reason (scan problems and `max_ar_error` rejections), and, given a batch size, how many batches an epoch has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from bp_trainer.buckets import ArbConfig, assign_buckets, bucket_table, cover_size
from bp_trainer.dataset.scan import ImageItem, Problem


@dataclass
class BucketPlan:
    arb: ArbConfig
    rule: str
    buckets: "List[Tuple[int, int]]"
    counts: "List[int]"
    skipped: "List[Problem]"
    assignments: "List[Optional[int]]"  # per planned item, its bucket index (None: skipped by max_ar_error)
    upscaled: "List[int]"  # per bucket: images enlarged to fill it
    crop_sum: "List[float]"  # per bucket: sum of cropped area fractions
    crop_mean: float = 0.0
    crop_worst: float = 0.0
    crop_worst_path: "Optional[str]" = None
    upscale_worst: float = 1.0
    upscale_worst_path: "Optional[str]" = None
    epoch: "Optional[Dict[str, Any]]" = None
    problems: "Dict[str, int]" = field(default_factory=dict)

    @property
    def images(self) -> int:
        return sum(self.counts)

    def to_dict(self) -> "Dict[str, Any]":
        details = []
        for i, (w, h) in enumerate(self.buckets):
            n = self.counts[i]
            details.append({
                "size": [w, h],
                "aspect": round(w / h, 4),
                "pixels": w * h,
                "latent_tokens": (w // 8) * (h // 8),
                "images": n,
                "upscaled": self.upscaled[i],
                "mean_crop": round(self.crop_sum[i] / n, 4) if n else 0.0,
            })
        out: "Dict[str, Any]" = {
            "arb": self.arb.to_dict(),
            "rule": self.rule,
            "buckets": [[w, h] for w, h in self.buckets],
            "counts": list(self.counts),
            "pixels": [w * h for w, h in self.buckets],
            "images": self.images,
            "skipped": [p.to_dict() for p in self.skipped],
            "skipped_kinds": self.problems,
            "upscaled": sum(self.upscaled),
            "crop": {
                "mean": round(self.crop_mean, 4),
                "worst": round(self.crop_worst, 4),
                "worst_path": self.crop_worst_path,
                "upscaled": sum(self.upscaled),
                "upscale_worst": round(self.upscale_worst, 4),
                "upscale_worst_path": self.upscale_worst_path,
            },
            "details": details,
        }
        if self.epoch is not None:
            out["epoch"] = self.epoch
        return out


def plan_buckets(
    items: "Sequence[ImageItem]",
    arb: ArbConfig,
    *,
    rule: str = "log",
    problems: "Sequence[Problem]" = (),
    batch_size: "Optional[int]" = None,
    world_size: int = 1,
    leftover: str = "pool",
) -> BucketPlan:
    """Assign `items` (from `scan_dataset`) to `arb`'s buckets and measure what resizing and cropping will do.

    With `arb.enabled` false there is one bucket, `base_res`, as in training.
    """
    sizes = [(it.width, it.height) for it in items]
    if arb.enabled:
        table = bucket_table(arb)
        buckets = [(w, h) for w, h, _ in table]
        aspects = [a for _, _, a in table]
        assignments = assign_buckets(sizes, buckets, rule=rule, aspects=aspects, max_ar_error=arb.max_ar_error)
    else:  # buckets off: every image is resized and cropped to base_res, as the trainer does
        buckets = [tuple(arb.base_res)]
        aspects = [arb.base_res[0] / arb.base_res[1]]
        assignments = [0] * len(sizes)
    nb = len(buckets)
    counts = [0] * nb
    upscaled = [0] * nb
    crop_sum = [0.0] * nb
    skipped = list(problems)
    total_crop = 0.0
    worst, worst_path = 0.0, None
    up_worst, up_worst_path = 1.0, None
    for it, b in zip(items, assignments):
        if b is None:
            nearest = assign_bucket_unfiltered(it, buckets, rule, aspects)
            bw, bh = buckets[nearest]
            error = abs(aspects[nearest] - it.width / it.height)
            skipped.append(Problem(
                it.path,
                f"aspect ratio {it.width}x{it.height} is {error:.3f} from the nearest bucket {bw}x{bh} "
                f"(max_ar_error {arb.max_ar_error:g})",
                "aspect_ratio",
            ))
            continue
        bw, bh = buckets[b]
        counts[b] += 1
        scale = max(bw / it.width, bh / it.height)
        if scale > 1.0:
            upscaled[b] += 1
            if scale > up_worst:
                up_worst, up_worst_path = scale, it.path
        nw, nh = cover_size((it.width, it.height), (bw, bh))
        frac = 1.0 - (bw * bh) / (nw * nh)
        crop_sum[b] += frac
        total_crop += frac
        if frac > worst:
            worst, worst_path = frac, it.path
    kept = sum(counts)
    kinds: "Dict[str, int]" = {}
    for p in skipped:
        kinds[p.kind] = kinds.get(p.kind, 0) + 1
    plan = BucketPlan(
        arb=arb, rule=rule, buckets=buckets, counts=counts, skipped=skipped, assignments=assignments,
        upscaled=upscaled, crop_sum=crop_sum, crop_mean=total_crop / kept if kept else 0.0,
        crop_worst=worst, crop_worst_path=worst_path, upscale_worst=up_worst, upscale_worst_path=up_worst_path,
        problems=kinds,
    )
    if batch_size:
        plan.epoch = epoch_summary(counts, batch_size, world_size=world_size, leftover=leftover)
    return plan


def assign_bucket_unfiltered(item: ImageItem, buckets: "Sequence[Tuple[int, int]]", rule: str, aspects: "Sequence[float]") -> int:
    from bp_trainer.buckets import assign_bucket

    found = assign_bucket((item.width, item.height), buckets, rule=rule, aspects=aspects)
    assert found is not None
    return found


def epoch_summary(counts: "Sequence[int]", batch_size: int, *, world_size: int = 1, leftover: str = "pool") -> "Dict[str, Any]":
    """Batches per epoch and images left out each epoch, as `BucketBatchSampler` will make them."""
    full = sum(n // batch_size for n in counts)
    rem = [n % batch_size for n in counts]
    if leftover == "pool":
        extra = sum(rem) // batch_size
        left_out = sum(rem) % batch_size
    elif leftover == "short":
        extra = sum(1 for r in rem if r)
        left_out = 0
    else:
        extra, left_out = 0, sum(rem)
    total = full + extra
    per_rank = total // world_size
    return {
        "batch_size": batch_size,
        "world_size": world_size,
        "leftover": leftover,
        "bucket_batches": full,
        "leftover_batches": extra,
        "batches_per_rank": per_rank,
        "steps_per_epoch": per_rank,
        "batches_skipped_for_ranks": total - per_rank * world_size,
        "images_left_out_at_least": left_out,
        "images": sum(counts),
    }


def format_plan(plan: "Dict[str, Any]", limit: int = 20) -> str:
    """A human-readable plan (the CLI's default output)."""
    lines = []
    arb = plan.get("arb", {})
    if arb:
        lines.append(
            f"arb: base_res {arb['base_res']}, max_size {arb['max_size']} (area budget "
            f"{arb['max_size'][0] * arb['max_size'][1]:,} px), divisible {arb['divisible']}, "
            f"min_dim {arb['min_dim']}, dim_limit {arb['dim_limit']}, max_ar_error {arb['max_ar_error']:g}"
        )
    counts = plan.get("counts")
    lines.append(f"{len(plan['buckets'])} buckets" + (f", {plan['images']} images" if counts is not None else ""))
    for i, (w, h) in enumerate(plan["buckets"]):
        row = f"  {w:>5} x {h:<5} aspect {w / h:6.3f}  {w * h / 1e6:5.2f} MP"
        if counts is not None:
            d = plan["details"][i]
            row += f"  {counts[i]:>7} images"
            if counts[i]:
                row += f"  crop {d['mean_crop'] * 100:5.1f}%  upscaled {d['upscaled']}"
        lines.append(row)
    if counts is not None:
        crop = plan["crop"]
        lines.append(
            f"crop: mean {crop['mean'] * 100:.1f}% of the area, worst {crop['worst'] * 100:.1f}%"
            + (f" ({crop['worst_path']})" if crop["worst_path"] else "")
        )
        lines.append(f"upscaled: {crop['upscaled']} images" + (
            f", worst x{crop['upscale_worst']:.2f} ({crop['upscale_worst_path']})" if crop["upscale_worst_path"] else ""))
        skipped = plan["skipped"]
        lines.append(f"skipped: {len(skipped)}" + (
            " (" + ", ".join(f"{k} {v}" for k, v in sorted(plan["skipped_kinds"].items())) + ")" if skipped else ""))
        for p in skipped[:limit]:
            lines.append(f"  {p['path']}: {p['reason']}")
        if len(skipped) > limit:
            lines.append(f"  ... and {len(skipped) - limit} more (--json lists all)")
        if plan.get("epoch"):
            e = plan["epoch"]
            lines.append(
                f"epoch at batch size {e['batch_size']} x {e['world_size']} rank(s): {e['steps_per_epoch']} steps, "
                f"{e['leftover_batches']} leftover batches ({e['leftover']})"
            )
    return "\n".join(lines)

