"""Bucket batch sampler: one bucket per batch, global-rank sharding, leftovers, seeded epochs, exact resume."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from bp_trainer.buckets import ArbConfig, generate_buckets
from bp_trainer.dataset.sampler import BucketBatchSampler
from bp_trainer.errors import BPError

BUCKETS = [(256, 768), (384, 640), (512, 512), (640, 384), (768, 256)]
BASE = (512, 512)


def make_assignments(n=157, seed=0, skipped=0.05):
    rng = random.Random(seed)
    # uneven bucket sizes, some tiny, plus items without a bucket (rejected by max_ar_error)
    weights = [1, 6, 12, 5, 0.3]
    out = []
    for _ in range(n):
        out.append(None if rng.random() < skipped else rng.choices(range(len(BUCKETS)), weights)[0])
    return out


def all_ranks(assign, bsz, ws, leftover, seed=3, epoch=0):
    samplers = [BucketBatchSampler(assign, BUCKETS, bsz, seed=seed, rank=r, world_size=ws, leftover=leftover,
                                   base_res=BASE) for r in range(ws)]
    for s in samplers:
        s.set_epoch(epoch)
    return samplers, [list(s) for s in samplers]


@pytest.mark.parametrize("leftover", ["pool", "short", "drop"])
@pytest.mark.parametrize("bsz, ws", [(1, 1), (4, 1), (3, 2), (4, 3), (2, 4), (5, 4)])
def test_every_kept_image_once_per_epoch_and_equal_batches(leftover, bsz, ws):
    assign = make_assignments()
    kept = {i for i, a in enumerate(assign) if a is not None}
    for epoch in (0, 1):
        samplers, batches = all_ranks(assign, bsz, ws, leftover, epoch=epoch)
        lengths = {len(b) for b in batches}
        assert lengths == {len(samplers[0])}, "every rank gets the same number of batches"
        seen = Counter(i for rank in batches for batch in rank for i in batch.indices)
        assert max(seen.values()) == 1, "no image twice in an epoch, across all ranks"
        skipped = kept - set(seen)
        assert set(seen) <= kept
        assert sorted(skipped) == samplers[0].skipped_this_epoch(epoch)
        for rank in batches:
            for batch in rank:
                buckets = {assign[i] for i in batch.indices}
                if batch.size == BASE and leftover == "pool" and len(buckets) > 1:
                    continue  # a leftover-pool batch, trained at base_res
                assert len(buckets) == 1 and BUCKETS[buckets.pop()] == batch.size, "one bucket per batch"
                if leftover != "short":
                    assert len(batch.indices) == bsz
        # how many are left out: at most the partial leftovers plus ws-1 batches for even sharding
        per_bucket = Counter(assign[i] for i in kept)
        remainders = sum(n % bsz for n in per_bucket.values())
        bound = {"pool": bsz - 1, "short": 0, "drop": remainders}[leftover] + (ws - 1) * bsz
        assert len(skipped) <= bound


def test_pool_batches_mix_buckets_at_base_res_and_short_batches_stay_in_bucket():
    assign = make_assignments(seed=4)
    _, (pool,) = all_ranks(assign, 8, 1, "pool")
    pooled = [b for b in pool if len({assign[i] for i in b.indices}) > 1]
    assert pooled and all(b.size == BASE and len(b.indices) == 8 for b in pooled)
    _, (short,) = all_ranks(assign, 8, 1, "short")
    assert any(len(b.indices) < 8 for b in short)
    assert all(len({assign[i] for i in b.indices}) == 1 for b in short)


def test_seeded_epochs_reproducible_and_different():
    assign = make_assignments()
    a = BucketBatchSampler(assign, BUCKETS, 4, seed=7, base_res=BASE)
    b = BucketBatchSampler(assign, BUCKETS, 4, seed=7, base_res=BASE)
    c = BucketBatchSampler(assign, BUCKETS, 4, seed=8, base_res=BASE)
    assert a.epoch_batches(0) == b.epoch_batches(0)
    assert a.epoch_batches(0) != a.epoch_batches(1)
    assert a.epoch_batches(0) != c.epoch_batches(0)
    # the images left out change from epoch to epoch
    d = BucketBatchSampler(assign, BUCKETS, 5, seed=7, world_size=2, base_res=BASE)  # 144 kept: 4 left out
    left = [tuple(d.skipped_this_epoch(e)) for e in range(6)]
    assert all(left) and len(set(left)) > 1


def test_len_is_constant_across_epochs():
    assign = make_assignments()
    s = BucketBatchSampler(assign, BUCKETS, 3, seed=1, world_size=3, rank=2, leftover="short", base_res=BASE)
    assert {len(s.epoch_batches(e)) for e in range(8)} == {len(s)}


@pytest.mark.parametrize("ws", [1, 3])
def test_resume_continues_with_exactly_the_uninterrupted_batches(ws):
    assign = make_assignments(n=120)
    for rank in range(ws):
        def make():
            return BucketBatchSampler(assign, BUCKETS, 4, seed=11, rank=rank, world_size=ws, base_res=BASE)

        straight = make()
        reference = []
        for epoch in range(3):
            straight.set_epoch(epoch)
            reference += [b for b in straight]
        per_epoch = len(straight)
        for stop in (0, 1, per_epoch - 1, per_epoch, per_epoch + 2, 2 * per_epoch + 1):
            first = make()
            got = []
            for epoch in range(3):
                first.set_epoch(epoch)
                it = iter(first)
                while len(got) < stop:  # train `stop` batches in all, then "crash"
                    b = next(it, None)
                    if b is None:
                        break
                    got.append(b)
                if len(got) == stop:
                    break
            state = first.state_dict()
            resumed = make()
            resumed.load_state_dict(state)
            for epoch in range(state["epoch"], 3):
                resumed.set_epoch(epoch)  # a trainer's loop: keeps the restored position in the first epoch
                got += [b for b in resumed]
            assert got == reference, (rank, stop)


def test_state_with_prefetching_dataloader_uses_consumed_count():
    assign = make_assignments(n=80)
    s = BucketBatchSampler(assign, BUCKETS, 2, seed=5, base_res=BASE)
    it = iter(s)
    fetched = [next(it) for _ in range(6)]  # a loader fetched 6 ...
    state = s.state_dict(consumed=4)  # ... but only 4 were trained
    r = BucketBatchSampler(assign, BUCKETS, 2, seed=5, base_res=BASE)
    r.load_state_dict(state)
    assert list(r)[:2] == fetched[4:6]


def test_resume_with_other_settings_is_refused():
    assign = make_assignments(n=80)
    state = BucketBatchSampler(assign, BUCKETS, 2, seed=5, world_size=2, base_res=BASE).state_dict()
    with pytest.raises(BPError, match="world size 2 -> 4"):
        BucketBatchSampler(assign, BUCKETS, 2, seed=5, world_size=4, base_res=BASE).load_state_dict(state)
    with pytest.raises(BPError, match="cannot resume"):
        BucketBatchSampler(assign[:-1], BUCKETS, 2, seed=5, world_size=2, base_res=BASE).load_state_dict(state)
    with pytest.raises(BPError, match="seed"):
        BucketBatchSampler(assign, BUCKETS, 2, seed=6, world_size=2, base_res=BASE).load_state_dict(state)


def test_global_rank_sharding_across_nodes():
    # 2 nodes x 2 GPUs: local ranks 0,1 repeat on each node; global ranks 0..3 must not share any image
    assign = make_assignments(n=200)
    _, batches = all_ranks(assign, 4, 4, "pool")
    sets = [{i for b in rank for i in b.indices} for rank in batches]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not sets[a] & sets[b]


def test_bad_arguments():
    with pytest.raises(BPError, match="rank"):
        BucketBatchSampler([0], BUCKETS, 1, rank=2, world_size=2, base_res=BASE)
    with pytest.raises(BPError, match="base_res"):
        BucketBatchSampler([0], BUCKETS, 1, leftover="pool")
    with pytest.raises(BPError, match="leftover"):
        BucketBatchSampler([0], BUCKETS, 1, leftover="keep", base_res=BASE)
    with pytest.raises(BPError, match="only 5 buckets"):
        BucketBatchSampler([7], BUCKETS, 1, base_res=BASE)


def test_from_sizes_and_torch_dataloader():
    import torch

    rng = random.Random(2)
    sizes = [(rng.randint(200, 1500), rng.randint(200, 1500)) for _ in range(60)] + [(5000, 100)]
    arb = ArbConfig.from_dict({"max_ar_error": 4})
    s = BucketBatchSampler.from_sizes(sizes, arb, 4, seed=1)
    assert s.buckets == generate_buckets(arb) and s.base_res == (512, 512)
    assert s.num_items == 60  # the 50:1 image is rejected by max_ar_error (50 - 4 >= 4)

    class Keys(torch.utils.data.Dataset):
        def __len__(self):
            return len(sizes)

        def __getitem__(self, key):
            index, w, h = key
            return torch.tensor([index, w, h])

    expected = s.epoch_batches(0)
    loader = torch.utils.data.DataLoader(Keys(), batch_sampler=s.keyed())
    got = [(b[:, 0].tolist(), (int(b[0, 1]), int(b[0, 2]))) for b in loader]
    assert got == [(b.indices, b.size) for b in expected] and len(loader) == len(s)
