"""Bucketed batches: every batch from one bucket, seeded per epoch, sharded by global rank, resumable.

Each epoch is a pure function of `(seed, epoch)` and the bucket assignments, computed identically on every rank:

1. Shuffle the kept items (those with a bucket) with `numpy.random.default_rng([seed, epoch])`.
2. Cut each bucket's items, in that order, into full batches of `batch_size`.
3. Leftovers (each bucket's last `n % batch_size` items), by policy:
   - `"pool"` (naifu-diffusion): pooled across buckets, shuffled, cut into full batches at `base_res`;
     the last partial pool batch (fewer than `batch_size` images) is skipped this epoch;
   - `"short"`: one short batch per bucket, at the bucket's size;
   - `"drop"`: skipped this epoch.
4. So that every rank gets the same number of batches, `len(batches) % world_size` batches are skipped this epoch
   (short batches first, smallest first; then pool batches; then full ones; ties drawn at random).
5. Shuffle the batch order. Rank `r` takes batches `r, r + world_size, ...`.

Across ranks every image that is not skipped this epoch appears in exactly one batch, and the skipped ones change
from epoch to epoch. Sharding uses the **global** rank (naifu used the local rank, which repeats data on every
node). Drawing whole batches in a shuffled order is the same distribution as naifu's "pick a bucket weighted by
the items it has left".

The position in the epoch is state: `state_dict()` / `load_state_dict()` restore it, and the resumed run gets
exactly the batches the uninterrupted run would have had. A DataLoader with workers fetches ahead of the training
step, so pass the number of batches actually trained to `state_dict(consumed=...)`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from bp_trainer.errors import BPError

LEFTOVER_POLICIES = ("pool", "short", "drop")


class Batch(NamedTuple):
    indices: "List[int]"
    size: "Tuple[int, int]"  # (w, h) the images are resized and cropped to


class _Planned(NamedTuple):
    bucket: int  # -1: leftover pool
    kind: int  # 0 short, 1 pool, 2 full (drop priority: lowest first)
    indices: "List[int]"


class BucketBatchSampler:
    """Batches of item indices, each from one bucket, for one rank.

    `assignments[i]` is item i's bucket index in `buckets` (None or -1: not used, e.g. skipped by max_ar_error).
    """

    def __init__(
        self,
        assignments: "Sequence[Optional[int]]",
        buckets: "Sequence[Tuple[int, int]]",
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        leftover: str = "pool",
        base_res: "Optional[Tuple[int, int]]" = None,
    ):
        if batch_size < 1:
            raise BPError(f"batch size must be at least 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise BPError(f"rank {rank} is not within world size {world_size}")
        if leftover not in LEFTOVER_POLICIES:
            raise BPError(f"unknown leftover policy {leftover!r}", hint=f"use one of {', '.join(LEFTOVER_POLICIES)}")
        if leftover == "pool" and base_res is None:
            raise BPError("leftover policy 'pool' needs base_res (the size pooled leftovers are trained at)")
        self.buckets = [(int(w), int(h)) for w, h in buckets]
        nb = len(self.buckets)
        assign = np.full(len(assignments), -1, dtype=np.int64)
        for i, a in enumerate(assignments):
            if a is not None and a >= 0:
                if a >= nb:
                    raise BPError(f"item {i} is assigned to bucket {a}, but there are only {nb} buckets")
                assign[i] = a
        self._assign = assign
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.leftover = leftover
        self.base_res = (int(base_res[0]), int(base_res[1])) if base_res is not None else None
        self.epoch = 0
        self._position = 0
        self._cache: "Optional[Tuple[int, List[_Planned]]]" = None
        self._len = self._batches_per_rank()
        self._fingerprint = self._make_fingerprint()

    @classmethod
    def from_sizes(
        cls,
        sizes: "Sequence[Tuple[int, int]]",
        arb: Any,
        batch_size: int,
        *,
        rule: str = "log",
        **kwargs: Any,
    ) -> "BucketBatchSampler":
        """Build from image sizes and an `ArbConfig`: naifu's buckets, nearest-bucket assignment, base_res pool."""
        from bp_trainer.buckets import assign_buckets, bucket_table

        table = bucket_table(arb)
        buckets = [(w, h) for w, h, _ in table]
        assignments = assign_buckets(
            sizes, buckets, rule=rule, aspects=[a for _, _, a in table], max_ar_error=arb.max_ar_error
        )
        kwargs.setdefault("base_res", tuple(arb.base_res))
        return cls(assignments, buckets, batch_size, **kwargs)

    # -- sizes ---------------------------------------------------------------------------------------------
    @property
    def num_items(self) -> int:
        """Items that have a bucket (the ones an epoch draws from)."""
        return int((self._assign >= 0).sum())

    def _global_batch_count(self) -> int:
        counts = np.bincount(self._assign[self._assign >= 0], minlength=len(self.buckets))
        full = int((counts // self.batch_size).sum())
        rem = counts % self.batch_size
        if self.leftover == "pool":
            return full + int(rem.sum()) // self.batch_size
        if self.leftover == "short":
            return full + int((rem > 0).sum())
        return full

    def _batches_per_rank(self) -> int:
        return self._global_batch_count() // self.world_size

    def __len__(self) -> int:
        """Batches per epoch for this rank (the same on every rank and in every epoch)."""
        return self._len

    # -- epochs --------------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch (a no-op when already in it, so a restored position is kept)."""
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self._position = 0

    def _rng(self, epoch: int) -> "np.random.Generator":
        return np.random.default_rng([self.seed & 0xFFFFFFFFFFFFFFFF, int(epoch) & 0xFFFFFFFFFFFFFFFF, 0xB0C4E7])

    def _plan(self, epoch: int) -> "List[_Planned]":
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = self._rng(epoch)
        bsz = self.batch_size
        kept = np.flatnonzero(self._assign >= 0)
        order = kept[rng.permutation(len(kept))]
        # stable sort by bucket keeps the random order inside each bucket
        by_bucket = order[np.argsort(self._assign[order], kind="stable")]
        bucket_of = self._assign[by_bucket]
        planned: "List[_Planned]" = []
        pool: "List[int]" = []
        starts = np.flatnonzero(np.r_[True, bucket_of[1:] != bucket_of[:-1]]) if len(by_bucket) else np.array([], int)
        ends = np.r_[starts[1:], len(by_bucket)] if len(starts) else np.array([], int)
        for s, e in zip(starts.tolist(), ends.tolist()):
            b = int(bucket_of[s])
            items = by_bucket[s:e].tolist()
            full = len(items) // bsz
            for k in range(full):
                planned.append(_Planned(b, 2, items[k * bsz:(k + 1) * bsz]))
            rest = items[full * bsz:]
            if rest:
                if self.leftover == "pool":
                    pool.extend(rest)
                elif self.leftover == "short":
                    planned.append(_Planned(b, 0, rest))
        if pool:
            pool_arr = np.asarray(pool)[rng.permutation(len(pool))].tolist()
            for k in range(len(pool_arr) // bsz):
                planned.append(_Planned(-1, 1, pool_arr[k * bsz:(k + 1) * bsz]))
        excess = len(planned) % self.world_size
        if excess:
            ties = rng.random(len(planned))
            drop_order = sorted(range(len(planned)), key=lambda i: (planned[i].kind, len(planned[i].indices), ties[i]))
            dropped = set(drop_order[:excess])
            planned = [p for i, p in enumerate(planned) if i not in dropped]
        planned = [planned[i] for i in rng.permutation(len(planned)).tolist()]
        self._cache = (epoch, planned)
        return planned

    def _batch(self, p: _Planned) -> Batch:
        size = self.base_res if p.bucket < 0 else self.buckets[p.bucket]
        return Batch(list(p.indices), size)  # type: ignore[arg-type]

    def global_batches(self, epoch: "Optional[int]" = None) -> "List[Batch]":
        """All ranks' batches of an epoch, in order (rank r gets every world_size-th one starting at r)."""
        return [self._batch(p) for p in self._plan(self.epoch if epoch is None else epoch)]

    def epoch_batches(self, epoch: "Optional[int]" = None) -> "List[Batch]":
        """This rank's batches of an epoch, in order."""
        return self.global_batches(epoch)[self.rank::self.world_size]

    def skipped_this_epoch(self, epoch: "Optional[int]" = None) -> "List[int]":
        """Items with a bucket that no rank sees in this epoch (leftovers / rounding to the world size)."""
        seen = {i for p in self._plan(self.epoch if epoch is None else epoch) for i in p.indices}
        return [int(i) for i in np.flatnonzero(self._assign >= 0) if int(i) not in seen]

    def __iter__(self) -> "Iterator[Batch]":
        mine = self.epoch_batches(self.epoch)
        while self._position < len(mine):
            batch = mine[self._position]
            self._position += 1
            yield batch
        # epoch finished: the next iteration (or a state saved now) continues with the next epoch
        self.epoch += 1
        self._position = 0

    def keyed(self) -> "KeyedBatches":
        """For `DataLoader(dataset, batch_sampler=sampler.keyed())`: batches of `(index, w, h)` keys."""
        return KeyedBatches(self)

    # -- state ---------------------------------------------------------------------------------------------
    def _make_fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(self._assign.astype("<i8").tobytes())
        h.update(json.dumps([self.buckets, self.batch_size, self.world_size, self.leftover, self.base_res]).encode())
        return h.hexdigest()[:16]

    def state_dict(self, consumed: "Optional[int]" = None) -> "Dict[str, Any]":
        """Where this rank is: epoch and batches done in it. `consumed` overrides the batches-yielded count."""
        position = self._position if consumed is None else int(consumed)
        epoch = self.epoch
        if position >= self._len and self._len > 0:
            epoch, position = epoch + 1, 0
        return {
            "version": 1,
            "epoch": int(epoch),
            "position": int(position),
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "fingerprint": self._fingerprint,
        }

    def load_state_dict(self, state: "Dict[str, Any]") -> None:
        """Continue where `state` left off. The dataset, buckets, batch size, world size and seed must match."""
        if not isinstance(state, dict) or state.get("version") != 1:
            raise BPError("sampler state is not from this version of BP Train")
        if state.get("fingerprint") != self._fingerprint or state.get("seed") != self.seed:
            changed = []
            if state.get("world_size") != self.world_size:
                changed.append(f"world size {state.get('world_size')} -> {self.world_size}")
            if state.get("seed") != self.seed:
                changed.append(f"seed {state.get('seed')} -> {self.seed}")
            detail = ", ".join(changed) or "the dataset, buckets, batch size or leftover policy changed"
            raise BPError(
                f"cannot resume the batch order exactly: {detail}",
                hint="resume with the same dataset and settings, or start a new run",
            )
        position = int(state["position"])
        if not 0 <= position <= self._len:
            raise BPError(f"sampler state position {position} is outside 0..{self._len}")
        self.epoch = int(state["epoch"])
        self._position = position


class KeyedBatches:
    """A batch sampler view for torch's DataLoader: each batch is a list of `(index, w, h)`."""

    def __init__(self, sampler: BucketBatchSampler):
        self.sampler = sampler

    def __iter__(self) -> "Iterator[List[Tuple[int, int, int]]]":
        for batch in self.sampler:
            w, h = batch.size
            yield [(i, w, h) for i in batch.indices]

    def __len__(self) -> int:
        return len(self.sampler)
