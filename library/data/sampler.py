"""Batches drawn from one bucket at a time, seeded per epoch, split across ranks, resumable at any batch.

Per epoch (sd-scripts shuffles each bucket, cuts it into batches and shuffles the batch order; so do we, with a
generator seeded by (seed, epoch) instead of the global `random`):
1. the keys of each bucket are shuffled and cut into batches of that bucket's batch size (the last one may be short);
2. the list of all batches is shuffled;
3. rank r of W takes batches r, r + W, r + 2W, ... When the count is not a multiple of W the list is first extended
   by wrapping around to its start (as torch's DistributedSampler pads), so every rank runs the same number of
   steps; with W = 1 every key is used exactly once per epoch.
"""

from __future__ import annotations

import math
import random
from typing import Iterator


class BucketBatchSampler:
    """Yields lists of keys; `groups[i]` holds the keys of bucket i (repeats already expanded)."""

    def __init__(self, groups: list[list[int]], batch_sizes: list[int], seed: int, rank: int = 0, world_size: int = 1):
        if len(groups) != len(batch_sizes):
            raise ValueError("one batch size per bucket group is needed")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if any(bs < 1 for bs in batch_sizes):
            raise ValueError("batch sizes must be at least 1")
        self.groups = [list(g) for g in groups]
        self.batch_sizes = list(batch_sizes)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.total_batches = sum(math.ceil(len(g) / bs) for g, bs in zip(self.groups, self.batch_sizes))
        self.epoch = 0
        self.position = 0  # batches of this epoch already handed out

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return math.ceil(self.total_batches / self.world_size)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of `epoch`, in order (a pure function of seed, epoch, rank and the groups)."""
        rng = random.Random(f"bucket-batch-sampler:{self.seed}:{epoch}")
        batches = []
        for keys, bs in zip(self.groups, self.batch_sizes):
            keys = list(keys)
            rng.shuffle(keys)
            batches.extend(keys[i:i + bs] for i in range(0, len(keys), bs))
        rng.shuffle(batches)
        if not batches:
            return []
        padded = [batches[i % len(batches)] for i in range(len(self) * self.world_size)]
        return padded[self.rank::self.world_size]

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.epoch_batches(self.epoch)
        while self.position < len(batches):
            self.position += 1
            yield batches[self.position - 1]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("seed", self.seed) != self.seed:
            raise ValueError(f"resume state was made with seed {sd['seed']}, this run uses {self.seed}")
        self.epoch, self.position = int(sd["epoch"]), int(sd["position"])
