"""Aspect-ratio buckets: naifu-diffusion's bucket list, assignment rules, max_ar_error, cover/crop geometry."""

from __future__ import annotations

import random

import pytest

from bp_trainer.buckets import (
    ArbConfig,
    assign_bucket,
    assign_buckets,
    bucket_table,
    cover_size,
    crop_fraction,
    generate_buckets,
)
from bp_trainer.errors import ConfigError

# Published sample output of NovelAI's bucketmanager.py (README "Sample Output", defaults
# max_size (768,512), divisible 64, min_dim 256, base_res (512,512), dim_limit 1024); naifu-diffusion's
# AspectRatioBucket is that code. Copied from the README, not produced by our code.
NOVELAI_README_BUCKETS = [
    (256, 1024), (320, 1024), (384, 1024), (384, 960), (384, 896), (448, 832), (512, 768), (512, 704),
    (512, 512), (576, 640), (640, 576), (704, 512), (768, 512), (832, 448), (896, 384), (960, 384),
    (1024, 384), (1024, 320), (1024, 256),
]
NOVELAI_README_ASPECTS = [0.25, 0.3125, 0.375, 0.4, 0.42857143, 0.53846154, 0.66666667, 0.72727273, 1.0, 0.9,
                          1.11111111, 1.375, 1.5, 1.85714286, 2.33333333, 2.5, 2.66666667, 3.2, 4.0]


def brute_force_buckets(base_res, max_size, divisible, min_dim, dim_limit):
    """Independent reading of the rules in shared/notes/trainers.md 1.3: enumerate the whole grid.

    A column w (on the grid from min_dim, w <= dim_limit, w*min_dim within the area) keeps its tallest grid height
    within area and dim_limit; rows likewise; base_res is added when its column passes through it. Sorted by width
    ascending, then height descending (naifu's key w*4096-h for heights below 4096).
    """
    area = max_size[0] * max_size[1]
    grid = [min_dim + k * divisible for k in range(0, 4096) if min_dim + k * divisible <= dim_limit]
    found = set()
    for w in grid:
        heights = [h for h in grid if w * h <= area]
        if heights:
            found.add((w, max(heights)))
            if w == base_res[0] and base_res[1] in heights and base_res[1] < max(heights):
                found.add(tuple(base_res))
    for h in grid:
        widths = [w for w in grid if w * h <= area]
        if widths:
            found.add((max(widths), h))
    return sorted(found, key=lambda r: (r[0], -r[1]))


def test_defaults_reproduce_novelai_published_buckets():
    table = bucket_table(ArbConfig())
    assert [(w, h) for w, h, _ in table] == NOVELAI_README_BUCKETS
    # naifu's aspect array, including the inserted 512x512 with its hard-coded aspect 1
    assert [round(a, 8) for _, _, a in table] == NOVELAI_README_ASPECTS


BLOCKS = [
    # naifu config/multi-gpu.yaml, and BPModel's 768 and 1024 runs
    dict(base_res=[512, 512], max_size=[768, 512], divisible=64, min_dim=256, dim_limit=1024),
    dict(base_res=[768, 768], max_size=[1152, 768], divisible=64, min_dim=256, dim_limit=1536),
    dict(base_res=[1024, 1024], max_size=[1536, 1024], divisible=64, min_dim=256, dim_limit=2048),
    # base_res off the grid (never inserted), non-square base_res, dim_limit binding, tiny demo sizes
    dict(base_res=[500, 500], max_size=[768, 512], divisible=64, min_dim=256, dim_limit=1024),
    dict(base_res=[512, 768], max_size=[768, 768], divisible=64, min_dim=256, dim_limit=1024),
    dict(base_res=[512, 512], max_size=[1024, 1024], divisible=32, min_dim=320, dim_limit=768),
    dict(base_res=[256, 256], max_size=[384, 256], divisible=64, min_dim=128, dim_limit=512),
    dict(base_res=[64, 64], max_size=[96, 64], divisible=16, min_dim=32, dim_limit=128),
    dict(base_res=[512, 512], max_size=[512, 512], divisible=64, min_dim=512, dim_limit=512),
]


def unvalidated(block):
    """naifu's algorithm runs on any block, trainable or not (e.g. base_res 500): no validation here."""
    return ArbConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in block.items()})


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b['base_res']}-{b['max_size']}-{b['divisible']}")
def test_bucket_list_matches_independent_enumeration(block):
    assert generate_buckets(unvalidated(block)) == brute_force_buckets(**block)


def test_bucket_list_matches_on_random_blocks():
    rng = random.Random(1234)
    checked = 0
    while checked < 150:
        div = rng.choice([8, 16, 32, 64, 128])
        md = rng.choice([64, 128, 256, 320, 512])
        ms = [rng.randrange(md, 1600, 8), rng.randrange(md, 1600, 8)]
        if md * md > ms[0] * ms[1]:
            continue
        dl = rng.choice([md, md + 3 * div, 768, 1024, 1536, 2048])
        b = md + div * rng.randrange(0, 10)
        base = [b, b] if rng.random() < 0.7 else [b, md + div * rng.randrange(0, 10)]
        block = dict(base_res=base, max_size=ms, divisible=div, min_dim=md, dim_limit=dl)
        assert generate_buckets(unvalidated(block)) == brute_force_buckets(**block), block
        checked += 1


def test_max_size_is_an_area_budget():
    cfg = ArbConfig.from_dict(dict(base_res=[768, 768], max_size=[1152, 768], dim_limit=1536))
    buckets = generate_buckets(cfg)
    assert all(w * h <= 1152 * 768 for w, h in buckets)
    assert all(w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert (768, 768) in buckets and (1536, 576) in buckets  # wider than max_size[0], within the area


@pytest.mark.parametrize("block, fragment", [
    ({"base_res": [512]}, "arb.base_res"),
    ({"max_size": "768x512"}, "arb.max_size"),
    ({"divisible": 0}, "arb.divisible"),
    ({"min_dim": 12.5}, "arb.min_dim"),
    ({"max_ar_error": -1}, "arb.max_ar_error"),
    ({"enabled": "yes"}, "arb.enabled"),
    ({"max_sise": [768, 512]}, "arb.max_sise"),
    ({"min_dim": 1024, "max_size": [768, 512]}, "no bucket fits"),
    ({"min_dim": 512, "dim_limit": 256, "max_size": [1024, 1024]}, "dim_limit"),
])
def test_invalid_arb_blocks_name_the_key(block, fragment):
    with pytest.raises(ConfigError) as exc:
        ArbConfig.from_dict(block, source="run.yaml")
    assert fragment in str(exc.value) and "run.yaml" in str(exc.value)


def test_naifu_step_size_is_accepted_and_ignored():
    assert generate_buckets(ArbConfig.from_dict({"step_size": 8})) == generate_buckets(ArbConfig())


def test_log_rule_is_symmetric_for_tall_and_wide():
    cfg = ArbConfig()
    buckets = generate_buckets(cfg)
    rng = random.Random(5)
    for _ in range(300):
        w, h = rng.randint(100, 4000), rng.randint(100, 4000)
        a = buckets[assign_bucket((w, h), buckets)]
        b = buckets[assign_bucket((h, w), buckets)]
        assert a == (b[1], b[0]), (w, h)


def test_linear_rule_is_naifus_argmin_on_naifu_aspects():
    table = bucket_table(ArbConfig())
    buckets = [(w, h) for w, h, _ in table]
    aspects = [a for _, _, a in table]
    rng = random.Random(7)
    sizes = [(rng.randint(64, 3000), rng.randint(64, 3000)) for _ in range(500)]
    got = assign_buckets(sizes, buckets, rule="linear", aspects=aspects)
    for (w, h), g in zip(sizes, got):
        errors = [abs(a - w / h) for a in aspects]
        assert g == errors.index(min(errors))


def test_linear_rule_is_asymmetric_and_log_is_not():
    # Worked by hand: w/h = 2.416 lies between buckets 896x384 (2.333) and 960x384 (2.5). The linear midpoint is
    # 2.4167, the log midpoint sqrt(2.333*2.5) = 2.415: linear picks 896x384, log picks 960x384. The mirrored tall
    # image (0.4139, between 384x960 = 0.4 and 384x896 = 0.4286) goes to 384x960 under both rules.
    buckets = generate_buckets(ArbConfig())
    assert buckets[assign_bucket((2416, 1000), buckets, rule="linear")] == (896, 384)
    assert buckets[assign_bucket((1000, 2416), buckets, rule="linear")] == (384, 960)
    assert buckets[assign_bucket((2416, 1000), buckets, rule="log")] == (960, 384)
    assert buckets[assign_bucket((1000, 2416), buckets, rule="log")] == (384, 960)


def test_max_ar_error_has_naifus_linear_meaning():
    cfg = ArbConfig.from_dict({"max_ar_error": 4})
    buckets = generate_buckets(cfg)
    widest = max(w / h for w, h in buckets)  # 4.0 for the defaults
    # tall images are never removed: their w/h is within 1 of every tall bucket
    assert assign_bucket((10, 10000), buckets, max_ar_error=4) is not None
    # wide images only beyond widest + 4
    assert assign_bucket((int((widest + 3.9) * 100), 100), buckets, max_ar_error=4) is not None
    assert assign_bucket((int((widest + 4.1) * 100), 100), buckets, max_ar_error=4) is None
    assert assign_bucket((1000, 1000), buckets, max_ar_error=0.01) is not None
    assert assign_bucket((1000, 1300), buckets, max_ar_error=0.01) is None


def test_cover_size_covers_and_keeps_aspect():
    rng = random.Random(3)
    for _ in range(500):
        img = (rng.randint(16, 5000), rng.randint(16, 5000))
        bucket = (rng.choice(range(64, 1600, 64)), rng.choice(range(64, 1600, 64)))
        nw, nh = cover_size(img, bucket)
        assert nw >= bucket[0] and nh >= bucket[1]
        assert nw == bucket[0] or nh == bucket[1]  # one side fits exactly: minimal cover
        assert abs(nw / nh - img[0] / img[1]) <= (1 / min(nw, nh)) * (img[0] / img[1]) + 1e-9
        frac = crop_fraction(img, bucket)
        assert 0.0 <= frac < 1.0
    assert crop_fraction((1000, 500), (512, 256)) == 0.0
    assert crop_fraction((1000, 1000), (512, 256)) == pytest.approx(0.5)
