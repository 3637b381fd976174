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
VAE_FACTOR = 8  # pixels per latent cell: bucket sides must be multiples of it
MAX_SIDE = 16384  # no bucket side beyond this (a typo like 10240000 is an error, not a hang)


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
        """Validate an `arb:` mapping; raise one ConfigError naming every problem's key (see `parse_arb`)."""
        cfg, problems = parse_arb(block)
        if problems:
            where = f"{source}: " if source else ""
            head = "invalid arb block" + (f" ({len(problems)} problems)" if len(problems) > 1 else "")
            raise ConfigError(f"{where}{head}: " + "; ".join(problems),
                              hint="see docs/dataset.md (buckets); naifu-diffusion's arb: block")
        assert cfg is not None
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


def _int_problem(value: Any, name: str) -> "tuple[int | None, str | None]":
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        return None, f"{name} must be a whole number of pixels, got {value!r}"
    if value <= 0:
        return None, f"{name} must be positive, got {value}"
    if value > MAX_SIDE:
        return None, f"{name} {value} is larger than {MAX_SIDE} pixels"
    return value, None


def _pair_problem(value: Any, name: str) -> "tuple[tuple[int, int] | None, list[str]]":
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value, value]
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return None, [f"{name} must be [width, height], got {value!r}"]
    (w, pw), (h, ph) = _int_problem(value[0], f"{name}[0]"), _int_problem(value[1], f"{name}[1]")
    problems = [p for p in (pw, ph) if p]
    return (None if problems else (int(w), int(h))), problems  # type: ignore[arg-type]


def _read_fields(block: "Mapping[str, Any]", problems: "list[str]") -> "dict[str, Any]":
    kw: "dict[str, Any]" = {}
    for key in ("enabled", "debug"):
        if key in block:
            if isinstance(block[key], bool):
                kw[key] = block[key]
            else:
                problems.append(f"arb.{key} must be true or false, got {block[key]!r}")
    for key in ("base_res", "max_size"):
        if key in block:
            pair, found = _pair_problem(block[key], f"arb.{key}")
            problems.extend(found)
            if pair is not None:
                kw[key] = pair
    for key in ("divisible", "min_dim", "dim_limit"):
        if key in block:
            value, problem = _int_problem(block[key], f"arb.{key}")
            if problem:
                problems.append(problem)
            else:
                kw[key] = value
    if "max_ar_error" in block:
        value = block["max_ar_error"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            problems.append(f"arb.max_ar_error must be a positive number (4 keeps nearly every image), got {value!r}")
        else:
            kw["max_ar_error"] = float(value)
    return kw


def _geometry_problems(cfg: ArbConfig) -> "list[str]":
    """What makes a well-typed block untrainable: bucket sides must be multiples of 8 (the VAE's factor) and
    at least one bucket, base_res included, must fit the limits."""
    problems = []
    for key in ("divisible", "min_dim"):
        if getattr(cfg, key) % VAE_FACTOR:
            problems.append(f"arb.{key}: {getattr(cfg, key)} must be a multiple of {VAE_FACTOR} (the VAE's factor; "
                            "every bucket side is min_dim + k*divisible)")
    if any(v % VAE_FACTOR for v in cfg.base_res):
        problems.append(f"arb.base_res: both sides must be multiples of {VAE_FACTOR}, got {list(cfg.base_res)}")
    if cfg.min_dim * cfg.min_dim > cfg.max_area:
        problems.append(f"arb: no bucket fits: min_dim {cfg.min_dim} squared is more than the area budget "
                        f"max_size {cfg.max_size[0]}x{cfg.max_size[1]} (lower arb.min_dim or raise arb.max_size)")
    if cfg.min_dim > cfg.dim_limit:
        problems.append(f"arb: min_dim {cfg.min_dim} is larger than dim_limit {cfg.dim_limit} (dim_limit is the "
                        "longest side allowed; it must be at least min_dim)")
    bw, bh = cfg.base_res
    if bw * bh > cfg.max_area:
        problems.append(f"arb.base_res: {bw}x{bh} has more pixels than the max_size budget "
                        f"{cfg.max_size[0]}x{cfg.max_size[1]}")
    if max(bw, bh) > cfg.dim_limit:
        problems.append(f"arb.base_res: {bw}x{bh} exceeds arb.dim_limit {cfg.dim_limit}")
    return problems


def parse_arb(block: "Mapping[str, Any] | None") -> "tuple[ArbConfig | None, list[str]]":
    """The one `arb:` validator (trainer, Buckets tab, CLI and API): the block as an ArbConfig, and every
    problem as a message naming its key. The config is None when there is any problem."""
    if block is None:
        block = {}
    if not isinstance(block, Mapping):
        return None, [f"arb: must be a mapping of {', '.join(ARB_KEYS)}, got {type(block).__name__}"]
    problems: "list[str]" = []
    for key in block:
        if key not in ARB_KEYS and key not in ARB_IGNORED_KEYS:
            problems.append(f"unknown key 'arb.{key}' (known keys: {', '.join(ARB_KEYS)})")
    kw = _read_fields(block, problems)
    if problems:
        return None, problems
    cfg = ArbConfig(**kw, extra={k: block[k] for k in ARB_IGNORED_KEYS if k in block})
    problems = _geometry_problems(cfg)
    return (None, problems) if problems else (cfg, [])


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


def training_buckets(cfg: ArbConfig) -> "list[tuple[int, int]]":
    """The resolutions a run trains at: naifu's buckets, or just `base_res` when `enabled` is false."""
    return generate_buckets(cfg) if cfg.enabled else [(int(cfg.base_res[0]), int(cfg.base_res[1]))]


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
