"""Batches of variable-length examples with little padding, the same for any world size.

Each epoch the examples are shuffled, cut into pools of ``POOL`` global batches, sorted by
length inside a pool and cut into global batches (so a batch holds examples of similar
length), whose order is shuffled again. One optimizer step takes one global batch of
``batch_size x grad_accum x world_size`` examples; micro-batch ``m`` of rank ``r`` is its
slice ``m * world_size + r``. Two ranks with accumulation A therefore see exactly the
examples one rank sees with accumulation 2A, and the position (epoch, batch) is all the
state a checkpoint needs.
"""

from __future__ import annotations

from typing import Sequence

import torch

POOL = 16  # global batches sorted together by length


def pad(seqs: Sequence[Sequence[int]], pad_value: int, side: str = "right", length: int | None = None) -> torch.Tensor:
    """Stack sequences into a (B, T) long tensor padded on ``side`` with ``pad_value``."""
    T = length or max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), T), pad_value, dtype=torch.long)
    for i, s in enumerate(seqs):
        s = list(s)[:T]
        if s:
            if side == "right":
                out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            else:
                out[i, T - len(s) :] = torch.tensor(s, dtype=torch.long)
    return out


class BucketBatcher:
    """Yields, per optimizer step, this rank's micro-batches as lists of example indices.

    ``groups`` (one key per example, e.g. the prompt of a preference pair) keeps the examples of a group
    adjacent: the epoch shuffles whole groups, and length sorting moves whole groups (by their longest
    example), so a batch holds a few groups entire and its consumer can compute a sequence shared within a
    group once.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, grad_accum: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, bucket: bool = True, groups: Sequence | None = None):
        if not lengths:
            raise ValueError("no training examples")
        if groups is not None and len(groups) != len(lengths):
            raise ValueError(f"groups: {len(groups)} keys for {len(lengths)} examples")
        self.lengths = list(lengths)
        self.units = None  # lists of example indices that stay adjacent; None = every example alone
        if groups is not None:
            by_key: dict = {}
            for i, k in enumerate(groups):
                by_key.setdefault(k, []).append(i)
            self.units = list(by_key.values())
        self.B, self.A, self.W, self.rank = batch_size, grad_accum, world_size, rank
        self.seed, self.bucket = seed, bucket
        self.epoch, self.pos = 0, 0
        self._batches = self._epoch_batches(0)

    @property
    def global_batch(self) -> int:
        return self.B * self.A * self.W

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        n, G = len(self.lengths), self.global_batch
        if self.units is None:
            order = torch.randperm(n, generator=g).tolist()
            while len(order) < G:  # fewer examples than one global batch: repeat them
                order += torch.randperm(n, generator=g).tolist()
            keys = [self.lengths[i] for i in order]
        else:  # whole groups in random order, each keyed by (its longest example, its place)
            units: list[list[int]] = []
            while sum(map(len, units)) < G or not units:
                units += [self.units[u] for u in torch.randperm(len(self.units), generator=g).tolist()]
            order = [i for u in units for i in u]
            keys = [(max(self.lengths[i] for i in u), r) for r, u in enumerate(units) for _ in u]
        usable = len(order) - len(order) % G
        batches = []
        for p in range(0, usable, G * POOL):
            pos = range(p, min(p + G * POOL, usable))
            if self.bucket:
                pos = sorted(pos, key=keys.__getitem__)  # stable: equal keys keep their order
            pool = [order[j] for j in pos]
            batches += [pool[i : i + G] for i in range(0, len(pool), G)]
        perm = torch.randperm(len(batches), generator=g).tolist()
        return [batches[i] for i in perm]

    def next(self) -> list[list[int]]:
        """This rank's ``grad_accum`` micro-batches (lists of example indices) for one step."""
        if self.pos >= len(self._batches):
            self.epoch += 1
            self.pos = 0
            self._batches = self._epoch_batches(self.epoch)
        batch = self._batches[self.pos]
        self.pos += 1
        return [batch[(m * self.W + self.rank) * self.B : (m * self.W + self.rank + 1) * self.B] for m in range(self.A)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.pos = s["epoch"], s["pos"]
        self._batches = self._epoch_batches(self.epoch)


def eval_batches(lengths: Sequence[int], batch_size: int, rank: int = 0, world_size: int = 1,
                 max_batches: int = 0) -> list[list[int]]:
    """Deterministic held-out batches sorted by length, this rank's share."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if max_batches:
        batches = batches[:max_batches]
    return batches[rank::world_size]


def padding_fraction(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Share of padded positions when each batch is padded to its longest example."""
    real = sum(lengths[i] for b in batches for i in b)
    total = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    return 1.0 - real / total if total else 0.0
