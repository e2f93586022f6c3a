"""BucketBatcher: grouped batches keep each group whole; one-example groups change nothing."""

import random

import pytest

from chatforge.data.batching import BucketBatcher


def _steps(batcher: BucketBatcher, n: int) -> list[list[list[int]]]:
    return [batcher.next() for _ in range(n)]


def test_singleton_groups_give_the_ungrouped_batches():
    rng = random.Random(0)
    lengths = [rng.randint(1, 90) for _ in range(203)]
    for W in (1, 2):
        for r in range(W):
            plain = BucketBatcher(lengths, 4, 2, seed=5, rank=r, world_size=W)
            grouped = BucketBatcher(lengths, 4, 2, seed=5, rank=r, world_size=W, groups=list(range(203)))
            assert _steps(plain, 80) == _steps(grouped, 80)  # 80 steps: past two epochs


def test_groups_stay_whole_and_each_example_comes_once_an_epoch():
    rng = random.Random(1)
    n, k, B = 600, 3, 6  # groups of three, two groups to a micro-batch
    lengths = [rng.randint(1, 90) for _ in range(n)]
    groups = [f"prompt {i // k}" for i in range(n)]
    rng.shuffle(groups)  # a group's examples lie anywhere in the file
    batcher = BucketBatcher(lengths, B, 1, seed=2, groups=groups)
    seen = []
    for (micro,) in _steps(batcher, n // B):
        keys = [groups[i] for i in micro]
        assert all(keys.count(g) == k for g in keys), keys  # whole groups only
        seen += micro
    assert sorted(seen) == list(range(n))
    # length bucketing moves whole groups: a batch's groups have similar longest examples
    longest = {g: max(lengths[i] for i in range(n) if groups[i] == g) for g in set(groups)}

    def mean_spread(b: BucketBatcher) -> float:
        s = [max(longest[groups[i]] for i in m) - min(longest[groups[i]] for i in m) for (m,) in _steps(b, 100)]
        return sum(s) / len(s)

    assert mean_spread(BucketBatcher(lengths, B, 1, seed=2, groups=groups)) < 4  # measured 2.1
    assert mean_spread(BucketBatcher(lengths, B, 1, seed=2, groups=groups, bucket=False)) > 12  # measured 18.9


def test_group_keys_must_match_the_examples():
    with pytest.raises(ValueError, match="3 keys for 2 examples"):
        BucketBatcher([1, 2], 1, 1, groups=["a", "b", "c"])
