"""The update loop of PPO-style algorithms: epochs x shuffled minibatches of one rollout, one optimizer step per
minibatch (chatforge.trainer.Trainer.accumulate: micro-batches, the global count, clipping)."""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Optional

import torch

from chatforge.data.chunks import FEWEST_CHUNKS
from chatforge.rl.rollout import RolloutBatch, row_chunks
from chatforge.trainer import Trainer

MicroStep = Callable[[RolloutBatch, int], tuple[torch.Tensor, float, dict]]
FirstStep = Callable[[list[torch.Tensor]], dict]


def update_epochs(trainer: Trainer, batch: RolloutBatch, *, epochs: int, minibatches: int, micro_rows: int,
                  generator: torch.Generator, micro_step: MicroStep, summarise: Callable[[dict], dict],
                  overhead: float = FEWEST_CHUNKS, by_prompt: bool = False,
                  first_step: Optional[FirstStep] = None) -> dict[str, float]:
    """``epochs`` passes over ``minibatches`` shuffled minibatches of this rank's rollout rows, one optimizer step
    per minibatch, micro-batches of at most ``micro_rows`` rows: length-sorted, cut where padding would cost more
    than ``overhead`` tokens per extra forward (chatforge/data/chunks.py); ``by_prompt``: rows that share a prompt
    stay together (rollout.row_chunks), for a model that reads a row per prompt.

    ``micro_step(rows, epoch)`` returns the micro-batch's ``(loss_sum, count, sums)`` (see Trainer.accumulate),
    so micro-batching and ranks leave each minibatch's gradient unchanged. ``summarise(result)`` turns one
    minibatch's global sums into means; the means are averaged over the minibatches in which they appeared.
    ``first_step(chunks)``, when given, runs the first optimizer step instead (from the chunks' row indices) and
    returns what ``Trainer.accumulate`` does: a step that takes the rollout's old log-probs (PPO: and values)
    from its own forward.
    """
    n_rows = len(batch)
    M = max(1, min(minibatches, n_rows))
    sums: dict[str, float] = defaultdict(float)
    seen: dict[str, int] = defaultdict(int)
    for epoch in range(epochs):
        perm = torch.randperm(n_rows, generator=generator)
        for j, mb in enumerate(perm.tensor_split(M)):
            chunks = row_chunks(batch, mb.tolist(), micro_rows, overhead, by_prompt)
            if first_step is not None and epoch == 0 and j == 0:
                res = first_step(chunks)
            else:
                res = trainer.accumulate([batch.select(rows) for rows in chunks], lambda sub: micro_step(sub, epoch))
            for k, v in summarise(res).items():
                sums[k] += v
                seen[k] += 1
    return {k: sums[k] / seen[k] for k in sums}
