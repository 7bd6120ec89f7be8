"""BucketBatchSampler: one bucket per batch, seeded order, full coverage, disjoint ranks, exact resume."""

from collections import Counter

import pytest

from library.data.sampler import BucketBatchSampler

# three buckets (keys 0-6, 7-11, 12-12) with batch sizes 2, 3, 2 -> 4 + 2 + 1 = 7 batches
GROUPS = [list(range(0, 7)), list(range(7, 12)), [12]]
SIZES = [2, 3, 2]


def bucket_of(k):
    return 0 if k < 7 else 1 if k < 12 else 2


def test_every_key_once_per_epoch_and_batches_from_one_bucket():
    s = BucketBatchSampler(GROUPS, SIZES, seed=0)
    assert len(s) == 7
    for epoch in range(3):
        s.set_epoch(epoch)
        batches = list(s)
        assert len(batches) == 7
        assert Counter(k for b in batches for k in b) == Counter(range(13))
        for b in batches:
            assert len({bucket_of(k) for k in b}) == 1
            assert len(b) <= SIZES[bucket_of(b[0])]


def test_same_seed_same_order_other_seed_or_epoch_differs():
    a, b, c = (BucketBatchSampler(GROUPS, SIZES, seed=s) for s in (1, 1, 2))
    assert a.epoch_batches(0) == b.epoch_batches(0)
    assert a.epoch_batches(0) != c.epoch_batches(0)
    assert a.epoch_batches(0) != a.epoch_batches(1)


def test_ranks_are_disjoint_and_cover_everything():
    groups, sizes = [list(range(8))], [2]  # 4 batches, 2 ranks: 2 each
    per_rank = [BucketBatchSampler(groups, sizes, seed=3, rank=r, world_size=2).epoch_batches(0) for r in range(2)]
    keys = [k for r in per_rank for b in r for k in b]
    assert sorted(keys) == list(range(8)) and len(per_rank[0]) == len(per_rank[1]) == 2


def test_uneven_batches_pad_by_wrapping():
    # 7 batches over 3 ranks -> 3 each; two batches are repeated (wrapped from the start)
    ranks = [BucketBatchSampler(GROUPS, SIZES, seed=0, rank=r, world_size=3) for r in range(3)]
    assert [len(r) for r in ranks] == [3, 3, 3]
    full = BucketBatchSampler(GROUPS, SIZES, seed=0).epoch_batches(0)
    got = [b for r in ranks for b in r.epoch_batches(0)]
    assert sorted(map(tuple, got)) == sorted(map(tuple, full + full[:2]))


def test_resume_at_any_position():
    ref = BucketBatchSampler(GROUPS, SIZES, seed=9)
    ref.set_epoch(2)
    expected = list(ref)
    for pos in range(len(expected) + 1):
        s = BucketBatchSampler(GROUPS, SIZES, seed=9)
        s.set_epoch(2)
        it = iter(s)
        for _ in range(pos):
            next(it)
        state = s.state_dict()
        assert state == {"epoch": 2, "position": pos, "seed": 9}
        t = BucketBatchSampler(GROUPS, SIZES, seed=9)
        t.load_state_dict(state)
        assert list(t) == expected[pos:]


def test_bad_arguments():
    with pytest.raises(ValueError):
        BucketBatchSampler(GROUPS, [2], seed=0)
    with pytest.raises(ValueError):
        BucketBatchSampler(GROUPS, SIZES, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError):
        BucketBatchSampler(GROUPS, SIZES, seed=0).load_state_dict({"epoch": 0, "position": 0, "seed": 5})
    assert len(BucketBatchSampler([], [], seed=0)) == 0
