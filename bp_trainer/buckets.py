"""Aspect-ratio buckets: naifu-diffusion's `arb:` block, its bucket list, and assigning images to buckets.

Pure functions, no I/O. The bucket list is exactly what naifu-diffusion (`data/buckets.py`,
`AspectRatioBucket.gen_buckets`, checked at commit c5bb740) builds from the same block, in the same order:

1. For each width `w = min_dim, min_dim+div, ...` while `w*min_dim <= max_area` and `w <= dim_limit`, take the
   tallest `h = min_dim + k*div` with `w*h <= max_area` and `h <= dim_limit`. If that column passed through
   `base_res` on its way up, `base_res` is inserted too (with aspect 1, naifu's hard-coded value).
2. The same with the roles swapped (for each height, the widest width).
3. Duplicates removed (a later entry's aspect wins), then sorted by `w*4096 - h` (width ascending, height
   descending).

`max_size` is an area budget (`w*h <= max_size[0]*max_size[1]`), not the largest bucket.

Assignment picks the nearest bucket by aspect ratio. The default compares `log(w/h)`, which treats tall and wide
images alike; `rule="linear"` is naifu's `argmin |bucket_aspect - w/h|` on naifu's aspect values. In both cases
`max_ar_error` keeps an image only when `|bucket_aspect - w/h| < max_ar_error` for the chosen bucket, naifu's
meaning (an absolute difference of w/h ratios: tall images are never removed by it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from bp_trainer.errors import ConfigError


ARB_KEYS = ("enabled", "debug", "base_res", "max_size", "divisible", "max_ar_error", "min_dim", "dim_limit")
# Accepted because naifu accepts them, but they change nothing in the bucket list.
ARB_IGNORED_KEYS = ("step_size",)

RULES = ("log", "linear")


@dataclass(frozen=True)
class ArbConfig:
    """naifu-diffusion's `arb:` block. Defaults are naifu's `config/multi-gpu.yaml`."""

    enabled: bool = True
    debug: bool = False
    base_res: "tuple[int, int]" = (512, 512)
    max_size: "tuple[int, int]" = (768, 512)
    divisible: int = 64
    max_ar_error: float = 4.0
    min_dim: int = 256
    dim_limit: int = 1024
    extra: "dict[str, Any]" = field(default_factory=dict, compare=False)

    @property
    def max_area(self) -> int:
        return int(self.max_size[0]) * int(self.max_size[1])

    @classmethod
    def from_dict(cls, block: "Mapping[str, Any] | None", *, source: "str | None" = None) -> "ArbConfig":
        """Validate an `arb:` mapping (unknown keys and impossible values raise ConfigError naming the key)."""
        where = f"{source}: " if source else ""
        if block is None:
            block = {}
        if not isinstance(block, Mapping):
            raise ConfigError(f"{where}arb: must be a mapping of {', '.join(ARB_KEYS)}")
        unknown = [k for k in block if k not in ARB_KEYS and k not in ARB_IGNORED_KEYS]
        if unknown:
            raise ConfigError(
                f"{where}unknown key arb.{unknown[0]}", hint=f"known keys: {', '.join(ARB_KEYS)}"
            )
        kw: "dict[str, Any]" = {}
        for key in ("enabled", "debug"):
            if key in block:
                value = block[key]
                if not isinstance(value, bool):
                    raise ConfigError(f"{where}arb.{key} must be true or false, got {value!r}")
                kw[key] = value
        for key in ("base_res", "max_size"):
            if key in block:
                kw[key] = _pair(block[key], f"{where}arb.{key}")
        for key in ("divisible", "min_dim", "dim_limit"):
            if key in block:
                kw[key] = _positive_int(block[key], f"{where}arb.{key}")
        if "max_ar_error" in block:
            value = block["max_ar_error"]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"{where}arb.max_ar_error must be a positive number, got {value!r}")
            kw["max_ar_error"] = float(value)
        kw["extra"] = {k: block[k] for k in ARB_IGNORED_KEYS if k in block}
        cfg = cls(**kw)
        if cfg.min_dim * cfg.min_dim > cfg.max_area:
            raise ConfigError(
                f"{where}arb: no bucket fits: min_dim {cfg.min_dim} squared is more than the area budget "
                f"max_size {cfg.max_size[0]}x{cfg.max_size[1]}",
                hint="lower arb.min_dim or raise arb.max_size",
            )
        if cfg.min_dim > cfg.dim_limit:
            raise ConfigError(
                f"{where}arb: min_dim {cfg.min_dim} is larger than dim_limit {cfg.dim_limit}",
                hint="dim_limit is the longest side allowed; it must be at least min_dim",
            )
        return cfg

    def to_dict(self) -> "dict[str, Any]":
        return {
            "enabled": self.enabled,
            "debug": self.debug,
            "base_res": list(self.base_res),
            "max_size": list(self.max_size),
            "divisible": self.divisible,
            "max_ar_error": self.max_ar_error,
            "min_dim": self.min_dim,
            "dim_limit": self.dim_limit,
        }


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ConfigError(f"{name} must be a whole number of pixels, got {value!r}")
    if value <= 0:
        raise ConfigError(f"{name} must be positive, got {value}")
    return value


def _pair(value: Any, name: str) -> "tuple[int, int]":
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value, value]
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ConfigError(f"{name} must be [width, height], got {value!r}")
    return (_positive_int(value[0], f"{name}[0]"), _positive_int(value[1], f"{name}[1]"))


def bucket_table(cfg: ArbConfig) -> "list[tuple[int, int, float]]":
    """naifu's buckets in naifu's order as `(w, h, aspect)`; `aspect` is naifu's value (1 for an inserted base_res)."""
    area, div, lo, limit = cfg.max_area, cfg.divisible, cfg.min_dim, cfg.dim_limit
    base = (int(cfg.base_res[0]), int(cfg.base_res[1]))
    entries: "dict[tuple[int, int], float]" = {}  # insertion-ordered, later aspect wins (naifu's res_map)

    def longest(other: int) -> int:
        # the largest lo + k*div with other*(lo + k*div) <= area and lo + k*div <= limit (k >= 0)
        k = min((area // other - lo) // div, (limit - lo) // div)
        return lo + max(k, 0) * div

    w = lo
    while w * lo <= area and w <= limit:
        h = longest(w)
        # naifu sets got_base when the column steps through base_res on the way to h
        if w == base[0] and base[1] < h and base[1] >= lo and (base[1] - lo) % div == 0:
            entries[base] = 1.0
        entries[(w, h)] = w / h
        w += div
    h = lo
    while h * lo <= area and h <= limit:
        w = longest(h)
        entries[(w, h)] = w / h
        h += div
    ordered = sorted(entries, key=lambda r: r[0] * 4096 - r[1])  # stable, as Python's sorted in naifu
    return [(r[0], r[1], entries[r]) for r in ordered]


def generate_buckets(cfg: ArbConfig) -> "list[tuple[int, int]]":
    """The bucket resolutions `(w, h)` naifu-diffusion builds for this `arb:` block, in its order."""
    return [(w, h) for w, h, _ in bucket_table(cfg)]


def _keys(buckets: "Sequence[tuple[int, int]]", rule: str, aspects: "Sequence[float] | None") -> "list[float]":
    if rule not in RULES:
        raise ConfigError(f"unknown bucket rule {rule!r}", hint=f"use one of {', '.join(RULES)}")
    if rule == "linear":
        return [float(a) for a in aspects] if aspects is not None else [w / h for w, h in buckets]
    return [math.log(w / h) for w, h in buckets]


def assign_bucket(
    size: "tuple[int, int]",
    buckets: "Sequence[tuple[int, int]]",
    *,
    rule: str = "log",
    aspects: "Sequence[float] | None" = None,
    max_ar_error: "float | None" = None,
) -> "int | None":
    """Index of the bucket nearest to an image of `size` (w, h), or None when `max_ar_error` rejects it.

    `aspects` are the buckets' naifu aspect values (from `bucket_table`), used by the linear rule and by the
    `max_ar_error` test; by default each bucket's w/h. Ties go to the first bucket in list order (numpy argmin).
    """
    return assign_buckets([size], buckets, rule=rule, aspects=aspects, max_ar_error=max_ar_error)[0]


def assign_buckets(
    sizes: "Iterable[tuple[int, int]]",
    buckets: "Sequence[tuple[int, int]]",
    *,
    rule: str = "log",
    aspects: "Sequence[float] | None" = None,
    max_ar_error: "float | None" = None,
) -> "list[int | None]":
    """`assign_bucket` for many sizes at once (vectorised with numpy)."""
    import numpy as np

    if not buckets:
        raise ConfigError("no buckets to assign images to")
    keys = np.asarray(_keys(buckets, rule, aspects), dtype=np.float64)
    ref = np.asarray([float(a) for a in aspects] if aspects is not None else [w / h for w, h in buckets])
    sizes = list(sizes)
    if not sizes:
        return []
    arr = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)
    if (arr <= 0).any():
        raise ConfigError("image sizes must be positive")
    ratio = arr[:, 0] / arr[:, 1]
    value = np.log(ratio) if rule == "log" else ratio
    out: "list[int | None]" = []
    # chunked so 100k images x 100 buckets stays small in memory
    step = 8192
    for start in range(0, len(value), step):
        v = value[start:start + step]
        ids = np.abs(keys[None, :] - v[:, None]).argmin(axis=1)
        if max_ar_error is not None:
            ok = np.abs(ref[ids] - ratio[start:start + step]) < max_ar_error
            out.extend(int(i) if good else None for i, good in zip(ids, ok))
        else:
            out.extend(int(i) for i in ids)
    return out


def cover_size(image: "tuple[int, int]", bucket: "tuple[int, int]") -> "tuple[int, int]":
    """Size to resize `image` (w, h) to so it covers `bucket` (w, h) keeping its aspect ratio (then crop)."""
    iw, ih = image
    bw, bh = bucket
    scale = max(bw / iw, bh / ih)
    return (max(bw, round(iw * scale)), max(bh, round(ih * scale)))


def crop_fraction(image: "tuple[int, int]", bucket: "tuple[int, int]") -> float:
    """Fraction of the resized image's area that the crop into `bucket` removes (0 = exact fit)."""
    nw, nh = cover_size(image, bucket)
    return 1.0 - (bucket[0] * bucket[1]) / (nw * nh)
