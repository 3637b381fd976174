"""Validation without training: the held-out split (stratified, ranked by the documented hash, capped), the fixed
noise and timesteps, the best tracker, the exact summary, list files and validation folders. The trainer side is
in test_train_validation.py, the config section and the UI side in test_ui_validation.py."""

from __future__ import annotations

import hashlib
import math
import random
from pathlib import Path

import pytest
import torch

from bp_trainer.train import config as C
from bp_trainer.train import validation as V


# ------------------------------------------------------------------------------------------------ the split


def _sha_rank(seed, key):
    return hashlib.sha256(f"split:{seed}:{key}".encode()).digest()


def test_split_is_stratified_by_bucket_ranked_by_the_documented_hash_and_order_free():
    sizes = {(64, 64): 20, (64, 96): 7, (96, 64): 2, (32, 128): 1}
    keys, buckets = [], []
    for b, n in sizes.items():
        for i in range(n):
            keys.append(f"{b[0]}x{b[1]}/img{i:03d}.png")
            buckets.append(b)
    keys.append("skipped.png")
    buckets.append(None)  # max_ar_error dropped it: never held out
    chosen = V.choose_held_out(keys, buckets, fraction=0.1, max_images=100, seed=5)
    held = {keys[i] for i in chosen}
    per_bucket = {b: sum(1 for i in chosen if buckets[i] == b) for b in sizes}
    # round(0.1 * n), at least one per bucket that has two images or more, none from a bucket of one
    assert per_bucket == {(64, 64): 2, (64, 96): 1, (96, 64): 1, (32, 128): 0}
    for b in sizes:  # inside a bucket: the lowest sha256("split:SEED:KEY") ranks
        members = [k for k, bb in zip(keys, buckets) if bb == b]
        assert {k for k in members if k in held} == set(sorted(members, key=lambda k: _sha_rank(5, k))[:per_bucket[b]])
    # the input order does not matter; another seed picks other images
    order = list(range(len(keys)))
    random.Random(1).shuffle(order)
    again = V.choose_held_out([keys[i] for i in order], [buckets[i] for i in order], fraction=0.1, max_images=100,
                              seed=5)
    assert {keys[order[i]] for i in again} == held
    other = {keys[i] for i in V.choose_held_out(keys, buckets, fraction=0.1, max_images=100, seed=6)}
    assert other != held and len(other) == len(held)


def test_quotas_over_max_images_keep_every_bucket_then_share_in_proportion():
    counts = {(64, 64): 100, (64, 96): 10, (96, 64): 2}
    assert V.bucket_quotas(counts, 0.5, 1000) == {(64, 64): 50, (64, 96): 5, (96, 64): 1}
    # 56 wanted, 10 allowed: 1 each, the other 7 by largest remainder of 49:4 (6.47, 0.53) -> 6 + 1
    assert V.bucket_quotas(counts, 0.5, 10) == {(64, 64): 7, (64, 96): 2, (96, 64): 1}
    assert V.bucket_quotas(counts, 0.5, 2) == {(64, 64): 1, (64, 96): 1}  # the largest buckets first
    # a validation folder (nothing of it trains): a bucket may give all its images
    assert V.bucket_quotas({(64, 64): 3, (96, 64): 1}, 1.0, 100, leave_one=False) == {(64, 64): 3, (96, 64): 1}


def test_fixed_noise_follows_the_documented_derivation():
    seed, key, K, T = 3, "subset_a/00004.png", 4, 1000
    noise, t = V.fixed_noise(seed, key, (4, 8, 12), K, T)
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    g = torch.Generator("cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    u = torch.rand(K, generator=g, dtype=torch.float64)
    expect_t = [math.floor((k + float(u[k])) * T / K) for k in range(K)]
    expect_noise = torch.randn((K, 4, 8, 12), generator=g)
    assert t.tolist() == expect_t and torch.equal(noise, expect_noise)
    assert all(k * T / K <= t[k] < (k + 1) * T / K for k in range(K))  # one timestep per quantile
    n2, t2 = V.fixed_noise(seed, key, (4, 8, 12), K, T)
    assert torch.equal(n2, noise) and torch.equal(t2, t)  # not the RNG state of anything else
    n3, _ = V.fixed_noise(seed, "subset_a/00006.png", (4, 8, 12), K, T)
    assert not torch.equal(n3, noise)


def test_best_tracker_counts_evaluations_without_improvement():
    tr = V.BestTracker()
    for step, loss in [(2, 0.9), (4, 0.5), (6, 0.5), (8, 0.7)]:
        tr = tr.after(step, loss)
    assert (tr.best_step, tr.best_loss, tr.since_best, tr.evaluations) == (4, 0.5, 2, 4)
    assert tr.patience_exhausted(2) and not tr.patience_exhausted(3) and not tr.patience_exhausted(0)
    assert V.BestTracker.from_dict(tr.to_dict()) == tr and V.BestTracker.from_dict(None) == V.BestTracker()


def test_summary_is_exact_and_grouped_by_bucket():
    ims = [V.HeldOut(f"k{i}", f"/p{i}", "c", size) for i, size in enumerate([(64, 64), (64, 64), (96, 64)])]
    res = V.summarize(ims, [0.1, 0.2, 0.4], None)
    assert res.loss == math.fsum([0.1, 0.2, 0.4]) / 3 and res.ema_loss is None and res.images == 3
    assert res.buckets["64x64"] == V.BucketLoss(2, math.fsum([0.1, 0.2]) / 2, None)
    assert res.buckets["96x64"].loss == 0.4
    assert res.scalars() == {"validation/loss": res.loss, "validation/64x64": res.buckets["64x64"].loss,
                             "validation/96x64": 0.4}


# ------------------------------------------------------------------------------------------------ sources


def test_a_list_file_must_name_dataset_images(tmp_path):
    from bp_trainer.dataset import CaptionProcessor, scan_dataset
    from bp_trainer.dataset.demo import write_demo_dataset
    from bp_trainer.errors import BPError

    data = tmp_path / "ds"
    write_demo_dataset(data, count=6, seed=1)
    listed = tmp_path / "val.txt"
    listed.write_text("# held out\nsubset_a/00000.png\n\nsubset_b/00003.jpg\n")
    cfg = C.validate({"dataset": {"path": str(data)}, "validation": {"path": str(listed)},
                      "arb": {"base_res": [64, 64], "max_size": [96, 64], "divisible": 32, "min_dim": 32,
                              "dim_limit": 128}}, check_paths=False)
    scan = scan_dataset(data)
    held = V.build_validation_set(cfg, scan, CaptionProcessor())
    assert [(im.size, im.key) for im in held.images] == sorted((im.size, im.key) for im in held.images)
    assert set(held.keys()) == {"subset_a/00000.png", "subset_b/00003.jpg"}
    assert held.excluded == {str((data / k).resolve()) for k in held.keys()}
    caption = (data / "subset_a" / "00000.txt").read_text().strip()
    assert next(im.caption for im in held.images if im.key == "subset_a/00000.png") == caption
    listed.write_text("../elsewhere.png\n")
    with pytest.raises(BPError, match=r"line 1: '../elsewhere.png' is not an image of the dataset"):
        V.build_validation_set(cfg, scan, CaptionProcessor())


def test_a_validation_folder_inside_the_dataset_leaves_training(tmp_path):
    from bp_trainer.dataset import scan_dataset
    from bp_trainer.dataset.demo import write_demo_dataset
    from bp_trainer.train.data import build_data

    data = tmp_path / "ds"
    write_demo_dataset(data, count=8, seed=2)
    cfg = C.validate({"dataset": {"path": str(data), "shuffle_tags": True, "caption_dropout": 1.0},
                      "validation": {"path": str(data / "subset_b"), "max_images": 3},
                      "training": {"batch_size": 1}, "arb": {"base_res": [64, 64], "max_size": [96, 64],
                                                             "divisible": 32, "min_dim": 32, "dim_limit": 128}},
                     check_paths=False)
    built = build_data(cfg, rank=0, world_size=1)
    held = built["validation"]
    subset_b = {p.name for p in (data / "subset_b").iterdir() if p.suffix != ".txt"}
    assert len(held.images) == 3 and {im.key for im in held.images} <= subset_b  # keys relative to the folder
    assert all(im.caption == (Path(im.path).with_suffix(".txt")).read_text().strip() for im in held.images)
    trained = {Path(it.path).name for it in built["items"]}
    everything = {Path(it.path).name for it in scan_dataset(data).items}
    assert trained == everything - {im.key for im in held.images} and built["images"] == len(trained)


def test_a_split_with_nothing_to_hold_out_is_one_clear_error(tmp_path):
    from bp_trainer.dataset import CaptionProcessor, ImageItem, ScanResult
    from bp_trainer.errors import BPError

    root = tmp_path / "ds"
    scan = ScanResult(str(root), [ImageItem(str(root / "wide.png"), 96, 64, "a", None),
                                  ImageItem(str(root / "tall.png"), 64, 96, "b", None)])
    cfg = C.validate({"dataset": {"path": str(root)}, "validation": {"fraction": 0.5},
                      "arb": {"base_res": [64, 64], "max_size": [96, 64], "divisible": 32, "min_dim": 32,
                              "dim_limit": 128}}, check_paths=False)
    with pytest.raises(BPError, match="no image can be held out for validation") as err:
        V.build_validation_set(cfg, scan, CaptionProcessor())  # two buckets of one image each
    assert "a bucket of one image holds none out" in str(err.value)
